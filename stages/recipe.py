"""Training recipes: the optimizer's parameter groups, the learning-rate schedules, the
lookahead (EMA) of the weights, and the named presets of train params.

The ``airbench94`` preset is KellerJordan/cifar10-airbench's ``airbench94.py`` (94.01 %
mean over 1,000 runs, 3.83 s on an A100), https://github.com/KellerJordan/cifar10-airbench
(hyper-parameters in its ``hyp`` dict; paper: Jordan, "94% on CIFAR-10 in 3.29 Seconds on a
Single GPU", arXiv:2404.00498). Each of its parts is a train param of its own, off by
default; the preset switches them on. Its hyper-parameters are written there for a summed
loss; this loop averages the loss over the batch, so, with Nesterov momentum ``m`` and
batch ``B``: ``lr = hyp_lr / (1 + 1 / (1 - m))`` (11.5 / 7.667 = 1.5) and
``weight_decay = hyp_wd / hyp_lr`` (0.0153 / 11.5), which give the very same updates.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from stages.params import TrainParams

#: name -> the train params it sets; everything else (device, seed, threads...) is yours.
RECIPES: dict[str, dict[str, Any]] = {
    "airbench94": {
        "model": "airbench94", "batch_size": 1024, "epochs": 9.9, "optimizer": "sgd",
        "lr": 1.5, "momentum": 0.85, "weight_decay": 0.0153 / 11.5, "decay_all": True,
        "bias_lr_scale": 64.0, "schedule": "triangle", "label_smoothing": 0.2,
        "augment_flip": True, "flip_mode": "alternating", "augment_crop": 2,
        "crop_fill": "reflect", "whiten_bias_epochs": 3, "lookahead": True,
        "lookahead_start": 3, "lookahead_every": 5, "lookahead_decay": 0.95,
        "lookahead_power": 3.0,
    },
}


def recipe_name(p: TrainParams) -> str:
    """The preset ``p`` follows (every key it sets has its value), else ``custom``."""
    for name, values in RECIPES.items():
        if all(getattr(p, k) == v for k, v in values.items()):
            return name
    return "custom"


def set_flags(name: str) -> list[str]:
    """The ``-S train.key=value`` arguments of a preset, for ``dvc exp run``."""
    return [f"-S train.{k}={str(v).lower() if isinstance(v, bool) else v}"
            for k, v in RECIPES[name].items()]


# ----------------------------------------------------------------------------- optimizer
def _norm_biases(model: nn.Module) -> set[int]:
    return {id(m.bias) for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.bias is not None}


def make_optimizer(model: nn.Module, p: TrainParams) -> torch.optim.Optimizer:
    """Adam / AdamW / Nesterov SGD over up to four parameter groups.

    Weight decay goes to weights (ndim > 1) only, or to every parameter with
    ``decay_all``; BatchNorm biases take ``bias_lr_scale`` times the lr and, as in
    airbench94, the same decay per step (their ``weight_decay`` is divided by the scale).
    Each group's ``lr_scale`` multiplies the schedule's lr in every step.
    """
    norm_biases = _norm_biases(model)
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for q in model.parameters():
        if q.requires_grad:
            key = (id(q) in norm_biases, p.decay_all or q.ndim > 1)
            groups.setdefault(key, []).append(q)
    configs = []
    for (is_bias, decays), params in sorted(groups.items()):
        scale = p.bias_lr_scale if is_bias else 1.0
        configs.append({"params": params, "lr_scale": scale,
                        "weight_decay": p.weight_decay / scale if decays else 0.0})
    # one fused kernel for all parameters: fewer small ops per step (~4 % for the seed net)
    fused = all(q.device.type in ("cpu", "cuda") for q in model.parameters())
    if p.optimizer == "adam":
        return torch.optim.Adam(configs, lr=p.lr, fused=fused)
    if p.optimizer == "adamw":
        return torch.optim.AdamW(configs, lr=p.lr, fused=fused)
    return torch.optim.SGD(configs, lr=p.lr, momentum=p.momentum, nesterov=p.momentum > 0)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Every group's lr: ``lr`` times the group's ``lr_scale``."""
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def lr_at(step: int, total: int, p: TrainParams) -> float:
    """Learning rate at ``step`` (0-based) of ``total``; a pure function of the step, so a
    resumed run needs nothing but the step count.

    onecycle: up from 0.1x over 20 %, down to 0; cosine; constant; triangle (airbench94):
    0.2x -> 1x at step ``int(0.23 * total)`` -> 0.07x at the end, linearly.
    """
    t = step / max(1, total)
    if p.schedule == "onecycle":
        warm = 0.2
        scale = 0.1 + 0.9 * t / warm if t < warm else max(0.0, (1 - t) / (1 - warm))
    elif p.schedule == "cosine":
        scale = 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    elif p.schedule == "triangle":
        peak = int(0.23 * total)
        if step < peak:
            scale = 0.2 + 0.8 * step / peak
        else:
            scale = 1.0 + (0.07 - 1.0) * (step - peak) / max(1, total - peak)
    else:
        scale = 1.0
    return p.lr * scale


# ----------------------------------------------------------------------------- lookahead
class Lookahead:
    """airbench94's lookahead: an EMA of every float tensor of the model's state (weights
    and BatchNorm statistics), copied back into the model at each update."""

    def __init__(self, model: nn.Module) -> None:
        self.ema = {k: v.detach().clone() for k, v in model.state_dict().items()
                    if v.dtype.is_floating_point}

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        """``ema = decay * ema + (1 - decay) * model``; then ``model = ema``."""
        for k, v in model.state_dict().items():
            if k in self.ema:
                self.ema[k].lerp_(v, 1 - decay)
                v.copy_(self.ema[k])


def lookahead_decay(step: int, total: int, p: TrainParams) -> float:
    """The decay of the update after ``step`` steps (1-based): small early, large late."""
    return p.lookahead_decay ** p.lookahead_every * (step / total) ** p.lookahead_power


def lookahead_due(epoch: int, step: int, p: TrainParams) -> bool:
    """Whether the lookahead updates after global step ``step`` (1-based) of ``epoch``."""
    return p.lookahead and epoch >= p.lookahead_start and step % p.lookahead_every == 0


def whiten_bias_frozen(epoch: int, p: TrainParams) -> bool:
    """True once the whitening conv's bias stops learning (after ``whiten_bias_epochs``)."""
    return p.whiten_bias_epochs is not None and epoch >= p.whiten_bias_epochs


def main(argv: list[str] | None = None) -> None:
    """``python -m stages.recipe NAME``: print the preset's ``-S`` flags for ``dvc exp run``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m stages.recipe",
                                 description="print a preset's -S flags for dvc exp run")
    ap.add_argument("name", choices=sorted(RECIPES))
    print(" ".join(set_flags(ap.parse_args(argv).name)))


if __name__ == "__main__":
    main()
