"""fetch: bring an input that lives on the internet into the DVC cache, once per team.

For ``data.source: cifar10`` with ``data.path`` naming this stage's output folder (the
shipped default, ``data/download``), the official archive is downloaded from ``data.url``
and kept only if its sha256 matches ``data.sha256``. The folder is a cached DVC output,
so ``dvc push`` shares the verified archive and a fresh clone gets it by ``dvc pull``
without touching the internet (``dvc repro`` then finds this stage up to date).

For every other case the folder holds only a short note: nothing to fetch (the synthetic
source draws its images; npz and imagefolder read ``data.path``, which ``ingest`` declares
as its own dependency).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from stages.errors import UserError, run_cli
from stages.io import atomic_dir
from stages.params import DataParams, load_params
from stages.paths import find_root

log = logging.getLogger("convflow.fetch")

#: What the folder holds when there is nothing to download (constant, so its hash is stable).
NOTE = ("Nothing fetched: only data.source cifar10 with data.path pointing at this folder\n"
        "downloads here (see docs/data.md).\n")


def archive_name(url: str) -> str:
    """The file name a download of ``url`` is stored under."""
    return Path(urlparse(url).path).name or "cifar-10-python.tar.gz"


def wants_download(p: DataParams, out: Path, root: Path) -> bool:
    """Whether ``data.*`` asks for the cifar10 archive to be downloaded into ``out``."""
    if p.source != "cifar10" or not p.path:
        return False
    return resolve_input(p.path, root) == (root / out).resolve()


def repo_root() -> Path:
    """The repository root (the folder holding dvc.yaml), else the current folder."""
    try:
        return find_root()
    except UserError:
        return Path.cwd().resolve()


def resolve_input(path: str, root: Path) -> Path:
    """``data.path`` as an absolute path: a relative one is relative to the repository root."""
    p = Path(path).expanduser()
    return (p if p.is_absolute() else root / p).resolve()


def pin_data_path(overrides: dict[str, Any], root: Path) -> dict[str, Any]:
    """``overrides`` with ``data.path`` made absolute where it is relative and outside ``root``.

    ``dvc exp run --temp`` runs in a copy of the repository under ``.dvc/tmp``, where a
    relative path that leaves the repository (``../shared/...``) no longer reaches the
    data; an absolute one does (DVC hashes it as an external dependency). A path inside
    the repository stays relative: DVC checks tracked data out into the copy.
    """
    path = overrides.get("data.path")
    if path is None and (root / "params.yaml").is_file():
        params = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8")) or {}
        path = (params.get("data") or {}).get("path") if isinstance(params, dict) else None
    if not isinstance(path, str) or Path(path).expanduser().is_absolute():
        return overrides
    full = resolve_input(path, root)
    if full.is_relative_to(root.resolve()):
        return overrides
    log.info("data.path %s is outside the repository: passing it as %s", path, full)
    return {**overrides, "data.path": str(full)}


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m stages.fetch --out data/download``."""
    parser = argparse.ArgumentParser(prog="python -m stages.fetch", description=__doc__)
    parser.add_argument("--out", required=True, type=Path, help="output folder (data/download)")
    args = parser.parse_args(argv)
    p = load_params().data
    root = repo_root()
    if not wants_download(p, args.out, root):
        with atomic_dir(args.out) as tmp:
            (tmp / "README.txt").write_text(NOTE, encoding="utf-8")
        log.info("nothing to fetch for data.source %s", p.source)
        return
    # imported only here: the synthetic default stays a few imports light
    from stages.sources.safety import DownloadError, download

    name = archive_name(p.url)
    with atomic_dir(args.out) as tmp:
        try:
            download(p.url, tmp / name, p.sha256)
        except DownloadError as err:
            raise DownloadError(f"{err} With a team DVC remote, `dvc pull fetch` gets the "
                                "verified archive without the internet.") from None
    log.info("wrote %s/%s (sha256 verified); `dvc push` shares it", args.out, name)


if __name__ == "__main__":
    run_cli(main)
