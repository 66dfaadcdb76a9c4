"""Bring a run's results back: outputs to the DVC remote, the lock and metrics to git.

A worker owns nothing: its clone goes away with the run. A result is "back" when both
halves are pushed: every output (and the run-cache) in the DVC remote, and a commit of
``dvc.lock``, the params files and the small uncached metrics/plot files on a git branch.
Then a laptop can ``git fetch`` and ``dvc metrics diff`` at once, and ``dvc pull`` the model
without retraining.

The git half never force-pushes and never rewrites a commit it did not make. Each run
commits one snapshot of its workspace (code, lock, metrics: consistent with each other)
whose parents are the results branch's tip and the commit the run started from. When the
push is rejected because another run got there first, it fetches the new tip, makes its
commit again on top of it, and retries; both runs' commits end up on the branch, the last
one to finish at its tip.

Only the DVC CLI is used here (no DVC internals): what to commit is read from ``dvc.lock``
with plain YAML and from ``git status``.
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
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows import checkout
from flows.dvc_adapter import dvc_command, dvc_env
from flows.runner import DVC_ERROR, StageFailed, dvc_failure, retry_if_transient, run_guarded

log = logging.getLogger("convflow.publish")

#: The git remote that results go to, and the prefix of a deployment's results branch.
GIT_REMOTE = "origin"
RESULTS_PREFIX = "results/"
#: Attempts at pushing the results commit when another run keeps pushing first.
PUSH_ATTEMPTS = 5
#: Seconds a ``dvc pull``/``push`` may take before it counts as stalled (then retried).
REMOTE_TIMEOUT_S = 3 * 3600
#: DVC errors that retrying cannot fix: bad credentials, a missing bucket, no remote set.
#: Whole words only: "403" inside an object's hash is no HTTP status.
_PERMANENT = re.compile(
    r"\b(?:403|Forbidden|AccessDenied|InvalidAccessKeyId|SignatureDoesNotMatch|NoSuchBucket|"
    r"no remote specified|(?:is|are) not (?:a )?valid|Unable to locate credentials|"
    r"Not a directory|config file error)\b", re.IGNORECASE)


class PublishError(StageFailed):
    """The results commit could not be pushed to git (the DVC outputs are already safe)."""

    def __init__(self, message: str):
        super().__init__("git push", message, None, False, kind="step")

    def __reduce__(self) -> tuple:
        return (PublishError, (self.message,))


# ---------------------------------------------------------------------------- helpers

def _git(root: Path, *args: str, check: bool = True, env: dict[str, str] | None = None,
         ) -> subprocess.CompletedProcess:
    proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                          env=env or dvc_env())
    if check and proc.returncode != 0:
        raise PublishError(f"git {' '.join(args)} failed: "
                           f"{(proc.stderr or proc.stdout).strip()}")
    return proc


def _run_logger() -> Any:
    """The flow or task run's logger inside a run (its lines reach the UI), else ours."""
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return log


def _dvc_out(root: Path, *args: str) -> str:
    return subprocess.run(dvc_command(*args), cwd=root, env=dvc_env(), capture_output=True,
                          text=True).stdout


def describe_remote(root: Path, remote: str | None = None) -> str:
    """'name' (url) of the DVC remote ``remote`` or the default one, for error messages."""
    name = remote or _dvc_out(root, "remote", "default").strip()
    if not name:
        return "(no default DVC remote)"
    for line in _dvc_out(root, "remote", "list").splitlines():
        parts = line.split()
        if parts and parts[0] == name:
            return f"'{name}' ({parts[1]})" if len(parts) > 1 else f"'{name}'"
    return f"'{name}'"


def _transfer(root: str | Path, step: str, args: list[str], remote: str | None,
              logger: Any = None) -> str:
    """Run ``dvc args...`` against the remote, its output; a failure is a ``StageFailed``.

    Its ``transient`` flag says whether a retry may help (a store that is down or slow:
    yes; bad credentials or a missing bucket: no). DVC can log a failed transfer and exit
    0: that is a failure too (``dvc_failure``).
    """
    root = Path(root)
    output, status, timed_out = run_guarded(dvc_command(*args), root, step, REMOTE_TIMEOUT_S,
                                            logger or _run_logger())
    failure = (f"ERROR: no answer within {REMOTE_TIMEOUT_S} s (stalled transfer)" if timed_out
               else dvc_failure(output, status))
    if not failure:
        return output
    errors = list(dict.fromkeys(e.strip() for e in DVC_ERROR.findall(output)))
    detail = " ".join(errors) if errors and not timed_out else failure
    transient = timed_out or not _PERMANENT.search(output)
    hint = "retrying may help" if transient else "not retried: fix the remote or its settings"
    raise StageFailed(step, f"{detail} [DVC remote {describe_remote(root, remote)}; {hint}]",
                      status, transient, kind="step")


# ---------------------------------------------------------------------------- DVC remote

def dvc_pull(root: str | Path, remote: str | None = None, logger: Any = None) -> None:
    """``dvc pull --allow-missing --run-cache``: what the remote has; the rest is rebuilt.

    With the run-cache, a stage some run already ran with the same inputs is restored
    (``dvc repro``: "Stage is cached"), even where this commit's dvc.lock does not name it.
    """
    from flows.integrity import verify_pull

    args = ["pull", "--allow-missing", "--run-cache", *(["-r", remote] if remote else [])]
    output = _transfer(root, "dvc pull", args, remote, logger)
    verify_pull(Path(root), output, lambda: describe_remote(Path(root), remote))


