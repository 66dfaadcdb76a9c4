"""The stage runner: one command in its own guarded process group, and what its failure means.

Everything the flows run as a subprocess (a DVC stage, a sweep point, a pull or push) goes
through :func:`run_guarded`. The command leads its own process group under
``flows/guard.py``, so a timeout kills the whole group (DVC and the stage command under it:
no orphan keeps writing), the group dies with the flow even when the flow is killed with
SIGKILL, and an out-of-memory kill or a crash ends the command, not the flow. A command
running while the Prefect server is unreachable for ``API_LOST_S`` is stopped the same way.

A failure becomes a :class:`StageFailed` carrying the command's own one-line error and
whether a retry may help (:func:`is_transient`); Prefect's retries ask
:func:`retry_if_transient`. This module sits below the flows that use it (pipeline, sweep,
publish) and imports none of them.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from flows.dvc_adapter import dvc_env
from stages.errors import TEMPFAIL_EXIT

#: Stages whose timeout can be transient (a stalled download): retried after a timeout.
DEFAULT_RETRY_STAGES = ("fetch", "ingest")
#: Seconds between SIGTERM and SIGKILL when a stage is stopped.
KILL_GRACE_S = float(os.environ.get("CONVFLOW_KILL_GRACE_S", "10"))
#: Seconds a running stage tolerates an unreachable Prefect server before it is stopped.
API_LOST_S = float(os.environ.get("CONVFLOW_API_LOST_S", "20"))
#: Seconds between the health checks of the Prefect server while a stage runs.
API_CHECK_S = float(os.environ.get("CONVFLOW_API_CHECK_S", "5"))
GUARD = Path(__file__).resolve().with_name("guard.py")
_STAGE_ERROR = re.compile(r"^convflow(\.[\w.]+)?: error: ")
#: DVC's own error lines; publish reads the same ones.
DVC_ERROR = re.compile(r"^ERROR: .*$", re.MULTILINE)
#: DVC exits 255 whatever the command did; the command's own status is in its message.
_CMD_STATUS = re.compile(r"failed to run: .*, exited with (-?\d+)")


class ServerLost(RuntimeError):
    """The Prefect server stopped answering while the flow ran."""


class StageFailed(RuntimeError):
    """A stage (or experiment, or push) failed or timed out; ``message`` is its own error."""

    def __init__(self, stage: str, message: str, returncode: int | None, transient: bool,
                 kind: str = "stage"):
        super().__init__(f"{kind} '{stage}' failed: {message}")
        self.stage, self.message, self.kind = stage, message, kind
        self.returncode, self.transient = returncode, transient

    def __reduce__(self) -> tuple:
        # Prefect may pickle a task's exception; keep every field across that
        return (StageFailed,
                (self.stage, self.message, self.returncode, self.transient, self.kind))


def env_seconds(name: str, default: float) -> float:
    """A number of seconds from the environment; a malformed one is a one-line UserError."""
    from stages.errors import UserError

    raw = os.environ.get(name)
    try:
        value = default if raw is None else float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise UserError(f"{name}={raw[:40]!r}: expected a number of seconds, 0 or more")
    return value


def command_status(output: str, dvc_status: int | None) -> int | None:
    """The stage command's own exit status, from DVC's "failed to run: ..., exited with N"."""
    found = _CMD_STATUS.findall(output)
    return int(found[-1]) if found else dvc_status


def error_message(output: str, returncode: int | None) -> str:
    """The stage's own error (``convflow[.<stage>]: error: ...`` and its indented lines)."""
    lines = output.splitlines()
    starts = [i for i, line in enumerate(lines) if _STAGE_ERROR.match(line)]
    if starts:
        message = [lines[starts[-1]].strip()]
        for line in lines[starts[-1] + 1:]:
            if not line[:1].isspace() or not line.strip():
                break
            message.append(line.strip())  # the details of a multi-line message
        return " ".join(message)
    found = DVC_ERROR.findall(output)
    if found:
        return found[-1].strip()
    tail = [line for line in lines if line.strip()][-3:]
    return " | ".join(tail) or f"exited with status {returncode}"


def is_transient(stage: str, status: int | None, timed_out: bool,
                 retry_stages: tuple[str, ...] | list[str] = DEFAULT_RETRY_STAGES) -> bool:
    """Whether a retry may succeed: the stage said so (exit 75), or a download stage stalled.

    Everything else fails for good: exit 2 is a user error (bad params, a checksum
    mismatch, a non-finite loss), a negative status a kill by signal (the OOM killer), and
    any other status a crash that the same inputs would repeat.
    """
    if status == TEMPFAIL_EXIT:
        return True
    return timed_out and stage.split("@")[0] in retry_stages


