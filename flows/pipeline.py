"""The Prefect flow that drives the DVC pipeline: one task per stage of ``dvc.yaml``.

DVC stays the only definition of the graph and the only judge of what is stale; the flow
asks it through ``flows/dvc_adapter.py``. The stages and their order are DVC's own, so a
stage added to ``dvc.yaml`` becomes a task with no code change. Each task first asks DVC
in-process whether its stage changed (~0.1 s); only a changed stage is reproduced, by
``dvc repro --single-item <stage>`` in a subprocess (~1 s) that leads its own process
group under ``flows/guard.py``. That buys isolation: a timeout kills the whole group (DVC
and the stage command under it, so no orphan keeps writing), the group dies with the flow
even when the flow is killed with SIGKILL, and an out-of-memory kill or a crash ends the
stage, not the flow. A stage running while the Prefect server is unreachable for
``API_LOST_S`` is stopped the same way, so the run fails promptly and leaves nothing partial.

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
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from flows import alerts, progress, registry, slots  # guardrails (docs/unattended.md)
from flows import dvc_adapter as dvc
from flows.dvc_adapter import DiffRow, StageNode, dvc_command
from flows.dvc_adapter import dvc_env as subprocess_env
from stages.paths import find_root

__all__ = ["StageNode", "StageFailed", "ServerLost", "ensure_crash_detection", "pipeline",
           "resolve_root", "stage_graph", "subprocess_env"]

#: Stages whose timeout can be transient (a stalled download): retried after a timeout.
DEFAULT_RETRY_STAGES = ("fetch", "ingest")
#: Seconds between SIGTERM and SIGKILL when a stage is stopped.
KILL_GRACE_S = 10.0
#: EX_TEMPFAIL: a stage's "the next attempt may succeed" (ingest's network failures).
TEMPFAIL_EXIT = 75
#: Seconds a running stage tolerates an unreachable Prefect server before it is stopped.
API_LOST_S = float(os.environ.get("CONVFLOW_API_LOST_S", "20"))
#: Seconds between the health checks of the Prefect server while a stage runs.
API_CHECK_S = 5.0
GUARD = Path(__file__).resolve().with_name("guard.py")
_STAGE_ERROR = re.compile(r"^convflow(\.[\w.]+)?: error: ")
_DVC_ERROR = re.compile(r"^ERROR: .*$", re.MULTILINE)
#: DVC exits 255 whatever the command did; the command's own status is in its message.
_CMD_STATUS = re.compile(r"failed to run: .*, exited with (-?\d+)")


# ---------------------------------------------------------------------------- the graph

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


def stage_graph(root: str | Path) -> list[StageNode]:
    """The pipeline stages in the order ``dvc repro`` runs them (``dvc_adapter``)."""
    return dvc.stages_in_order(root)


# ---------------------------------------------------------------------------- one stage

class ServerLost(RuntimeError):
    """The Prefect server stopped answering while the flow ran."""


class StageFailed(RuntimeError):
    """A stage (or experiment, or push) failed or timed out; ``message`` is its own error."""

    def __init__(self, stage: str, message: str, returncode: int | None, transient: bool,
                 kind: str = "stage"):
        super().__init__(f"{kind} '{stage}' failed: {message}")
        self.stage, self.message, self.kind = stage, message, kind
        self.returncode, self.transient = returncode, transient

    def __reduce__(self) -> tuple:
        # Prefect may pickle a task's exception; keep every field across that
        return (StageFailed,
                (self.stage, self.message, self.returncode, self.transient, self.kind))


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


def retry_if_transient(task_: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry_condition_fn: retry only a :class:`StageFailed` marked transient."""
    try:
        state.result()
    except StageFailed as exc:
        return exc.transient
    except Exception:
        return False
    return False


def server_lost(exc: BaseException) -> str | None:
    """A one-line reason when ``exc`` (or what caused it) is the Prefect API not answering."""
    import httpx

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ServerLost):
            return str(seen)
        if isinstance(seen, (httpx.TransportError, ConnectionError)):
            return f"lost the Prefect server at {_api_url()}: {type(seen).__name__}: {seen}"
        seen = seen.__cause__ or seen.__context__
    return None


