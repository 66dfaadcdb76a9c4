"""``python -m flows``: every failure a user meets is one line, and no stage outlives the flow."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PROJECT, dvc, run
from prefect_fixtures import api_env, make_toy_repo, py_stage

USER_ERROR = ("import sys; sys.stderr.write('convflow.train: error: invalid parameters:\\n"
              "  params.yaml: a.n must be 0 or more\\n'); sys.exit(2)")


def flows_cli(*args: str, cwd: Path = PROJECT) -> subprocess.CompletedProcess:
    """``python -m flows args...``, its output captured."""
    return run([sys.executable, "-m", "flows", *args], cwd=cwd, check=False, env=api_env())


def assert_one_line(proc: subprocess.CompletedProcess, status: int, *needles: str) -> str:
    """Exit ``status``, one ``convflow.flow: error:`` line (the last), no traceback."""
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("convflow.flow: error:")]
    assert proc.returncode == status, proc.stderr
    assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0]), proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    assert " | ERROR   | " not in proc.stderr, proc.stderr  # Prefect's repeats of the error
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def test_bad_options_and_sweep_values_are_one_line_before_prefect(tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(PROJECT / name, checkout / name)
    root = ["--root", str(checkout)]
    assert_one_line(flows_cli("run", "--timeout", "abc", *root), 2,
                    "--timeout: invalid float value: 'abc'")
    assert_one_line(flows_cli("run", "--timeout", "-1", *root), 2,
                    "--timeout must be a positive number")
    assert_one_line(flows_cli("frobnicate"), 2, "invalid choice: 'frobnicate'")
    assert_one_line(flows_cli("run", "--promote", "prod", *root), 2,
                    "--promote prod needs --commit")
    assert_one_line(flows_cli("sweep", "-S", "train.lr", *root), 2, "expected key=value")
    # the schema judges every point before any experiment starts
    assert_one_line(flows_cli("sweep", "-S", "train.lr=0.1,abc", *root), 2,
                    "-S train.lr=abc: train.lr: Input should be a valid number")
    assert_one_line(flows_cli("sweep", "-S", "train.epoch=3", *root), 2,
                    "unknown key 'train.epoch'")
    assert_one_line(flows_cli("sweep", "-S", "train.lr.x=1", *root), 2,
                    "-S train.lr.x=1: 'train.lr' is a value, not a group of keys")
    bad_wait = run([sys.executable, "-m", "flows", "run", *root], cwd=PROJECT, check=False,
                   env={**api_env(), "CONVFLOW_SLOT_WAIT_S": "soon"})
    assert_one_line(bad_wait, 2, "CONVFLOW_SLOT_WAIT_S='soon': expected a number of seconds")
    bad_setting = run([sys.executable, "-m", "flows", "run", *root], cwd=PROJECT, check=False,
                      env={**api_env(), "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "5"})
    assert_one_line(bad_setting, 2, "FlowsSettings.heartbeat_frequency = '5'",
                    "greater than or equal to 30")


def test_a_stage_user_error_and_a_broken_dvc_yaml_are_one_line(prefect_api, tmp_path) -> None:
    repo = make_toy_repo(tmp_path / "toy", {
        "bad": {"cmd": py_stage(USER_ERROR), "params": ["a.n"], "outs": ["bad.txt"]}})
    proc = flows_cli("run", "--root", str(repo), "--retries", "0")
    assert_one_line(proc, 2, "stage 'bad' failed: convflow.train: error: invalid parameters: "
                             "params.yaml: a.n must be 0 or more")

    (repo / "dvc.yaml").write_text("stages:\n  bad: [\n")
    assert_one_line(flows_cli("run", "--root", str(repo)), 2,
                    "dvc: unable to read: 'dvc.yaml', YAML file structure is corrupted")


def test_a_failed_dvc_push_is_one_line(prefect_api, tmp_path) -> None:
    repo = make_toy_repo(tmp_path / "toy", {
        "one": {"cmd": py_stage("open('one.txt', 'w').write('1')"), "outs": ["one.txt"]}})
    (tmp_path / "not-a-dir").write_text("x")  # a remote DVC cannot write into
    dvc(repo, "remote", "add", "-d", "store", str(tmp_path / "not-a-dir" / "remote"))
    proc = flows_cli("run", "--root", str(repo), "--push")
    assert_one_line(proc, 1, "step 'dvc push' failed: ERROR: ", "Not a directory")


def test_dvc_reporting_an_error_with_exit_0_is_a_failure() -> None:
    from flows.runner import dvc_failure

    # DVC can log a failed cache transfer and still exit 0: the flow does not trust the 0
    output = ("Running stage 'big':\n> python make.py\n"
              "ERROR: failed to transfer 'md5: 5148a9a6' - [Errno 28] No space left on device\n"
              "Updating lock file 'dvc.lock'\n")
    assert dvc_failure(output, 0) == ("ERROR: failed to transfer 'md5: 5148a9a6' - [Errno 28] "
                                      "No space left on device")
    assert dvc_failure("Running stage 'x':\nUpdating lock file 'dvc.lock'\n", 0) is None
    assert dvc_failure("ERROR: failed to reproduce 'x': boom\n", 255) == \
        "ERROR: failed to reproduce 'x': boom"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting for its parent to reap it runs no code
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except FileNotFoundError:
        return False  # reaped since the signal test
    return state != "Z"


def test_sigkill_of_the_flow_leaves_no_stage_running(prefect_api, tmp_path) -> None:
    slow = ("import os, subprocess, sys, time; "
            "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
            "open('pids', 'w').write(f'{os.getppid()} {os.getpid()} {g.pid}'); "
            "time.sleep(120)")
    repo = make_toy_repo(tmp_path / "toy", {"slow": {"cmd": py_stage(slow), "outs": ["s.txt"]}})
    flow_proc = subprocess.Popen([sys.executable, "-m", "flows", "run", "--root", str(repo)],
                                 cwd=PROJECT, env=api_env(), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True)
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 90
        while not (repo / "pids").exists() or len((repo / "pids").read_text().split()) < 3:
            assert flow_proc.poll() is None and time.monotonic() < deadline, "no stage started"
            time.sleep(0.2)
        pids = [int(p) for p in (repo / "pids").read_text().split()]  # dvc, stage, grandchild
        assert all(_alive(p) for p in pids)
        flow_proc.kill()  # SIGKILL: the flow gets no chance to clean up
        flow_proc.wait()
        deadline = time.monotonic() + 20  # the guard's grace period (10 s) and some
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [p for p in pids if _alive(p)]
        assert not left, "a stage process outlived the flow:\n" + _process_table(left)
        # DVC's lock went with it (this takes it), and the stage left no output behind
        from flows.dvc_adapter import forget, stage_changed

        assert stage_changed(repo, "slow") and not (repo / "s.txt").exists()
        forget(repo)
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _guard_of(stage: str) -> int | None:
    """The pid of the guard (flows/guard.py) running ``dvc repro --single-item stage``."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"flows/guard.py") for a in args) and stage.encode() in args:
            return int(cmdline.parent.name)
    return None


