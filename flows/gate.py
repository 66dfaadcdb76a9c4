"""The flow's side of the quality gate: read the ``gate`` stage's verdict and act on it.

The ``gate`` DVC stage judges (``stages/gate.py`` writes ``metrics/gate.json`` and never
fails ``dvc repro``); the flow enforces: its ``gate`` task runs the stage and then fails
on a failed verdict, so the run graph shows the gate red and nothing ships. A drop below
production within ``gate.max_drop`` passes and alerts as a regression.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from flows import alerts
from flows.runner import StageFailed, retry_if_transient
from flows.stage_tasks import run_stage
from stages.paths import pipeline_paths

#: The DVC stage whose verdict the flow enforces.
GATE_STAGE = "gate"
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
    if found.get("passed"):
        if (found.get("drop") or 0) > 0:  # a failed gate's reason already names the drop
            alerts.emit(alerts.REGRESSION, root, GATE_STAGE,
                        f"{found['metric']} {found['value']} is below production "
                        f"{found['production_version']} ({found['production_accuracy']})",
                        metrics)
        return None
    message = f"quality gate failed: {found['reason']}"
    alerts.emit(alerts.GATE_FAILED, root, GATE_STAGE, message, metrics)
    return message


@task(name="dvc-stage", task_run_name="{name}", cache_policy=NO_CACHE,
      retry_condition_fn=retry_if_transient)
def run_gate(name: str, root: str, timeout_s: float | None = None, force: bool = False,
             retry_stages: list[str] | None = None) -> dict[str, Any]:
    """The gate stage as a task that fails when its verdict does: a red ``gate`` in the UI."""
    row = run_stage.fn(name, root, timeout_s, force, retry_stages)
    failure = enforce(root)
    if failure:
        raise StageFailed(name, failure, None, False)
    return row
