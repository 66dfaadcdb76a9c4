"""What ``python -m flows`` adds to a run for crash detection costs a no-op run little
(flows/crash.py), against a real Prefect server: the automation's check is cached, and the
run ends without waiting on Prefect's heartbeat thread."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect_fixtures import api_env

ENSURE = "from flows.crash import ensure_crash_detection; ensure_crash_detection()"


def _ensure(**env: str) -> None:
    subprocess.run([sys.executable, "-c", ENSURE], cwd=Path(__file__).resolve().parents[1],
                   env={**api_env(), "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30", **env},
                   check=True, timeout=120)


def _automations() -> list:
    from prefect.client.orchestration import get_client

    from flows.crash import CRASH_AUTOMATION

    with get_client(sync_client=True) as client:
        return client.read_automations_by_name(CRASH_AUTOMATION)


def _delete(found: object) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.delete_automation(found.id)


def _automation() -> object | None:
    (found, *more) = _automations() or [None]
    assert not more, f"{1 + len(more)} crash automations: each dead run would crash twice"
    return found


def test_a_recent_check_is_trusted_and_an_expired_one_repeated(prefect_api) -> None:
    """Created by the first command; deleted behind its back, the next command within the
    TTL trusts its check; once the TTL is over (0 here) the check recreates it."""
    _ensure(CONVFLOW_CRASH_CHECK_S="0")
    found = _automation()
    assert found is not None
    _delete(found)
    _ensure()
    assert _automation() is None, "the recent check was not trusted"
    _ensure(CONVFLOW_CRASH_CHECK_S="0")
    assert _automation() is not None, "an expired check did not recreate the automation"


def test_commands_racing_on_a_new_server_leave_one_automation(prefect_api) -> None:
    """Three commands create the automation at once (none exists yet): one is left."""
    for found in _automations():
        _delete(found)
    env = {**api_env(), "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30", "CONVFLOW_CRASH_CHECK_S": "0"}
    procs = [subprocess.Popen([sys.executable, "-c", ENSURE], env=env,
                              cwd=Path(__file__).resolve().parents[1]) for _ in range(3)]
    assert [proc.wait(timeout=120) for proc in procs] == [0, 0, 0]
    assert _automation() is not None


#: A flow run in a fresh process; prints how long the engine took after the flow's body.
#: Prefect's heartbeat thread naps in 1-s steps; here each nap is 5 s, so a join waits its
#: whole 2-s timeout where ``end_runs_without_waiting`` is not in force.
AFTER_BODY = """
import sys, time, types
from prefect import flow, flow_engine
flow_engine.time = types.SimpleNamespace(**{**vars(time), "sleep": lambda s: time.sleep(5 * s)})
if sys.argv[1] == "command":
    from flows.crash import end_runs_without_waiting
    end_runs_without_waiting()
    end_runs_without_waiting()  # twice is once

@flow
def body_end():
    return time.monotonic()

ended = body_end()
print(round(time.monotonic() - ended, 2))
"""


def test_a_command_ends_its_run_without_waiting_on_the_heartbeat_thread(prefect_api) -> None:
    def after_body(mode: str) -> float:
        proc = subprocess.run([sys.executable, "-c", AFTER_BODY, mode], capture_output=True,
                              text=True, cwd=Path(__file__).resolve().parents[1], timeout=120,
                              env={**api_env(), "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        return float(proc.stdout.split()[-1])

    joined, command = after_body("library"), after_body("command")
    assert joined >= 1.9  # Prefect's sync engine joined its sleeping heartbeat thread
    assert command < joined - 1.0, (command, joined)  # python -m flows does not wait on it


def _watched_run(client: object, name: str) -> object:
    """A flow run tagged as ``python -m flows`` tags its runs, taken by a worker (PENDING)."""
    from prefect import flow
    from prefect.states import Pending

    from flows.crash import WATCHED_TAG

    @flow(name="crash-check-toy")
    def toy() -> None:
        pass

    run = client.create_flow_run(toy, name=name, tags=[WATCHED_TAG])
    client.set_flow_run_state(run.id, Pending())
    return run


@pytest.mark.slow  # Prefect's least heartbeat window: two 30-s periods and 10 s, ~75 s here
def test_a_run_whose_machine_dies_before_it_starts_or_first_beats_is_crashed(prefect_api):
    """A run left PENDING (its worker died while cloning) is CRASHED after CONVFLOW_START_S;
    one that went RUNNING but never sent a heartbeat (its machine died as it started, seen in
    the multihost kill test) is CRASHED once the heartbeat window, opened at RUNNING, ends."""
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    _ensure(CONVFLOW_CRASH_CHECK_S="0", CONVFLOW_START_S="10")
    with get_client(sync_client=True) as client:
        stuck, started = _watched_run(client, "stuck"), _watched_run(client, "started")
        client.set_flow_run_state(started.id, Running())
        deadline = time.monotonic() + 150

        def crashed(run: object) -> object:
            while not (state := client.read_flow_run(run.id).state).is_crashed():
                assert time.monotonic() < deadline, f"still {state.type} after 150 s"
                time.sleep(1)
            return state

        assert "never started: still PENDING after 10 s" in crashed(stuck).message
        assert client.read_flow_run(started.id).state.is_running()  # its window: 70 s
        assert crashed(started).message.startswith("no heartbeat")
    _ensure(CONVFLOW_CRASH_CHECK_S="0")  # back to the default window for the other tests


def test_an_older_automation_is_replaced_by_this_version(prefect_api) -> None:
    """A server keeps the automation an older convflow made (its window opened at a heartbeat
    only): the next check replaces it with one that also opens at RUNNING."""
    from prefect.client.orchestration import get_client

    from flows.crash import CRASH_AUTOMATION, HEARTBEAT_AFTER, _watched_trigger
    from flows.crash import _automation as automation

    for found in _automations():
        _delete(found)
    beat = "prefect.flow-run.heartbeat"
    with get_client(sync_client=True) as client:
        old = _watched_trigger({beat}, {beat}, 70)
        client.create_automation(automation(CRASH_AUTOMATION, old, "no heartbeat"))
    _ensure(CONVFLOW_CRASH_CHECK_S="0")
    found = _automation()
    assert found is not None and found.trigger.after == HEARTBEAT_AFTER
