"""The pipeline's stages as Prefect tasks: one task per DVC stage, in DVC's own order.

Each task first asks DVC in-process whether its stage changed (~0.1 s); only a changed stage
is reproduced, by ``dvc repro --single-item <stage>`` under the stage runner
(``flows/runner.py``), holding the resource slot around the stages that need one and
watching training's progress.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows import dvc_adapter as dvc
from flows import progress, slots
from flows.dvc_adapter import StageNode, dvc_command, dvc_env
from flows.runner import (
    DEFAULT_RETRY_STAGES,
    ServerLost,
    StageFailed,
    command_status,
    dvc_failure,
    is_transient,
    retry_if_transient,
    run_guarded,
    status_from_output,
)


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
    with slots.stage_slot(name, log) as device, progress.watch(root, name, log):
        # a training stage sees only the device it leased (none: this machine has none)
        output, returncode, timed_out = run_guarded(cmd, Path(root), name, timeout_s, log,
                                                    env={**dvc_env(), **device})
    seconds = round(time.perf_counter() - start, 3)
    failure = dvc_failure(output, returncode)
    if timed_out or failure:
        message = f"timed out after {timeout_s} s (process group killed)" if timed_out \
            else str(failure)
        stages = tuple(retry_stages) if retry_stages is not None else DEFAULT_RETRY_STAGES
        status = command_status(output, returncode)
        raise StageFailed(name, message, status,
                          is_transient(name, status, timed_out, stages))
    status = status_from_output(output)
    log.info("stage '%s': %s (%.2f s)", name, status, seconds)
    return {"stage": name, "status": status, "seconds": seconds}


def stage_error(name: str, state: Any) -> StageFailed:
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
        failed[node.name] = stage_error(node.name, state)
        summary.append({"stage": node.name, "status": "failed", "seconds": None,
                        "error": failed[node.name].message})
    return summary, failed
