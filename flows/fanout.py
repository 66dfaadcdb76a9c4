"""Sweep fan-out: each grid point is its own flow run on the work pool.

The parent (``flows.sweep.sweep`` with ``point_deployment``) submits one run of the point
deployment per grid point (``run_deployment(..., timeout=0)``), so every free device on
every worker takes one, then waits on all of them. A point (``flows.sweep.sweep_point``)
runs in its worker's fresh clone: ``dvc pull``, ``dvc exp run`` under a device lease of its machine,
``dvc exp push`` (the experiment's ref to git, its outputs and run-cache to the DVC
remote), and a one-row table artifact saying what ran where (machine, device, seconds).

A point whose worker dies stops sending heartbeats; the crash automation
(``flows.crash``) marks it CRASHED, and the parent submits it again (``resubmits``
times), so another worker takes it. A failed point is final (its own failed run is what
``flows.alerts`` notifies); the others carry on. The parent publishes one table of every
point with the best one marked, then fails if any point failed.
"""

from __future__ import annotations

import json
import time
from typing import Any
from uuid import UUID

from prefect import get_run_logger
from prefect.artifacts import create_table_artifact

from flows.crash import WATCHED_TAG, ensure_crash_detection

POINT_ARTIFACT = "convflow-sweep-point"
SWEEP_ARTIFACT = "convflow-sweep"
#: Seconds between the parent's looks at its points.
POLL_S = 2.0


def _submit(deployment: str, name: str, point: dict[str, Any], options: dict[str, Any]) -> UUID:
    """One run of the point deployment for ``point``; its id (not waited for)."""
    from prefect.deployments import run_deployment

    run = run_deployment(deployment, parameters={"name": name, "overrides": point, **options},
                         timeout=0, tags=[WATCHED_TAG], flow_run_name=name)
    return run.id


def _read_runs(ids: list[UUID]) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))


def wait_points(deployment: str, points: dict[str, dict[str, Any]], options: dict[str, Any],
                resubmits: int = 2, poll_s: float = POLL_S) -> dict[str, Any]:
    """Submit every point, wait until each is final; {name: its last flow run}.

    A CRASHED point (its worker or machine went away) is submitted again, up to
    ``resubmits`` times; a failed or cancelled one is final.
    """
    log = get_run_logger()
    ensure_crash_detection()  # what marks a point CRASHED once its heartbeats stop
    live = {name: _submit(deployment, name, point, options) for name, point in points.items()}
    tries = dict.fromkeys(points, 1)
    final: dict[str, Any] = {}
    while live:
        time.sleep(poll_s)
        for run in _read_runs(list(live.values())):
            if not run.state or not run.state.is_final():
                continue
            name = next(n for n, i in live.items() if i == run.id)
            if run.state.is_crashed() and tries[name] <= resubmits:
                log.warning("point %s crashed (%s): submitting it again (%d/%d)", name,
                            run.state.message, tries[name], resubmits)
                tries[name] += 1
                live[name] = _submit(deployment, name, points[name], options)
                continue
            final[name] = run
            del live[name]
    return final


def point_rows(runs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{name: the row its point published} for the points that completed."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    ids = {run.id: name for name, run in runs.items() if run.state.is_completed()}
    if not ids:
        return {}
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[POINT_ARTIFACT]),
            flow_run_id=ArtifactFilterFlowRunId(any_=list(ids))))
    data = (json.loads(a.data) if isinstance(a.data, str) else a.data for a in found)
    rows = {ids[a.flow_run_id]: rows[0] for a, rows in zip(found, data, strict=True) if rows}
    return rows


def summarise(runs: dict[str, Any], best_by: str,
              overrides: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One table of every point, the best marked, published as the parent's artifact."""
    rows_by_name = point_rows(runs)
    scored = [r for r in rows_by_name.values() if isinstance(r.get(best_by), int | float)]
    best = max(scored, key=lambda r: r[best_by])["experiment"] if scored else None
    table = []
    for name, run in runs.items():
        row = rows_by_name.get(name) or {
            "experiment": name, **{f"-S {k}": v for k, v in overrides[name].items()}}
        row = {"best": "★" if name == best else "", **row,
               "state": run.state.type.value, "flow_run": run.name}
        table.append(row)
    create_table_artifact(table=table, key=SWEEP_ARTIFACT,
                          description=f"This sweep's points, best by {best_by} marked ★")
    return table
