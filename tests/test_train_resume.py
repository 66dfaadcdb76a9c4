"""SIGKILL the real stage process mid-run; the re-run ends exactly as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import PROJECT, subprocess_env
from train_data import write_processed, write_train_params

from stages.recipe import RECIPES

ARGS = ["--data", "proc", "--model", "models/model.pt", "--checkpoint", "models/checkpoint.pt",
        "--live", "dvclive/train"]
TRAIN = {"epochs": 3, "batch_size": 16, "log_every": 5, "lr": 0.002}
#: airbench94 with air_small's widths, a fractional last epoch, and its lookahead (whose
#: average must survive the kill) and whitening-bias freeze both within the run
PRESET = {**RECIPES["airbench94"], "model": "air_small", "batch_size": 64, "epochs": 3.5,
          "lookahead_start": 0, "lookahead_every": 3, "whiten_bias_epochs": 2, "log_every": 4}


def start(folder: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "stages.train", *ARGS], cwd=folder,
                            env={**subprocess_env(), "PYTHONPATH": str(PROJECT)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def outputs(folder: Path) -> dict[str, bytes]:
    """Everything a user would compare: the weights and every dvclive file."""
    blob = torch.load(folder / "models/model.pt", weights_only=True)
    out = {f"w:{k}": v.numpy().tobytes() for k, v in blob["state_dict"].items()}
    out["model metrics"] = json.dumps(blob["metrics"]).encode()
    live = folder / "dvclive/train"
    for path in sorted(live.rglob("*")):
        if path.is_file():
            out[str(path.relative_to(live))] = path.read_bytes()
    return out


@pytest.mark.parametrize(("train", "n_train", "epochs"),
                         [pytest.param(TRAIN, 1600, 3, id="seed_net"),
                          pytest.param(PRESET, 1024, 4, id="airbench94", marks=pytest.mark.slow)])
def test_sigkill_mid_run_then_rerun_equals_uninterrupted(tmp_path: Path, train: dict,
                                                         n_train: int, epochs: int) -> None:
    folders = {}
    for name in ("whole", "killed"):
        folders[name] = tmp_path / name
        write_processed(folders[name] / "proc", n_train=n_train, n_val=100)
        write_train_params(folders[name], **train)

    whole = start(folders["whole"])
    assert whole.wait(timeout=180) == 0, whole.stderr.read()

    killed = folders["killed"]
    proc = start(killed)
    checkpoint = killed / "models/checkpoint.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)  # mid-way through epoch 2
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    state = torch.load(checkpoint, weights_only=True)
    assert state["epoch"] == 1
    assert (state["lookahead"] is not None) == (train is PRESET)
    assert not (killed / "models/model.pt").exists()  # nothing that looks finished

    rerun = start(killed)
    _, err = rerun.communicate(timeout=180)
    assert rerun.returncode == 0, err
    assert f"resuming after epoch 1 of {epochs}" in err
    assert outputs(killed) == outputs(folders["whole"])
    losses = (killed / "dvclive/train/plots/metrics/train/loss.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in losses] == ["step", *map(str, range(1, epochs + 1))]
