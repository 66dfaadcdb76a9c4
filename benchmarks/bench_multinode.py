"""What a second machine costs or buys: two nodes x one process against one process.

Both on this machine's cores, so the comparison is honest about what it measures: the same
training (the seed net, synthetic data) as one process (with one thread, and with every
core's threads), and as two torchrun nodes in network namespaces (tests/multihost.py: own
addresses on a test bridge, c10d rendezvous, gloo over the bridge), each with half the
threads. Images/s is the
training split's images x epochs over the stage's own training seconds (rank 0's, rendezvous
and start-up excluded); each setting runs ``--repeats`` times, alternating.

    sudo python benchmarks/bench_multinode.py [--repeats 3] [--out benchmarks/results/X.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median

PROJECT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(PROJECT), str(PROJECT / "tests"), str(PROJECT / "benchmarks")]

from machine import machine_record  # noqa: E402
from multihost import Host, Network  # noqa: E402
from train_data import write_processed, write_train_params  # noqa: E402

ARGS = ["-m", "stages.train", "--data", "proc", "--model", "models/model.pt",
        "--checkpoint", "models/checkpoint.pt", "--live", "dvclive/train"]
TRAIN = {"epochs": 2, "batch_size": 64, "log_every": 50, "lr": 0.002}
SECONDS = re.compile(r"trained \S+ for \S+ epochs in ([\d.]+) s")


def prepare(folder: Path, n_train: int, **train: object) -> Path:
    write_processed(folder / "proc", n_train=n_train, n_val=200)
    write_train_params(folder, **TRAIN, **train)
    return folder


def train_seconds(text: str) -> float:
    found = SECONDS.findall(text)
    if not found:
        raise SystemExit(f"no training time in the stage's output:\n{text[-2000:]}")
    return float(found[-1])


def one_process(folder: Path, threads: int) -> float:
    """One process with ``threads`` threads: its training seconds."""
    env = {**os.environ, "PYTHONPATH": str(PROJECT), "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, *ARGS], cwd=folder, env=env, capture_output=True,
                          text=True, check=False)
    return train_seconds(proc.stdout + proc.stderr)


def two_nodes(folder: Path, n_train: int, threads: int) -> float:
    """Two torchrun nodes in namespaces, ``threads`` each: rank 0's training seconds."""
    network = Network()
    hosts: list[Host] = []
    try:
        for index in (1, 2):
            host = Host(network, index, folder, api_url="")
            prepare(host.folder / "repo", n_train, nproc=2, threads=threads)
            hosts.append(host)
        procs = []
        for index, host in enumerate(hosts, start=1):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                   "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                   f"{hosts[0].address}:29400", "--rdzv-id", "bench", "--local-addr",
                   host.address, *ARGS]
            env = {"PYTHONPATH": str(PROJECT), "OMP_NUM_THREADS": str(threads),
                   "GLOO_SOCKET_IFNAME": f"cf{network.octet}p{index}"}
            procs.append(host.popen(cmd, host.folder / "run.log", env, host.folder / "repo"))
        for proc in procs:
            proc.wait(timeout=1800)
        return train_seconds("".join((h.folder / "run.log").read_text() for h in hosts))
    finally:
        for host in hosts:
            host.stop()
        network.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n-train", type=int, default=8000)
    ap.add_argument("--out", default="benchmarks/results/multinode_2nodes_cpu.json")
    args = ap.parse_args()
    if os.geteuid() != 0 or not shutil.which("ip"):
        sys.exit("needs root and `ip` (network namespaces on a test bridge)")
    cores = len(os.sched_getaffinity(0))
    images = args.n_train * TRAIN["epochs"]
    rounds = []
    with tempfile.TemporaryDirectory(prefix="convflow-bench-mn-") as tmp:
        for i in range(args.repeats):
            row = {}
            for threads in sorted({1, cores}):
                folder = prepare(Path(tmp) / f"single{i}-{threads}", args.n_train,
                                 threads=threads)
                row[f"one_process_{threads}t_img_s"] = round(
                    images / one_process(folder, threads), 1)
            double = two_nodes(Path(tmp) / f"nodes{i}", args.n_train, max(1, cores // 2))
            row["two_nodes_img_s"] = round(images / double, 1)
            row["ratio_vs_best_single"] = round(
                row["two_nodes_img_s"] / max(v for k, v in row.items() if k.startswith("one")), 3)
            rounds.append(row)
            print(row, flush=True)
    result = {"command": "sudo python benchmarks/bench_multinode.py " + " ".join(sys.argv[1:]),
              "machine": machine_record(), "train": TRAIN, "n_train": args.n_train,
              "rounds": rounds,
              "median_ratio": median(r["ratio_vs_best_single"] for r in rounds)}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"two nodes / best one process: median {result['median_ratio']:.2f}x -> {args.out}")


if __name__ == "__main__":
    main()
