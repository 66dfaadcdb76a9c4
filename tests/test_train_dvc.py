"""A real `dvc repro`: a new train.epochs re-runs train and its dependants, nothing upstream."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import dvc, git, ran_stages, write_params

from stages.models import load_model


def test_changing_epochs_reruns_train_and_downstream_only(pipeline_repo: Path) -> None:
    first = dvc(pipeline_repo, "repro")
    assert ran_stages(first.stdout)[:3] == ["ingest", "normalize", "train"]
    git(pipeline_repo, "add", "-A")
    git(pipeline_repo, "commit", "-q", "-m", "first run")
    metrics = json.loads((pipeline_repo / "dvclive/train/metrics.json").read_text())
    assert metrics["step"] == 2  # TINY_PARAMS: 2 epochs

    write_params(pipeline_repo, {"train": {"epochs": 3}})
    second = dvc(pipeline_repo, "repro")
    ran = ran_stages(second.stdout)
    assert ran[0] == "train" and "evaluate" in ran
    assert "ingest" not in ran and "normalize" not in ran
    _, meta = load_model(pipeline_repo / "models/model.pt")
    assert meta["params"]["epochs"] == 3
    diff = dvc(pipeline_repo, "metrics", "diff", "--json").stdout
    assert json.loads(diff)["dvclive/train/metrics.json"]["step"] == {
        "old": 2, "new": 3, "diff": 1}
    # nothing is stale afterwards, so a third repro runs nothing
    assert ran_stages(dvc(pipeline_repo, "repro").stdout) == []


def test_identical_rerun_leaves_dvc_lock_and_git_clean(pipeline_repo: Path) -> None:
    """No wall-clock value in a tracked output: retraining to the same result changes nothing."""
    dvc(pipeline_repo, "repro", "train")
    git(pipeline_repo, "add", "-A")
    git(pipeline_repo, "commit", "-q", "-m", "trained")
    lock = (pipeline_repo / "dvc.lock").read_text()
    (pipeline_repo / "models/checkpoint.pt").unlink()  # a full retrain, not a resume
    assert "train" in ran_stages(dvc(pipeline_repo, "repro", "-f", "train").stdout)
    assert git(pipeline_repo, "status", "--porcelain") == ""
    assert (pipeline_repo / "dvc.lock").read_text() == lock
    # downstream sees nothing new either: plot and evaluate would not re-run for it
    status = json.loads(dvc(pipeline_repo, "status", "train", "--json").stdout)
    assert status == {}
