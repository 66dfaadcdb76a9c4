"""A no-op run is cheap: an up-to-date pipeline's run skips what nothing needs.

Against a real Prefect API (``prefect_api``), on a toy DVC pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect_fixtures import make_toy_repo, py_stage


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
