"""Running a stage's command line as users do, and the error contract it must keep."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

from conftest import PROJECT, subprocess_env


def run_stage(module: str, args: list[str], cwd: Path, timeout: float = 120,
              memory_mb: int | None = None, file_mb: float | None = None,
              **env: str) -> subprocess.CompletedProcess:
    """``python -m stages.<module> ARGS`` in ``cwd``, with this checkout's code; optionally
    under an address-space limit (RLIMIT_AS) and a file-size limit (RLIMIT_FSIZE)."""
    # PYTHONPATH: this checkout's stages, not whichever copy the venv has installed
    full_env = {**subprocess_env(), "PYTHONPATH": str(PROJECT), "OPENBLAS_NUM_THREADS": "1",
                **env}

    def limit() -> None:
        if memory_mb is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
        if file_mb is not None:
            size = int(file_mb * (1 << 20))
            resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    return subprocess.run([sys.executable, "-m", f"stages.{module}", *args], cwd=cwd,
                          env=full_env, text=True, capture_output=True, timeout=timeout,
                          preexec_fn=limit)


def assert_user_error(proc: subprocess.CompletedProcess, stage: str, message: str) -> str:
    """Exit 2, no traceback, and one error, last, naming ``stage`` and holding ``message``
    (on one line; only a list of bad params continues on indented lines); returns it."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.rstrip().splitlines()
    while len(lines) > 1 and lines[-1].startswith("  "):
        lines[-2:] = [lines[-2] + " " + lines[-1].strip()]
    errors = [line for line in lines if "error" in line.lower()]
    assert errors == [lines[-1]], proc.stderr
    assert lines[-1].startswith(f"convflow.{stage}: error: "), proc.stderr
    assert message in lines[-1], proc.stderr
    return lines[-1]
