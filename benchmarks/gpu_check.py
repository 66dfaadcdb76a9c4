"""One GPU check, from a fresh checkout, in under 8 minutes; one JSON under benchmarks/results.

    python benchmarks/gpu_check.py                       # on the GPU machine
    python benchmarks/gpu_check.py --data /path/cifar-10-python.tar.gz
    python benchmarks/gpu_check.py --dry-run             # any machine: CPU steps, tiny sizes

Steps (each recorded with its status, numbers and, when skipped, the reason):

1. ``install``: ``pip install -e ".[dev]"`` (skipped with ``--no-install`` or ``--dry-run``).
2. ``gpu_tests``: ``pytest -m gpu`` (every CUDA path: autocast, channels-last, compile,
   cuDNN settings, ``train.device: cuda`` errors, a CUDA-trained model on the CPU, NCCL DDP
   when two GPUs exist); passed / failed / skipped counts.
3. ``seed_net_epoch``: the seed net on 50,000 CIFAR-sized images at batch 2048 (bf16,
   channels-last, ``torch.compile``), 6 epochs; the steady state is the median of epochs
   2-6 (epoch 1 compiles). Target: <= 0.1 s per epoch.
4. ``airbench94``: the preset through the pipeline's own stages (ingest, normalize with no
   validation split, the train stage's process, evaluate) for 5 seeds on real CIFAR-10;
   test accuracy with flip + translate TTA and the training seconds (sum of the epochs,
   whitening init and evaluation excluded, as airbench counts). Targets: mean >= 94.0 %,
   <= 5 s each. Uncompiled, as airbench94.py's 3.83 s A100 figure is.

``--dry-run`` runs steps 2-4 on the CPU at tiny sizes (synthetic data, 1 seed, a fraction
of an epoch) to prove the script works; its numbers say nothing about a GPU, and the JSON
says so.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED_JPEG = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
TARGETS = {"seed_net_epoch_s": 0.1, "airbench94_mean_acc": 0.94, "airbench94_train_s": 5.0}


def step_install(args: argparse.Namespace) -> dict[str, Any]:
    """pip install the project with its dev extras into the running interpreter."""
    if args.dry_run or args.no_install:
        return {"status": "skipped", "reason": "--dry-run / --no-install: environment as is"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", ".[dev]"],
                          cwd=ROOT, capture_output=True, text=True)
    return {"status": "ok" if proc.returncode == 0 else "failed",
            "seconds": round(time.perf_counter() - t0, 1), "tail": proc.stderr[-2000:]}


def step_gpu_tests(args: argparse.Namespace) -> dict[str, Any]:
    """``pytest -m gpu``: counts of passed, failed and skipped tests, and the skip reasons."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs",
                           "-p", "no:cacheprovider", "tests/test_gpu.py"],
                          cwd=ROOT, capture_output=True, text=True)
    out = proc.stdout
    counts = {k: 0 for k in ("passed", "failed", "skipped", "error")}
    for line in out.splitlines()[-3:]:
        for part in line.replace("=", " ").split(","):
            words = part.split()
            if len(words) >= 2 and words[0].isdigit() and words[1].rstrip("s") in counts:
                counts[words[1].rstrip("s")] = int(words[0])
    skips = sorted({line.split(": ", 1)[-1] for line in out.splitlines()
                    if line.startswith("SKIPPED")})
    status = "ok" if proc.returncode == 0 else "failed"
    if counts["passed"] == 0 and counts["failed"] == 0:
        status = "skipped"
    return {"status": status, **counts, "skip_reasons": skips,
            "seconds": round(time.perf_counter() - t0, 1), "tail": out[-3000:]}


def _synthetic(n: int) -> tuple[Any, Any]:
    import numpy as np

    from stages.sources.synthetic import generate

    x, y = generate(n, 0, "train")
    return np.ascontiguousarray(x), y  # the raw contract: uint8 N x 3 x H x W


def step_seed_net_epoch(args: argparse.Namespace, device: Any) -> dict[str, Any]:
    """Seconds per 50,000-image seed-net epoch in steady state (median of epochs 2..)."""
    from stages.loop import Dataset, fit
    from stages.params import TrainParams

    n, epochs = (2048, 2) if args.dry_run else (50_000, 6)
    x, y = _synthetic(n)
    data = Dataset(x, y, x[:0], y[:0], [str(i) for i in range(10)], [0.47] * 3, [0.25] * 3)
    gpu = device.type == "cuda"
    p = TrainParams(model="seed_net", batch_size=2048 if gpu else 512, epochs=epochs,
                    lr=0.01, precision="bf16" if gpu else "auto", channels_last="on",
                    compile="on" if gpu else "off", log_every=1000, device=device.type)
    result = fit(p, data, device)
    times = result.epoch_seconds
    steady = statistics.median(times[1:]) if len(times) > 1 else times[0]
    return {"status": "ok", "images": n, "epoch_seconds": [round(t, 4) for t in times],
            "steady_epoch_s": round(steady, 4),
            "steady_epoch_s_per_50k": round(steady * 50_000 / n, 4),
            "target_s": TARGETS["seed_net_epoch_s"],
            # None: not a GPU run, so the target is not judged
            "met": steady * 50_000 / n <= TARGETS["seed_net_epoch_s"] if gpu else None}


