"""A Prefect flow that sweeps a grid of parameter overrides as DVC experiments.

Each point runs as ``dvc exp run --temp -S key=value ...`` (its own temporary workspace,
so points can run side by side and the user's workspace is untouched), at most
``max_parallel`` at a time. The experiments stay in the repository, so ``dvc exp show``,
``dvc exp diff`` and ``dvc exp apply`` work on them afterwards; the flow publishes the
same comparison as a Prefect table artifact.
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
from flows import publish, slots
from flows.dvc_adapter import dvc_command, dvc_env
from flows.runner import ServerLost, StageFailed, dvc_failure, run_guarded
from stages.fetch import pin_data_path
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
                   timeout_s: float | None = None, threads: int | None = None) -> dict[str, Any]:
    """Run one sweep point as ``dvc exp run --temp``; its name, overrides and seconds.

    ``threads`` caps the CPU threads of its stages (OMP_NUM_THREADS, which the stages'
    ``threads: 0`` honours), so experiments side by side share the cores instead of
    fighting over them.
    """
    log = get_run_logger()
    cmd = dvc_command("exp", "run", "--temp", "-n", name, *set_args(overrides))
    log.info("%s", " ".join(cmd[1:]))
    env = dvc_env()
    if threads and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    # one resource slot and (on a multi-GPU machine) one GPU per experiment
    with slots.slot(log, f"experiment '{name}'"), slots.device_pool().device() as gpu:
        env.update(gpu)
        output, status, timed_out = run_guarded(cmd, Path(root), name, timeout_s, log,
                                                env=env)
    seconds = round(time.perf_counter() - start, 3)
    failure = f"timed out after {timeout_s} s" if timed_out else dvc_failure(output, status)
    if failure:
        raise StageFailed(name, failure, status, False, kind="experiment")
    return {"experiment": name, **{f"-S {k}": v for k, v in overrides.items()},
            "seconds": seconds}


def exp_show_rows(root: str | Path, names: set[str] | None = None) -> list[dict[str, Any]]:
    """``dvc exp show`` as flat rows (experiment, rev, params, metrics); see ``dvc_adapter``."""
    return dvc.exp_rows(root, names)


@flow(name="convflow-sweep")
def sweep(grid: dict[str, list[Any]] | list[dict[str, Any]], root: str | None = None,
          max_parallel: int = 2, timeout_s: float | None = None,
          name_prefix: str | None = None, pull: bool = False,
          push: bool = False) -> list[dict[str, Any]]:
    """Run every point of ``grid`` as a DVC experiment, ``max_parallel`` at a time."""
    from prefect.runtime import flow_run

    log = get_run_logger()
    repo_root = find_root(root)
    # a data.path outside the repo must be absolute inside the --temp copy (.dvc/tmp/...)
    points = [pin_data_path(point, repo_root) for point in expand_grid(grid)]
    if pull:
        publish.start_run(repo_root)
    prefix = name_prefix or flow_run.name or "sweep"
    names = [f"{prefix}-{i}" for i in range(1, len(points) + 1)]
    threads = max(1, usable_cpus() // max(1, max_parallel))
    log.info("%d experiments, %d at a time, %d CPU thread(s) each", len(points), max_parallel,
             threads)
    with ThreadPoolTaskRunner(max_workers=max(1, max_parallel)) as runner:
        futures = [runner.submit(run_experiment, {"name": name, "overrides": point,
                                                  "root": str(repo_root),
                                                  "timeout_s": timeout_s,
                                                  "threads": threads})
                   for name, point in zip(names, points, strict=True)]
        for future in futures:
            future.wait()
        states = [future.state for future in futures]
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
