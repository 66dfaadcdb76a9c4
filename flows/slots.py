"""Resource slots: Prefect global concurrency limits held by every flow that trains.

Whoever starts a training stage (flow, sweep point, schedule, worker run) holds a lease
while it runs, so two runs never train on the same GPU at once; the Prefect server keeps
the count across processes and machines. Leases end with the block, or lapse after
``CONVFLOW_LEASE_S`` if the holder is killed; they survive a server restart only where it
keeps them on disk (:data:`DISK_LEASES`), which a waiting run advises.

* On a machine with devices (``CONVFLOW_DEVICES``, else what torch sees), a run leases one
  device of that machine: the limit ``<slot>:<host>:<device>`` of size 1, and its stages
  see only that device (``CUDA_VISIBLE_DEVICES``); a worker runs with ``--limit N``.
* On a machine without, a run holds one slot of the team-wide limit ``<slot>``.

Configured by environment (``CONVFLOW_SLOT``, ``CONVFLOW_DEVICES``, ``CONVFLOW_SLOT_*``,
``CONVFLOW_LEASE_S``) for deployments, workers and ``serve`` alike: docs/unattended.md.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any
from uuid import UUID

from flows.runner import env_seconds

DEFAULT_SLOT = "convflow-gpu"
#: Seconds a killed holder's lease lasts (renewed while alive); Prefect refuses shorter ones.
LEASE_S = 60.0
#: Seconds without a slot after which a run logs that it waits (CONVFLOW_SLOT_NOTICE_S).
WAIT_NOTICE_S = 2.0
#: Seconds a run waits for a slot before it fails (CONVFLOW_SLOT_WAIT_S).
MAX_WAIT_S = 6 * 3600.0
#: Seconds between a waiting run's tries of a machine's devices.
POLL_S = 1.0
#: The Prefect server's lease storage that survives its restart.
DISK_LEASES = "prefect.server.concurrency.lease_storage.filesystem"
_BANNED = str.maketrans({c: "-" for c in "/%&><:"})  # not allowed in Prefect names (and ':')


class SlotTimeout(RuntimeError):
    """No slot or device came free within ``CONVFLOW_SLOT_WAIT_S``."""


def slot_name() -> str | None:
    """The configured limit's name, or None when slots are off."""
    name = os.environ.get("CONVFLOW_SLOT", DEFAULT_SLOT).strip()
    return None if name.lower() in ("", "off", "none", "0") else name


def slot_stages() -> set[str]:
    """Stage names that hold a slot while they run."""
    return {s.strip() for s in os.environ.get("CONVFLOW_SLOT_STAGES", "train").split(",")
            if s.strip()}


def lease_s() -> float:
    """Seconds a lease outlives a killed holder (``CONVFLOW_LEASE_S``, at least Prefect's 60)."""
    return max(LEASE_S, env_seconds("CONVFLOW_LEASE_S", LEASE_S))


def check_settings() -> None:
    """Refuse a malformed slot or crash-detection setting now, before any run starts (one
    line, exit 2)."""
    for name in ("CONVFLOW_LEASE_S", "CONVFLOW_SLOT_WAIT_S", "CONVFLOW_SLOT_NOTICE_S",
                 "CONVFLOW_START_S", "CONVFLOW_CRASH_CHECK_S"):
        env_seconds(name, 0.0)


def _clock(at: float | None = None) -> str:
    return datetime.fromtimestamp(at or time.time(), timezone.utc).strftime("%F %T UTC")


#: Files a loaded GPU driver leaves (NVIDIA, ROCm, WSL); with none, torch sees no device.
GPU_DRIVER_FILES = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/kfd", "/dev/dxg")


@lru_cache(maxsize=1)
def _torch_devices() -> int:
    if not any(map(os.path.exists, GPU_DRIVER_FILES)):  # importing torch: ~1.3 s of CPU
        return 0
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count()


def gpu_ids() -> list[str]:
    """This machine's devices: ``CONVFLOW_DEVICES``, else ``CUDA_VISIBLE_DEVICES``, else torch's."""
    for var in ("CONVFLOW_DEVICES", "CUDA_VISIBLE_DEVICES"):
        listed = os.environ.get(var)
        if listed is not None:
            return [d.strip() for d in listed.split(",") if d.strip() and d.strip() != "-1"]
    return [str(i) for i in range(_torch_devices())]


