"""Reading and writing the pipeline's files: pickle-free arrays, JSON, atomic outputs.

Every stage writes its outputs through :func:`atomic_dir` or :func:`atomic_file`, so a stage
that fails or is killed leaves either the previous complete output or none at all, never a
partial one that looks valid. A full disk ends the stage with one line naming the path.

The data path has one layout from ingest to the model's first layer: uint8 images
N x C x H x W (:data:`IMAGE_SHAPE`), int64 labels. NCHW because it is what PyTorch's
convolutions and the saved model take, and what CIFAR-10's own bytes already are (a row is
1024 red, 1024 green, 1024 blue values), so the official archive is read by a reshape and
normalize only splits; height-width-channel order exists only where an image is decoded
(PIL) or drawn (matplotlib). Every reader of a split checks it with the one
:func:`check_split`, so a bad file gets the same message wherever it is read.
"""

from __future__ import annotations

import errno
import json
import math
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

#: The image layout of every split, raw and processed: channels, height, width (uint8).
IMAGE_SHAPE = (3, 32, 32)
#: The command that rebuilds each folder of the data path, quoted in its error messages.
RAW_FIX = "re-run ingest: dvc repro -f ingest"
PROCESSED_FIX = "re-run normalize: dvc repro -f normalize"
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
#: Most classes a data set may have (ImageNet has 1000). Several outputs grow with the square
#: of the count: the confusion matrix in metrics (81 MB of JSON, committed to git, for 3,000
#: classes) and its plot (past 11 GB of memory).
MAX_CLASSES = 1000


def _no_space(err: BaseException) -> OSError | None:
    """The out-of-space OSError in ``err``'s chain (zipfile and numpy re-raise it), if any."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _NO_SPACE:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _out_of_space(out: Path, tmp: Path, err: OSError, need: int | None) -> UserError:
    """One line for a full disk: the path, what was written or is needed, what is free."""
    written = _tree_bytes(tmp) if tmp.exists() else 0
    free = shutil.disk_usage(out.parent).free
    needed = f"needs {_mb(need)}" if need else f"needs more than the {_mb(written)} written"
    return UserError(f"{out}: out of space ({os.strerror(err.errno)}): {needed}, {_mb(free)} "
                     "free; nothing was kept. Free some space (or raise the file-size limit) "
                     "and run again")


def _mb(n: int | None) -> str:
    return f"{(n or 0) / 1e6:.1f} MB"


def _check_space(out: Path, need: int | None) -> None:
    if need and shutil.disk_usage(out.parent).free < need:
        free = shutil.disk_usage(out.parent).free
        raise UserError(f"{out}: not enough space on the device: needs {_mb(need)}, "
                        f"{_mb(free)} free; free some space (or move the repository) and run "
                        "again")


@contextmanager
def atomic_dir(out: str | Path, need: int | None = None) -> Iterator[Path]:
    """Yield an empty temp folder beside ``out``; on success it replaces ``out`` whole.

    ``need`` (bytes, optional) is checked against the free space first; a full disk while
    writing is a :class:`UserError` naming ``out``, with the temp folder removed.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _check_space(out, need)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it owner-only
    except BaseException as err:
        full = _no_space(err)
        message = _out_of_space(out, tmp, full, need) if full is not None else None
        shutil.rmtree(tmp, ignore_errors=True)
        if message is not None:
            raise message from None
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
    except BaseException as err:
        full = _no_space(err)
        message = _out_of_space(path, tmp, full, None) if full is not None else None
        tmp.unlink(missing_ok=True)
        if message is not None:
            raise message from None
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


def split_bytes(*splits: tuple[np.ndarray, np.ndarray]) -> int:
    """About the bytes :func:`save_split` writes for these splits (for the free-space check)."""
    return sum(int(x.nbytes) + 8 * len(y) + 4096 for x, y in splits)