def dvc_failure(output: str, status: int | None) -> str | None:
    """Why a DVC command failed, or None: a non-zero status, or an ``ERROR:`` line with status 0.

    DVC can report a failed cache transfer ("ERROR: failed to transfer ...") and still
    exit 0; the flow treats that as the failure it is.
    """
    if status != 0:
        return error_message(output, status)
    found = _DVC_ERROR.findall(output)
    return found[-1].strip() if found else None


def guarded(cmd: list[str]) -> list[str]:
    """``cmd`` run under ``flows/guard.py``: its process group dies with this process."""
    return [sys.executable, str(GUARD), str(os.getpid()), str(KILL_GRACE_S), "--", *cmd]


def kill_group(proc: subprocess.Popen, grace_s: float = KILL_GRACE_S) -> None:
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


def _api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def api_reachable(url: str, timeout_s: float = API_CHECK_S) -> bool:
    """Whether the Prefect API at ``url`` answers its health check."""
    import httpx

    try:
        return httpx.get(f"{url.rstrip('/')}/health", timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


def run_guarded(cmd: list[str], root: Path, label: str, timeout_s: float | None, log: Any,
                env: dict[str, str] | None = None) -> tuple[str, int | None, bool]:
    """``cmd`` in its own guarded process group, its output logged: (output, status, timed out).

    Raises :class:`ServerLost` (after stopping the group) when the Prefect server has not
    answered for ``API_LOST_S`` seconds.
    """
    proc = subprocess.Popen(guarded(cmd), cwd=root, env=env or subprocess_env(), text=True,
                            bufsize=1, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    lines: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            log.info("%s | %s", label, line.rstrip())

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    api, last_seen = _api_url(), time.monotonic()
    try:
        while proc.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                timed_out = True
                log.error("'%s' ran past its %s s timeout: killing its process group", label,
                          timeout_s)
                kill_group(proc)
                break
            wait_s = API_CHECK_S if deadline is None else min(API_CHECK_S,
                                                              deadline - time.monotonic())
            try:
                proc.wait(timeout=max(wait_s, 0.01))
                break
            except subprocess.TimeoutExpired:
                pass
            if api and api_reachable(api):
                last_seen = time.monotonic()
            elif api and time.monotonic() - last_seen > API_LOST_S:
                kill_group(proc)
                raise ServerLost(f"lost the Prefect server at {api} for {API_LOST_S:.0f} s; "
                                 f"stopped '{label}' before it finished")
    except BaseException:  # the flow itself is cancelled or lost: take the stage down with it
        kill_group(proc)
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
      retry_condition_fn=retry_if_transient)
def run_stage(name: str, root: str, timeout_s: float | None = None, force: bool = False,
              retry_stages: list[str] | None = None) -> dict[str, Any]:
    """Reproduce exactly one DVC stage; report whether it ran or was up to date, and its seconds."""
    log = get_run_logger()
    start = time.perf_counter()
    if not force and not dvc.stage_changed(root, name):
        seconds = round(time.perf_counter() - start, 3)
        log.info("stage '%s' is up to date (%.2f s)", name, seconds)
        return {"stage": name, "status": "up to date", "seconds": seconds}
    dvc.forget(root)  # DVC in the subprocess changes dvc.lock and the outputs
    cmd = dvc_command("repro", "--single-item", name, *(["--force"] if force else []))
    with slots.stage_slot(name, log), progress.watch(root, name, log):
        output, returncode, timed_out = run_guarded(cmd, Path(root), name, timeout_s, log)
    seconds = round(time.perf_counter() - start, 3)
    failure = dvc_failure(output, returncode)
    if timed_out or failure:
        message = f"timed out after {timeout_s} s (process group killed)" if timed_out \
            else str(failure)
        stages = tuple(retry_stages) if retry_stages is not None else DEFAULT_RETRY_STAGES
        status = command_status(output, returncode)
        raise StageFailed(name, message, status,
                          is_transient(name, status, timed_out, stages))
    status = _status_from_output(output)
    log.info("stage '%s': %s (%.2f s)", name, status, seconds)
    return {"stage": name, "status": status, "seconds": seconds}


# ---------------------------------------------------------------------------- artifacts

def diff_markdown(metrics: list[DiffRow], params: list[DiffRow], rev: str = "HEAD") -> str:
    """Markdown of the metrics and params that differ between ``rev`` and the workspace."""
    parts = [f"## Changes against `{rev}`", ""]
    for title, rows, cols in (("Metrics", metrics, ("old", "new", "diff")),
                              ("Params", params, ("old", "new"))):
        parts.append(f"### {title}")
        if not rows:
            parts += ["", "No changes.", ""]
            continue
        parts += ["", "| file | key | " + " | ".join(cols) + " |",
                  "|---|---|" + "---|" * len(cols)]
        for row in rows:
            cells = " | ".join(_cell(row[col]) for col in cols)  # type: ignore[literal-required]
            parts.append(f"| {row['file']} | {row['key']} | {cells} |")
        parts.append("")
    return "\n".join(parts)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "—" if value is None else str(value).replace("|", "\\|")


def publish_artifacts(root: Path, summary: list[dict[str, Any]], rev: str = "HEAD") -> None:
    """Stage summary, metrics table and diff vs the last commit, as Prefect artifacts."""
    create_table_artifact(table=summary, key="convflow-stages",
                          description="Stages of this run: ran / up to date / failed, seconds")
    rows = dvc.metrics_rows(root)
    if rows:
        create_table_artifact(table=list(rows), key="convflow-metrics",
                              description="Current metrics (dvc metrics show)")
    try:
        markdown = diff_markdown(dvc.metrics_diff(root, rev), dvc.params_diff(root, rev), rev)
    except dvc.DvcError as exc:  # e.g. a repository without commits yet
        markdown = f"No diff against `{rev}`: {exc}"
    create_markdown_artifact(markdown=markdown, key="convflow-diff",
                             description="Metrics and params against the last commit")


# ---------------------------------------------------------------------------- crashed runs

#: The Prefect automation that marks a run CRASHED once its heartbeats stop.
CRASH_AUTOMATION = "convflow: crash flow runs whose heartbeats stopped"
#: The tag of the runs it watches: those started by ``python -m flows``, which sets the
#: heartbeat period the automation expects (runs started otherwise keep Prefect's 180 s).
WATCHED_TAG = "convflow-watched"


def ensure_crash_detection() -> None:
    """Have the Prefect server mark a flow run CRASHED when its heartbeats stop.

    Prefect's own answer to "zombie" runs: every flow run sends a heartbeat event each
    ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds; this automation changes a run tagged
    ``WATCHED_TAG`` whose next heartbeat (or end) does not come within two periods to
    CRASHED. So a run whose process was killed, or that lost the server, does not stay
    RUNNING: the server marks it as soon as it is up and the period has passed. Created
    once per server, replaced if the period changed.
    """
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification
    from prefect.settings import get_current_settings

    every = get_current_settings().flows.heartbeat_frequency
    if not every or not _api_url():
        return  # heartbeats off, or a temporary server that ends with this process
    trigger = EventTrigger(
        after={"prefect.flow-run.heartbeat"},
        expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed",
                "prefect.flow-run.Failed", "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed"},
        match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
        match_related=ResourceSpecification({"prefect.resource.id": f"prefect.tag.{WATCHED_TAG}",
                                             "prefect.resource.role": "tag"}),
        for_each={"prefect.resource.id"},
        posture=Posture.Proactive,
        threshold=1,
        within=timedelta(seconds=2 * max(every, 30) + 10),  # Prefect allows no period < 30 s
    )
    try:
        existing = Automation.read(name=CRASH_AUTOMATION)
    except ValueError:
        existing = None
    if existing is not None:
        old = existing.trigger
        if (getattr(old, "within", None) == trigger.within
                and getattr(old, "match_related", None) == trigger.match_related):
            return
        existing.delete()
    Automation(
        name=CRASH_AUTOMATION,
        description="Marks a flow run CRASHED when its heartbeats stop (convflow)",
        trigger=trigger,
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message="no heartbeat: the flow process or its server "
                                            "went away")],
    ).create()


