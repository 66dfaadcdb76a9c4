"""Team runs end to end, real processes only: a worker's run comes back to a laptop.

One set of servers for the module: SeaweedFS (S3) as the DVC remote, a bare git repository
as ``origin``, the session's ``prefect server start``, a process work pool and a
``prefect worker start`` in its own folder. The deployments come from the project's own
``prefect.yaml`` through ``prefect deploy``, given ``origin`` as a ``file://`` URL, so each
run's clone is made by the deployment's own pull steps exactly as for ``https://``: shallow.
A fresh clone stands for a laptop.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import PROJECT, dvc, git, run, subprocess_env, write_params
from prefect_fixtures import make_toy_repo
from team_fixtures import (  # noqa: F401
    clone,
    ensure_pool,
    git_url,
    make_origin,
    object_store,
    workers,
)

pytestmark = pytest.mark.slow

POOL = "gpu"  # the pool prefect.yaml names
NIGHTLY, SWEEP = "convflow-pipeline/gpu-nightly", "convflow-sweep/gpu-sweep"
RESULTS = "results/gpu-nightly"
RUN_TIMEOUT_S = 420


def run_deployment(name: str, **parameters) -> object:
    """Trigger one run of deployment ``name`` and wait until it is final; the flow run."""
    from prefect.deployments import run_deployment as trigger

    return trigger(name, parameters=parameters or None, timeout=RUN_TIMEOUT_S, poll_interval=1)


def flow_logs(run_id) -> str:
    """The log lines the Prefect API holds for a flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(
            any_=[run_id])))
    return "\n".join(entry.message for entry in logs)


def task_runs(run_id) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[run_id])))
    return {r.name: r for r in runs}


def assert_completed(flow_run, worker) -> None:
    if not flow_run.state.is_completed():
        raise AssertionError(f"run {flow_run.name}: {flow_run.state.type} "
                             f"{flow_run.state.message}\n--- flow logs\n"
                             f"{flow_logs(flow_run.id)[-6000:]}\n--- worker log\n"
                             f"{worker.log.read_text()[-4000:]}")


def remote_heads(origin: Path) -> dict[str, str]:
    """{branch: sha} of the bare origin."""
    out = git(origin, "for-each-ref", "--format=%(refname:short) %(objectname)", "refs/heads")
    return dict(line.split() for line in out.splitlines())


@pytest.fixture(scope="module")
def team(prefect_api, object_store, workers, tmp_path_factory):  # noqa: F811
    """origin + S3 remote + the deployments of prefect.yaml + one worker on pool ``gpu``."""
    folder = tmp_path_factory.mktemp("team")
    origin, src = make_origin(folder, object_store, "e2e")
    ensure_pool(POOL)
    env = subprocess_env()
    env["CONVFLOW_GIT_URL"] = git_url(origin)  # shallow, as for https (never a plain path)
    run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], cwd=src, env=env)
    worker = workers(POOL, folder / "worker-machine")
    return SimpleNamespace(origin=origin, src=src, folder=folder, worker=worker,
                           store=object_store)


def test_a_worker_run_comes_back_to_a_laptop(team):
    flow_run = run_deployment(NIGHTLY)
    assert_completed(flow_run, team.worker)
    heads = remote_heads(team.origin)
    assert RESULTS in heads, heads
    assert team.store.keys("e2e/files/md5/"), "nothing was pushed to the object store"
    assert team.store.keys("e2e/runs/"), "the run-cache was not pushed"

    laptop = clone(team.origin, team.folder / "laptop")
    git(laptop, "fetch", "-q")
    message = git(laptop, "log", "-1", "--format=%B", f"origin/{RESULTS}")
    start = git(laptop, "rev-parse", "origin/main").strip()
    assert str(flow_run.id) in message and flow_run.name in message
    assert f"Started from: {start}" in message
    parents = git(laptop, "log", "-1", "--format=%P", f"origin/{RESULTS}").split()
    assert parents == [start]

    diff = json.loads(dvc(laptop, "metrics", "diff", "main", f"origin/{RESULTS}",
                          "--json").stdout)
    accuracy = diff["metrics/evaluate.json"]["test.accuracy"]
    assert accuracy["old"] is None and 0.0 < accuracy["new"] <= 1.0
    plots = dvc(laptop, "plots", "diff", "main", f"origin/{RESULTS}", "--json").stdout
    assert "loss_history.json" in plots

    git(laptop, "checkout", "-q", RESULTS)  # tracks origin/results/gpu-nightly
    dvc(laptop, "pull")
    status = dvc(laptop, "status")
    assert "Data and pipelines are up to date." in status.stdout, status.stdout
    image = laptop / "cat.png"
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 120, 40)).save(image)
    out = run([sys.executable, "-m", "stages.predict", str(image)], cwd=laptop).stdout
    assert "cat.png" in out

    # the next nightly on an unchanged main, nobody having merged anything: it starts from
    # the results branch's lock, restores every output from the store and trains nothing
    again = run_deployment(NIGHTLY)
    assert_completed(again, team.worker)
    assert remote_heads(team.origin)[RESULTS] == heads[RESULTS]     # nothing new to commit
    logs = flow_logs(again.id)
    for stage in ("ingest", "normalize", "train", "evaluate", "plot"):
        assert f"stage '{stage}' is up to date" in logs, logs[-3000:]
    assert "Running stage" not in logs


