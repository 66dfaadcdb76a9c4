"""Sweeps fan out over a team's machines: two worker hosts in network namespaces.

The harness (tests/multihost.py) gives two hosts with their own addresses and hostnames,
each running ``prefect worker start --pool gpu --limit 2`` with two declared devices, one
Prefect server and one S3 store on a test bridge, and a bare origin cloned through a
``file://`` URL. The deployments are the project's own ``prefect.yaml`` (``prefect deploy
--all``); a fresh clone in this process stands for the laptop.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import dvc, run, subprocess_env
from multihost import Cluster, Network, cluster, require_netns, sh  # noqa: F401
from team_fixtures import clone, ensure_pool, make_origin

POOL, SWEEP = "gpu", "convflow-sweep/gpu-sweep"
RUN_TIMEOUT_S = 420
LR = "params.yaml:train.lr"


def test_the_network_is_gone_after_close():
    """A namespace reaches the bridge address; bridge, veths and namespaces go with close."""
    require_netns()
    net = Network()
    try:
        ns, address = net.add_namespace(1)
        with socket.create_server((net.host_ip, 0)) as server:
            code = ("import socket, sys; s = socket.create_connection((sys.argv[1], "
                    "int(sys.argv[2])), 5); print(s.getsockname()[0])")
            out = sh("ip", "netns", "exec", ns, sys.executable, "-c", code, net.host_ip,
                     str(server.getsockname()[1])).stdout
        assert out.strip() == address  # it came from the namespace's own address
    finally:
        net.close()
    assert ns not in sh("ip", "netns", "list").stdout
    links = sh("ip", "-o", "link").stdout
    assert net.bridge not in links and f"cf{net.octet}v1" not in links
    assert address not in sh("ip", "-o", "addr").stdout


@pytest.fixture(scope="module")
def team(cluster: Cluster):  # noqa: F811
    """origin + the deployments of prefect.yaml + a worker on each host, pool ``gpu``."""
    folder = cluster.folder / "team"
    folder.mkdir()
    origin, src = make_origin(folder, cluster.store, "sweep", {"train": {"epochs": 1}})
    ensure_pool(POOL)
    env = subprocess_env()
    env["CONVFLOW_GIT_URL"] = f"file://{origin}"  # a URL: shallow, as https:// would be
    run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], cwd=src, env=env)
    for host in cluster.hosts:  # a point killed before it starts is CRASHED after 90 s
        host.start_worker(POOL, limit=2, env={"CONVFLOW_START_S": "90"})
    return SimpleNamespace(origin=origin, folder=folder, cluster=cluster)


def flow_logs(run_id) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(
            any_=[run_id])))
    return "\n".join(entry.message for entry in logs)


def explain(flow_run, cluster: Cluster) -> str:  # noqa: F811
    """What went wrong: the run's state and logs, each worker's log tail."""
    tails = "\n".join(f"--- {h.name} worker log\n{h.log.read_text()[-3000:]}"
                      for h in cluster.hosts)
    return (f"run {flow_run.name}: {flow_run.state.type} {flow_run.state.message}\n"
            f"--- flow logs\n{flow_logs(flow_run.id)[-5000:]}\n{tails}")


def sweep_table(parent_id) -> list[dict]:
    """The table artifact the parent run published."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    with get_client(sync_client=True) as client:
        (art,) = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[parent_id]),
            key=ArtifactFilterKey(any_=["convflow-sweep"])))
    return json.loads(art.data)


def point_runs(names: list[str]) -> list:
    """Every flow run of the point deployment named after one of ``names``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(any_=names)))


def overlaps(rows: list[dict]) -> list[tuple[str, str]]:
    """Pairs of points that trained at the same time on one machine's one device."""
    found = []
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            same = (a["machine"], a["device"]) == (b["machine"], b["device"])
            if same and a["started"] < b["ended"] and b["started"] < a["ended"]:
                found.append((a["experiment"], b["experiment"]))
    return found


