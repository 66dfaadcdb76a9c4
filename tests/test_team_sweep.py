"""Team runs end to end, continued: a sweep on a worker, and a store that is down.

The same set-up as tests/test_team.py (its ``team`` fixture: SeaweedFS as the DVC remote, a
bare ``origin`` given to ``prefect deploy`` as a ``file://`` URL, the session's Prefect
server, a process worker in its own folder), built once for this module; a module of its
own so that these runs go to another test worker than test_team.py's.
"""

from __future__ import annotations

import json

import pytest
from conftest import dvc
from team_fixtures import clone, object_store, workers  # noqa: F401
from test_team import (  # noqa: F401  (team: the fixture, one instance for this module)
    NIGHTLY,
    SWEEP,
    assert_completed,
    remote_heads,
    run_deployment,
    task_runs,
    team,
)

pytestmark = pytest.mark.slow


def test_a_sweep_on_the_worker_shows_on_the_laptop(team):  # noqa: F811
    flow_run = run_deployment(SWEEP, grid={"train.lr": [0.002, 0.02]}, max_parallel=1)
    assert_completed(flow_run, team.worker)
    names = [f"{flow_run.name}-1", f"{flow_run.name}-2"]
    laptop = clone(team.origin, team.folder / "laptop-sweep")
    listed = dvc(laptop, "exp", "list", "origin", "--names-only").stdout.split()
    assert set(names) <= set(listed), listed
    dvc(laptop, "exp", "pull", "origin", *names)
    shown = json.loads(dvc(laptop, "exp", "show", "--json").stdout)
    rows = {rev.get("name"): rev for base in shown for group in base.get("experiments") or []
            for rev in group.get("revs") or []}
    assert set(names) <= set(rows)
    lrs = {rows[n]["data"]["params"]["params.yaml"]["data"]["train"]["lr"] for n in names}
    assert lrs == {0.002, 0.02}
    for name in names:
        metrics = rows[name]["data"]["metrics"]["metrics/evaluate.json"]["data"]
        assert 0.0 < metrics["test"]["accuracy"] <= 1.0
    # the model of the best one restores from the object store without retraining
    dvc(laptop, "exp", "apply", names[1])
    dvc(laptop, "pull")
    assert "Data and pipelines are up to date." in dvc(laptop, "status").stdout


def test_object_store_down_at_start_is_a_clear_transient_failure(team):  # noqa: F811
    before = remote_heads(team.origin)
    team.store.stop()
    try:
        flow_run = run_deployment(NIGHTLY, retries=1, retry_delay_s=1)
    finally:
        team.store.start()
    assert flow_run.state.is_failed(), flow_run.state
    message = flow_run.state.message
    assert "step 'dvc pull' failed: ERROR: " in message, message
    assert "[DVC remote 'storage' (s3://convflow/e2e); retrying may help]" in message, message
    pull = task_runs(flow_run.id)["dvc-pull"]
    assert pull.run_count == 2  # retried once, as a transient failure
    assert "train" not in task_runs(flow_run.id)
    assert remote_heads(team.origin) == before  # no commit anywhere
