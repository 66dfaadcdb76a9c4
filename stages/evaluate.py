"""Stage ``evaluate``: the trained model on the held-out test split -> metrics and confusion data.

Pure core: :func:`log_probs` (batched inference on the device), :func:`confusion_matrix`,
:func:`classification_metrics`, :func:`most_confident_wrong` and :func:`evaluate`, which
ties them together. :func:`main` only reads files and writes the outputs:

* ``<metrics>/evaluate.json`` (git, the DVC metrics file): the headline ``test.accuracy``
  (what the gate judges), ``test.loss`` and ``test.accuracy_tta`` -- what ``dvc metrics
  show/diff`` compare, few and short so DVC's one table fits a terminal;
* ``<metrics>/evaluate_details.json`` (git): macro precision/recall/F1 and the dataset,
  device and ``tta_flip`` they were measured on (``git diff`` compares it);
* ``<metrics>/per_class.json`` (git): precision, recall, F1 and support of every class,
  one row per class (plotted by DVC; kept out of ``dvc metrics show``'s table);
* ``<metrics>/confusion.json`` (git): the confusion matrix as counts (10 x 10 for CIFAR-10),
  so git history stays small whatever the size of the test set;
* ``<out>/predictions.json`` (DVC cache): one ``{"actual", "predicted"}`` row per test
  image, the input DVC's ``confusion`` plot template counts; it grows with the test set
  (about 0.5 MB for CIFAR-10's 10,000 images), so it lives in the DVC cache, not in git;
* ``<out>/predictions.npz`` (DVC cache): label, predicted class and confidence per image;
* ``<out>/wrong.json`` (DVC cache): the most confidently wrong test images, for the plots;
* ``<out>/filters.npz`` (DVC cache): the model's first conv layer (``weights``, float32
  out x in x k x k) and what it is (``title``), so the plot stage draws the filters without
  loading the model or importing torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stages.device import pick_device, set_threads
from stages.errors import UserError, run_cli
from stages.io import atomic_dir, atomic_file, read_processed, write_json
from stages.models import first_layer_title, load_model
from stages.params import EvaluateParams, load_params
from stages.tta import tta_accuracy

log = logging.getLogger("convflow.evaluate")


# ----------------------------------------------------------------------------- device
def describe_device(device: torch.device) -> str:
    """A human name for the metrics file, e.g. ``cuda (NVIDIA H100 80GB HBM3)`` or ``cpu``."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


# ----------------------------------------------------------------------------- checks
def check_compatible(meta: dict[str, Any], classes: Sequence[str], image_shape: Sequence[int],
                     model_path: str | Path = "model", data_path: str | Path = "data") -> None:
    """Raise UserError when the model cannot be applied to this data (classes, input size)."""
    model_classes = list(meta.get("classes", []))
    if len(model_classes) != len(classes):
        raise UserError(
            f"{model_path} predicts {len(model_classes)} classes but {data_path} has "
            f"{len(classes)}: the model was trained on other data; retrain it on this data "
            "(dvc repro train) or pass the matching --model")
    if model_classes != list(classes):
        raise UserError(
            f"{model_path} was trained on classes {model_classes} but {data_path} has "
            f"{list(classes)}: retrain it on this data (dvc repro train)")
    expected = list(meta.get("input", {}).get("shape", []))
    if expected and list(image_shape) != expected:
        raise UserError(
            f"{model_path} takes images of shape {expected} (C x H x W) but {data_path} holds "
            f"{list(image_shape)}: re-run normalize for this model or retrain it")


