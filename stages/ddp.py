"""Several training processes: PyTorch DDP through ``torch.distributed``.

Two ways in, one training: ``train.nproc: N`` makes the train stage start N processes on
this machine with ``torch.multiprocessing.spawn``, joined over a free loopback port; or a
launcher starts the stage command once per process and sets torchrun's environment
contract (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``):
``torchrun``, Kubeflow's PyTorchJob, Slurm. Then the processes join with ``env://``
across machines. NCCL on CUDA GPUs (one GPU per process), gloo on the CPU either way. DDP
averages the gradients in every step; BatchNorm normalises with each process's own batch
statistics (no SyncBatchNorm) and its running statistics are broadcast from rank 0 on every
forward. Rank 0 alone reads the checkpoint (and sends it to the others, whose machines may
not have it) and writes the model, checkpoint and dvclive files.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Mapping
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


#: Set by convflow's multi-node Prefect runs, where every machine trains in its own clone:
#: each machine's first process then writes the outputs there, not global rank 0 alone.
OUTPUTS_PER_NODE = "CONVFLOW_OUTPUTS_PER_NODE"

#: The variables a torchrun-style launcher sets for every process it starts.
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

#: Set where torchrun starts (``=1``): each restart's processes then meet in a store of
#: their own. By default they share the agents' rendezvous store, whose keys outlive a
#: restart, so a restarted process can read a dead peer's address and fail to connect
#: (pytorch/pytorch#135712); seen here as a node-kill test that never finished.
SEPARATE_STORE = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


def shared_store_warning(environ: Mapping[str, str]) -> str | None:
    """What to tell a user whose torchrun may restart processes into a shared store."""
    restarts = environ.get("TORCHELASTIC_MAX_RESTARTS", "0")
    if environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or restarts in ("", "0"):
        return None
    return (f"torchrun may restart these processes (--max-restarts {restarts}) into the store "
            f"it shares with them, where a restarted process can read a dead peer's address "
            f"(pytorch/pytorch#135712): start torchrun with {SEPARATE_STORE}=1")


def launched() -> bool:
    """Whether a torchrun-style launcher started this process (its environment contract)."""
    return all(os.environ.get(name) for name in LAUNCHER_ENV)


def join_launched(fn: Callable[..., Any], nproc: int, device: torch.device,
                  args: tuple[Any, ...]) -> None:
    """Run ``fn(*args)`` as the rank a launcher gave this process, in its process group.

    ``train.nproc`` must equal the launcher's ``WORLD_SIZE``: the params (and so
    ``dvc.lock``) then describe the run, and it equals a ``train.nproc`` run on one machine.
    """
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ["LOCAL_RANK"])
    except ValueError:
        raise UserError("RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers "
                        "(set by torchrun or your launcher)") from None
    if world != nproc:
        raise UserError(f"the launcher started WORLD_SIZE={world} processes but train.nproc "
                        f"is {nproc}: set train.nproc: {world} in params.yaml so the params "
                        "describe the run")
    if device.type == "cuda" and local >= torch.cuda.device_count():
        raise UserError(f"LOCAL_RANK {local} needs GPU {local}; this machine has "
                        f"{torch.cuda.device_count()}")
    backend = backend_for(device)
    log.info("process %d of %d (local %d), %s backend, rendezvous %s:%s", rank, world, local,
             backend, os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"])
    if (warning := shared_store_warning(os.environ)) and rank == 0:
        log.warning(warning)
    # the launcher stops a group with SIGTERM when a peer dies; a process blocked in a
    # collective cannot run Python's handler, so it goes at once (outputs are atomic)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world)
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()


def writes_outputs(rank: int) -> bool:
    """Whether this process writes the model and dvclive files: rank 0, or with
    ``OUTPUTS_PER_NODE`` set, the first process of each machine."""
    if os.environ.get(OUTPUTS_PER_NODE) == "1":
        return int(os.environ.get("LOCAL_RANK", rank)) == 0
    return rank == 0


def from_rank0(obj: Any) -> Any:
    """``obj`` as rank 0 has it, on every rank (as is without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)  # between the ranks of one job: trusted peers
    return box[0]


def first_user_error(errors: Path) -> tuple[int, str] | None:
    """(rank, message) of the process whose user error came first, if any did."""
    found = sorted(errors.iterdir(), key=lambda f: (f.stat().st_mtime_ns, int(f.name)))
    return (int(found[0].name), found[0].read_text()) if found else None
