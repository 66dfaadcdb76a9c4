"""Which device trains, how many CPU threads it uses, and what "auto" means there.

``train.device: auto`` picks CUDA, then Apple MPS, then the CPU, and logs which (as the
tutorial does); naming a device that is not there is a :class:`UserError`, never a silent
fallback to something slower. :func:`resolve_settings` turns the ``auto`` precision,
layout and compile params into concrete choices for the device picked.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from stages.errors import UserError


def mps_available() -> bool:
    """True where Apple's Metal backend can run (never on Linux)."""
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def pick_device(name: str, *, logger: logging.Logger, param: str | None = None
                ) -> torch.device:
    """``auto`` -> cuda, mps or cpu; an explicit name must exist here.

    ``logger`` is the calling stage's; ``param`` the param that holds ``name`` (quoted in
    the log line and in errors), or None for a stage that always asks for ``auto``.
    """
    name = name.strip().lower()
    what = param or "device"
    if name == "auto":
        if torch.cuda.is_available():
            device = torch.device("cuda")
        elif mps_available():
            device = torch.device("mps")
        else:
            device = torch.device("cpu")
        logger.info("using %s device (%s)", device.type, f"{param}: auto" if param else "auto")
        return device
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"{what}: '{name}' is not a device name; use auto, cpu, cuda, "
                        "cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{what}: '{name}' was asked for but this machine has no "
                            "usable CUDA GPU (or torch is a CPU-only build); set "
                            f"{what} to auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"{what}: '{name}' does not exist; this machine has "
                            f"{torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not mps_available():
        raise UserError(f"{what}: '{name}' was asked for but Apple MPS is not available "
                        f"here; set {what} to auto or cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"{what}: '{name}' is not supported; use auto, cpu, cuda or mps")
    logger.info("using %s device", device)
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


#: glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> bool:
    """Have glibc keep and reuse freed tensor memory instead of returning it to the OS.

    A CPU training step allocates and frees the same few-MB activations every step. With
    glibc's defaults each of them is a fresh ``mmap`` (or heap memory trimmed back to the
    OS), so every step pays its page faults again: ~18 % of a seed-net step on a 2-core
    VM (benchmarks/README.md). Raising the mmap threshold to its maximum (32 MiB) and
    the trim threshold to 1 GiB makes the heap keep them, as jemalloc/tcmalloc would; the
    process's resident memory then stays at its peak. Elsewhere than glibc: a no-op.
    Returns whether it applied.
    """
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # pragma: no cover - a libc without mallopt
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20) and mallopt(_M_TRIM_THRESHOLD, 1 << 30))


# ----------------------------------------------------------------------------- auto policy
@dataclass(frozen=True)
class Settings:
    """What ``auto`` resolved to on this device."""

    precision: str  # fp32 | bf16 | fp16
    channels_last: bool
    compile: bool


def _on_off(value: str | bool, auto: bool) -> bool:
    return auto if value == "auto" else value in (True, "on")


#: oneDNN's ``ONEDNN_MAX_CPU_ISA`` values from which it runs bf16 dot products natively
#: (its docs, "CPU dispatcher control"); below them (AVX2, AVX512_CORE...) bf16 is emulated.
_ONEDNN_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX",
                     "AVX512_CORE_AMX_FP16", "AVX10_1_512", "AVX10_1_512_AMX",
                     "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2", "ALL", "")


def cpu_flags() -> dict[str, bool]:
    """The instruction sets that decide the CPU's fast path, from ``/proc/cpuinfo``
    (Linux), else from torch's own checks."""
    names = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
        return {n: n in flags for n in names}
    except OSError:  # pragma: no cover - not Linux
        cpu = torch.cpu
        return {"avx2": cpu._is_avx2_supported(), "avx512f": cpu._is_avx512_supported(),
                "avx512_bf16": cpu._is_avx512_bf16_supported(),
                "amx_bf16": cpu._is_amx_tile_supported(),
                "amx_tile": cpu._is_amx_tile_supported()}


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else ``platform.processor()``."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover - not Linux
        pass
    return platform.processor() or "unknown"


def cpu_caps() -> dict[str, str]:
    """The caps in force on this process's kernels: PyTorch's dispatch level (which
    ``ATEN_CPU_CAPABILITY`` lowers) and oneDNN's ``ONEDNN_MAX_CPU_ISA`` ("" = no cap)."""
    return {"aten": torch.backends.cpu.get_cpu_capability(),
            "onednn_max_isa": os.environ.get("ONEDNN_MAX_CPU_ISA",
                                             os.environ.get("DNNL_MAX_CPU_ISA", "")).upper()}


def cpu_has_native_bf16() -> bool:
    """True where bf16 autocast pays: the CPU has bf16 instructions (AVX512-BF16 or AMX)
    and neither cap in force keeps the kernels off them (``ATEN_CPU_CAPABILITY`` below
    AVX512, ``ONEDNN_MAX_CPU_ISA`` below AVX512_CORE_BF16), since bf16 then runs emulated,
    slower than fp32."""
    cpu = torch.cpu
    try:
        has = bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    except AttributeError:  # pragma: no cover - older torch
        return False
    caps = cpu_caps()
    return has and caps["aten"].startswith("AVX512") and caps["onednn_max_isa"] in _ONEDNN_BF16_ISAS


def resolve_settings(device: torch.device, precision: str = "auto",
                     channels_last: str | bool = "auto", compile: str | bool = "auto"
                     ) -> Settings:
    """Turn the ``auto`` precision / layout / compile params into choices for ``device``.

    Measured for the seed net on a 2-core AVX512-BF16 CPU (benchmarks/README.md):
    channels-last and bf16 autocast are each faster, torch.compile spends ~30 s compiling
    and then runs slower. On CUDA bf16 autocast, channels-last and compile are the fast path.
    """
    cuda = device.type == "cuda"
    if precision == "auto":
        native = cuda or (device.type == "cpu" and cpu_has_native_bf16())
        precision = "bf16" if native else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise UserError("train.precision: fp16 is not supported on the CPU; use fp32 or bf16")
    return Settings(precision=precision, channels_last=_on_off(channels_last, auto=True),
                    compile=_on_off(compile, auto=cuda))


def autocast(device: torch.device, settings: Settings) -> Any:
    """The autocast context for ``settings.precision`` (a no-op for fp32)."""
    if settings.precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if settings.precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)
