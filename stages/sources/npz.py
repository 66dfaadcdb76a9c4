"""The tutorial's ``cifar10.npz`` layout: ``X_train``, ``y_train``, ``X_test``, ``y_test``.

Read with ``allow_pickle=False``: a file holding object arrays is refused, not unpickled.
Each array's header is read first, and an array that would decompress beyond the caps
(:mod:`stages.sources.safety`) is refused before memory is allocated for it. Images may be
N x 32 x 32 x 3 (as saved by most tutorials, converted here) or N x 3 x 32 x 32; labels N or
N x 1 (Keras' layout). Class names come from an optional ``classes`` array of strings;
without one the labels must be exactly 0..k-1 (CIFAR-10's names when k is 10), so a stray
label is an error naming it, never a class invented for it.
"""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path

import numpy as np

from stages.errors import UserError
from stages.io import MAX_CLASSES
from stages.sources.raw import CIFAR10_CLASSES, RawData
from stages.sources.safety import expansion_budget, too_big

log = logging.getLogger("convflow.ingest")

KEYS = ("X_train", "y_train", "X_test", "y_test")


def _images(x: np.ndarray, where: str) -> np.ndarray:
    if x.ndim == 4 and x.shape[1:] == (32, 32, 3):
        log.info("%s: N x 32 x 32 x 3 (channels last); converting to N x 3 x 32 x 32", where)
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4 or x.shape[1:] != (3, 32, 32):
        raise UserError(f"{where}: shape {x.shape}; expected (N, 32, 32, 3) or (N, 3, 32, 32)")
    if x.dtype != np.uint8:
        raise UserError(f"{where}: dtype {x.dtype}; expected uint8 pixels 0-255 (for floats in "
                        "[0, 1], save (x * 255).round().astype('uint8'))")
    return np.ascontiguousarray(x)


def _labels(y: np.ndarray, n: int, where: str) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"{where}: {y.dtype} {y.shape}; expected {n} integer labels, "
                        "one per image")
    return y.astype(np.int64)


def _check_sizes(path: Path, npz: np.lib.npyio.NpzFile, keys: list[str]) -> None:
    """Refuse arrays whose headers claim more than the caps, before any is loaded."""
    budget, total = expansion_budget(os.path.getsize(path)), 0
    for key in keys:
        with npz.zip.open(f"{key}.npy") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(f)
        if dtype.hasobject:
            raise UserError(f"{path}: {key} holds object (pickled) arrays, which are refused "
                            "for safety; save plain numeric arrays (uint8 images, integer "
                            "labels)")
        nbytes = int(np.prod(shape, dtype=np.float64) * dtype.itemsize)
        total += nbytes
        if nbytes > npz.zip.getinfo(f"{key}.npy").file_size:
            raise UserError(f"{path}: {key}'s header claims {shape} {dtype}, more than the "
                            "file holds: a corrupt or crafted file")
        if total > budget:
            raise too_big(f"{path}: {key}", total, budget, "CONVFLOW_MAX_EXPANSION")


def _class_names(names: np.ndarray | None, y_train: np.ndarray, y_test: np.ndarray,
                 path: Path) -> tuple[str, ...]:
    if names is not None:
        if names.ndim != 1 or names.dtype.kind not in "US":
            raise UserError(f"{path}: 'classes' must be a 1-D array of strings")
        if len(names) > MAX_CLASSES:  # before building a tuple of them
            raise UserError(f"{path}: 'classes' names {len(names):,} classes, more than the "
                            f"{MAX_CLASSES:,} allowed (the confusion matrix grows with their "
                            "square)")
        return tuple(str(n) for n in names)
    values = np.union1d(np.unique(y_train), np.unique(y_test))
    k = len(values)
    if k > MAX_CLASSES:
        raise UserError(
            f"{path}: {k:,} distinct labels, more than the {MAX_CLASSES:,} classes allowed (the "
            "confusion matrix grows with their square); check that y_train/y_test hold class "
            "indices, not ids or values, or merge classes")
    if not np.array_equal(values, np.arange(k)):
        bad = values[(values < 0) | (values >= k)][:5].tolist()
        raise UserError(
            f"{path}: without a 'classes' array the labels must be exactly 0..k-1, but the {k} "
            f"distinct labels include {', '.join(map(str, bad))} (outside 0..{k - 1}). Fix "
            "the labels, or save the class names too: np.savez(..., classes=np.array([...]))")
    classes = CIFAR10_CLASSES if k == len(CIFAR10_CLASSES) else tuple(
        f"class_{i}" for i in range(k))
    log.info("%s: no 'classes' array; naming the classes %s", path, ", ".join(classes))
    return classes


def load_npz(path: str | None) -> RawData:
    """Both splits from a ``.npz`` with ``X_train``, ``y_train``, ``X_test``, ``y_test``."""
    file = Path(path or "").expanduser()
    if not path or not file.is_file():
        raise UserError(f"data.path: {file} does not exist (or is not a file); set it to your "
                        ".npz with X_train, y_train, X_test, y_test")
    try:
        loaded = np.load(file, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise UserError(f"{file}: a single .npy array, not an .npz archive with {KEYS}")
        with loaded as npz:
            missing = [k for k in KEYS if k not in npz.files]
            if missing:
                raise UserError(f"{file}: missing {', '.join(missing)} (has "
                                f"{', '.join(npz.files)}); expected arrays {', '.join(KEYS)}")
            wanted = [*KEYS, *(["classes"] if "classes" in npz.files else [])]
            _check_sizes(file, npz, wanted)
            arrays = {k: npz[k] for k in KEYS}
            names = npz["classes"] if "classes" in npz.files else None
    except UserError:
        raise
    except ValueError as err:
        if "pickle" in str(err) or "Object arrays" in str(err):
            raise UserError(f"{file}: holds object (pickled) arrays, which are refused for "
                            "safety; save plain numeric arrays (uint8 images, integer labels)"
                            ) from None
        raise UserError(f"{file}: not a valid .npz file ({err})") from None
    except (OSError, EOFError, KeyError, zipfile.BadZipFile) as err:
        raise UserError(f"{file}: not a valid .npz file, or truncated ({err})") from None
    x_train = _images(arrays["X_train"], f"{file}: X_train")
    x_test = _images(arrays["X_test"], f"{file}: X_test")
    y_train = _labels(arrays["y_train"], len(x_train), f"{file}: y_train")
    y_test = _labels(arrays["y_test"], len(x_test), f"{file}: y_test")
    classes = _class_names(names, y_train, y_test, file)
    return RawData(x_train, y_train, x_test, y_test, classes, source="npz",
                   details={"file": file.name})
