"""Crashed runs: the Prefect automations that mark a run CRASHED once its heartbeats stop, or
when it never starts (its machine died while setting it up)."""

from __future__ import annotations

import time
from pathlib import Path

from flows.runner import api_url, env_seconds

#: The Prefect automation that marks a run CRASHED once its heartbeats stop.
CRASH_AUTOMATION = "convflow: crash flow runs whose heartbeats stopped"
#: The tag of the runs it watches: those started by ``python -m flows``, which sets the
#: heartbeat period the automation expects (runs started otherwise keep Prefect's 180 s).
WATCHED_TAG = "convflow-watched"
#: How long a successful check of the automation is trusted (``CONVFLOW_CRASH_CHECK_S``):
#: every ``python -m flows`` command checks it, and a no-op run should not pay a round trip
#: (and the automations import) for something that changes only when the period does.
CHECK_TTL_S = 600.0
#: The one that marks a run CRASHED when it stays PENDING (taken by a worker, not yet
#: running: cloning, say) for ``CONVFLOW_START_S`` seconds: no heartbeat ever comes for it.
START_AUTOMATION = "convflow: crash flow runs that never started"
START_S = 600.0
#: The events that open the heartbeat window (a change here replaces servers' automations).
HEARTBEAT_AFTER = {"prefect.flow-run.Running", "prefect.flow-run.heartbeat"}
_ENDS = {"prefect.flow-run.Completed", "prefect.flow-run.Failed", "prefect.flow-run.Cancelled",
         "prefect.flow-run.Crashed"}


def _checked_marker(url: str, windows: str) -> tuple[Path, str]:
    """The file recording the last successful check (in ``PREFECT_HOME``) and its key."""
    from prefect.settings import get_current_settings

    return Path(get_current_settings().home) / "convflow-crash-check", f"{url} {windows}"


def _recently_checked(marker: Path, key: str) -> bool:
    ttl = env_seconds("CONVFLOW_CRASH_CHECK_S", CHECK_TTL_S)
    try:
        return (marker.read_text() == key and time.time() - marker.stat().st_mtime < ttl)
    except OSError:
        return False


def _watched_trigger(after: set[str], expect: set[str], within_s: float) -> object:
    """For each run tagged ``WATCHED_TAG``: after any of ``after``, none of ``expect`` in
    time."""
    from datetime import timedelta

    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return EventTrigger(
        after=after, expect=expect | _ENDS,
        match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
        match_related=ResourceSpecification({"prefect.resource.id": f"prefect.tag.{WATCHED_TAG}",
                                             "prefect.resource.role": "tag"}),
        for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
        within=timedelta(seconds=within_s))


def _heartbeat_window_s(every_s: float) -> float:
    """Two heartbeat periods and 10 s (Prefect allows no period < 30 s)."""
    return 2 * max(every_s, 30) + 10


def heartbeat_trigger(every_s: float) -> object:
    """A watched run whose next heartbeat (or end) is two periods late, the first one too: a
    run killed between RUNNING and its first heartbeat (a machine dying as it starts) sends
    none, so the window also opens at RUNNING."""
    beat = "prefect.flow-run.heartbeat"
    return _watched_trigger(HEARTBEAT_AFTER, {beat}, _heartbeat_window_s(every_s))


def start_trigger(within_s: float) -> object:
    """A watched run still PENDING ``within_s`` seconds after a worker took it."""
    return _watched_trigger({"prefect.flow-run.Pending"}, {"prefect.flow-run.Running",
                                                         "prefect.flow-run.heartbeat"}, within_s)


def _start_s() -> float:
    return max(env_seconds("CONVFLOW_START_S", START_S), 10)  # Prefect's least


def _automations(every_s: float) -> list[tuple[str, object, str]]:
    """(name, trigger, the CRASHED state's message) of each automation."""
    start_s = _start_s()
    return [(CRASH_AUTOMATION, heartbeat_trigger(every_s),
             "no heartbeat: the flow process or its server went away"),
            (START_AUTOMATION, start_trigger(start_s),
             f"never started: still PENDING after {start_s:g} s, its worker or machine went "
             "away while setting it up (CONVFLOW_START_S)")]


