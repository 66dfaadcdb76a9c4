"""Stage ``gate``: the quality verdict on the evaluated model, written as a metrics file.

The verdict is data, not a failure: ``dvc repro`` always completes and ``dvc metrics show``
prints it; the Prefect flow reads it and refuses to push, commit, register or promote a
model that failed. Two checks on ``test.accuracy`` (from evaluate's metrics):

* ``gate.min_accuracy``: an absolute floor;
* ``gate.max_drop``: the largest drop allowed below the model in production, read from the
  committed baseline file (``production.yaml``). The flow refreshes that file from the model
  registry (GTO's ``prod`` stage) before it runs the pipeline, so a plain ``dvc repro``
  compares against the same committed numbers on every machine and stays deterministic.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from stages.errors import UserError, run_cli
from stages.io import atomic_file, read_json, write_json
from stages.params import GateParams, load_params

log = logging.getLogger("convflow.gate")

#: The metric the gate judges, as ``dvc metrics show`` names it.
METRIC = "test.accuracy"


def read_baseline(path: str | Path) -> dict[str, Any]:
    """The production baseline ``{version, rev, accuracy}``; accuracy None = no model in prod."""
    path = Path(path)
    if not path.is_file():
        return {"version": None, "rev": None, "accuracy": None}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path}: invalid YAML ({err})") from None
    accuracy = data.get("accuracy")
    if accuracy is not None and not isinstance(accuracy, (int, float)):
        raise UserError(f"{path}: accuracy must be a number or null, got {accuracy!r}")
    return {"version": data.get("version"), "rev": data.get("rev"), "accuracy": accuracy}


def verdict(accuracy: float, p: GateParams, baseline: dict[str, Any]) -> dict[str, Any]:
    """The gate's verdict on ``accuracy``: passed, the numbers compared, and one-line reason."""
    prod = baseline.get("accuracy")
    drop = None if prod is None else round(float(prod) - accuracy, 6)
    if accuracy < p.min_accuracy:
        reason = f"{METRIC} {accuracy:.4f} is below gate.min_accuracy {p.min_accuracy:.4f}"
    elif drop is not None and drop > p.max_drop:
        reason = (f"{METRIC} {accuracy:.4f} is {drop:.4f} below production "
                  f"{baseline.get('version')} ({float(prod):.4f}), more than "
                  f"gate.max_drop {p.max_drop:.4f}")
    else:
        reason = None
    vs_prod = ("no model in production" if prod is None else
               f"production {baseline.get('version')} {float(prod):.4f}")
    return {
        "passed": reason is None,
        "metric": METRIC,
        "value": round(accuracy, 6),
        "min_accuracy": p.min_accuracy,
        "max_drop": p.max_drop,
        "production_version": baseline.get("version"),
        "production_accuracy": prod,
        "drop": drop,
        "reason": reason or (f"{METRIC} {accuracy:.4f} passes gate.min_accuracy "
                             f"{p.min_accuracy:.4f} and gate.max_drop {p.max_drop:.4f} "
                             f"({vs_prod})"),
    }


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: read evaluate's metrics and the production baseline; write the verdict."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--metrics", required=True, help="evaluate's metrics file (evaluate.json)")
    ap.add_argument("--production", required=True, help="production baseline (production.yaml)")
    ap.add_argument("--out", required=True, help="verdict file to write (gate.json)")
    args = ap.parse_args(argv)
    p = load_params().gate
    metrics = read_json(args.metrics)
    try:
        accuracy = float(metrics["test"]["accuracy"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{args.metrics}: no {METRIC}; re-run evaluate") from None
    result = verdict(accuracy, p, read_baseline(args.production))
    with atomic_file(args.out) as tmp:
        write_json(tmp, result)
    if result["passed"]:
        log.info("passed: %s", result["reason"])
    else:
        log.warning("FAILED: %s", result["reason"])


if __name__ == "__main__":
    run_cli(main)
