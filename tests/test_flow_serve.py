"""``python -m flows serve``: a scheduled deployment on a real Prefect server, one run at a time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect_fixtures import api_env, make_toy_repo, py_stage

FLOW = "convflow-pipeline"
#: A stage DVC always runs, slow enough for a second run to arrive while it is running.
SLOW = {"cmd": py_stage("import time; time.sleep(3); open('w.txt', 'w').write('x')"),
        "always_changed": True, "outs": [{"w.txt": {"cache": False}}]}


def gated(release: Path) -> dict:
    """Like SLOW, but it holds its run open until ``release`` exists (at most 120 s).

    A fixed sleep raced on a loaded CI machine: the first run could finish before the
    runner even submitted the second, so nothing collided and both completed.
    """
    code = (f"import os, time; any(os.path.exists({str(release)!r}) or time.sleep(0.2) "
            "for _ in range(600)); open('w.txt', 'w').write('x')")  # one line: a DVC cmd
    return {**SLOW, "cmd": py_stage(code)}


def _serve(repo: Path, name: str, collision: str, log: Path) -> subprocess.Popen:
    env = api_env()
    env["PREFECT_RUNNER_POLL_FREQUENCY"] = "1"  # pick up triggered runs within a second
    return subprocess.Popen(
        [sys.executable, "-m", "flows", "serve", "--root", str(repo), "--interval", "3600",
         "--name", name, "--collision", collision],
        cwd=Path(__file__).resolve().parents[1], env=env, stdout=log.open("w"),
        stderr=subprocess.STDOUT, start_new_session=True)


def _wait_deployment(name: str, server: subprocess.Popen, log: Path, timeout_s: float = 90):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            try:
                return client.read_deployment_by_name(f"{FLOW}/{name}")
            except ObjectNotFound:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"no deployment {name}:\n{log.read_text()}") from None
                time.sleep(0.5)


def _wait_final(ids: list[UUID], timeout_s: float = 120, *, every: bool = True) -> list:
    """The runs once all of them (or, with ``every=False``, any one) reached a final state."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            runs = [client.read_flow_run(i) for i in ids]
            final = [r for r in runs if r.state and r.state.is_final()]
            if (every and len(final) == len(runs)) or (not every and final):
                return runs if every else final
            if time.monotonic() > deadline:
                raise AssertionError(f"runs not final: {[r.state for r in runs]}")
            time.sleep(0.5)


@pytest.fixture
def served(prefect_api, tmp_path) -> Iterator[dict[str, Any]]:
    """Two served deployments of a slow toy pipeline: limit 1, ENQUEUE and CANCEL_NEW.

    The CANCEL_NEW pipeline's stage waits for ``tmp_path / "release"`` to appear.
    """
    procs, out = [], {}
    try:
        for collision in ("enqueue", "cancel"):
            stage = SLOW if collision == "enqueue" else gated(tmp_path / "release")
            repo = make_toy_repo(tmp_path / collision, {"wait": stage})
            log = tmp_path / f"serve-{collision}.log"
            procs.append((_serve(repo, f"test-{collision}", collision, log), log, repo))
        for (proc, log, repo), collision in zip(procs, ("enqueue", "cancel"), strict=True):
            out[collision] = (repo, _wait_deployment(f"test-{collision}", proc, log))
        out["release"] = tmp_path / "release"
        yield out
    finally:
        (tmp_path / "release").touch()  # never leave a gated run waiting
        for proc, _, _ in procs:
            os.killpg(proc.pid, signal.SIGINT)  # like Ctrl-C: pauses the schedule, exits
        for proc, _, _ in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow  # two served deployments, four runs, one after another (~40 s)
def test_served_deployment_has_a_schedule_and_a_limit_and_runs_never_overlap(served):
    from prefect.deployments import run_deployment

    repo, deployment = served["enqueue"]
    assert deployment.schedules and deployment.schedules[0].active
    assert deployment.schedules[0].schedule.interval == timedelta(hours=1)
    assert deployment.global_concurrency_limit.limit == 1
    assert deployment.concurrency_options.collision_strategy == "ENQUEUE"
    assert deployment.parameters["root"] == str(repo)

    # two runs triggered through the API at once: the second waits for the first
    ids = [run_deployment(f"{FLOW}/test-enqueue", timeout=0).id for _ in range(2)]
    cancel_ids = [run_deployment(f"{FLOW}/test-cancel", timeout=0).id for _ in range(2)]
    runs = sorted(_wait_final(ids), key=lambda r: r.start_time)
    assert [r.state.type.value for r in runs] == ["COMPLETED", "COMPLETED"]
    assert runs[0].end_time <= runs[1].start_time, "runs overlapped"
    assert (repo / "w.txt").read_text() == "x"

    # with --collision cancel, the run that would overlap is cancelled instead: the
    # first one holds the slot until released, so the second must collide with it
    first_final = _wait_final(cancel_ids, every=False)[0]
    assert first_final.state.type.value == "CANCELLED", first_final.state
    served["release"].touch()
    cancelled = _wait_final(cancel_ids)
    assert sorted(r.state.type.value for r in cancelled) == ["CANCELLED", "COMPLETED"]
