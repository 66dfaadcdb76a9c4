"""DDP on the CPU: 2 gloo processes average gradients correctly and the stage completes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from train_data import learnable_images, write_processed, write_train_params

from stages.ddp import SEPARATE_STORE, launch, shared_store_warning
from stages.errors import UserError
from stages.models import build_model, load_model
from stages.train import main

MEAN, STD = [0.3] * 3, [0.25] * 3


def _gradient_worker(out_dir: str, x: torch.Tensor, y: torch.Tensor) -> None:
    """One DDP process: gradient of its half of the batch, after DDP's all-reduce."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = build_model("seed_net", 10, MEAN, STD)
    ddp = DistributedDataParallel(model)
    n = len(x) // world
    F.cross_entropy(ddp(x[rank * n:(rank + 1) * n]), y[rank * n:(rank + 1) * n]).backward()
    torch.save({k: p.grad for k, p in model.named_parameters()}, Path(out_dir) / f"{rank}.pt")


def _fail_on_rank_one() -> None:
    """Rank 1 meets a user error; rank 0 waits in a collective and crashes when 1 leaves."""
    if dist.get_rank() == 1:
        raise UserError("data/processed/train.npz: bad shard")
    dist.barrier()
    dist.all_reduce(torch.ones(1))


def test_torchrun_restarting_into_its_shared_store_is_warned_about() -> None:
    agent = {"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_MAX_RESTARTS": "3"}
    warning = shared_store_warning(agent)
    assert warning is not None and f"{SEPARATE_STORE}=1" in warning and "3" in warning
    # what torchrun sets with the variable: each restart meets in a store of its own
    assert shared_store_warning({**agent, "TORCHELASTIC_USE_AGENT_STORE": "False"}) is None
    assert shared_store_warning({**agent, "TORCHELASTIC_MAX_RESTARTS": "0"}) is None
    assert shared_store_warning({}) is None  # train.nproc's own spawn: no agent


def test_ddp_names_the_process_that_failed() -> None:
    with pytest.raises(UserError, match=r"^DDP process 1: data/processed/train.npz: bad shard$"):
        launch(_fail_on_rank_one, 2, torch.device("cpu"), (), threads=1)


def _single_process_gradient(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model("seed_net", 10, MEAN, STD)
    F.cross_entropy(model(x), y).backward()
    return {k: p.grad for k, p in model.named_parameters()}


def test_ddp_gradient_is_the_mean_of_per_shard_gradients(tmp_path: Path) -> None:
    images, labels = learnable_images(32, seed=0)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    launch(_gradient_worker, 2, torch.device("cpu"), (str(tmp_path), x, y), threads=1)
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1)]
    shards = [_single_process_gradient(x[:16], y[:16]), _single_process_gradient(x[16:], y[16:])]
    whole = _single_process_gradient(x, y)
    for name, grad in ranks[0].items():
        assert torch.equal(grad, ranks[1][name]), name  # every process steps identically
        expected = (shards[0][name] + shards[1][name]) / 2
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)
    # BatchNorm normalises with each process's own batch statistics (no SyncBatchNorm), so
    # the result is not the full-batch gradient of one process
    assert not torch.allclose(ranks[0]["1.classifier.1.weight"], whole["1.classifier.1.weight"],
                              rtol=1e-4, atol=1e-6)


def test_stage_with_two_gloo_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       caplog: pytest.LogCaptureFixture) -> None:
    write_processed(tmp_path / "proc", n_train=640, n_val=100)
    write_train_params(tmp_path, nproc=2, epochs=2, batch_size=32, lr=0.003)
    monkeypatch.chdir(tmp_path)
    caplog.set_level("INFO", logger="convflow")
    main(["--data", "proc", "--model", "models/model.pt", "--checkpoint", "models/checkpoint.pt",
          "--live", "dvclive/train"])
    assert "starting 2 DDP processes (gloo backend)" in caplog.text
    model, meta = load_model(tmp_path / "models/model.pt")
    assert meta["nproc"] == 2
    metrics = json.loads((tmp_path / "dvclive/train/metrics.json").read_text())
    assert metrics["step"] == 2 and metrics["val"]["acc"] > 0.3  # chance is 0.1
    rows = json.loads((tmp_path / "dvclive/train/plots/custom/loss_history.json").read_text())
    assert rows[-1]["iteration"] == 2 * (640 // 32)  # global steps, not per process
