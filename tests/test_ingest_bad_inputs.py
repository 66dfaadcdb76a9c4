"""The ingest command line on a bad input: exit 2, one clear line, no traceback, and no
output left behind that could pass for a result. One case per source and kind of mistake;
the many variants of a bad CIFAR-10 archive are unit tests in test_ingest_cifar10.py."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from cifar_format import random_batches, write_tar
from stage_cli import assert_user_error, run_stage

from stages.sources.safety import sha256_file


def _corrupt_cifar(tmp: Path) -> dict:
    whole = write_tar(tmp / "whole.tar.gz", random_batches(50, 10)).read_bytes()
    cut = tmp / "cut.tar.gz"
    cut.write_bytes(whole[: len(whole) // 3])
    # the user vouched for this file's checksum: the archive itself is found wanting
    return {"source": "cifar10", "path": str(cut), "sha256": sha256_file(cut)}


def _offline(tmp: Path) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {"source": "cifar10", "path": "data/download",
            "url": f"http://127.0.0.1:{port}/cifar-10-python.tar.gz"}


def _npz_object(tmp: Path) -> dict:
    np.savez(tmp / "d.npz", X_train=np.array([{"a": 1}], dtype=object), y_train=np.zeros(1),
             X_test=np.zeros((1, 32, 32, 3), np.uint8), y_test=np.zeros(1, np.int64))
    return {"source": "npz", "path": str(tmp / "d.npz")}


def _npy_not_npz(tmp: Path) -> dict:
    np.save(tmp / "d.npy", np.zeros((2, 32, 32, 3), np.uint8))
    return {"source": "npz", "path": str(tmp / "d.npy")}


def _npz_dtype(tmp: Path) -> dict:
    np.savez(tmp / "d.npz", X_train=np.zeros((2, 32, 32, 3)), y_train=np.zeros(2, np.int64),
             X_test=np.zeros((1, 32, 32, 3), np.uint8), y_test=np.zeros(1, np.int64))
    return {"source": "npz", "path": str(tmp / "d.npz")}


def _images(tmp: Path) -> Path:
    from PIL import Image

    for split, cls in (("train", "a"), ("train", "b"), ("test", "a")):
        (tmp / "imgs" / split / cls).mkdir(parents=True)
        Image.new("RGB", (32, 32), (9, 9, 9)).save(tmp / "imgs" / split / cls / "x.png")
    return tmp / "imgs"


def _empty_class(tmp: Path) -> dict:
    root = _images(tmp)
    (root / "train" / "c").mkdir()
    return {"source": "imagefolder", "path": str(root)}


def _unreadable(tmp: Path) -> dict:
    root = _images(tmp)
    (root / "train" / "b" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return {"source": "imagefolder", "path": str(root)}


CASES: dict[str, tuple[Callable[[Path], dict], str]] = {
    "corrupt cifar10 archive": (_corrupt_cifar, "truncated or corrupt archive"),
    "npz object arrays": (_npz_object, "object (pickled) arrays"),
    "npz float images": (_npz_dtype, "dtype float64"),
    "npy instead of npz": (_npy_not_npz, "a single .npy array"),
    "missing npz": (lambda t: {"source": "npz", "path": str(t / "x.npz")}, "does not exist"),
    "empty class folder": (_empty_class, "train/c has no PNG/JPEG images"),
    "unreadable image": (_unreadable, "bad.png: not a readable PNG/JPEG image"),
    "missing image folder": (lambda t: {"source": "imagefolder", "path": str(t / "nope")},
                             "does not exist"),
    "bad params": (lambda t: {"source": "mnist"}, "data.source"),
}


def _run_ingest(tmp: Path) -> subprocess.CompletedProcess:
    return run_stage("ingest", ["--out", "data/raw"], tmp)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_a_message_and_no_output(tmp_path: Path, case: str) -> None:
    make, message = CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    data = make(tmp_path)
    (work / "params.yaml").write_text(yaml.safe_dump({"data": data}))
    # one line that names the stage: what a user greps for and the Prefect flow reports
    assert_user_error(_run_ingest(work), "ingest", message)
    assert not (work / "data" / "raw").exists()
    assert not list(work.glob("data/.raw.tmp-*"))


def test_a_failed_run_removes_the_previous_output(tmp_path: Path) -> None:
    """The old data/raw came from other params; left in place it would pass for this run's."""
    good = {"source": "synthetic", "synthetic": {"n_train": 20, "n_test": 10, "seed": 0}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"data": good}))
    assert _run_ingest(tmp_path).returncode == 0
    assert (tmp_path / "data" / "raw" / "meta.json").is_file()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {"data": {"source": "npz", "path": "missing.npz"}}))
    proc = _run_ingest(tmp_path)
    assert proc.returncode == 2 and "missing.npz" in proc.stderr
    assert not (tmp_path / "data" / "raw").exists()


def test_no_connection_is_a_clear_error_with_a_retryable_status(tmp_path: Path) -> None:
    """Exit 75 (EX_TEMPFAIL), not 2: the network may be back next time (the flow retries)."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"data": _offline(tmp_path)}))
    proc = run_stage("fetch", ["--out", "data/download"], tmp_path)  # the one download route
    assert proc.returncode == 75, proc.stderr
    assert "could not download" in proc.stderr and "data.path" in proc.stderr
    assert "dvc pull fetch" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "data" / "download").exists()
