"""The pipeline flow's own logic, against a real Prefect API, on tiny toy DVC pipelines.

Toy stages (``python -c`` one-liners) keep these fast and let a test make a stage fail,
hang or appear; ``test_flow_pipeline.py`` runs the real convflow pipeline.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from conftest import dvc, git
from prefect_fixtures import add_stage, make_toy_repo, py_stage

WRITE_ONE = ("import yaml; n = yaml.safe_load(open('params.yaml'))['a']['n']; "
             "open('one.txt', 'w').write(str(n))")
COPY = "import sys, shutil; shutil.copy(sys.argv[1], sys.argv[2])"


def copy_stage(src: str, dst: str) -> dict[str, Any]:
    return {"cmd": f"{py_stage(COPY)} {src} {dst}", "deps": [src], "outs": [dst]}


def toy_stages() -> dict[str, Any]:
    return {"one": {"cmd": py_stage(WRITE_ONE), "params": ["a.n"], "outs": ["one.txt"]},
            "two": copy_stage("one.txt", "two.txt")}


def statuses(summary: list[dict[str, Any]]) -> dict[str, str]:
    return {row["stage"]: row["status"] for row in summary}


def task_runs(flow_run_id: UUID) -> dict[str, Any]:
    """The task runs the Prefect API recorded for a flow run, by name."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name: run for run in runs}


def run_flow(root: Path, **kw: Any) -> Any:
    """Run the pipeline flow; its final state (raises nothing)."""
    from flows.pipeline import pipeline

    return pipeline(root=str(root), return_state=True, **kw)


def test_stage_graph_comes_from_dvc_and_a_new_stage_becomes_a_task(prefect_api, tmp_path):
    from flows.pipeline import stage_graph

    repo = make_toy_repo(tmp_path / "toy", toy_stages())
    assert [n.name for n in stage_graph(repo)] == ["one", "two"]

    first = run_flow(repo)
    assert first.is_completed()
    assert statuses(first.result()) == {"one": "ran", "two": "ran"}
    assert set(task_runs(first.state_details.flow_run_id)) == {"one", "two"}

    # a stage added to dvc.yaml only, no code change: it is a task of the next run
    add_stage(repo, "three", copy_stage("two.txt", "three.txt"))
    second = run_flow(repo)
    assert statuses(second.result()) == {"one": "up to date", "two": "up to date",
                                         "three": "ran"}
    runs = task_runs(second.state_details.flow_run_id)
    assert set(runs) == {"one", "two", "three"}
    assert all(run.state.is_completed() for run in runs.values())
    assert (repo / "three.txt").read_text() == "1"


