"""Guardrails on a real Prefect server: resource slots, progress, run-graph edges, alerts."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from typing import Any

import pytest
import yaml
from conftest import PROJECT, git
from prefect_fixtures import api_env, make_toy_repo, py_stage
from test_flow import run_flow, task_runs


def _slot(name: str) -> Any:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(name)


def _train_stage(code: str, outs: list[str]) -> dict[str, Any]:
    return {"cmd": py_stage(code), "outs": outs}


# a 'train' stage that records when it really ran (wall clock); it holds on until the test
# saw the run beside it wait for the slot (GO exists), so a slow start cannot miss it
TIMED_TRAIN = ("import os, time; t0 = time.time(); [time.sleep(0.1) for _ in iter("
               "lambda: os.path.exists(go) or time.time() > t0 + 120, True)]; "
               "time.sleep(1); open('times.txt', 'w').write(f'{t0} {time.time()}')")


@pytest.mark.slow  # a real end-to-end run: over ~30 s on 2 cores
def test_training_stages_share_one_slot_never_overlap_and_free_it(prefect_api, tmp_path):
    slot = f"test-gpu-{uuid.uuid4().hex[:8]}"
    env = {**api_env(), "CONVFLOW_SLOT": slot, "CONVFLOW_SLOT_SIZE": "1",
           "CONVFLOW_SLOT_NOTICE_S": "0.2", "PREFECT_LOGGING_LEVEL": "INFO"}
    go = tmp_path / "go"
    repos = [make_toy_repo(tmp_path / f"r{i}", {"train": _train_stage(
        f"go = {str(go)!r}; {TIMED_TRAIN}", ["times.txt"])}) for i in (1, 2)]
    # two flow runs, as two processes (as a schedule and a worker would be), started together
    logs_at = [tmp_path / f"r{i}.log" for i in (1, 2)]
    procs = [subprocess.Popen([sys.executable, "-m", "flows", "run", "--root", str(repo),
                               "--retries", "0"], cwd=PROJECT, env=env, text=True,
                              stdout=log.open("w"), stderr=subprocess.STDOUT)
             for repo, log in zip(repos, logs_at, strict=True)]
    deadline = time.monotonic() + 60
    while not any("waits for a slot" in log.read_text() for log in logs_at):
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            break  # the assertions below say what went wrong
        time.sleep(0.2)
    go.touch()
    for proc in procs:
        proc.wait(timeout=240)
    outputs = [log.read_text() for log in logs_at]
    assert [p.returncode for p in procs] == [0, 0], outputs
    (a0, a1), (b0, b1) = (map(float, (r / "times.txt").read_text().split()) for r in repos)
    assert a1 <= b0 or b1 <= a0, f"training overlapped: {(a0, a1)} vs {(b0, b1)}"
    logs = "\n".join(outputs)
    assert logs.count(f"took a slot of '{slot}'") == 2
    assert f"waits for a slot of '{slot}' (1/1 in use)" in logs  # the second one said so
    assert _slot(slot).active_slots == 0

    # a run killed by its timeout gives its slot back
    hang = make_toy_repo(tmp_path / "hang", {"train": _train_stage(
        "import time; time.sleep(120)", ["never.txt"])})
    proc = subprocess.run([sys.executable, "-m", "flows", "run", "--root", str(hang),
                           "--retries", "0", "--timeout", "3"], cwd=PROJECT, env=env,
                          text=True, capture_output=True, timeout=120)
    assert proc.returncode == 1 and "timed out after 3" in proc.stderr, proc.stderr
    assert _slot(slot).active_slots == 0


# a 'train' stage that logs epochs with dvclive, like stages/train.py
DVCLIVE_TRAIN = """\
import time, yaml
from dvclive import Live

n = yaml.safe_load(open("params.yaml"))["train"]["epochs"]
live = Live("live", save_dvc_exp=False, dvcyaml=None, report=None)
for epoch in range(1, n + 1):
    time.sleep(1.5)
    live.step = epoch
    live.log_metric("train/acc", epoch / 10)
    live.make_summary()
