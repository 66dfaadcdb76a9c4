"""The data report ingest writes: what the input held, committed so ``git diff`` compares it.

``metrics/data_report.json`` (committed, uncached, not a DVC metric): images per class and
split, the image sizes seen and how they were made 32x32, exact-duplicate images within train
and between train and test (a leak), how many were dropped (``data.drop_duplicates``) and the
sha256 of the input's bytes. ``metrics/data.json`` (a DVC metrics file): only its headline
numbers (:func:`headline`), so ``dvc metrics show`` stays one terminal wide.
``metrics/class_balance.json``: one row per class for the class-balance plot.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from stages.io import atomic_file, write_json
from stages.sources.raw import RawData
from stages.sources.safety import sha256_file

log = logging.getLogger("convflow.ingest")

_BLOCK = 1 << 20


@dataclass(frozen=True)
class Duplicates:
    """Train indices that repeat an earlier train image, and those whose pixels are in test."""

    within_train: np.ndarray
    train_in_test: np.ndarray

    def drop(self) -> np.ndarray:
        """Train indices to drop: every leak and every repeat (the first copy stays)."""
        return np.union1d(self.within_train, self.train_in_test)


def _digests(images: np.ndarray) -> list[bytes]:
    # 16-byte BLAKE2b of each image's pixels: exact duplicates only, and fast (GB/s)
    return [hashlib.blake2b(img.tobytes(), digest_size=16).digest() for img in images]


def find_duplicates(data: RawData) -> Duplicates:
    """Exact pixel duplicates within the training split and between train and test."""
    test = set(_digests(data.test_images))
    seen: set[bytes] = set()
    within, leak = [], []
    for i, d in enumerate(_digests(data.train_images)):
        if d in seen:
            within.append(i)
        seen.add(d)
        if d in test:
            leak.append(i)
    return Duplicates(np.asarray(within, np.int64), np.asarray(leak, np.int64))


def drop_train(data: RawData, index: np.ndarray) -> RawData:
    """``data`` without the training images at ``index``."""
    keep = np.ones(len(data.train_labels), bool)
    keep[index] = False
    return replace(data, train_images=data.train_images[keep],
                   train_labels=data.train_labels[keep])


def sha256_path(path: str | Path) -> str:
    """sha256 of a file's bytes; of a folder, of its sorted ``relative path, file sha256`` lines.

    Hidden files and folders are skipped, as the sources skip them.
    """
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    lines = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith("."):
                full = Path(dirpath) / f
                lines.append(f"{full.relative_to(path).as_posix()}\0{sha256_file(full)}\n")
    return hashlib.sha256("".join(sorted(lines)).encode()).hexdigest()


def _per_class(labels: np.ndarray, classes: tuple[str, ...]) -> dict[str, int]:
    counts = np.bincount(labels, minlength=len(classes))
    return {name: int(n) for name, n in zip(classes, counts, strict=True)}


def build_report(data: RawData, dups: Duplicates, dropped: int,
                 input_sha256: str | None, input_path: str | None) -> dict[str, Any]:
    """The report of ``data`` (already without any dropped images) as a JSON-able dict."""
    n = len(data.train_labels) + dropped + len(data.test_labels)
    sizes = data.details.get("sizes") or {"32x32": n}
    return {
        "source": data.source,
        "input": {"path": input_path, "sha256": input_sha256},
        "classes": len(data.classes),
        "images": {
            "train": {"total": int(len(data.train_labels)),
                      **_per_class(data.train_labels, data.classes)},
            "test": {"total": int(len(data.test_labels)),
                     **_per_class(data.test_labels, data.classes)},
        },
        "sizes_seen": dict(sorted(sizes.items())),
        "resized": {"images": int(data.details.get("resized", 0)),
                    "how": "RGB, bilinear to 32x32 (no crop)"},
        "duplicates": {"within_train": int(len(dups.within_train)),
                       "train_in_test": int(len(dups.train_in_test)),
                       "dropped_from_train": int(dropped)},
    }


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """The report's numbers for ``dvc metrics show``: images kept per split.

    The rest (per-class counts, sizes, duplicates, input hash) would add ~30 wide columns
    to DVC's one table for every metrics file; it stays in the report (``git diff``).
    """
    images = report["images"]
    return {"images": {"train": images["train"]["total"], "test": images["test"]["total"]}}


def class_balance_rows(data: RawData) -> list[dict[str, Any]]:
    """One row per class: its name and image count per split (the class-balance plot)."""
    train = _per_class(data.train_labels, data.classes)
    test = _per_class(data.test_labels, data.classes)
    return [{"class": c, "train": train[c], "test": test[c]} for c in data.classes]


def write_report(path: str | Path, report: dict[str, Any]) -> None:
    """Write one report file atomically."""
    with atomic_file(path) as tmp:
        write_json(tmp, report)
