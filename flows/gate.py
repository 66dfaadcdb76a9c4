"""The flow's side of the quality gate: read the ``gate`` stage's verdict and act on it.

The ``gate`` DVC stage judges (``stages/gate.py`` writes ``metrics/gate.json`` and never
fails ``dvc repro``); the flow enforces: a failed verdict alerts and ships nothing, and a
drop below production alerts as a regression even when it is within ``gate.max_drop``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flows import alerts
from stages.paths import pipeline_paths

_VERDICT_KEYS = ("metric", "value", "min_accuracy", "max_drop", "production_version",
                 "production_accuracy", "drop")


def verdict(root: str | Path) -> dict[str, Any] | None:
    """The gate stage's verdict (``gate.json``), or None where the pipeline has no gate."""
    try:
        path = pipeline_paths(root).get("metrics")
    except Exception:  # a pipeline without `vars: paths` (a toy one) has no gate
        return None
    if path is None or not (path / "gate.json").is_file():
        return None
    return json.loads((path / "gate.json").read_text(encoding="utf-8"))


def enforce(root: str | Path) -> str | None:
    """Read the gate's verdict, emit its events; the one-line failure, or None if it passed."""
    found = verdict(root)
    if found is None:
        return None
    metrics = {k: found.get(k) for k in _VERDICT_KEYS}
    if (found.get("drop") or 0) > 0:
        alerts.emit(alerts.REGRESSION, root, "gate",
                    f"{found['metric']} {found['value']} is below production "
                    f"{found['production_version']} ({found['production_accuracy']})", metrics)
    if found.get("passed"):
        return None
    message = f"quality gate failed: {found['reason']}"
    alerts.emit(alerts.GATE_FAILED, root, "gate", message, metrics)
    return message
