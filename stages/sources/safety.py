"""Handling untrusted input safely: checksums, downloads, tar members, size caps.

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
import socket
import stat
import tarfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlparse

from stages.errors import TransientError, UserError
from stages.params import OFFICIAL_CIFAR10_SHA256, shorten

log = logging.getLogger("convflow.ingest")

_BLOCK = 1 << 20
_MB = 1 << 20

#: Defaults of the caps (each overridable by the environment variable named beside it).
MAX_FILE_MB = 64  # CONVFLOW_MAX_FILE_MB: one image file or archive member
MAX_EXPANSION = 50  # CONVFLOW_MAX_EXPANSION: uncompressed / compressed size of an archive
EXPANSION_SLACK_MB = 32  # a small archive of tiny, very compressible images may exceed 50x
#: A tar header record (GNU long name, pax): a path is at most 4 KB, so 64 KB is generous;
#: Python's tarfile reads a record whole before anything else sees it (2 GB once).
MAX_HEADER_RECORD = 64 << 10
#: Header records before one member: a real archive has at most 3 (global pax, pax, long
#: name); tarfile recurses once per record, so a long chain would end in a RecursionError.
MAX_HEADER_CHAIN = 8
#: Size of the official CIFAR-10 archive: a download of it is refused past this many bytes.
CIFAR10_ARCHIVE_BYTES = 170_498_071
#: Cap on any other download (a mirror's re-packed archive), CONVFLOW_MAX_DOWNLOAD_MB.
MAX_DOWNLOAD_MB = 512
#: Seconds a download waits on a silent server (connect or read), CONVFLOW_DOWNLOAD_TIMEOUT.
DOWNLOAD_TIMEOUT = 30.0


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


def _not_regular(path: str | Path, mode: int) -> UserError:
    kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or
            stat.S_ISBLK(mode) else "a folder" if stat.S_ISDIR(mode) else "a socket"
            if stat.S_ISSOCK(mode) else "not a file")
    return UserError(f"{path}: {kind}, not a regular file; only regular image files are read "
                     "(replace it with the file itself)")


def read_regular_file(path: str | Path) -> bytes:
    """The bytes of the regular file ``path`` (a link to one is followed), at most
    :func:`max_file_bytes` of them.

    A FIFO, device, socket or folder is refused from ``stat`` before it is opened; the file
    is opened non-blocking and checked again, so one swapped in meanwhile cannot hang the
    read; the cap is on the bytes actually read (a ``/proc`` file claims 0 bytes).
    """
    limit = max_file_bytes()
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(path, mode)
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise _not_regular(path, info.st_mode)
            if info.st_size > limit:
                raise too_big(str(path), info.st_size, limit, "CONVFLOW_MAX_FILE_MB")
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise UserError(f"{path}: no such image file") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror or err})") from None
    if len(data) > limit:
        raise UserError(f"{path}: holds more than the {limit:,} bytes allowed for one file (its "
                        f"size said {info.st_size:,} bytes); refused. If you trust it, raise "
                        "CONVFLOW_MAX_FILE_MB")
    return data


class DownloadError(TransientError):
    """A download that failed for a reason the next attempt may not meet (network, server):
    ingest exits with status 75, so the Prefect flow retries it."""


def archive_name(url: str) -> str:
    """The file name a download of ``url`` is stored under (in the fetch stage's folder)."""
    return Path(urlparse(url).path).name or "cifar-10-python.tar.gz"


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


def check_url(url: str) -> None:
    """Refuse a download URL that is not http(s), or that names no file (``.../..``)."""
    try:
        parsed = urlparse(url)
    except ValueError as err:
        raise UserError(f"data.url: {shorten(url)!r} is not a valid URL ({err})") from None
    if parsed.scheme.lower() not in ("http", "https") or not parsed.netloc:
        raise UserError(f"data.url: {shorten(url)!r} is not an http:// or https:// URL; only "
                        "those are downloaded (for a local file, set data.path to it)")
    if Path(parsed.path).name == "..":
        raise UserError(f"data.url: {shorten(url)!r} ends in '..', not a file name; give the "
                        "archive's own URL")


def download_cap(expected_sha256: str) -> int:
    """The most bytes a download may stream: the official archive's exact size, else
    CONVFLOW_MAX_DOWNLOAD_MB (a server that sends no length could otherwise fill the disk)."""
    if expected_sha256.lower() == OFFICIAL_CIFAR10_SHA256:
        return CIFAR10_ARCHIVE_BYTES
    return int(env_number("CONVFLOW_MAX_DOWNLOAD_MB", MAX_DOWNLOAD_MB) * _MB)


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects to http(s) only (urllib's own handler also follows ftp://)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, ANN201, PLR0913
        if urlparse(newurl).scheme.lower() not in ("http", "https"):
            raise UserError(f"data.url: {shorten(req.full_url)!r} redirects to "
                            f"{shorten(newurl)!r}, not an http(s) URL; refused")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _stream(resp: http.client.HTTPResponse, out: io.BufferedWriter, url: str, cap: int,
            name: str) -> tuple[str, int | None]:
    """Copy the response to ``out`` (at most ``cap`` bytes); its sha256 and announced length."""
    from tqdm import tqdm  # only a download needs it

    total = int(resp.headers.get("Content-Length") or 0) or None
    known = (f" (the CIFAR-10 archive is {CIFAR10_ARCHIVE_BYTES:,})"
             if cap == CIFAR10_ARCHIVE_BYTES else
             "; if the file really is larger, raise CONVFLOW_MAX_DOWNLOAD_MB")
    too_long = UserError(f"{shorten(url)}: the server sends more than {cap:,} bytes{known}; "
                         "refused, nothing was kept. Check data.url")
    if (total or 0) > cap:
        raise too_long
    digest, size = hashlib.sha256(), 0
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name,
              mininterval=0.5) as bar:
        while block := resp.read(_BLOCK):
            size += len(block)
            if size > cap:
                raise too_long
            out.write(block)
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest(), total


def _failure(err: Exception, url: str, timeout: float, help_: str) -> UserError:
    """The one line for a download that raised ``err`` (75: worth a retry; 2: fix the URL)."""
    shown = shorten(url)
    if isinstance(err, http.client.IncompleteRead):
        return DownloadError(f"download of {shown} was cut off before the end; run again. {help_}")
    if isinstance(err, urllib.error.HTTPError):
        if err.code < 500 and err.code not in (408, 429):  # 404...: the URL is wrong
            return UserError(f"could not download {shown}: HTTP {err.code} {err.reason}; "
                             f"check data.url. {help_}")
        return DownloadError(f"could not download {shown}: HTTP {err.code} {err.reason}. {help_}")
    reason = getattr(err, "reason", None) or err
    if isinstance(reason, TimeoutError | socket.timeout):
        return DownloadError(f"could not download {shown}: the server sent nothing for "
                             f"{timeout:g} s (timed out); run again later. {help_}")
    if isinstance(err, urllib.error.URLError | http.client.HTTPException | OSError):
        return DownloadError(f"could not download {shown}: {reason}. {help_}")
    return UserError(f"data.url: cannot download {shown!r} ({err})")  # a ValueError


def download(url: str, dest: str | Path, expected_sha256: str,
             timeout: float | None = None) -> Path:
    """Download ``url`` to ``dest`` with a progress bar; keep it only if its sha256 matches.

    Only http(s); at most :func:`download_cap` bytes; a server silent for ``timeout`` s
    (default CONVFLOW_DOWNLOAD_TIMEOUT, 30) ends it with exit 75, so the flow retries.
    """
    check_url(url)
    timeout = timeout or env_number("CONVFLOW_DOWNLOAD_TIMEOUT", DOWNLOAD_TIMEOUT)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}")
    offline_help = (f"If this machine is offline, download the file elsewhere and either set "
                    f"data.path to it or copy it to {dest}.")
    log.info("downloading %s to %s", url, dest)
    try:
        try:
            opener = urllib.request.build_opener(_HttpOnlyRedirects)
            with opener.open(url, timeout=timeout) as resp, open(tmp, "wb") as out:
                actual, total = _stream(resp, out, url, download_cap(expected_sha256),
                                        dest.name)
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
            raise _failure(err, url, timeout, offline_help) from None
        size = tmp.stat().st_size
        if total is not None and size != total:
            raise DownloadError(f"download of {shorten(url)} stopped after {size} of {total} "
                                f"bytes; run again. {offline_help}")
        if actual != expected_sha256.lower():
            raise UserError(f"{shorten(url)}: downloaded file has sha256 {actual}, expected "
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


class _RecordTooBig(Exception):  # noqa: N818 - not an error of ours: caught in iter_tar
    """A tar header record over :data:`MAX_HEADER_RECORD`, or too many before one member."""


class _CappedTarInfo(tarfile.TarInfo):
    """tarfile's header reader, with each extended record's size checked *before* tarfile
    reads the record whole into memory, and the chain of records bounded."""

    def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        extended = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
                    tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)
        if self.type == tarfile.GNUTYPE_SPARSE:  # never an image; its records chain unbounded
            raise _RecordTooBig(f"member '{self.name}' is a sparse file")
        if self.type not in extended:
            tar._convflow_chain = 0  # noqa: SLF001 - our own counter on the archive
            return super()._proc_member(tar)
        tar._convflow_chain = getattr(tar, "_convflow_chain", 0) + 1  # noqa: SLF001
        if self.size > MAX_HEADER_RECORD:
            raise _RecordTooBig(f"a header record (long name or pax) of {self.size:,} bytes at "
                                f"offset {self.offset:,}, more than the {MAX_HEADER_RECORD:,} "
                                "read")
        if tar._convflow_chain > MAX_HEADER_CHAIN:  # noqa: SLF001
            raise _RecordTooBig(f"more than {MAX_HEADER_CHAIN} header records (long name or "
                                f"pax) before one member, at offset {self.offset:,}")
        return super()._proc_member(tar)


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
        with tarfile.open(archive, "r:*", tarinfo=_CappedTarInfo) as tar:
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
    except _RecordTooBig as err:
        raise UserError(f"{archive}: {err}; a crafted or corrupt archive, refused") from None
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise UserError(f"{archive}: truncated or corrupt archive ({err}); download or copy it "
                        "again") from None
