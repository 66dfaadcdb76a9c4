"""The training loop, in parts as airbench's: :func:`setup_run` builds the model, optimizer
and :class:`~stages.loader.TrainLoader` on the device; :func:`train_step` is one
optimisation step; :func:`train_epoch` one pass of the loader; :func:`fit` the epoch loop
(schedule, lookahead, divergence check, :func:`validate`) returning the model and its
history. No files: the stage (:mod:`stages.train`) reads the data and writes the outputs.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stages.ddp import from_rank0
from stages.device import Settings, autocast, resolve_settings
from stages.errors import UserError
from stages.loader import TrainLoader
from stages.models import build_model
from stages.params import TrainParams
from stages.recipe import (
    Lookahead,
    lookahead_decay,
    lookahead_due,
    lr_at,
    make_optimizer,
    set_lr,
    whiten_bias_frozen,
)

log = logging.getLogger("convflow.train")

EVAL_BATCH = 1024


@dataclass
class Dataset:
    """The processed splits (uint8 NCHW numpy) and what the model must remember of them."""

    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    classes: list[str]
    mean: list[float]
    std: list[float]


@dataclass
class History:
    """What is logged: one record per epoch, and the per-iteration loss history."""

    epochs: list[dict[str, float]] = field(default_factory=list)
    loss_rows: list[dict[str, float]] = field(default_factory=list)


@dataclass
class FitResult:
    """The trained model (eval mode), its history, what ``auto`` resolved to, and the
    wall-clock seconds of each epoch this call ran (kept out of the history: not tracked)."""

    model: nn.Module
    history: History
    settings: Settings
    epoch_seconds: list[float] = field(default_factory=list)


def ddp_rank() -> tuple[int, int]:
    """This process's rank and the world size (0, 1 outside ``torch.distributed``)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def validate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: Settings,
             batch: int = EVAL_BATCH) -> tuple[float, float]:
    """Mean cross-entropy (no smoothing) and accuracy of ``model`` on uint8 ``x``."""
    was_training = model.training
    model.eval()
    loss = torch.zeros((), device=x.device, dtype=torch.float64)
    correct = torch.zeros((), device=x.device, dtype=torch.int64)
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        if settings.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with autocast(x.device, settings):
            out = model(xb).float()
        loss += F.cross_entropy(out, y[i:i + batch], reduction="sum").double()
        correct += (out.argmax(1) == y[i:i + batch]).sum()
    model.train(was_training)
    n = max(1, len(x))
    return float(loss) / n, int(correct) / n


@dataclass
class Run:
    """Everything a training run carries from step to step, and its checkpoint state."""

    p: TrainParams
    model: nn.Module  # the bare model (what is saved)
    step_model: nn.Module  # what steps: the model, wrapped by DDP and/or torch.compile
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    gen: torch.Generator
    loader: TrainLoader
    history: History = field(default_factory=History)
    lookahead: Lookahead | None = None

    def state(self) -> dict[str, Any]:
        """A checkpoint of the run after its last finished epoch (CPU tensors, plain data)."""
        cpu = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        ema = None if self.lookahead is None else {
            k: v.cpu().clone() for k, v in self.lookahead.ema.items()}
        return {"model": cpu, "optimizer": self.opt.state_dict(),
                "scaler": self.scaler.state_dict(), "generator": self.gen.get_state().cpu(),
                "epoch": len(self.history.epochs), "lookahead": ema,
                "history": {"epochs": list(self.history.epochs),
                            "loss_rows": list(self.history.loss_rows)}}

    def restore(self, state: dict[str, Any]) -> int:
        """Continue from ``state()`` of an earlier run; return the epoch to start at."""
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.gen.set_state(state["generator"].to(self.gen.get_state().device))
        self.history = History(list(state["history"]["epochs"]),
                               list(state["history"]["loss_rows"]))
        if state.get("lookahead") is not None:
            self.lookahead = Lookahead(self.model)
            device = next(iter(self.lookahead.ema.values())).device
            self.lookahead.ema = {k: v.to(device) for k, v in state["lookahead"].items()}
        self.loader.epoch = int(state["epoch"])
        return int(state["epoch"])


