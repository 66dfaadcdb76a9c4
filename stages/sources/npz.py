"""The tutorial's ``cifar10.npz`` layout: ``X_train``, ``y_train``, ``X_test``, ``y_test``.

Read with ``allow_pickle=False``: a file holding object arrays is refused, not unpickled.
Images may be N x 32 x 32 x 3 (as saved by most tutorials) or N x 3 x 32 x 32; labels
N or N x 1 (Keras' layout). Class names come from an optional ``classes`` array of strings,
else CIFAR-10's names when the labels fit in 10 classes.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import numpy as np

from stages.errors import UserError
from stages.sources import CIFAR10_CLASSES, RawData

log = logging.getLogger("convflow.ingest")

KEYS = ("X_train", "y_train", "X_test", "y_test")


def _images(x: np.ndarray, where: str) -> np.ndarray:
    if x.ndim == 4 and x.shape[1:] == (3, 32, 32):
        log.info("%s: N x 3 x 32 x 32 (channels first); converting to N x 32 x 32 x 3", where)
        x = x.transpose(0, 2, 3, 1)
    if x.ndim != 4 or x.shape[1:] != (32, 32, 3):
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


def load_npz(path: str | None) -> RawData:
    """Both splits from a ``.npz`` with ``X_train``, ``y_train``, ``X_test``, ``y_test``."""
    p = Path(path or "").expanduser()
    if not path or not p.is_file():
        raise UserError(f"data.path: {p} does not exist (or is not a file); set it to your "
                        ".npz with X_train, y_train, X_test, y_test")
    try:
        loaded = np.load(p, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise UserError(f"{p}: a single .npy array, not an .npz archive with {KEYS}")
        with loaded as npz:
            missing = [k for k in KEYS if k not in npz.files]
            if missing:
                raise UserError(f"{p}: missing {', '.join(missing)} (has {', '.join(npz.files)});"
                                f" expected arrays {', '.join(KEYS)}")
            arrays = {k: npz[k] for k in KEYS}
            names = npz["classes"] if "classes" in npz.files else None
    except UserError:
        raise
    except ValueError as err:
        if "pickle" in str(err) or "Object arrays" in str(err):
            raise UserError(f"{p}: holds object (pickled) arrays, which are refused for safety; "
                            "save plain numeric arrays (uint8 images, integer labels)") from None
        raise UserError(f"{p}: not a valid .npz file ({err})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as err:
        raise UserError(f"{p}: not a valid .npz file, or truncated ({err})") from None
    x_train = _images(arrays["X_train"], f"{p}: X_train")
    x_test = _images(arrays["X_test"], f"{p}: X_test")
    y_train = _labels(arrays["y_train"], len(x_train), f"{p}: y_train")
    y_test = _labels(arrays["y_test"], len(x_test), f"{p}: y_test")
    if names is not None:
        if names.ndim != 1 or names.dtype.kind not in "US":
            raise UserError(f"{p}: 'classes' must be a 1-D array of strings")
        classes = tuple(str(n) for n in names)
    else:
        top = int(max(y_train.max(initial=0), y_test.max(initial=0)))
        classes = CIFAR10_CLASSES if top < len(CIFAR10_CLASSES) else tuple(
            f"class_{i}" for i in range(top + 1))
        log.info("%s: no 'classes' array; naming the classes %s", p, ", ".join(classes))
    return RawData(x_train, y_train, x_test, y_test, classes, source="npz",
                   details={"file": p.name})
