"""Stage ``plot``: the tutorial's figures and the evaluation's, as PNGs in ``reports/figures``.

The figures themselves are pure functions in :mod:`stages.figures`; :func:`make_figures`
turns loaded inputs into named figures and :func:`main` reads the inputs and writes the
PNGs atomically. The confusion matrix is the one evaluate wrote (``metrics/confusion.json``),
and so are the model's first-layer filters (``filters.npz`` in evaluate's folder), so this
stage needs neither evaluation code nor the model, and never imports torch. The folder is
declared in ``dvc.yaml`` as a DVC image plot (DVC-cached, so no image derived from the
user's data ends up in git).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from stages import figures
from stages.errors import UserError, run_cli
from stages.io import atomic_dir, load_arrays, read_json, read_processed, read_raw
from stages.params import PlotParams, load_params

log = logging.getLogger("convflow.plot")

TRAIN_FIX = "re-run train: dvc repro -f train"
EVALUATE_FIX = "re-run evaluate: dvc repro -f evaluate"
#: Where train's dvclive logs put the series the plots read (see dvc.yaml's train stage).
LOSS_HISTORY = "plots/custom/loss_history.json"
ACCURACY_SERIES = {"train": "plots/metrics/train/acc.tsv",
                   "validation": "plots/metrics/val/acc.tsv"}


@dataclass(frozen=True)
class PlotInputs:
    """Everything the figures are drawn from, already loaded."""

    classes: list[str]
    train_images: np.ndarray  # first training images, N x 3 x H x W uint8 (raw order)
    train_labels: np.ndarray
    test_images: np.ndarray  # test split, N x 3 x H x W uint8 (evaluate's order)
    test_labels: np.ndarray
    predicted: np.ndarray  # evaluate's prediction for every test image
    confusion: np.ndarray  # evaluate's confusion matrix, rows true class, columns predicted
    wrong: list[dict[str, Any]]  # evaluate's most confidently wrong images
    loss_history: tuple[list[float], list[float]]  # iterations, losses
    accuracy: dict[str, tuple[list[float], list[float]]]  # split -> epochs, accuracy
    first_filters: np.ndarray  # out x in x k x k weights of the model's first conv layer
    filters_title: str = "Learned first-layer filters"  # what they are (evaluate's filters.npz)


def nhwc(images: np.ndarray) -> np.ndarray:
    """N x C x H x W -> N x H x W x C: matplotlib's order, used only to draw."""
    return np.ascontiguousarray(np.asarray(images).transpose(0, 2, 3, 1))


def make_figures(inp: PlotInputs, p: PlotParams) -> dict[str, Figure]:
    """All figures, by file stem, in the order a reader should see them."""
    if p.kernel_image >= len(inp.test_images):
        raise UserError(f"plot.kernel_image is {p.kernel_image} but the test split has "
                        f"{len(inp.test_images)} images: choose 0..{len(inp.test_images) - 1}")
    n = min(p.n_images, len(inp.test_images))
    names = inp.classes
    first_test = nhwc(inp.test_images[:n])
    wrong_images = nhwc(inp.test_images[[w["index"] for w in inp.wrong]]) if inp.wrong \
        else np.zeros((0, 32, 32, 3), np.uint8)
    k = p.kernel_image
    return {
        "loss_history": figures.loss_history_figure(*inp.loss_history, p.dpi),
        "accuracy": figures.accuracy_figure(inp.accuracy, p.dpi),
        "train_images": figures.image_strip_figure(
            nhwc(inp.train_images[:p.n_images]),
            [names[i] for i in inp.train_labels[:p.n_images]],
            f"First {min(p.n_images, len(inp.train_images))} training images", p.dpi),
        "test_predictions": figures.image_strip_figure(
            first_test, [names[i] for i in inp.predicted[:n]],
            f"First {n} test images: predicted class (red ✗ = wrong)", p.dpi,
            true_labels=[names[i] for i in inp.test_labels[:n]]),
        "kernels": figures.kernel_demo_figure(nhwc(inp.test_images[k:k + 1])[0], p.dpi,
                                              f"test image {k}: {names[inp.test_labels[k]]}"),
        "max_pooling": figures.max_pooling_figure(p.dpi),
        "confusion_matrix": figures.confusion_figure(inp.confusion, names, p.dpi),
        "filters": figures.filters_figure(inp.first_filters, p.dpi, inp.filters_title),
        "most_confident_wrong": figures.wrong_grid_figure(wrong_images, inp.wrong, names, p.dpi),
    }


# ----------------------------------------------------------------------------- loading
def read_series(path: Path, column: str) -> tuple[list[float], list[float]]:
    """A dvclive TSV series (``step`` and ``column``) as two lists."""
    if not path.is_file():
        raise UserError(f"{path}: missing; run the train stage first (dvc repro train)")
    import pandas as pd

    try:
        table = pd.read_csv(path, sep="\t")
    except (pd.errors.EmptyDataError, pd.errors.ParserError):
        table = pd.DataFrame()
    if table.empty or column not in table or "step" not in table:
        raise UserError(f"{path}: expected a dvclive series with 'step' and '{column}' columns")
    return table["step"].astype(float).tolist(), table[column].astype(float).tolist()