# ----------------------------------------------------------------------------- filters
def first_layer_filters(model: nn.Module) -> tuple[np.ndarray, str]:
    """The first ``Conv2d``'s weights (float32, out x in x k x k, on the CPU) and what they
    are (:func:`stages.models.first_layer_title`): what plot's filters figure draws.

    Here, not in :mod:`stages.models`: train depends on that file, so a change to it
    re-trains; evaluate already loads the model, and plot then needs neither it nor torch.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            weights = module.weight.detach().to("cpu", torch.float32).numpy()
            return np.ascontiguousarray(weights), first_layer_title(model)
    raise UserError("the model has no convolution layer whose filters could be drawn")


# ----------------------------------------------------------------------------- inference
@torch.inference_mode()
def log_probs(model: nn.Module, images: np.ndarray, batch_size: int,
              device: torch.device | str = "cpu", tta_flip: bool = False) -> np.ndarray:
    """Log-probabilities (N x classes, float64) for uint8 N x 3 x H x W images, in batches.

    The images go to the device once (uint8 is a quarter of float32) and are sliced there.
    With ``tta_flip`` the class probabilities of each image and its mirror are averaged.
    """
    device = torch.device(device)
    model = model.to(device).eval()
    x_all = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    out = []
    for start in range(0, len(x_all), batch_size):
        x = x_all[start:start + batch_size]
        logp = torch.log_softmax(model(x).float(), dim=1)
        if tta_flip:
            logp_flip = torch.log_softmax(model(x.flip(-1)).float(), dim=1)
            # log of the mean probability, computed without leaving log space
            logp = torch.logaddexp(logp, logp_flip) - math.log(2.0)
        out.append(logp.double().cpu())
    if not out:
        raise UserError("the test split is empty: nothing to evaluate")
    return torch.cat(out).numpy()


# ----------------------------------------------------------------------------- metrics
def confusion_matrix(actual: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts ``cm[actual, predicted]`` (rows: true class, columns: predicted class)."""
    actual = np.asarray(actual, np.int64)
    predicted = np.asarray(predicted, np.int64)
    flat = np.bincount(actual * n_classes + predicted, minlength=n_classes * n_classes)
    return flat.reshape(n_classes, n_classes)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    # a class never predicted (or absent) has precision (or recall) 0, as in scikit-learn
    return np.divide(num, den, out=np.zeros(len(num), dtype=np.float64), where=den > 0)


def classification_metrics(cm: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro and per-class precision / recall / F1 / support from a confusion matrix."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    total = cm.sum()
    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "per_class": {
            name: {"precision": float(prec), "recall": float(rec), "f1": float(f),
                   "support": int(n)}
            for name, prec, rec, f, n in zip(classes, precision, recall, f1, support,
                                             strict=True)
        },
    }


def most_confident_wrong(logp: np.ndarray, labels: np.ndarray, n: int) -> list[dict[str, Any]]:
    """The ``n`` misclassified images the model was surest of, most confident first."""
    predicted = logp.argmax(axis=1)
    confidence = np.exp(logp.max(axis=1))
    wrong = np.flatnonzero(predicted != labels)
    # stable sort on -confidence: ties keep test-set order, so the choice is reproducible
    order = wrong[np.argsort(-confidence[wrong], kind="stable")][:n]
    return [{"index": int(i), "actual": int(labels[i]), "predicted": int(predicted[i]),
             "confidence": float(confidence[i])} for i in order]


@dataclass(frozen=True)
class Evaluation:
    """Everything evaluate produces, before it is written anywhere."""

    metrics: dict[str, Any]
    confusion: np.ndarray
    predicted: np.ndarray
    confidence: np.ndarray
    wrong: list[dict[str, Any]]


def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray, classes: Sequence[str],
             params: EvaluateParams, device: torch.device | str = "cpu") -> Evaluation:
    """Score ``model`` on a test split (checked by :func:`stages.io.check_split`): metrics,
    confusion matrix, per-image predictions."""
    labels = np.asarray(labels, np.int64)
    logp = log_probs(model, images, params.batch_size, device, params.tta_flip)
    if logp.shape[1] != len(classes):
        raise UserError(f"the model outputs {logp.shape[1]} scores per image but the data has "
                        f"{len(classes)} classes: retrain it on this data (dvc repro train)")
    predicted = logp.argmax(axis=1)
    cm = confusion_matrix(labels, predicted, len(classes))
    scores = classification_metrics(cm, classes)
    scores["loss"] = float(-logp[np.arange(len(labels)), labels].mean())
    return Evaluation(
        metrics=scores,
        confusion=cm,
        predicted=predicted,
        confidence=np.exp(logp.max(axis=1)),
        wrong=most_confident_wrong(logp, labels, params.n_wrong),
    )


def metrics_summary(result: Evaluation) -> dict[str, Any]:
    """The committed headline metrics file (``evaluate.json``): the scores the gate reads."""
    m = result.metrics
    return {"test": {"accuracy": round(m["accuracy"], 6), "loss": round(m["loss"], 6)}}


def metrics_details(result: Evaluation, *, source: str, n_classes: int, device: str,
                    tta_flip: bool) -> dict[str, Any]:
    """The rest of the scores and where they were measured (``evaluate_details.json``).

    Out of the metrics file: DVC prints one table whose columns are every key of every
    metrics file, and these would widen it past a terminal.
    """
    m = result.metrics
    return {
        "test": {k: round(m[k], 6) for k in ("macro_precision", "macro_recall", "macro_f1")},
        "dataset": {"source": source, "n_test": int(result.confusion.sum()),
                    "n_classes": n_classes},
        "device": device,
        "tta_flip": tta_flip,
    }