def machine() -> str:  # this machine's name in its device limits
    return socket.gethostname().translate(_BANNED) or "localhost"


def device_limit(device: str, name: str | None = None) -> str:
    """The limit of one device of this machine: ``<slot>:<host>:<device>``."""
    return f"{name or slot_name()}:{machine()}:{device.translate(_BANNED)}"


def server_lease_storage() -> str | None:
    """Where the Prefect server keeps its leases (its setting), or None if it does not say."""
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            found = client.request("GET", "/admin/settings").json()
        return found["server"]["concurrency"]["lease_storage"]
    except Exception:  # an older server or Prefect Cloud: nothing to advise
        return None


def ensure_limit(name: str, size: int | None = None) -> Any:
    """The global concurrency limit ``name``, created with ``size`` slots if missing."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    if size is None:
        size = int(os.environ.get("CONVFLOW_SLOT_SIZE", "0")) or max(1, len(gpu_ids()))
    with get_client(sync_client=True) as client:
        try:
            return client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            pass
        try:
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=size))
        except ObjectAlreadyExists:  # another run created it at the same moment
            pass
        return client.read_global_concurrency_limit_by_name(name)


def _in_use(names: list[str]) -> str:  # "N/M in use" over the limits, read now
    limits = [ensure_limit(n) for n in names]
    return f"{sum(lim.active_slots for lim in limits)}/{sum(lim.limit for lim in limits)} in use"


def _notice(log: Any, what: str, names: list[str], label: str) -> threading.Timer:
    """A timer that logs, once, that ``what`` waits, how full the limits are and until when."""
    def say() -> None:
        give_up = time.time() + env_seconds("CONVFLOW_SLOT_WAIT_S", MAX_WAIT_S)
        log.info("%s waits for %s (%s) since %s; gives up at %s", what, label, _in_use(names),
                 _clock(), _clock(give_up))
        storage = server_lease_storage()
        if storage is not None and storage != DISK_LEASES:
            log.warning("the Prefect server keeps leases in %s: a restart strands the slots "
                        "held across it; start it with PREFECT_SERVER_CONCURRENCY_LEASE_"
                        "STORAGE=%s", storage.rsplit(".", 1)[-1], DISK_LEASES)

    timer = threading.Timer(env_seconds("CONVFLOW_SLOT_NOTICE_S", WAIT_NOTICE_S), say)
    timer.daemon = True
    timer.start()
    return timer


@contextmanager
def slot(log: Any, what: str) -> Iterator[None]:
    """Hold one slot of the team-wide limit around the block; log waiting, taking, freeing."""
    from prefect.concurrency.sync import concurrency

    name = slot_name()
    if name is None:
        yield
        return
    ensure_limit(name)
    waited, wait_s = time.monotonic(), env_seconds("CONVFLOW_SLOT_WAIT_S", MAX_WAIT_S)
    # said only if the wait lasts (a short first try would make Prefect log an error)
    notice = _notice(log, what, [name], f"a slot of '{name}'")
    taken = False
    try:
        # a renewal that fails while the server restarts must not end the run (a server
        # gone for longer stops the stage anyway: runner.API_LOST_S)
        with concurrency(name, occupy=1, lease_duration=lease_s(), strict=True,
                         timeout_seconds=wait_s, raise_on_lease_renewal_failure=False):
            notice.cancel()
            taken = True
            log.info("%s took a slot of '%s' at %s (waited %.1f s)", what, name, _clock(),
                     time.monotonic() - waited)
            try:
                yield
            finally:
                log.info("%s frees its slot of '%s' at %s", what, name, _clock())
    except TimeoutError:
        if taken:  # the block's own timeout, not the wait's
            raise
        raise SlotTimeout(f"{what} found no free slot of '{name}' in {wait_s:.0f} s "
                          f"({_in_use([name])}; CONVFLOW_SLOT_WAIT_S)") from None
    finally:
        notice.cancel()


def _take(client: Any, name: str) -> UUID | None:
    """A lease of one slot of ``name`` if one is free now, else None (never waits)."""
    import httpx

    try:
        response = client.increment_concurrency_slots_with_lease(
            names=[name], slots=1, mode="concurrency", lease_duration=lease_s())
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code == 423:  # locked: all its slots are taken
            return None
        raise
    return UUID(response.json()["lease_id"])


def _take_any(limits: dict[str, str], what: str) -> tuple[str, UUID]:
    """The first device of ``limits`` that comes free, and its lease; SlotTimeout if none."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + env_seconds("CONVFLOW_SLOT_WAIT_S", MAX_WAIT_S)
    with get_client(sync_client=True) as client:
        while True:
            for device, name in limits.items():
                lease = _take(client, name)
                if lease is not None:
                    return device, lease
            if time.monotonic() >= deadline:
                raise SlotTimeout(
                    f"{what} found no free device of {machine()} in "
                    f"{env_seconds('CONVFLOW_SLOT_WAIT_S', MAX_WAIT_S):.0f} s "
                    f"({_in_use(list(limits.values()))}; CONVFLOW_SLOT_WAIT_S)")
            time.sleep(POLL_S)


