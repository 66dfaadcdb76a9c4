"""Stage ``train``: data/processed -> models/model.pt, a resumable checkpoint, dvclive logs.

In parts, as airbench's: :class:`~stages.loader.TrainLoader` serves augmented batches of
the device-resident split; :func:`train_step` is one optimisation step; :func:`fit` is the
epoch loop (schedule, lookahead, divergence check, validation) and returns the model and its
history; :func:`main` does the files. The optimizer groups, schedules and presets live in
:mod:`stages.recipe`, the device policy in :mod:`stages.device`, the run identity in
:mod:`stages.fingerprint`.

Reproducible: the same params and data give the same weights and ``metrics.json`` bit for
bit on the CPU. Resumable: after every epoch :func:`main` writes ``checkpoint.pt``
atomically (weights, optimizer, step, generator state, history and a fingerprint of the
params, data and code); a re-run with the same fingerprint continues from it and ends
exactly where an uninterrupted run would. Wall-clock times go to the log only, never into
a tracked output, so a rerun with identical results leaves ``dvc.lock`` unchanged.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stages.ddp import from_rank0, join_launched, launch, launched
from stages.device import (
    Settings,
    autocast,
    keep_freed_memory,
    pick_device,
    resolve_settings,
    set_threads,
)
from stages.errors import UserError, run_cli
from stages.fingerprint import code_fingerprint, data_fingerprint, run_fingerprint
from stages.io import atomic_file, read_processed, remove_output
from stages.loader import TrainLoader
from stages.models import build_model, save_model, save_torch
from stages.params import TrainParams, load_params
from stages.recipe import (
    Lookahead,
    lookahead_decay,
    lookahead_due,
    lr_at,
    make_optimizer,
    recipe_name,
    set_lr,
    whiten_bias_frozen,
)

log = logging.getLogger("convflow.train")

CHECKPOINT_FORMAT = "convflow-checkpoint/2"
EVAL_BATCH = 1024


# =============================================================================== Data
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


def load_processed(folder: str | Path) -> Dataset:
    """Read ``train.npz``, ``val.npz`` and ``stats.json`` written by the normalize stage."""
    stats, splits = read_processed(folder, ("train", "val"))
    (train_x, train_y), (val_x, val_y) = splits["train"], splits["val"]
    if len(train_x) == 0:
        raise UserError(f"{Path(folder) / 'train.npz'}: no training images")
    return Dataset(train_x, train_y, val_x, val_y, stats["classes"], stats["mean"], stats["std"])


# =============================================================================== Training
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


def _ddp() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: Settings,
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
    rank, world = _ddp()
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
        if rank == 0 and len(val_x):
            val_loss, val_acc = evaluate(run.model, val_x, val_y, settings)
            record.update({"val/loss": round(val_loss, 6), "val/acc": round(val_acc, 6)})
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


# =============================================================================== Logging
#: Series logged per epoch (step = epoch) under dvclive's plots/metrics/.
#: No wall-clock series: it would change every run, and with it dvc.lock and the plot stage.
SERIES = ("train/loss", "train/acc", "val/loss", "val/acc", "lr")


class LiveLog:
    """dvclive for this stage, rebuilt from the history on resume so series never fork."""

    def __init__(self, folder: str | Path) -> None:
        from dvclive import Live

        self.live = Live(str(folder), save_dvc_exp=False, dvcyaml=None, resume=False,
                         report=None)

    def epoch(self, record: dict[str, float]) -> None:
        """Log one epoch's record with step = epoch (the summary is written by finish only,
        so a run killed mid-way leaves no metrics.json passing for the current result)."""
        self.live.step = int(record["epoch"])
        for name in SERIES:
            if name in record:
                self.live.log_metric(name, record[name])

    def finish(self, history: History) -> None:
        """Write the per-iteration loss history and the final summary."""
        if history.loss_rows:
            self.live.log_plot("loss_history", history.loss_rows, x="iteration", y="loss",
                               title="training loss per iteration")
        self.live.make_summary()
        self.live.end()


# =============================================================================== Stage
def load_checkpoint(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """The checkpoint's state if it was made by this exact run (params, data, code), else None."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a torn or foreign file is just not resumed
        log.warning("ignoring unreadable checkpoint %s (%s)", path, err)
        return None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        log.warning("ignoring %s: not a convflow checkpoint", path)
        return None
    if state.get("fingerprint") != fingerprint:
        log.info("ignoring %s: made with other train params, data or training code; starting fresh",
                 path)
        return None
    return state


