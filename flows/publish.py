"""Bring a run's results back: outputs to the DVC remote, the lock and metrics to git.

A worker owns nothing: its clone goes away with the run. A result is "back" when both
halves are pushed: every output (and the run-cache) in the DVC remote, and a commit of
``dvc.lock``, the params files and the small uncached metrics/plot files on a git branch.
Then a laptop can ``git fetch`` and ``dvc metrics diff`` at once, and ``dvc pull`` the model
without retraining.

The DVC half is here (only the DVC CLI, no DVC internals); the git half, a results commit
that never force-pushes, is ``flows/results_branch.py``; the flow steps that run both are
at the end.
"""

from __future__ import annotations

import logging
import re
import subprocess
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows import checkout
from flows.dvc_adapter import dvc_command, dvc_env
from flows.results_branch import (  # noqa: F401 - the git half, re-exported
    GIT_REMOTE,
    PublishError,
    default_branch,
    publish_results,
    results_files,
    run_message,
)
from flows.runner import DVC_ERROR, StageFailed, dvc_failure, retry_if_transient, run_guarded

log = logging.getLogger("convflow.publish")

#: Seconds a ``dvc pull``/``push`` may take before it counts as stalled (then retried).
REMOTE_TIMEOUT_S = 3 * 3600
#: DVC errors that retrying cannot fix: bad credentials, a missing bucket, no remote set.
#: Whole words only: "403" inside an object's hash is no HTTP status.
_PERMANENT = re.compile(
    r"\b(?:403|Forbidden|AccessDenied|InvalidAccessKeyId|SignatureDoesNotMatch|NoSuchBucket|"
    r"no remote specified|(?:is|are) not (?:a )?valid|Unable to locate credentials|"
    r"Not a directory|config file error)\b", re.IGNORECASE)


# ---------------------------------------------------------------------------- helpers

def _run_logger() -> Any:
    """The flow or task run's logger inside a run (its lines reach the UI), else ours."""
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return log


def _dvc_out(root: Path, *args: str, attempts: int = 2) -> str:
    """The output of a read-only ``dvc`` command; "" where it fails ("No default remote set"
    is exit 1). Another failure is tried once more: a message must not lose the remote's
    URL to a passing hiccup of a busy machine."""
    for _ in range(attempts):
        proc = subprocess.run(dvc_command(*args), cwd=root, env=dvc_env(),
                              capture_output=True, text=True)
        if proc.returncode == 0:
            return proc.stdout
        if "No default remote" in proc.stderr + proc.stdout:
            break
    return ""


def describe_remote(root: Path, remote: str | None = None) -> str:
    """'name' (url) of the DVC remote ``remote`` or the default one, for error messages."""
    name = remote or _dvc_out(root, "remote", "default").strip()
    if not name:
        return "(no default DVC remote)"
    url = _remote_url(root, name)
    return f"'{name}' ({url})" if url else f"'{name}'"


def _remote_url(root: Path, name: str) -> str | None:
    """``remote.<name>.url`` as DVC's config files set it (the local file first), read as text:
    a message about a failing remote must not depend on another dvc process."""
    header = f"['remote \"{name}\"']"
    for config in (root / ".dvc" / "config.local", root / ".dvc" / "config"):
        section = None
        for line in config.read_text(encoding="utf-8").splitlines() if config.is_file() else []:
            line = line.strip()
            if line.startswith("["):
                section = line
            elif section == header and line.partition("=")[0].strip() == "url":
                return line.partition("=")[2].strip()
    return None


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