# ---------------------------------------------------------------------------- the flow

def _stage_error(name: str, state: Any) -> StageFailed:
    """The failure a stage task's final state holds, as a :class:`StageFailed`."""
    try:
        state.result()
        return StageFailed(name, state.message or "failed", None, False)
    except StageFailed as exc:
        return exc
    except ServerLost:
        raise  # nothing more can be recorded: end the run now
    except Exception as exc:
        return StageFailed(name, f"{type(exc).__name__}: {exc}", None, False)


def run_stages(nodes: list[StageNode], repo_root: Path, stage_task: Any,
               **options: Any) -> tuple[list[dict[str, Any]], dict[str, StageFailed]]:
    """Each stage as a task, in DVC's order; a stage whose upstream failed is not run.

    Returns the per-stage summary rows and the failures by stage name.
    """
    states: dict[str, Any] = {}
    summary: list[dict[str, Any]] = []
    failed: dict[str, StageFailed] = {}
    for node in nodes:
        blocked = sorted(node.upstream & failed.keys())
        if blocked:
            # DVC would not run it either: its inputs are missing or stale
            summary.append({"stage": node.name, "status": f"not run ({blocked[0]} failed)",
                            "seconds": 0.0})
            continue
        # DVC holds one lock per repository, so stages run one at a time, in order
        state = stage_task(node.name, str(repo_root), return_state=True, **options,
                           wait_for=[states[u] for u in sorted(node.deps) if u in states])
        states[node.name] = progress.edge(state)  # the DVC edges become the run graph's edges
        if state.is_completed():
            summary.append(state.result())
            continue
        failed[node.name] = _stage_error(node.name, state)
        summary.append({"stage": node.name, "status": "failed", "seconds": None,
                        "error": failed[node.name].message})
    return summary, failed



