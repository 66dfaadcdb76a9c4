"""normalize: ``data/raw/`` -> ``data/processed/``: a validation split and the statistics.

The stage keeps its historical name, but it normalizes no pixel: it carves a stratified
validation split and records the per-channel mean/std of the training split, which the
model's first layer applies (divide by 255, standardise). Images stay uint8 N x 3 x 32 x 32
as ingest wrote them (4x less disk and host-to-device traffic than float32), so
``normalize.*`` chooses the split and the statistics recorded, not the stored data.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.errors import UserError, run_cli
from stages.io import (
    atomic_dir,
    read_raw,
    remove_output,
    save_split,
    split_bytes,
    write_json,
)
from stages.params import NormalizeParams, load_params

log = logging.getLogger("convflow.normalize")


@dataclass(frozen=True)
class Processed:
    """The three splits (uint8 N x 3 x 32 x 32) and the statistics written beside them."""

    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    stats: dict[str, Any]


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int,
                     n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val), each sorted; every class gives ``round(val_fraction * count)``."""
    rng = np.random.default_rng(seed)
    val: list[np.ndarray] = []
    for c in range(n_classes):
        members = np.flatnonzero(labels == c)
        n_val = int(round(val_fraction * len(members)))
        val.append(rng.permutation(members)[:n_val])
    val_idx = np.sort(np.concatenate(val)) if val else np.empty(0, np.int64)
    keep = np.ones(len(labels), bool)
    keep[val_idx] = False
    return np.flatnonzero(keep), val_idx


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (pixel/255) of uint8 N x C x H x W images, exact and
    memory-light."""
    if len(images) == 0:
        raise UserError("no training images left to compute statistics on")
    values = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for ch in range(images.shape[1]):
        # a 256-bin histogram instead of a float copy of every pixel
        counts = np.bincount(images[:, ch].ravel(), minlength=256).astype(np.float64)
        total = counts.sum()
        mean = float(counts @ values / total)
        var = float(counts @ (values - mean) ** 2 / total)
        means.append(mean)
        stds.append(float(np.sqrt(var)))
    return means, stds


def make_splits(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                classes: Sequence[str], source: str, p: NormalizeParams) -> Processed:
    """Carve a stratified validation split and record the training split's statistics."""
    images, labels = train
    n_classes = len(classes)
    train_idx, val_idx = stratified_split(labels, p.val_fraction, p.seed, n_classes)
    if len(train_idx) == 0:
        raise UserError(f"normalize.val_fraction={p.val_fraction} leaves no training images; "
                        "lower it")
    if p.standardize:
        mean, std = channel_stats(images[train_idx])
        # a constant channel would divide by zero in the model's first layer
        std = [s if s > 1e-6 else 1.0 for s in std]
    else:
        mean, std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    splits = {
        "train": (images[train_idx], labels[train_idx]),
        "val": (images[val_idx], labels[val_idx]),
        "test": test,
    }
    counts = {name: np.bincount(lab, minlength=n_classes).tolist()
              for name, (_, lab) in splits.items()}
    stats = {
        "classes": list(classes),
        "mean": mean,
        "std": std,
        "class_counts": counts,
        "source": source,
        "n": {name: int(len(lab)) for name, (_, lab) in splits.items()},
        "val_fraction": p.val_fraction,
        "standardize": p.standardize,
    }
    return Processed(splits, stats)


def write_processed(out: str | Path, result: Processed) -> None:
    """Write the splits and ``stats.json`` atomically."""
    with atomic_dir(out, split_bytes(*result.splits.values())) as tmp:
        for name, (images, labels) in result.splits.items():
            save_split(tmp / f"{name}.npz", images, labels)
        write_json(tmp / "stats.json", result.stats)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m stages.normalize --raw data/raw --out data/processed``."""
    parser = argparse.ArgumentParser(prog="python -m stages.normalize", description=__doc__)
    parser.add_argument("--raw", required=True, type=Path, help="ingest's output (data/raw)")
    parser.add_argument("--out", required=True, type=Path, help="output folder (data/processed)")
    args = parser.parse_args(argv)
    p = load_params().normalize
    try:
        meta, raw = read_raw(args.raw)
        result = make_splits(raw["train"], raw["test"], meta["classes"],
                             str(meta.get("source", "unknown")), p)
        write_processed(args.out, result)
    except UserError:
        remove_output(args.out)
        raise
    n = result.stats["n"]
    log.info("wrote %s: train %d, val %d, test %d; mean %s std %s", args.out, n["train"],
             n["val"], n["test"], _fmt(result.stats["mean"]), _fmt(result.stats["std"]))


def _fmt(xs: Sequence[float]) -> str:
    return "[" + ", ".join(f"{x:.4f}" for x in xs) + "]"


if __name__ == "__main__":
    run_cli(main)
