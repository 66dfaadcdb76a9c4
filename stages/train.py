"""Stage ``train``: data/processed -> models/model.pt, a resumable checkpoint, dvclive logs.

The whole training split lives on the device as uint8; each epoch draws one permutation
and the augmentation offsets from a seeded generator, and batches are index gathers plus a
few tensor ops (no DataLoader, no per-sample Python). The core, :func:`fit`, takes arrays
and params and returns the model and its history; :func:`main` does the files.

Reproducible: the same params and data give the same weights and ``metrics.json`` bit for
bit on the CPU. Resumable: after every epoch :func:`main` writes ``checkpoint.pt``
atomically (weights, optimizer, step, generator state, history and a fingerprint of the
params and data); a re-run with the same fingerprint continues from it and ends exactly
where an uninterrupted run would.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stages.device import pick_device, set_threads
from stages.errors import UserError, run_cli
from stages.io import atomic_file, read_processed, remove_output
from stages.models import build_model, save_model
from stages.params import TrainParams, load_params

log = logging.getLogger("convflow.train")

CHECKPOINT_FORMAT = "convflow-checkpoint/1"
EVAL_BATCH = 1024


# =============================================================================== Setup
@dataclass(frozen=True)
class Settings:
    """What ``auto`` resolved to on this device."""

    precision: str  # fp32 | bf16 | fp16
    channels_last: bool
    compile: bool


def _on_off(value: str | bool, auto: bool) -> bool:
    return auto if value == "auto" else value in (True, "on")


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 instructions (AVX512-BF16 or AMX), where bf16 autocast pays."""
    cpu = torch.cpu
    try:
        return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    except AttributeError:  # pragma: no cover - older torch
        return False


def resolve_settings(p: TrainParams, device: torch.device) -> Settings:
    """Turn the ``auto`` params into concrete choices for ``device``.

    Measured for the seed net on a 2-core AVX512-BF16 CPU (see README.md, "Training"):
    channels-last and bf16 autocast are each faster, torch.compile spends ~30 s compiling
    and then runs slower. On CUDA bf16 autocast, channels-last and compile are the fast path.
    """
    cuda = device.type == "cuda"
    if p.precision != "auto":
        precision = p.precision
    elif cuda:
        precision = "bf16"
    else:
        precision = "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise UserError("train.precision: fp16 is not supported on the CPU; use fp32 or bf16")
    return Settings(precision=precision,
                    channels_last=_on_off(p.channels_last, auto=True),
                    compile=_on_off(p.compile, auto=cuda))


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