def per_class_rows(per_class: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """``[{"class", "precision", "recall", "f1", "support"}, ...]``: a table DVC can plot.

    Rows rather than one metric per class keep ``dvc metrics show`` to the headline
    numbers (40 extra columns for CIFAR-10 otherwise); the file is still committed, so
    ``git diff`` and ``dvc plots diff`` compare it across commits.
    """
    return [{"class": name, **{k: round(v, 6) if isinstance(v, float) else v
                               for k, v in scores.items()}}
            for name, scores in per_class.items()]


def confusion_rows(labels: np.ndarray, predicted: np.ndarray,
                   classes: Sequence[str]) -> list[dict[str, str]]:
    """One ``{"actual", "predicted"}`` row per image: the input of DVC's confusion template."""
    return [{"actual": classes[a], "predicted": classes[b]}
            for a, b in zip(labels.tolist(), predicted.tolist(), strict=True)]


# ----------------------------------------------------------------------------- CLI
def write_per_image(folder: str | Path, labels: np.ndarray, result: Evaluation,
                    classes: list[str], filters: tuple[np.ndarray, str]) -> None:
    """The DVC-cached per-image results: predictions (json, npz) and the wrong images,
    plus the model's first-layer filters and their title (:func:`first_layer_filters`)."""
    with atomic_dir(folder) as out:
        # one compact row per line: ~35 bytes an image instead of ~70 pretty-printed
        rows = confusion_rows(labels, result.predicted, classes)
        (out / "predictions.json").write_text(
            "[\n" + ",\n".join(json.dumps(r, separators=(",", ":")) for r in rows) + "\n]\n",
            encoding="utf-8")
        np.savez(out / "predictions.npz", labels=labels.astype(np.int64),
                 predicted=result.predicted.astype(np.int64),
                 confidence=result.confidence.astype(np.float32))
        write_json(out / "wrong.json", [
            {**w, "actual_name": classes[w["actual"]], "predicted_name": classes[w["predicted"]]}
            for w in result.wrong])
        weights, title = filters
        np.savez(out / "filters.npz", weights=np.asarray(weights, np.float32),
                 title=np.array(title))


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m stages.evaluate --data DIR --model FILE --metrics DIR --out DIR``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="processed data folder")
    parser.add_argument("--model", required=True, help="model file written by train")
    parser.add_argument("--metrics", required=True, help="folder for the committed metrics files")
    parser.add_argument("--out", required=True, help="folder for the DVC-cached per-image results")
    args = parser.parse_args(argv)
    p = load_params().evaluate

    # evaluate has no device or threads param: it uses the best device and every core
    set_threads(0)
    data = Path(args.data)
    stats, splits = read_processed(data, ("test",))
    classes = stats["classes"]
    images, labels = splits["test"]
    device = pick_device("auto", logger=log)
    model, meta = load_model(args.model, map_location=device)
    check_compatible(meta, classes, images.shape[1:], args.model, data)
    filters = first_layer_filters(model)  # for plot, which then needs neither model nor torch

    log.info("evaluating %d test images on %s (tta_flip=%s)", len(labels), device, p.tta_flip)
    result = evaluate(model, images, labels, classes, p, device)
    summary = metrics_summary(result)
    details = metrics_details(result, source=str(stats.get("source", "unknown")),
                              n_classes=len(classes), device=describe_device(device),
                              tta_flip=p.tta_flip)
    # flip + translate TTA (airbench94's 6 views) beside the plain score, for any model
    summary["test"]["accuracy_tta"] = round(
        tta_accuracy(model, images, labels, p.batch_size, device), 6)

    metrics_dir = Path(args.metrics)
    metrics_dir.mkdir(parents=True, exist_ok=True)
    for name, obj in (
        ("evaluate.json", summary),
        ("evaluate_details.json", details),
        ("per_class.json", per_class_rows(result.metrics["per_class"])),
        ("confusion.json", {"classes": classes, "rows": "actual", "columns": "predicted",
                            "matrix": result.confusion.tolist()}),
    ):
        with atomic_file(metrics_dir / name) as tmp:
            write_json(tmp, obj)
    write_per_image(args.out, labels, result, classes, filters)
    t = summary["test"]
    log.info("test accuracy %.4f, loss %.4f, macro F1 %.4f", t["accuracy"], t["loss"],
             details["test"]["macro_f1"])


if __name__ == "__main__":
    run_cli(main)
