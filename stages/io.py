"""Reading and writing the pipeline's files: pickle-free arrays, JSON, atomic outputs.

Every stage writes its outputs through :func:`atomic_dir` or :func:`atomic_file`, so a stage
that fails or is killed leaves either the previous complete output or none at all, never a
partial one that looks valid.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from stages.errors import UserError


@contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield an empty temp folder beside ``out``; on success it replaces ``out`` whole."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it owner-only
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.is_dir() and not out.is_symlink():
        shutil.rmtree(out)
    elif out.exists() or out.is_symlink():
        out.unlink()
    os.replace(tmp, out)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it is renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        # mkstemp makes the file owner-only; give it the mode a plain open() would have.
        os.chmod(tmp, 0o666 & ~_umask())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_output(path: str | Path) -> None:
    """Delete a stale output (file or folder) so nothing invalid is left behind."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def save_split(path: str | Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write one split as an uncompressed, pickle-free ``.npz`` (``images``, ``labels``)."""
    np.savez(path, images=np.ascontiguousarray(images), labels=np.asarray(labels, np.int64))


def load_split(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a split written by :func:`save_split`; never unpickles."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: missing; run the stage that writes it (dvc repro)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return npz["images"], npz["labels"]
    except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile, AttributeError) as err:
        # AttributeError: a plain .npy has no keys; the rest: a torn or foreign file
        raise UserError(f"{path}: not a valid split file ({type(err).__name__}: {err}); "
                        "re-run the stage that writes it (dvc repro -f <stage>)") from None


def write_json(path: str | Path, obj: Any) -> None:
    """Pretty, stable JSON (sorted keys are not used: the writer's order is meaningful)."""
    Path(path).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: missing; run the stage that writes it (dvc repro)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err}); re-run the stage that writes it "
                        "(dvc repro -f <stage>)") from None
