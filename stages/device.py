"""Which device trains, how many CPU threads it uses, and what "auto" means there.

``train.device: auto`` picks CUDA, then Apple MPS, then the CPU, and logs which (as the
tutorial does); naming a device that is not there is a :class:`UserError`, never a silent
fallback to something slower.
"""

from __future__ import annotations

import logging
import os

import torch

from stages.errors import UserError

log = logging.getLogger("convflow.train")


def mps_available() -> bool:
    """True where Apple's Metal backend can run (never on Linux)."""
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def pick_device(name: str) -> torch.device:
    """``auto`` -> cuda, mps or cpu; an explicit name must exist here."""
    name = name.strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            device = torch.device("cuda")
        elif mps_available():
            device = torch.device("mps")
        else:
            device = torch.device("cpu")
        log.info("using %s device (train.device: auto)", device.type)
        return device
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"train.device: '{name}' is not a device name; use auto, cpu, cuda, "
                        "cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"train.device: '{name}' was asked for but this machine has no "
                            "usable CUDA GPU (or torch is a CPU-only build); set train.device "
                            "to auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"train.device: '{name}' does not exist; this machine has "
                            f"{torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not mps_available():
        raise UserError(f"train.device: '{name}' was asked for but Apple MPS is not available "
                        "here; set train.device to auto or cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"train.device: '{name}' is not supported; use auto, cpu, cuda or mps")
    log.info("using %s device", device)
    return device


def auto_threads() -> int:
    """CPU threads for ``threads: 0``: ``$OMP_NUM_THREADS`` where set, else the cores this
    process may use (at least 1).

    Honouring OMP_NUM_THREADS lets whoever starts several stages side by side (a sweep, a
    test run) share the cores out: two busy processes with all cores each spin in OpenMP
    and can run many times slower than one.
    """
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS / Windows
        cores = os.cpu_count() or 1
    return max(1, cores)


def set_threads(threads: int, nproc: int = 1) -> int:
    """Set torch's intra-op threads (0 = auto, shared between ``nproc`` processes); return it."""
    n = threads if threads > 0 else max(1, auto_threads() // max(1, nproc))
    torch.set_num_threads(n)
    return n
