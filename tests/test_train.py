"""The train stage's core: it learns, reruns are bit-identical, bad runs stop cleanly."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PROJECT, subprocess_env
from train_data import crop_and_flip, learnable_images, write_processed, write_train_params

from stages.device import pick_device
from stages.errors import UserError
from stages.loader import TrainLoader
from stages.models import load_model
from stages.params import TrainParams
from stages.recipe import lr_at
from stages.train import main

STAGE_ARGS = ["--data", "proc", "--model", "models/model.pt", "--checkpoint",
              "models/checkpoint.pt", "--live", "dvclive/train"]


def run_stage(folder: Path, monkeypatch: pytest.MonkeyPatch, **train: object) -> dict:
    """Run the real stage main() in ``folder`` (which holds proc/); return metrics.json."""
    write_train_params(folder, **train)
    monkeypatch.chdir(folder)
    main(STAGE_ARGS)
    return json.loads((folder / "dvclive/train/metrics.json").read_text())


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "models/model.pt", weights_only=True)["state_dict"]


def test_training_lowers_the_loss_and_beats_chance(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    write_processed(tmp_path / "proc", n_train=600, n_val=200)
    metrics = run_stage(tmp_path, monkeypatch, epochs=3, batch_size=32)
    rows = json.loads((tmp_path / "dvclive/train/plots/custom/loss_history.json").read_text())
    # the tutorial's per-iteration loss history, every log_every (2) steps
    assert [r["iteration"] for r in rows[:3]] == [2, 4, 6]
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]
    assert metrics["val"]["acc"] > 0.5  # chance is 0.1
    assert metrics["step"] == 3
    series = tmp_path / "dvclive/train/plots/metrics"
    assert not (series / "epoch_time.tsv").exists()  # wall time is never a tracked output
    for name in ("train/loss", "train/acc", "val/loss", "val/acc", "lr"):
        lines = (series / f"{name}.tsv").read_text().splitlines()
        assert lines[0] == f"step\t{name.split('/')[-1]}" and len(lines) == 4, name
    model, meta = load_model(tmp_path / "models/model.pt")
    assert meta["arch"] == "seed_net" and meta["params"]["epochs"] == 3
    assert meta["classes"][0] == "class0" and meta["normalization"]["std"] == [0.25] * 3
    x, y = learnable_images(200, seed=1)  # the val split
    with torch.no_grad():
        acc = (model(torch.from_numpy(x)).argmax(1).numpy() == y).mean()
    assert acc == pytest.approx(metrics["val"]["acc"])


def test_reruns_are_bit_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    results = []
    for run in ("a", "b"):
        folder = tmp_path / run
        write_processed(folder / "proc", n_train=300, n_val=64)
        run_stage(folder, monkeypatch, epochs=2, batch_size=32)
        results.append(folder)
    a, b = results
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    for rel in ("dvclive/train/metrics.json", "dvclive/train/plots/custom/loss_history.json",
                "dvclive/train/plots/metrics/val/loss.tsv"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_checkpoint_from_other_params_or_data_is_ignored(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="convflow")
    fresh = tmp_path / "fresh"
    write_processed(fresh / "proc", n_train=300, n_val=64)
    run_stage(fresh, monkeypatch, epochs=2, lr=0.002)

    stale = tmp_path / "stale"
    write_processed(stale / "proc", n_train=300, n_val=64)
    run_stage(stale, monkeypatch, epochs=2, lr=0.01)  # leaves a complete checkpoint
    caplog.clear()
    run_stage(stale, monkeypatch, epochs=2, lr=0.002)
    assert "made with other train params, data or training code" in caplog.text
    assert all(torch.equal(v, weights(fresh)[k]) for k, v in weights(stale).items())

    # same params, other data: also a fresh start
    write_processed(stale / "proc", n_train=300, n_val=64, seed=7)
    caplog.clear()
    run_stage(stale, monkeypatch, epochs=2, lr=0.002)
    assert "made with other train params, data or training code" in caplog.text
    # and a matching checkpoint of a finished run is resumed (nothing left to train)
    caplog.clear()
    run_stage(stale, monkeypatch, epochs=2, lr=0.002)
    assert "resuming after epoch 2 of 2" in caplog.text
    # same params and data, other training code (an edited model or loop): a fresh start
    monkeypatch.setattr("stages.train.code_fingerprint", lambda: "edited models.py")
    caplog.clear()
    run_stage(stale, monkeypatch, epochs=2, lr=0.002)
    assert "made with other train params, data or training code" in caplog.text
    assert "resuming" not in caplog.text


def test_non_finite_loss_stops_naming_the_step(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    write_processed(tmp_path / "proc", n_train=300, n_val=64)
    stale = tmp_path / "models/model.pt"
    stale.parent.mkdir()
    stale.write_bytes(b"an old model that must not survive")
    with pytest.raises(UserError, match=r"loss became (nan|inf) at step \d+ .*train.lr"):
        run_stage(tmp_path, monkeypatch, epochs=3, lr=1e9, optimizer="sgd", schedule="constant")
    assert not stale.exists()
    assert not list(stale.parent.glob("*model.pt*"))  # no temp file either


def test_cuda_without_a_gpu_is_a_clear_error(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError, match="train.device.*no usable CUDA"):
        pick_device("cuda", logger=logging.getLogger("t"), param="train.device")
    write_processed(tmp_path / "proc", n_train=64, n_val=16)
    write_train_params(tmp_path, device="cuda")
    proc = subprocess.run([sys.executable, "-m", "stages.train", *STAGE_ARGS], cwd=tmp_path,
                          env={**subprocess_env(), "PYTHONPATH": str(PROJECT)},
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "train.device: 'cuda' was asked for" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_loader_batches_are_crops_of_zero_padded_images_then_flips() -> None:
    p = TrainParams(augment_flip=True, augment_crop=4, batch_size=64)
    x = torch.randint(1, 256, (128, 3, 32, 32), dtype=torch.uint8)
    loader = TrainLoader(x, torch.arange(128), p, torch.Generator().manual_seed(0))
    drawn = [crop_and_flip(img, x[k], 4, "zeros") for xb, yb in loader
             for img, k in zip(xb, yb, strict=True)]
    assert len(drawn) == 128 and None not in drawn  # every image once, a crop of itself
    dx, dy, flip = zip(*drawn, strict=True)
    assert len(set(dx)) == 9 and len(set(dy)) == 9 and 0.3 < np.mean(flip) < 0.7
    plain = TrainLoader(x, torch.arange(128), TrainParams(augment_flip=False, augment_crop=0,
                                                          batch_size=64), torch.Generator())
    assert all(torch.equal(img, x[k]) for xb, yb in plain for img, k in zip(xb, yb, strict=True))


def test_onecycle_schedule_warms_up_then_anneals_to_zero() -> None:
    p = TrainParams(lr=0.1, schedule="onecycle")
    lrs = np.array([lr_at(s, 100, p) for s in range(101)])
    assert lrs[0] == pytest.approx(0.01) and lrs.max() == pytest.approx(0.1)
    assert lrs.argmax() == 20 and lrs[-1] == 0.0
    assert lr_at(50, 100, TrainParams(lr=0.1, schedule="constant")) == 0.1