def data_fingerprint(folder: str | Path) -> str:
    """sha256 over the processed files, so a checkpoint from other data is never resumed."""
    h = hashlib.sha256()
    for name in ("train.npz", "val.npz", "stats.json"):
        path = Path(folder) / name
        h.update(name.encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


#: The code that decides what a training run computes: a checkpoint made by other code
#: (another architecture, another loop) is never resumed.
TRAINING_CODE = ("train.py", "models.py", "device.py", "ddp.py")


def code_fingerprint() -> str:
    """sha256 over the training code files beside this module."""
    h = hashlib.sha256()
    for name in TRAINING_CODE:
        h.update(name.encode())
        h.update((Path(__file__).parent / name).read_bytes())
    return h.hexdigest()


def run_fingerprint(p: TrainParams, data_hash: str, code_hash: str) -> str:
    """Identity of a training run: every train param, the data it reads and the code."""
    blob = json.dumps({"params": p.model_dump(mode="json"), "data": data_hash,
                       "code": code_hash}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


# =============================================================================== Augmentation
def draw_augmentation(n: int, p: TrainParams, gen: torch.Generator,
                      device: torch.device) -> tuple[torch.Tensor | None, ...]:
    """One epoch's random flips and crop offsets, drawn up front from the seeded generator."""
    flip = torch.rand(n, generator=gen, device=device) < 0.5 if p.augment_flip else None
    if p.augment_crop:
        span = 2 * p.augment_crop + 1
        dx = torch.randint(0, span, (n,), generator=gen, device=device)
        dy = torch.randint(0, span, (n,), generator=gen, device=device)
    else:
        dx = dy = None
    return flip, dx, dy


def augment(x: torch.Tensor, flip: torch.Tensor | None, dx: torch.Tensor | None,
            dy: torch.Tensor | None, pad: int) -> torch.Tensor:
    """Random crop from a zero-padded image, then horizontal flip, as one gather per batch.

    ``x`` is uint8 N x C x H x W; ``dx``/``dy`` in ``[0, 2 * pad]`` are the crop corners in
    the padded image. One flat gather (with the flip folded into the column index) costs
    about half of pad + crop + flip done separately.
    """
    if flip is None and dx is None:
        return x
    n, c, h, w = x.shape
    rows = torch.arange(h, device=x.device).expand(n, h)
    cols = torch.arange(w, device=x.device).expand(n, w)
    if flip is not None:
        cols = torch.where(flip[:, None], w - 1 - cols, cols)
    if dx is not None:
        rows = rows + (dy[:, None] - pad)
        cols = cols + (dx[:, None] - pad)
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    offset = rows.clamp(0, h - 1)[:, :, None] * w + cols.clamp(0, w - 1)[:, None, :]
    out = torch.gather(x.reshape(n, c, h * w), 2, offset.reshape(n, 1, h * w).expand(n, c, h * w))
    out = out.reshape(n, c, h, w)
    return out * inside[:, None] if dx is not None else out


# =============================================================================== Optimisation
def make_optimizer(model: nn.Module, p: TrainParams) -> torch.optim.Optimizer:
    """Adam / AdamW / Nesterov SGD; no weight decay on biases and norm scales (1-D params)."""
    decay = [q for q in model.parameters() if q.requires_grad and q.ndim > 1]
    no_decay = [q for q in model.parameters() if q.requires_grad and q.ndim <= 1]
    groups = [{"params": decay, "weight_decay": p.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if p.optimizer == "adam":
        return torch.optim.Adam(groups, lr=p.lr)
    if p.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=p.lr)
    return torch.optim.SGD(groups, lr=p.lr, momentum=p.momentum, nesterov=p.momentum > 0)


def lr_at(step: int, total: int, p: TrainParams) -> float:
    """Learning rate at ``step`` of ``total``: one-cycle (up 20%, down to 0), cosine, constant.

    A pure function of the step, so a resumed run needs nothing but the step count.
    """
    t = step / max(1, total)
    if p.schedule == "onecycle":
        warm = 0.2
        scale = 0.1 + 0.9 * t / warm if t < warm else max(0.0, (1 - t) / (1 - warm))
    elif p.schedule == "cosine":
        scale = 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    else:
        scale = 1.0
    return p.lr * scale


# =============================================================================== Training
@dataclass
class History:
    """What is logged: one record per epoch, and the per-iteration loss history."""

    epochs: list[dict[str, float]] = field(default_factory=list)
    loss_rows: list[dict[str, float]] = field(default_factory=list)


@dataclass
class FitResult:
    model: nn.Module
    history: History
    settings: Settings


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
        with _autocast(x.device, settings):
            out = model(xb).float()
        loss += F.cross_entropy(out, y[i:i + batch], reduction="sum").double()
        correct += (out.argmax(1) == y[i:i + batch]).sum()
    model.train(was_training)
    n = max(1, len(x))
    return float(loss) / n, int(correct) / n


def _autocast(device: torch.device, settings: Settings) -> Any:
    if settings.precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if settings.precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


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
    settings = resolve_settings(p, device)
    if device.type == "cpu":
        # bit-identical reruns on the CPU; on CUDA speed wins (cuDNN picks its kernels)
        torch.use_deterministic_algorithms(True, warn_only=True)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(p.seed)
    memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format

    train_x = torch.from_numpy(np.ascontiguousarray(data.train_x)).to(device)
    train_y = torch.from_numpy(np.asarray(data.train_y, np.int64)).to(device)
    val_x = torch.from_numpy(np.ascontiguousarray(data.val_x)).to(device)
    val_y = torch.from_numpy(np.asarray(data.val_y, np.int64)).to(device)

    model = build_model(p.model, len(data.classes), data.mean, data.std)
    trunk = model[1]
    if hasattr(trunk, "init_whitening"):
        trunk.init_whitening(model[0](train_x[:5000].cpu()))
    model = model.to(device, memory_format=memory_format)
    opt = make_optimizer(model, p)
    scaler = torch.amp.GradScaler(device.type, enabled=settings.precision == "fp16")
    criterion = nn.CrossEntropyLoss(label_smoothing=p.label_smoothing)
    gen = torch.Generator(device=device)
    gen.manual_seed(p.seed)

    n = len(train_x)
    batch = min(p.batch_size, n)
    if batch % world:
        raise UserError(f"train.batch_size: {p.batch_size} does not split evenly over "
                        f"train.nproc={world} processes; use a multiple of {world}")
    steps_per_epoch = n // batch  # drop the ragged last batch: one shape for the whole run
    total_steps = steps_per_epoch * p.epochs
    history = History()
    start_epoch = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        scaler.load_state_dict(resume["scaler"])
        gen.set_state(resume["generator"].to(gen.get_state().device))
        history = History(list(resume["history"]["epochs"]),
                          list(resume["history"]["loss_rows"]))
        start_epoch = int(resume["epoch"])
        log.info("resuming after epoch %d of %d from the checkpoint", start_epoch, p.epochs)

    step_model: nn.Module = model
    if world > 1:
        step_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if settings.compile:
        step_model = torch.compile(step_model)

    def state_fn() -> dict[str, Any]:
        return {"model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                "generator": gen.get_state().cpu(), "epoch": len(history.epochs),
                "history": {"epochs": list(history.epochs), "loss_rows": list(history.loss_rows)}}

    window = torch.zeros(p.log_every, device=device)
    for epoch in range(start_epoch, p.epochs):
        t0 = time.perf_counter()
        step_model.train()
        perm = torch.randperm(n, device=device, generator=gen)
        flip, dx, dy = draw_augmentation(n, p, gen, device)
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            lo, hi = i * batch + rank * (batch // world), i * batch + (rank + 1) * (batch // world)
            idx = perm[lo:hi]
            xb = augment(train_x[idx], None if flip is None else flip[lo:hi],
                         None if dx is None else dx[lo:hi], None if dy is None else dy[lo:hi],
                         p.augment_crop)
            if settings.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yb = train_y[idx]
            lr = lr_at(step, total_steps, p)
            for group in opt.param_groups:
                group["lr"] = lr
            with _autocast(device, settings):
                out = step_model(xb)
                loss = criterion(out.float(), yb)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            loss_d = loss.detach()
            window[i % p.log_every] = loss_d
            loss_sum += loss_d.double()
            correct += (out.detach().argmax(1) == yb).sum()
            last = i == steps_per_epoch - 1
            if (i + 1) % p.log_every == 0 or last:
                # one host sync per log_every steps, which also catches a non-finite loss
                # and names the exact step where it first appeared
                k = i % p.log_every + 1
                if world > 1:
                    torch.distributed.all_reduce(window)
                    window /= world
                values = window[:k].tolist()
                for j, v in enumerate(values):
                    if not math.isfinite(v):
                        bad = step - (k - 1) + j + 1
                        raise UserError(
                            f"training diverged: the loss became {v} at step {bad} (epoch "
                            f"{epoch + 1}, lr {lr_at(bad - 1, total_steps, p):.3g}); lower "
                            "train.lr or check the data; no model was written")
                history.loss_rows.append({"iteration": step + 1,
                                          "loss": round(sum(values) / k, 6)})
        if world > 1:
            stats = torch.stack([loss_sum, correct.double()])
            torch.distributed.all_reduce(stats)
            loss_sum, correct = stats[0], stats[1]
        seen = steps_per_epoch * batch
        record: dict[str, float] = {"epoch": epoch + 1,
                                    "train/loss": round(float(loss_sum) / (steps_per_epoch
                                                                           * world), 6),
                                    "train/acc": round(float(correct) / seen, 6)}
        if rank == 0 and len(val_x):
            val_loss, val_acc = evaluate(model, val_x, val_y, settings)
            record.update({"val/loss": round(val_loss, 6), "val/acc": round(val_acc, 6)})
        record["lr"] = lr_at((epoch + 1) * steps_per_epoch - 1, total_steps, p)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        record["epoch_time"] = round(time.perf_counter() - t0, 4)
        history.epochs.append(record)
        log.info("epoch %d/%d  %s", epoch + 1, p.epochs,
                 "  ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "epoch"))
        if on_epoch is not None:
            on_epoch(record, state_fn)
    return FitResult(model.eval(), history, settings)


# =============================================================================== Logging
#: Series logged per epoch (step = epoch) under dvclive's plots/metrics/.
SERIES = ("train/loss", "train/acc", "val/loss", "val/acc", "lr", "epoch_time")
#: Kept out of metrics.json so identical runs have identical summaries (wall time differs).
NOT_IN_SUMMARY = ("epoch_time",)


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

    def finish(self, history: History, extra: dict[str, Any]) -> None:
        """Write the per-iteration loss history and the final summary."""
        if history.loss_rows:
            self.live.log_plot("loss_history", history.loss_rows, x="iteration", y="loss",
                               title="training loss per iteration")
        self.live.summary.update(extra)
        for name in NOT_IN_SUMMARY:
            self.live.summary.pop(name, None)
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
                  p: TrainParams, device_name: str) -> dict[str, Any]:
    """Everything one training process does (rank 0 of several writes the outputs)."""
    rank, world = _ddp()
    device = torch.device(device_name)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    data = load_processed(data_dir)
    fingerprint = run_fingerprint(p, data_fingerprint(data_dir), code_fingerprint())
    resume = load_checkpoint(Path(checkpoint_path), fingerprint)
    if resume is not None and int(resume["epoch"]) > p.epochs:
        resume = None
    live = LiveLog(live_dir) if rank == 0 else None
    if live is not None and resume is not None:
        for record in resume["history"]["epochs"]:
            live.epoch(record)

    def on_epoch(record: dict[str, float], state_fn: Callable[[], dict[str, Any]]) -> None:
        if rank != 0:
            return
        state = state_fn()
        state.update(format=CHECKPOINT_FORMAT, fingerprint=fingerprint)
        with atomic_file(checkpoint_path) as tmp:
            torch.save(state, tmp)
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
                           "params": p.model_dump(mode="json"),
                           "settings": vars(result.settings),
                           "data": {"n_train": len(data.train_x), "n_val": len(data.val_x),
                                    "fingerprint": fingerprint},
                           "metrics": summary, "device": device.type, "nproc": world})
        live.finish(result.history, {})
        log.info("trained %s for %d epochs in %.1f s (this run); val acc %s -> %s", p.model,
                 p.epochs, seconds, final.get("val/acc"), model_path)
    return final


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
    device = pick_device(p.device)
    threads = set_threads(p.threads, p.nproc)
    log.info("torch %s, %d CPU thread(s) per process, %d process(es)", torch.__version__,
             threads, p.nproc)
    if p.nproc > 1:
        from stages.ddp import launch

        launch(train_process, p.nproc, device,
               (args.data, args.model, args.checkpoint, args.live, p, str(device)),
               threads=threads)
    else:
        train_process(args.data, args.model, args.checkpoint, args.live, p, str(device))


if __name__ == "__main__":
    run_cli(main)
