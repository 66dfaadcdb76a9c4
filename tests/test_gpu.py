"""Every CUDA path of the train stage. Marked ``gpu``: skipped (with the reason) where torch
sees no CUDA device; ``benchmarks/gpu_check.py`` runs them on a GPU machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from train_data import write_processed, write_train_params

from stages.device import pick_device, resolve_settings
from stages.errors import UserError
from stages.models import load_model
from stages.train import load_processed, main

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here"),
]
ARGS = ["--data", "proc", "--model", "models/model.pt", "--checkpoint", "models/checkpoint.pt",
        "--live", "dvclive/train"]


def _train(folder: Path, monkeypatch: pytest.MonkeyPatch, **train: object) -> dict:
    write_processed(folder / "proc", n_train=1024, n_val=256)
    write_train_params(folder, **{"device": "cuda", "epochs": 3, "batch_size": 128, **train})
    monkeypatch.chdir(folder)
    main(ARGS)
    return json.loads((folder / "dvclive/train/metrics.json").read_text())


def test_auto_is_cuda_with_bf16_channels_last_and_compile() -> None:
    import logging

    device = pick_device("auto", logger=logging.getLogger("t"), param="train.device")
    assert device.type == "cuda"
    assert resolve_settings(device) == type(resolve_settings(device))("bf16", True, True)


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_autocast_channels_last_training_learns(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                precision: str) -> None:
    metrics = _train(tmp_path, monkeypatch, precision=precision, channels_last="on",
                     compile="off")
    assert metrics["val"]["acc"] > 0.5  # chance is 0.1
    assert torch.backends.cudnn.benchmark  # cuDNN picks its fastest kernels on CUDA


def test_compiled_airbench94_trains_and_loads_on_the_cpu(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    from stages.recipe import RECIPES

    metrics = _train(tmp_path, monkeypatch, **{**RECIPES["airbench94"], "batch_size": 128,
                                               "epochs": 4, "compile": "on",
                                               "device": "cuda"})
    assert metrics["val"]["acc"] > 0.5
    model, meta = load_model(tmp_path / "models/model.pt", map_location="cpu")
    assert meta["device"] == "cuda" and meta["settings"]["compile"] is True
    assert all(t.device.type == "cpu" for t in model.state_dict().values())
    data = load_processed(tmp_path / "proc")
    with torch.no_grad():
        pred = model(torch.from_numpy(data.val_x)).argmax(1).numpy()
    assert (pred == data.val_y).mean() == pytest.approx(metrics["val"]["acc"], abs=0.03)


def test_a_cuda_device_that_is_not_there_is_a_clear_error() -> None:
    import logging

    n = torch.cuda.device_count()
    with pytest.raises(UserError, match=rf"train.device: 'cuda:{n}' does not exist.*{n} CUDA"):
        pick_device(f"cuda:{n}", logger=logging.getLogger("t"), param="train.device")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices for NCCL DDP")
def test_two_process_nccl_ddp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = _train(tmp_path, monkeypatch, nproc=2, compile="off")
    assert metrics["val"]["acc"] > 0.5
    assert load_model(tmp_path / "models/model.pt")[1]["nproc"] == 2


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices for NCCL DDP")
def test_torchrun_two_process_nccl_equals_the_stage_spawning_them(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch
                                                                  ) -> None:
    """The launcher contract on GPUs: torchrun (c10d, NCCL) trains as train.nproc: 2 does."""
    import subprocess
    import sys

    from conftest import PROJECT, subprocess_env

    spawned = _train(tmp_path / "spawned", monkeypatch, nproc=2, compile="off")
    folder = tmp_path / "torchrun"
    write_processed(folder / "proc", n_train=1024, n_val=256)
    write_train_params(folder, device="cuda", epochs=3, batch_size=128, nproc=2, compile="off")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                           "--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                           "127.0.0.1:0", "-m", "stages.train", *ARGS], cwd=folder,
                          env={**subprocess_env(), "PYTHONPATH": str(PROJECT)},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = load_model(folder / "models/model.pt")[1]
    assert meta["nproc"] == 2 and meta["device"] == "cuda"
    assert abs(meta["metrics"]["val/acc"] - spawned["val"]["acc"]) < 0.05
