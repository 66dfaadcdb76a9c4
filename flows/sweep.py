"""A Prefect flow that sweeps a grid of parameter overrides as DVC experiments.

Each point runs as ``dvc exp run --temp -S key=value ...`` (its own temporary workspace,
so points can run side by side and the user's workspace is untouched), at most
``max_parallel`` at a time. The experiments stay in the repository, so ``dvc exp show``,
``dvc exp diff`` and ``dvc exp apply`` work on them afterwards; the flow publishes the
same comparison as a Prefect table artifact.

With ``point_deployment`` (the ``gpu-sweep`` deployment sets it), the grid fans out
instead: each point is its own run of that deployment (``sweep_point``) on the work pool,
wherever a device is free; see ``flows.fanout``.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from flows import dvc_adapter as dvc
from flows import fanout, publish, slots
from flows.dvc_adapter import dvc_command, dvc_env
from flows.overrides import pin_data_path
from flows.runner import ServerLost, StageFailed, dvc_failure, run_guarded
from stages.paths import find_root


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity, as the stages count them), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no sched_getaffinity (macOS): every CPU
        return max(1, os.cpu_count() or 1)


def expand_grid(grid: dict[str, list[Any]] | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points of a sweep: the cartesian product of a {key: [values]} grid, or a list as is."""
    if isinstance(grid, list):
        return [dict(point) for point in grid]
    keys = list(grid)
    for key in keys:
        if not isinstance(grid[key], list) or not grid[key]:
            raise ValueError(f"sweep grid: '{key}' needs a non-empty list of values")
    combos = itertools.product(*(grid[k] for k in keys))
    return [dict(zip(keys, values, strict=True)) for values in combos]


def set_args(overrides: dict[str, Any]) -> list[str]:
    """``-S key=value`` arguments for ``dvc exp run``; values as YAML/JSON literals."""
    args: list[str] = []
    for key, value in overrides.items():
        literal = value if isinstance(value, str) else json.dumps(value)
        args += ["-S", f"{key}={literal}"]
    return args


@task(name="dvc-experiment", task_run_name="{name}", cache_policy=NO_CACHE)
def run_experiment(name: str, overrides: dict[str, Any], root: str,
                   timeout_s: float | None = None, threads: int | None = None,
                   temp: bool = True) -> dict[str, Any]:
    """Run one sweep point as ``dvc exp run [--temp]``; its name, overrides, device, seconds.

    ``threads`` caps the CPU threads of its stages (OMP_NUM_THREADS, which the stages'
    ``threads: 0`` honours), so experiments side by side share the cores instead of
    fighting over them. ``temp=False`` runs it in the workspace (a run's private clone).
    """
    log = get_run_logger()
    cmd = dvc_command("exp", "run", *(["--temp"] if temp else []), "-n", name,
                      *set_args(overrides))
    log.info("%s", " ".join(cmd[1:]))
    env = dvc_env()
    if threads and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(threads)
    # one device of this machine (or one team-wide slot where it has none) per experiment
    with slots.device_lease(log, f"experiment '{name}'") as gpu:
        env.update(gpu)
        started, start = time.time(), time.perf_counter()
        output, status, timed_out = run_guarded(cmd, Path(root), name, timeout_s, log,
                                                env=env)
        seconds, ended = round(time.perf_counter() - start, 3), time.time()
    failure = f"timed out after {timeout_s} s" if timed_out else dvc_failure(output, status)
    if failure:
        raise StageFailed(name, failure, status, False, kind="experiment")
    return {"experiment": name, **{f"-S {k}": v for k, v in overrides.items()},
            "device": gpu.get("CUDA_VISIBLE_DEVICES", "cpu"), "started": round(started, 3),
            "ended": round(ended, 3), "seconds": seconds}


def exp_show_rows(root: str | Path, names: set[str] | None = None) -> list[dict[str, Any]]:
    """``dvc exp show`` as flat rows (experiment, rev, params, metrics); see ``dvc_adapter``."""
    return dvc.exp_rows(root, names)


def _metrics_only(row: dict[str, Any]) -> dict[str, Any]:
    """A ``dvc exp show`` row's metrics (its ``file:key`` columns that are not params)."""
    return {k: v for k, v in row.items() if ":" in k and not k.startswith("params.yaml:")}


