"""Where ingest reads images from: one module per ``data.source``.

Each source returns a :class:`RawData`; :func:`validate_raw` checks it against the raw-data
contract (uint8 N x 3 x 32 x 32 images, int64 labels in range, one name per class) with the
same checks every later reader uses (:mod:`stages.io`) before anything is written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stages.errors import UserError
from stages.io import IMAGE_SHAPE, check_classes, check_split
from stages.params import DataParams

log = logging.getLogger("convflow.ingest")

__all__ = ["CIFAR10_CLASSES", "IMAGE_SHAPE", "RawData", "load_source", "validate_raw"]
#: The CIFAR-10 class names, in label order.
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)


@dataclass(frozen=True)
class RawData:
    """Both splits of a data set in the raw contract's layout (uint8 N x 3 x 32 x 32, int64
    labels), plus where they came from."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple[str, ...]
    source: str
    details: dict[str, Any] = field(default_factory=dict)


def load_source(p: DataParams) -> RawData:
    """Read the data set named by ``data.source`` (only that source's module is imported)."""
    if p.source == "synthetic":
        from stages.sources.synthetic import load_synthetic

        return load_synthetic(p.synthetic)
    if p.source == "cifar10":
        from stages.sources.cifar10 import load_cifar10

        return load_cifar10(p.path, p.url, p.sha256)
    if p.source == "npz":
        from stages.sources.npz import load_npz

        return load_npz(p.path)
    if p.source == "imagefolder":
        from stages.sources.imagefolder import load_imagefolder

        return load_imagefolder(p.path)
    raise UserError(f"data.source: unknown source '{p.source}'")  # the schema prevents this


def validate_raw(data: RawData, origin: str) -> None:
    """Raise UserError (naming ``origin``) unless ``data`` satisfies the raw-data contract."""
    fix = "fix the input (data.source, data.path) and run again"
    classes = check_classes(list(data.classes), origin, fix)
    for split, images, labels in (("train", data.train_images, data.train_labels),
                                  ("test", data.test_images, data.test_labels)):
        check_split(images, labels, len(classes), f"{origin}: {split} split", fix)
        if len(images) == 0:
            raise UserError(f"{origin}: the {split} split is empty")
