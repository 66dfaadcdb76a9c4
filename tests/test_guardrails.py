"""Guardrails without a Prefect server: the gate's verdict, direct DVC edges, dvclive rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import dvc, make_pipeline_repo, write_params

from stages.gate import read_baseline, verdict
from stages.params import GateParams


def test_verdict_names_metric_value_and_threshold() -> None:
    none = {"version": None, "accuracy": None}
    floor = verdict(0.42, GateParams(min_accuracy=0.9), none)
    assert not floor["passed"]
    assert floor["reason"] == "test.accuracy 0.4200 is below gate.min_accuracy 0.9000"

    prod = {"version": "cifar-cnn@v0.0.1", "accuracy": 0.85}
    drop = verdict(0.80, GateParams(min_accuracy=0.5, max_drop=0.02), prod)
    assert not drop["passed"] and drop["drop"] == pytest.approx(0.05)
    assert drop["reason"] == ("test.accuracy 0.8000 is 0.0500 below production "
                              "cifar-cnn@v0.0.1 (0.8500), more than gate.max_drop 0.0200")

    ok = verdict(0.84, GateParams(min_accuracy=0.5, max_drop=0.02), prod)
    assert ok["passed"] and ok["drop"] == pytest.approx(0.01)
    # nothing in production: only the floor counts, whatever the drop limit
    assert verdict(0.5, GateParams(min_accuracy=0.5, max_drop=0.0), none)["passed"]


def test_baseline_file_is_validated(tmp_path: Path) -> None:
    assert read_baseline(tmp_path / "missing.yaml")["accuracy"] is None
    bad = tmp_path / "production.yaml"
    bad.write_text("accuracy: high\n")
    from stages.errors import UserError

    with pytest.raises(UserError, match="accuracy must be a number"):
        read_baseline(bad)


def test_epoch_rows_read_dvclive_files(tmp_path: Path) -> None:
    from dvclive import Live
    from flows.progress import epoch_rows

    live = Live(str(tmp_path / "live"), save_dvc_exp=False, dvcyaml=None, report=None)
    for epoch in (1, 2, 3):
        live.step = epoch
        live.log_metric("train/acc", epoch / 10)
        live.log_metric("lr", 0.1)
    live.end()
    rows = epoch_rows(tmp_path / "live")
    assert rows == [{"epoch": e, "train/acc": e / 10, "lr": 0.1} for e in (1, 2, 3)]
    assert epoch_rows(tmp_path / "live", since=4e9) == []  # files older than the stage start


@pytest.mark.slow
def test_dvc_repro_shows_the_verdict_and_does_not_fail(tmp_path: Path) -> None:
    """`dvc repro` alone: the gate writes its verdict (a metric); a miss is data, not an error."""
    repo = make_pipeline_repo(tmp_path / "repo", {"gate": {"min_accuracy": 0.99}})
    dvc(repo, "repro")
    shown = json.loads(dvc(repo, "metrics", "show", "--json").stdout)
    # no production model: drop is null, which DVC leaves out of the table
    assert shown[""]["data"]["metrics/verdict.json"]["data"] == {"passed": False}
    gate = json.loads((repo / "metrics" / "gate.json").read_text())
    assert gate["passed"] is False and "below gate.min_accuracy 0.9900" in gate["reason"]
    # a new production baseline re-runs only the gate
    (repo / "production.yaml").write_text(yaml.safe_dump(
        {"version": "cifar-cnn@v9.9.9", "rev": None, "accuracy": 0.999}))
    write_params(repo, {"gate": {"min_accuracy": 0.0}})
    out = dvc(repo, "repro").stdout
    assert "Running stage 'gate'" in out and "Running stage 'train'" not in out
    gate = json.loads((repo / "metrics" / "gate.json").read_text())
    assert not gate["passed"] and "below production cifar-cnn@v9.9.9" in gate["reason"]
    drop = json.loads((repo / "metrics" / "verdict.json").read_text())["drop"]
    assert drop == gate["drop"] and drop > 0
