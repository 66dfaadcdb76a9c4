"""Stage ``gate``: the quality verdict on the evaluated model, written as a metrics file.

The verdict is data, not a failure: ``dvc repro`` always completes, ``dvc metrics show``
prints its headline (passed, drop) and ``gate.json`` holds all of it with the reason; the
Prefect flow reads that file and refuses to push, commit, register or promote a model that
failed. Two checks on ``test.accuracy`` (from evaluate's metrics):

* ``gate.min_accuracy``: an absolute floor;
* ``gate.max_drop``: the largest drop allowed below the model in production, read from the
  committed baseline file (``production.yaml``). The flow refreshes that file from the model
  registry (GTO's ``prod`` stage) before it runs the pipeline, so a plain ``dvc repro``
  compares against the same committed numbers on every machine and stays deterministic.

It fails closed: an accuracy it cannot judge (NaN, infinite, outside [0, 1], or a production
version without one) is a failed verdict naming the file and field, never a pass; a baseline
file that is not what the flow writes (a list, a string, a non-number) stops the stage (exit 2).
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stages.errors import UserError, run_cli
from stages.io import atomic_file, read_json, write_json
from stages.params import GateParams, load_params, load_yaml, shorten

log = logging.getLogger("convflow.gate")

#: The metric the gate judges, as ``dvc metrics show`` names it.
METRIC = "test.accuracy"


def read_baseline(path: str | Path) -> dict[str, Any]:
    """The production baseline ``{version, rev, accuracy}``; accuracy None = no model in prod.

    A file that is not what the flow writes (not a mapping, an accuracy that is not a number,
    a version that is not a name) is a UserError; a number the gate cannot judge is left to
    :func:`verdict`, which fails on it.
    """
    path = Path(path)
    if not path.is_file():
        return {"version": None, "rev": None, "accuracy": None}
    data = load_yaml(path.read_text(encoding="utf-8"), path)
    fix = "restore it from git, or let `python -m flows run` rewrite it from the registry"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping (version, rev, accuracy), got a "
                        f"{type(data).__name__}; {fix}")
    accuracy, version = data.get("accuracy"), data.get("version")
    if accuracy is not None and (isinstance(accuracy, bool)
                                 or not isinstance(accuracy, int | float)):
        raise UserError(f"{path}: accuracy must be a number or null, got "
                        f"{shorten(repr(accuracy))}; {fix}")
    if version is not None and not (isinstance(version, str) and version.isprintable()):
        raise UserError(f"{path}: version must be a name or null, got "
                        f"{shorten(repr(version))}; {fix}")
    return {"version": version, "rev": data.get("rev"), "accuracy": accuracy}


def _valid(value: object) -> bool:
    """Whether ``value`` is an accuracy the gate can judge: a finite number in [0, 1]."""
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value) and 0 <= value <= 1)


def unjudgeable(accuracy: float, baseline: dict[str, Any], metrics_file: str,
                baseline_file: str) -> str | None:
    """Why the gate cannot judge (it then fails, never passes), naming the file and field."""
    prod, version = baseline.get("accuracy"), baseline.get("version")
    if not _valid(accuracy):
        return (f"{metrics_file}: {METRIC} is {accuracy!r}, not a number in [0, 1]; the gate "
                "cannot judge it (re-run evaluate: dvc repro -f evaluate)")
    if prod is not None and not _valid(prod):
        return (f"{baseline_file}: accuracy is {prod!r}, not a number in [0, 1]; gate.max_drop "
                "cannot be checked (restore the file from git or let the flow rewrite it)")
    if prod is None and version is not None:
        return (f"{baseline_file}: production version {version} has no accuracy; gate.max_drop "
                "cannot be checked (record its test.accuracy there, or put a model with "
                "metrics in production)")
    return None


def verdict(accuracy: float, p: GateParams, baseline: dict[str, Any], *,
            metrics_file: str = "evaluate.json", baseline_file: str = "production.yaml",
            ) -> dict[str, Any]:
    """The gate's verdict on ``accuracy``: passed, the numbers compared, and one-line reason.

    Fails closed: a number it cannot judge (NaN, infinite, outside [0, 1], a production
    version without an accuracy) is a failure naming the file and field, never a pass.
    """
    problem = unjudgeable(accuracy, baseline, metrics_file, baseline_file)
    prod = baseline.get("accuracy") if problem is None else None
    drop = None if prod is None else round(float(prod) - accuracy, 6)
    if problem:
        reason = problem
    elif accuracy < p.min_accuracy:
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
        "value": round(accuracy, 6) if _valid(accuracy) else None,  # JSON has no NaN
        "min_accuracy": p.min_accuracy,
        "max_drop": p.max_drop,
        "production_version": baseline.get("version"),
        "production_accuracy": baseline.get("accuracy") if _valid(baseline.get("accuracy"))
        else None,
        "drop": drop,
        "reason": reason or (f"{METRIC} {accuracy:.4f} passes gate.min_accuracy "
                             f"{p.min_accuracy:.4f} and gate.max_drop {p.max_drop:.4f} "
                             f"({vs_prod})"),
    }


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """The verdict's numbers for ``dvc metrics show``: passed and the drop below production.

    The whole verdict (its long reason, the thresholds) stays in the verdict file, which the
    flow reads: as a metrics file it would widen DVC's one table past a terminal.
    """
    return {"passed": result["passed"], "drop": result["drop"]}


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: read evaluate's metrics and the production baseline; write the verdict."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--metrics", required=True, help="evaluate's metrics file (evaluate.json)")
    ap.add_argument("--production", required=True, help="production baseline (production.yaml)")
    ap.add_argument("--out", required=True, help="verdict file to write (gate.json)")
    ap.add_argument("--headline", help="its headline metrics file to write (verdict.json)")
    args = ap.parse_args(argv)
    p = load_params().gate
    metrics = read_json(args.metrics)
    try:
        accuracy = metrics["test"]["accuracy"]
    except (KeyError, TypeError):
        accuracy = None
    if isinstance(accuracy, bool) or not isinstance(accuracy, int | float):
        raise UserError(f"{args.metrics}: no {METRIC} number; re-run evaluate") from None
    result = verdict(float(accuracy), p, read_baseline(args.production),
                     metrics_file=args.metrics, baseline_file=args.production)
    for path, obj in ((args.out, result), (args.headline, headline(result))):
        if path:
            with atomic_file(path) as tmp:
                write_json(tmp, obj)
    if result["passed"]:
        log.info("passed: %s", result["reason"])
    else:
        log.warning("FAILED: %s", result["reason"])


if __name__ == "__main__":
    run_cli(main)
