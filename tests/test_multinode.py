"""Multi-node training through torchrun: two "machines" (network namespaces on a test bridge).

Each node is a host of ``tests/multihost.py``: its own namespace, address and folder (its own
copy of the processed data, as a machine that pulled it would have), joined through
torchrun's c10d rendezvous on the first node's address over the bridge, gloo on the CPU.
The reference is the same params on one machine: ``train.nproc: 2`` spawned by the stage.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PROJECT, subprocess_env
from multihost import Host, Network, require_netns
from team_fixtures import descendants
from test_train_resume import ARGS, outputs
from train_data import write_processed, write_train_params

from stages.ddp import SEPARATE_STORE

#: Small enough for two cores; four epochs leave room to kill a node mid-run.
TRAIN = {"epochs": 4, "batch_size": 16, "log_every": 5, "lr": 0.002, "nproc": 2,
         "threads": 1}
N_TRAIN = 800
RDZV_PORT = 29400
#: Restarts each node's agent allows. A node's death can cost every node one: its peers'
#: processes fail in their next collective, and each agent counts its own failures.
RESTARTS = 3


def prepare(folder: Path) -> Path:
    """A machine's checkout: the processed splits and params.yaml with ``TRAIN``."""
    write_processed(folder / "proc", n_train=N_TRAIN, n_val=100)
    write_train_params(folder, **TRAIN)
    return folder


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The one-machine run: ``train.nproc: 2`` spawned by the stage itself."""
    folder = prepare(tmp_path_factory.mktemp("whole"))
    proc = subprocess.run([sys.executable, "-m", "stages.train", *ARGS], cwd=folder,
                          env={**subprocess_env(), "PYTHONPATH": str(PROJECT)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return outputs(folder)


@pytest.fixture()
def nodes(tmp_path: Path) -> Iterator[list[Host]]:
    """Two machines on a bridge, each with its checkout; removed afterwards."""
    require_netns()
    network = Network()
    hosts: list[Host] = []
    try:
        for index in (1, 2):
            host = Host(network, index, tmp_path, api_url="")
            hosts.append(host)
            host.veth = f"cf{network.octet}p{index}"  # type: ignore[attr-defined]
            prepare(host.folder / "repo")
        yield hosts
    finally:
        for host in hosts:
            host.stop()
        network.close()


def torchrun(host: Host, leader: Host, restarts: int, log: Path) -> subprocess.Popen:
    """The documented launch on one machine: torchrun, c10d rendezvous at the leader."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
           "--nproc-per-node", "1", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"{leader.address}:{RDZV_PORT}", "--rdzv-id", "convflow-test",
           "--local-addr", host.address, "--max-restarts", str(restarts),
           "-m", "stages.train", *ARGS]
    env = {"PYTHONPATH": str(PROJECT), "OMP_NUM_THREADS": "1", SEPARATE_STORE: "1",
           "GLOO_SOCKET_IFNAME": host.veth}  # type: ignore[attr-defined]
    return host.popen(cmd, log, env=env, cwd=host.folder / "repo")


def trainer(launcher: subprocess.Popen) -> int | None:
    """The training process torchrun started (its child running ``stages.train``)."""
    for pid in descendants(launcher.pid):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"stages.train" in args and b"torch.distributed.run" not in args:
            return pid
    return None


def finish(launchers: list[subprocess.Popen], logs: list[Path]) -> None:
    for proc, log in zip(launchers, logs, strict=True):
        try:
            assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
        except subprocess.TimeoutExpired:  # hung: what each machine said last
            raise AssertionError("torchrun still running after 300 s\n" + "\n".join(
                f"--- {other}\n{other.read_text()[-2500:]}" for other in logs)) from None


def written(hosts: list[Host]) -> Path:
    """The checkout where rank 0 wrote the model: exactly one machine has it."""
    have = [h.folder / "repo" for h in hosts if (h.folder / "repo/models/model.pt").exists()]
    assert len(have) == 1, f"model.pt on {len(have)} machines"
    return have[0]


@pytest.mark.slow
def test_two_nodes_through_torchrun_equal_one_machine_bit_for_bit(
        nodes: list[Host], whole: dict[str, bytes]) -> None:
    logs = [h.folder / "torchrun.log" for h in nodes]
    launchers = [torchrun(h, nodes[0], 0, log) for h, log in zip(nodes, logs, strict=True)]
    finish(launchers, logs)
    rank0 = written(nodes)
    assert outputs(rank0) == whole
    other = next(h.folder / "repo" for h in nodes if h.folder / "repo" != rank0)
    assert not (other / "dvclive/train/metrics.json").exists()  # rank 0 alone writes


@pytest.mark.slow
def test_a_node_killed_mid_epoch_restarts_from_the_checkpoint_to_the_same_model(
        nodes: list[Host], whole: dict[str, bytes]) -> None:
    logs = [h.folder / "torchrun.log" for h in nodes]
    launchers = [torchrun(h, nodes[0], RESTARTS, log) for h, log in zip(nodes, logs, strict=True)]
    checkpoint = nodes[0].folder / "repo/models/checkpoint.pt"
    deadline = time.monotonic() + 180
    while not checkpoint.exists() and time.monotonic() < deadline:
        assert all(p.poll() is None for p in launchers), logs[0].read_text()[-3000:]
        time.sleep(0.005)
    victim = trainer(launchers[1])
    assert victim is not None and checkpoint.exists(), "no trainer to kill after epoch 1"
    os.kill(victim, signal.SIGKILL)  # the second machine's training dies mid-epoch 2
    finish(launchers, logs)
    text = "".join(log.read_text() for log in logs)
    assert "resuming after epoch" in text, text[-3000:]
    assert "process 0 of 2" in text and SEPARATE_STORE not in text  # launched as documented
    assert outputs(written(nodes)) == whole