def read_loss_history(path: Path) -> tuple[list[float], list[float]]:
    """The per-iteration loss rows train logged with ``live.log_plot("loss_history", ...)``."""
    if not path.is_file():
        raise UserError(f"{path}: missing; run the train stage first (dvc repro train)")
    rows = read_json(path, TRAIN_FIX)
    try:
        return [float(r["iteration"]) for r in rows], [float(r["loss"]) for r in rows]
    except (TypeError, KeyError, ValueError):
        pass
    raise UserError(f"{path}: expected a list of {{'iteration', 'loss'}} rows; {TRAIN_FIX}")


def read_confusion(path: Path, classes: list[str]) -> np.ndarray:
    """The confusion matrix evaluate wrote, checked against the data's classes."""
    blob = read_json(path, EVALUATE_FIX)
    matrix = np.asarray(blob.get("matrix") if isinstance(blob, dict) else None, dtype=object)
    k = len(classes)
    if not isinstance(blob, dict) or blob.get("classes") != classes or matrix.shape != (k, k) \
            or not all(isinstance(v, int) and v >= 0 for v in matrix.ravel()):
        raise UserError(f"{path}: expected a {k} x {k} matrix of counts for the classes "
                        f"{classes}; {EVALUATE_FIX}")
    return matrix.astype(np.int64)


def read_predictions(path: Path, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """evaluate's predicted class per test image, checked against the test split."""
    arrays = load_arrays(path, ("labels", "predicted"), EVALUATE_FIX)
    predicted = arrays["predicted"]
    if not np.array_equal(arrays["labels"], labels) or predicted.shape != labels.shape \
            or not np.issubdtype(predicted.dtype, np.integer) \
            or (len(predicted) and not 0 <= predicted.min() <= predicted.max() < n_classes):
        raise UserError(f"{path} does not match the test split ({len(labels)} images, "
                        f"{n_classes} classes); {EVALUATE_FIX}")
    return predicted


def read_filters(path: Path) -> tuple[np.ndarray, str]:
    """The model's first conv weights (out x in x k x k) and their title, as evaluate wrote
    them (``evaluate.first_layer_filters``)."""
    if not path.is_file():
        raise UserError(f"{path}: missing; {EVALUATE_FIX}")
    arrays = load_arrays(path, ("weights", "title"), EVALUATE_FIX)
    weights, title = arrays["weights"], arrays["title"]
    if weights.ndim != 4 or 0 in weights.shape or weights.dtype != np.float32 \
            or title.shape != () or title.dtype.kind != "U":
        raise UserError(f"{path}: expected float32 'weights' (out x in x k x k) and a 'title' "
                        f"string; {EVALUATE_FIX}")
    return weights, str(title)


def read_wrong(path: Path, n_test: int) -> list[dict[str, Any]]:
    """evaluate's most confidently wrong images, checked against the test split."""
    rows = read_json(path, EVALUATE_FIX)
    keys = ("index", "actual", "predicted", "confidence")
    if not isinstance(rows, list) or not all(
            isinstance(r, dict) and all(k in r for k in keys)
            and isinstance(r["index"], int) and 0 <= r["index"] < n_test for r in rows):
        raise UserError(f"{path}: expected rows of {', '.join(keys)} for the {n_test} test "
                        f"images; {EVALUATE_FIX}")
    return rows


def load_inputs(data: Path, raw: Path, eval_dir: Path, metrics: Path, live: Path,
                n_train: int) -> PlotInputs:
    """Read what the figures need from the pipeline's files (no model, no torch)."""
    stats, processed = read_processed(data, ("test",))
    _, raw_splits = read_raw(raw, ("train",))
    train_images, train_labels = raw_splits["train"]
    test_images, test_labels = processed["test"]
    classes = stats["classes"]
    filters, filters_title = read_filters(eval_dir / "filters.npz")
    accuracy = {name: read_series(live / rel, "acc") for name, rel in ACCURACY_SERIES.items()
                if name == "train" or (live / rel).is_file()}  # no val series when val is empty
    return PlotInputs(
        classes=classes,
        train_images=train_images[:n_train], train_labels=train_labels[:n_train],
        test_images=test_images, test_labels=test_labels,
        predicted=read_predictions(eval_dir / "predictions.npz", test_labels, len(classes)),
        confusion=read_confusion(metrics / "confusion.json", classes),
        wrong=read_wrong(eval_dir / "wrong.json", len(test_labels)),
        loss_history=read_loss_history(live / LOSS_HISTORY), accuracy=accuracy,
        first_filters=filters, filters_title=filters_title,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m stages.plot --data D --raw D --eval D --metrics D --live D --out D``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="processed data folder")
    parser.add_argument("--raw", required=True, help="raw data folder (training images)")
    parser.add_argument("--eval", required=True,
                        help="evaluate's results folder (per-image rows, first-layer filters)")
    parser.add_argument("--metrics", required=True,
                        help="evaluate's metrics folder (confusion.json)")
    parser.add_argument("--live", required=True, help="train's dvclive folder")
    parser.add_argument("--out", required=True, help="folder for the PNG figures")
    args = parser.parse_args(argv)
    p = load_params().plot

    inputs = load_inputs(Path(args.data), Path(args.raw), Path(args.eval), Path(args.metrics),
                         Path(args.live), p.n_images)
    figs = make_figures(inputs, p)
    with atomic_dir(args.out) as out:
        for name, fig in figs.items():
            fig.savefig(out / f"{name}.png", dpi=p.dpi)
    log.info("wrote %d figures to %s", len(figs), args.out)


if __name__ == "__main__":
    run_cli(main)
