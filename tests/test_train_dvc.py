"""A real `dvc repro`: retraining to the same result leaves dvc.lock and git clean."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import dvc, git, ran_stages


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