def test_a_pushed_promotion_is_the_workers_baseline_and_a_fresh_clones_prod_model(team):
    """promote --push on a laptop; a worker's run then judges against it (gate.max_drop)."""
    from PIL import Image

    if RESULTS not in remote_heads(team.origin):
        assert_completed(run_deployment(NIGHTLY), team.worker)
    laptop = clone(team.origin, team.folder / "laptop-promote")
    out = run([sys.executable, "-m", "flows", "promote", "--push"], cwd=laptop).stdout
    assert out.strip() == "cifar-cnn@v0.0.1 -> prod"
    fresh = clone(team.origin, team.folder / "laptop-fresh")
    Image.new("RGB", (32, 32), (200, 120, 40)).save(fresh / "cat.png")
    predicted = run([sys.executable, "-m", "stages.predict", "--stage", "prod", "cat.png"],
                    cwd=fresh).stdout
    assert predicted.startswith("cat.png: "), predicted

    # main gets a much worse recipe and no drop allowed: the worker must see production
    write_params(team.src, {"train": {"lr": 1e-7, "epochs": 1}, "gate": {"max_drop": 0.0}})
    git(team.src, "commit", "-qam", "a worse recipe")
    git(team.src, "push", "-q", "origin", "main")
    worse = run_deployment(NIGHTLY, retries=0)
    assert worse.state.is_failed(), worse.state
    assert "below production cifar-cnn@v0.0.1" in worse.state.message, worse.state.message
    assert task_runs(worse.id)["gate"].state.is_failed()


#: A stage that holds while a file exists (so the test can kill the worker mid-stage).
HOLD_STAGE = """\
import json, os, sys, time
hold, started = sys.argv[1], sys.argv[2]
open(started, "w").close()
while os.path.exists(hold):
    time.sleep(0.2)
open("out.txt", "w").write("done")
json.dump({"score": 1.0}, open("m.json", "w"))
"""


def test_a_worker_killed_mid_run_leaves_nothing_half_written(  # noqa: F811
        prefect_api, object_store, workers, tmp_path):  # noqa: F811
    from prefect.client.orchestration import get_client
    from prefect.runner.storage import GitRepository
    from prefect.states import Crashed

    hold, started = tmp_path / "hold", tmp_path / "started"
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "hold.py").write_text(HOLD_STAGE)
    src = make_toy_repo(tmp_path / "src", {"slow": {
        "cmd": f"{sys.executable} hold.py {hold} {started}", "deps": ["hold.py"],
        "outs": ["out.txt"], "metrics": [{"m.json": {"cache": False}}]}})
    for name in ("flows", "stages"):
        shutil.copytree(PROJECT / name, src / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    dvc(src, "remote", "add", "-d", "storage", "s3://convflow/kill")
    dvc(src, "remote", "modify", "storage", "endpointurl", object_store.endpoint)
    git(src, "add", "-A")
    git(src, "commit", "-q", "-m", "toy pipeline for the kill test")
    origin = tmp_path / "origin.git"
    git(tmp_path, "clone", "-q", "--bare", str(src), str(origin))

    ensure_pool("kill-pool")
    from flows.pipeline import pipeline

    pipeline.from_source(source=GitRepository(url=git_url(origin), branch="main"),
                         entrypoint="flows/pipeline.py:pipeline").deploy(
        name="kill-test", work_pool_name="kill-pool", build=False, push=False,
        parameters={"pull": True, "push": True, "commit": True, "retries": 0})
    hold.touch()
    worker = workers("kill-pool", tmp_path / "machine-1", "kill-1")
    from prefect.deployments import run_deployment as trigger

    first = trigger("convflow-pipeline/kill-test", timeout=0)
    deadline = time.monotonic() + 180
    while not started.exists():
        assert time.monotonic() < deadline, worker.log.read_text()[-4000:]
        time.sleep(0.3)
    worker.stop(signal.SIGKILL)  # the machine dies in the middle of the stage
    assert "results/kill-test" not in remote_heads(origin)
    assert not object_store.keys("kill/")
    with get_client(sync_client=True) as client:  # what Prefect's zombie detection does
        client.set_flow_run_state(first.id, Crashed(message="worker killed"), force=True)

    hold.unlink()
    worker2 = workers("kill-pool", tmp_path / "machine-2", "kill-2")
    second = trigger("convflow-pipeline/kill-test", timeout=RUN_TIMEOUT_S, poll_interval=1)
    assert_completed(second, worker2)
    heads = remote_heads(origin)
    log = git(origin, "log", "--format=%s", "main..results/kill-test").splitlines()
    assert len(log) == 1 and str(second.id) in log[0], log
    files = git(origin, "ls-tree", "-r", "--name-only", heads["results/kill-test"]).split()
    assert {"dvc.lock", "m.json"} <= set(files)
    lock = yaml.safe_load(git(origin, "show", "results/kill-test:dvc.lock"))
    assert {o["path"] for o in lock["stages"]["slow"]["outs"]} == {"out.txt", "m.json"}
    assert object_store.keys("kill/files/md5/")