live.end()
open("model.txt", "w").write("m")
"""
COPY = "import sys, shutil; shutil.copy(sys.argv[1], sys.argv[2])"


#: A gate stage as stages/gate.py writes it, failing: a reason far wider than a window.
FAILED_GATE = {"passed": False, "metric": "test.accuracy", "value": 0.3, "min_accuracy": 0.9,
               "max_drop": 0.02, "production_version": None, "production_accuracy": None,
               "drop": None, "reason": "test.accuracy 0.3000 is below gate.min_accuracy "
                                       "0.9000 " + "(a long explanation) " * 20}


def test_a_gate_failed_run_reads_back_as_a_failed_gate_task_and_one_of_each_artifact(
        prefect_api, tmp_path, monkeypatch):
    """What the UI shows, read back from the API: the gate task FAILED, one progress
    artifact and one epochs table (updated in place), a diff with no over-wide cell."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.progress import EPOCHS_KEY, PROGRESS_KEY

    monkeypatch.setenv("CONVFLOW_SLOT", "off")
    gate = (f"import json, os; os.makedirs('metrics', exist_ok=True); "
            f"json.dump({FAILED_GATE!r}, open('metrics/gate.json', 'w'))")
    stages = {
        "prep": {"cmd": py_stage("open('p.txt', 'w').write('p')"), "outs": ["p.txt"]},
        "train": {"cmd": f"{sys.executable} train.py", "deps": ["p.txt", "train.py"],
                  "params": ["train.epochs"], "outs": ["model.txt"],
                  "metrics": [{"live/metrics.json": {"cache": False}}],
                  "plots": [{"live/plots": {"cache": False}}]},
        "report": {"cmd": f"{py_stage(COPY)} model.txt r.txt", "deps": ["model.txt"],
                   "outs": ["r.txt"]},
        "side": {"cmd": f"{py_stage(COPY)} p.txt s.txt", "deps": ["p.txt"],
                 "outs": ["s.txt"]},
        "gate": {"cmd": py_stage(gate), "deps": ["r.txt"],
                 "metrics": [{"metrics/gate.json": {"cache": False}}]},
    }
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "train.py").write_text(DVCLIVE_TRAIN)
    repo = make_toy_repo(tmp_path / "toy", stages, {"train": {"epochs": 3}})
    doc = yaml.safe_load((repo / "dvc.yaml").read_text())
    (repo / "dvc.yaml").write_text(yaml.safe_dump(
        {"vars": [{"paths": {"train_live": "live", "metrics": "metrics"}}], **doc},
        sort_keys=False))
    git(repo, "commit", "-qam", "paths")

    state = run_flow(repo, retries=0)
    assert state.is_failed() and "quality gate failed" in str(state.message), state.message
    run_id = state.state_details.flow_run_id
    runs = task_runs(run_id)
    assert runs["gate"].state.is_failed(), runs["gate"].state    # red in the run graph
    assert all(runs[n].state.is_completed() for n in ("prep", "train", "report", "side"))
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    progress = [a for a in arts if a.type == "progress"]
    tables = [a for a in arts if a.key == EPOCHS_KEY]
    assert len(progress) == 1 and progress[0].key == PROGRESS_KEY
    assert float(progress[0].data) == 100.0
    assert len(tables) == 1, [t.description for t in tables]   # one card, not one per epoch
    rows = json.loads(tables[0].data)
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[-1]["train/acc"] == 0.3
    assert tables[0].updated > tables[0].created, "the table was not updated in place"
    assert {a.task_run_id for a in progress + tables} == {runs["train"].id}
    diff = next(a.data for a in arts if a.key == "convflow-diff")
    assert "**Gate: failed**" in diff
    widest = max(len(line) for line in diff.splitlines() if line.startswith("|"))
    assert widest < 160, diff                                  # fits a 1,600-px window

    # the run graph: each task waits for exactly its DVC upstream stages
    runs = task_runs(run_id)
    by_id = {run.id: name for name, run in runs.items()}
    upstream = {name: sorted(by_id[i.id] for i in run.task_inputs.get("wait_for", []))
                for name, run in runs.items()}
    assert upstream == {"prep": [], "train": ["prep"], "report": ["train"], "side": ["prep"],
                        "gate": ["report"]}


