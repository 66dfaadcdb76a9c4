"""A team's machines on one box: worker "hosts" in network namespaces on a test bridge.

``cluster`` (a module fixture) stands up what docs/team.md asks of a team, as real processes:

- a Linux bridge on a private /24 of its own (``10.203.X.0/24``, X the first free one; the
  bridge's name claims it), the box's side at ``.1``;
- one Prefect server (``prefect server start``) and one SeaweedFS S3 store, both bound to
  the bridge address only, and this process (the laptop) pointed at that server;
- hosts: each a network namespace with its own address (``.11``, ``.12``, ...) on a veth
  pair into the bridge, and its own hostname (a UTS namespace: ``socket.gethostname()``
  tells the hosts apart), reaching the server and the store only through the bridge;
- ``Host.start_worker``: ``prefect worker start --pool P --limit 2`` inside the host, in
  its own folder, with a declared inventory of two devices (``DEVICE_ENV``).

The git origin is a bare repository reached through a ``file://`` URL (namespaces share the
file system; git shallow-clones ``file://`` as it does ``https://``). Everything (workers
and their runs, servers, namespaces, veths, bridge) is removed at the end, failed test or
not. Skips where not root or ``ip``/``unshare`` are missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from conftest import subprocess_env
from prefect_fixtures import seed_database
from team_fixtures import (
    ACCESS_KEY,
    SECRET_KEY,
    WORKER_POLL,
    SeaweedFS,
    free_ports,
    stop_group,
)

#: First two octets of the test subnets; the third is claimed per cluster.
SUBNET = "10.203"
#: How a host declares its device inventory (flows/slots.py: instead of what torch sees).
DEVICE_ENV = {"CONVFLOW_DEVICES": "0,1"}
SERVER_START_TIMEOUT_S = 90


def require_netns() -> None:
    """Skip unless this process may make namespaces and bridges (root, ``ip``, ``unshare``)."""
    if os.geteuid() != 0:
        pytest.skip("multi-host tests need root (ip netns, a bridge)")
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            pytest.skip(f"multi-host tests need `{tool}`")


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run an ``ip`` command; on failure with ``check`` raise with its message."""
    proc = subprocess.run(list(cmd), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip()}")
    return proc