@flow(name="convflow-sweep-point")
def sweep_point(name: str, overrides: dict[str, Any], root: str | None = None,
                pull: bool = True, push: bool = True,
                timeout_s: float | None = None) -> dict[str, Any]:
    """One sweep point in this run's own clone: pull, train under a lease, push; its row."""
    log = get_run_logger()
    repo_root = find_root(root)
    row: dict[str, Any] = {"experiment": name, "machine": slots.machine()}
    started = time.perf_counter()
    if pull:
        publish.start_run(repo_root)
    row["pull_s"] = round(time.perf_counter() - started, 3)
    point = pin_data_path(overrides, repo_root)
    # the clone is this run's alone: the experiment runs in it (no --temp copy)
    ran = run_experiment(name, point, str(repo_root), timeout_s, None, temp=False)
    row.update({k: v for k, v in ran.items() if k != "seconds"}, train_s=ran["seconds"])
    pushed = time.perf_counter()
    if push:
        publish.exp_push(repo_root, [name])
    row["push_s"] = round(time.perf_counter() - pushed, 3)
    for shown in dvc.exp_rows(repo_root, {name}):
        row.update(_metrics_only(shown))
    log.info("point %s ran on %s, device %s", name, row["machine"], row.get("device"))
    create_table_artifact(table=[row], key=fanout.POINT_ARTIFACT,
                          description=f"Sweep point {name}: where it ran and what it scored")
    return row


#: The column that picks a fanned-out sweep's best point (highest wins).
BEST_BY = "metrics/evaluate.json:test.accuracy"


@flow(name="convflow-sweep")
def sweep(grid: dict[str, list[Any]] | list[dict[str, Any]], root: str | None = None,
          max_parallel: int = 2, timeout_s: float | None = None,
          name_prefix: str | None = None, pull: bool = False, push: bool = False,
          point_deployment: str | None = None, best_by: str = BEST_BY,
          resubmits: int = 2) -> list[dict[str, Any]]:
    """Run every point of ``grid`` as a DVC experiment: here, ``max_parallel`` at a time, or
    each as its own run of ``point_deployment`` on the work pool."""
    from prefect.runtime import flow_run

    repo_root = find_root(root)
    prefix = name_prefix or flow_run.name or "sweep"
    grid_points = expand_grid(grid)
    names = [f"{prefix}-{i}" for i in range(1, len(grid_points) + 1)]
    if point_deployment:  # each point pins its data path in its own clone
        return _fan_out(point_deployment, dict(zip(names, grid_points, strict=True)),
                        {"pull": pull, "push": push, "timeout_s": timeout_s}, best_by,
                        resubmits)
    # a data.path outside the repo must be absolute inside the --temp copy (.dvc/tmp/...)
    points = [pin_data_path(point, repo_root) for point in grid_points]
    if pull:
        publish.start_run(repo_root)
    states = _run_here(repo_root, names, points, max_parallel, timeout_s)
    failures = _failures(states)
    if push:  # the experiments that finished; a failed point has nothing to share
        publish.exp_push(repo_root, [n for n, s in zip(names, states, strict=True)
                                     if s.is_completed()])
    rows = exp_show_rows(repo_root, set(names))
    if rows:
        create_table_artifact(table=rows, key="convflow-sweep",
                              description="This sweep's experiments (dvc exp show)")
    if failures:
        raise failures[0]  # the first failure, with its status (2: a user error)
    return rows


def _run_here(root: Path, names: list[str], points: list[dict[str, Any]], max_parallel: int,
              timeout_s: float | None) -> list[Any]:
    """Every point as a task of this run, ``max_parallel`` at a time; their final states."""
    threads = max(1, usable_cpus() // max(1, max_parallel))
    get_run_logger().info("%d experiments, %d at a time, %d CPU thread(s) each", len(points),
                          max_parallel, threads)
    with ThreadPoolTaskRunner(max_workers=max(1, max_parallel)) as runner:
        futures = [runner.submit(run_experiment, {"name": name, "overrides": point,
                                                  "root": str(root),
                                                  "timeout_s": timeout_s,
                                                  "threads": threads})
                   for name, point in zip(names, points, strict=True)]
        for future in futures:
            future.wait()
        return [future.state for future in futures]


def _failures(states: list[Any]) -> list[StageFailed]:
    """The points that did not complete, as ``StageFailed`` (a lost server is raised)."""
    failures: list[StageFailed] = []
    for state in states:
        if not state.is_completed():
            try:
                state.result()
            except StageFailed as exc:
                failures.append(exc)
            except ServerLost:
                raise
            except Exception as exc:
                failures.append(StageFailed("sweep", f"{type(exc).__name__}: {exc}", None,
                                            False, kind="step"))
    return failures


def _fan_out(deployment: str, points: dict[str, dict[str, Any]],
             options: dict[str, Any], best_by: str, resubmits: int) -> list[dict[str, Any]]:
    """Each point as a run of ``deployment``; one table of all; fails if any point failed."""
    get_run_logger().info("%d points, each a run of %s", len(points), deployment)
    runs = fanout.wait_points(deployment, points, options, resubmits)
    table = fanout.summarise(runs, best_by, points)
    failed = [name for name, run in runs.items() if not run.state.is_completed()]
    if failed:
        raise StageFailed("sweep", f"{len(failed)} of {len(runs)} points failed: "
                          f"{', '.join(failed)} (the others completed)", None, False,
                          kind="step")
    return table
