"""A no-op run is cheap: an up-to-date pipeline's run skips what nothing needs.

Against a real Prefect API (``prefect_api``), on a toy DVC pipeline.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect_fixtures import api_env, make_toy_repo, py_stage


def _artifacts(flow_run_id: Any) -> dict[str, Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in arts}


def test_an_up_to_date_run_records_its_stages_but_diffs_nothing(prefect_api, tmp_path: Path
                                                                ) -> None:
    """The run that ran a stage records stages, metrics and diff; the next, with nothing to
    run, records its stage table only (the latest metrics and diff stay the last run's)."""
    from flows.pipeline import pipeline

    write = "import json; json.dump({'acc': 0.5}, open('m.json', 'w'))"
    repo = make_toy_repo(tmp_path / "toy", {"score": {
        "cmd": py_stage(write), "metrics": [{"m.json": {"cache": False}}]}})
    first = pipeline(root=str(repo), return_state=True)
    assert [r["status"] for r in first.result()] == ["ran"]
    assert set(_artifacts(first.state_details.flow_run_id)) == {
        "convflow-stages", "convflow-metrics", "convflow-diff"}
    second = pipeline(root=str(repo), return_state=True)
    assert [r["status"] for r in second.result()] == ["up to date"]
    arts = _artifacts(second.state_details.flow_run_id)
    assert set(arts) == {"convflow-stages"}
    assert [r["status"] for r in json.loads(arts["convflow-stages"].data)] == ["up to date"]


def test_the_command_leaves_fast_but_only_after_its_logs_reached_the_server(
        prefect_api, tmp_path: Path) -> None:
    """``python -m flows run`` skips the interpreter's teardown (flows/__main__.py), not
    Prefect's exit hooks: the run's every log line, the last included, is on the server, and
    the exit statuses are those of ``main()`` (0, argparse's 2 for a mistake)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import FlowRunSort

    repo = make_toy_repo(tmp_path / "toy", {"one": {
        "cmd": py_stage("open('one.txt', 'w').write('1')"), "outs": ["one.txt"]}})
    cli = [sys.executable, "-m", "flows"]
    root = Path(__file__).resolve().parents[1]
    env = {**api_env(), "PREFECT_LOGGING_LEVEL": "INFO"}  # the fixture's is WARNING
    done = subprocess.run([*cli, "run", "--root", str(repo)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "one " in done.stdout and "ran" in done.stdout
    with get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(
            any_=[run.id])))
    assert run.state_type.value == "COMPLETED"
    assert any(log.message.startswith("Finished in state Completed") for log in logs), \
        [log.message for log in logs]
    wrong = subprocess.run([*cli, "run", "--no-such-option"], cwd=root, env=api_env(),
                           capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 2 and "error:" in wrong.stderr
