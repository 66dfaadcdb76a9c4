"""One multi-node rendezvous: its nodes as Prefect flow runs, each starting torchrun.

The leader opens the rendezvous (c10d, at an address and free port of its machine, keyed by
its flow run id), submits the followers as runs of the node deployment, and every node runs
the train stage's own command under ``torch.distributed.run`` in its own guarded process
group (``flows/runner.py``): a failed or timed-out node takes its whole group down.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows import dvc_adapter as dvc
from flows.runner import StageFailed, dvc_failure, run_guarded

#: Overrides the address a node gives the others (default: the one facing the server).
NODE_ADDR = "CONVFLOW_NODE_ADDR"
_TIMEOUT_MARK = "RendezvousTimeoutError"
#: The kind of :class:`StageFailed` for a rendezvous that did not fill up in time.
RDZV_TIMEOUT = "rendezvous"


def node_address(toward: str) -> str:
    """This machine's address on its route to ``toward`` (a host or URL), or ``$NODE_ADDR``."""
    if os.environ.get(NODE_ADDR):
        return os.environ[NODE_ADDR]
    host = urlparse(toward).hostname if "://" in toward else toward
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host or "127.0.0.1", 9))  # UDP: picks the route, sends nothing
        return probe.getsockname()[0]


def free_port(address: str) -> int:
    with socket.socket() as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Rendezvous:
    """Where and how the nodes meet; passed to every follower run as a parameter."""

    run_id: str
    endpoint: str
    nodes: int
    nproc_per_node: int
    join_timeout_s: float
    max_restarts: int

    @classmethod
    def open(cls, run_id: str, address: str, nodes: int, nproc_per_node: int,
             join_timeout_s: float, max_restarts: int) -> Rendezvous:
        """A rendezvous hosted on ``address`` at a port free there now."""
        return cls(run_id, f"{address}:{free_port(address)}", nodes, nproc_per_node,
                   join_timeout_s, max_restarts)

    def command(self, root: Path) -> list[str]:
        """The train stage's own command (from dvc.yaml), launched by torchrun."""
        stage = shlex.split(dvc.stage_command(root, "train"))
        if stage[:2] != ["python", "-m"]:
            raise StageFailed("train", f"torchrun needs `python -m <module> ...` as the train "
                              f"stage's cmd in dvc.yaml, not {' '.join(stage)[:80]}", 2, False)
        host = self.endpoint.rsplit(":", 1)[0]
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(self.nodes),
                "--nproc-per-node", str(self.nproc_per_node), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", self.endpoint, "--rdzv-id", self.run_id,
                "--rdzv-conf", f"join_timeout={int(self.join_timeout_s)}",
                "--local-addr", node_address(host), "--max-restarts", str(self.max_restarts),
                *stage[1:]]

    def submit_followers(self, deployment: str, commit: str) -> list[Any]:
        """``nodes - 1`` runs of the node deployment, not waited for."""
        from prefect.deployments import run_deployment

        return [run_deployment(deployment, timeout=0, parameters={
            "rendezvous": asdict(self), "commit": commit, "node": node})
            for node in range(1, self.nodes)]

    def wait_for(self, followers: list[Any], timeout_s: float | None) -> None:
        """Every follower run final; a failed one fails the leader, naming it."""
        deadline = time.monotonic() + (timeout_s or 3600)
        for run in _latest(followers):
            while not run.state.is_final():
                if time.monotonic() > deadline:
                    raise StageFailed("train", f"follower {run.name} did not finish", None,
                                      False)
                time.sleep(1)
                (run,) = _latest([run])
            if not run.state.is_completed():
                raise StageFailed("train", f"follower {run.name} ended {run.state.type.value}:"
                                  f" {run.state.message}", None, False)

    def cancel(self, followers: list[Any]) -> None:
        """Cancel every follower run that has not ended (a running one is stopped)."""
        from prefect.client.orchestration import get_client
        from prefect.states import Cancelled, Cancelling

        with get_client(sync_client=True) as client:
            for run in _latest(followers):
                if not run.state.is_final():
                    state = Cancelling() if run.state.is_running() else Cancelled()
                    client.set_flow_run_state(run.id, state, force=True)


def _latest(runs: list[Any]) -> list[Any]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return [client.read_flow_run(run.id) for run in runs]


@task(name="torchrun", task_run_name="torchrun node {node}", cache_policy=NO_CACHE)
def torchrun_task(root: str, rdzv: Rendezvous, node: int, timeout_s: float | None) -> None:
    """Node ``node`` of the rendezvous: torchrun of the train stage, in its guarded group."""
    log = get_run_logger()
    from stages.ddp import OUTPUTS_PER_NODE, SEPARATE_STORE  # each node: its own clone

    env = {**dvc.dvc_env(), OUTPUTS_PER_NODE: "1", SEPARATE_STORE: "1"}
    output, status, timed_out = run_guarded(rdzv.command(Path(root)), Path(root),
                                            f"torchrun node {node}", timeout_s, log, env=env)
    if _TIMEOUT_MARK in output:
        raise StageFailed("train", f"node {node}: the rendezvous did not fill up within "
                          f"{rdzv.join_timeout_s:.0f} s", status, False, kind=RDZV_TIMEOUT)
    failure = f"timed out after {timeout_s} s" if timed_out else dvc_failure(output, status)
    if failure:
        raise StageFailed("train", f"node {node}: {failure}", status, False)


def joined(followers: list[Any]) -> int:
    """Nodes that reached the rendezvous: the leader and each follower whose torchrun began."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    ids = [run.id for run in followers]
    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=ids))) if ids else []
    started = {t.flow_run_id for t in tasks
               if t.name.startswith("torchrun") and t.state and t.state.type.value != "PENDING"}
    return 1 + len(started)


def too_few(rdzv: Rendezvous, followers: list[Any]) -> StageFailed:
    """The one line for a rendezvous that did not fill up in time."""
    return StageFailed("train", f"only {joined(followers)} of {rdzv.nodes} nodes joined "
                       f"rendezvous {rdzv.run_id} within {rdzv.join_timeout_s:.0f} s: start a "
                       "worker on more machines of the pool (one node each), or lower `nodes`",
                       None, False)


def head(root: Path) -> str:
    """The commit ``root`` has checked out."""
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                          text=True, check=True).stdout.strip()


def checkout(root: Path, commit: str) -> None:
    """Check ``commit`` out (detached), or fail in one line if this clone lacks it."""
    proc = subprocess.run(["git", "checkout", "-q", "--detach", commit], cwd=root,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise StageFailed("checkout", f"the leader's commit {commit[:12]} is not in this "
                          f"clone: {proc.stderr.strip()[:200]}", None, False)
