"""Alerts: one notification per failed, crashed or regressed convflow run, through one
Prefect automation that forwards it to a webhook (Slack-compatible JSON) or any block.

What triggers it (the run's own step and one-line reason are in its state message):

* ``prefect.flow-run.Failed`` of a convflow flow: any step failed, whichever (``dvc
  pull``, a stage, the gate, ``dvc push``, the git publish, a sweep point);
* ``prefect.flow-run.Crashed``: the run's process died (``flows/crash.py`` marks a run
  whose heartbeats stopped);
* ``convflow.model.regression``: a run that passed the gate but scored below the model
  in production (payload: flow, flow_run, stage, message, metrics, commit).

The gate also emits ``convflow.gate.failed`` (with its metrics) for automations of your
own; its notification is the run's failure, so each failed run alerts once.

``python -m flows alerts --webhook URL`` (or ``--block TYPE/NAME``, e.g. an e-mail block)
creates the automation ``convflow-alerts``; running it again replaces it. A webhook is
posted to by the server through ``flows/alert_block.py``'s block, which reads at most 64 KiB
of its answer.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from stages.errors import UserError

GATE_FAILED = "convflow.gate.failed"
REGRESSION = "convflow.model.regression"
FAILED, CRASHED = "prefect.flow-run.Failed", "prefect.flow-run.Crashed"
#: What the automation sends: every failed or crashed run of these flows, and regressions.
EVENTS = (FAILED, CRASHED, REGRESSION)
#: The flows it watches: every convflow flow (pipeline, sweep, sweep point).
FLOWS = "convflow-*"
AUTOMATION = "convflow-alerts"
WEBHOOK_BLOCK = f"{AUTOMATION}-webhook"
#: Longest URL or block name echoed back in an error.
_SHOWN = 120

#: The notification text (Jinja, rendered by the Prefect server for each event).
SUBJECT = ("convflow: {{ flow.name }} run {{ flow_run.name }}: "
           "{{ 'regression' if event.payload.message else flow_run.state.name }}")
BODY = ("convflow alert: {{ event.event }}\n"
        "flow: {{ flow.name }} (run {{ flow_run.name }})\n"
        "{% if event.payload.message %}stage: {{ event.payload.stage }}\n"
        "message: {{ event.payload.message }}\n"
        "commit: {{ event.payload.commit }}\n"
        "metrics: {{ event.payload.metrics }}"
        "{% else %}state: {{ flow_run.state.name }}\n"
        "message: {{ flow_run.state.message }}{% endif %}")


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


def _shown(text: str) -> str:
    return repr(text if len(text) <= _SHOWN else text[:_SHOWN] + "...")


def check_webhook(url: str) -> str:
    """``url`` if it is an http(s) URL with a host; else a one-line UserError."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        host, parts = None, None
    odd = len(url) > 2048 or any(c.isspace() or ord(c) < 32 for c in url)
    if odd or parts is None or parts.scheme not in ("http", "https") or not host:
        raise UserError(f"--webhook {_shown(url)}: expected an http:// or https:// URL")
    return url


def webhook_class() -> type:
    """The block class posting to a webhook: ours, which bounds the webhook's answer
    (flows/alert_block.py), unless the server is Prefect Cloud, which cannot import it."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.settings import PREFECT_API_URL, PREFECT_CLOUD_API_URL

    from flows.alert_block import ConvflowWebhook

    cloud = (PREFECT_API_URL.value() or "").startswith(PREFECT_CLOUD_API_URL.value())
    return CustomWebhookNotificationBlock if cloud else ConvflowWebhook


def webhook_block(url: str, name: str = WEBHOOK_BLOCK) -> Any:
    """A saved webhook block posting ``{"text": ...}`` (what Slack's incoming webhooks take)."""
    block = webhook_class()(
        name=name, url=check_webhook(url), method="POST",
        json_data={"text": "{{body}}", "subject": "{{subject}}"},
        # a receiver on a private or loopback address (a LAN chat server, a test) is allowed
        allow_private_urls=True)
    block.save(name, overwrite=True)
    return block


def load_block(ref: str) -> Any:
    """The saved notification block ``TYPE/NAME``; a one-line UserError if there is none."""
    from prefect.blocks.core import Block

    try:
        block = Block.load(ref)
    except (ValueError, KeyError) as exc:  # Prefect's "Unable to find block ..." and kin
        raise UserError(f"--block {_shown(ref)}: no such notification block "
                        f"({' '.join(str(exc).split())[:_SHOWN]}); list them with "
                        "`prefect block ls`") from None
    if not hasattr(block, "notify"):
        raise UserError(f"--block {_shown(ref)} is a {type(block).__name__}, "
                        "not a notification block")
    return block


def trigger() -> Any:
    """Each failed or crashed run of a convflow flow, and each regression event."""
    from prefect.events.schemas.automations import EventTrigger, Posture

    return EventTrigger(
        expect=set(EVENTS),
        match={"prefect.resource.id": ["prefect.flow-run.*", "convflow.flow-run.*"]},
        match_related={"prefect.resource.role": "flow",
                       "prefect.resource.name": FLOWS},
        posture=Posture.Reactive, threshold=1)


def setup_automation(webhook: str | None = None, block: str | None = None,
                     name: str = AUTOMATION) -> Any:
    """Create (or replace) the automation sending convflow alerts to a notification block."""
    from prefect.automations import Automation
    from prefect.events.actions import SendNotification

    if (webhook is None) == (block is None):
        raise UserError("give exactly one of --webhook URL or --block TYPE/NAME")
    target = webhook_block(webhook, f"{name}-webhook") if webhook else load_block(block)
    try:
        Automation.read(name=name).delete()
    except Exception:  # none yet (Prefect raises a not-found error)
        pass
    return Automation(
        name=name,
        description="convflow: failed and crashed runs, regressions",
        trigger=trigger(),
        actions=[SendNotification(block_document_id=target._block_document_id,
                                  subject=SUBJECT, body=BODY)],
    ).create()