def ensure_crash_detection() -> None:
    """Have the Prefect server mark a flow run CRASHED when its heartbeats stop.

    Prefect's own answer to "zombie" runs: every flow run sends a heartbeat event each
    ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds; this automation changes a run tagged
    ``WATCHED_TAG`` whose next heartbeat (or end) does not come within two periods to
    CRASHED. So a run whose process was killed, or that lost the server, does not stay
    RUNNING: the server marks it as soon as it is up and the period has passed. A second one
    marks a run that never starts (``START_AUTOMATION``), which sends no heartbeat. Created
    once per server, replaced if its window or events changed; checked at most every
    ``CHECK_TTL_S`` seconds per server and ``PREFECT_HOME``.
    """
    from prefect.settings import get_current_settings

    every, url = get_current_settings().flows.heartbeat_frequency, api_url()
    if not every or not url:
        return  # heartbeats off, or a temporary server that ends with this process
    # the key from the windows alone: a trusted check builds no trigger (no Prefect import)
    windows = f"{_heartbeat_window_s(every)} {_start_s()} {','.join(sorted(HEARTBEAT_AFTER))}"
    marker, key = _checked_marker(url, windows)
    if _recently_checked(marker, key):
        return
    _ensure(every)
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(key)
    except OSError:
        pass  # no cache: the next command checks again


def end_runs_without_waiting() -> None:
    """End each sync flow run in this process without waiting on its heartbeat thread.

    Prefect's sync engine joins the heartbeat thread when a run ends, and the thread sleeps in
    whole seconds (``time.sleep(1)`` in ``prefect.flow_engine._send_heartbeats``), so a
    ``python -m flows`` command waited 0.5 s on average, up to 1 s, after its last step.
    Prefect's async engine does not join (``join_on_exit=False``): the thread is a daemon and
    returns at its next wake-up, the run being final by then. Only for a command that ends
    when its run does; the heartbeats themselves are unchanged. Prefect's internals, so
    ``tests/test_crash_check.py`` fails if ``_send_heartbeats`` loses ``join_on_exit``.
    """
    import functools
    import inspect

    from prefect import flow_engine

    send = flow_engine._send_heartbeats
    if isinstance(send, functools.partial):
        return  # already done in this process
    if "join_on_exit" in inspect.signature(send).parameters:
        flow_engine._send_heartbeats = functools.partial(send, join_on_exit=False)


def _ensure(every: float) -> None:
    """Leave exactly one of each automation, with these windows.

    Two commands starting at once against a new server both find none and both create one;
    a second automation would mark each dead run CRASHED twice (and alert twice). So each
    creator reads back every automation of that name and all keep the same one (the lowest
    id with this window), deleting the rest.
    """
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        for name, trigger, message in _automations(every):
            if not _keep_one(client, name, trigger):
                client.create_automation(_automation(name, trigger, message))
                _keep_one(client, name, trigger)


def _same_window(automation: object, trigger: object) -> bool:
    """Whether ``automation`` watches as ``trigger`` does (an older version's is replaced)."""
    old = getattr(automation, "trigger", None)
    return all(getattr(old, field, None) == getattr(trigger, field)
               for field in ("within", "match_related", "after", "expect"))


def _keep_one(client: object, name: str, trigger: object) -> bool:
    """Delete every automation ``name`` but the first with this window; whether one is left."""
    from prefect.exceptions import PrefectHTTPStatusError

    found = sorted(client.read_automations_by_name(name), key=lambda a: str(a.id))
    keep = next((a for a in found if _same_window(a, trigger)), None)
    for automation in found:
        if automation is not keep:
            try:
                client.delete_automation(automation.id)
            except PrefectHTTPStatusError as err:
                if err.response.status_code != 404:  # 404: another command deleted it first
                    raise
    return keep is not None


def _automation(name: str, trigger: object, message: str) -> object:
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore

    return AutomationCore(name=name, description=f"{message} (convflow)", trigger=trigger,
                          actions=[ChangeFlowRunState(state=StateType.CRASHED, message=message)])
