"""Classify image files with the trained model: ``python -m stages.predict IMAGE...``.

Any PNG/JPEG (any size, grey, RGBA or RGB) is read by ingest's own image reader
(:func:`stages.sources.images.decode_image`: the same caps, the same resize), then given to
the model as raw uint8, exactly as in training. Prints, per image, the top classes with
their probabilities.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from stages.errors import UserError, run_cli
from stages.models import load_model
from stages.paths import find_root, pipeline_paths
from stages.sources.images import decode_image
from stages.sources.safety import read_regular_file

log = logging.getLogger("convflow.predict")


def load_image(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """An image file as uint8 3 x H x W at ``size`` (height, width); regular files only."""
    return decode_image(read_regular_file(path), str(path), size)[0]


@torch.no_grad()
def top_classes(model: torch.nn.Module, images: np.ndarray, classes: Sequence[str],
                top: int = 3) -> list[list[tuple[str, float]]]:
    """Top ``top`` (class, probability) pairs for each uint8 N x 3 x H x W image."""
    probs = torch.softmax(model(torch.from_numpy(images)).float(), dim=1)
    k = min(top, probs.shape[1])
    values, indices = probs.topk(k, dim=1)
    return [[(classes[i], float(v)) for v, i in zip(vs, ix, strict=True)]
            for vs, ix in zip(values.tolist(), indices.tolist(), strict=True)]


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: print the top classes of each image."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("images", nargs="+", help="PNG/JPEG files")
    ap.add_argument("--model", help="model file (default: the pipeline's models/model.pt)")
    ap.add_argument("--stage", help="take the model in this registry stage instead (e.g. prod)")
    ap.add_argument("--top", type=int, default=3, help="classes to show per image (default 3)")
    args = ap.parse_args(argv)
    if args.top < 1:
        raise UserError("--top must be at least 1")
    model_path = Path(args.model) if args.model else pipeline_paths()["model"]
    if args.stage:  # the model registry (GTO tags), fetched through DVC
        from stages.registered_model import fetch_model

        model_path = fetch_model(find_root(), args.stage)
    model, meta = load_model(model_path)
    _, h, w = meta["input"]["shape"]
    batch = np.stack([load_image(path, (h, w)) for path in args.images])
    for path, ranked in zip(args.images, top_classes(model, batch, meta["classes"], args.top),
                            strict=True):
        print(f"{path}: " + ", ".join(f"{name} {prob:.3f}" for name, prob in ranked))


if __name__ == "__main__":
    run_cli(main)
