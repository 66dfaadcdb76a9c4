"""airbench94's parts, each on its own at small scale, and the preset as a whole."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from train_data import crop_and_flip, write_processed, write_train_params

from stages.loader import TrainLoader
from stages.loop import fit
from stages.models import build_model, load_model
from stages.params import TrainParams
from stages.recipe import (
    RECIPES,
    Lookahead,
    lookahead_decay,
    lookahead_due,
    lr_at,
    make_optimizer,
    recipe_name,
    set_flags,
    set_lr,
)
from stages.train import load_processed, main
from stages.tta import tta_accuracy, tta_logits

#: The preset with its network shrunk to air_small and every part due within 3.5 epochs,
#: so the whole recipe runs in seconds on a CPU.
SMALL_PRESET = {**RECIPES["airbench94"], "model": "air_small", "batch_size": 64,
                "epochs": 3.5, "whiten_bias_epochs": 1, "lookahead_start": 1,
                "lookahead_every": 2, "threads": 1, "log_every": 4, "device": "cpu"}
ARGS = ["--data", "proc", "--model", "models/model.pt", "--checkpoint", "models/checkpoint.pt",
        "--live", "dvclive/train"]


def test_preset_is_airbench94s_hyperparameters() -> None:
    r = TrainParams(**RECIPES["airbench94"])
    # airbench94.py: lr 11.5 and wd 0.0153 per 1024 examples for a summed loss, Nesterov 0.85
    assert r.lr == pytest.approx(11.5 / (1 + 1 / (1 - 0.85)))
    assert r.lr * r.weight_decay == pytest.approx(0.0153 * 1024 / (1024 * (1 + 1 / 0.15)) * 1)
    assert (r.batch_size, r.epochs, r.label_smoothing, r.bias_lr_scale) == (1024, 9.9, 0.2, 64)
    assert recipe_name(r) == "airbench94" and recipe_name(TrainParams()) == "custom"
    assert "-S train.lookahead=true" in set_flags("airbench94")


def test_lookahead_update_equals_the_hand_computation() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    la = Lookahead(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.add_(2.0)
    now = {k: v.clone() for k, v in model.state_dict().items()}
    la.update(model, decay=0.3)
    for k, v in model.state_dict().items():
        if v.dtype.is_floating_point:
            torch.testing.assert_close(v, 0.3 * before[k] + 0.7 * now[k])
            assert torch.equal(la.ema[k], v)
    assert "1.num_batches_tracked" not in la.ema  # integer state is left alone
    p = TrainParams(lookahead=True, lookahead_start=3, lookahead_every=5)
    assert lookahead_decay(50, 100, p) == pytest.approx(0.95 ** 5 * 0.5 ** 3)
    assert [s for s in range(1, 21) if lookahead_due(3, s, p)] == [5, 10, 15, 20]
    assert not lookahead_due(2, 5, p) and not lookahead_due(3, 5, TrainParams())


def test_tta_averages_exactly_the_expected_views() -> None:
    torch.manual_seed(0)
    model = build_model("seed_net", 10, [0.5] * 3, [0.25] * 3).eval()
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    padded = F.pad(x.float(), (1, 1, 1, 1), mode="reflect")
    views = {"id": x.float(), "down_right": padded[..., :32, :32],
             "up_left": padded[..., 2:, 2:]}
    weights = {"id": 1 / 4, "down_right": 1 / 8, "up_left": 1 / 8}
    with torch.no_grad():
        expected = sum(w * (model(views[k]) + model(views[k].flip(-1)))
                       for k, w in weights.items())
        torch.testing.assert_close(tta_logits(model, x, 2), expected)
        torch.testing.assert_close(tta_logits(model, x, 1),
                                   0.5 * (model(x) + model(x.flip(-1))))
        assert torch.equal(tta_logits(model, x, 0), model(x))
    y = tta_logits(model, x, 2).argmax(1).numpy()
    assert tta_accuracy(model, x.numpy(), y, 2) == 1.0


def test_loader_reflect_crop_equals_reflect_padding_then_crop() -> None:
    p = TrainParams(augment_crop=2, crop_fill="reflect", batch_size=32)
    x = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    (xb, yb), = list(TrainLoader(x, torch.arange(32), p, torch.Generator().manual_seed(0)))
    drawn = [crop_and_flip(img, x[k], 2, "reflect") for img, k in zip(xb, yb, strict=True)]
    assert None not in drawn
    assert any(dx in (0, 4) or dy in (0, 4) for dx, dy, _ in drawn)  # the mirror is used


def test_alternating_flip_inverts_each_images_flip_every_other_epoch() -> None:
    x = torch.arange(8, dtype=torch.uint8).view(8, 1, 1, 1).expand(8, 3, 32, 32).clone()
    x[:, :, :, 0] = 255  # a marker column shows whether an image was flipped
    p = TrainParams(batch_size=8, augment_crop=0, flip_mode="alternating")
    loader = TrainLoader(x, torch.arange(8), p, torch.Generator().manual_seed(0))
    seen = []
    for _ in range(3):
        (xb, yb), = list(loader)
        flipped = {int(i): bool(img[0, 0, -1] == 255) for i, img in zip(yb, xb, strict=True)}
        seen.append([flipped[i] for i in range(8)])
    assert seen[1] == [not f for f in seen[0]] and seen[2] == seen[0]
    assert 0 < sum(seen[0]) < 8


def test_per_group_learning_rates_and_decay() -> None:
    model = build_model("air_small", 10, [0.5] * 3, [0.25] * 3)
    p = TrainParams(**{**RECIPES["airbench94"], "model": "air_small"})
    opt = make_optimizer(model, p)
    set_lr(opt, 0.5)
    norm_biases = {id(m.bias) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    by_scale = {g["lr_scale"]: g for g in opt.param_groups}
    assert set(by_scale) == {1.0, 64.0}
    assert {id(q) for q in by_scale[64.0]["params"]} == norm_biases
    assert by_scale[64.0]["lr"] == 32.0 and by_scale[1.0]["lr"] == 0.5
    # the same decay per step for both (airbench94: the bias lr scale spares the decay)
    assert by_scale[64.0]["weight_decay"] * 64 == pytest.approx(p.weight_decay)
    assert by_scale[1.0]["weight_decay"] == p.weight_decay  # decay_all: biases too
    # the default: one lr, no decay on 1-D parameters
    groups = make_optimizer(model, TrainParams(model="air_small")).param_groups
    assert {g["lr_scale"] for g in groups} == {1.0}
    assert {g["weight_decay"] for g in groups} == {0.0, TrainParams().weight_decay}


def test_triangle_schedule_is_airbench94s() -> None:
    p = TrainParams(lr=1.0, schedule="triangle")
    lrs = [lr_at(s, 476, p) for s in range(477)]
    assert lrs[0] == pytest.approx(0.2) and max(lrs) == 1.0 and lrs.index(1.0) == 109
    assert lrs[-1] == pytest.approx(0.07)


def test_whitening_bias_learns_only_for_its_epochs(tmp_path: Path) -> None:
    data = load_processed(write_processed(tmp_path / "proc", n_train=128, n_val=16))
    biases = []
    p = TrainParams(model="air_small", epochs=3, batch_size=32, whiten_bias_epochs=1,
                    device="cpu", optimizer="sgd", lr=0.05)
    fit(p, data, torch.device("cpu"),
        on_epoch=lambda _r, state: biases.append(state()["model"]["1.whiten.bias"]))
    assert not torch.equal(biases[0], torch.zeros_like(biases[0]))  # it learned in epoch 1
    assert torch.equal(biases[0], biases[1]) and torch.equal(biases[1], biases[2])


def test_small_preset_learns_reruns_identically_and_records_its_recipe(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    outs = []
    for run in ("a", "b"):
        folder = tmp_path / run
        write_processed(folder / "proc", n_train=512, n_val=128)
        write_train_params(folder, **SMALL_PRESET)
        monkeypatch.chdir(folder)
        main(ARGS)
        outs.append(folder)
    a, b = outs
    assert (a / "models/model.pt").read_bytes() == (b / "models/model.pt").read_bytes()
    metrics = json.loads((a / "dvclive/train/metrics.json").read_text())
    assert metrics["step"] == 4 and metrics["val"]["acc"] > 0.5  # chance is 0.1
    rows = json.loads((a / "dvclive/train/plots/custom/loss_history.json").read_text())
    assert rows[-1]["iteration"] == 28  # 3.5 epochs of 8 steps
    _, meta = load_model(a / "models/model.pt")
    assert meta["recipe"] == "custom" and meta["params"]["flip_mode"] == "alternating"


def test_model_file_names_the_recipe_that_made_it(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = {"model": "seed_net", "epochs": 1, "batch_size": 32}
    monkeypatch.setitem(RECIPES, "tiny", tiny)
    write_processed(tmp_path / "proc", n_train=64, n_val=16)
    write_train_params(tmp_path, **tiny)
    monkeypatch.chdir(tmp_path)
    main(ARGS)
    assert load_model(tmp_path / "models/model.pt")[1]["recipe"] == "tiny"


def test_recipe_cli_prints_the_flags(capsys: pytest.CaptureFixture) -> None:
    from stages.recipe import main as recipe_main

    recipe_main(["airbench94"])
    flags = capsys.readouterr().out.split()
    assert flags[:2] == ["-S", "train.model=airbench94"] and len(flags) == 2 * len(
        RECIPES["airbench94"])
    with pytest.raises(SystemExit) as info:
        recipe_main(["nope"])
    assert info.value.code == 2
