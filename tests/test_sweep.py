"""The sweep flow: a grid of overrides run as DVC experiments, visible to ``dvc exp show``."""

from __future__ import annotations

import json

import pytest
from conftest import dvc, git
from prefect_fixtures import make_toy_repo, py_stage

SCORE = ("import json, yaml; p = yaml.safe_load(open('params.yaml')); "
         "json.dump({'score': p['a']['n'] * p['b']['k']}, open('m.json', 'w'))")


def test_expand_grid_is_the_cartesian_product():
    from flows.sweep import expand_grid, set_args

    assert expand_grid({"train.lr": [0.1, 0.01], "train.epochs": [1]}) == [
        {"train.lr": 0.1, "train.epochs": 1}, {"train.lr": 0.01, "train.epochs": 1}]
    assert expand_grid([{"a.n": 1}]) == [{"a.n": 1}]
    with pytest.raises(ValueError, match="'a.n' needs a non-empty list"):
        expand_grid({"a.n": []})
    assert set_args({"train.model": "seed_net", "train.augment_flip": False}) == [
        "-S", "train.model=seed_net", "-S", "train.augment_flip=false"]


def test_two_point_sweep_yields_two_experiments_in_dvc_exp_show(prefect_api, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.sweep import sweep

    repo = make_toy_repo(tmp_path / "toy", {
        "score": {"cmd": py_stage(SCORE), "params": ["a.n", "b.k"],
                  "metrics": [{"m.json": {"cache": False}}]}},
        params={"a": {"n": 1}, "b": {"k": 10}})
    dvc(repo, "repro")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "baseline")

    rows = sweep({"a.n": [2, 3]}, root=str(repo), max_parallel=2, name_prefix="pts")
    assert sorted((r["experiment"], r["m.json:score"]) for r in rows) == [
        ("pts-1", 20), ("pts-2", 30)]

    # the experiments are DVC's own: `dvc exp show` lists them with their params and metrics
    shown = json.loads(dvc(repo, "exp", "show", "--json").stdout)
    exps = {rev["name"]: rev["data"] for base in shown for group in base["experiments"] or []
            for rev in group["revs"]}
    assert set(exps) == {"pts-1", "pts-2"}
    assert exps["pts-2"]["params"]["params.yaml"]["data"]["a"]["n"] == 3
    assert exps["pts-2"]["metrics"]["m.json"]["data"]["score"] == 30
    # the workspace is untouched: the experiments ran in temp dirs
    assert json.loads((repo / "m.json").read_text()) == {"score": 10}

    with get_client(sync_client=True) as client:
        (art,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["convflow-sweep"])),
            limit=1)
    assert {r["experiment"] for r in json.loads(art.data)} == {"pts-1", "pts-2"}


def test_threads_follow_the_cpu_affinity_not_the_machine():
    """A sweep restricted to one CPU (taskset, a cgroup) gives each experiment 1 thread."""
    import subprocess
    import sys

    from conftest import PROJECT

    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from flows.sweep import usable_cpus; print(usable_cpus())")
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "1"
