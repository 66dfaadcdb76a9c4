"""What a benchmark ran on, recorded in its JSON so that numbers from different CPUs (or
from the AVX2 emulation) are never mixed: CPU model, the instruction sets that pick the
fast path, the kernel caps in force, load."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: ``--isa NAME``: the environment that makes PyTorch and oneDNN dispatch to that code path
#: (both read it when torch loads, so it is set before the process starts).
ISA_ENV: dict[str, dict[str, str]] = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}


def reexec_under(isa: str | None) -> None:
    """Re-run this command with ``isa``'s caps in the environment unless they are set."""
    if not isa:
        return
    env = ISA_ENV[isa]
    if all(os.environ.get(k) == v for k, v in env.items()):
        return
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **env})


def machine_record(isa: str | None = None) -> dict:
    """CPU model, ISA flags, caps in force, cores and load; ``emulation`` names what an
    ``--isa`` run emulated on which CPU."""
    from stages.device import cpu_caps, cpu_flags, cpu_has_native_bf16, cpu_model

    model, caps = cpu_model(), cpu_caps()
    record = {"cpu": model, "flags": cpu_flags(), "caps": caps,
              "native_bf16": cpu_has_native_bf16(), "cores": os.cpu_count(),
              "python": platform.python_version(), "loadavg": list(os.getloadavg())}
    import torch

    record["torch"] = torch.__version__
    if isa:
        record["emulation"] = (f"{isa.upper()} code path emulated on {model} "
                               f"(ATen dispatch {caps['aten']}, oneDNN capped at "
                               f"{caps['onednn_max_isa']}); not a real {isa.upper()}-only CPU")
    return record
