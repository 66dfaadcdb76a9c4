"""A worker's clone made ready for a run, and everything a run will ship checked first.

Prefect's ``git_clone`` pull step clones with ``--depth 1`` (git honours that for
``https://``, ``ssh://`` and ``file://`` URLs). A shallow clone is not enough: ``dvc exp
run --temp`` saves no experiment in one, and it has no tags, so the registry's
production model (the gate's baseline) is invisible. :func:`deepen` fetches the whole
history and every tag from ``origin`` at the start of a run, whatever the clone was.

:func:`seed_from_results` starts a run from the last results of its branch: ``dvc.lock``
and the small uncached outputs it names, taken from ``origin/results/<deployment>``.
DVC then finds every stage whose code, params and data did not change up to date (its
outputs come from the object store by ``dvc pull``), so the second nightly run on an
unchanged ``main`` trains nothing, without anyone merging. (DVC's run-cache cannot do
this for ``train``: its checkpoint is a ``persist`` output, which the run-cache skips.)

:func:`preflight` validates what a run needs to ship before any work: a bad registry
stage name, a branch name git refuses, or a missing remote fails the run at once.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from flows import dvc_adapter as dvc
from flows.dvc_adapter import dvc_env
from flows.runner import StageFailed
from stages.errors import UserError

GIT_REMOTE = "origin"
#: Longest registry stage name accepted (GTO puts it in a tag name).
MAX_STAGE_LEN = 64


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                          env=dvc_env())


def _has_origin(root: Path) -> bool:
    return _git(root, "remote", "get-url", GIT_REMOTE).returncode == 0


def deepen(root: str | Path) -> bool:
    """Fetch the full history (if the clone is shallow) and every tag; whether it fetched."""
    root = Path(root)
    if not _has_origin(root):
        return False
    shallow = _git(root, "rev-parse", "--is-shallow-repository").stdout.strip() == "true"
    # --tags, not a tags-only refspec: with --unshallow that exits 1 where origin has no tag
    args = ["fetch", "-q", *(["--unshallow"] if shallow else []), "--tags", GIT_REMOTE]
    proc = _git(root, *args)
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise StageFailed("git fetch", f"git {' '.join(args)}: {last[0]}", proc.returncode,
                          True, kind="step")
    return True


def seed_from_results(root: str | Path, branch: str | None) -> list[str]:
    """Take ``dvc.lock`` and its uncached outputs from ``origin/<branch>``; the paths taken.

    Nothing is taken where there is no such branch. Params and code stay the clone's own,
    so a stage they changed is stale and re-runs; the rest stay up to date.
    """
    root = Path(root)
    if not branch or not _has_origin(root):
        return []
    ref = f"refs/remotes/{GIT_REMOTE}/{branch}"
    fetched = _git(root, "fetch", "-q", GIT_REMOTE, f"+refs/heads/{branch}:{ref}")
    if fetched.returncode != 0:
        return []  # no results yet (the first run of a deployment)
    shown = _git(root, "show", f"{ref}:dvc.lock")
    if shown.returncode != 0:
        return []
    lock = yaml.safe_load(shown.stdout) or {}
    paths = ["dvc.lock"]
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if _git(root, "cat-file", "-e", f"{ref}:{out['path']}").returncode == 0:
                paths.append(out["path"])  # an uncached output: git holds it
    _git(root, "checkout", ref, "--", *paths)
    _git(root, "reset", "-q")  # in the workspace only: the results commit is built from it
    return paths + _merge_ignores(root, ref)


def _merge_ignores(root: Path, ref: str) -> list[str]:
    """Add to each ``.gitignore`` the lines ``ref``'s has (DVC's entries for its outputs)."""
    changed = _git(root, "diff", "--name-only", "HEAD", ref, "--", ":(glob)**/.gitignore")
    merged = []
    for rel in changed.stdout.split():
        theirs = _git(root, "show", f"{ref}:{rel}")
        if theirs.returncode != 0:
            continue
        path = root / rel
        ours = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
        extra = [line for line in theirs.stdout.splitlines() if line not in ours]
        if extra:
            path.write_text("\n".join(ours + extra) + "\n", encoding="utf-8")
            merged.append(rel)
    return merged


def check_stage_name(stage: str) -> str:
    """``stage`` if GTO accepts it as a registry stage name; else a one-line UserError."""
    from gto.constants import check_string_is_valid

    if len(stage) > MAX_STAGE_LEN or not check_string_is_valid(stage):
        shown = stage if len(stage) <= MAX_STAGE_LEN else stage[:MAX_STAGE_LEN] + "..."
        raise UserError(f"registry stage {shown!r} is not a valid name: letters, digits, "
                        f"'-', '_' and '/', at most {MAX_STAGE_LEN} characters")
    return stage


def check_branch_name(root: str | Path, branch: str) -> str:
    """``branch`` if ``git check-ref-format --branch`` accepts it; else a one-line UserError."""
    proc = _git(Path(root), "check-ref-format", "--branch", branch)
    if proc.returncode != 0 or len(branch) > 200:
        shown = branch if len(branch) <= 80 else branch[:80] + "..."
        raise UserError(f"results branch {shown!r} is not a valid git branch name")
    return branch


def preflight(root: str | Path, *, pull: bool, push: bool, commit: bool,
              branch: str | None, promote: str | None) -> None:
    """Refuse, before any work, a run that could not ship what it makes."""
    root = Path(root)
    if promote is not None:
        check_stage_name(promote)
        if not commit:
            raise UserError(f"promote {promote!r} needs commit: only a committed run "
                            "registers a model version")
    if commit and branch:
        check_branch_name(root, branch)
        if not _has_origin(root):
            raise UserError(f"results branch {branch!r} is pushed to git remote "
                            f"'{GIT_REMOTE}', and this repository has none")
    if (pull or push) and not dvc.default_remote(root):
        raise UserError("no default DVC remote to pull from or push to: "
                        "dvc remote add -d <name> <url>")