@pytest.mark.slow  # the real pipeline's stages before a real (slowed) training
def test_sigkill_of_the_guard_ends_the_stage_before_the_flow_reports(prefect_api, tmp_path):
    from conftest import make_pipeline_repo

    from flows.runner import group_members

    # enough epochs that training outlives the test by far if nothing stops it
    repo = make_pipeline_repo(tmp_path / "repo", {"train": {"epochs": 200}})
    model, checkpoint = repo / "models" / "model.pt", repo / "models" / "checkpoint.pt"
    flow_proc = subprocess.Popen(
        [sys.executable, "-m", "flows", "run", "--root", str(repo), "--retries", "0"],
        cwd=PROJECT, env=api_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True)
    guard = None
    try:
        deadline = time.monotonic() + 240
        while not checkpoint.exists():  # training has finished an epoch
            assert flow_proc.poll() is None and time.monotonic() < deadline, \
                flow_proc.communicate()[1][-3000:]
            time.sleep(0.2)
        guard = _guard_of("train")
        assert guard is not None and len(group_members(guard)) >= 3  # guard, dvc, train
        os.kill(guard, signal.SIGKILL)
        out, err = flow_proc.communicate(timeout=120)
        left = group_members(guard)  # the flow has reported: nothing of the stage may run
        assert not left, "the stage outlived the failed flow:\n" + _process_table(left)
        assert flow_proc.returncode == 1, err[-3000:]
        assert "stage 'train' failed" in err, err[-3000:]
        written = checkpoint.stat().st_mtime_ns
        time.sleep(3)  # several epochs' time: an orphaned training would write again
        assert not model.exists() and checkpoint.stat().st_mtime_ns == written
    finally:
        if flow_proc.poll() is None:
            os.killpg(flow_proc.pid, signal.SIGKILL)
            flow_proc.wait()
        if guard is not None:
            try:
                os.killpg(guard, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _process_table(pids: list[int]) -> str:
    """``ps`` lines for ``pids`` and their process-group leaders (the guard leads the group)."""
    leaders = set()
    for pid in pids:
        try:
            leaders.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    return subprocess.run(["ps", "-o", "pid,ppid,pgid,stat,etime,args", "-p",
                           ",".join(map(str, [*pids, *leaders]))],
                          capture_output=True, text=True).stdout


def _start_server(home: Path, port: int, **settings: str) -> subprocess.Popen:
    """``prefect server start`` on ``port`` with its database in ``home``; waits until healthy.

    ``settings`` are more PREFECT_* variables for the server.
    """
    from conftest import subprocess_env
    from prefect_fixtures import SERVER_START_TIMEOUT_S, _healthy, seed_database

    seed_database(home)  # a copy of the migrated schema; kept when the server restarts
    env = subprocess_env()
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               DO_NOT_TRACK="1", PREFECT_SERVER_UI_ENABLED="false", **settings)
    log = (home / "server.log").open("a")
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
         "--port", str(port), "--no-ui", "--analytics-off"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while not _healthy(f"http://127.0.0.1:{port}/api"):
        if server.poll() is not None or time.monotonic() > deadline:
            _stop_server(server)
            raise AssertionError((home / "server.log").read_text()[-3000:])
        time.sleep(0.5)
    return server


