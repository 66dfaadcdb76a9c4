"""What ``dvc pull`` checked out, checked against the md5 that ``dvc.lock`` records for it.

DVC fetches an object from a cloud remote without hashing it (a remote's ``verify`` is off
by default, and with it on DVC silently drops a bad object, which ``--allow-missing`` then
hides), and records the expected hash as the file's state, so ``dvc status`` stays clean
over garbage. Here every output the pull added or changed is hashed: a file against its
md5, a directory against its ``.dir`` manifest (itself hashed). A mismatch is reported as
a corrupted object of the remote, naming the output and the object's key; the bad copy is
removed from the workspace and the local cache, and never from the remote.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from flows.dvc_adapter import dvc_command, dvc_env
from flows.runner import StageFailed

#: The lines of ``dvc pull``'s summary naming what it checked out: ``A  path``, ``M  path``.
_CHECKED_OUT = re.compile(r"^[AM]\s+(\S.*?)\s*$", re.MULTILINE)
_CHUNK = 1 << 20


def checked_out(output: str) -> list[str]:
    """The workspace paths a ``dvc pull`` output says it added or modified."""
    return [p.rstrip("/") for p in _CHECKED_OUT.findall(output)]


def _outs(file: Path) -> list[dict[str, Any]]:
    try:
        doc = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        return []
    if file.name == "dvc.lock":
        return [o for stage in (doc.get("stages") or {}).values() for o in stage.get("outs") or []]
    return doc.get("outs") or []


def locked_md5(root: Path, also: list[str] | tuple[str, ...] = ()) -> dict[str, str]:
    """Outputs' md5 (``<md5>.dir`` for a directory) by path: dvc.lock's, and ``also``'s ``.dvc``."""
    found = {}
    for out in _outs(root / "dvc.lock"):
        if out.get("md5"):
            found[str(out["path"]).rstrip("/")] = str(out["md5"])
    for path in also:  # a `dvc add`-ed path records its md5 in <path>.dvc beside it
        for out in _outs(root / f"{path}.dvc"):
            if out.get("md5") and str(out.get("path", "")).rstrip("/") == Path(path).name:
                found.setdefault(path, str(out["md5"]))
    return found


def md5_of(path: Path) -> str:
    """The md5 of a file's bytes, read in chunks."""
    digest = hashlib.md5()  # noqa: S324 (DVC's content address, not a security hash)
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def object_key(oid: str) -> str:
    """The object's key in a DVC 3 cache or remote: ``files/md5/ab/cdef...``."""
    return f"files/md5/{oid[:2]}/{oid[2:]}"


def _cache_dir(root: Path) -> Path:
    out = subprocess.run(dvc_command("cache", "dir"), cwd=root, env=dvc_env(), text=True,
                         capture_output=True, check=True).stdout.strip()
    return (root / out).resolve()


def _dir_entries(cache: Path, oid: str) -> list[dict[str, Any]] | None:
    """A directory's manifest from the cache; None if its bytes do not match ``oid``."""
    manifest = cache / object_key(oid)
    if not manifest.is_file() or md5_of(manifest) + ".dir" != oid:
        return None
    return json.loads(manifest.read_text(encoding="utf-8"))


def corrupted(root: Path, paths: list[str]) -> list[tuple[str, str]]:
    """``(workspace path, object oid)`` of each of ``paths`` whose bytes differ from its record."""
    locked = locked_md5(root, paths)
    bad: list[tuple[str, str]] = []
    cache = None
    for path in paths:
        oid = locked.get(path)
        if oid is None:
            continue  # not a recorded output (nothing to compare with)
        if not oid.endswith(".dir"):
            if (root / path).is_file() and md5_of(root / path) != oid:
                bad.append((path, oid))
            continue
        cache = cache or _cache_dir(root)
        entries = _dir_entries(cache, oid)
        if entries is None:
            bad.append((path, oid))
            continue
        bad += [(f"{path}/{e['relpath']}", e["md5"]) for e in entries
                if (root / path / e["relpath"]).is_file()  # --allow-missing: maybe not all
                and md5_of(root / path / e["relpath"]) != e["md5"]]
    return bad


def quarantine(root: Path, bad: list[tuple[str, str]]) -> None:
    """Remove the corrupted copies from the workspace and the local cache (never the remote)."""
    cache = _cache_dir(root)
    for path, oid in bad:
        for copy in (root / path, cache / object_key(oid)):
            if copy.is_file() or copy.is_symlink():
                copy.unlink()


def verify_pull(root: Path, output: str, remote: Callable[[], str]) -> None:
    """Check what a ``dvc pull`` (its ``output``) checked out; StageFailed on a corrupted object.

    ``remote()`` describes the remote for the message. The corrupted copies are quarantined
    first, so nothing downstream reads them.
    """
    bad = corrupted(root, checked_out(output))
    if not bad:
        return
    quarantine(root, bad)
    path, oid = bad[0]
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    raise StageFailed(
        "dvc pull", f"corrupted object {object_key(oid)} for {path}{more} in DVC remote "
        f"{remote()}: its bytes do not match dvc.lock's md5; removed here, left in the "
        "remote (push it again from a good copy)", None, False, kind="step")
