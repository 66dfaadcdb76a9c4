"""benchmarks/gpu_check.py's dry run: every CPU-possible step runs, the rest say why not."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PROJECT, subprocess_env


@pytest.mark.slow  # a real end-to-end run: over ~30 s on 2 cores
def test_dry_run_runs_the_cpu_steps_and_skips_the_rest_with_a_reason(tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out",
                           str(out)], cwd=PROJECT, env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    steps = result["steps"]
    assert result["dry_run"] is True and "no number here is a GPU result" in result["note"]
    assert steps["install"]["status"] == "skipped" and steps["install"]["reason"]
    if not torch.cuda.is_available():
        tests = steps["gpu_tests"]
        assert tests["status"] == "skipped" and tests["skipped"] >= 5 and tests["failed"] == 0
        assert "no CUDA device here" in tests["skip_reasons"]
    seed = steps["seed_net_epoch"]
    assert seed["status"] == "ok" and len(seed["epoch_seconds"]) == 2 and seed["met"] is None
    bench = steps["airbench94"]
    assert bench["status"] == "ok" and bench["data"]["source"] == "synthetic"
    (run,) = bench["runs"]
    assert run["train_s"] > 0 and {"test_acc", "test_acc_tta"} <= set(run)
