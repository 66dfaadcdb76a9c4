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
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from stages.paths import find_root, pipeline_paths
from stages.registered_model import PROD, model_artifact

log = logging.getLogger("convflow.registry")
#: A version as GTO names them (semver with a leading v).
VERSION = re.compile(r"v\d{1,9}\.\d{1,9}\.\d{1,9}")

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


def model_hash(root: str | Path, rev: str) -> str | None:
    """The DVC hash ``dvc.lock`` records at git ``rev`` for the model file (None if none)."""
    _, path = model_artifact(root)
    shown = subprocess.run(["git", "show", f"{rev}:dvc.lock"], cwd=root, capture_output=True,
                           text=True)
    if shown.returncode != 0:
        return None
    for stage in ((yaml.safe_load(shown.stdout) or {}).get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if out.get("path") == path:
                return out.get("md5")  # DVC 3's `hash: md5` names the algorithm
    return None


def register_version(root: str | Path, message: str, ref: str = "HEAD") -> str:
    """Register ``ref`` as the next version of the model artifact; its ``name@version`` tag.

    A model file whose DVC hash equals the latest registered version's is no new version
    (a run that changed only figures): that version is returned instead.
    """
    import gto.api

    name, _ = model_artifact(root)
    latest = _gto(gto.api.find_latest_version, str(root), name, missing=None)
    current = model_hash(root, ref)
    if latest is not None and current and model_hash(root, latest.commit_hexsha) == current:
        log.info("model unchanged since %s@%s: no new version", name, latest.version)
        return f"{name}@{latest.version}"
    reg = _gto(gto.api.register, str(root), name, ref, message=message)
    return f"{name}@{reg.version}"


def _gto(call: Any, *args: Any, missing: Any = ..., **kwargs: Any) -> Any:
    """A GTO call; its errors as one-line UserErrors (``missing``: returned when nothing is
    registered yet, if given)."""
    from gto.exceptions import ArtifactNotFound, GTOException

    from stages.errors import UserError

    try:
        return call(*args, **kwargs)
    except ArtifactNotFound:
        if missing is not ...:
            return missing
        raise UserError("nothing is registered yet: a flow run that passes the gate "
                        "with --commit registers a version") from None
    except GTOException as exc:
        raise UserError(f"model registry: {' '.join(str(exc).split())[:300]}") from None


def push_tags(root: str | Path) -> None:
    """Push the model artifact's registry tags (versions and stages) to ``origin``."""
    from flows.runner import StageFailed

    name, _ = model_artifact(root)
    refspecs = [f"refs/tags/{name}{sep}*:refs/tags/{name}{sep}*" for sep in ("@", "#")]
    proc = subprocess.run(["git", "push", "-q", "origin", *refspecs], cwd=root,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise StageFailed("git push", f"the registry tags of '{name}' were not pushed to "
                          f"origin: {last[0]}", proc.returncode, True, kind="step")


def promote(root: str | Path, version: str | None = None, stage: str = PROD,
            push: bool = False) -> str:
    """Assign ``stage`` to ``version`` (default: the latest registered); ``name@version``.

    Idempotent: a version already in ``stage`` stays as it is (its tags are still pushed
    when ``push``). Every mistake is a one-line UserError.
    """
    import gto.api

    from flows.checkout import check_stage_name
    from stages.errors import UserError

    check_stage_name(stage)
    name, _ = model_artifact(root)
    if version is None:
        latest = _gto(gto.api.find_latest_version, str(root), name, missing=None)
        if latest is None:
            raise UserError(f"no registered version of '{name}' to promote: a flow run "
                            "that passes the gate with --commit registers one")
        version = latest.version
    if not VERSION.fullmatch(version):
        shown = version if len(version) <= 40 else version[:40] + "..."
        raise UserError(f"version {shown!r}: expected one like v0.0.3")
    current = production(root, stage)
    if current is None or current["version"] != version:
        _gto(gto.api.assign, str(root), name, stage, version=version,
             message=f"convflow: {name}@{version} -> {stage}")
    if push and has_origin(root):
        push_tags(root)
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
    version = register_version(root, message)
    flow_log.info("registered %s", version)
    if stage:
        promote(root, version.split("@", 1)[1], stage)
        flow_log.info("%s is now in stage '%s'", version, stage)
    if push and has_origin(root):
        push_tags(root)
