"""Every failed, crashed or regressed run alerts once, naming the run, the step and why.

One ``python -m flows alerts --webhook`` automation on the session's real Prefect server and
a webhook receiver on 127.0.0.1 (the block allows private URLs); each failure kind is made
for real on a toy pipeline: a DVC remote that is a file (pull, push), a failing stage, a
gate verdict, an origin whose pre-receive hook declines (publish), a sweep point that
fails, and a run the server marks CRASHED. A webhook answering with an endless body gets
its alert, and the server hangs up on it (flows/alert_block.py bounds the answer).
"""

from __future__ import annotations

import json
import shutil
import stat
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import PROJECT, dvc, git, run
from prefect_fixtures import _drain_to_api, api_env, make_toy_repo, py_stage

pytestmark = pytest.mark.slow

#: Seconds an alert may take to arrive, and the quiet time that proves there is no second.
ARRIVE_S, QUIET_S = 60, 4
FAIL = ("import sys; sys.stderr.write('convflow.bad: error: the disk is full\\n'); "
        "sys.exit(2)")
OK = "open('out.txt', 'w').write('ok')"


class _Receiver(BaseHTTPRequestHandler):
    received: list[str] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        size = min(int(self.headers.get("Content-Length", 0)), 1 << 20)
        type(self).received.append(json.loads(self.rfile.read(size) or b"{}")["text"])
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


#: What the endless webhook sends at most before it gives up (256 MiB, 64 KiB at a time).
ENDLESS = 256 << 20


class _Endless(BaseHTTPRequestHandler):
    """Takes the alert, then answers ``status`` with an endless body (or, with ``drip``, one
    byte every 0.2 s); ``sent``: (bytes sent before the client hung up, seconds it took)."""
    status, drip = 200, False
    received: list[str] = []
    sent: list[tuple[int, float]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        size = min(int(self.headers.get("Content-Length", 0)), 1 << 20)
        type(self).received.append(json.loads(self.rfile.read(size) or b"{}")["text"])
        self.send_response(self.status)
        self.end_headers()  # no length: the body ends when the connection does
        chunk, sent, start = b"x" * (1 if self.drip else 65536), 0, time.monotonic()
        try:
            while sent < ENDLESS and time.monotonic() - start < ARRIVE_S:
                self.wfile.write(chunk)
                sent += len(chunk)
                time.sleep(0.2 if self.drip else 0)
        except OSError:  # the client hung up
            pass
        type(self).sent.append((sent, time.monotonic() - start))

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def endless() -> Any:
    """The URL of a webhook on 127.0.0.1 answering with an endless body: ``_Endless``."""
    _Endless.status, _Endless.drip = 200, False
    _Endless.received.clear()
    _Endless.sent.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Endless)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hook"
    server.shutdown()
    server.server_close()


def hung_up(deadline_s: float = ARRIVE_S) -> tuple[int, float]:
    """What the endless webhook sent before the client hung up, once it did."""
    deadline = time.monotonic() + deadline_s
    while not _Endless.sent and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _Endless.sent, "the endless webhook was never called, or never hung up on"
    return _Endless.sent[0]


