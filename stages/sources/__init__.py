"""Where ingest reads images from: one module per ``data.source``.

Each source returns a :class:`RawData`; :func:`validate_raw` checks it against the raw-data
contract (uint8 N x 32 x 32 x 3 images, int64 labels in range, one name per class) before
anything is written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stages.errors import UserError
from stages.params import DataParams

log = logging.getLogger("convflow.ingest")

IMAGE_SHAPE = (32, 32, 3)
#: The CIFAR-10 class names, in label order.
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)


@dataclass(frozen=True)
class RawData:
    """Both splits of a data set in the raw contract's layout, plus where they came from."""

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
    n_classes = len(data.classes)
    if n_classes < 2:
        raise UserError(f"{origin}: found {n_classes} class(es) {list(data.classes)}; "
                        "a classifier needs at least 2")
    if len(set(data.classes)) != n_classes:
        raise UserError(f"{origin}: duplicate class names {list(data.classes)}")
    for split, images, labels in (("train", data.train_images, data.train_labels),
                                  ("test", data.test_images, data.test_labels)):
        if images.dtype != np.uint8:
            raise UserError(f"{origin}: {split} images have dtype {images.dtype}; "
                            "expected uint8 pixels 0-255")
        if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
            raise UserError(f"{origin}: {split} images have shape {images.shape}; "
                            f"expected (N, {', '.join(map(str, IMAGE_SHAPE))})")
        if len(images) == 0:
            raise UserError(f"{origin}: the {split} split is empty")
        if labels.ndim != 1 or len(labels) != len(images):
            raise UserError(f"{origin}: {split} labels have shape {labels.shape}; "
                            f"expected ({len(images)},), one per image")
        if not np.issubdtype(labels.dtype, np.integer):
            raise UserError(f"{origin}: {split} labels have dtype {labels.dtype}; "
                            "expected integers")
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= n_classes:
            raise UserError(f"{origin}: {split} labels range over [{lo}, {hi}]; expected "
                            f"[0, {n_classes - 1}] for {n_classes} classes")
