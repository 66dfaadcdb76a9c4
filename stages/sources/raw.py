"""The raw-data contract every source returns: :class:`RawData`, checked by :func:`validate_raw`.

Images are uint8 N x 3 x 32 x 32, labels int64 in range, one name per class; the checks are
the ones every later reader uses (:mod:`stages.io`), run before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stages.errors import UserError
from stages.io import check_classes, check_split

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


def validate_raw(data: RawData, origin: str) -> None:
    """Raise UserError (naming ``origin``) unless ``data`` satisfies the raw-data contract."""
    fix = "fix the input (data.source, data.path) and run again"
    classes = check_classes(list(data.classes), origin, fix)
    for split, images, labels in (("train", data.train_images, data.train_labels),
                                  ("test", data.test_images, data.test_labels)):
        check_split(images, labels, len(classes), f"{origin}: {split} split", fix)
        if len(images) == 0:
            raise UserError(f"{origin}: the {split} split is empty")
