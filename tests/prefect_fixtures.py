"""Test helpers for the Prefect flows: a real Prefect server per session, and toy DVC repos.

``prefect_api`` starts ``prefect server start`` on a free loopback port with its own
``PREFECT_HOME`` (so its SQLite database and settings live in a temp folder) and analytics
off, points this process and its subprocesses at it, and stops it at the end. It is
registered as a plugin by ``tests/conftest.py`` so that every test file shares the one
server.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import init_and_commit, subprocess_env

SERVER_START_TIMEOUT_S = 90
#: The folder every test worker of this run shares (set by ``_shared_folder``).
_SHARED: list[Path] = []


@pytest.fixture(autouse=True, scope="session")
def _shared_folder(tmp_path_factory: pytest.TempPathFactory) -> None:
    """This run's temp root: under pytest-xdist the parent of the workers' own folders."""
    base = tmp_path_factory.getbasetemp()
    _SHARED[:] = [base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base]


def seed_database(home: Path) -> None:
    """Give a new ``PREFECT_HOME`` a database already at Prefect's schema.

    A server's first start on an empty home runs every migration: ~28 s of CPU on this 2-core
    VM against ~7 s from a migrated copy, for each of the suite's dozen servers. ``prefect
    server database upgrade`` runs them once per test run (under a lock, whichever worker
    comes first) and each home starts from a copy; a home with a database keeps it.
    """
    home.mkdir(parents=True, exist_ok=True)
    if (home / "prefect.db").exists():
        return
    folder = (_SHARED or [Path(os.environ.get("TMPDIR", "/tmp"))])[0] / "prefect-schema"
    folder.mkdir(exist_ok=True)
    with (folder / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "prefect.db").exists():
            env = {**subprocess_env(), "PREFECT_HOME": str(folder)}
            env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)
            proc = subprocess.run([sys.executable, "-m", "prefect", "server", "database",
                                   "upgrade", "-y"], env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"prefect server database upgrade: {proc.stderr[-3000:]}")
    shutil.copyfile(folder / "prefect.db", home / "prefect.db")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:  # noqa: S310
            return resp.status == 200
    except OSError:
        return False


def _drain_to_api() -> None:
    """Send the logs and events still buffered while the server is up (as Prefect's harness)."""
    import inspect

    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain() -> None:
        try:
            result = APILogWorker.instance().drain()
            if inspect.isawaitable(result):
                await result
        except RuntimeError:  # no worker was started
            pass
        result = EventsWorker.drain_all()
        if inspect.isawaitable(result):
            await result

    run_coro_as_sync(drain())


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a real Prefect API served by ``prefect server start`` for this session."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    isolated = {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    saved = {key: os.environ.get(key) for key in isolated}
    os.environ.update(isolated)  # for the flow-run and dvc subprocesses the tests start
    env = subprocess_env()
    seed_database(home)
    log = open(home / "server.log", "w")  # noqa: SIM115
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
         "--port", str(port), "--no-ui", "--analytics-off"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not _healthy(url):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("prefect server did not start:\n"
                                   + (home / "server.log").read_text()[-3000:])
            time.sleep(0.5)
        # prefect may have been imported already (its settings are read at import): override
        # them in-process too, also for its background workers, as Prefect's own harness does
        from prefect.context import _temporary_global_settings_context, get_settings_context
        from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: url, PREFECT_HOME: str(home)}), \
                _temporary_global_settings_context(get_settings_context()):
            yield url
            _drain_to_api()
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def py_stage(code: str) -> str:
    """A dvc.yaml ``cmd`` that runs ``code`` with this interpreter."""
    return f"{Path(sys.executable)} -c {_quote(code)}"


def _quote(code: str) -> str:
    return "'" + code.replace("'", "'\"'\"'") + "'"


def make_toy_repo(dest: Path, stages: dict, params: dict | None = None) -> Path:
    """A committed git + DVC repo whose dvc.yaml holds ``stages`` (tiny python -c commands)."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "params.yaml").write_text(yaml.safe_dump(params or {"a": {"n": 1}}))
    (dest / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    return init_and_commit(dest, "toy pipeline")


def add_stage(repo: Path, name: str, spec: dict) -> None:
    """Append a stage to ``repo/dvc.yaml``."""
    doc = yaml.safe_load((repo / "dvc.yaml").read_text())
    doc["stages"][name] = spec
    (repo / "dvc.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


def api_env() -> dict[str, str]:
    """Subprocess environment that reaches the test's Prefect API."""
    return subprocess_env()