def dvc_push(root: str | Path, remote: str | None = None, logger: Any = None) -> None:
    """``dvc push --run-cache``: every output, and the run-cache so nothing trains twice."""
    args = ["push", "--run-cache", *(["-r", remote] if remote else [])]
    _transfer(root, "dvc push", args, remote, logger)


def exp_push(root: str | Path, names: list[str], git_remote: str = GIT_REMOTE,
             logger: Any = None) -> None:
    """``dvc exp push``: the experiments' refs to git, their outputs to the DVC remote."""
    if names:
        _transfer(root, "dvc exp push", ["exp", "push", "--run-cache", git_remote, *names],
                  None, logger)


# ---------------------------------------------------------------------------- git

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
        if pushing:
            tip = _remote_tip(root, remote, branch)
        else:
            tip = _git(root, "rev-parse", "-q", "--verify", f"refs/heads/{branch}",
                       check=False).stdout.strip() or None
        if _git(root, "rev-parse", f"{tip or start}^{{tree}}").stdout.strip() == tree:
            log.info("results on '%s' are already these: nothing to commit", branch)
            return None
        parents = [tip] if tip else []
        if not tip or _git(root, "merge-base", "--is-ancestor", start, tip,
                           check=False).returncode != 0:
            if start not in parents:
                parents.append(start)
        args = [a for p in parents for a in ("-p", p)]
        commit = _git(root, *_author_config(root), "commit-tree", tree, *args,
                      "-m", message).stdout.strip()
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


def _push_failure(proc: subprocess.CompletedProcess) -> str:
    """Why ``git push --porcelain`` failed: the rejected ref's reason, else git's last error."""
    for line in proc.stdout.splitlines():
        if line.startswith("!\t"):
            return "rejected " + line.split("\t")[-1].strip()
    errors = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
    return errors[-1] if errors else f"git push exited with status {proc.returncode}"


def _rejected(porcelain: str) -> bool:
    """Whether ``git push --porcelain`` says another push got there first.

    Only ``[rejected]`` (not a fast-forward) is that race; ``[remote rejected]`` is the
    server refusing the push (a pre-receive hook, a protected branch): no retry helps.
    """
    return any(line.startswith("!\t") and "\t[rejected]" in line
               for line in porcelain.splitlines())


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


# ---------------------------------------------------------------------------- flow steps

@task(name="dvc-pull", task_run_name="dvc-pull", cache_policy=NO_CACHE,
      retry_condition_fn=retry_if_transient)
def pull_task(root: str) -> None:
    """Fetch what the DVC remote has for this commit (stages it lacks are reproduced)."""
    dvc_pull(root)


@task(name="dvc-push", task_run_name="dvc-push", cache_policy=NO_CACHE,
      retry_condition_fn=retry_if_transient)
def push_task(root: str) -> None:
    """Push every output and the run-cache to the DVC remote."""
    dvc_push(root)


@task(name="git-publish", task_run_name="git-publish", cache_policy=NO_CACHE)
def publish_task(root: str, message: str, branch: str | None,
                 remote: str | None = GIT_REMOTE) -> str | None:
    """Commit the results and push them to the git remote (retried on a rejected push)."""
    return publish_results(root, message, branch=branch, remote=remote)


def _with_retries(task_: Any, retries: int, retry_delay_s: float) -> Any:
    return task_.with_options(retries=retries, retry_delay_seconds=retry_delay_s)


@task(name="git-fetch", task_run_name="git-fetch", cache_policy=NO_CACHE,
      retry_condition_fn=retry_if_transient)
def fetch_task(root: str, branch: str | None) -> list[str]:
    """Full history and tags from origin; the last results of ``branch`` (``checkout``)."""
    checkout.deepen(root)
    return checkout.seed_from_results(root, branch)


def start_run(root: str | Path, retries: int = 2, retry_delay_s: float = 10.0,
              branch: str | None = None) -> None:
    """In a flow: a deep clone with tags, seeded from ``branch``'s last results, then
    ``dvc pull --allow-missing``; each retried while the remote may come back."""
    _with_retries(fetch_task, retries, retry_delay_s)(str(root), branch)
    _with_retries(pull_task, retries, retry_delay_s)(str(root))


def finish_run(root: str | Path, kind: str, push: bool, commit: bool,
               branch: str | None = None, retries: int = 2,
               retry_delay_s: float = 10.0) -> str | None:
    """In a flow: push the outputs (first: a commit must never name missing data), then commit.

    ``branch`` defaults to ``results/<deployment>`` in a deployment run; without one the
    commit goes on the current branch and is not pushed. Returns the commit, or None.
    """
    from prefect.runtime import deployment, flow_run

    if push:
        _with_retries(push_task, retries, retry_delay_s)(str(root))
    if not commit:
        return None
    name = deployment.name
    message = run_message(kind, root, flow_run.name, flow_run.id, name)
    branch = branch or default_branch(name)
    # a results branch is pushed; a local run's commit on the current branch stays local
    return publish_task(str(root), message, branch, GIT_REMOTE if branch else None)
