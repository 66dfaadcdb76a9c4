"""Alerts: Prefect events for a failed run, a failed gate and a regression, and the one
automation that forwards them to a webhook (Slack-compatible JSON) or any notification block.

Events (``prefect.resource.id`` = ``convflow.flow-run.<id>``; payload: flow, flow_run, stage,
message, metrics, commit):

* ``convflow.run.failed``: a stage failed or timed out;
* ``convflow.gate.failed``: the model missed a gate threshold (nothing was shipped);
* ``convflow.model.regression``: test accuracy below the model in production.

``python -m flows alerts --webhook URL`` (or ``--block TYPE/NAME``, e.g. an e-mail block)
creates the automation ``convflow-alerts``; running it again replaces it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

RUN_FAILED = "convflow.run.failed"
GATE_FAILED = "convflow.gate.failed"
REGRESSION = "convflow.model.regression"
EVENTS = (RUN_FAILED, GATE_FAILED, REGRESSION)
AUTOMATION = "convflow-alerts"
WEBHOOK_BLOCK = "convflow-alerts-webhook"

#: The notification text (Jinja, rendered by the Prefect server for each event).
SUBJECT = "convflow: {{ event.event }} ({{ event.payload.flow }})"
BODY = ("convflow alert: {{ event.event }}\n"
        "flow: {{ event.payload.flow }} (run {{ event.payload.flow_run }})\n"
        "stage: {{ event.payload.stage }}\n"
        "message: {{ event.payload.message }}\n"
        "commit: {{ event.payload.commit }}\n"
        "metrics: {{ event.payload.metrics }}")


def head_commit(root: str | Path) -> str | None:
    """The commit the workspace is on (None outside git)."""
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    return out.stdout.strip() or None if out.returncode == 0 else None


def emit(event: str, root: str | Path, stage: str, message: str,
         metrics: dict[str, Any] | None = None) -> None:
    """Emit one convflow event about the current flow run."""
    from prefect.events import emit_event
    from prefect.runtime import flow_run

    run_id = str(flow_run.id or "none")
    emit_event(
        event=event,
        resource={"prefect.resource.id": f"convflow.flow-run.{run_id}",
                  "prefect.resource.name": flow_run.name or "convflow"},
        payload={"flow": flow_run.flow_name or "convflow", "flow_run": flow_run.name,
                 "stage": stage, "message": message, "metrics": metrics or {},
                 "commit": head_commit(root)})


def webhook_block(url: str, name: str = WEBHOOK_BLOCK) -> Any:
    """A saved webhook block posting ``{"text": ...}`` (what Slack's incoming webhooks take)."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    block = CustomWebhookNotificationBlock(
        name=name, url=url, method="POST",
        json_data={"text": "{{body}}", "subject": "{{subject}}"},
        # a receiver on a private or loopback address (a LAN chat server, a test) is allowed
        allow_private_urls=True)
    block.save(name, overwrite=True)
    return block


def setup_automation(webhook: str | None = None, block: str | None = None,
                     name: str = AUTOMATION) -> Any:
    """Create (or replace) the automation sending every convflow event to a notification block."""
    from prefect.automations import Automation
    from prefect.blocks.core import Block
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import EventTrigger, Posture

    if (webhook is None) == (block is None):
        raise ValueError("give exactly one of webhook (a URL) or block (TYPE/NAME)")
    target = webhook_block(webhook) if webhook else Block.load(block)
    try:
        Automation.read(name=name).delete()
    except Exception:  # none yet (Prefect raises a not-found error)
        pass
    return Automation(
        name=name,
        description="convflow: failed runs, failed gates and regressions",
        trigger=EventTrigger(expect=set(EVENTS),
                             match={"prefect.resource.id": "convflow.flow-run.*"},
                             posture=Posture.Reactive, threshold=1),
        actions=[SendNotification(block_document_id=target._block_document_id,
                                  subject=SUBJECT, body=BODY)],
    ).create()
