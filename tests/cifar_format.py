"""Writers for test data in the official CIFAR-10 python format (used by tests and benchmarks).

The official batches are Python 2 pickles (protocol 2): dicts whose keys and strings are
Python 2 ``str`` (read back as bytes with ``encoding="bytes"``) and whose ``data`` is a
numpy array pickled through ``numpy.core.multiarray._reconstruct``. Python 3 cannot write
that form itself, so :func:`py2_batch_pickle` emits the opcodes directly.
"""

from __future__ import annotations

import io
import os
import struct
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")


def _str(b: bytes) -> bytes:
    """A Python 2 str: SHORT_BINSTRING or BINSTRING."""
    return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<I", len(b)) + b


def _int(i: int) -> bytes:
    return b"K" + bytes([i]) if 0 <= i < 256 else b"J" + struct.pack("<i", i)


def _obj(x: object) -> bytes:
    if isinstance(x, bytes):
        return _str(x)
    if isinstance(x, bool) or not isinstance(x, int | list | dict | np.ndarray):
        raise TypeError(type(x))
    if isinstance(x, int):
        return _int(x)
    if isinstance(x, list):
        return b"](" + b"".join(_obj(i) for i in x) + b"e"
    if isinstance(x, dict):
        return b"}(" + b"".join(_obj(k) + _obj(v) for k, v in x.items()) + b"u"
    arr = np.ascontiguousarray(x)
    shape = b"(" + b"".join(_int(d) for d in arr.shape) + b"t"
    dtype = (b"cnumpy\ndtype\n" + _str(arr.dtype.str[1:].encode()) + b"K\x00K\x01\x87R"
             + b"(K\x03" + _str(arr.dtype.str[:1].encode())
             + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
    return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + _str(b"b")
            + b"\x87R(K\x01" + shape + dtype + b"\x89" + _str(arr.tobytes()) + b"tb")


def py2_batch_pickle(obj: dict) -> bytes:
    """``obj`` (bytes keys/strings, ints, lists, numpy arrays) as a Python 2 protocol-2 pickle."""
    return b"\x80\x02" + _obj(obj) + b"."


def random_batches(n_train: int, n_test: int, seed: int = 0,
                   classes: Sequence[str] = CIFAR10_CLASSES) -> dict[str, bytes]:
    """Pickled batches of random pixels: 5 train batches (n_train split evenly) + test."""
    rng = np.random.default_rng(seed)
    out = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    sizes = [n_train // 5] * 5 + [n_test]
    for name, n in zip(names, sizes, strict=True):
        out[name] = py2_batch_pickle({
            b"batch_label": f"{name} of 5".encode(),
            b"labels": [int(v) for v in rng.integers(0, len(classes), n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img_{i:05d}.png".encode() for i in range(n)],
        })
    out["batches.meta"] = py2_batch_pickle({
        b"num_cases_per_batch": sizes[0],
        b"label_names": [c.encode() for c in classes],
        b"num_vis": 3072,
    })
    return out


def write_tar(path: Path, members: dict[str, bytes], folder: str = "cifar-10-batches-py",
              compresslevel: int = 6) -> Path:
    """A .tar.gz holding ``folder/<name>`` for each member, as the official archive does."""
    with tarfile.open(path, "w:gz", compresslevel=compresslevel) as tar:
        d = tarfile.TarInfo(folder)
        d.type, d.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(d)
        for name, blob in members.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def write_cifar_archive(path: Path, n_train: int = 50, n_test: int = 10, seed: int = 0,
                        compresslevel: int = 6) -> Path:
    """A small (or full-size) archive in the official CIFAR-10 python format."""
    return write_tar(path, random_batches(n_train, n_test, seed), compresslevel=compresslevel)


def batch(data: np.ndarray, labels: list[int]) -> bytes:
    """One batch pickle with the official keys around ``data`` and ``labels``."""
    return py2_batch_pickle({b"batch_label": b"x", b"labels": labels, b"data": data,
                             b"filenames": [b"f.png"] * len(labels)})


class Evil:
    """A pickle payload that would create ``marker`` if it were ever unpickled unsafely."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def tar_with(path: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    """A small official-format archive plus one extra ``member`` holding ``data``."""
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in random_batches(10, 2).items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    return path
