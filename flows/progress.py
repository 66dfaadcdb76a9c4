"""Live progress of a training stage in the Prefect UI, and the DVC edges of the run graph.

While ``train`` runs (a subprocess under ``dvc repro``), a thread of the flow reads the
files dvclive writes as each epoch ends (``<train_live>/plots/metrics/**.tsv``) and keeps
two artifacts of the task run current, each created once and updated in place: a progress
artifact (epochs done / ``train.epochs``) and a table with one row per finished epoch.
Only files written after the stage started count, so a previous run's logs never show.
"""

from __future__ import annotations

import contextvars
import csv
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

#: Seconds between two reads of dvclive's files.
POLL_S = 1.0
PROGRESS_KEY = "convflow-train-progress"
EPOCHS_KEY = "convflow-train-epochs"


class _EdgeOnly:
    """Stands in for a finished task's result inside a ``wait_for`` state."""


def edge(state: Any) -> Any:
    """``state`` for ``wait_for``: an edge to its task run and to no other.

    Prefect links each object one level inside a ``wait_for`` entry to the task that
    returned an object with the same ``id()``; an interned string in a stage's summary
    ("ran") would link the latest task that returned it. A fresh placeholder as the data
    (weak-referenceable, so never mistaken for another object) leaves only the true edge.
    """
    return state.model_copy(update={"data": _EdgeOnly()})


def epoch_rows(live_dir: str | Path, since: float = 0.0) -> list[dict[str, Any]]:
    """One row per logged epoch ``{epoch, <series>...}`` from dvclive's TSV files."""
    folder = Path(live_dir) / "plots" / "metrics"
    rows: dict[int, dict[str, Any]] = {}
    for tsv in sorted(folder.rglob("*.tsv")) if folder.is_dir() else []:
        try:
            if tsv.stat().st_mtime < since:
                continue  # left by an earlier run; this one has not reached it yet
            with tsv.open(newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh, delimiter="\t")
                series = tsv.relative_to(folder).with_suffix("").as_posix()
                for rec in reader:
                    step, value = rec.get("step"), rec.get(tsv.stem)
                    if step is None or value in (None, ""):
                        continue
                    row = rows.setdefault(int(step), {"epoch": int(step)})
                    row[series] = round(float(value), 6)
        except (OSError, ValueError):
            continue  # a file being rewritten right now: read it next time
    return [rows[k] for k in sorted(rows)]


def planned_epochs(root: str | Path) -> int | None:
    """``train.epochs`` from params.yaml, or None where there is none."""
    try:
        params = yaml.safe_load((Path(root) / "params.yaml").read_text(encoding="utf-8"))
        return int(params["train"]["epochs"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return None


def _live_dir(root: str | Path) -> Path | None:
    from stages.paths import pipeline_paths

    try:
        return pipeline_paths(root).get("train_live")
    except Exception:  # a pipeline without `vars: paths`: nothing to watch
        return None


class _Watcher:
    """Publishes progress and the epoch table whenever dvclive's files gain an epoch."""

    def __init__(self, live_dir: Path, epochs: int, since: float, log: Any) -> None:
        self.live_dir, self.epochs, self.since, self.log = live_dir, epochs, since, log
        self.stop = threading.Event()
        self.shown = -1
        self.artifact_id: Any = None
        self.table_id: Any = None

    def publish(self) -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        rows = epoch_rows(self.live_dir, self.since)
        if len(rows) == self.shown:
            return
        self.shown = len(rows)
        percent = min(100.0, 100.0 * len(rows) / self.epochs)
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(
                percent, key=PROGRESS_KEY, description="train: epochs done / train.epochs")
        else:
            update_progress_artifact(self.artifact_id, percent)
        if rows:
            self.publish_table(rows)

    def publish_table(self, rows: list[dict[str, Any]]) -> None:
        """One epochs table per run, created once and then updated in place."""
        from prefect.artifacts import create_table_artifact
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import ArtifactUpdate

        description = f"train: {len(rows)}/{self.epochs} epochs so far"
        if self.table_id is None:
            self.table_id = create_table_artifact(rows, key=EPOCHS_KEY,
                                                  description=description)
            return
        with get_client(sync_client=True) as client:
            # the same JSON a table artifact is created with (TableArtifact.format)
            client.update_artifact(self.table_id, ArtifactUpdate(
                data=json.dumps(rows), description=description))

    def run(self) -> None:
        while not self.stop.wait(POLL_S):
            self._safe_publish()
        self._safe_publish()  # the last epochs, written just before the stage ended

    def _safe_publish(self) -> None:
        try:
            self.publish()
        except Exception as exc:  # progress is a convenience: never fail the stage for it
            self.log.warning("progress artifact not updated: %s", exc)


@contextmanager
def watch(root: str | Path, stage: str, log: Any) -> Iterator[None]:
    """While the block runs ``stage``, publish its dvclive progress if it is ``train``."""
    live_dir = _live_dir(root) if stage.split("@")[0] == "train" else None
    epochs = planned_epochs(root) if live_dir is not None else None
    if live_dir is None or not epochs:
        yield
        return
    watcher = _Watcher(live_dir, epochs, time.time() - 1.0, log)
    # the thread needs the task run's Prefect context to attach artifacts to it
    thread = threading.Thread(target=contextvars.copy_context().run, args=(watcher.run,),
                              daemon=True, name="convflow-progress")
    thread.start()
    try:
        yield
    finally:
        watcher.stop.set()
        thread.join(timeout=30)