def _renew(lease: UUID, name: str, stop: threading.Event, log: Any) -> None:
    """Renew ``lease`` every quarter of its time until ``stop``; a failed renewal is logged."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        while not stop.wait(lease_s() / 4):
            try:
                client.renew_concurrency_lease(lease_id=lease, lease_duration=lease_s())
            except Exception as exc:  # the server restarting: the next renewal may succeed
                log.warning("could not renew the lease of '%s': %s", name, exc)


def _release(lease: UUID, name: str, log: Any) -> None:
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            client.release_concurrency_slots_with_lease(lease_id=lease)
    except Exception as exc:  # the lease lapses on its own within lease_s()
        log.warning("could not release '%s' (%s): it lapses within %.0f s", name, exc,
                    lease_s())


@contextmanager
def device_lease(log: Any, what: str = "training") -> Iterator[dict[str, str]]:
    """One device of this machine for the block; yields the env its commands need.

    ``{"CUDA_VISIBLE_DEVICES": device}`` while a lease of ``<slot>:<host>:<device>`` is held;
    ``{}`` on a machine without devices, holding one team-wide slot instead; ``{}`` when
    slots are off.
    """
    name, devices = slot_name(), gpu_ids()
    if name is None or not devices:
        with slot(log, what) if name else nullcontext():
            yield {}
        return
    limits = {d: device_limit(d, name) for d in devices}
    for limit in limits.values():
        ensure_limit(limit, 1)
    waited = time.monotonic()
    notice = _notice(log, what, list(limits.values()), f"a device of {machine()}")
    try:
        device, lease = _take_any(limits, what)
    finally:
        notice.cancel()
    log.info("%s took device %s ('%s') at %s (waited %.1f s)", what, device, limits[device],
             _clock(), time.monotonic() - waited)
    stop = threading.Event()
    renewer = threading.Thread(target=_renew, args=(lease, limits[device], stop, log),
                               daemon=True)
    renewer.start()
    try:
        yield {"CUDA_VISIBLE_DEVICES": device}
    finally:
        stop.set()
        renewer.join(timeout=5)
        log.info("%s frees device %s ('%s') at %s", what, device, limits[device], _clock())
        _release(lease, limits[device], log)


@contextmanager
def stage_slot(stage: str, log: Any) -> Iterator[dict[str, str]]:
    """A device lease around ``stage`` if it is a training stage; yields the env to add."""
    if stage.split("@")[0] not in slot_stages():
        yield {}
        return
    with device_lease(log, f"stage '{stage}'") as env:
        yield env


_POOL: list[DevicePool] = []
_POOL_LOCK = threading.Lock()


def device_pool() -> DevicePool:
    """This process's pool of GPUs, shared by the experiments of every sweep it runs."""
    with _POOL_LOCK:
        if not _POOL:
            _POOL.append(DevicePool())
        return _POOL[0]


class DevicePool:
    """Hands each experiment of a sweep its own GPU (``CUDA_VISIBLE_DEVICES``) while it runs."""

    def __init__(self, ids: list[str] | None = None) -> None:
        self.ids = gpu_ids() if ids is None else ids
        self._free: queue.Queue[str] = queue.Queue()
        for gpu in self.ids:
            self._free.put(gpu)

    @contextmanager
    def device(self) -> Iterator[dict[str, str]]:
        """Env overrides for one experiment: its own GPU, or nothing on a machine without."""
        if not self.ids:
            yield {}
            return
        gpu = self._free.get()
        try:
            yield {"CUDA_VISIBLE_DEVICES": gpu}
        finally:
            self._free.put(gpu)
