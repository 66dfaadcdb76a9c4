"""evaluate: metrics match hand-computed values; batching/TTA are exact; bad inputs are named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from stages import evaluate as ev
from stages.errors import UserError, run_cli
from stages.io import save_split, write_json
from stages.models import build_model, first_layer_title, save_model
from stages.params import EvaluateParams

CLASSES = ["a", "b", "c"]
# rows: true class, columns: predicted class
HAND_CM = np.array([[3, 1, 0],
                    [1, 2, 1],
                    [0, 0, 2]])


def _labels_for(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    actual, predicted = [], []
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            actual += [i] * int(cm[i, j])
            predicted += [j] * int(cm[i, j])
    return np.array(actual), np.array(predicted)


def test_confusion_matrix_counts_true_rows_predicted_columns() -> None:
    actual, predicted = _labels_for(HAND_CM)
    np.testing.assert_array_equal(ev.confusion_matrix(actual, predicted, 3), HAND_CM)
    # a class with no images still gets its row and column
    np.testing.assert_array_equal(ev.confusion_matrix([0, 0], [0, 1], 4)[2:], 0)


def test_metrics_equal_hand_computed_values() -> None:
    m = ev.classification_metrics(HAND_CM, CLASSES)
    # precision = diag / column sums (4, 3, 3); recall = diag / row sums (4, 4, 2)
    assert m["accuracy"] == pytest.approx(7 / 10)
    pc = m["per_class"]
    assert [pc[c]["precision"] for c in CLASSES] == pytest.approx([3 / 4, 2 / 3, 2 / 3])
    assert [pc[c]["recall"] for c in CLASSES] == pytest.approx([3 / 4, 1 / 2, 1.0])
    # F1 = 2PR/(P+R): a 0.75; b (2*2/3*1/2)/(2/3+1/2) = 4/7; c (2*2/3)/(5/3) = 0.8
    assert [pc[c]["f1"] for c in CLASSES] == pytest.approx([0.75, 4 / 7, 0.8])
    assert [pc[c]["support"] for c in CLASSES] == [4, 4, 2]
    assert m["macro_precision"] == pytest.approx((3 / 4 + 2 / 3 + 2 / 3) / 3)
    assert m["macro_recall"] == pytest.approx((3 / 4 + 1 / 2 + 1) / 3)
    assert m["macro_f1"] == pytest.approx((0.75 + 4 / 7 + 0.8) / 3)


def test_class_never_predicted_scores_zero_not_nan() -> None:
    cm = np.array([[2, 0], [1, 0]])  # class 1 is never predicted, never right
    m = ev.classification_metrics(cm, ["x", "y"])
    assert m["per_class"]["y"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["macro_precision"] == pytest.approx((2 / 3 + 0) / 2)
    assert all(np.isfinite(v) for v in (m["macro_precision"], m["macro_recall"], m["macro_f1"]))


def test_most_confident_wrong_ranks_by_confidence_and_skips_right_ones() -> None:
    probs = np.array([[0.9, 0.1],    # 0: right, very sure (never listed)
                      [0.2, 0.8],    # 1: wrong (true 0), 0.8
                      [0.4, 0.6],    # 2: wrong (true 0), 0.6
                      [0.95, 0.05],  # 3: wrong (true 1), 0.95
                      [0.2, 0.8]])   # 4: wrong (true 0), 0.8 -- tie with 1: test order kept
    labels = np.array([0, 0, 0, 1, 0])
    wrong = ev.most_confident_wrong(np.log(probs), labels, n=3)
    assert [w["index"] for w in wrong] == [3, 1, 4]
    assert wrong[0] == {"index": 3, "actual": 1, "predicted": 0,
                        "confidence": pytest.approx(0.95)}
    assert ev.most_confident_wrong(np.log(probs), labels, n=0) == []


def _model(n_classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("seed_net", n_classes, [0.5] * 3, [0.25] * 3).eval()


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)


def test_batch_size_does_not_change_predictions() -> None:
    model, x = _model(), _images(23)
    one_batch = ev.log_probs(model, x, batch_size=100)
    np.testing.assert_allclose(ev.log_probs(model, x, batch_size=4), one_batch, atol=1e-5)
    # log-probabilities: each row's probabilities sum to 1
    np.testing.assert_allclose(np.exp(one_batch).sum(axis=1), 1.0, atol=1e-6)


def test_tta_flip_averages_the_probabilities_of_image_and_mirror() -> None:
    model, x = _model(), _images(5)
    with torch.no_grad():
        t = torch.from_numpy(x)
        expected = (model(t).softmax(1) + model(t.flip(-1)).softmax(1)) / 2
    got = np.exp(ev.log_probs(model, x, batch_size=2, tta_flip=True))
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)


def test_evaluate_loss_is_cross_entropy_and_metrics_agree() -> None:
    model, x = _model(), _images(40)
    labels = np.random.default_rng(1).integers(0, 3, 40)
    result = ev.evaluate(model, x, labels, CLASSES, EvaluateParams(batch_size=16, n_wrong=5))
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
    expected_loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels)).item()
    assert result.metrics["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert result.metrics["accuracy"] == pytest.approx(
        float((logits.argmax(1).numpy() == labels).mean()))
    assert result.confusion.sum() == 40
    assert len(result.wrong) == min(5, int((result.predicted != labels).sum()))


def test_mismatched_model_is_a_clear_error() -> None:
    meta = {"classes": ["a", "b"], "input": {"shape": [3, 32, 32]}}
    with pytest.raises(UserError, match=r"m\.pt predicts 2 classes but data/processed has 3"):
        ev.check_compatible(meta, CLASSES, (3, 32, 32), "m.pt", "data/processed")
    with pytest.raises(UserError, match="trained on classes"):
        ev.check_compatible(meta, ["a", "z"], (3, 32, 32), "m.pt", "d")
    with pytest.raises(UserError, match=r"takes images of shape \[3, 32, 32\].*\[3, 28, 28\]"):
        ev.check_compatible(meta, ["a", "b"], (3, 28, 28), "m.pt", "d")


# ----------------------------------------------------------------------------- the CLI
def write_stage_inputs(root: Path, n_test: int = 30, model_classes: list[str] | None = None,
                       params: dict | None = None) -> None:
    """A processed test split, a saved model and params.yaml, as the pipeline leaves them."""
    data = root / "data" / "processed"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    save_split(data / "test.npz", _images(n_test), rng.integers(0, 3, n_test))
    write_json(data / "stats.json", {"classes": CLASSES, "mean": [0.5] * 3, "std": [0.25] * 3,
                                     "source": "synthetic"})
    (root / "models").mkdir()
    classes = model_classes or CLASSES
    save_model(root / "models" / "model.pt", _model(len(classes)), arch="seed_net",
               classes=classes, mean=[0.5] * 3, std=[0.25] * 3, extra={})
    (root / "params.yaml").write_text(yaml.safe_dump(
        {"evaluate": {"batch_size": 8, "tta_flip": False, "n_wrong": 4, **(params or {})}}))


ARGV = ["--data", "data/processed", "--model", "models/model.pt", "--metrics", "metrics",
        "--out", "results/evaluate"]


def test_main_writes_small_committed_metrics_and_cached_rows(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    write_stage_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    ev.main(ARGV)

    # the metrics file holds only the headline (`dvc metrics show` stays narrow)
    summary = json.loads((tmp_path / "metrics" / "evaluate.json").read_text())
    assert summary == {"test": {k: summary["test"][k] for k in ("accuracy", "loss",
                                                                "accuracy_tta")}}
    details = json.loads((tmp_path / "metrics" / "evaluate_details.json").read_text())
    assert set(details["test"]) == {"macro_precision", "macro_recall", "macro_f1"}
    assert details["dataset"] == {"source": "synthetic", "n_test": 30, "n_classes": 3}
    assert details["device"] == "cpu" and details["tta_flip"] is False
    per_class = json.loads((tmp_path / "metrics" / "per_class.json").read_text())
    assert [r["class"] for r in per_class] == CLASSES
    assert set(per_class[0]) == {"class", "precision", "recall", "f1", "support"}
    assert sum(r["support"] for r in per_class) == 30
    confusion = json.loads((tmp_path / "metrics" / "confusion.json").read_text())
    assert np.array(confusion["matrix"]).sum() == 30 and confusion["classes"] == CLASSES

    # one row per image, in the shape DVC's confusion template counts
    rows = json.loads((tmp_path / "results" / "evaluate" / "predictions.json").read_text())
    assert len(rows) == 30 and set(rows[0]) == {"actual", "predicted"}
    assert {r["actual"] for r in rows} <= set(CLASSES)
    counted = ev.confusion_matrix([CLASSES.index(r["actual"]) for r in rows],
                                  [CLASSES.index(r["predicted"]) for r in rows], 3)
    np.testing.assert_array_equal(counted, confusion["matrix"])
    # and the accuracy in the committed file is the one the rows give
    assert summary["test"]["accuracy"] == pytest.approx(np.trace(counted) / 30, abs=1e-6)
    wrong = json.loads((tmp_path / "results" / "evaluate" / "wrong.json").read_text())
    assert len(wrong) <= 4 and all(w["actual"] != w["predicted"] for w in wrong)
    assert all(rows[w["index"]]["predicted"] == w["predicted_name"] for w in wrong)


def test_main_writes_the_models_first_layer_filters_for_plot(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """filters.npz: the saved model's first conv weights and their title, so plot draws them
    without the model (or torch)."""
    write_stage_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    ev.main(ARGV)
    with np.load(tmp_path / "results/evaluate/filters.npz", allow_pickle=False) as npz:
        weights, title = npz["weights"], str(npz["title"])
    first = next(m for m in _model().modules() if isinstance(m, torch.nn.Conv2d))
    assert weights.dtype == np.float32 and weights.shape == (6, 3, 5, 5)
    np.testing.assert_array_equal(weights, first.weight.detach().numpy())
    assert title == first_layer_title(_model()) == "Learned first-layer filters"


@pytest.mark.parametrize(("arch", "shape", "title"), [
    ("seed_net", (6, 3, 5, 5), "Learned first-layer filters"),
    ("air_small", (24, 3, 2, 2), "First-layer whitening filters (fixed"),
])
def test_first_layer_filters_are_the_first_convs_weights_and_title(
        arch: str, shape: tuple[int, ...], title: str) -> None:
    model = build_model(arch, 10, [0.5] * 3, [0.25] * 3)
    weights, got = ev.first_layer_filters(model)
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert weights.shape == shape and weights.dtype == np.float32 and got.startswith(title)
    np.testing.assert_array_equal(weights, first.weight.detach().numpy())
    with pytest.raises(UserError, match="no convolution layer"):
        ev.first_layer_filters(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)))


def test_cli_names_a_model_trained_on_other_classes(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    write_stage_inputs(tmp_path, model_classes=[f"k{i}" for i in range(10)])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        run_cli(ev.main, ARGV)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "models/model.pt predicts 10 classes but data/processed has 3" in err
    assert "Traceback" not in err
    # nothing that looks like a valid result is left behind
    assert not (tmp_path / "metrics" / "evaluate.json").exists()
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(("stats", "message"), [
    ({"mean": [0.5] * 3, "std": [0.25] * 3}, "stats.json: 'classes' must be a list of names"),
    ({"classes": CLASSES, "mean": [0.5] * 2, "std": [0.25] * 3},
     "stats.json: 'mean' must be 3 finite numbers"),
    ({"classes": CLASSES, "mean": [0.5] * 3, "std": [0.25] * 3, "n": {"test": 7}},
     "test.npz: holds 30 images but data/processed/stats.json says 7"),
    ({"classes": CLASSES[:2], "mean": [0.5] * 3, "std": [0.25] * 3},
     "test.npz: label value(s) 2 outside 0..1"),
])
def test_an_inconsistent_stats_json_is_one_line_with_the_fix(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
        stats: dict, message: str) -> None:
    """Well-formed files that disagree are caught where read, not as a KeyError later."""
    write_stage_inputs(tmp_path)
    write_json(tmp_path / "data" / "processed" / "stats.json", stats)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        run_cli(ev.main, ARGV)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert err.count("\n") == 1 and message in err, err
    assert err.rstrip().endswith("re-run normalize: dvc repro -f normalize")
