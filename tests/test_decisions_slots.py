"""The slot lease code (flows/slots.py) at its edges, against an in-process stand-in for the
Prefect server's concurrency API: the mutants scripts/mutation.sh makes of it must each fail
one of these (fast, in-process) tests; tests/test_leases.py runs it against a real server."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any
from uuid import UUID, uuid4

import httpx
import prefect.client.orchestration
import pytest
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from test_decisions_flows import _Log

from flows import slots

UTC_FORMAT = "%Y-%m-%d %H:%M:%S UTC"  # the format every slot log line uses (docs/unattended.md)


class _Server:
    """What the slot code asks of a Prefect server: global concurrency limits with leases,
    and its settings. Refuses what the real API refuses (unknown paths, modes, short leases)."""

    def __init__(self) -> None:
        self.limits: dict[str, list[int]] = {}  # name -> [size, active]
        self.leases: dict[UUID, str] = {}
        self.storage: str | None = "prefect.server.concurrency.lease_storage.memory"
        self.tries: list[str] = []
        self.renewed: list[tuple[UUID, float]] = []
        self.released: list[UUID] = []
        self.fail_renew = self.fail_release = False
        self.race = False  # a limit is created by someone else between read and create
        self.status = 423

    def get_client(self, sync_client: bool = False) -> _Client:
        assert sync_client
        return _Client(self)


class _Client:
    def __init__(self, server: _Server) -> None:
        self.server = server

    def __enter__(self) -> _Client:
        return self

    def __exit__(self, *exc: object) -> None: ...

    def request(self, method: str, path: str) -> httpx.Response:
        if (method, path) != ("GET", "/admin/settings") or self.server.storage is None:
            raise httpx.HTTPStatusError("404", request=httpx.Request(method, "http://x" + path),
                                        response=httpx.Response(404))
        return httpx.Response(200, json={"server": {"concurrency": {
            "lease_storage": self.server.storage}}})

    def read_global_concurrency_limit_by_name(self, name: str) -> SimpleNamespace:
        if name not in self.server.limits:
            raise ObjectNotFound(None)
        size, active = self.server.limits[name]
        return SimpleNamespace(name=name, limit=size, active_slots=active)

    def create_global_concurrency_limit(self, create: Any) -> None:
        if self.server.race:
            self.server.limits[create.name] = [7, 0]
            raise ObjectAlreadyExists(None)
        assert create.limit >= 1
        self.server.limits[create.name] = [create.limit, 0]

    def increment_concurrency_slots_with_lease(self, names: list[str], slots: int, mode: str,
                                               lease_duration: float) -> httpx.Response:
        assert mode in ("concurrency", "rate_limit") and lease_duration >= 60
        (name,) = names
        self.server.tries.append(name)
        size, active = self.server.limits[name]
        if active + slots > size:
            raise httpx.HTTPStatusError("full", request=httpx.Request("POST", "http://x"),
                                        response=httpx.Response(self.server.status))
        self.server.limits[name][1] += slots
        lease = uuid4()
        self.server.leases[lease] = name
        return httpx.Response(200, json={"lease_id": str(lease)})

    def renew_concurrency_lease(self, lease_id: UUID, lease_duration: float) -> None:
        if self.server.fail_renew:
            raise RuntimeError("server restarting")
        self.server.renewed.append((lease_id, lease_duration))

    def release_concurrency_slots_with_lease(self, lease_id: UUID) -> None:
        if self.server.fail_release:
            raise RuntimeError("server gone")
        self.server.limits[self.server.leases.pop(lease_id)][1] -= 1
        self.server.released.append(lease_id)


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> _Server:
    for name in ("SLOT", "LEASE_S", "SLOT_WAIT_S", "SLOT_NOTICE_S", "SLOT_SIZE", "DEVICES"):
        monkeypatch.delenv(f"CONVFLOW_{name}", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    fake = _Server()
    monkeypatch.setattr(prefect.client.orchestration, "get_client", fake.get_client)
    monkeypatch.setattr("socket.gethostname", lambda: "node1")
    return fake


def _near(text: str, expected: datetime) -> bool:
    when = datetime.strptime(text, UTC_FORMAT).replace(tzinfo=timezone.utc)
    return abs(when - expected) < timedelta(seconds=5)


@pytest.fixture
def far_east() -> Iterator[None]:
    """The machine's local time is 9 hours off UTC: log lines must still say UTC."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TZ", "Asia/Tokyo")
        time.tzset()
        yield
    time.tzset()


