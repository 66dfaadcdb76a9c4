"""Handling untrusted input safely: checksums, downloads, tar members, pickles, size caps.

Nothing here extracts an archive to disk: sources read the members they need straight
from the tar file into memory, after every member has passed :func:`check_member`, so no
path in an archive can ever decide where a file lands.

Every decompression is capped (see docs/threat-model.md): one file or archive member may hold
at most :func:`max_file_bytes` (a CIFAR-10 batch is 31 MB), and an archive may expand to at
most :func:`expansion_budget` of its size. Both are checked from the headers, before the
bytes are inflated, so a bomb is refused at once and in little memory. Environment variables
raise them for a data set that needs more.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import logging
import os
import pickle
import tarfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from stages.errors import TransientError, UserError

log = logging.getLogger("convflow.ingest")

_BLOCK = 1 << 20
_MB = 1 << 20

#: Defaults of the caps (each overridable by the environment variable named beside it).
MAX_FILE_MB = 64  # CONVFLOW_MAX_FILE_MB: one image file or archive member
MAX_EXPANSION = 50  # CONVFLOW_MAX_EXPANSION: uncompressed / compressed size of an archive
EXPANSION_SLACK_MB = 32  # a small archive of tiny, very compressible images may exceed 50x


def env_number(name: str, default: float) -> float:
    """A positive number from the environment variable ``name``, else ``default``."""
    raw = os.environ.get(name, "")
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise UserError(f"{name}={raw!r}: expected a number") from None
    if not value > 0:
        raise UserError(f"{name}={raw!r}: expected a positive number")
    return value


def max_file_bytes() -> int:
    """The most bytes one image file, archive member or array may decompress to."""
    return int(env_number("CONVFLOW_MAX_FILE_MB", MAX_FILE_MB) * _MB)


def expansion_budget(compressed_bytes: int) -> int:
    """The most bytes an archive (or .npz) of ``compressed_bytes`` may decompress to."""
    ratio = env_number("CONVFLOW_MAX_EXPANSION", MAX_EXPANSION)
    return int(EXPANSION_SLACK_MB * _MB + ratio * compressed_bytes)


def too_big(what: str, size: int, limit: int, knob: str) -> UserError:
    """The one message for input refused by a size cap."""
    return UserError(f"{what}: would decompress to {size / _MB:.1f} MB, more than the "
                     f"{limit / _MB:.1f} MB allowed (a decompression bomb or a file that is "
                     f"not what it claims); refused. If you trust it, raise {knob}")


class DownloadError(TransientError):
    """A download that failed for a reason the next attempt may not meet (network, server):
    ingest exits with status 75, so the Prefect flow retries it."""


def cache_dir() -> Path:
    """Download cache: ``$CONVFLOW_CACHE``, ``$XDG_CACHE_HOME/convflow`` or ``~/.cache/convflow``"""
    if os.environ.get("CONVFLOW_CACHE"):
        return Path(os.environ["CONVFLOW_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "convflow"


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: str | Path, expected: str, fix: str) -> None:
    """Raise UserError (expected vs actual, then ``fix``) unless ``path`` hashes to ``expected``."""
    actual = sha256_file(path)
    if actual != expected.lower():
        raise UserError(f"{path}: sha256 mismatch: expected {expected.lower()}, got {actual}. "
                        f"{fix}")
    log.info("%s: sha256 verified", path)


def download(url: str, dest: str | Path, expected_sha256: str, timeout: float = 30.0) -> Path:
    """Download ``url`` to ``dest`` with a progress bar; keep it only if its sha256 matches."""
    from tqdm import tqdm  # only a download needs it

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}")
    offline_help = (f"If this machine is offline, download the file elsewhere and either set "
                    f"data.path to it or copy it to {dest}.")
    digest = hashlib.sha256()
    log.info("downloading %s to %s", url, dest)
    try:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as out:
                total = int(resp.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                          desc=dest.name, mininterval=0.5) as bar:
                    while block := resp.read(_BLOCK):
                        out.write(block)
                        digest.update(block)
                        bar.update(len(block))
        except http.client.IncompleteRead:
            raise DownloadError(f"download of {url} was cut off before the end; run again. "
                                f"{offline_help}") from None
        except urllib.error.HTTPError as err:
            if err.code < 500 and err.code not in (408, 429):  # 404...: the URL is wrong
                raise UserError(f"could not download {url}: HTTP {err.code} {err.reason}; "
                                f"check data.url. {offline_help}") from None
            raise DownloadError(f"could not download {url}: HTTP {err.code} {err.reason}. "
                                f"{offline_help}") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
            reason = getattr(err, "reason", None) or err
            raise DownloadError(f"could not download {url}: {reason}. {offline_help}") from None
        except ValueError as err:  # not a URL urllib can open
            raise UserError(f"data.url: cannot download {url!r} ({err})") from None
        size = tmp.stat().st_size
        if total is not None and size != total:
            raise DownloadError(f"download of {url} stopped after {size} of {total} bytes; "
                                f"run again. {offline_help}")
        actual = digest.hexdigest()
        if actual != expected_sha256.lower():
            raise UserError(f"{url}: downloaded file has sha256 {actual}, expected "
                            f"{expected_sha256.lower()}; it was not kept. Check data.url (a "
                            "mirror with a re-packed archive needs its own data.sha256).")
        os.replace(tmp, dest)
    finally:
        # whatever stopped the download (an error, Ctrl-C), no partial file stays behind
        tmp.unlink(missing_ok=True)
    return dest


def check_member(member: tarfile.TarInfo, archive: str | Path) -> None:
    """Refuse a tar member that could escape a target folder or is not a plain file/folder."""
    name = member.name
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
        raise UserError(f"{archive}: unsafe member '{name}' (absolute path or '..'); "
                        "refusing to read this archive")
    if member.issym() or member.islnk():
        raise UserError(f"{archive}: member '{name}' is a link (to '{member.linkname}'); "
                        "refusing to read an archive with links")
    if not (member.isfile() or member.isdir()):
        raise UserError(f"{archive}: member '{name}' is not a regular file or folder; "
                        "refusing to read this archive")


def iter_tar(archive: str | Path, want: Callable[[tarfile.TarInfo], bool],
             ) -> Iterator[tuple[tarfile.TarInfo, bytes | None]]:
    """Stream a (compressed) tar archive once: every member, checked by :func:`check_member`,
    with its bytes where ``want(member)`` (else None).

    A truncated or corrupt archive raises UserError naming it. Sizes come from each
    member's header: a member over :func:`max_file_bytes`, or one that would take the
    archive past :func:`expansion_budget`, is refused before it is inflated.
    """
    budget = expansion_budget(os.path.getsize(archive))
    per_file = max_file_bytes()
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                # streamed once: keeping every header would grow with a bomb of empty members
                tar.members.clear()
                check_member(member, archive)
                if member.offset_data + member.size > budget:
                    raise too_big(f"{archive}", member.offset_data + member.size, budget,
                                  "CONVFLOW_MAX_EXPANSION")
                data = None
                if member.isfile() and want(member):
                    if member.size > per_file:
                        raise too_big(f"{archive}: {member.name}", member.size, per_file,
                                      "CONVFLOW_MAX_FILE_MB")
                    f = tar.extractfile(member)
                    data = f.read() if f is not None else b""
                    if len(data) != member.size:
                        raise EOFError(f"member '{member.name}' is cut short")
                yield member, data
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise UserError(f"{archive}: truncated or corrupt archive ({err}); download or copy it "
                        "again") from None


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
