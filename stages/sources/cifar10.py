"""The official CIFAR-10 python archive (``cifar-10-python.tar.gz``), downloaded or local.

The archive is verified against ``data.sha256`` before it is opened, every tar member is
checked (no ``..``, no absolute paths, no links), the batches are read straight from the
archive into memory (nothing is extracted to disk) and unpickled with a restricted
unpickler that admits only what the batches contain. The archive is ``data.path``, or the
fetch stage's download in it (``data/download``): fetch is the one download route.
"""

from __future__ import annotations

import io
import logging
import pickle
import tarfile
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from stages.errors import UserError
from stages.io import bad_labels
from stages.sources.raw import RawData
from stages.sources.safety import archive_name, iter_tar, verify_sha256

log = logging.getLogger("convflow.ingest")

FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META = "batches.meta"
_PIXELS = 3 * 32 * 32


def locate_archive(path: str | None, url: str, sha256: str) -> Path:
    """The verified archive: ``data.path`` itself, or the one the fetch stage put in it."""
    if not path:  # the schema requires it; fetch is the one download route
        raise UserError("data.path: not set; set it to data/download (the fetch stage's "
                        "download) or to your cifar-10-python.tar.gz")
    archive = Path(path).expanduser()
    fetched = archive / archive_name(url)
    if archive.is_dir() and fetched.is_file():
        archive = fetched  # the fetch stage's folder (data/download)
    elif archive.is_dir():
        raise UserError(f"data.path: {archive} is a folder without {fetched.name}; run "
                        "`dvc repro fetch` (or `dvc pull fetch`), or set data.path to the "
                        "cifar-10-python.tar.gz archive itself (its checksum is verified)")
    if not archive.is_file():
        raise UserError(f"data.path: {archive} does not exist; set it to your "
                        "cifar-10-python.tar.gz, or to data/download (the fetch stage's)")
    verify_sha256(archive, sha256, "The file is corrupt or not this archive: copy or "
                  "download it again; if it is a re-packed archive you trust, set "
                  "data.sha256 to its sha256.")
    return archive


def decode_batch(batch: Any, what: str, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One unpickled batch dict -> (uint8 N x 3 x 32 x 32 images, int64 labels), validated."""
    if not isinstance(batch, dict):
        raise UserError(f"{what}: expected a dict, got {type(batch).__name__}")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise UserError(f"{what}: missing 'data' or 'labels' (has {sorted(map(str, batch))})")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != _PIXELS:
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise UserError(f"{what}: 'data' is {dtype} {shape}; expected uint8 (N, {_PIXELS})")
    try:
        labels = np.asarray(batch["labels"])
    except Exception:  # noqa: BLE001 - ragged or odd objects
        labels = np.asarray([], dtype=object)
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{what}: 'labels' must be {len(data)} integers, got "
                        f"{labels.dtype} {labels.shape}")
    if bad := bad_labels(labels, n_classes):
        raise UserError(f"{what}: label value(s) {', '.join(map(str, bad))} outside "
                        f"0..{n_classes - 1} (there are {n_classes} classes)")
    # rows are stored channel-major (1024 R, 1024 G, 1024 B): already the NCHW layout
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def read_archive(archive: str | Path) -> RawData:
    """Read the batches of a CIFAR-10 python archive (already verified) into a RawData."""
    wanted = {*TRAIN_BATCHES, TEST_BATCH, META}

    def want(member: tarfile.TarInfo) -> bool:
        name = PurePosixPath(member.name)
        return name.parent.name == FOLDER and name.name in wanted

    blobs: dict[str, Any] = {}
    for member, data in iter_tar(archive, want):
        if data is not None:
            # unpickle at once so only one batch's raw bytes are held at a time
            blobs[PurePosixPath(member.name).name] = restricted_loads(
                data, f"{archive}: {member.name}")
    missing = sorted(wanted - set(blobs))
    if missing:
        raise UserError(f"{archive}: not a CIFAR-10 python archive: no "
                        f"{', '.join(f'{FOLDER}/{m}' for m in missing)}")
    meta = blobs[META]
    names = meta.get(b"label_names", meta.get("label_names")) if isinstance(meta, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, bytes | str) for n in names):
        raise UserError(f"{archive}: {FOLDER}/{META} has no list of label_names")
    classes = tuple(n.decode("utf-8") if isinstance(n, bytes) else n for n in names)
    batches = [decode_batch(blobs[b], f"{archive}: {FOLDER}/{b}", len(classes))
               for b in TRAIN_BATCHES]
    test_images, test_labels = decode_batch(blobs[TEST_BATCH], f"{archive}: {FOLDER}/{TEST_BATCH}",
                                            len(classes))
    return RawData(
        train_images=np.concatenate([images for images, _ in batches]),
        train_labels=np.concatenate([labels for _, labels in batches]),
        test_images=test_images, test_labels=test_labels,
        classes=classes, source="cifar10",
    )


def load_cifar10(path: str | None, url: str, sha256: str) -> RawData:
    """CIFAR-10 from ``data.path`` (an archive, or fetch's folder), sha256-verified."""
    archive = locate_archive(path, url, sha256)
    data = read_archive(archive)
    return RawData(data.train_images, data.train_labels, data.test_images, data.test_labels,
                   data.classes, data.source,
                   details={"archive": archive.name, "sha256": sha256.lower()})


# ------------------------------------------------------------------------------- pickles
def _numpy_reconstruct() -> Any:
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR-10's batches contain: numpy arrays, dicts, lists, bytes, str.

    Containers and scalars need no import; the only globals a batch refers to are numpy's
    array reconstruction, ``ndarray`` and ``dtype``. Any other global (``os.system``,
    ``builtins.eval``, ...) is refused before it is imported, so a crafted pickle cannot run.
    """

    def find_class(self, module: str, name: str) -> Any:
        allowed = {
            ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
            ("numpy", "ndarray"): lambda: np.ndarray,
            ("numpy", "dtype"): lambda: np.dtype,
        }
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refusing to import {module}.{name}")
        return allowed[(module, name)]()


def restricted_loads(blob: bytes, what: str) -> Any:
    """Unpickle ``blob`` with :class:`RestrictedUnpickler` (Python 2 strings as bytes)."""
    try:
        return RestrictedUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except pickle.UnpicklingError as err:
        if "refusing" in str(err):
            raise UserError(f"{what}: {err}, which a CIFAR-10 batch never contains; this is not "
                            "a genuine CIFAR-10 archive and was not loaded") from None
        raise UserError(f"{what}: corrupt pickle ({err})") from None
    except Exception as err:  # noqa: BLE001 - any failure of a corrupt pickle is a bad input
        raise UserError(f"{what}: corrupt pickle ({type(err).__name__}: {err})") from None
