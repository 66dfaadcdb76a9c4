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

import numpy as np

from stages.data_report import (
    Duplicates,
    build_report,
    class_balance_rows,
    drop_train,
    find_duplicates,
    headline,
    sha256_path,
    write_report,
)
from stages.errors import UserError, run_cli
from stages.io import atomic_dir, remove_output, save_split, split_bytes, write_json
from stages.params import DataParams, load_params
from stages.sources import load_source
from stages.sources.raw import RawData, validate_raw

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


def drop_duplicates(data: RawData, drop: bool, origin: str = "data"
                    ) -> tuple[RawData, Duplicates, int]:
    """Count exact duplicates (a train image in test is a leak); drop them from train if asked.

    Dropping every training image is an error here, not an empty split for normalize."""
    dups = find_duplicates(data)
    if len(dups.train_in_test):
        log.warning("%d training image(s) also in the test split (a leak)%s",
                    len(dups.train_in_test), "; dropped from train" if drop
                    else "; set data.drop_duplicates: true to drop them from train")
    if len(dups.within_train):
        log.warning("%d training image(s) repeat an earlier one%s", len(dups.within_train),
                    "; dropped" if drop else "")
    dropped = dups.drop() if drop else np.empty(0, np.int64)
    if len(dropped) and len(dropped) == len(data.train_labels):
        raise UserError(f"{origin}: data.drop_duplicates removed all {len(dropped)} training "
                        "images (each is in the test split or repeats an earlier one), so no "
                        "training images are left; check the data, or set "
                        "data.drop_duplicates: false")
    return (drop_train(data, dropped) if len(dropped) else data), dups, len(dropped)


def input_sha256(p: DataParams) -> str | None:
    """sha256 of the input's bytes (cifar10: the verified ``data.sha256``; synthetic: none)."""
    if p.source == "synthetic":
        return None
    if p.source == "cifar10":
        return p.sha256.lower()  # verified against the archive before it was read
    return sha256_path(p.path or "")


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m stages.ingest --out data/raw``."""
    parser = argparse.ArgumentParser(prog="python -m stages.ingest", description=__doc__)
    parser.add_argument("--out", required=True, type=Path, help="output folder (data/raw)")
    parser.add_argument("--report", type=Path, help="full data report (JSON)")
    parser.add_argument("--headline", type=Path, help="its headline numbers, a metrics file")
    parser.add_argument("--balance", type=Path, help="class-balance plot data (JSON)")
    args = parser.parse_args(argv)
    p = load_params().data
    log.info("reading data.source %s%s", p.source,
             f" from {p.path}" if p.path and p.source != "synthetic" else "")
    try:
        data = load_source(p)
        validate_raw(data, p.path or p.source)
        data, dups, dropped = drop_duplicates(data, p.drop_duplicates, p.path or p.source)
        write_raw(args.out, data)
        if args.report or args.headline:  # hashing the input reads all of it: only if asked
            report = build_report(data, dups, dropped, input_sha256(p),
                                  p.path if p.source != "synthetic" else None)
            if args.report:
                write_report(args.report, report)
            if args.headline:
                write_report(args.headline, headline(report))
        if args.balance:
            write_report(args.balance, class_balance_rows(data))
    except UserError:
        # an old output from other params must not pass for this run's result
        for out in (args.out, args.report, args.headline, args.balance):
            if out:
                remove_output(out)
        raise
    log.info("wrote %s: %d train + %d test images, %d classes (%s) from %s",
             args.out, len(data.train_labels), len(data.test_labels), len(data.classes),
             ", ".join(data.classes), data.source)


if __name__ == "__main__":
    run_cli(main)
