"""Versioned results on real dvc + git: what re-runs, what diffs, what a fresh clone gets back.

One reproduced repository (tiny synthetic params) is shared by the whole module: a full
`dvc repro` costs ~20 s on 2 cores. Tests run in file order; each leaves the repository
committed and clean for the next.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import dvc, git, make_pipeline_repo, ran_stages, write_params

FIGURES = {"loss_history", "accuracy", "train_images", "test_predictions", "kernels",
           "max_pooling", "confusion_matrix", "filters", "most_confident_wrong"}
UP_TO_DATE = "Data and pipelines are up to date."
#: the module's seven tests run the whole tiny pipeline four times and two experiments, one
#: after another in one group (~70 s of CPU, the fast tier's longest chain): CI runs them
pytestmark = pytest.mark.slow


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def lock_md5(repo: Path, stage: str, path: str) -> str:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return next(o["md5"] for o in lock["stages"][stage]["outs"] if o["path"] == path)


def assert_clean(repo: Path) -> None:
    assert git(repo, "status", "--porcelain") == ""
    assert UP_TO_DATE in dvc(repo, "status").stdout


def restore(repo: Path) -> None:
    """Back to the last commit: tracked files from git, DVC-cached outputs from the cache."""
    git(repo, "checkout", "--", ".")
    dvc(repo, "checkout", "-q")
    assert_clean(repo)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The pipeline reproduced once and committed, with the output of that `dvc repro`."""
    repo = make_pipeline_repo(tmp_path_factory.mktemp("results") / "repo")
    out = dvc(repo, "repro").stdout
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "first run")
    return repo, out


def test_full_pipeline_reproduces_end_to_end(repo: tuple[Path, str]) -> None:
    root, out = repo
    assert ran_stages(out) == ["fetch", "ingest", "normalize", "train", "evaluate", "plot",
                              "gate"]
    summary = json.loads((root / "metrics/evaluate.json").read_text())
    details = json.loads((root / "metrics/evaluate_details.json").read_text())
    assert details["dataset"] == {"source": "synthetic", "n_test": 200, "n_classes": 10}
    assert details["device"] == "cpu"
    rows = json.loads((root / "results/evaluate/predictions.json").read_text())
    assert len(rows) == 200  # the committed accuracy is the one of the per-image rows
    hits = sum(r["actual"] == r["predicted"] for r in rows)
    assert summary["test"]["accuracy"] == pytest.approx(hits / len(rows))
    assert {p.stem for p in (root / "reports/figures").glob("*.png")} == FIGURES
    # small results are committed to git; per-image rows and figures are DVC-cached
    tracked = set(git(root, "ls-files").split())
    assert {"dvc.lock", "metrics/evaluate.json", "metrics/evaluate_details.json",
            "metrics/per_class.json", "metrics/confusion.json", "metrics/data_report.json",
            "metrics/gate.json", "metrics/verdict.json"} <= tracked
    assert not any(p.startswith(("results/", "reports/", "models/", "data/")) for p in tracked)
    assert_clean(root)


def test_second_repro_runs_nothing(repo: tuple[Path, str]) -> None:
    root, _ = repo
    out = dvc(root, "repro").stdout
    assert ran_stages(out) == []
    assert_clean(root)


def test_plot_param_reruns_only_plot(repo: tuple[Path, str]) -> None:
    root, _ = repo
    write_params(root, {"plot": {"dpi": 40}})
    assert ran_stages(dvc(root, "repro").stdout) == ["plot"]
    restore(root)


def test_evaluate_param_reruns_evaluate_and_plot_only(repo: tuple[Path, str]) -> None:
    root, _ = repo
    write_params(root, {"evaluate": {"tta_flip": True}})
    assert ran_stages(dvc(root, "repro").stdout) == ["evaluate", "plot", "gate"]
    assert json.loads((root / "metrics/evaluate_details.json").read_text())["tta_flip"] is True
    restore(root)


