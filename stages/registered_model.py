"""The registry's model as a stage sees it: the ``dvc.yaml`` model artifact, fetched by stage.

The registry itself (GTO versions and stages as Git tags) is written by ``flows/registry.py``;
reading a stage's model needs only DVC's public API (``dvc.api.artifacts_show`` and
``dvc.api.open``), so ``python -m stages.predict --stage prod`` works from any clone with
access to the DVC remote.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path

import yaml

from stages.errors import UserError
from stages.paths import DVC_YAML, find_root

log = logging.getLogger("convflow.registry")

#: The stage the gate compares against and ``promote`` assigns by default.
PROD = "prod"
#: The artifact name when a repository is only known by URL.
DEFAULT_ARTIFACT = "cifar-cnn"


def model_artifact(root: str | Path) -> tuple[str, str]:
    """(name, path) of the model artifact declared under ``artifacts:`` in ``dvc.yaml``."""
    spec = yaml.safe_load((find_root(root) / DVC_YAML).read_text(encoding="utf-8")) or {}
    for name, entry in (spec.get("artifacts") or {}).items():
        if (entry or {}).get("type", "model") == "model":
            return name, entry["path"]
    raise UserError(f"{DVC_YAML}: no model under 'artifacts:' to register")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def fetch_model(repo: str | Path, stage: str = PROD, out: str | Path | None = None,
                name: str | None = None) -> Path:
    """Download the model in registry ``stage`` of ``repo`` (a path or git URL) to ``out``.

    Nothing in ``stage``, or its model in neither the DVC cache nor the remote, is a
    one-line UserError naming what to do.
    """
    import dvc.api
    from dvc.exceptions import ArtifactNotFoundError, DvcException

    if name is None:
        name = model_artifact(repo)[0] if Path(str(repo)).is_dir() else DEFAULT_ARTIFACT
    try:
        found = dvc.api.artifacts_show(name, stage=stage, repo=str(repo))
    except ArtifactNotFoundError:
        raise UserError(
            f"no version of '{name}' is in registry stage '{stage}' here: promote one with "
            f"`python -m flows promote --stage {stage} --push`, or `git fetch --tags` if it "
            "was (a stage tag that was never pushed is only in the clone that made it)"
        ) from None
    if out is None and Path(str(repo)).is_dir():  # git-ignored, replaced on each fetch
        out = find_root(repo) / ".dvc" / "tmp" / "registry" / stage / Path(found["path"]).name
    dest = Path(out) if out else Path(tempfile.mkdtemp(prefix="convflow-model-")) / "model.pt"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    digest = hashlib.md5(usedforsecurity=False)  # DVC's own content hash
    try:
        with dvc.api.open(found["path"], repo=str(repo), rev=found["rev"], mode="rb") as src, \
                open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
                digest.update(chunk)
        expected = locked_md5(repo, found["path"], found["rev"])
    except (DvcException, FileNotFoundError) as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(
            f"the model of {name}#{stage} ({found['path']} at {found['rev'][:7]}) is in "
            "neither the DVC cache nor the DVC remote: `dvc push` it from the clone that "
            f"trained it ({_one_line(exc)})") from None
    if expected is not None and digest.hexdigest() != expected:
        tmp.unlink()
        raise UserError(f"the model of {name}#{stage} ({found['path']} at {found['rev'][:7]}) "
                        f"does not match its md5 in dvc.lock ({expected}): a corrupted object "
                        "in the DVC cache or remote; nothing was written")
    tmp.replace(dest)
    log.info("%s model %s@%s -> %s", stage, name, found["rev"][:7], dest)
    return dest


def locked_md5(repo: str | Path, path: str, rev: str) -> str | None:
    """The md5 that ``dvc.lock`` at ``rev`` records for the output ``path`` (None: not there)."""
    import dvc.api

    lock = yaml.safe_load(dvc.api.read("dvc.lock", repo=str(repo), rev=rev)) or {}
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if out.get("path") == path:
                return out.get("md5")
    return None