@pytest.mark.slow
def test_a_sweep_spreads_over_both_hosts_and_a_bad_point_fails_alone(team):
    """Three good points and a bad one at once: the parent holds one of its host's two
    places, so the other host takes two, and the parent's host the rest."""
    from prefect.deployments import run_deployment

    lrs = [0.002, 0.01, 0.02]
    parent = run_deployment(SWEEP, parameters={"grid": {"train.lr": [*lrs, -1.0]}},
                            timeout=RUN_TIMEOUT_S, poll_interval=1)
    names = [f"{parent.name}-{i}" for i in range(1, 4)]
    bad = f"{parent.name}-4"  # lr -1: the params schema refuses it in its first stage
    assert parent.state.is_failed(), explain(parent, team.cluster)
    assert f"1 of 4 points failed: {bad} (the others completed)" in parent.state.message
    table = sweep_table(parent.id)
    assert [r["state"] for r in table if r["experiment"] == bad] == ["FAILED"]
    rows = [r for r in table if r["experiment"] != bad]
    assert sorted(r["experiment"] for r in rows) == names
    assert {r["state"] for r in rows} == {"COMPLETED"}
    assert {r["machine"] for r in rows} == {"host-1", "host-2"}, rows  # each ran >= 1
    assert {r["device"] for r in rows} <= {"0", "1"}, rows
    assert not overlaps(rows), rows
    assert [r["best"] for r in table].count("★") == 1
    best = max(rows, key=lambda r: r["metrics/evaluate.json:test.accuracy"])
    assert best["best"] == "★"
    for row in rows:
        assert row["train_s"] > 0 and row["pull_s"] >= 0 and row["push_s"] > 0, row

    laptop = clone(team.origin, team.folder / "laptop")
    listed = dvc(laptop, "exp", "list", "origin", "--names-only").stdout.split()
    assert set(names) <= set(listed) and bad not in listed, listed
    dvc(laptop, "exp", "pull", "origin", *names)
    shown = json.loads(dvc(laptop, "exp", "show", "--json").stdout)
    exps = {rev.get("name"): rev["data"] for base in shown
            for group in base.get("experiments") or [] for rev in group.get("revs") or []}
    assert set(names) <= set(exps), list(exps)
    got = {exps[n]["params"]["params.yaml"]["data"]["train"]["lr"] for n in names}
    assert got == set(lrs)
    for name in names:
        accuracy = exps[name]["metrics"]["metrics/evaluate.json"]["data"]["test"]["accuracy"]
        assert 0.0 <= accuracy <= 1.0
    dvc(laptop, "exp", "apply", best["experiment"])
    dvc(laptop, "pull")  # the best one's model comes from the store, nothing retrains
    assert "Data and pipelines are up to date." in dvc(laptop, "status").stdout


def _training_point(parent_name: str, avoid: str | None, deadline: float):
    """A point run in its experiment (task 'dvc-experiment' running) not on host ``avoid``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    while time.monotonic() < deadline:
        runs = [r for r in point_runs([f"{parent_name}-1", f"{parent_name}-2"])
                if r.state and r.state.is_running()]
        with get_client(sync_client=True) as client:
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[r.id for r in runs]))) if runs else []
        busy = {t.flow_run_id for t in tasks if t.name.startswith(parent_name)
                and t.state and t.state.is_running()}
        for point in runs:
            host = _host_of(point.name)
            if point.id in busy and host and host != avoid:
                return point, host
        time.sleep(0.5)
    raise AssertionError("no point started training on a host without the parent run")


HOSTS: dict[str, Path] = {}


def _host_of(run_name: str) -> str | None:
    """The host whose worker log shows flow run ``run_name`` beginning (not just offered)."""
    for name, log in HOSTS.items():
        text = log.read_text(errors="replace")
        if f"flow run '{run_name}' for flow '" in text:
            return name
    return None


@pytest.mark.slow
def test_a_point_whose_worker_dies_is_retried_on_the_other_host(team):
    from prefect.deployments import run_deployment

    HOSTS.update({h.name: h.log for h in team.cluster.hosts})
    parent = run_deployment(SWEEP, parameters={"grid": {"train.lr": [0.003, 0.03]}},
                            timeout=0)
    deadline = time.monotonic() + 240
    while _host_of(parent.name) is None:
        assert time.monotonic() < deadline, "no worker took the parent run"
        time.sleep(0.5)
    parent_host = _host_of(parent.name)
    point, victim = _training_point(parent.name, parent_host, deadline)
    team.cluster.host_of(victim).kill_worker()  # that machine dies mid-point

    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + RUN_TIMEOUT_S
    with get_client(sync_client=True) as client:
        while not (parent := client.read_flow_run(parent.id)).state.is_final():
            assert time.monotonic() < deadline, explain(parent, team.cluster)
            time.sleep(1)
    assert parent.state.is_completed(), explain(parent, team.cluster)
    runs = point_runs([point.name])
    assert sorted(r.state.type.value for r in runs) == ["COMPLETED", "CRASHED"], runs
    rows = {r["experiment"]: r for r in sweep_table(parent.id)}
    assert rows[point.name]["machine"] == parent_host != victim
    assert {r["state"] for r in rows.values()} == {"COMPLETED"}
    laptop = clone(team.origin, team.folder / "laptop-kill")
    listed = dvc(laptop, "exp", "list", "origin", "--names-only").stdout.split()
    assert {f"{parent.name}-1", f"{parent.name}-2"} <= set(listed), listed