def test_artifacts_hold_the_stage_summary_metrics_and_diff(prefect_api, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    stages = toy_stages()
    stages["score"] = {
        "cmd": py_stage("import json; n = int(open('two.txt').read()); "
                        "json.dump({'acc': n / 10}, open('m.json', 'w'))"),
        "deps": ["two.txt"], "metrics": [{"m.json": {"cache": False}}]}
    repo = make_toy_repo(tmp_path / "toy", stages)
    dvc(repo, "remote", "add", "-d", "store", str(tmp_path / "remote"))
    # the flow pushes to the default remote, then commits dvc.lock, params and metrics
    assert run_flow(repo, push=True, commit=True).is_completed()
    assert list((tmp_path / "remote").rglob("*")), "dvc push sent nothing"
    assert git(repo, "log", "-1", "--format=%s").startswith("convflow: pipeline run ")
    assert "dvc.lock" in git(repo, "show", "--name-only", "--format=", "HEAD").split()
    (repo / "params.yaml").write_text("a:\n  n: 7\n")
    state = run_flow(repo)
    assert statuses(state.result())["score"] == "ran"

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    by_key = {a.key: a for a in arts}
    assert set(by_key) == {"convflow-stages", "convflow-metrics", "convflow-diff"}
    assert json.loads(by_key["convflow-metrics"].data) == [
        {"file": "m.json", "metric": "acc", "value": 0.7}]
    diff = by_key["convflow-diff"].data
    assert "| params.yaml | a.n | 1 | 7 |" in diff          # params vs the last commit
    assert "| m.json | acc | 0.1 | 0.7 | 0.6 |" in diff     # metrics vs the last commit
    assert [(r["stage"], r["status"]) for r in json.loads(by_key["convflow-stages"].data)] == [
        ("one", "ran"), ("two", "ran"), ("score", "ran")]


def test_failing_stage_fails_the_flow_with_its_message_and_stops_downstream(
        prefect_api, tmp_path):
    from flows.runner import StageFailed

    stages = toy_stages()
    stages["bad"] = {"cmd": py_stage(
        # like stages.errors.run_cli: a message, its indented details, exit status 2
        "import sys; sys.stderr.write('convflow: error: invalid parameters:\\n"
        "  params.yaml: a.n must be 0 or more\\n'); sys.exit(2)"),
        "deps": ["one.txt"], "outs": ["bad.txt"]}
    stages["after_bad"] = copy_stage("bad.txt", "after.txt")
    repo = make_toy_repo(tmp_path / "toy", stages)

    state = run_flow(repo, retries=2, retry_delay_s=0, retry_stages=["bad"])
    assert state.is_failed()
    assert state.message.endswith("stage 'bad' failed: convflow: error: invalid parameters: "
                                  "params.yaml: a.n must be 0 or more")
    with pytest.raises(StageFailed, match="a.n must be 0 or more"):
        state.result()
    runs = task_runs(state.state_details.flow_run_id)
    assert "after_bad" not in runs                  # downstream never started
    assert runs["bad"].state.is_failed()
    assert runs["bad"].run_count == 1               # exit 2 is a user error: no retry
    assert runs["two"].state.is_completed()         # not downstream of 'bad': still ran
    assert not (repo / "after.txt").exists()


def test_transient_download_failure_is_retried_with_backoff(prefect_api, tmp_path):
    # like ingest on a network failure: exit 75 (EX_TEMPFAIL) once, then succeed
    flaky = ("import pathlib, sys; p = pathlib.Path('attempts'); "
             "n = int(p.read_text()) + 1 if p.exists() else 1; p.write_text(str(n)); "
             "sys.stderr.write('convflow.ingest: error: connection reset\\n') if n == 1 else 0; "
             "sys.exit(75) if n == 1 else open('raw.txt', 'w').write('data')")
    repo = make_toy_repo(tmp_path / "toy", {
        "ingest": {"cmd": py_stage(flaky), "outs": ["raw.txt"]},
        "next": copy_stage("raw.txt", "next.txt")})
    state = run_flow(repo, retries=2, retry_delay_s=0)
    assert state.is_completed(), state.message
    assert (repo / "attempts").read_text() == "2"
    runs = task_runs(state.state_details.flow_run_id)
    assert runs["ingest"].run_count == 2 and runs["next"].state.is_completed()


def test_only_tempfail_and_stalled_downloads_are_transient():
    from flows.runner import command_status, is_transient

    assert is_transient("ingest", 75, False)          # ingest: a network failure
    assert is_transient("ingest", None, True)         # a stalled download
    assert not is_transient("train", None, True)      # a slow training run stays slow
    assert not is_transient("ingest", 2, False)       # user error: bad params, checksum
    assert not is_transient("ingest", -9, False)      # the OOM killer
    assert not is_transient("train", 2, False)        # a non-finite loss is a user error
    assert not is_transient("train", 1, False)        # a crash repeats on the same inputs
    # DVC itself exits 255; the stage's own status is in its message
    out = "ERROR: failed to reproduce 'x': failed to run: python -m stages.x, exited with 75"
    assert command_status(out, 255) == 75 and command_status("", 255) == 255


def test_timeout_kills_the_stage_process_group(prefect_api, tmp_path):
    # the stage starts a grandchild that keeps writing, then hangs
    hang = ("import subprocess, sys, time; "
            "g = subprocess.Popen([sys.executable, '-c', "
            "'import time\\nwhile True:\\n open(\"ticks\", \"a\").write(\"x\"); "
            "time.sleep(0.05)']); "
            "open('grandchild.pid', 'w').write(str(g.pid)); time.sleep(120)")
    repo = make_toy_repo(tmp_path / "toy", {"slow": {"cmd": py_stage(hang), "outs": ["s.txt"]},
                                            "after": copy_stage("s.txt", "a.txt")})
    start = time.monotonic()
    state = run_flow(repo, timeout_s=3, retries=0)
    assert state.is_failed() and "timed out after 3" in state.message
    assert time.monotonic() - start < 30
    pid = int((repo / "grandchild.pid").read_text())
    time.sleep(0.5)
    size = (repo / "ticks").stat().st_size
    time.sleep(1.0)
    assert (repo / "ticks").stat().st_size == size, "an orphan kept writing"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert "after" not in task_runs(state.state_details.flow_run_id)


def test_flow_finds_the_root_from_any_cwd(prefect_api, tmp_path, monkeypatch):
    repo = make_toy_repo(tmp_path / "toy", toy_stages())
    (repo / "sub").mkdir()
    monkeypatch.chdir(repo / "sub")  # inside the checkout, below its root
    from flows.pipeline import pipeline

    assert statuses(pipeline()) == {"one": "ran", "two": "ran"}
    assert Path.cwd() == (repo / "sub").resolve(), "the flow left the caller in another cwd"


def test_prefect_yaml_deployments_are_valid_and_never_overlap():
    import yaml
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.flows import load_flow_from_entrypoint

    root = Path(__file__).resolve().parents[1]
    spec = PrefectYamlModel.model_validate(yaml.safe_load((root / "prefect.yaml").read_text()))
    deployments = {d.name: d for d in spec.deployments}
    assert set(deployments) == {"gpu-nightly", "gpu-sweep", "gpu-sweep-point", "gpu-multinode",
                                "gpu-multinode-node"}
    nightly = deployments["gpu-nightly"]
    assert nightly.concurrency_limit.limit == 1
    assert nightly.concurrency_limit.collision_strategy == "ENQUEUE"
    assert nightly.schedules[0].cron == "0 3 * * *"
    for d in deployments.values():
        assert d.work_pool.name == "gpu"
        flow_obj = load_flow_from_entrypoint(str(root / d.entrypoint))
        # every parameter the deployment sets is one the flow takes
        assert set(d.parameters) <= set(flow_obj.parameters.properties), d.name
    # the deployments a parent submits exist under the names it submits them by
    for parent, child in (("gpu-sweep", "gpu-sweep-point"), ("gpu-multinode",
                                                            "gpu-multinode-node")):
        target = deployments[parent].parameters.get("point_deployment") \
            or deployments[parent].parameters["node_deployment"]
        flow_obj = load_flow_from_entrypoint(str(root / deployments[child].entrypoint))
        assert target == f"{flow_obj.name}/{child}", parent


def test_cli_outside_a_checkout_is_one_clear_line(tmp_path: Path) -> None:
    """A wrong --root stops before any flow run starts: one line, exit 2, no traceback."""
    from conftest import run

    for command in (["run"], ["sweep", "-S", "train.lr=0.1"]):
        proc = run([sys.executable, "-m", "flows", *command, "--root", str(tmp_path)],
                   cwd=tmp_path, check=False)
        assert proc.returncode == 2, proc.stderr
        assert f"convflow.flow: error: no dvc.yaml found in {tmp_path}" in proc.stderr
        assert "Traceback" not in proc.stderr
