"""Several training processes on one machine: PyTorch DDP through ``torch.distributed``.

``train.nproc: N`` makes the train stage start N processes with
``torch.multiprocessing.spawn`` from the same command ``dvc repro`` runs, joined over a free
loopback port: NCCL on CUDA GPUs (one GPU per process), gloo on the CPU. DDP averages the
gradients in every step; BatchNorm normalises with each process's own batch statistics (no
SyncBatchNorm) and its running statistics are broadcast from rank 0 on every forward.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stages.errors import USER_ERROR_EXIT, UserError, setup_logging

log = logging.getLogger("convflow.train")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA, gloo for everything else."""
    return "nccl" if device.type == "cuda" else "gloo"


def _entry(rank: int, fn: Callable[..., Any], world: int, port: int, backend: str,
           threads: int, args: tuple[Any, ...], errors: str) -> None:
    """Body of each spawned process: join the group, run ``fn(*args)``, leave.

    A user error is also written to ``errors/<rank>``: when one process stops, the others
    crash in their next collective, and ``mp.spawn`` reports whichever exit it saw first.
    """
    setup_logging()
    torch.set_num_threads(threads)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        fn(*args)
    except UserError as err:
        log.error("error (process %d): %s", rank, err)
        (Path(errors) / str(rank)).write_text(str(err))
        sys.exit(USER_ERROR_EXIT)
    finally:
        dist.destroy_process_group()


def launch(fn: Callable[..., Any], nproc: int, device: torch.device, args: tuple[Any, ...],
           threads: int = 1) -> None:
    """Run ``fn(*args)`` in ``nproc`` DDP processes and wait for all of them."""
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise UserError(f"train.nproc: {nproc} processes need {nproc} GPUs; this machine has "
                        f"{torch.cuda.device_count()}")
    if device.type == "mps":
        raise UserError("train.nproc > 1 is not supported on Apple MPS; set train.nproc: 1")
    backend = backend_for(device)
    log.info("starting %d DDP processes (%s backend)", nproc, backend)
    with tempfile.TemporaryDirectory(prefix="convflow-ddp-") as errors:
        try:
            mp.spawn(_entry, args=(fn, nproc, free_port(), backend, threads, args, errors),
                     nprocs=nproc, join=True)
        except (mp.ProcessExitedException, mp.ProcessRaisedException) as err:
            failed = first_user_error(Path(errors))
            if failed is not None:
                raise UserError(f"DDP process {failed[0]}: {failed[1]}") from None
            if getattr(err, "exit_code", None) == USER_ERROR_EXIT:
                raise UserError(f"DDP process {err.error_index} stopped (see its error above)"
                                ) from None
            raise


def first_user_error(errors: Path) -> tuple[int, str] | None:
    """(rank, message) of the process whose user error came first, if any did."""
    found = sorted(errors.iterdir(), key=lambda f: (f.stat().st_mtime_ns, int(f.name)))
    return (int(found[0].name), found[0].read_text()) if found else None