def retry_if_transient(task_: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry_condition_fn: retry only a :class:`StageFailed` marked transient."""
    try:
        state.result()
    except StageFailed as exc:
        return exc.transient
    except Exception:
        return False
    return False


def server_lost(exc: BaseException) -> str | None:
    """A one-line reason when ``exc`` (or what caused it) is the Prefect API not answering."""
    import httpx

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ServerLost):
            return str(seen)
        if isinstance(seen, (httpx.TransportError, ConnectionError)):
            return f"lost the Prefect server at {api_url()}: {type(seen).__name__}: {seen}"
        seen = seen.__cause__ or seen.__context__
    return None


def dvc_failure(output: str, status: int | None) -> str | None:
    """Why a DVC command failed, or None: a non-zero status, or an ``ERROR:`` line with status 0.

    DVC can report a failed cache transfer ("ERROR: failed to transfer ...") and still
    exit 0; the flow treats that as the failure it is.
    """
    if status != 0:
        return error_message(output, status)
    found = DVC_ERROR.findall(output)
    return found[-1].strip() if found else None


def guarded(cmd: list[str]) -> list[str]:
    """``cmd`` run under ``flows/guard.py``: its process group dies with this process."""
    return [sys.executable, str(GUARD), str(os.getpid()), str(KILL_GRACE_S), "--", *cmd]


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid``, read from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # the process ended while we looked
            continue
        # fields: state, ppid, pgrp, ...; a zombie runs no code and waits only to be reaped
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(stat.parent.name))
    return members


def _group_gone(pgid: int, wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while group_members(pgid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def end_group(pgid: int, grace_s: float = KILL_GRACE_S, log: Any = None) -> None:
    """Return only once no process of group ``pgid`` is alive: SIGTERM, ``grace_s``, SIGKILL.

    The guard normally does this; when the guard itself was killed (SIGKILL, OOM), DVC and
    the stage under it are orphans that would go on writing outputs after the flow reported
    the failure and freed the stage's slot.
    """
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 30.0)):
        if not group_members(pgid):
            return
        if log is not None:
            log.warning("process group %d outlived its guard: sending %s", pgid,
                        signal.Signals(sig).name)
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        if _group_gone(pgid, wait_s):
            return
    if log is not None:
        log.error("process group %d still has %s after SIGKILL", pgid, group_members(pgid))


def kill_group(proc: subprocess.Popen, grace_s: float = KILL_GRACE_S) -> None:
    """SIGTERM the process group ``proc`` leads, SIGKILL it after ``grace_s``; wait until gone."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace_s)  # the guard ends its own group, SIGKILL included
    except subprocess.TimeoutExpired:
        pass
    end_group(proc.pid, grace_s=0.0)  # a child that ignored SIGTERM may still hold the group


def api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def api_reachable(url: str, timeout_s: float = API_CHECK_S) -> bool:
    """Whether the Prefect API at ``url`` answers its health check."""
    import httpx

    try:
        return httpx.get(f"{url.rstrip('/')}/health", timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


def run_guarded(cmd: list[str], root: Path, label: str, timeout_s: float | None, log: Any,
                env: dict[str, str] | None = None) -> tuple[str, int | None, bool]:
    """``cmd`` in its own guarded process group, its output logged: (output, status, timed out).

    Returns once no process of the group is left (nothing writes after a reported failure or
    a freed slot); :class:`ServerLost` (group stopped) after ``API_LOST_S`` s without server.
    """
    proc = subprocess.Popen(guarded(cmd), cwd=root, env=env or dvc_env(), text=True,
                            bufsize=1, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    lines: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            log.info("%s | %s", label, line.rstrip())

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    api, last_seen = api_url(), time.monotonic()
    try:
        while proc.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                timed_out = True
                log.error("'%s' ran past its %s s timeout: killing its process group", label,
                          timeout_s)
                kill_group(proc)
                break
            wait_s = API_CHECK_S if deadline is None else min(API_CHECK_S,
                                                              deadline - time.monotonic())
            try:
                proc.wait(timeout=max(wait_s, 0.01))
                break
            except subprocess.TimeoutExpired:
                pass
            if api and api_reachable(api):
                last_seen = time.monotonic()
            elif api and time.monotonic() - last_seen > API_LOST_S:
                kill_group(proc)
                raise ServerLost(f"lost the Prefect server at {api} for {API_LOST_S:.0f} s; "
                                 f"stopped '{label}' before it finished")
    except BaseException:  # the flow itself is cancelled or lost: take the stage down with it
        kill_group(proc)
        raise
    end_group(proc.pid, log=log)  # a guard killed outright left its group running
    reader.join(timeout=5)
    return "".join(lines), proc.returncode, timed_out




def status_from_output(output: str) -> str:
    """What ``dvc repro`` did with a stage: ran it, restored it from the run-cache, or nothing."""
    if "is cached - skipping run" in output:
        return "restored from run-cache"
    if "Running stage" in output:
        return "ran"
    return "up to date"
