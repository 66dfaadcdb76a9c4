"""A real ``dvc repro`` of ingest + normalize in a temp git repo: DVC re-runs only what a
params change affects."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from conftest import dvc, git, ran_stages, write_params

from stages.io import load_split


def _repro(repo: Path) -> list[str]:
    # target normalize (and so ingest): later stages are not what this test is about
    return ran_stages(dvc(repo, "repro", "normalize").stdout)


def test_repro_then_params_changes_rerun_only_what_they_affect(pipeline_repo: Path) -> None:
    assert _repro(pipeline_repo) == ["fetch", "ingest", "normalize"]
    stats = json.loads((pipeline_repo / "data/processed/stats.json").read_text())
    assert stats["source"] == "synthetic" and len(stats["classes"]) == 10
    # TINY_PARAMS: 400 train images, 10% of them stratified into validation
    assert [sum(stats["class_counts"][s]) for s in ("train", "val", "test")] == [360, 40, 200]
    images, _ = load_split(pipeline_repo / "data/processed/train.npz")
    assert images.dtype == np.uint8 and images.shape == (360, 3, 32, 32)
    lock = (pipeline_repo / "dvc.lock").read_text()
    assert "ingest:" in lock and "normalize:" in lock
    git(pipeline_repo, "add", "dvc.lock")
    git(pipeline_repo, "commit", "-qm", "data")

    assert _repro(pipeline_repo) == []  # up to date

    write_params(pipeline_repo, {"normalize": {"val_fraction": 0.2}})
    assert _repro(pipeline_repo) == ["normalize"]
    stats = json.loads((pipeline_repo / "data/processed/stats.json").read_text())
    assert sum(stats["class_counts"]["val"]) == 80

    before = (pipeline_repo / "data/raw/train.npz").read_bytes()
    write_params(pipeline_repo, {"data": {"synthetic": {"seed": 1}}})
    assert _repro(pipeline_repo) == ["ingest", "normalize"]
    assert (pipeline_repo / "data/raw/train.npz").read_bytes() != before
