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

from stages.errors import run_cli
from stages.io import atomic_dir
from stages.params import DataParams, load_params

log = logging.getLogger("convflow.fetch")

#: What the folder holds when there is nothing to download (constant, so its hash is stable).
NOTE = ("Nothing fetched: only data.source cifar10 with data.path pointing at this folder\n"
        "downloads here (see docs/data.md).\n")


def wants_download(p: DataParams, out: Path) -> bool:
    """Whether ``data.*`` asks for the cifar10 archive to be downloaded into ``out``.

    Stages run in the repository root (DVC's ``wdir``, where ``params.yaml`` is), so a
    relative ``data.path`` and ``out`` are both relative to the current folder.
    """
    if p.source != "cifar10" or not p.path:
        return False
    return resolve_input(p.path, Path.cwd()) == out.resolve()


def resolve_input(path: str, root: Path) -> Path:
    """``data.path`` as an absolute path: a relative one is relative to ``root``."""
    p = Path(path).expanduser()
    return (p if p.is_absolute() else root / p).resolve()


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m stages.fetch --out data/download``."""
    parser = argparse.ArgumentParser(prog="python -m stages.fetch", description=__doc__)
    parser.add_argument("--out", required=True, type=Path, help="output folder (data/download)")
    args = parser.parse_args(argv)
    p = load_params().data
    if not wants_download(p, args.out):
        with atomic_dir(args.out) as tmp:
            (tmp / "README.txt").write_text(NOTE, encoding="utf-8")
        log.info("nothing to fetch for data.source %s", p.source)
        return
    # imported only here: the synthetic default stays a few imports light
    from stages.sources.safety import DownloadError, archive_name, download

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
