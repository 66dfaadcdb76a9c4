"""The git half of bringing a run's results back: one commit on a results branch, pushed.

The git half never force-pushes and never rewrites a commit it did not make. Each run
commits one snapshot of its workspace (code, lock, metrics: consistent with each other)
whose parents are the results branch's tip and the commit the run started from. When the
push is rejected because another run got there first, it fetches the new tip, makes its
commit again on top of it, and retries; both runs' commits end up on the branch, the last
one to finish at its tip. A push the server declines (a hook) is not retried.

What to commit is read from ``dvc.lock`` with plain YAML and from ``git status``.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from flows.dvc_adapter import dvc_env
from flows.runner import StageFailed

log = logging.getLogger("convflow.publish")

#: The git remote that results go to, and the prefix of a deployment's results branch.
GIT_REMOTE = "origin"
RESULTS_PREFIX = "results/"
#: Attempts at pushing the results commit when another run keeps pushing first.
PUSH_ATTEMPTS = 5


class PublishError(StageFailed):
    """The results commit could not be pushed to git (the DVC outputs are already safe)."""

    def __init__(self, message: str):
        super().__init__("git push", message, None, False, kind="step")

    def __reduce__(self) -> tuple:
        return (PublishError, (self.message,))


def _git(root: Path, *args: str, check: bool = True, env: dict[str, str] | None = None,
         ) -> subprocess.CompletedProcess:
    proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                          env=env or dvc_env())
    if check and proc.returncode != 0:
        raise PublishError(f"git {' '.join(args)} failed: "
                           f"{(proc.stderr or proc.stdout).strip()}")
    return proc


def results_files(root: str | Path) -> list[str]:
    """Paths to commit: dvc.lock, its params files and every output git does not ignore.

    DVC-cached outputs are in a ``.gitignore`` (DVC adds them), so what ``git status``
    still reports among the lock's outputs is exactly the small uncached metrics and
    plot files; the ``.gitignore`` files DVC edited come along.
    """
    root = Path(root)
    lock = yaml.safe_load((root / "dvc.lock").read_text(encoding="utf-8")) or {}
    paths = {"dvc.lock"}
    for stage in (lock.get("stages") or {}).values():
        paths.update(stage.get("params") or {})
        paths.update(out["path"] for out in stage.get("outs") or [])
    status = _git(root, "status", "--porcelain", "-z", "--untracked-files=all").stdout
    changed = [entry[3:] for entry in status.split("\0") if entry[3:]]
    keep = [p for p in changed
            if Path(p).name == ".gitignore"
            or any(p == q or p.startswith(q.rstrip("/") + "/") for q in paths)]
    return sorted(set(keep))


def _author_config(root: Path) -> list[str]:
    """``-c user.*`` for a machine with no git identity (a worker): name the host."""
    if _git(root, "config", "user.email", check=False).stdout.strip() or \
            os.environ.get("GIT_COMMITTER_EMAIL"):
        return []
    host = socket.gethostname() or "worker"
    return ["-c", "user.name=convflow worker", "-c", f"user.email=convflow@{host}"]


def _remote_tip(root: Path, remote: str, branch: str) -> str | None:
    """The remote branch's tip after a fresh fetch; None where the branch does not exist."""
    if not _git(root, "ls-remote", "--exit-code", "--heads", remote, branch,
                check=False).stdout.strip():
        return None
    _git(root, "fetch", "-q", remote, f"+refs/heads/{branch}:refs/remotes/{remote}/{branch}")
    return _git(root, "rev-parse", f"refs/remotes/{remote}/{branch}").stdout.strip()


