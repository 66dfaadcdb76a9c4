"""The Prefect flow that drives the DVC pipeline: one task per stage of ``dvc.yaml``.

DVC stays the only definition of the graph and the only judge of what is stale; the flow
asks it through ``flows/dvc_adapter.py``, so a stage added to ``dvc.yaml`` becomes a task
with no code change. The flow reads as its steps; each step's code lives in the module
named for it, below this one:

    preflight  flows/checkout.py     what the run will ship is valid, before any work
    pull       flows/publish.py      deep clone, tags, last results; dvc pull the rest
    baseline   flows/registry.py     the gate's production baseline from the registry
    stages     flows/stage_tasks.py  one task per DVC stage (run by flows/runner.py)
    artifacts  flows/artifacts.py    stages, metrics and diff in the Prefect UI
    gate       flows/gate.py         the gate stage's task fails with its verdict
    publish    flows/publish.py      outputs to the DVC remote, results commit to git
    register   flows/registry.py     a new model version (and a stage, if asked)

Run it with ``python -m flows run`` (see ``flows/__main__.py``) or call ``pipeline()``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.tasks import exponential_backoff

from flows import artifacts, checkout, gate, publish, registry
from flows import dvc_adapter as dvc
from flows.dvc_adapter import StageNode
from flows.runner import DEFAULT_RETRY_STAGES
from flows.stage_tasks import run_stage, run_stages
from stages.paths import find_root

__all__ = ["pipeline", "stage_graph"]


def stage_graph(root: str | Path) -> list[StageNode]:
    """The pipeline stages in the order ``dvc repro`` runs them (``dvc_adapter``)."""
    return dvc.stages_in_order(root)


def _stage_task(retries: int, retry_delay_s: float) -> Any:
    """The stage task with the run's retry policy (transient failures only, with backoff);
    the gate stage's task also enforces its verdict (``flows/gate.py``)."""
    policy = {"retries": retries,
              "retry_delay_seconds": exponential_backoff(backoff_factor=retry_delay_s)
              if retries else 0,
              "retry_jitter_factor": 0.2 if retries else None}
    stage, gated = run_stage.with_options(**policy), gate.run_gate.with_options(**policy)
    return lambda name, *args, **kw: (gated if name == gate.GATE_STAGE else stage)(
        name, *args, **kw)


@flow(name="convflow-pipeline", log_prints=False)
def pipeline(root: str | None = None, force: bool = False, timeout_s: float | None = None,
             retries: int = 2, retry_delay_s: float = 10.0,
             retry_stages: list[str] | None = None,
             push: bool = False, commit: bool = False,
             promote: str | None = None, pull: bool = False,
             branch: str | None = None) -> list[dict[str, Any]]:
    """Reproduce the DVC pipeline, one Prefect task per stage, in DVC's own order."""
    from prefect.runtime import deployment, flow_run

    log = get_run_logger()
    # no chdir: DVC and the stages run with cwd=root, and the caller's cwd stays its own
    repo_root = find_root(root)
    log.info("repository root: %s", repo_root)
    branch = branch or publish.default_branch(deployment.name)
    # everything the run needs to ship is checked before any work: never half-shipped
    checkout.preflight(repo_root, pull=pull, push=push, commit=commit, branch=branch,
                       promote=promote)
    if pull:
        publish.start_run(repo_root, retries, retry_delay_s, branch=branch)
    dvc.forget(repo_root)  # read dvc.yaml afresh on every run
    nodes = stage_graph(repo_root)
    log.info("stages in DVC order: %s", ", ".join(n.name for n in nodes))
    registry.refresh_baseline(repo_root, log)
    retry_stages = list(DEFAULT_RETRY_STAGES if retry_stages is None else retry_stages)
    summary, failed = run_stages(nodes, repo_root, _stage_task(retries, retry_delay_s),
                                 timeout_s=timeout_s, force=force, retry_stages=retry_stages)
    try:
        artifacts.record_run(repo_root, summary, gate=gate.verdict(repo_root))
    finally:
        dvc.forget(repo_root)
    if failed:  # the run fails: the alerts automation sends its state (flows/alerts.py)
        raise next(iter(failed.values()))
    if publish.finish_run(repo_root, "pipeline", push, commit, branch, retries, retry_delay_s):
        registry.ship(repo_root, f"convflow: run {flow_run.name or 'manual'} passed the gate",
                      promote, push, log)
    return summary
