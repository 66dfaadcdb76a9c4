"""Where things are: the repository root and the pipeline's paths.

The paths themselves are defined once, in ``dvc.yaml`` under ``vars: paths``; DVC passes
them to each stage on its command line. Code that is not a stage (predict, the Prefect
flows, tests) reads them here.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from stages.errors import UserError

DVC_YAML = "dvc.yaml"


def find_root(start: str | Path | None = None) -> Path:
    """The nearest folder at or above ``start`` (default: cwd) that holds ``dvc.yaml``."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / DVC_YAML).is_file():
            return folder
    raise UserError(f"no {DVC_YAML} found in {here} or any folder above it: "
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
