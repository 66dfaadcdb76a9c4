"""The crash automation's check is cached: a no-op ``python -m flows run`` pays no round
trip for it while a recent check stands (flows/crash.py), against a real Prefect server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from prefect_fixtures import api_env

ENSURE = "from flows.crash import ensure_crash_detection; ensure_crash_detection()"


def _ensure(**env: str) -> None:
    subprocess.run([sys.executable, "-c", ENSURE], cwd=Path(__file__).resolve().parents[1],
                   env={**api_env(), "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30", **env},
                   check=True, timeout=120)


def _automation() -> object | None:
    from prefect.automations import Automation

    from flows.crash import CRASH_AUTOMATION

    try:
        return Automation.read(name=CRASH_AUTOMATION)
    except ValueError:
        return None


def test_a_recent_check_is_trusted_and_an_expired_one_repeated(prefect_api) -> None:
    """Created by the first command; deleted behind its back, the next command within the
    TTL trusts its check; once the TTL is over (0 here) the check recreates it."""
    _ensure(CONVFLOW_CRASH_CHECK_S="0")
    found = _automation()
    assert found is not None
    found.delete()
    _ensure()
    assert _automation() is None, "the recent check was not trusted"
    _ensure(CONVFLOW_CRASH_CHECK_S="0")
    assert _automation() is not None, "an expired check did not recreate the automation"