def _write_params(folder: Path, params: dict[str, Any]) -> None:
    import yaml

    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def step_airbench94(args: argparse.Namespace, device: Any) -> dict[str, Any]:
    """The airbench94 preset through ingest, normalize, train and evaluate, over seeds."""
    from stages import evaluate, ingest, normalize
    from stages.params import load_params
    from stages.recipe import RECIPES
    from stages.train import train_process

    if args.dry_run:
        data = {"source": "synthetic", "synthetic": {"n_train": 512, "n_test": 256}}
        seeds, extra = [0], {"epochs": 0.5, "batch_size": 256}
    elif args.data and Path(args.data).is_file():
        source = "imagefolder" if "jpeg" in Path(args.data).name else "cifar10"
        data, seeds, extra = {"source": source, "path": str(args.data)}, range(5), {}
    else:
        data, seeds, extra = {"source": "cifar10"}, range(5), {}  # downloads the archive
    runs = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        cwd = os.getcwd()
        os.chdir(work)
        try:
            base = {"data": data, "normalize": {"val_fraction": 0.0},
                    "evaluate": {"batch_size": 2000}}
            _write_params(work, base)
            ingest.main(["--out", "raw"])
            normalize.main(["--raw", "raw", "--out", "proc"])
            for seed in seeds:
                train = {**RECIPES["airbench94"], "compile": "off", "seed": seed,
                         "device": device.type, "log_every": 1000, **extra}
                _write_params(work, {**base, "train": train})
                p = load_params().train
                result = train_process("proc", "model.pt", f"ckpt{seed}.pt", f"live{seed}", p,
                                       str(device))
                evaluate.main(["--data", "proc", "--model", "model.pt", "--metrics",
                               f"metrics{seed}", "--out", f"eval{seed}"])
                test = json.loads((work / f"metrics{seed}/evaluate.json").read_text())["test"]
                runs.append({"seed": seed, "train_s": round(sum(result.epoch_seconds), 3),
                             "epoch_seconds": [round(t, 3) for t in result.epoch_seconds],
                             "test_acc": test["accuracy"], "test_acc_tta": test["accuracy_tta"]})
                logging.getLogger("convflow.gpu_check").info("airbench94 seed %d: %s", seed,
                                                             runs[-1])
        finally:
            os.chdir(cwd)
    accs = [r["test_acc_tta"] for r in runs]
    secs = [r["train_s"] for r in runs]
    mean = statistics.mean(accs)
    gpu = device.type == "cuda"
    return {"status": "ok", "data": data, "runs": runs, "mean_test_acc_tta": round(mean, 4),
            "std_test_acc_tta": round(statistics.stdev(accs), 4) if len(accs) > 1 else None,
            "mean_train_s": round(statistics.mean(secs), 3),
            "targets": {"mean_acc": TARGETS["airbench94_mean_acc"],
                        "train_s": TARGETS["airbench94_train_s"]},
            "met": (mean >= TARGETS["airbench94_mean_acc"]
                    and max(secs) <= TARGETS["airbench94_train_s"]) if gpu else None}


def main() -> None:
    """Run the steps, write the JSON, print where it went."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes; proves the script")
    ap.add_argument("--no-install", action="store_true", help="skip pip install")
    ap.add_argument("--data", type=Path, default=SHARED_JPEG if SHARED_JPEG.is_file() else None,
                    help="CIFAR-10: the official archive or the JPEG tar.gz (default: "
                         "../shared/data/cifar10-jpeg.tar.gz if present, else download)")
    ap.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/gpu_check-"
                                             "<host>-<time>.json)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    results: dict[str, Any] = {"dry_run": args.dry_run, "started": time.strftime(
        "%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": platform.node(), "steps": {}}
    t0 = time.perf_counter()
    results["steps"]["install"] = step_install(args)

    import torch

    from stages.errors import setup_logging

    setup_logging()
    cuda = torch.cuda.is_available()
    results["torch"] = torch.__version__
    results["device"] = torch.cuda.get_device_name(0) if cuda else "cpu"
    results["gpus"] = torch.cuda.device_count()
    results["steps"]["gpu_tests"] = step_gpu_tests(args)
    if cuda or args.dry_run:
        device = torch.device("cuda" if cuda else "cpu")
        torch.set_num_threads(max(1, torch.get_num_threads()))
        results["steps"]["seed_net_epoch"] = step_seed_net_epoch(args, device)
        results["steps"]["airbench94"] = step_airbench94(args, device)
    else:
        reason = "no CUDA device (run with --dry-run to exercise the steps on the CPU)"
        for name in ("seed_net_epoch", "airbench94"):
            results["steps"][name] = {"status": "skipped", "reason": reason}
    if args.dry_run:
        results["note"] = "dry run on the CPU at tiny sizes: no number here is a GPU result"
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    out = args.out or ROOT / "benchmarks" / "results" / (
        f"gpu_check-{'dry-run-' if args.dry_run else ''}{platform.node()}-"
        f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk not in ("tail", "runs")}
                      for k, v in results["steps"].items()}, indent=1))
    print(f"wrote {out} in {results['wall_s']} s")


if __name__ == "__main__":
    main()
