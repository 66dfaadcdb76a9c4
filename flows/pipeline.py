"""The Prefect flow that drives the DVC pipeline: one task per stage of ``dvc.yaml``.

DVC stays the only definition of the graph and the only judge of what is stale. The flow
reads the stages and their order from DVC's own API (``Repo.index.graph`` and the order
``dvc repro`` itself uses), so a stage added to ``dvc.yaml`` becomes a task with no code
change. Each task first asks DVC in-process whether its stage changed (~10 ms); only a
changed stage is reproduced, by ``dvc repro --single-item <stage>`` in a subprocess that
leads its own process group. The subprocess costs ~1 s, but buys isolation: a timeout
kills the whole group (DVC and the stage command under it, so no orphan keeps writing),
and an out-of-memory kill or a crash ends the stage, not the flow.

Run it with ``python -m flows run`` (see ``flows/__main__.py``) or call ``pipeline()``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from flows import alerts, progress, registry, slots  # guardrails (docs/unattended.md)
from stages.paths import find_root

#: Stages whose timeout can be transient (a stalled download): retried after a timeout.
DEFAULT_RETRY_STAGES = ("ingest",)
#: Seconds between SIGTERM and SIGKILL when a stage times out.
KILL_GRACE_S = 10.0
#: The exit status of a stage's user error (``stages.errors.run_cli``): never retried.
USER_ERROR_EXIT = 2
#: EX_TEMPFAIL: a stage's "the next attempt may succeed" (ingest's network failures).
TEMPFAIL_EXIT = 75
_STAGE_ERROR = re.compile(r"^convflow(\.[\w.]+)?: error: ")
_DVC_ERROR = re.compile(r"^ERROR: .*$", re.MULTILINE)
#: DVC exits 255 whatever the command did; the command's own status is in its message.
_CMD_STATUS = re.compile(r"failed to run: .*, exited with (-?\d+)")


# ---------------------------------------------------------------------------- the graph

@dataclass(frozen=True)
class StageNode:
    """One stage of the DVC graph: its address and the stages it depends on (transitively)."""

    name: str
    upstream: frozenset[str] = field(default_factory=frozenset)


def resolve_root(root: str | Path | None = None) -> Path:
    """The repository root: ``root``, else ``$CONVFLOW_ROOT``, else found from cwd or this file."""
    if root:
        return find_root(root)
    if os.environ.get("CONVFLOW_ROOT"):
        return find_root(os.environ["CONVFLOW_ROOT"])
    try:
        return find_root()
    except Exception:  # not inside a checkout (e.g. a served run): use the one holding this code
        return find_root(Path(__file__).resolve().parent)


@contextmanager
def _in_dir(folder: str | Path) -> Iterator[None]:
    """cwd = ``folder`` inside the block: DVC names stages relative to the cwd."""
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


#: One open DVC repo per root, reused while no stage has run: opening one and reading its
#: index costs ~0.1-0.3 s, and an up-to-date pipeline otherwise pays it once per stage.
_REPOS: dict[str, Any] = {}


def _repo(root: str | Path) -> Any:
    """The cached ``dvc.repo.Repo`` of ``root`` (opened on first use)."""
    from dvc.repo import Repo

    key = str(Path(root).resolve())
    if key not in _REPOS:
        with _in_dir(key):
            _REPOS[key] = Repo(key)
    return _REPOS[key]


def forget_repo(root: str | Path) -> None:
    """Drop the cached repo of ``root``: a stage ran, or dvc.yaml may have changed."""
    repo = _REPOS.pop(str(Path(root).resolve()), None)
    if repo is not None:
        repo.close()


def stage_graph(root: str | Path) -> list[StageNode]:
    """The pipeline stages in the order ``dvc repro`` runs them, read from DVC's own index."""
    import networkx as nx
    from dvc.repo.reproduce import plan_repro
    from dvc.stage import PipelineStage

    with _in_dir(root):
        graph = _repo(root).index.graph  # edges point from a stage to the stages it depends on
        nodes = []
        for stage in plan_repro(graph):
            if not isinstance(stage, PipelineStage):
                continue  # `.dvc` files track data; they have no command to run
            ups = {s.addressing for s in nx.descendants(graph, stage)
                   if isinstance(s, PipelineStage)}
            nodes.append(StageNode(stage.addressing, frozenset(ups)))
    return nodes


