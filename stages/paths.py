"""Where things are: the repository root and the pipeline's paths.

The paths themselves are defined once, in ``dvc.yaml`` under ``vars: paths``; DVC passes
them to each stage on its command line. Code that is not a stage (predict, the Prefect
flows, tests) reads them here.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from stages.errors import UserError

DVC_YAML = "dvc.yaml"


def find_root(start: str | Path | None = None) -> Path:
    """The checkout's root: the nearest folder at or above ``start`` that holds ``dvc.yaml``.

    Without ``start``: ``$CONVFLOW_ROOT`` if set, else the current folder, else (a served or
    deployed flow started elsewhere) the checkout that holds this code.
    """
    if start is None and os.environ.get("CONVFLOW_ROOT"):
        start = os.environ["CONVFLOW_ROOT"]
    starts = [Path(start)] if start else [Path.cwd(), Path(__file__).resolve().parent]
    for here in (s.expanduser().resolve() for s in starts):
        for folder in (here, *here.parents):
            if (folder / DVC_YAML).is_file():
                return folder
    raise UserError(f"no {DVC_YAML} found in {starts[0].resolve()} or any folder above it: "
                    "run from inside a convflow checkout")


def pipeline_paths(root: str | Path | None = None) -> dict[str, Path]:
    """The ``paths`` variables of ``dvc.yaml``, as absolute paths under ``root``."""
    root = find_root(root)
    spec = yaml.safe_load((root / DVC_YAML).read_text(encoding="utf-8")) or {}
    paths: dict[str, str] = {}
    for entry in spec.get("vars", []):
        if isinstance(entry, dict):
            paths.update(entry.get("paths", {}))
    if not paths:
        raise UserError(f"{root / DVC_YAML}: no 'vars: - paths:' block")
    return {name: root / rel for name, rel in paths.items()}