def load_arrays(path: str | Path, keys: tuple[str, ...], fix: str) -> dict[str, np.ndarray]:
    """The named arrays of a pipeline ``.npz``; never unpickles; a torn file is one line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: missing; run the stage that writes it (dvc repro)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in keys}
    except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile, AttributeError) as err:
        # AttributeError: a plain .npy has no keys; the rest: a torn or foreign file
        raise UserError(f"{path}: not a valid {'/'.join(keys)} file ({type(err).__name__}: "
                        f"{err}); {fix}") from None


def load_split(path: str | Path, fix: str = "re-run the stage that writes it "
               "(dvc repro -f <stage>)") -> tuple[np.ndarray, np.ndarray]:
    """Read a split written by :func:`save_split` (unchecked: see :func:`check_split`)."""
    arrays = load_arrays(path, ("images", "labels"), fix)
    return arrays["images"], arrays["labels"]


def bad_labels(labels: np.ndarray, n_classes: int) -> list[int]:
    """The distinct label values outside ``0..n_classes-1`` (at most 5, smallest first)."""
    outside = labels[(labels < 0) | (labels >= n_classes)]
    return np.unique(outside)[:5].tolist() if outside.size else []


def check_split(images: np.ndarray, labels: np.ndarray, n_classes: int, where: str,
                fix: str) -> None:
    """The one check of a split (layout, dtype, one integer label per image, labels in range):
    raise ``UserError("<where>: <what is wrong>; <fix>")``."""
    expected = f"uint8 (N, {', '.join(map(str, IMAGE_SHAPE))})"
    problem = None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
        problem = f"images are {images.dtype} {images.shape}; expected {expected}"
    elif labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        problem = f"labels are {labels.dtype} {labels.shape}; expected one integer per image"
    elif len(labels) != len(images):
        problem = f"{len(labels)} labels for {len(images)} images; expected one per image"
    elif bad := bad_labels(labels, n_classes):
        problem = (f"label value(s) {', '.join(map(str, bad))} outside 0..{n_classes - 1} "
                   f"(there are {n_classes} classes)")
    if problem:
        raise UserError(f"{where}: {problem}; {fix}")


def check_classes(classes: object, where: str, fix: str) -> list[str]:
    """Class names: a list of 2 to :data:`MAX_CLASSES` distinct, non-empty, printable strings."""
    if not isinstance(classes, list | tuple) or not all(isinstance(c, str) for c in classes):
        raise UserError(f"{where}: 'classes' must be a list of names, got "
                        f"{type(classes).__name__}; {fix}")
    if len(classes) < 2:
        raise UserError(f"{where}: found {len(classes)} class(es) {list(classes)}; a classifier "
                        f"needs at least 2; {fix}")
    if len(classes) > MAX_CLASSES:
        raise UserError(f"{where}: {len(classes):,} classes, more than the {MAX_CLASSES:,} "
                        f"allowed (the confusion matrix grows with their square); {fix}")
    odd = [c for c in classes if not c or not c.isprintable()]
    if odd:
        # a newline in a name would forge lines in logs, plots and the metrics files
        raise UserError(f"{where}: class name(s) {', '.join(map(repr, odd[:5]))} are empty or "
                        f"hold newlines/control characters; rename them; {fix}")
    if len(set(classes)) != len(classes):
        raise UserError(f"{where}: duplicate class names {list(classes)}; {fix}")
    return list(classes)


def _numbers(value: object, n: int) -> bool:
    return (isinstance(value, list) and len(value) == n and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        for v in value))


def _read_splits(folder: Path, index: str, names: tuple[str, ...], fix: str,
                 ) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The JSON index of a data folder and its splits, each checked against the other."""
    info = read_json(folder / index, fix)
    if not isinstance(info, dict):
        raise UserError(f"{folder / index}: expected a JSON object, got "
                        f"{type(info).__name__}; {fix}")
    classes = check_classes(info.get("classes"), str(folder / index), fix)
    counts = info.get("n") if isinstance(info.get("n"), dict) else {}
    splits = {}
    for name in names:
        path = folder / f"{name}.npz"
        images, labels = load_split(path, fix)
        check_split(images, labels, len(classes), str(path), fix)
        expected = counts.get(name, info.get(f"n_{name}"))
        if isinstance(expected, int) and expected != len(labels):
            raise UserError(f"{path}: holds {len(labels)} images but {folder / index} says "
                            f"{expected}; {fix}")
        splits[name] = (images, labels)
    return info, splits


def read_raw(folder: str | Path, names: tuple[str, ...] = ("train", "test"),
             ) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """``meta.json`` and the named splits of ingest's output, checked (raw-data contract)."""
    return _read_splits(Path(folder), "meta.json", names, RAW_FIX)


def read_processed(folder: str | Path, names: tuple[str, ...] = ("train", "val", "test"),
                   ) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """``stats.json`` and the named splits of normalize's output, checked against each other."""
    folder = Path(folder)
    stats, splits = _read_splits(folder, "stats.json", names, PROCESSED_FIX)
    channels = IMAGE_SHAPE[0]
    for key in ("mean", "std"):
        if not _numbers(stats.get(key), channels):
            raise UserError(f"{folder / 'stats.json'}: '{key}' must be {channels} finite "
                            f"numbers, got {stats.get(key)!r}; {PROCESSED_FIX}")
    if min(stats["std"]) <= 0:
        raise UserError(f"{folder / 'stats.json'}: 'std' must be positive, got "
                        f"{stats['std']}; {PROCESSED_FIX}")
    return stats, splits


def write_json(path: str | Path, obj: Any) -> None:
    """Pretty, stable JSON (sorted keys are not used: the writer's order is meaningful)."""
    Path(path).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def read_json(path: str | Path, fix: str = "re-run the stage that writes it "
              "(dvc repro -f <stage>)") -> Any:
    """Parse a JSON file the pipeline wrote; a missing or torn file is one clear line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: missing; run the stage that writes it (dvc repro)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise UserError(f"{path}: not valid JSON ({err}); {fix}") from None