def stage_changed(root: str | Path, name: str) -> bool:
    """DVC's own verdict, in-process: would ``dvc repro --single-item name`` run the stage?"""
    repo = _repo(root)
    with _in_dir(root), repo.lock:
        (stage,) = repo.stage.collect(name)
        return bool(stage.changed())


# ---------------------------------------------------------------------------- one stage

class StageFailed(RuntimeError):
    """A stage exited non-zero or timed out; ``str()`` is the stage's own error message."""

    def __init__(self, stage: str, message: str, returncode: int | None, transient: bool):
        super().__init__(f"stage '{stage}' failed: {message}")
        self.stage, self.message = stage, message
        self.returncode, self.transient = returncode, transient

    def __reduce__(self) -> tuple:
        # Prefect may pickle a task's exception; keep all four fields across that
        return (StageFailed, (self.stage, self.message, self.returncode, self.transient))


def command_status(output: str, dvc_status: int | None) -> int | None:
    """The stage command's own exit status, from DVC's "failed to run: ..., exited with N"."""
    found = _CMD_STATUS.findall(output)
    return int(found[-1]) if found else dvc_status


def error_message(output: str, returncode: int | None) -> str:
    """The stage's own error (``convflow[.<stage>]: error: ...`` and its indented lines)."""
    lines = output.splitlines()
    starts = [i for i, line in enumerate(lines) if _STAGE_ERROR.match(line)]
    if starts:
        message = [lines[starts[-1]].strip()]
        for line in lines[starts[-1] + 1:]:
            if not line[:1].isspace() or not line.strip():
                break
            message.append(line.strip())  # the details of a multi-line message
        return " ".join(message)
    found = _DVC_ERROR.findall(output)
    if found:
        return found[-1].strip()
    tail = [line for line in lines if line.strip()][-3:]
    return " | ".join(tail) or f"exited with status {returncode}"


def is_transient(stage: str, status: int | None, timed_out: bool,
                 retry_stages: tuple[str, ...] | list[str] = DEFAULT_RETRY_STAGES) -> bool:
    """Whether a retry may succeed: the stage said so (exit 75), or a download stage stalled.

    Everything else fails for good: exit 2 is a user error (bad params, a checksum
    mismatch, a non-finite loss), a negative status a kill by signal (the OOM killer), and
    any other status a crash that the same inputs would repeat.
    """
    if status == TEMPFAIL_EXIT:
        return True
    return timed_out and stage.split("@")[0] in retry_stages


