"""Identity of a training run (params, data, code), so a checkpoint of another run is
never resumed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from stages.params import TrainParams

#: The code that decides what a training run computes: a checkpoint made by other code
#: (another architecture, another loop) is never resumed.
TRAINING_CODE = ("train.py", "loop.py", "checkpoint.py", "loader.py", "recipe.py", "models.py",
                 "device.py", "ddp.py")


def data_fingerprint(folder: str | Path) -> str:
    """sha256 over the processed files, so a checkpoint from other data is never resumed."""
    h = hashlib.sha256()
    for name in ("train.npz", "val.npz", "stats.json"):
        path = Path(folder) / name
        h.update(name.encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def code_fingerprint() -> str:
    """sha256 over the training code files beside this module."""
    h = hashlib.sha256()
    for name in TRAINING_CODE:
        h.update(name.encode())
        h.update((Path(__file__).parent / name).read_bytes())
    return h.hexdigest()


def run_fingerprint(p: TrainParams, data_hash: str, code_hash: str) -> str:
    """Identity of a training run: every train param, the data it reads and the code."""
    blob = json.dumps({"params": p.model_dump(mode="json"), "data": data_hash,
                       "code": code_hash}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()