@pytest.fixture(scope="module")
def alerts(prefect_api) -> Any:
    """The alerts automation, sending to a receiver here: the list of texts received."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/hook"
        proc = run([sys.executable, "-m", "flows", "alerts", "--webhook", url], cwd=PROJECT,
                   env=api_env())
        assert "automation 'convflow-alerts'" in proc.stdout
        time.sleep(2)  # the server's trigger service picks the automation up
        yield _Receiver.received
    finally:
        server.shutdown()
        server.server_close()


def alerts_for(received: list[str], run_name: str) -> list[str]:
    """The alerts naming ``run_name``, once one came and nothing more for QUIET_S."""
    _drain_to_api()
    deadline = time.monotonic() + ARRIVE_S
    while time.monotonic() < deadline and not [t for t in received if run_name in t]:
        time.sleep(0.5)
    time.sleep(QUIET_S)
    return [t for t in received if f"(run {run_name})" in t]


def run_name(state: Any) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(state.state_details.flow_run_id).name


def toy(tmp_path: Path, stages: dict, gate: dict | None = None) -> Path:
    repo = make_toy_repo(tmp_path / "toy", stages)
    if gate is not None:  # a gate stage writing this verdict, as stages/gate.py does
        write = (f"import json, os; os.makedirs('metrics', exist_ok=True); "
                 f"json.dump({gate!r}, open('metrics/gate.json', 'w'))")
        doc = yaml.safe_load((repo / "dvc.yaml").read_text())
        doc["stages"]["gate"] = {"cmd": py_stage(write),
                                 "metrics": [{"metrics/gate.json": {"cache": False}}]}
        (repo / "dvc.yaml").write_text(yaml.safe_dump(
            {"vars": [{"paths": {"metrics": "metrics"}}], **doc}, sort_keys=False))
        git(repo, "add", "-A")
        git(repo, "commit", "-qm", "gate")
    return repo


def broken_remote(repo: Path) -> None:
    """A DVC remote that is a file: every transfer fails (permanently: not retried)."""
    (repo.parent / "not-a-folder").write_text("x")
    dvc(repo, "remote", "add", "-d", "store", str(repo.parent / "not-a-folder"))
    git(repo, "commit", "-qam", "remote")


def declining_origin(repo: Path) -> None:
    origin = repo.parent / "origin.git"
    git(repo.parent, "clone", "-q", "--bare", str(repo), str(origin))
    hook = origin / "hooks" / "pre-receive"
    hook.write_text("#!/bin/sh\necho 'results are frozen' >&2\nexit 1\n")
    hook.chmod(hook.stat().st_mode | stat.S_IEXEC)
    git(repo, "remote", "add", "origin", origin.as_uri())


VERDICT = {"metric": "test.accuracy", "value": 0.8, "min_accuracy": 0.5, "max_drop": 0.02,
           "production_version": "cifar-cnn@v0.0.1", "production_accuracy": 0.81,
           "drop": 0.01, "passed": True, "reason": "ok"}


def make_case(kind: str, tmp_path: Path) -> tuple[Path, dict]:
    """A toy repo and the flow options that make a run fail (or regress) at ``kind``."""
    ok = {"good": {"cmd": py_stage(OK), "outs": ["out.txt"]}}
    if kind == "stage":
        return toy(tmp_path, {"bad": {"cmd": py_stage(FAIL), "outs": ["b.txt"]}}), {}
    if kind in ("pull", "push"):
        repo = toy(tmp_path, ok)
        broken_remote(repo)
        if kind == "pull":  # a lock naming an output this clone does not have
            dvc(repo, "repro")
            git(repo, "add", "-A")
            git(repo, "commit", "-qm", "lock")
            shutil.rmtree(repo / ".dvc" / "cache")
        return repo, {kind: True}
    if kind == "gate":
        failed = {**VERDICT, "passed": False, "value": 0.4, "drop": 0.41,
                  "reason": "test.accuracy 0.4000 is below gate.min_accuracy 0.5000"}
        return toy(tmp_path, ok, failed), {"commit": True}
    if kind == "regression":
        return toy(tmp_path, ok, VERDICT), {}
    repo = toy(tmp_path, ok)  # publish
    declining_origin(repo)
    return repo, {"commit": True, "branch": "results/nightly"}


EXPECTED = {
    "pull": "step 'dvc pull' failed",
    "stage": "stage 'bad' failed: convflow.bad: error: the disk is full",
    "gate": "stage 'gate' failed: quality gate failed: test.accuracy 0.4000 is below",
    "push": "step 'dvc push' failed",
    "publish": "pre-receive hook declined",
    "regression": "test.accuracy 0.8 is below production cifar-cnn@v0.0.1",
}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_each_failure_kind_alerts_once_naming_the_run_and_step(alerts, tmp_path, kind):
    from flows.pipeline import pipeline

    repo, options = make_case(kind, tmp_path)
    state = pipeline(root=str(repo), retries=0, return_state=True, **options)
    assert state.is_completed() == (kind == "regression"), state.message
    name = run_name(state)
    texts = alerts_for(alerts, name)
    assert len(texts) == 1, texts
    assert "flow: convflow-pipeline" in texts[0] and EXPECTED[kind] in texts[0], texts[0]
    first = texts[0].splitlines()[0]
    assert first == ("convflow alert: convflow.model.regression" if kind == "regression"
                     else "convflow alert: prefect.flow-run.Failed"), texts[0]


def test_a_failed_sweep_alerts_once(alerts, tmp_path):
    from flows.sweep import sweep

    fail_big = ("import sys, yaml; n = yaml.safe_load(open('params.yaml'))['a']['n']; "
                "sys.exit(f'convflow.s: error: n={n} is too big' if n > 1 else 0); "
                "open('s.txt', 'w').write('ok')")
    repo = toy(tmp_path, {"s": {"cmd": py_stage(fail_big), "params": ["a.n"],
                                "outs": ["s.txt"]}})
    state = sweep({"a.n": [2]}, root=str(repo), max_parallel=1, name_prefix="bad",
                  return_state=True)
    assert state.is_failed()
    texts = alerts_for(alerts, run_name(state))
    assert len(texts) == 1 and "flow: convflow-sweep" in texts[0], texts
    assert "experiment 'bad-1' failed" in texts[0], texts[0]


def crash_a_run() -> str:
    """What flows/crash.py's automation does to a run whose heartbeats stopped: its name."""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed, Running

    from flows.pipeline import pipeline

    with get_client(sync_client=True) as client:
        flow_run = client.create_flow_run(pipeline, parameters={})
        client.set_flow_run_state(flow_run.id, Running(), force=True)
        client.set_flow_run_state(flow_run.id, Crashed(
            message="no heartbeat: the flow process or its server went away"), force=True)
    return flow_run.name