@flow(name="convflow-pipeline", log_prints=False)
def pipeline(root: str | None = None, force: bool = False, timeout_s: float | None = None,
             retries: int = 2, retry_delay_s: float = 10.0,
             retry_stages: list[str] | None = None,
             push: bool = False, commit: bool = False,
             promote: str | None = None, pull: bool = False,
             branch: str | None = None) -> list[dict[str, Any]]:
    """Reproduce the DVC pipeline, one Prefect task per stage, in DVC's own order."""
    from prefect.runtime import flow_run

    from flows import publish  # pull / push / commit: outputs to DVC, results to git

    log = get_run_logger()
    # no chdir: DVC and the stages run with cwd=root, and the caller's cwd stays its own
    repo_root = resolve_root(root)
    log.info("repository root: %s", repo_root)
    retry_stages = list(DEFAULT_RETRY_STAGES if retry_stages is None else retry_stages)
    stage_task = run_stage.with_options(
        retries=retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=retry_delay_s) if retries else 0,
        retry_jitter_factor=0.2 if retries else None,
    )
    if pull:
        publish.start_run(repo_root, retries, retry_delay_s)
    dvc.forget(repo_root)  # read dvc.yaml afresh on every run
    nodes = stage_graph(repo_root)
    log.info("stages in DVC order: %s", ", ".join(n.name for n in nodes))
    registry.refresh_baseline(repo_root, log)  # guardrails: the gate's production baseline
    summary, failed = run_stages(nodes, repo_root, stage_task, timeout_s=timeout_s,
                                 force=force, retry_stages=retry_stages)
    try:
        publish_artifacts(repo_root, summary)
    finally:
        dvc.forget(repo_root)
    if failed:
        error = next(iter(failed.values()))
        alerts.emit(alerts.RUN_FAILED, repo_root, error.stage, error.message)
        raise error
    gate_failed = alerts.check_gate(repo_root)  # guardrails: a failed gate ships nothing
    if gate_failed:
        raise StageFailed("gate", gate_failed, None, False)
    # outputs to the DVC remote, then the results commit (HEAD moves onto it) to git
    if publish.finish_run(repo_root, "pipeline", push, commit, branch, retries, retry_delay_s):
        registry.ship(repo_root, f"convflow: run {flow_run.name or 'manual'} passed the gate",
                      promote, push, log)  # guardrails: a version in the model registry
    return summary
