"""Where a command's CPU goes, by kind of process: run it while sampling ``/proc``.

    python benchmarks/ci_profile.py --json benchmarks/results/ci_profile.json -- bash .ci/run

Every 0.2 s it reads each process's CPU time (user + system) and command line; a process's
CPU is the last value seen (processes that were running before count only what they used
meanwhile, in a row of their own). Processes that live less than 0.2 s are missed (git's, mostly).
The rows group processes by kind (a stage, ``dvc``, a Prefect server, a flow run, ...), with
their count and CPU seconds, largest first. With ``--by-test`` they group by the test file
that started them instead (pytest's ``PYTEST_CURRENT_TEST``, which subprocesses inherit;
the pytest processes' own CPU stays in a row of their own). Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
#: (kind, pattern on the command line), first match wins.
KINDS = [
    ("dvc", r"-m dvc\b|/dvc "),
    ("prefect server", r"prefect server start"),
    ("prefect worker", r"prefect worker start"),
    ("flow run (started by a worker)", r"_workspace_supervisor|prefect\.engine"),
    ("prefect CLI", r"-m prefect\b|/prefect "),
    ("pytest-xdist worker", r"exec\(eval\(sys\.stdin"),
    ("torch.multiprocessing child (DDP)", r"multiprocessing\.spawn"),
    ("install (pip, uv)", r"-m pip\b|uv pip|pip_compileall"),
    ("SeaweedFS", r"\bweed\b"),
    ("git", r"^(\S*/)?git(-\S+)? "),
]


def _test_file(pid: str) -> str:
    """The test file whose run started process ``pid`` ('' if none did)."""
    with open(f"/proc/{pid}/environ", "rb") as f:
        for var in f.read().split(b"\0"):
            if var.startswith(b"PYTEST_CURRENT_TEST="):
                return var.split(b"=", 1)[1].decode(errors="replace").split("::")[0]
    return ""


def sample(seen: dict[tuple[int, int], list], me: int) -> None:
    """One pass over /proc: each process's command, CPU ticks at start (0 for a new one),
    latest, and the test file that started it."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            fields = stat[stat.rindex(")") + 2:].split()
            ticks, start = int(fields[11]) + int(fields[12]), int(fields[19])
            key = (int(entry), start)
            if key in seen:
                seen[key][2] = ticks
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            seen[key] = [cmd or stat[stat.index("(") + 1:stat.rindex(")")], 0, ticks,
                         _test_file(entry)]
        except (OSError, ValueError, IndexError):
            continue  # it ended between listdir and open


def kind_of(cmd: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, cmd):
            return kind
    module = re.search(r"-m (stages\.\w+|flows(?: \w+)?)", cmd)
    return module.group(1) if module else "other"


def summarize(seen: dict[tuple[int, int], list], by_test: bool = False) -> list[dict]:
    rows: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for cmd, first, last, test in seen.values():
        if last > first:
            kind = kind_of(cmd)
            if by_test and kind != "pytest-xdist worker":
                kind = test or "(no test: " + kind + ")"
            row = rows["already running (the system's)" if first else kind]
            row[0] += 1
            row[1] += (last - first) / TICK
    return [{"kind": k, "processes": n, "cpu_s": round(c, 1)}
            for k, (n, c) in sorted(rows.items(), key=lambda kv: -kv[1][1])]


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f
                     if line.startswith("model name")), "unknown")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the rows and totals here")
    parser.add_argument("--by-test", action="store_true",
                        help="group by the test file that started each process")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to profile after --")
    seen: dict[tuple[int, int], list] = {}
    sample(seen, os.getpid())
    for value in seen.values():  # what ran before counts only from now on
        value[1] = value[2] or 1
    start = time.monotonic()
    proc = subprocess.Popen(command)
    while proc.poll() is None:
        sample(seen, os.getpid())
        time.sleep(0.2)
    wall = time.monotonic() - start
    rows = summarize(seen, args.by_test)
    total = round(sum(r["cpu_s"] for r in rows), 1)
    for row in rows:
        print(f"{row['cpu_s']:8.1f} s {row['processes']:6d}  {row['kind']}")
    print(f"{total:8.1f} s of CPU in {wall:.0f} s of wall time (exit {proc.returncode})")
    if args.json:
        args.json.write_text(json.dumps({
            "command": " ".join(command), "cpu": _cpu_model(), "cores": os.cpu_count(),
            "wall_s": round(wall, 1), "cpu_s": total,
            "returncode": proc.returncode, "rows": rows}, indent=1) + "\n")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