def train_process(data_dir: str, model_path: str, checkpoint_path: str, live_dir: str,
                  p: TrainParams, device_name: str) -> FitResult:
    """Everything one training process does (rank 0 of several writes the outputs)."""
    rank, world = _ddp()
    device = torch.device(device_name)
    keep_freed_memory()  # each step reuses the last one's activation memory (~18 % on CPUs)
    if device.type == "cuda" and world > 1:  # one GPU per process of this machine
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    data = load_processed(data_dir)
    fingerprint = run_fingerprint(p, data_fingerprint(data_dir), code_fingerprint())
    # rank 0's checkpoint for every rank: on several machines only rank 0's folder has it
    resume = from_rank0(load_checkpoint(Path(checkpoint_path), fingerprint) if rank == 0
                        else None)
    live = LiveLog(live_dir) if rank == 0 else None
    if live is not None and resume is not None:
        for record in resume["history"]["epochs"]:
            live.epoch(record)

    # one checkpoint per machine (its local rank 0): whichever machine is rank 0 after an
    # elastic restart has it; the replicas' states are equal, and rank 0's is sent to all
    writes_checkpoint = int(os.environ.get("LOCAL_RANK", rank)) == 0

    def on_epoch(record: dict[str, float], state_fn: Callable[[], dict[str, Any]]) -> None:
        if writes_checkpoint:
            state = state_fn()
            state.update(format=CHECKPOINT_FORMAT, fingerprint=fingerprint)
            with atomic_file(checkpoint_path) as tmp:
                save_torch(state, tmp)  # a full disk: one line, as for every output
        if live is not None:
            live.epoch(record)

    t0 = time.perf_counter()
    result = fit(p, data, device, resume=resume, on_epoch=on_epoch)
    seconds = time.perf_counter() - t0
    final = result.history.epochs[-1] if result.history.epochs else {}
    if rank == 0:
        summary = {k: final[k] for k in ("train/loss", "train/acc", "val/loss", "val/acc")
                   if k in final}
        with atomic_file(model_path) as tmp:
            save_model(tmp, result.model, arch=p.model, classes=data.classes, mean=data.mean,
                       std=data.std, extra={
                           "recipe": recipe_name(p), "params": p.model_dump(mode="json"),
                           "settings": vars(result.settings),
                           "data": {"n_train": len(data.train_x), "n_val": len(data.val_x),
                                    "fingerprint": fingerprint},
                           "metrics": summary, "device": device.type, "nproc": world})
        live.finish(result.history)
        log.info("trained %s for %s epochs in %.1f s (this run); val acc %s -> %s", p.model,
                 p.epochs, seconds, final.get("val/acc"), model_path)
    return result


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: ``python -m stages.train --data D --model M --checkpoint C --live L``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="processed data folder (normalize's output)")
    ap.add_argument("--model", required=True, help="model file to write")
    ap.add_argument("--checkpoint", required=True, help="resumable checkpoint file")
    ap.add_argument("--live", required=True, help="dvclive folder")
    args = ap.parse_args(argv)
    p = load_params().train
    # no stale model may survive a failed or interrupted run looking valid
    remove_output(args.model)
    device = pick_device(p.device, logger=log, param="train.device")
    threads = set_threads(p.threads, p.nproc)
    log.info("torch %s, %d CPU thread(s) per process, %d process(es)", torch.__version__,
             threads, p.nproc)
    if launched():  # torchrun (or a launcher with its contract) started this process
        join_launched(train_process, p.nproc, device,
                      (args.data, args.model, args.checkpoint, args.live, p, str(device)))
    elif p.nproc > 1:
        launch(train_process, p.nproc, device,
               (args.data, args.model, args.checkpoint, args.live, p, str(device)),
               threads=threads)
    else:
        train_process(args.data, args.model, args.checkpoint, args.live, p, str(device))


if __name__ == "__main__":
    run_cli(main)
