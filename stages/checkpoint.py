"""What training leaves while it runs: the resumable checkpoint and dvclive's series.

The checkpoint is written atomically after every epoch, stamped with the run's fingerprint
(:mod:`stages.fingerprint`); only a checkpoint of this exact run is resumed. dvclive is
rebuilt from the checkpoint's history on resume, so its series never fork.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from stages.io import atomic_file
from stages.loop import History
from stages.models import save_torch

log = logging.getLogger("convflow.train")

CHECKPOINT_FORMAT = "convflow-checkpoint/2"

#: Series logged per epoch (step = epoch) under dvclive's plots/metrics/.
#: No wall-clock series: it would change every run, and with it dvc.lock and the plot stage.
SERIES = ("train/loss", "train/acc", "val/loss", "val/acc", "lr")


def save_checkpoint(path: str | Path, state: dict[str, Any], fingerprint: str) -> None:
    """Write a run's ``state()`` atomically, stamped with its format and fingerprint."""
    state.update(format=CHECKPOINT_FORMAT, fingerprint=fingerprint)
    with atomic_file(path) as tmp:
        save_torch(state, tmp)  # a full disk: one line, as for every output


def load_checkpoint(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """The checkpoint's state if it was made by this exact run (params, data, code), else None."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a torn or foreign file is just not resumed
        log.warning("ignoring unreadable checkpoint %s (%s)", path, err)
        return None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        log.warning("ignoring %s: not a convflow checkpoint", path)
        return None
    if state.get("fingerprint") != fingerprint:
        log.info("ignoring %s: made with other train params, data or training code; starting fresh",
                 path)
        return None
    return state


class LiveLog:
    """dvclive for this stage, rebuilt from the history on resume so series never fork."""

    def __init__(self, folder: str | Path) -> None:
        from dvclive import Live

        self.live = Live(str(folder), save_dvc_exp=False, dvcyaml=None, resume=False,
                         report=None)

    def epoch(self, record: dict[str, float]) -> None:
        """Log one epoch's record with step = epoch (the summary is written by finish only,
        so a run killed mid-way leaves no metrics.json passing for the current result)."""
        self.live.step = int(record["epoch"])
        for name in SERIES:
            if name in record:
                value = record[name]
                # 6 significant digits: lr's full float repr (~22 digits) is noise in the
                # summary's git diff and widens `dvc metrics show`'s lr column
                self.live.log_metric(name, float(f"{value:.6g}") if name == "lr" else value)

    def finish(self, history: History) -> None:
        """Write the per-iteration loss history and the final summary."""
        if history.loss_rows:
            self.live.log_plot("loss_history", history.loss_rows, x="iteration", y="loss",
                               title="training loss per iteration")
        self.live.make_summary()
        self.live.end()
