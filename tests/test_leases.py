"""Per-device leases and slots on a real Prefect server: who gets which device, who waits,
what a SIGKILLed holder or a server restart leaves behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import PROJECT, run
from prefect_fixtures import api_env, make_toy_repo, py_stage

# a process that leases a device as a sweep point or a training stage does, says which, and
# holds it until its release file appears (or it is killed)
HOLDER = """\
import logging, pathlib, sys, time
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
from flows.slots import device_lease
with device_lease(logging.getLogger("holder"), sys.argv[1]) as env:
    print("DEVICE", env.get("CUDA_VISIBLE_DEVICES"), flush=True)
    while not pathlib.Path(sys.argv[2]).exists():
        time.sleep(0.1)
print("RELEASED", flush=True)
"""


class Holder:
    """A lease-holding process; its output lines are collected as they come."""

    def __init__(self, name: str, folder: Path, env: dict[str, str]) -> None:
        self.release = folder / f"release-{name}"
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, name, str(self.release)],
                                     cwd=PROJECT, env=env, text=True, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.lines: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())

    def device(self, within_s: float) -> str | None:
        """The device it leased, once it says so within ``within_s``; None if not."""
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            said = [ln.split()[1] for ln in self.lines if ln.startswith("DEVICE ")]
            if said:
                return said[0]
            assert self.proc.poll() is None or self.lines, "holder died: " + str(self.lines)
            time.sleep(0.1)
        return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def free(self) -> None:
        self.release.touch()
        self.proc.wait(timeout=30)
        assert "RELEASED" in self.lines, self.lines


def _env(slot: str, devices: str = "0,1") -> dict[str, str]:
    return {**api_env(), "CONVFLOW_SLOT": slot, "CONVFLOW_DEVICES": devices,
            "CONVFLOW_SLOT_NOTICE_S": "0.5", "PYTHONUNBUFFERED": "1"}


def _in_use(name: str) -> int:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(name).active_slots


def _wait_free(name: str, within_s: float) -> float:
    """Seconds until limit ``name`` has no active slot; fails after ``within_s``."""
    start = time.monotonic()
    while _in_use(name):
        assert time.monotonic() - start < within_s, f"'{name}' still taken after {within_s} s"
        time.sleep(1)
    return time.monotonic() - start


@pytest.mark.slow  # a real end-to-end run: over ~30 s on 2 cores
def test_a_training_stage_sees_only_its_leased_device(prefect_api, tmp_path) -> None:
    from flows.slots import device_limit

    slot = f"lease-{uuid.uuid4().hex[:8]}"
    show = "import os; open('dev.txt', 'w').write(os.environ['CUDA_VISIBLE_DEVICES'])"
    repo = make_toy_repo(tmp_path / "toy", {"train": {"cmd": py_stage(show),
                                                      "outs": ["dev.txt"]}})
    env = {**_env(slot, "3"), "PREFECT_LOGGING_LEVEL": "INFO"}
    proc = run([sys.executable, "-m", "flows", "run", "--root", str(repo), "--retries", "0"],
               cwd=PROJECT, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (repo / "dev.txt").read_text() == "3"
    limit = device_limit("3", slot)
    assert f"took device 3 ('{limit}') at " in proc.stderr + proc.stdout
    inspect = run([sys.executable, "-m", "prefect", "gcl", "inspect", limit], cwd=PROJECT,
                  env=env)  # what a team reads: the lease is a named limit, now free
    assert limit in inspect.stdout and "active_slots" in inspect.stdout.replace(" ", "_")


def test_a_run_waits_for_a_slot_with_a_bound_and_says_until_when(prefect_api, tmp_path):
    from test_flow_cli import assert_one_line

    slot = f"wait-{uuid.uuid4().hex[:8]}"
    env = {**_env(slot, ""), "CONVFLOW_SLOT_WAIT_S": "3", "PREFECT_LOGGING_LEVEL": "INFO"}
    holder = Holder("a", tmp_path, env)  # no devices here: the team-wide slot (size 1)
    try:
        assert holder.device(60) == "None", holder.lines
        repo = make_toy_repo(tmp_path / "toy", {"train": {
            "cmd": py_stage("open('t.txt', 'w').write('1')"), "outs": ["t.txt"]}})
        proc = run([sys.executable, "-m", "flows", "run", "--root", str(repo), "--retries",
                    "0"], cwd=PROJECT, env=env, check=False)
        assert_one_line(proc, 1, f"found no free slot of '{slot}' in 3 s (1/1 in use; "
                                 "CONVFLOW_SLOT_WAIT_S)")
        waits = [ln for ln in proc.stderr.splitlines() if "waits for a slot" in ln]
        assert waits and " UTC; gives up at 20" in waits[0], proc.stderr[-2000:]
        assert not (repo / "t.txt").exists()
        holder.free()
        assert _in_use(slot) == 0
    finally:
        holder.kill()


@pytest.mark.slow  # Prefect's shortest lease is 60 s: the killed holder's lease must lapse
def test_two_holders_get_different_devices_a_third_waits_a_killed_ones_lapses(
        prefect_api, tmp_path) -> None:
    from flows.slots import device_limit, lease_s

    slot = f"lease-{uuid.uuid4().hex[:8]}"
    env = _env(slot)
    holders = [Holder(n, tmp_path, env) for n in ("a", "b")]
    try:
        got = [h.device(60) for h in holders]
        assert sorted(got) == ["0", "1"], [h.lines for h in holders]
        third = Holder("c", tmp_path, env)
        holders.append(third)
        deadline = time.monotonic() + 60  # both devices are taken: it waits, and says so
        while not any("waits for a device of" in ln for ln in third.lines):
            assert time.monotonic() < deadline and third.proc.poll() is None, third.lines
            time.sleep(0.1)
        assert any("(2/2 in use) since " in ln for ln in third.lines), third.lines
        assert third.device(1) is None, third.lines
        killed = holders[0]
        killed.kill()  # SIGKILL: nothing releases its lease; it must lapse
        start = time.monotonic()
        assert third.device(lease_s() + 30) == got[0], third.lines
        print(f"killed holder's device leased again after {time.monotonic() - start:.1f} s")
        for holder in holders[1:]:
            holder.free()
        for device in ("0", "1"):
            assert _in_use(device_limit(device, slot)) == 0
    finally:
        for holder in holders:
            holder.kill()


@pytest.mark.slow  # a Prefect server started twice, and a killed holder's 60 s lease
def test_leases_survive_a_server_restart(tmp_path) -> None:
    from prefect_fixtures import _free_port
    from test_flow_cli import _start_server, _stop_server

    from flows.slots import DISK_LEASES, device_limit, lease_s

    home, port = tmp_path / "prefect-home", _free_port()
    home.mkdir()
    # the server as docs/unattended.md starts it (its leases on disk), checking leases often
    settings = {"PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": DISK_LEASES,
                "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "2"}
    slot = "restart"
    env = {**_env(slot), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_HOME": str(home)}
    server = _start_server(home, port, **settings)
    holders = [Holder(n, tmp_path, env) for n in ("clean", "killed")]
    try:
        got = [h.device(60) for h in holders]
        assert sorted(got) == ["0", "1"], [h.lines for h in holders]
        holders[1].kill()  # killed outright before the restart: its lease must still lapse
        _stop_server(server)
        server = _start_server(home, port, **settings)
        holders[0].free()  # released cleanly after the restart: free at once
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
            assert _wait_free(device_limit(got[0], slot), 5) < 5
            assert _wait_free(device_limit(got[1], slot), lease_s() + 20) < lease_s() + 20
    finally:
        for holder in holders:
            holder.kill()
        _stop_server(server)
