"""The flow on the real convflow pipeline (tiny params): DVC decides, Prefect reports it."""

from __future__ import annotations

import pytest
from conftest import make_pipeline_repo, write_params

STAGES = ["fetch", "ingest", "normalize", "train", "evaluate", "plot", "gate"]


@pytest.mark.slow  # the whole tiny pipeline, twice over (~40 s on 2 cores)
def test_run_twice_then_change_epochs_runs_only_train_and_downstream(prefect_api, tmp_path):
    from flows.pipeline import pipeline, stage_graph

    repo = make_pipeline_repo(tmp_path / "repo")
    assert [n.name for n in stage_graph(repo)] == STAGES  # DVC's order, from dvc.yaml

    first = pipeline(root=str(repo))
    assert [(r["stage"], r["status"]) for r in first] == [(s, "ran") for s in STAGES]
    assert (repo / "models" / "model.pt").is_file()

    second = pipeline(root=str(repo))
    assert [(r["stage"], r["status"]) for r in second] == [(s, "up to date") for s in STAGES]

    write_params(repo, {"train": {"epochs": 1}})
    third = {r["stage"]: r["status"] for r in pipeline(root=str(repo))}
    assert third == {"fetch": "up to date", "ingest": "up to date", "normalize": "up to date",
                     "train": "ran", "evaluate": "ran", "plot": "ran", "gate": "ran"}