def setup_run(p: TrainParams, data: Dataset, device: torch.device, settings: Settings,
              rank: int, world: int) -> tuple[Run, torch.Tensor, torch.Tensor]:
    """Seed, put the data on the device, build model and optimizer; also the val split."""
    if device.type == "cpu":
        # bit-identical reruns on the CPU; on CUDA speed wins (cuDNN picks its kernels)
        torch.use_deterministic_algorithms(True, warn_only=True)
        # ...without the mode's NaN-filling of every new tensor (a debugging aid for ops
        # that read memory they never wrote; ~2.5 % of a seed-net step): the rerun tests
        # compare bit for bit, which is what would show such an op
        torch.utils.deterministic.fill_uninitialized_memory = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(p.seed)

    def to_device(x: np.ndarray, labels: bool = False) -> torch.Tensor:
        arr = np.asarray(x, np.int64) if labels else np.ascontiguousarray(x)
        return torch.from_numpy(arr).to(device)

    train_x, train_y = to_device(data.train_x), to_device(data.train_y, labels=True)
    model = build_model(p.model, len(data.classes), data.mean, data.std)
    if hasattr(model[1], "init_whitening"):
        model[1].init_whitening(model[0](train_x[:5000].cpu()))
    layout = torch.channels_last if settings.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=layout)
    step_model: nn.Module = model
    if world > 1:
        step_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if settings.compile:
        step_model = torch.compile(step_model)
    gen = torch.Generator(device=device).manual_seed(p.seed)
    run = Run(p, model, step_model, make_optimizer(model, p),
              torch.amp.GradScaler(device.type, enabled=settings.precision == "fp16"), gen,
              TrainLoader(train_x, train_y, p, gen, rank, world, settings.channels_last))
    return run, to_device(data.val_x), to_device(data.val_y, labels=True)


def train_step(run: Run, criterion: nn.Module, xb: torch.Tensor, yb: torch.Tensor,
               settings: Settings, freeze_whiten_bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on a batch; returns the (detached) loss and logits."""
    with autocast(xb.device, settings):
        out = run.step_model(xb)
        loss = criterion(out.float(), yb)
    run.opt.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if freeze_whiten_bias:
        # no gradient = no update, no momentum, no decay (as requires_grad=False upstream)
        run.model[1].whiten.bias.grad = None
    run.scaler.step(run.opt)
    run.scaler.update()
    return loss.detach(), out.detach()


def check_window(window: torch.Tensor, k: int, step: int, epoch: int, total: int,
                 p: TrainParams, world: int) -> float:
    """Mean of the last ``k`` losses (all processes); a non-finite one stops the run.

    One host sync per ``log_every`` steps; the error names the exact step it first appeared.
    """
    if world > 1:
        torch.distributed.all_reduce(window)
        window /= world
    values = window[:k].tolist()
    for j, v in enumerate(values):
        if not math.isfinite(v):
            bad = step - (k - 1) + j + 1
            raise UserError(
                f"training diverged: the loss became {v} at step {bad} (epoch {epoch + 1}, "
                f"lr {lr_at(bad - 1, total, p):.3g}); lower train.lr or check the data; "
                "no model was written")
    return sum(values) / k


def train_epoch(run: Run, epoch: int, total: int, criterion: nn.Module, settings: Settings,
                world: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One pass of the loader (stopping at ``total`` steps): this process's loss sum and
    correct count, and the steps taken."""
    p, steps = run.p, len(run.loader)
    window = torch.zeros(p.log_every, device=run.loader.device)
    loss_sum = torch.zeros((), device=window.device, dtype=torch.float64)
    correct = torch.zeros((), device=window.device, dtype=torch.int64)
    frozen = whiten_bias_frozen(epoch, p)
    last = min(steps, total - epoch * steps) - 1
    run.step_model.train()
    for i, (xb, yb) in enumerate(run.loader):
        step = epoch * steps + i
        set_lr(run.opt, lr_at(step, total, p))
        loss, out = train_step(run, criterion, xb, yb, settings, frozen)
        window[i % p.log_every] = loss
        loss_sum += loss.double()
        correct += (out.argmax(1) == yb).sum()
        if lookahead_due(epoch, step + 1, p):
            if run.lookahead is None:
                run.lookahead = Lookahead(run.model)
            else:
                run.lookahead.update(run.model, lookahead_decay(step + 1, total, p))
        if (i + 1) % p.log_every == 0 or i == last:
            k = i % p.log_every + 1
            mean = check_window(window, k, step, epoch, total, p, world)
            run.history.loss_rows.append({"iteration": step + 1, "loss": round(mean, 6)})
        if i == last:
            break
    if run.lookahead is not None:
        run.lookahead.update(run.model, 1.0)  # the model ends each epoch at the average
    return loss_sum, correct, last + 1


def validated(model: nn.Module, val_x: torch.Tensor, val_y: torch.Tensor, settings: Settings,
              rank: int, world: int) -> dict[str, float]:
    """Rank 0's validation metrics, on every rank, each replica holding rank 0's model.

    BatchNorm's running statistics are each process's own after its last step (DDP sends
    rank 0's at the next forward): they are made rank 0's here, which changes nothing rank
    0 computes and lets any machine write the same model and history.
    """
    if world > 1:
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)
    out: dict[str, float] = {}
    if rank == 0 and len(val_x):
        val_loss, val_acc = validate(model, val_x, val_y, settings)
        out = {"val/loss": round(val_loss, 6), "val/acc": round(val_acc, 6)}
    return from_rank0(out)


