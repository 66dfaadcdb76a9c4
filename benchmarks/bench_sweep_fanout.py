"""What fanning a sweep out buys: one host with one device against two hosts with two each.

Stands up tests/multihost.py's team (root only: network namespaces on a test bridge, one
Prefect server and one SeaweedFS bound to it, a bare origin cloned over ``file://``), deploys
this project's ``prefect.yaml``, and runs the same four-point tiny sweep (``gpu-sweep``,
tiny params, 1 epoch) twice:

  - one host, ``CONVFLOW_DEVICES=0``, ``--limit 2`` (one device, one slot for the parent);
  - two hosts, ``CONVFLOW_DEVICES=0,1``, ``--limit 3`` each (two devices and a spare slot).

For each it reports the makespan (the parent run's start to end) and where the points'
time goes: start (process start and the ``git_clone`` pull step: PENDING, when a worker
took the point, to RUNNING), pull (``git fetch`` + ``dvc pull``), train (``dvc exp
run`` under its lease), push (``dvc exp push``), from the parent's table.

    sudo python benchmarks/bench_sweep_fanout.py [--out benchmarks/results/sweep_fanout.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(PROJECT), str(PROJECT / "tests")]

from conftest import run, subprocess_env  # noqa: E402
from multihost import Cluster, require_netns  # noqa: E402
from team_fixtures import ensure_pool, make_origin  # noqa: E402

SWEEP = "convflow-sweep/gpu-sweep"
GRID = {"train.lr": [0.002, 0.005, 0.01, 0.02]}
PHASES = ("start_s", "pull_s", "train_s", "push_s")


def sweep_once() -> dict:
    """One four-point sweep, awaited: makespan and the per-point phases."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterName,
    )
    from prefect.deployments import run_deployment

    parent = run_deployment(SWEEP, parameters={"grid": GRID}, timeout=1800, poll_interval=1)
    if not parent.state.is_completed():
        raise SystemExit(f"sweep {parent.name}: {parent.state.type} {parent.state.message}")
    with get_client(sync_client=True) as client:
        (art,) = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[parent.id])))
        rows = json.loads(art.data)
        points = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(any_=[r["experiment"] for r in rows])))
        started = {p.name: _pending_to_running(client, p.id) for p in points
                   if p.state.is_completed()}
    for row in rows:
        row["start_s"] = round(started[row["experiment"]], 3)
    makespan = (parent.end_time - parent.start_time).total_seconds()
    return {"makespan_s": round(makespan, 1),
            "sum_s": {k: round(sum(r[k] for r in rows), 1) for k in PHASES},
            "points": [{k: r[k] for k in ("experiment", "machine", "device", *PHASES)}
                       for r in rows]}


def _pending_to_running(client, run_id) -> float:
    """Seconds from a worker taking the run (PENDING) to its flow starting (RUNNING)."""
    states = {s.type.value: s.timestamp for s in client.read_flow_run_states(run_id)}
    return (states["RUNNING"] - states["PENDING"]).total_seconds()


def case(cluster: Cluster, hosts: int, devices: str, limit: int) -> dict:
    """Workers on the first ``hosts`` hosts with ``devices``; one sweep; workers stopped."""
    started = [h.start_worker("gpu", limit=limit, env={"CONVFLOW_DEVICES": devices})
               for h in cluster.hosts[:hosts]]
    try:
        time.sleep(3)  # the workers' first poll
        result = sweep_once()
    finally:
        for host in cluster.hosts[:hosts]:
            host.kill_worker()
    result.update(hosts=hosts, devices=devices, limit=limit, workers=len(started))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(PROJECT / "benchmarks/results/sweep_fanout.json"))
    args = parser.parse_args()
    try:
        require_netns()
    except BaseException as exc:  # pytest.skip outside pytest: say why, exit 2
        print(f"bench_sweep_fanout: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        cluster = Cluster(Path(tmp), 2, stack)
        os.environ.update(PREFECT_API_URL=cluster.server.url,
                          **{k: v for k, v in cluster.hosts[0].env().items()
                             if k.startswith("AWS_")})
        origin, src = make_origin(Path(tmp) / "team", cluster.store, "bench",
                                  {"train": {"epochs": 1}})
        ensure_pool("gpu")
        env = subprocess_env()
        env["CONVFLOW_GIT_URL"] = f"file://{origin}"
        run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], cwd=src,
            env=env)
        one = case(cluster, 1, "0", 2)
        two = case(cluster, 2, "0,1", 3)
    load = os.getloadavg()
    report = {"one_host_one_device": one, "two_hosts_two_devices": two,
              "makespan_ratio": round(one["makespan_s"] / two["makespan_s"], 2),
              "cpus": os.cpu_count(), "loadavg_after": [round(x, 2) for x in load],
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT,
                                       capture_output=True, text=True).stdout.strip()}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for name in ("one_host_one_device", "two_hosts_two_devices"):
        r = report[name]
        print(f"{name:<24} makespan {r['makespan_s']:7.1f} s   summed over points: "
              + "  ".join(f"{k[:-2]} {v:6.1f} s" for k, v in r["sum_s"].items()))
    print(f"makespan ratio (1 device / 4 devices): {report['makespan_ratio']}x -> {args.out}")


if __name__ == "__main__":
    main()
