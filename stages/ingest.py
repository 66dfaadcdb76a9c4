"""ingest: read the data set named by ``data.*`` into ``data/raw/``.

Output (the raw-data contract): ``train.npz`` and ``test.npz``, each with ``images`` uint8
N x 3 x 32 x 32 (the one layout of the data path, see :mod:`stages.io`) and ``labels`` int64
in [0, n_classes), and ``meta.json`` with the class names, the source and the split sizes.
Sources live in :mod:`stages.sources`.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stages.errors import UserError, run_cli
from stages.io import atomic_dir, remove_output, save_split, split_bytes, write_json
from stages.params import load_params
from stages.sources import RawData, load_source, validate_raw

log = logging.getLogger("convflow.ingest")


def raw_meta(data: RawData) -> dict[str, Any]:
    """The ``meta.json`` of a data set."""
    return {
        "classes": list(data.classes),
        "source": data.source,
        "n_train": int(len(data.train_labels)),
        "n_test": int(len(data.test_labels)),
        "image_shape": list(data.train_images.shape[1:]),
        **data.details,
    }


def write_raw(out: str | Path, data: RawData) -> None:
    """Write ``data`` as the raw-data contract, atomically (all of it or nothing)."""
    need = split_bytes((data.train_images, data.train_labels),
                       (data.test_images, data.test_labels))
    with atomic_dir(out, need) as tmp:
        save_split(tmp / "train.npz", data.train_images, data.train_labels)
        save_split(tmp / "test.npz", data.test_images, data.test_labels)
        write_json(tmp / "meta.json", raw_meta(data))


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m stages.ingest --out data/raw``."""
    parser = argparse.ArgumentParser(prog="python -m stages.ingest", description=__doc__)
    parser.add_argument("--out", required=True, type=Path, help="output folder (data/raw)")
    args = parser.parse_args(argv)
    p = load_params().data
    log.info("reading data.source %s%s", p.source, f" from {p.path}" if p.path else "")
    try:
        data = load_source(p)
        validate_raw(data, p.path or p.source)
        write_raw(args.out, data)
    except UserError:
        # an old output from other params must not pass for this run's result
        remove_output(args.out)
        raise
    log.info("wrote %s: %d train + %d test images, %d classes (%s) from %s",
             args.out, len(data.train_labels), len(data.test_labels), len(data.classes),
             ", ".join(data.classes), data.source)


if __name__ == "__main__":
    run_cli(main)