def _retry_if_transient(task_: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry_condition_fn: retry only failures that ``is_transient`` admits."""
    try:
        state.result()
    except StageFailed as exc:
        return exc.transient
    except Exception:
        return False
    return False


def subprocess_env() -> dict[str, str]:
    """This interpreter's folder first on PATH, so DVC and the stages use the same venv."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def kill_group(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the process group ``proc`` leads, then SIGKILL whatever is left after ``grace_s``."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            # the leader is gone; a child that ignored SIGTERM may still hold the group
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue
        return


def repro_single(root: Path, name: str, timeout_s: float | None, force: bool,
                 log: Any) -> tuple[str, int | None, bool]:
    """``dvc repro --single-item name`` in its own process group: (output, status, timed out)."""
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", name]
    if force:
        cmd.append("--force")
    proc = subprocess.Popen(cmd, cwd=root, env=subprocess_env(), text=True, bufsize=1,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    lines: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            log.info("%s | %s", name, line.rstrip())

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        log.error("stage '%s' ran past its %s s timeout: killing its process group", name,
                  timeout_s)
        kill_group(proc, KILL_GRACE_S)
    except BaseException:  # the flow itself is cancelled: take the stage down with it
        kill_group(proc, KILL_GRACE_S)
        raise
    reader.join(timeout=5)
    return "".join(lines), proc.returncode, timed_out


def _status_from_output(output: str) -> str:
    if "is cached - skipping run" in output:
        return "restored from run-cache"
    if "Running stage" in output:
        return "ran"
    return "up to date"


@task(name="dvc-stage", task_run_name="{name}", cache_policy=NO_CACHE,
      retry_condition_fn=_retry_if_transient)
def run_stage(name: str, root: str, timeout_s: float | None = None, force: bool = False,
              retry_stages: list[str] | None = None) -> dict[str, Any]:
    """Reproduce exactly one DVC stage; report whether it ran or was up to date, and its seconds."""
    log = get_run_logger()
    start = time.perf_counter()
    if not force and not stage_changed(root, name):
        seconds = round(time.perf_counter() - start, 3)
        log.info("stage '%s' is up to date (%.2f s)", name, seconds)
        return {"stage": name, "status": "up to date", "seconds": seconds}
    forget_repo(root)  # DVC in the subprocess changes dvc.lock and the outputs
    with slots.stage_slot(name, log), progress.watch(root, name, log):
        output, returncode, timed_out = repro_single(Path(root), name, timeout_s, force, log)
    seconds = round(time.perf_counter() - start, 3)
    if timed_out or returncode != 0:
        message = (f"timed out after {timeout_s} s (process group killed)" if timed_out
                   else error_message(output, returncode))
        stages = tuple(retry_stages) if retry_stages is not None else DEFAULT_RETRY_STAGES
        status = command_status(output, returncode)
        raise StageFailed(name, message, status,
                          is_transient(name, status, timed_out, stages))
    status = _status_from_output(output)
    log.info("stage '%s': %s (%.2f s)", name, status, seconds)
    return {"stage": name, "status": status, "seconds": seconds}


# ---------------------------------------------------------------------------- artifacts

def flatten(prefix: str, value: Any) -> list[tuple[str, Any]]:
    """Nested dicts as ("a.b.c", leaf) pairs, the way DVC names params and metrics."""
    if isinstance(value, dict):
        out: list[tuple[str, Any]] = []
        for key, sub in value.items():
            out.extend(flatten(f"{prefix}.{key}" if prefix else str(key), sub))
        return out
    return [(prefix, value)]


def metrics_rows(root: str | Path) -> list[dict[str, Any]]:
    """The workspace's scalar metrics as rows {file, metric, value} (``dvc metrics show``)."""
    with _in_dir(root):  # DVC names files relative to the cwd
        shown = _repo(root).metrics.show()
    rows = []
    for file, entry in sorted(shown.get("", {}).get("data", {}).items()):
        for metric, value in flatten("", entry.get("data", {})):
            if isinstance(value, (int, float, str, bool)) or value is None:
                rows.append({"file": file, "metric": metric, "value": value})
    return rows


def diff_markdown(root: str | Path, rev: str = "HEAD") -> str:
    """Markdown of ``dvc metrics diff`` and ``dvc params diff``: the workspace against ``rev``."""
    repo = _repo(root)
    try:
        with _in_dir(root):
            # both answer {"diff": {file: {key: {"old", "new", ["diff"]}}}}
            metrics = repo.metrics.diff(a_rev=rev).get("diff", {})
            params = repo.params.diff(a_rev=rev).get("diff", {})
    except Exception as exc:  # e.g. a repo without commits yet
        return f"No diff against `{rev}`: {exc}"
    parts = [f"## Changes against `{rev}`", ""]
    for title, diff, cols in (("Metrics", metrics, ("old", "new", "diff")),
                              ("Params", params, ("old", "new"))):
        parts.append(f"### {title}")
        rows = [(file, key, change) for file, keys in sorted(diff.items())
                for key, change in sorted(keys.items())]
        if not rows:
            parts += ["", "No changes.", ""]
            continue
        parts += ["", "| file | key | " + " | ".join(cols) + " |",
                  "|---|---|" + "---|" * len(cols)]
        for file, key, change in rows:
            cells = " | ".join(_cell(change.get(col)) for col in cols)
            parts.append(f"| {file} | {key} | {cells} |")
        parts.append("")
    return "\n".join(parts)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "—" if value is None else str(value).replace("|", "\\|")


def publish_artifacts(root: Path, summary: list[dict[str, Any]]) -> None:
    """Stage summary, metrics table and diff vs the last commit, as Prefect artifacts."""
    create_table_artifact(table=summary, key="convflow-stages",
                          description="Stages of this run: ran / up to date / failed, seconds")
    rows = metrics_rows(root)
    if rows:
        create_table_artifact(table=rows, key="convflow-metrics",
                              description="Current metrics (dvc metrics show)")
    create_markdown_artifact(markdown=diff_markdown(root), key="convflow-diff",
                             description="Metrics and params against the last commit")


# ---------------------------------------------------------------------------- push / commit

def dvc_push(root: Path) -> None:
    """``dvc push`` to the default remote."""
    subprocess.run([sys.executable, "-m", "dvc", "push"], cwd=root, env=subprocess_env(),
                   check=True)


def commit_results(root: Path, message: str) -> bool:
    """Commit dvc.lock, params files and uncached metrics/plots; False if nothing changed."""
    from dvc.dependency import ParamsDependency
    from dvc.repo import Repo

    paths = {"dvc.lock"}
    with Repo(str(root)) as repo:
        for stage in repo.index.stages:
            for dep in stage.deps:
                if isinstance(dep, ParamsDependency):
                    paths.add(os.path.relpath(dep.fs_path, root))
            for out in stage.outs:
                if (out.metric or out.plot) and not out.use_cache:
                    paths.add(os.path.relpath(out.fs_path, root))
    changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"],
                             cwd=root, capture_output=True, text=True, check=True).stdout
    # DVC adds each output to a .gitignore beside it: commit those too, or the tree stays dirty
    paths |= {line[3:] for line in changed.splitlines() if line[3:].endswith(".gitignore")}
    paths = {p for p in paths if (root / p).exists()}
    subprocess.run(["git", "add", "--", *sorted(paths)], cwd=root, check=True)
    staged = subprocess.run(["git", "diff", "--cached", "--quiet", "--", *sorted(paths)],
                            cwd=root)
    if staged.returncode == 0:
        return False
    subprocess.run(["git", "commit", "-q", "-m", message, "--", *sorted(paths)], cwd=root,
                   check=True)
    return True


# ---------------------------------------------------------------------------- the flow

@flow(name="convflow-pipeline", log_prints=False)
def pipeline(root: str | None = None, force: bool = False, timeout_s: float | None = None,
             retries: int = 2, retry_delay_s: float = 10.0,
             retry_stages: list[str] | None = None,
             push: bool = False, commit: bool = False,
             promote: str | None = None) -> list[dict[str, Any]]:
    """Reproduce the DVC pipeline, one Prefect task per stage, in DVC's own order."""
    from prefect.runtime import flow_run

    log = get_run_logger()
    repo_root = resolve_root(root)
    os.chdir(repo_root)  # stages and DVC resolve paths from the root, whoever started us
    log.info("repository root: %s", repo_root)
    retry_stages = list(DEFAULT_RETRY_STAGES if retry_stages is None else retry_stages)
    stage_task = run_stage.with_options(
        retries=retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=retry_delay_s) if retries else 0,
        retry_jitter_factor=0.2 if retries else None,
    )
    forget_repo(repo_root)  # read dvc.yaml afresh on every run
    nodes = stage_graph(repo_root)
    log.info("stages in DVC order: %s", ", ".join(n.name for n in nodes))
    registry.refresh_baseline(repo_root, log)  # guardrails: the gate's production baseline
    edges = progress.direct_upstream({n.name: n.upstream for n in nodes})
    states: dict[str, Any] = {}

    summary: list[dict[str, Any]] = []
    failed: dict[str, str] = {}
    for node in nodes:
        blocked = sorted(node.upstream & failed.keys())
        if blocked:
            # DVC would not run it either: its inputs are missing or stale
            summary.append({"stage": node.name, "status": f"not run ({blocked[0]} failed)",
                            "seconds": 0.0})
            continue
        # DVC holds one lock per repository, so stages run one at a time, in order
        state = stage_task(node.name, str(repo_root), timeout_s=timeout_s, force=force,
                           retry_stages=retry_stages, return_state=True,
                           wait_for=[states[u] for u in sorted(edges[node.name]) if u in states])
        states[node.name] = progress.edge(state)  # the DVC edges become the run graph's edges
        if state.is_completed():
            summary.append(state.result())
            continue
        try:
            state.result()
            message = state.message or "failed"
        except StageFailed as exc:
            message = exc.message
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"
        failed[node.name] = message
        summary.append({"stage": node.name, "status": "failed", "seconds": None,
                        "error": message})

    try:
        publish_artifacts(repo_root, summary)
    finally:
        forget_repo(repo_root)
    if failed:
        name, message = next(iter(failed.items()))
        alerts.emit(alerts.RUN_FAILED, repo_root, name, message)
        raise StageFailed(name, message, None, False)
    gate_failed = alerts.check_gate(repo_root)  # guardrails: a failed gate ships nothing
    if gate_failed:
        raise StageFailed("gate", gate_failed, None, False)
    if push:
        dvc_push(repo_root)
    if commit:
        run_name = flow_run.name or "manual"
        if commit_results(repo_root, f"convflow: pipeline run {run_name} ({flow_run.id})"):
            log.info("committed dvc.lock, params and metrics")
            registry.ship(repo_root, f"convflow: run {run_name} passed the gate", promote,
                          push, log)  # guardrails: a version in the model registry
    return summary
