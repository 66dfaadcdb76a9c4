"""Serve the pipeline flow on a schedule against a Prefect server, one run at a time.

``python -m flows serve --cron "0 3 * * *"`` creates (or updates) the deployment
``convflow-pipeline/convflow`` and keeps polling for its runs until stopped (Ctrl-C pauses
the schedule). The deployment has a concurrency limit of 1, so runs never overlap: by
default a run that would overlap waits for the running one and then starts (ENQUEUE);
``--collision cancel`` cancels it instead (CANCEL_NEW).
"""

from __future__ import annotations

from contextlib import chdir
from typing import Any

from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.types.entrypoint import EntrypointType

from flows.crash import WATCHED_TAG
from flows.pipeline import pipeline
from stages.paths import find_root

COLLISION = {"enqueue": ConcurrencyLimitStrategy.ENQUEUE,
             "cancel": ConcurrencyLimitStrategy.CANCEL_NEW}
DEPLOYMENT = "convflow"


def serve_pipeline(root: str | None = None, cron: str | None = None,
                   interval: float | None = None, collision: str = "enqueue",
                   name: str = DEPLOYMENT, parameters: dict[str, Any] | None = None) -> None:
    """Serve ``pipeline`` on ``cron`` or every ``interval`` seconds, at most one run at a time."""
    repo_root = find_root(root)
    # the runner starts each flow run from the cwd (its `flows` package first on sys.path):
    # serve from the checkout being run, and give the caller its own cwd back afterwards
    with chdir(repo_root):
        pipeline.serve(
            name=name,
            cron=cron,
            interval=interval,
            # a deployment-wide limit enforced by the server, so it also holds across restarts
            # and several `serve` processes; the runner itself takes whatever the server releases
            global_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=COLLISION[collision]),
            parameters={"root": str(repo_root), **(parameters or {})},
            tags=["convflow", WATCHED_TAG],  # its runs are watched for missing heartbeats
            # import by module (the package is installed), not by a file path relative to cwd
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