def fit(p: TrainParams, data: Dataset, device: torch.device, *,
        resume: dict[str, Any] | None = None,
        on_epoch: Callable[[dict[str, Any], Callable[[], dict[str, Any]]], None] | None = None,
        ) -> FitResult:
    """Train ``p.model`` on ``data``; call ``on_epoch(record, state_fn)`` after each epoch.

    ``resume`` is a checkpoint state from ``state_fn()`` of an earlier, interrupted run with
    the same params and data; training continues after its epoch. Under
    ``torch.distributed`` each process takes its share of every (global) batch and DDP
    averages the gradients.
    """
    rank, world = ddp_rank()
    settings = resolve_settings(device, p.precision, p.channels_last, p.compile)
    run, val_x, val_y = setup_run(p, data, device, settings, rank, world)
    steps = len(run.loader)
    total = math.ceil(steps * p.epochs)  # a fractional epoch count ends the last one early
    start = run.restore(resume) if resume is not None else 0
    if resume is not None:
        log.info("resuming after epoch %d of %d from the checkpoint", start, math.ceil(p.epochs))
    criterion = nn.CrossEntropyLoss(label_smoothing=p.label_smoothing)
    seconds = []
    for epoch in range(start, math.ceil(p.epochs)):
        t0 = time.perf_counter()
        loss_sum, correct, taken = train_epoch(run, epoch, total, criterion, settings, world)
        if world > 1:
            stats = torch.stack([loss_sum, correct.double()])
            torch.distributed.all_reduce(stats)
            loss_sum, correct = stats[0], stats[1]
        record: dict[str, float] = {"epoch": epoch + 1,
                                    "train/loss": round(float(loss_sum) / (taken * world), 6),
                                    "train/acc": round(float(correct) / (taken * run.loader.batch),
                                                       6)}
        record.update(validated(run.model, val_x, val_y, settings, rank, world))
        record["lr"] = lr_at(min(total, (epoch + 1) * steps) - 1, total, p)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - t0)
        run.history.epochs.append(record)
        log.info("epoch %d/%d  %s  (%.2f s)", epoch + 1, math.ceil(p.epochs),
                 "  ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "epoch"),
                 seconds[-1])
        if on_epoch is not None:
            on_epoch(record, run.state)
    return FitResult(run.model.eval(), run.history, settings, seconds)