def test_a_missing_limit_is_created_with_the_configured_size(
        server: _Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVFLOW_DEVICES", "0,1,2")
    assert slots.ensure_limit("a").limit == 3  # one slot per device of this machine
    monkeypatch.setenv("CONVFLOW_DEVICES", "")
    assert slots.ensure_limit("b").limit == 1  # at least one
    monkeypatch.setenv("CONVFLOW_SLOT_SIZE", "5")
    assert slots.ensure_limit("c").limit == 5
    assert slots.ensure_limit("d", 2).limit == 2
    server.limits["a"] = [9, 4]  # an existing limit is read, not resized
    found = slots.ensure_limit("a", 1)
    assert (found.name, found.limit, found.active_slots) == ("a", 9, 4)
    server.race = True  # created by another run at the same moment: that one is used
    assert slots.ensure_limit("e", 1).limit == 7


def _notice(log: _Log, names: list[str]) -> threading.Timer:
    timer = slots._notice(log, "stage 'train'", names, "a slot of 'gpu'")
    timer.join(timeout=3)
    assert not timer.is_alive()
    return timer


def test_a_waiting_run_says_how_full_and_until_when(
        server: _Server, monkeypatch: pytest.MonkeyPatch, far_east: None) -> None:
    server.limits["gpu"] = [2, 2]
    monkeypatch.setenv("CONVFLOW_SLOT_NOTICE_S", "0")
    monkeypatch.setenv("CONVFLOW_SLOT_WAIT_S", "3600")
    log = _Log()
    timer = _notice(log, ["gpu"])
    assert timer.daemon  # a pending notice never keeps the process alive
    (line,) = log.infos
    head, since, give_up = (
        line.replace(" since ", "|").replace("; gives up at ", "|").split("|"))
    assert head == "stage 'train' waits for a slot of 'gpu' (2/2 in use)"
    now = datetime.now(timezone.utc)
    assert _near(since, now) and _near(give_up, now + timedelta(hours=1))
    (warning,) = log.warnings  # a server keeping leases in memory strands them on restart
    assert warning == ("the Prefect server keeps leases in memory: a restart strands the slots "
                       "held across it; start it with PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE="
                       "prefect.server.concurrency.lease_storage.filesystem")


def test_the_wait_is_given_up_after_the_default_six_hours(
        server: _Server, monkeypatch: pytest.MonkeyPatch) -> None:
    server.limits["gpu"] = [1, 1]
    monkeypatch.setenv("CONVFLOW_SLOT_NOTICE_S", "0")
    log = _Log()
    _notice(log, ["gpu"])
    assert _near(log.infos[0].rsplit("gives up at ", 1)[1],
                 datetime.now(timezone.utc) + timedelta(hours=6))


@pytest.mark.parametrize(("storage", "said"), [
    (slots.DISK_LEASES, []), (None, []),  # on disk, or unknown (an older server): no warning
    ("memory", ["the Prefect server keeps leases in memory"])])  # not a module path
def test_the_restart_warning_only_where_leases_are_kept_in_memory(
        server: _Server, monkeypatch: pytest.MonkeyPatch, storage: str | None,
        said: list[str]) -> None:
    server.limits["gpu"] = [1, 1]
    server.storage = storage
    monkeypatch.setenv("CONVFLOW_SLOT_NOTICE_S", "0")
    log = _Log()
    _notice(log, ["gpu"])
    assert len(log.infos) == 1 and [w.split(":")[0] for w in log.warnings] == said


def test_the_notice_waits_its_setting_first(
        server: _Server, monkeypatch: pytest.MonkeyPatch) -> None:
    timer = slots._notice(_Log(), "x", ["gpu"], "a slot")
    timer.cancel()
    assert timer.interval == 2.0  # the documented default
    monkeypatch.setenv("CONVFLOW_SLOT_NOTICE_S", "30")
    timer = slots._notice(_Log(), "x", ["gpu"], "a slot")
    timer.cancel()
    assert timer.interval == 30.0


def test_a_free_slot_is_leased_and_a_full_one_is_not(server: _Server) -> None:
    server.limits["d0"] = [1, 0]
    with prefect.client.orchestration.get_client(sync_client=True) as client:
        lease = slots._take(client, "d0")
        assert isinstance(lease, UUID) and server.leases[lease] == "d0"
        assert server.limits["d0"] == [1, 1]
        assert slots._take(client, "d0") is None  # locked: taken
        server.status = 500  # any other refusal is an error, not "taken"
        with pytest.raises(httpx.HTTPStatusError):
            slots._take(client, "d0")


class _Clock:
    """time.monotonic and time.sleep for slots: sleeping moves the clock."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_the_first_device_that_comes_free_is_taken(
        server: _Server, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(slots, "time", clock)
    server.limits.update({"g:node1:0": [1, 1], "g:node1:1": [1, 0]})
    device, lease = slots._take_any({"0": "g:node1:0", "1": "g:node1:1"}, "training")
    assert device == "1" and server.leases[lease] == "g:node1:1"
    assert server.tries == ["g:node1:0", "g:node1:1"] and clock.sleeps == []


def test_a_run_polls_every_second_until_its_wait_is_over(
        server: _Server, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(slots, "time", clock)
    monkeypatch.setenv("CONVFLOW_SLOT_WAIT_S", "2")
    server.limits.update({"g:node1:0": [1, 1], "g:node1:1": [1, 1]})
    with pytest.raises(slots.SlotTimeout) as info:
        slots._take_any({"0": "g:node1:0", "1": "g:node1:1"}, "stage 'train'")
    assert str(info.value) == ("stage 'train' found no free device of node1 in 2 s "
                               "(2/2 in use; CONVFLOW_SLOT_WAIT_S)")
    assert clock.sleeps == [1.0, 1.0]  # tried at 0, 1 and 2 s
    assert len(server.tries) == 6


def test_by_default_a_run_waits_six_hours_for_a_device(
        server: _Server, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(slots, "time", clock)
    monkeypatch.setattr(slots, "POLL_S", 3600.0)
    server.limits["g:node1:0"] = [1, 1]
    with pytest.raises(slots.SlotTimeout, match=r"of node1 in 21600 s \(1/1 in use; "):
        slots._take_any({"0": "g:node1:0"}, "training")
    assert clock.sleeps == [3600.0] * 6


def test_a_device_freed_while_waiting_is_taken(
        server: _Server, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(slots, "time", clock)
    monkeypatch.setenv("CONVFLOW_SLOT_WAIT_S", "10")
    server.limits["g:node1:0"] = [1, 1]

    def sleep(seconds: float) -> None:
        clock.sleeps.append(seconds)
        server.limits["g:node1:0"][1] = 0
    clock.sleep = sleep  # type: ignore[method-assign]
    device, _ = slots._take_any({"0": "g:node1:0"}, "training")
    assert device == "0" and clock.sleeps == [1.0]


class _Stop:
    """A threading.Event whose wait says whether to stop after ``rounds`` waits."""

    def __init__(self, rounds: int) -> None:
        self.rounds = rounds
        self.waits: list[float] = []

    def wait(self, timeout: float) -> bool:
        self.waits.append(timeout)
        return len(self.waits) > self.rounds


def test_a_lease_is_renewed_every_quarter_of_its_time(
        server: _Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVFLOW_LEASE_S", "100")
    lease, log, stop = uuid4(), _Log(), _Stop(2)
    slots._renew(lease, "g:node1:0", stop, log)  # type: ignore[arg-type]
    assert stop.waits == [25.0, 25.0, 25.0]
    assert server.renewed == [(lease, 100.0), (lease, 100.0)] and log.warnings == []


def test_a_failed_renewal_is_logged_and_renewing_goes_on(server: _Server) -> None:
    server.fail_renew = True
    log, stop = _Log(), _Stop(2)
    slots._renew(uuid4(), "g:node1:0", stop, log)  # type: ignore[arg-type]
    assert log.warnings == ["could not renew the lease of 'g:node1:0': server restarting"] * 2
    assert len(stop.waits) == 3


def test_a_release_frees_the_slot_or_says_when_it_lapses(server: _Server) -> None:
    server.limits["g:node1:0"] = [1, 0]
    with prefect.client.orchestration.get_client(sync_client=True) as client:
        lease = slots._take(client, "g:node1:0")
    assert lease is not None
    log = _Log()
    slots._release(lease, "g:node1:0", log)
    assert server.released == [lease] and server.limits["g:node1:0"] == [1, 0]
    assert log.warnings == []
    server.fail_release = True
    slots._release(uuid4(), "g:node1:0", log)
    assert log.warnings == ["could not release 'g:node1:0' (server gone): it lapses within "
                            "60 s"]


def test_one_device_pool_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slots, "_POOL", [])  # as in a fresh process
    pool = slots.device_pool()
    assert isinstance(pool, slots.DevicePool) and slots.device_pool() is pool


def test_a_pool_given_no_devices_has_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVFLOW_DEVICES", "0,1")
    assert slots.DevicePool([]).ids == []
    assert slots.DevicePool().ids == ["0", "1"]
