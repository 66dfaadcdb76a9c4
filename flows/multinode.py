"""Multi-node training from Prefect: a leader run, follower runs on the pool, one torchrun.

The ``gpu-multinode`` deployment's run is the leader. It brings the data up to date
(``dvc pull``, the stages before ``train``), pushes it so the other machines can pull it,
and submits ``nodes - 1`` runs of ``gpu-multinode-node`` to the same work pool. Every node
then starts torchrun (``flows/torchrun.py``) with one c10d rendezvous keyed by the leader's
flow run id, at an address and port of the leader's machine. Training is torch's: the train
stage honours torchrun's environment contract (``stages/ddp.py``). When it ends, the leader
records the stage (``dvc commit train``) and the rest is an ordinary pipeline run (evaluate,
plot, gate, artifacts, push, one results commit, the registry).

Too few workers: torchrun's ``join_timeout`` ends the rendezvous; the leader then fails in
one line saying how many nodes joined, and cancels the follower runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows import dvc_adapter as dvc
from flows import publish
from flows.pipeline import pipeline
from flows.runner import StageFailed, api_url, run_guarded
from flows.stage_tasks import run_stage, run_stages
from flows.torchrun import (
    RDZV_TIMEOUT,
    Rendezvous,
    checkout,
    head,
    node_address,
    too_few,
    torchrun_task,
)
from stages.paths import find_root

#: The follower deployment (``prefect.yaml``): ``<flow name>/<deployment name>``.
NODE_DEPLOYMENT = "convflow-multinode-node/gpu-multinode-node"
TRAIN = "train"


def prepare(root: Path, pull: bool) -> None:
    """What training reads, up to date: ``dvc pull``, then the stages ``train`` depends on."""
    if pull:
        publish.start_run(root)
    dvc.forget(root)
    nodes = dvc.stages_in_order(root)
    upstream = next(n.upstream for n in nodes if n.name == TRAIN)
    _, failed = run_stages([n for n in nodes if n.name in upstream], root, run_stage)
    if failed:
        raise next(iter(failed.values()))


def check_world(root: Path, nodes: int, nproc_per_node: int) -> None:
    """``train.nproc`` must be the world size, so the params describe the run."""
    from stages.params import load_params

    nproc = load_params(root / "params.yaml").train.nproc
    if nproc != nodes * nproc_per_node:
        raise StageFailed(TRAIN, f"{nodes} nodes x {nproc_per_node} processes make "
                          f"{nodes * nproc_per_node}, but train.nproc is {nproc}: set "
                          f"train.nproc: {nodes * nproc_per_node} in params.yaml", 2, False)


@flow(name="convflow-multinode")
def multinode(root: str | None = None, nodes: int = 2, nproc_per_node: int = 1,
              join_timeout_s: float = 300.0, max_restarts: int = 3,
              timeout_s: float | None = None, pull: bool = True, push: bool = True,
              commit: bool = True, branch: str | None = None, promote: str | None = None,
              node_deployment: str = NODE_DEPLOYMENT) -> list[dict[str, Any]]:
    """Train across ``nodes`` machines of the pool with torchrun, then finish the pipeline."""
    from prefect.runtime import deployment, flow_run

    log = get_run_logger()
    repo_root = find_root(root)
    check_world(repo_root, nodes, nproc_per_node)
    prepare(repo_root, pull)
    if push:
        publish.dvc_push(repo_root)  # the followers pull the data (and run-cache) from here
    rdzv = Rendezvous.open(str(flow_run.id), node_address(api_url() or "127.0.0.1"), nodes,
                           nproc_per_node, join_timeout_s, max_restarts)
    log.info("rendezvous %s at %s: %d nodes x %d processes", rdzv.run_id, rdzv.endpoint,
             nodes, nproc_per_node)
    followers = rdzv.submit_followers(node_deployment, head(repo_root))
    try:
        torchrun_task(str(repo_root), rdzv, 0, timeout_s)
        rdzv.wait_for(followers, timeout_s)
    except StageFailed as exc:
        failure = too_few(rdzv, followers) if exc.kind == RDZV_TIMEOUT else exc
        rdzv.cancel(followers)
        raise failure from None
    except BaseException:
        rdzv.cancel(followers)
        raise
    output, status, _ = run_guarded(dvc.dvc_command("commit", "--force", TRAIN), repo_root,
                                    "dvc commit train", 600, log)
    if status != 0:
        raise StageFailed(TRAIN, f"dvc commit train failed: {output.strip()[-300:]}",
                          status, False)
    return pipeline(root=str(repo_root), timeout_s=timeout_s, push=push, commit=commit,
                    branch=branch or publish.default_branch(deployment.name),
                    promote=promote)


@flow(name="convflow-multinode-node")
def multinode_node(rendezvous: dict[str, Any], commit: str, node: int = 1,
                   root: str | None = None, timeout_s: float | None = None,
                   pull: bool = True) -> None:
    """One follower node: the leader's commit and data, then torchrun into its rendezvous."""
    repo_root = find_root(root)
    rdzv = Rendezvous(**rendezvous)
    checkout(repo_root, commit)  # the leader's code, params and dvc.lock
    prepare(repo_root, pull)
    torchrun_task(str(repo_root), rdzv, node, timeout_s)