class Network:
    """A bridge on its own /24 plus the namespaces plugged into it; ``close`` removes all."""

    def __init__(self) -> None:
        self.octet = self._claim()
        self.bridge = f"cfbr{self.octet}"
        self.host_ip = f"{SUBNET}.{self.octet}.1"
        self.namespaces: list[str] = []
        self.veths: list[str] = []
        try:
            sh("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.bridge)
            sh("ip", "link", "set", self.bridge, "up")
        except RuntimeError:
            self.close()
            raise

    @staticmethod
    def _claim() -> int:
        """The first /24 free here: creating the bridge named after it is the atomic claim."""
        used = sh("ip", "-o", "addr").stdout
        start = os.getpid() % 200
        for step in range(250):
            octet = 1 + (start + step) % 250
            if f" {SUBNET}.{octet}." in used:
                continue
            if sh("ip", "link", "add", f"cfbr{octet}", "type", "bridge",
                  check=False).returncode == 0:
                return octet
        raise RuntimeError(f"no free {SUBNET}.X.0/24 for a test bridge")

    def add_namespace(self, index: int) -> tuple[str, str]:
        """A namespace with address ``.1<index>`` on the bridge; (its name, its address)."""
        ns, outside, inside = (f"convflow-{self.octet}-h{index}", f"cf{self.octet}v{index}",
                               f"cf{self.octet}p{index}")
        address = f"{SUBNET}.{self.octet}.{10 + index}"
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        sh("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
        self.veths.append(outside)
        sh("ip", "link", "set", outside, "master", self.bridge)
        sh("ip", "link", "set", outside, "up")
        sh("ip", "link", "set", inside, "netns", ns)
        sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", inside)
        sh("ip", "-n", ns, "link", "set", inside, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        return ns, address

    def close(self) -> None:
        """Delete the namespaces (their veth ends go with them) and the bridge."""
        for ns in self.namespaces:
            sh("ip", "netns", "del", ns, check=False)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        for veth in self.veths:  # gone with its peer's namespace unless it never got there
            sh("ip", "link", "del", veth, check=False)
        sh("ip", "link", "del", self.bridge, check=False)


class Host:
    """A worker machine: a namespace with its own address, hostname and folder."""

    def __init__(self, network: Network, index: int, folder: Path, api_url: str) -> None:
        self.name = f"host-{index}"
        self.ns, self.address = network.add_namespace(index)
        # a machine resolves its own name (torchrun and gloo do): the namespace's /etc/hosts,
        # which `ip netns exec` mounts from /etc/netns/<ns>/ (removed with the namespace)
        etc = Path("/etc/netns") / self.ns
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text(f"127.0.0.1 localhost\n{self.address} {self.name}\n")
        self.folder = folder / self.name
        self.folder.mkdir(parents=True, exist_ok=True)
        self.api_url = api_url
        self.procs: list[subprocess.Popen] = []
        self.worker: subprocess.Popen | None = None
        self.log = self.folder / "worker.log"

    def command(self, cmd: list[str]) -> list[str]:
        """``cmd`` as run on this host: in its namespace, under its own hostname."""
        return ["ip", "netns", "exec", self.ns, "unshare", "--uts", "--", "sh", "-c",
                'hostname "$0" && exec "$@"', self.name, *cmd]

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The host's environment: the team's server, the store's keys, its devices."""
        env = subprocess_env()
        env.update(PREFECT_API_URL=self.api_url, AWS_ACCESS_KEY_ID=ACCESS_KEY,
                   AWS_SECRET_ACCESS_KEY=SECRET_KEY, TMPDIR=str(self.folder),
                   PREFECT_HOME=str(self.folder / ".prefect"), **DEVICE_ENV)
        env.update(extra or {})
        return env

    def popen(self, cmd: list[str], log: Path, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen:
        """Start ``cmd`` on this host (its own process group), output to ``log``."""
        with log.open("a") as out:
            proc = subprocess.Popen(self.command(cmd), cwd=cwd or self.folder,
                                    env=self.env(env), stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def start_worker(self, pool: str, limit: int = 2, env: dict[str, str] | None = None,
                     ) -> subprocess.Popen:
        """``prefect worker start --pool <pool> --limit <limit>`` on this host."""
        quick = {**WORKER_POLL, "PREFECT_LOGGING_LEVEL": "INFO"}
        self.worker = self.popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type",
             "process", "--limit", str(limit), "--name", f"{self.name}-worker"],
            self.log, {**quick, **(env or {})})
        return self.worker

    def kill_worker(self) -> None:
        """The machine dies: SIGKILL the worker and every run it started."""
        if self.worker is not None:
            stop_group(self.worker, signal.SIGKILL, wait_s=5)

    def stop(self) -> None:
        """End every process started on this host (each one's whole tree)."""
        for proc in reversed(self.procs):
            stop_group(proc, signal.SIGTERM, wait_s=10)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:  # noqa: S310
            return resp.status == 200
    except OSError:
        return False


class PrefectServer:
    """``prefect server start`` bound to ``ip``, with its own PREFECT_HOME."""

    def __init__(self, ip: str, folder: Path) -> None:
        self.home = folder / "prefect-server"
        seed_database(self.home)
        (self.port,) = free_ports(1)
        self.url = f"http://{ip}:{self.port}/api"
        env = subprocess_env()
        env.update(PREFECT_HOME=str(self.home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   DO_NOT_TRACK="1", PREFECT_SERVER_UI_ENABLED="false",
                   PREFECT_LOGGING_LEVEL="WARNING")
        self.log = self.home / "server.log"
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", ip, "--port",
                 str(self.port), "--no-ui", "--analytics-off"],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not _healthy(self.url):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("prefect server did not start:\n"
                                   + self.log.read_text()[-3000:])
            time.sleep(0.5)

    def stop(self) -> None:
        stop_group(self.proc, signal.SIGTERM, wait_s=20)


class BridgeSeaweedFS(SeaweedFS):
    """team_fixtures' SeaweedFS, bound to the bridge address instead of loopback."""

    def __init__(self, folder: Path, ip: str) -> None:
        super().__init__(folder)
        self.ip = ip
        self.endpoint = f"http://{ip}:{self.ports['s3']}"

    def command(self) -> list[str]:
        return [f"-ip={self.ip}" if a == "-ip=127.0.0.1" else
                f"-ip.bind={self.ip}" if a == "-ip.bind=127.0.0.1" else a
                for a in super().command()]


class Cluster:
    """The running pieces: ``network``, ``server``, ``store``, ``hosts``, ``folder``."""

    def __init__(self, folder: Path, n_hosts: int, stack: ExitStack) -> None:
        self.folder = folder
        self.network = Network()
        stack.callback(self.network.close)
        self.server = PrefectServer(self.network.host_ip, folder)
        stack.callback(self.server.stop)
        self.store = BridgeSeaweedFS(folder / "seaweedfs", self.network.host_ip)
        self.store.start()
        stack.callback(self.store.stop)
        self.hosts: list[Host] = []
        for index in range(1, n_hosts + 1):
            host = Host(self.network, index, folder, self.server.url)
            stack.callback(host.stop)  # runs before the network goes
            self.hosts.append(host)

    def host_of(self, hostname: str) -> Host:
        """The host whose hostname is ``hostname``."""
        return next(h for h in self.hosts if h.name == hostname)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Two worker hosts, one Prefect server and one S3 store on a test bridge (see above)."""
    require_netns()
    with ExitStack() as stack:
        team = Cluster(tmp_path_factory.mktemp("cluster"), 2, stack)
        with pytest.MonkeyPatch.context() as env:  # the laptop: this process
            env.setenv("PREFECT_API_URL", team.server.url)
            env.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            env.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            from prefect.settings import PREFECT_API_URL, temporary_settings

            with temporary_settings(updates={PREFECT_API_URL: team.server.url}):
                yield team
