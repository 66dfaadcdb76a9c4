"""docs/team.md as written: every command of its shell blocks runs, in the page's order, with
its placeholders filled by this test (bucket, endpoint, keys, image), against a team on
this machine: SeaweedFS with no bucket yet, a bare origin cloned by URL, the session's
Prefect server, a worker started by the page's own command, deployments from prefect.yaml.
A command not run is listed in SKIPPED with the reason and the test that covers it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import PROJECT, git, make_pipeline_repo, run, subprocess_env
from team_fixtures import (
    ACCESS_KEY,
    SECRET_KEY,
    WORKER_POLL,
    SeaweedFS,
    ensure_pool,
    git_url,
    stop_group,
)
from test_readme import shown_commands

pytestmark = pytest.mark.slow

PAGE = "docs/team.md"
BUCKET = "team-docs"  # not the fixtures' bucket: the page's own command must create it
SKIPPED = {
    'pip install -e ".[s3]"': "installs packages from the network",
    "dvc exp pull origin <experiment>": "a sweep on the worker: tests/test_team.py::"
                                        "test_a_sweep_on_the_worker_shows_on_the_laptop",
    "dvc exp show": "part of the sweep example: tests/test_team.py (same test)",
    "dvc exp apply <experiment> && dvc pull": "part of the sweep example: tests/test_team.py",
}


def fill(command: str, store: SeaweedFS) -> str:
    """The page's placeholders, as this test's team has them."""
    for key, value in {"<bucket>": BUCKET, "https://<your S3-compatible endpoint>":
                       store.endpoint, "<key>": ACCESS_KEY, "<secret>": SECRET_KEY}.items():
        command = command.replace(key, value)
    return command


def test_every_command_is_run_or_skipped():
    shown = [s.command for s in shown_commands(PAGE)]
    assert shown, "no shell blocks found"
    assert set(SKIPPED) <= set(shown), set(SKIPPED) - set(shown)


@pytest.fixture
def docs_team(prefect_api, tmp_path):
    """A store without the page's bucket, a bare origin (no DVC remote), a checkout of it."""
    if not shutil.which("aws"):
        pytest.skip("the page's `aws s3 mb` needs the AWS CLI")
    store = SeaweedFS(tmp_path / "weed")
    store.start()
    src = make_pipeline_repo(tmp_path / "src")
    shutil.copy2(PROJECT / "prefect.yaml", src / "prefect.yaml")
    git(src, "add", "-A")
    git(src, "commit", "-qm", "prefect.yaml")
    origin = tmp_path / "origin.git"
    git(tmp_path, "clone", "-q", "--bare", str(src), str(origin))
    checkout = tmp_path / "checkout"
    git(tmp_path, "clone", "-q", git_url(origin), str(checkout))
    try:
        yield store, origin, checkout
    finally:
        store.stop()


def shell(command: str, cwd: Path, env: dict[str, str]) -> str:
    proc = run(["bash", "-c", command], cwd=cwd, env=env, check=False)
    assert proc.returncode == 0, f"{command}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_team_md_runs_as_written(docs_team, tmp_path):
    from prefect.deployments import run_deployment

    store, origin, checkout = docs_team
    env = {**subprocess_env(), "AWS_ACCESS_KEY_ID": ACCESS_KEY,
           "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1"}
    commands = [fill(s.command, store) for s in shown_commands(PAGE)
                if s.command not in SKIPPED]
    worker_cmd = next(c for c in commands if "prefect worker start" in c)
    at = commands.index(worker_cmd)
    setup, laptop = commands[:at], commands[at + 1:]
    for command in setup:
        shell(command, checkout, env)
    ensure_pool("gpu")  # step 5 (inline): prefect work-pool create gpu --type process
    machine = tmp_path / "gpu-machine"
    machine.mkdir()
    worker_env = {**subprocess_env(), **WORKER_POLL,
                  "PREFECT_LOGGING_LEVEL": "INFO"}  # the run's logs in worker.log
    with (machine / "worker.log").open("w") as log:
        worker = subprocess.Popen(["bash", "-c", worker_cmd], cwd=machine, env=worker_env,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # step 7 (inline): CONVFLOW_GIT_URL=<git URL of the repo> prefect deploy --all
        shell(f"CONVFLOW_GIT_URL={git_url(origin)} prefect --no-prompt deploy --all",
              checkout, env)
        flow_run = run_deployment("convflow-pipeline/gpu-nightly", timeout=420,
                                  poll_interval=1)
        assert flow_run.state.is_completed(), (flow_run.state,
                                               (machine / "worker.log").read_text()[-4000:])
    finally:
        stop_group(worker)
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 120, 40)).save(checkout / "my_image.png")
    outputs = {c: shell(c, checkout, env) for c in laptop}
    assert "test.accuracy" in outputs["dvc metrics diff main origin/results/gpu-nightly"]
    assert "my_image.png: " in outputs["python -m stages.predict my_image.png"]
    # the keep-it line moved origin's main to the results commit
    assert git(origin, "rev-parse", "main") == git(origin, "rev-parse", "results/gpu-nightly")
