"""This machine's speed right now: the CPU seconds of one tiny pipeline, stage by stage.

    python benchmarks/calibrate.py

Runs each stage of a test-sized pipeline (``tests/conftest.py``'s ``make_pipeline_repo``
with one epoch) with ``dvc repro -s`` in a temporary repository and prints each one's CPU
(user + system of its processes) and wall seconds, then the total. A shared VM's speed
drifts within an evening, so timings of the suite (benchmarks/README.md#ci) compare only
when made back to back; this number, taken before and after, says how far the VM moved.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("fetch", "ingest", "normalize", "train", "evaluate", "plot", "gate")
SMALL = {"train": {"epochs": 1, "batch_size": 16}, "evaluate": {"n_wrong": 2},
         "plot": {"n_images": 2}}


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import make_pipeline_repo, subprocess_env

    with tempfile.TemporaryDirectory() as folder:
        repo = make_pipeline_repo(Path(folder) / "repo", SMALL)
        env, start = subprocess_env(), children_cpu()
        for stage in STAGES:
            cpu, wall = children_cpu(), time.monotonic()
            subprocess.run(["dvc", "repro", "-s", stage], cwd=repo, env=env, check=True,
                           capture_output=True)
            print(f"{stage:10s} {children_cpu() - cpu:5.2f} CPU s {time.monotonic() - wall:5.2f} s")
        print(f"total      {children_cpu() - start:5.2f} CPU s")


if __name__ == "__main__":
    main()