def test_a_crashed_run_alerts_once(alerts):
    name = crash_a_run()
    texts = alerts_for(alerts, name)
    assert len(texts) == 1, texts
    assert texts[0].splitlines()[0] == "convflow alert: prefect.flow-run.Crashed"
    assert "no heartbeat" in texts[0]


@pytest.mark.parametrize("args, words", [
    (["--webhook", "file:///etc/passwd"], "expected an http:// or https:// URL"),
    (["--webhook", "gopher://127.0.0.1:70/x"], "expected an http:// or https:// URL"),
    (["--webhook", "not a url"], "expected an http:// or https:// URL"),
    (["--webhook", "http://" + "x" * 100_000], "expected an http:// or https://"),
    (["--block", "no-such-type/nothing"], "no such notification block"),
])
def test_alerts_refuses_a_bad_target_in_one_line(prefect_api, args, words):
    proc = run([sys.executable, "-m", "flows", "alerts", *args], cwd=PROJECT, env=api_env(),
               check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith("convflow.flow: error: "), proc.stderr
    assert words in lines[0] and len(lines[0]) < 400


@pytest.mark.parametrize("status", [200, 500])
def test_the_webhook_block_reads_at_most_64_kib_of_an_endless_answer(endless, status):
    """The whole answer is never read: memory stays small, the call ends at once."""
    import tracemalloc

    from flows.alert_block import RESPONSE_CAP, ConvflowWebhook, WebhookFailed

    _Endless.status = status
    block = ConvflowWebhook(name="t", url=endless, json_data={"text": "{{body}}"},
                            allow_private_urls=True, timeout=10)
    tracemalloc.start()
    start = time.monotonic()
    try:
        block.notify("convflow alert: endless")
    except WebhookFailed as exc:
        assert status == 500 and str(exc).startswith("the webhook answered HTTP 500: xxx"), exc
        assert len(str(exc)) < 300 and "\n" not in str(exc)
    else:
        assert status == 200
    seconds = time.monotonic() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    sent, _ = hung_up(5)
    assert _Endless.received == ["convflow alert: endless"]
    assert seconds < 3 and peak < 16 * RESPONSE_CAP + (4 << 20), (seconds, peak)
    assert sent < ENDLESS // 8, sent  # what the kernel's socket buffers hold, not the body


def test_the_webhook_block_gives_up_on_a_slow_answer_after_its_timeout(endless):
    from flows.alert_block import ConvflowWebhook, WebhookFailed

    _Endless.drip = True
    block = ConvflowWebhook(name="t", url=endless, json_data={"text": "{{body}}"},
                            allow_private_urls=True, timeout=2)
    start = time.monotonic()
    with pytest.raises(WebhookFailed, match="took over 2 s in all"):
        block.notify("convflow alert: slow")
    assert time.monotonic() - start < 4
    assert hung_up(5)[1] < 4 and _Endless.received == ["convflow alert: slow"]


def test_the_server_alerts_an_endless_webhook_and_hangs_up(prefect_api, endless):
    """Through the real server, which imports the block from convflow's entry point."""
    from flows.alerts import setup_automation

    automation = setup_automation(webhook=endless, name="convflow-alerts-endless")
    try:
        time.sleep(2)  # the server's trigger service picks the automation up
        name = crash_a_run()
        _drain_to_api()
        sent, seconds = hung_up()
        assert [t for t in _Endless.received if f"(run {name})" in t], _Endless.received
        assert sent < ENDLESS // 8 and seconds < 5, (sent, seconds)
    finally:
        automation.delete()


def test_prefect_cloud_gets_prefects_own_webhook_block():
    """Prefect Cloud cannot import convflow's block; a server of ours can."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.alert_block import ConvflowWebhook
    from flows.alerts import webhook_class

    cloud = "https://api.prefect.cloud/api/accounts/a/workspaces/w"
    with temporary_settings(updates={PREFECT_API_URL: cloud}):
        assert webhook_class() is CustomWebhookNotificationBlock
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        assert webhook_class() is ConvflowWebhook
