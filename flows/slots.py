"""Resource slots: one Prefect global concurrency limit shared by every flow that trains.

Whoever starts a training stage (the pipeline flow, each sweep point, a served schedule, a
worker run) holds one slot of the limit while it runs, so two runs never train on the same
GPU at once. The Prefect server keeps the count, so the limit holds across processes and
machines. Slots are leases: released when the block ends (success, failure, timeout,
cancellation), and, if the holding process is killed outright, when the lease expires.

Configured by environment, so deployments, workers and ``serve`` share it:

* ``CONVFLOW_SLOT``: the limit's name (default ``convflow-gpu``; ``off`` disables slots);
* ``CONVFLOW_SLOT_SIZE``: its size when this code creates it (default: the number of GPUs,
  at least 1); an existing limit keeps its size (``prefect gcl update NAME --limit N``);
* ``CONVFLOW_SLOT_STAGES``: the pipeline stages that take a slot (default ``train``);
* ``CONVFLOW_SLOT_NOTICE_S``: seconds without a slot before a run logs that it waits (2).
"""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

DEFAULT_SLOT = "convflow-gpu"
#: Seconds a slot outlives a holder that died without releasing it (renewed while alive).
LEASE_S = 60.0
#: Seconds without a slot after which a run logs that it waits (CONVFLOW_SLOT_NOTICE_S).
WAIT_NOTICE_S = 2.0


def slot_name() -> str | None:
    """The configured limit's name, or None when slots are off."""
    name = os.environ.get("CONVFLOW_SLOT", DEFAULT_SLOT).strip()
    return None if name.lower() in ("", "off", "none", "0") else name


def slot_stages() -> set[str]:
    """Stage names that hold a slot while they run."""
    return {s.strip() for s in os.environ.get("CONVFLOW_SLOT_STAGES", "train").split(",")
            if s.strip()}


def gpu_ids() -> list[str]:
    """The GPUs this process may use: ``CUDA_VISIBLE_DEVICES`` if set, else ``nvidia-smi -L``."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return [str(i) for i, line in enumerate(listed.stdout.splitlines())
            if line.startswith("GPU ")] if listed.returncode == 0 else []


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


@contextmanager
def slot(log: Any, what: str) -> Iterator[None]:
    """Hold one slot of the configured limit around the block; log waiting, taking, freeing."""
    from prefect.concurrency.sync import concurrency

    name = slot_name()
    if name is None:
        yield
        return
    limit = ensure_limit(name)
    waited = time.monotonic()
    # said only if the slot is not granted at once (a first try with a timeout would make
    # Prefect log an error)
    notice_s = float(os.environ.get("CONVFLOW_SLOT_NOTICE_S", WAIT_NOTICE_S))
    notice = threading.Timer(notice_s, log.info, args=(
        "%s waits for a slot of '%s' (%d/%d in use)", what, name, limit.limit, limit.limit))
    notice.daemon = True
    notice.start()
    try:
        with concurrency(name, occupy=1, lease_duration=LEASE_S, strict=True):
            notice.cancel()
            log.info("%s took a slot of '%s' at %.3f (waited %.1f s)", what, name,
                     time.time(), time.monotonic() - waited)
            try:
                yield
            finally:
                log.info("%s frees its slot of '%s' at %.3f", what, name, time.time())
    finally:
        notice.cancel()


@contextmanager
def stage_slot(stage: str, log: Any) -> Iterator[None]:
    """A slot around ``stage`` if it is a training stage (``CONVFLOW_SLOT_STAGES``)."""
    if stage.split("@")[0] not in slot_stages():
        yield
        return
    with slot(log, f"stage '{stage}'"):
        yield


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
