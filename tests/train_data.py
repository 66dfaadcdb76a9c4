"""Tiny learnable processed data for the train tests (the normalize stage's file contract)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from stages.io import save_split, write_json

CLASSES = [f"class{i}" for i in range(10)]


def learnable_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 N x 3 x 32 x 32 noise with a class-coloured square at a class-dependent spot."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 120, size=(n, 3, 32, 32), dtype=np.uint8)
    for k in range(10):
        sel = labels == k
        r, c = 4 + 6 * (k % 4), 4 + 8 * (k // 4)
        colour = np.array([(k * 80) % 256, (k * 150) % 256, 255 - k * 20], np.uint8)
        images[sel, :, r:r + 6, c:c + 6] = colour[None, :, None, None]
    return images, labels


def write_processed(folder: Path, n_train: int = 400, n_val: int = 100, seed: int = 0) -> Path:
    """Write train/val/test npz + stats.json as the normalize stage does."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, n) in enumerate((("train", n_train), ("val", n_val), ("test", n_val))):
        x, y = learnable_images(n, seed + i)
        save_split(folder / f"{name}.npz", x, y)
    write_json(folder / "stats.json", {
        "classes": CLASSES, "mean": [0.3, 0.3, 0.3], "std": [0.25, 0.25, 0.25],
        "class_counts": {}, "source": "test"})
    return folder


def write_train_params(folder: Path, **train: Any) -> Path:
    """A params.yaml in ``folder`` whose train group is the defaults updated by ``train``."""
    base = {"epochs": 2, "batch_size": 32, "threads": 1, "log_every": 2, "device": "cpu"}
    base.update(train)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump({"train": base}))
    return path


def crop_and_flip(out: torch.Tensor, source: torch.Tensor, pad: int,
                  fill: str) -> tuple[int, int, bool] | None:
    """The crop corner (dx, dy) and flip that turn ``source`` into ``out``, padded with
    ``F.pad`` (zeros or reflect), or None: the reference the loader's batches must match."""
    mode = "constant" if fill == "zeros" else "reflect"
    padded = F.pad(source[None].float(), (pad,) * 4, mode=mode)[0].to(torch.uint8)
    h, w = source.shape[-2:]
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy:dy + h, dx:dx + w]
            for flip in (False, True):
                if torch.equal(out, crop.flip(2) if flip else crop):
                    return dx, dy, flip
    return None