def test_lr_change_is_named_by_metrics_params_and_plots_diff(repo: tuple[Path, str],
                                                            tmp_path: Path) -> None:
    root, _ = repo
    before = json.loads((root / "metrics/evaluate.json").read_text())["test"]
    old_lr = yaml.safe_load((root / "params.yaml").read_text())["train"]["lr"]
    assert old_lr != 0.02
    write_params(root, {"train": {"lr": 0.02}})
    assert ran_stages(dvc(root, "repro").stdout) == ["train", "evaluate", "plot", "gate"]
    git(root, "commit", "-q", "-am", "lr 0.02")
    after = json.loads((root / "metrics/evaluate.json").read_text())["test"]

    params = dvc(root, "params", "diff", "HEAD~1", "HEAD").stdout
    assert re.search(rf"params\.yaml\s+train\.lr\s+{re.escape(str(old_lr))}\s+0\.02", params), \
        params

    metrics = dvc(root, "metrics", "diff", "HEAD~1", "HEAD").stdout
    assert f"{before['loss']:.5f}".rstrip("0") in metrics, metrics
    assert f"{after['loss']:.5f}".rstrip("0") in metrics, metrics
    assert "metrics/evaluate.json" in metrics and "test.loss" in metrics
    assert "dvclive/train/metrics.json" in metrics  # training metrics diff too

    html_dir = tmp_path / "html"
    dvc(root, "plots", "diff", "HEAD~1", "HEAD", "-o", str(html_dir))
    html = (html_dir / "index.html").read_text()
    declared = json.loads(dvc(root, "plots", "diff", "HEAD~1", "HEAD", "--json",
                              "-o", str(tmp_path / "json")).stdout)
    assert not declared.get("errors"), declared["errors"]
    plots = declared["data"]
    # the stage plots, the top-level definitions and every PNG are all there...
    assert {"Accuracy per epoch", "Loss per epoch", "Test confusion matrix",
            "metrics/per_class.json", "dvclive/train/plots/custom/loss_history.json"} <= set(plots)
    assert {f"reports/figures/{f}.png" for f in FIGURES} <= set(plots)
    for plot_id, renders in plots.items():
        revs = {r for render in renders for r in render["revisions"]}
        assert revs == {"HEAD~1", "HEAD"}, plot_id  # ...for both revisions
    for name in FIGURES:
        for rev in ("HEAD~1", "HEAD"):
            png = f"static/{rev}_reports_figures_{name}.png"
            assert png in html and (html_dir / png).is_file()
    for anchor in ("Accuracy_per_epoch", "Test_confusion_matrix", "metrics_per_class_json"):
        assert f"vegaEmbed('#{anchor}'" in html
    assert_clean(root)


def test_push_then_pull_in_a_fresh_clone_restores_everything(repo: tuple[Path, str],
                                                             tmp_path: Path) -> None:
    root, _ = repo
    dvc(root, "remote", "add", "-d", "storage", str(tmp_path / "remote"))
    git(root, "commit", "-q", "-am", "DVC remote")
    dvc(root, "push")

    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(root), str(clone))
    assert not (clone / "models/model.pt").exists()
    dvc(clone, "pull")
    assert md5(clone / "models/model.pt") == md5(root / "models/model.pt") \
        == lock_md5(root, "train", "models/model.pt")
    assert {p.stem for p in (clone / "reports/figures").glob("*.png")} == FIGURES
    status = dvc(clone, "status").stdout
    assert UP_TO_DATE in status, status  # nothing would re-run
    assert ran_stages(dvc(clone, "repro").stdout) == []


def test_exp_run_with_a_param_is_listed_by_exp_show(repo: tuple[Path, str]) -> None:
    root, _ = repo
    assert_clean(root)
    dvc(root, "exp", "run", "-n", "lr-high", "-S", "train.lr=0.05")
    shown = json.loads(dvc(root, "exp", "show", "--json").stdout)
    exps = [e for rev in shown for e in (rev.get("experiments") or [])]
    names = {e.get("name") for e in exps}
    assert "lr-high" in names, names
    [exp] = [e for e in exps if e.get("name") == "lr-high"]
    data = exp["revs"][0]["data"]
    assert data["params"]["params.yaml"]["data"]["train"]["lr"] == 0.05
    assert "accuracy" in data["metrics"]["metrics/evaluate.json"]["data"]["test"]
    # the table users read (csv: the terminal table is cut to the terminal's width)
    header, *rows = csv.reader(io.StringIO(dvc(root, "exp", "show", "--csv").stdout))
    [row] = [r for r in rows if r[0] == "lr-high"]
    assert row[header.index("train.lr")] == "0.05"
    accuracy = data["metrics"]["metrics/evaluate.json"]["data"]["test"]["accuracy"]
    assert float(row[header.index("test.accuracy")]) == pytest.approx(accuracy, abs=1e-4)
