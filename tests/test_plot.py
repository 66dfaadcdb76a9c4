"""plot: the kernel and pooling maths, the figures' labels, and the stage's PNGs."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from matplotlib.figure import Figure
from PIL import Image
from stage_cli import run_stage

from stages import evaluate as ev
from stages import figures
from stages import plot as pl
from stages.errors import UserError, run_cli
from stages.io import save_split, write_json
from stages.models import build_model, load_model, save_model
from stages.params import PlotParams

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]
EXPECTED_FIGURES = {"loss_history", "accuracy", "train_images", "test_predictions", "kernels",
                    "max_pooling", "confusion_matrix", "filters", "most_confident_wrong"}


# ----------------------------------------------------------------------------- the maths
def test_blur_and_edge_kernels_match_hand_computed_values() -> None:
    img = np.zeros((5, 5))
    img[2, 2] = 1.0  # one bright pixel in the middle
    blur = figures.convolve2d(img, figures.BLUR_KERNEL)
    # the all-ones kernel spreads it over its 3x3 neighbourhood
    expected = np.zeros((5, 5))
    expected[1:4, 1:4] = 1.0
    np.testing.assert_array_equal(blur, expected)
    edge = figures.convolve2d(img, figures.EDGE_KERNEL)
    assert edge[2, 2] == -4 and edge[1, 2] == edge[3, 2] == edge[2, 1] == edge[2, 3] == 1
    assert edge[1, 1] == 0 and np.abs(edge).sum() == 8
    # a flat image has no edges anywhere, borders included (edge padding, not zeros)
    np.testing.assert_array_equal(figures.convolve2d(np.full((4, 6), 7.0), figures.EDGE_KERNEL), 0)


def test_convolution_flips_the_kernel() -> None:
    img = np.zeros((3, 3))
    img[1, 1] = 1.0
    k = np.arange(9, dtype=float).reshape(3, 3)
    # the impulse response of a true convolution is the kernel itself
    np.testing.assert_array_equal(figures.convolve2d(img, k), k)


def test_max_pool_of_the_illustrated_map() -> None:
    np.testing.assert_array_equal(figures.max_pool(figures.POOL_EXAMPLE, 2), [[6, 8], [3, 4]])
    with pytest.raises(ValueError, match="does not tile"):
        figures.max_pool(np.zeros((3, 4)), 2)


def test_filters_are_scaled_per_filter_to_unit_range() -> None:
    w = np.stack([np.full((3, 5, 5), 2.0), np.linspace(-1, 3, 75).reshape(3, 5, 5)])
    rgb = figures.filters_to_rgb(w)
    assert rgb.shape == (2, 5, 5, 3)
    assert np.all(rgb[0] == 0)  # a constant filter is not NaN
    assert rgb[1].min() == 0 and rgb[1].max() == 1


# ----------------------------------------------------------------------------- the figures
def _inputs(n_test: int = 30, wrong: int = 5, val: bool = True) -> pl.PlotInputs:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, n_test)
    predicted = labels.copy()
    predicted[:wrong] = (labels[:wrong] + 1) % 10  # the first `wrong` test images are wrong
    model = build_model("seed_net", 10, [0.5] * 3, [0.25] * 3)
    acc = {"train": ([0.0, 1.0], [0.3, 0.5])}
    if val:
        acc["validation"] = ([0.0, 1.0], [0.25, 0.45])
    return pl.PlotInputs(
        classes=CLASSES,
        train_images=rng.integers(0, 256, (12, 3, 32, 32), dtype=np.uint8),
        train_labels=np.arange(12) % 10,
        test_images=rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8),
        test_labels=labels, predicted=predicted,
        confusion=ev.confusion_matrix(labels, predicted, 10),
        wrong=[{"index": i, "actual": int(labels[i]), "predicted": int(predicted[i]),
                "confidence": 0.9 - i / 100} for i in range(wrong)],
        loss_history=([0.0, 2.0, 4.0], [2.3, 2.0, 1.7]), accuracy=acc,
        first_filters=ev.first_layer_filters(model)[0],
    )


def _drawn_texts(fig: Figure) -> list:
    """Every text the figure draws: titles, axis labels, tick labels, annotations, legends."""
    texts = list(fig.texts)  # the suptitle is one of these
    for ax in fig.axes:
        texts += [ax.title, ax._left_title, ax._right_title, *ax.texts]
        if ax.axison:  # a hidden axis draws no labels or ticks
            texts += [ax.xaxis.label, ax.yaxis.label, *ax.get_xticklabels(),
                      *ax.get_yticklabels()]
        if ax.get_legend():
            texts += ax.get_legend().get_texts()
    return [t for t in dict.fromkeys(texts) if t.get_visible() and t.get_text().strip()]


def _texts_overlap(fig: Figure) -> list[tuple[str, str]]:
    """Pairs of drawn texts whose rendered boxes intersect."""
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in _drawn_texts(fig)]
    return [(a, b) for (a, ba), (b, bb) in itertools.combinations(boxes, 2) if ba.overlaps(bb)]


@pytest.fixture(scope="module")
def drawn() -> dict[str, Figure]:
    return pl.make_figures(_inputs(), PlotParams(dpi=60))


def test_all_figures_are_made(drawn: dict[str, Figure]) -> None:
    assert set(drawn) == EXPECTED_FIGURES


def test_loss_history_is_the_tutorials_figure(drawn: dict[str, Figure]) -> None:
    ax = drawn["loss_history"].axes[0]
    assert ax.get_title() == "Global loss for the CNN model"
    assert ax.get_xlabel() == "iteration" and "loss" in ax.get_ylabel()
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), [0, 2, 4])


def test_prediction_strip_marks_wrong_ones_with_the_true_class(drawn: dict[str, Figure]
                                                               ) -> None:
    inp = _inputs()
    titles = [ax.title for ax in drawn["test_predictions"].axes]
    assert len(titles) == 10
    for k, title in enumerate(titles):
        text = title.get_text()
        assert CLASSES[inp.predicted[k]] in text
        if k < 5:  # wrong: red, with the true class
            assert f"true: {CLASSES[inp.test_labels[k]]}" in text
            assert title.get_color() == figures.WRONG_COLOUR
        else:
            assert "true:" not in text and title.get_color() == figures.RIGHT_COLOUR


def test_training_strip_shows_the_first_images_labels(drawn: dict[str, Figure]) -> None:
    assert [ax.get_title() for ax in drawn["train_images"].axes] == CLASSES[:10]


def test_confusion_heatmap_names_classes_and_counts(drawn: dict[str, Figure]) -> None:
    ax = drawn["confusion_matrix"].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == CLASSES
    assert [t.get_text() for t in ax.get_yticklabels()] == CLASSES
    assert ax.get_xlabel() == "predicted class" and ax.get_ylabel() == "true class"
    inp = _inputs()
    cm = ev.confusion_matrix(inp.test_labels, inp.predicted, 10)
    cells = [int(t.get_text()) for t in ax.texts]
    assert cells == cm.ravel().tolist()


def test_kernel_demo_shows_original_blur_and_edges(drawn: dict[str, Figure]) -> None:
    titles = [ax.get_title() for ax in drawn["kernels"].axes]
    assert titles[0] == "original" and "all-ones" in titles[1] and "−4" in titles[2]


@pytest.mark.parametrize("name", sorted(EXPECTED_FIGURES))
def test_no_text_overlaps(drawn: dict[str, Figure], name: str) -> None:
    assert _texts_overlap(drawn[name]) == []


def test_no_validation_series_and_no_wrong_images_still_plot() -> None:
    figs = pl.make_figures(_inputs(wrong=0, val=False), PlotParams(dpi=40))
    assert [line.get_label() for line in figs["accuracy"].axes[0].lines] == ["train"]
    assert "No misclassified" in figs["most_confident_wrong"].axes[0].texts[0].get_text()


def test_kernel_image_out_of_range_names_the_param() -> None:
    with pytest.raises(UserError, match=r"plot\.kernel_image is 30 .* choose 0\.\.29"):
        pl.make_figures(_inputs(n_test=30), PlotParams(kernel_image=30))


# ----------------------------------------------------------------------------- the stage
def _write_pipeline_outputs(root: Path) -> None:
    """What ingest, normalize, train and evaluate leave for plot (tiny, random)."""
    rng = np.random.default_rng(0)
    (root / "data" / "raw").mkdir(parents=True)
    (root / "data" / "processed").mkdir(parents=True)
    save_split(root / "data/raw/train.npz",
               rng.integers(0, 256, (20, 3, 32, 32), dtype=np.uint8), np.arange(20) % 10)
    write_json(root / "data/raw/meta.json", {"classes": CLASSES, "source": "synthetic"})
    save_split(root / "data/processed/test.npz",
               rng.integers(0, 256, (25, 3, 32, 32), dtype=np.uint8), np.arange(25) % 10)
    write_json(root / "data/processed/stats.json",
               {"classes": CLASSES, "mean": [0.5] * 3, "std": [0.25] * 3, "source": "synthetic"})
    (root / "models").mkdir()
    save_model(root / "models/model.pt", build_model("seed_net", 10, [0.5] * 3, [0.25] * 3),
               arch="seed_net", classes=CLASSES, mean=[0.5] * 3, std=[0.25] * 3, extra={})
    live = root / "dvclive/train/plots"
    (live / "custom").mkdir(parents=True)
    (live / "custom/loss_history.json").write_text(json.dumps(
        [{"iteration": i, "loss": 2.3 - i / 100} for i in range(0, 20, 2)]))
    for split in ("train", "val"):
        (live / "metrics" / split).mkdir(parents=True)
        (live / "metrics" / split / "acc.tsv").write_text(
            "timestamp\tstep\tacc\n1\t0\t0.2\n2\t1\t0.4\n")
    (root / "params.yaml").write_text(yaml.safe_dump({
        "evaluate": {"batch_size": 10, "tta_flip": False, "n_wrong": 6},
        "plot": {"dpi": 50, "n_images": 10, "kernel_image": 3}}))


def test_stage_writes_readable_pngs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_pipeline_outputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    ev.main(["--data", "data/processed", "--model", "models/model.pt", "--metrics", "metrics",
             "--out", "results/evaluate"])
    pl.main(["--data", "data/processed", "--raw", "data/raw", "--eval", "results/evaluate",
             "--metrics", "metrics", "--live", "dvclive/train", "--out", "reports/figures"])
    pngs = sorted((tmp_path / "reports/figures").iterdir())
    assert {png.stem for png in pngs} == EXPECTED_FIGURES
    assert all(png.suffix == ".png" for png in pngs)
    for png in pngs:
        with Image.open(png) as im:
            w, h = im.size
        # plot.dpi 50: every figure is a few hundred pixels, none is a sliver or a poster
        assert 150 <= w <= 1000 and 80 <= h <= 800, (png.name, w, h)


def test_stage_without_training_logs_says_what_to_run(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    _write_pipeline_outputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvclive/train/plots/custom/loss_history.json").unlink()
    ev.main(["--data", "data/processed", "--model", "models/model.pt", "--metrics", "metrics",
             "--out", "results/evaluate"])
    with pytest.raises(UserError, match=r"loss_history\.json: missing; run the train stage"):
        pl.main(["--data", "data/processed", "--raw", "data/raw", "--eval", "results/evaluate",
                 "--metrics", "metrics", "--live", "dvclive/train", "--out", "figs"])
    assert not (tmp_path / "figs").exists()


PLOT_ARGV = ["--data", "data/processed", "--raw", "data/raw", "--eval", "results/evaluate",
             "--metrics", "metrics", "--live", "dvclive/train", "--out", "figs"]


def _tear(path: Path) -> None:
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])


@pytest.mark.parametrize(("damage", "message"), [
    (lambda r: _tear(r / "dvclive/train/plots/custom/loss_history.json"),
     "loss_history.json: not valid JSON"),
    (lambda r: (r / "dvclive/train/plots/custom/loss_history.json").write_text('{"a": 1}'),
     "loss_history.json: expected a list of {'iteration', 'loss'} rows"),
    (lambda r: _tear(r / "results/evaluate/predictions.npz"),
     "predictions.npz: not a valid labels/predicted file"),
    (lambda r: _tear(r / "metrics/confusion.json"), "confusion.json: not valid JSON"),
    (lambda r: (r / "metrics/confusion.json").write_text('{"matrix": [[1]]}'),
     "confusion.json: expected a 10 x 10 matrix of counts"),
    (lambda r: (r / "results/evaluate/wrong.json").write_text('[{"index": 99999}]'),
     "wrong.json: expected rows of index, actual, predicted, confidence"),
    # an evaluate from before filters.npz existed: the fix is to re-run it
    (lambda r: (r / "results/evaluate/filters.npz").unlink(), "filters.npz: missing; re-run"),
    (lambda r: _tear(r / "results/evaluate/filters.npz"),
     "filters.npz: not a valid weights/title file"),
    (lambda r: np.savez(r / "results/evaluate/filters.npz", weights=np.zeros((6, 3, 5)),
                        title=np.array("t")),
     "filters.npz: expected float32 'weights' (out x in x k x k) and a 'title' string"),
    (lambda r: np.savez(r / "results/evaluate/filters.npz",
                        weights=np.zeros((6, 3, 5, 5), np.float32), title=np.array([1, 2])),
     "filters.npz: expected float32 'weights' (out x in x k x k) and a 'title' string"),
])
def test_a_torn_or_foreign_input_is_one_line_naming_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
        damage: object, message: str) -> None:
    _write_pipeline_outputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    ev.main(["--data", "data/processed", "--model", "models/model.pt", "--metrics", "metrics",
             "--out", "results/evaluate"])
    damage(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run_cli(pl.main, PLOT_ARGV)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("convflow.plot: error: ") and message in err
    assert "dvc repro -f " in err  # and the command that rebuilds it
    if "filters.npz" in message:
        assert "re-run evaluate: dvc repro -f evaluate" in err
    assert not (tmp_path / "figs").exists()


def test_overlap_check_catches_overlapping_text() -> None:
    fig = figures.new_figure(3, 2, 50)
    ax = fig.add_subplot()
    ax.text(0.5, 0.5, "automobile")
    ax.text(0.52, 0.5, "airplane")
    assert _texts_overlap(fig) == [("automobile", "airplane")]


def test_stage_draws_evaluates_filters_without_importing_torch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """plot reads the model's first-layer filters from evaluate's filters.npz: a plot-only
    change never pays torch's import (about a third of the stage), and never reads the model."""
    _write_pipeline_outputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    ev.main(["--data", "data/processed", "--model", "models/model.pt", "--metrics", "metrics",
             "--out", "results/evaluate"])
    (tmp_path / "models/model.pt").unlink()  # plot has no use for it
    proc = run_stage("plot", PLOT_ARGV, tmp_path, PYTHONPROFILEIMPORTTIME="1")  # -X importtime
    assert proc.returncode == 0, proc.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    assert "matplotlib" in imported  # the check sees the stage's imports...
    assert not {m for m in imported if m.split(".")[0] == "torch"}  # ...and no torch
    assert (tmp_path / "figs/filters.png").is_file()


def test_filters_figure_is_the_models_first_conv(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Same weights and title as drawing straight from the model (what plot did before)."""
    _write_pipeline_outputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    ev.main(["--data", "data/processed", "--model", "models/model.pt", "--metrics", "metrics",
             "--out", "results/evaluate"])
    inp = pl.load_inputs(Path("data/processed"), Path("data/raw"), Path("results/evaluate"),
                         Path("metrics"), Path("dvclive/train"), 10)
    weights, title = ev.first_layer_filters(load_model("models/model.pt")[0])
    np.testing.assert_array_equal(inp.first_filters, weights)
    assert inp.first_filters.shape == (6, 3, 5, 5) and inp.filters_title == title