@pytest.mark.slow
def test_gate_blocks_shipping_and_a_passing_run_is_registered_promoted_and_fetched(
        prefect_api, tmp_path):
    """The real pipeline: a missed gate ships nothing; a passing run becomes v0.0.1, then
    prod, and a fresh clone predicts with the production model."""
    import re

    from conftest import make_pipeline_repo, run, write_params
    from PIL import Image

    from flows.runner import StageFailed

    repo = make_pipeline_repo(tmp_path / "repo", {"gate": {"min_accuracy": 0.99}})
    doc = yaml.safe_load((repo / "dvc.yaml").read_text())
    del doc["stages"]["plot"]  # figures play no part here; keep the test short
    (repo / "dvc.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    remote, origin = tmp_path / "dvc-remote", tmp_path / "origin.git"
    git(tmp_path, "init", "-q", "--bare", "-b", "main", str(origin))
    from conftest import dvc

    dvc(repo, "remote", "add", "-d", "store", str(remote))
    git(repo, "remote", "add", "origin", str(origin))
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "remote, no plot")
    git(repo, "push", "-q", "origin", "main")
    start = git(repo, "rev-parse", "HEAD")

    failed = run_flow(repo, push=True, commit=True, retries=0)
    assert failed.is_failed()
    line = str(failed.message).splitlines()
    assert len(line) == 1 and re.search(
        r"stage 'gate' failed: quality gate failed: test\.accuracy 0\.\d{4} is below "
        r"gate\.min_accuracy 0\.9900$", line[0]), failed.message
    with pytest.raises(StageFailed):
        failed.result()
    assert git(repo, "rev-parse", "HEAD") == start          # nothing committed
    assert not remote.exists() or not any(remote.rglob("*"))  # nothing pushed
    assert git(repo, "tag", "-l") == ""                       # nothing registered

    write_params(repo, {"gate": {"min_accuracy": 0.0}})
    passed = run_flow(repo, push=True, commit=True, retries=0)
    assert passed.is_completed(), passed.message
    ran = {row["stage"]: row["status"] for row in passed.result()}
    assert ran["gate"] == "ran" and ran["train"] == "up to date"
    assert git(repo, "tag", "-l").split() == ["cifar-cnn@v0.0.1"]
    assert git(repo, "rev-parse", "cifar-cnn@v0.0.1^{commit}") == git(repo, "rev-parse", "HEAD")

    proc = run([sys.executable, "-m", "flows", "promote", "--root", str(repo), "--push"],
               cwd=PROJECT, env=api_env())
    assert proc.stdout.strip() == "cifar-cnn@v0.0.1 -> prod"
    baseline = yaml.safe_load((repo / "production.yaml").read_text())
    accuracy = json.loads((repo / "metrics" / "evaluate.json").read_text())["test"]["accuracy"]
    assert baseline["version"] == "cifar-cnn@v0.0.1" and baseline["accuracy"] == accuracy
    git(repo, "push", "-q", "origin", "main")

    laptop = tmp_path / "laptop"
    git(tmp_path, "clone", "-q", str(origin), str(laptop))
    image = laptop / "cat.png"
    Image.new("RGB", (40, 40), (200, 120, 40)).save(image)
    env = {**api_env(), "PYTHONPATH": str(laptop)}
    out = run([sys.executable, "-m", "stages.predict", "--stage", "prod", str(image)],
              cwd=laptop, env=env).stdout
    assert re.fullmatch(rf"{re.escape(str(image))}: (\w+ \d\.\d{{3}}(, )?){{3}}\n", out), out
    assert (laptop / ".dvc" / "tmp" / "registry" / "prod" / "model.pt").is_file()


def test_sweep_points_take_a_slot_each_and_their_own_gpu(prefect_api, tmp_path, monkeypatch):
    from conftest import dvc

    from flows.slots import DevicePool
    from flows.sweep import sweep

    # each experiment of a multi-GPU sweep gets its own device while it runs
    pool = DevicePool(["0", "1"])
    with pool.device() as first, pool.device() as second:
        assert {first["CUDA_VISIBLE_DEVICES"], second["CUDA_VISIBLE_DEVICES"]} == {"0", "1"}
    with DevicePool([]).device() as none:
        assert none == {}  # a CPU machine: nothing set

    slot = f"test-sweep-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("CONVFLOW_SLOT", slot)
    monkeypatch.setenv("CONVFLOW_SLOT_SIZE", "1")
    times = tmp_path / "times"
    times.mkdir()
    # the experiment runs in a temp workspace: it records its wall-clock span outside it
    record = ("import os, time, yaml; t0 = time.time(); time.sleep(2); "
              "n = yaml.safe_load(open('params.yaml'))['a']['n']; "
              f"open(os.path.join({str(times)!r}, str(n)), 'w').write(f'{{t0}} {{time.time()}}'); "
              "open('out.txt', 'w').write(str(n))")
    repo = make_toy_repo(tmp_path / "toy", {"train": {"cmd": py_stage(record),
                                                      "params": ["a.n"], "outs": ["out.txt"]}})
    dvc(repo, "repro")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "baseline")
    for old in times.iterdir():
        old.unlink()

    rows = sweep({"a.n": [2, 3]}, root=str(repo), max_parallel=2, name_prefix="slot")
    assert sorted(r["experiment"] for r in rows) == ["slot-1", "slot-2"]
    (a0, a1), (b0, b1) = (map(float, (times / n).read_text().split()) for n in ("2", "3"))
    assert a1 <= b0 or b1 <= a0, f"experiments overlapped: {(a0, a1)} vs {(b0, b1)}"
    assert _slot(slot).active_slots == 0
