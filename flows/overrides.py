"""A sweep point's ``-S`` overrides as ``dvc exp run`` needs them in a temporary copy."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from stages.fetch import resolve_input

log = logging.getLogger("convflow.sweep")


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