def _stop_server(server: subprocess.Popen) -> None:
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=20)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def _flow_run_states(api: str) -> list[str]:
    import httpx

    runs = httpx.post(f"{api}/flow_runs/filter", json={}, timeout=10).json()
    return [run["state_type"] for run in runs]


@pytest.mark.slow  # a Prefect server started twice, and Prefect's heartbeat period (~2.5 min)
def test_losing_the_server_fails_fast_and_the_run_is_crashed_when_it_returns(tmp_path):
    from prefect_fixtures import _free_port

    from flows.dvc_adapter import forget, stage_changed

    home, port = tmp_path / "prefect-home", _free_port()
    home.mkdir()
    api = f"http://127.0.0.1:{port}/api"
    slow = ("import os, time; open('pid', 'w').write(str(os.getpid())); "
            "open('s.txt.partial', 'w').write('half'); time.sleep(120); "
            "os.replace('s.txt.partial', 's.txt')")
    repo = make_toy_repo(tmp_path / "toy", {"slow": {"cmd": py_stage(slow), "outs": ["s.txt"]}})
    env = api_env()
    env.update(PREFECT_API_URL=api, PREFECT_HOME=str(home), CONVFLOW_API_LOST_S="10",
               PREFECT_LOGGING_LEVEL="INFO")
    server = _start_server(home, port)
    flow_proc = None
    try:
        flow_proc = subprocess.Popen(
            [sys.executable, "-m", "flows", "run", "--root", str(repo)], cwd=PROJECT, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        deadline = time.monotonic() + 90
        while not (repo / "pid").exists():
            assert flow_proc.poll() is None and time.monotonic() < deadline, "no stage started"
            time.sleep(0.2)
        stage = int((repo / "pid").read_text())
        _stop_server(server)
        lost = time.monotonic()
        out, err = flow_proc.communicate(timeout=90)
        assert time.monotonic() - lost < 60, "the run noticed the lost server too late"
        assert_one_line(subprocess.CompletedProcess([], flow_proc.returncode, out, err), 75,
                        f"lost the Prefect server at {api}")
        assert not _alive(stage), "the stage outlived its flow"
        # the stage was stopped, not left half-written: DVC's lock is free, no output appeared
        # (s.txt.partial is the toy stage's own temp file, which a real stage removes itself)
        assert stage_changed(repo, "slow") and not (repo / "s.txt").exists()
        forget(repo)

        server = _start_server(home, port)  # the same port and database
        deadline = time.monotonic() + 180
        while _flow_run_states(api) != ["CRASHED"]:
            assert time.monotonic() < deadline, f"run not crashed: {_flow_run_states(api)}"
            time.sleep(2)
    finally:
        if flow_proc is not None and flow_proc.poll() is None:
            os.killpg(flow_proc.pid, signal.SIGKILL)
            flow_proc.wait()
        _stop_server(server)
