"""The ``gpu-multinode`` deployment on two worker machines (network namespaces on a bridge).

The harness (tests/multihost.py) gives two hosts, each running ``prefect worker start --pool
gpu --limit 1`` (so the leader and its follower must take different machines), one Prefect
server and one S3 store on the bridge, and a bare origin cloned through a ``file://`` URL.
The deployments are the project's own ``prefect.yaml`` (``prefect deploy --all``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import dvc, git, run, subprocess_env
from multihost import Cluster, cluster  # noqa: F401
from team_fixtures import clone, ensure_pool, make_origin
from test_multihost_sweep import explain

POOL, LEADER = "gpu", "convflow-multinode/gpu-multinode"
RUN_TIMEOUT_S = 480


@pytest.fixture(scope="module")
def team(cluster: Cluster):  # noqa: F811
    """origin (train.nproc: 2) + prefect.yaml's deployments + one worker (limit 1) per host."""
    folder = cluster.folder / "team"
    folder.mkdir()
    origin, src = make_origin(folder, cluster.store, "multinode",
                              {"train": {"epochs": 1, "nproc": 2}})
    ensure_pool(POOL)
    env = subprocess_env()
    env["CONVFLOW_GIT_URL"] = f"file://{origin}"
    run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], cwd=src, env=env)
    return SimpleNamespace(origin=origin, folder=folder, cluster=cluster)


def follower_runs(parent_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id])))


def torchruns_alive(folder: Path) -> list[int]:
    """torchrun processes still running in a clone under ``folder`` (any host)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if (b"torch.distributed.run" in (proc / "cmdline").read_bytes()
                    and os.readlink(proc / "cwd").startswith(str(folder))):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
def test_too_few_workers_is_one_line_within_the_timeout_and_frees_everything(team):
    from prefect.deployments import run_deployment

    team.cluster.hosts[0].start_worker(POOL, limit=1)  # one machine only: nobody follows
    parent = run_deployment(LEADER, parameters={"join_timeout_s": 20}, timeout=RUN_TIMEOUT_S,
                            poll_interval=1)
    assert parent.state.is_failed(), explain(parent, team.cluster)
    message = parent.state.message or ""
    assert "only 1 of 2 nodes joined" in message and "within 20 s" in message, message
    assert "Traceback" not in message
    runs = follower_runs(parent.id)
    assert runs and all(r.state.is_final() for r in follower_runs(parent.id)), runs
    assert not torchruns_alive(team.cluster.folder)


@pytest.mark.slow
def test_a_multinode_run_trains_on_two_machines_and_publishes_once(team):
    from prefect.deployments import run_deployment

    for host in team.cluster.hosts:
        if host.worker is None or host.worker.poll() is not None:
            host.start_worker(POOL, limit=1)
    parent = run_deployment(LEADER, timeout=RUN_TIMEOUT_S, poll_interval=1)
    assert parent.state.is_completed(), explain(parent, team.cluster)
    (node,) = [r for r in follower_runs(parent.id) if r.deployment_id is not None]
    assert node.state.is_completed(), explain(node, team.cluster)
    logs = {h.name: h.log.read_text(errors="replace") for h in team.cluster.hosts}
    hosts = {name for name, text in logs.items() if str(parent.id) in text}
    hosts |= {name for name, text in logs.items() if str(node.id) in text}
    assert hosts == {"host-1", "host-2"}, "leader and follower ran on the same machine"
    said = "".join(logs.values())  # torchrun with restarts, each into a store of its own
    assert "process 0 of 2" in said
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in said, said[-3000:]

    laptop = clone(team.origin, team.folder / "laptop")
    branch = "origin/results/gpu-multinode"
    log = git(laptop, "log", "--format=%s", f"main..{branch}").splitlines()
    assert len(log) == 1, log  # one results commit
    git(laptop, "checkout", "-q", branch)
    dvc(laptop, "pull")  # the model trained on two machines comes from the store
    assert "Data and pipelines are up to date." in dvc(laptop, "status").stdout
