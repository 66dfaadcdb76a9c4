"""Stage ``train``: data/processed -> models/model.pt, a resumable checkpoint, dvclive logs.

This module does the files: it reads the processed splits, resumes from a checkpoint of the
same run, and writes the model; the loop itself is :mod:`stages.loop` (:func:`fit`,
:func:`train_step`), the checkpoint and dvclive series :mod:`stages.checkpoint`, the
optimizer groups, schedules and presets :mod:`stages.recipe`, the device policy
:mod:`stages.device`, the run identity :mod:`stages.fingerprint`.

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
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from stages.checkpoint import LiveLog, load_checkpoint, save_checkpoint
from stages.ddp import from_rank0, join_launched, launch, launched, writes_outputs
from stages.device import keep_freed_memory, pick_device, set_threads
from stages.errors import UserError, run_cli
from stages.fingerprint import code_fingerprint, data_fingerprint, run_fingerprint
from stages.io import atomic_file, read_processed, remove_output
from stages.loop import Dataset, FitResult, ddp_rank, fit
from stages.models import save_model
from stages.params import TrainParams, load_params
from stages.recipe import recipe_name

log = logging.getLogger("convflow.train")


def load_processed(folder: str | Path) -> Dataset:
    """Read ``train.npz``, ``val.npz`` and ``stats.json`` written by the normalize stage."""
    stats, splits = read_processed(folder, ("train", "val"))
    (train_x, train_y), (val_x, val_y) = splits["train"], splits["val"]
    if len(train_x) == 0:
        raise UserError(f"{Path(folder) / 'train.npz'}: no training images")
    return Dataset(train_x, train_y, val_x, val_y, stats["classes"], stats["mean"], stats["std"])


def train_process(data_dir: str, model_path: str, checkpoint_path: str, live_dir: str,
                  p: TrainParams, device_name: str) -> FitResult:
    """Everything one training process does (rank 0 of several writes the outputs)."""
    rank, world = ddp_rank()
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
    live = LiveLog(live_dir) if writes_outputs(rank) else None
    if live is not None and resume is not None:
        for record in resume["history"]["epochs"]:
            live.epoch(record)

    # one checkpoint per machine (its local rank 0): whichever machine is rank 0 after an
    # elastic restart has it; the replicas' states are equal, and rank 0's is sent to all
    writes_checkpoint = int(os.environ.get("LOCAL_RANK", rank)) == 0

    def on_epoch(record: dict[str, float], state_fn: Callable[[], dict[str, Any]]) -> None:
        if writes_checkpoint:
            save_checkpoint(checkpoint_path, state_fn(), fingerprint)
        if live is not None:
            live.epoch(record)

    t0 = time.perf_counter()
    result = fit(p, data, device, resume=resume, on_epoch=on_epoch)
    seconds = time.perf_counter() - t0
    final = result.history.epochs[-1] if result.history.epochs else {}
    if live is not None:
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