def _snapshot_tree(root: Path, files: list[str]) -> str:
    """The tree of HEAD plus ``files`` as they are now, built in a private index."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dvc_env()
        env["GIT_INDEX_FILE"] = str(Path(tmp) / "index")
        _git(root, "read-tree", "HEAD", env=env)
        if files:
            _git(root, "add", "-A", "--", *files, env=env)
        return _git(root, "write-tree", env=env).stdout.strip()


def _has_remote(root: Path, remote: str) -> bool:
    return remote in _git(root, "remote").stdout.split()


def publish_results(root: str | Path, message: str, branch: str | None = None,
                    files: list[str] | None = None, remote: str | None = GIT_REMOTE,
                    attempts: int = PUSH_ATTEMPTS) -> str | None:
    """Commit the run's results on ``branch`` and push it; the new commit, None if no change.

    ``branch`` defaults to the current one. ``files`` defaults to ``results_files``. The
    commit's parents are the branch's tip (remote tip if ``remote`` exists) and the commit
    the run started from; a rejected push is retried on the new tip, never forced.
    ``remote=None`` (or no such git remote) commits locally only. Afterwards ``branch`` is
    checked out at the new commit (the files do not change).
    """
    root = Path(root)
    start = _git(root, "rev-parse", "HEAD").stdout.strip()
    current = _git(root, "symbolic-ref", "-q", "--short", "HEAD", check=False).stdout.strip()
    branch = branch or current
    if not branch:
        raise PublishError("no branch to publish to: HEAD is detached; pass a branch")
    tree = _snapshot_tree(root, results_files(root) if files is None else files)
    pushing = remote is not None and _has_remote(root, remote)
    last = ""
    for attempt in range(1, max(1, attempts) + 1):
        tip = _current_tip(root, remote if pushing else None, branch)
        if _git(root, "rev-parse", f"{tip or start}^{{tree}}").stdout.strip() == tree:
            log.info("results on '%s' are already these: nothing to commit", branch)
            return None
        commit = _commit(root, tree, tip, start, message)
        if not pushing:
            _set_branch(root, branch, commit, current)
            log.info("committed results %s on '%s' (no git remote '%s': not pushed)",
                     commit[:12], branch, remote)
            return commit
        proc = _git(root, "push", "--porcelain", remote, f"{commit}:refs/heads/{branch}",
                    check=False)
        if proc.returncode == 0:
            _set_branch(root, branch, commit, current)
            log.info("pushed results %s to %s/%s (attempt %d)", commit[:12], remote, branch,
                     attempt)
            return commit
        last = _push_failure(proc)
        if not _rejected(proc.stdout):
            break  # not a race with another run (no access, no network): retrying won't help
        log.warning("push of results to %s/%s rejected (another run pushed first): "
                    "fetching and retrying (%d/%d)", remote, branch, attempt, attempts)
        time.sleep(min(0.5 * attempt, 3.0))
    raise PublishError(
        f"could not push the results commit to {remote}/{branch}: {last.strip()}; nothing is "
        "lost: the outputs pushed to the DVC remote stay there; rerun to publish the results")


def _current_tip(root: Path, remote: str | None, branch: str) -> str | None:
    """The branch's tip: on ``remote`` when pushing there, else the local branch's."""
    if remote is not None:
        return _remote_tip(root, remote, branch)
    return _git(root, "rev-parse", "-q", "--verify", f"refs/heads/{branch}",
                check=False).stdout.strip() or None


def _commit(root: Path, tree: str, tip: str | None, start: str, message: str) -> str:
    """A commit of ``tree`` on ``tip``, also parented on ``start`` unless ``tip`` has it."""
    parents = [tip] if tip else []
    if not tip or _git(root, "merge-base", "--is-ancestor", start, tip,
                       check=False).returncode != 0:
        if start not in parents:
            parents.append(start)
    args = [a for p in parents for a in ("-p", p)]
    return _git(root, *_author_config(root), "commit-tree", tree, *args,
                "-m", message).stdout.strip()


def _push_failure(proc: subprocess.CompletedProcess) -> str:
    """Why ``git push --porcelain`` failed: the rejected ref's reason, else git's last error."""
    for line in proc.stdout.splitlines():
        if line.startswith("!\t"):
            return "rejected " + line.split("\t")[-1].strip()
    errors = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
    return errors[-1] if errors else f"git push exited with status {proc.returncode}"


def _rejected(porcelain: str) -> bool:
    """Whether ``git push --porcelain`` says another push got there first.

    That is ``[rejected]`` (not a fast-forward), or the server finding the ref moved while
    it updated it; any other ``[remote rejected]`` is the server refusing the push (a
    pre-receive hook, a protected branch): no retry helps.
    """
    race = re.compile(r"\t\[rejected\]|\t\[remote rejected\] \((failed to update ref|"
                      r"cannot lock ref|incorrect old value)")
    return any(line.startswith("!\t") and race.search(line) for line in porcelain.splitlines())


def _set_branch(root: Path, branch: str, commit: str, current: str) -> None:
    """Point ``branch`` at ``commit`` and check it out: HEAD is the results commit after.

    The workspace already holds exactly that commit's files, so only HEAD and the index
    move (what the registry then tags is the results commit).
    """
    _git(root, "update-ref", f"refs/heads/{branch}", commit)
    if branch != current:
        _git(root, "symbolic-ref", "HEAD", f"refs/heads/{branch}")
    _git(root, "reset", "-q")


def default_branch(deployment: str | None) -> str | None:
    """The results branch of a deployment run (``results/<deployment>``); None elsewhere."""
    return f"{RESULTS_PREFIX}{deployment}" if deployment else None


def run_message(kind: str, root: str | Path, run_name: str | None, run_id: Any,
                deployment: str | None) -> str:
    """A commit message naming the flow run and the commit it started from."""
    start = _git(Path(root), "rev-parse", "HEAD").stdout.strip()
    lines = [f"convflow: {kind} run {run_name or 'manual'} ({run_id}) from {start[:12]}", "",
             f"Flow run: {run_name or 'manual'} ({run_id})",
             f"Started from: {start}"]
    if deployment:
        lines.append(f"Deployment: {deployment}")
    return "\n".join(lines)
