"""The model registry: GTO versions and stages (Git tags) of the ``dvc.yaml`` artifact.

A run that passes the quality gate is registered as a new version (``cifar-cnn@v0.0.N``, a
Git tag on its results commit); ``python -m flows promote`` assigns it a stage such as
``prod`` (``cifar-cnn#prod#N``). DVC reads the same tags: ``dvc.api.artifacts_show`` and
``dvc artifacts get`` find a model by stage, so any clone with access to the DVC remote
gets the production model. The gate's baseline (``production.yaml``) is derived from the
registry here, so DVC stages never talk to Git themselves.

Only GTO's and DVC's public APIs are used; nothing here imports Prefect.
"""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path
from typing import Any

import yaml

from stages.paths import find_root, pipeline_paths
from stages.registered_model import PROD, model_artifact

log = logging.getLogger("convflow.registry")

_HEADER = ("# The model in production (GTO stage `prod`), the gate's baseline for gate.max_drop.\n"
           "# Written by `python -m flows run` / `python -m flows promote` from the registry;\n"
           "# commit it with the run's results. null = nothing in production yet.\n")


def production(root: str | Path, stage: str = PROD) -> dict[str, Any] | None:
    """The version in ``stage``: {artifact, version, rev}, or None when none is assigned."""
    name, _ = model_artifact(root)
    tags = subprocess.run(["git", "tag", "-l", f"{name}#{stage}*"], cwd=root,
                          capture_output=True, text=True)
    if tags.returncode == 0 and not tags.stdout.strip():
        return None  # never assigned: skip GTO's ~1 s import on every flow run
    import gto.api
    from gto.exceptions import ArtifactNotFound

    try:
        found = gto.api.find_versions_in_stage(str(root), name, stage)
    except ArtifactNotFound:  # nothing registered yet
        return None
    if not found:
        return None
    latest = found[0] if isinstance(found, list) else found
    return {"artifact": name, "version": latest.version, "rev": latest.commit_hexsha}


def accuracy_at(root: str | Path, rev: str) -> float | None:
    """``test.accuracy`` of evaluate's committed metrics at git ``rev`` (None if absent)."""
    rel = (pipeline_paths(root)["metrics"] / "evaluate.json").relative_to(find_root(root))
    shown = subprocess.run(["git", "show", f"{rev}:{rel.as_posix()}"], cwd=root,
                           capture_output=True, text=True)
    if shown.returncode != 0:
        return None
    try:
        return float(json.loads(shown.stdout)["test"]["accuracy"])
    except (ValueError, KeyError, TypeError):
        return None


def refresh_baseline(root: str | Path, flow_log: Any = None) -> dict[str, Any] | None:
    """Write the production baseline file from the registry if it changed; return it.

    None where the pipeline has no baseline file (no gate). A registry that cannot be read
    keeps the committed baseline: the gate then judges against the last known production.
    """
    logger = flow_log or log
    try:
        path = pipeline_paths(root).get("production")
    except Exception:  # a pipeline without `vars: paths`
        return None
    if path is None:
        return None
    try:
        prod = production(root)
    except Exception as exc:  # noqa: BLE001 - e.g. a repository without commits yet
        logger.warning("model registry not readable (%s): keeping %s", exc, path.name)
        return None
    baseline = {"version": None, "rev": None, "accuracy": None}
    if prod is not None:
        baseline = {"version": f"{prod['artifact']}@{prod['version']}", "rev": prod["rev"],
                    "accuracy": accuracy_at(root, prod["rev"])}
    current = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    if current != baseline:
        path.write_text(_HEADER + yaml.safe_dump(baseline, sort_keys=False), encoding="utf-8")
        logger.info("production baseline is now %s (test.accuracy %s)", baseline["version"],
                    baseline["accuracy"])
    return baseline


def has_origin(root: str | Path) -> bool:
    """Whether the repository has a git remote called ``origin`` (where tags are pushed)."""
    return subprocess.run(["git", "remote", "get-url", "origin"], cwd=root,
                          capture_output=True).returncode == 0


def register_version(root: str | Path, message: str, ref: str = "HEAD",
                     push: bool = False) -> str:
    """Register ``ref`` as the next version of the model artifact; its ``name@version`` tag."""
    import gto.api

    name, _ = model_artifact(root)
    reg = gto.api.register(str(root), name, ref, message=message, push=push)
    return f"{name}@{reg.version}"


def promote(root: str | Path, version: str | None = None, stage: str = PROD,
            push: bool = False) -> str:
    """Assign ``stage`` to ``version`` (default: the latest registered); ``name@version``."""
    import gto.api

    name, _ = model_artifact(root)
    if version is None:
        latest = gto.api.find_latest_version(str(root), name)
        if latest is None:
            from stages.errors import UserError

            raise UserError(f"no registered version of '{name}' to promote: a flow run "
                            "that passes the gate with --commit registers one")
        version = latest.version
    gto.api.assign(str(root), name, stage, version=version,
                   message=f"convflow: {name}@{version} -> {stage}", push=push)
    if stage == PROD:
        refresh_baseline(root)
    return f"{name}@{version}"


def ship(root: str | Path, message: str, stage: str | None, push: bool, flow_log: Any) -> None:
    """After a committed run that passed the gate: register a version, promote it if asked."""
    from stages.errors import UserError

    try:
        model_artifact(root)
    except UserError:  # no model artifact declared (a toy pipeline): nothing to register
        return
    push_tags = push and has_origin(root)
    version = register_version(root, message, push=push_tags)
    flow_log.info("registered %s", version)
    if stage:
        promote(root, version.split("@", 1)[1], stage, push=push_tags)
        flow_log.info("%s is now in stage '%s'", version, stage)
