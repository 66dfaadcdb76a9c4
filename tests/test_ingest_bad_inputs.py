"""Every bad input to ``python -m stages.ingest``: exit 2, one clear message, no traceback,
and no output left behind that could pass for a result."""

from __future__ import annotations

import io
import pickle
import socket
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from cifar_format import py2_batch_pickle, random_batches, write_tar
from conftest import subprocess_env

from stages.sources.safety import sha256_file


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        import os

        return (os.system, (f"touch {self.marker}",))


def _cifar(tmp: Path, replace: dict[str, bytes] | None = None,
           extra: tarfile.TarInfo | None = None) -> dict:
    batches = random_batches(10, 2)
    batches.update(replace or {})
    path = write_tar(tmp / "cifar.tar.gz", batches)
    if extra is not None:  # rewrite with one more member
        with tarfile.open(path, "w:gz") as tar:
            for name, blob in batches.items():
                info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
            tar.addfile(extra, io.BytesIO(b"x" * extra.size))
    return {"source": "cifar10", "path": str(path), "sha256": sha256_file(path)}


def _cifar_file(tmp: Path, blob: bytes) -> dict:
    path = tmp / "c.tar.gz"
    path.write_bytes(blob)
    return {"source": "cifar10", "path": str(path), "sha256": sha256_file(path)}


def _truncated(tmp: Path) -> dict:
    whole = write_tar(tmp / "whole.tar.gz", random_batches(50, 10)).read_bytes()
    cut = tmp / "cut.tar.gz"
    cut.write_bytes(whole[: len(whole) // 3])
    return {"source": "cifar10", "path": str(cut), "sha256": sha256_file(cut)}


def _checksum(tmp: Path) -> dict:
    params = _cifar(tmp)
    del params["sha256"]  # the official value, which this file does not have
    return params


def _malicious(tmp: Path) -> dict:
    return _cifar(tmp, {"data_batch_1": pickle.dumps({"data": _Evil(tmp / "pwned")}, 2)})


def _dotdot(tmp: Path) -> dict:
    info = tarfile.TarInfo("cifar-10-batches-py/../../escaped")
    info.size = 1
    return _cifar(tmp, extra=info)


def _link(tmp: Path) -> dict:
    info = tarfile.TarInfo("cifar-10-batches-py/link")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    return _cifar(tmp, extra=info)


def _batch(data: np.ndarray, labels: list[int]) -> bytes:
    return py2_batch_pickle({b"labels": labels, b"data": data})


def _offline(tmp: Path) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {"source": "cifar10", "path": None,
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
    "truncated archive": (_truncated, "truncated or corrupt archive"),
    "corrupt archive": (lambda t: _cifar_file(t, b"\x1f\x8b\x08garbage" * 50),
                        "truncated or corrupt archive"),
    "checksum mismatch": (_checksum, "sha256 mismatch: expected 6d958be0"),
    "malicious pickle": (_malicious, "refusing to import"),
    "member with ..": (_dotdot, "unsafe member"),
    "link member": (_link, "is a link"),
    "wrong shape": (lambda t: _cifar(t, {"data_batch_2": _batch(np.zeros((2, 1024), np.uint8),
                                                                [0, 1])}), "expected uint8"),
    "wrong dtype": (lambda t: _cifar(t, {"data_batch_2": _batch(np.zeros((2, 3072), np.int64),
                                                                [0, 1])}), "int64"),
    "labels out of range": (lambda t: _cifar(t, {"test_batch": _batch(
        np.zeros((2, 3072), np.uint8), [3, 12])}), r"labels range over [3, 12]"),
    "missing archive": (lambda t: {"source": "cifar10", "path": str(t / "none.tar.gz")},
                        "does not exist"),
    "npz object arrays": (_npz_object, "object (pickled) arrays"),
    "npz float images": (_npz_dtype, "dtype float64"),
    "npy instead of npz": (_npy_not_npz, "a single .npy array"),
    "missing npz": (lambda t: {"source": "npz", "path": str(t / "x.npz")}, "does not exist"),
    "empty class folder": (_empty_class, "train/c has no PNG/JPEG images"),
    "unreadable image": (_unreadable, "bad.png: unreadable image"),
    "missing image folder": (lambda t: {"source": "imagefolder", "path": str(t / "nope")},
                             "does not exist"),
    "bad params": (lambda t: {"source": "mnist"}, "data.source"),
}


def _run_ingest(tmp: Path) -> subprocess.CompletedProcess:
    env = subprocess_env()
    env["CONVFLOW_CACHE"] = str(tmp / "cache")
    return subprocess.run([sys.executable, "-m", "stages.ingest", "--out", "data/raw"],
                          cwd=tmp, env=env, text=True, capture_output=True, timeout=120)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_a_message_and_no_output(tmp_path: Path, case: str) -> None:
    make, message = CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    data = make(tmp_path)
    (work / "params.yaml").write_text(yaml.safe_dump({"data": data}))
    proc = _run_ingest(work)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    # one line that names the stage: what a user greps for and the Prefect flow reports
    assert "convflow.ingest: error: " in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (work / "data" / "raw").exists()
    assert not list(work.glob("data/.raw.tmp-*"))
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "escaped").exists()


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
    proc = _run_ingest(tmp_path)
    assert proc.returncode == 75, proc.stderr
    assert "could not download" in proc.stderr and "data.path" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "data" / "raw").exists()
