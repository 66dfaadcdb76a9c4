"""The Prefect flow's overhead over plain ``dvc repro`` on an up-to-date pipeline.

Against an already running Prefect server (``PREFECT_API_URL`` must point at it), on the
same checkout, in the same run, alternating the two so machine noise hits both:

    prefect server start &                      # once, elsewhere
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python benchmarks/bench_flow.py             # builds a tiny pipeline checkout, reproduces it
    python benchmarks/bench_flow.py --repo PATH # or time an existing, up-to-date checkout

It prints the median wall seconds of
  - ``dvc repro``                  (subprocess, as a user types it)
  - the flow called in-process     (``pipeline(root)``: what a served deployment runs)
  - ``python -m flows run``        (subprocess, as a user types it; includes importing Prefect)
and the differences (targets: the flow in-process at most +1 s over ``dvc repro``, the
command at most +2.5 s), and writes them with every timing and the machine to
``benchmarks/results/flow_overhead.json`` (``--json`` names another file).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

PROJECT = Path(__file__).resolve().parents[1]
RESULT = PROJECT / "benchmarks" / "results" / "flow_overhead.json"
TINY = {"data": {"synthetic": {"n_train": 400, "n_test": 200}},
        "train": {"epochs": 1, "batch_size": 64, "threads": 1},
        "plot": {"dpi": 50}}


def _env() -> dict[str, str]:
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PYTHONUNBUFFERED="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def make_checkout(dest: Path) -> Path:
    """A tiny git + DVC copy of this pipeline, reproduced once so it is up to date."""
    for name in ("stages", "flows"):
        shutil.copytree(PROJECT / name, dest / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "production.yaml", ".gitignore", ".dvcignore"):
        if (PROJECT / name).exists():
            shutil.copy2(PROJECT / name, dest / name)
    params = _merge(yaml.safe_load((PROJECT / "params.yaml").read_text()), TINY)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit = ["git", "-c", "user.name=bench", "-c", "user.email=bench@invalid",
              "commit", "-q", "-m", "bench"]
    # dvclive wants a commit to measure against, so commit before and after reproducing
    for cmd in (["git", "init", "-q", "-b", "main"],
                [sys.executable, "-m", "dvc", "init", "-q"],
                ["git", "add", "-A"], commit,
                [sys.executable, "-m", "dvc", "repro", "-q"],
                ["git", "add", "-A"], commit):
        proc = subprocess.run(cmd, cwd=dest, env=_env(), capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return dest


def timed(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return seconds


def main() -> None:
    """Time ``dvc repro`` and the flow on the same up-to-date checkout; print both."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, help="an up-to-date checkout (default: build one)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=RESULT, help="where to write the results")
    args = parser.parse_args()

    api = os.environ.get("PREFECT_API_URL")
    if not api:
        raise SystemExit("set PREFECT_API_URL to a running server (prefect server start)")
    try:
        with urllib.request.urlopen(f"{api}/health", timeout=5):  # noqa: S310
            pass
    except OSError as exc:
        raise SystemExit(f"no Prefect server answers at {api}: {exc}") from None

    sys.path.insert(0, str(PROJECT))
    from flows.pipeline import pipeline  # noqa: E402 (after the server check)

    with tempfile.TemporaryDirectory(prefix="bench-flow-") as tmp:
        repo = args.repo.resolve() if args.repo else make_checkout(Path(tmp) / "repo")
        statuses = {r["status"] for r in pipeline(root=str(repo))}  # warm-up + check
        if statuses != {"up to date"}:
            raise SystemExit(f"{repo} is not up to date ({statuses}): run dvc repro first")
        timed([sys.executable, "-m", "dvc", "repro"], repo)  # warm the OS caches
        repro, inproc, cli = [], [], []
        for _ in range(args.repeats):
            repro.append(timed([sys.executable, "-m", "dvc", "repro"], repo))
            start = time.perf_counter()
            pipeline(root=str(repo))
            inproc.append(time.perf_counter() - start)
            cli.append(timed([sys.executable, "-m", "flows", "run", "--root", str(repo)],
                             PROJECT))

    med = {name: statistics.median(v) for name, v in
           (("dvc repro", repro), ("flow, in-process", inproc), ("python -m flows run", cli))}
    print(f"up-to-date pipeline, {args.repeats} repeats, median wall seconds:")
    for name, value in med.items():
        print(f"  {name:<22} {value:6.2f} s")
    base = med["dvc repro"]
    print(f"  flow in-process - dvc repro:    {med['flow, in-process'] - base:+.2f} s")
    print(f"  python -m flows run - dvc repro: {med['python -m flows run'] - base:+.2f} s"
          "  (target <= +2.5 s)")
    write_json(args.json, args.repeats, {"dvc repro": repro, "flow, in-process": inproc,
                                         "python -m flows run": cli}, med)


def write_json(path: Path, repeats: int, runs: dict[str, list[float]],
               med: dict[str, float]) -> None:
    """Every timing, the medians, the overheads and the machine, as JSON at ``path``."""
    sys.path.insert(0, str(PROJECT / "benchmarks"))
    from machine import machine_record

    base = med["dvc repro"]
    out = {"command": f"python benchmarks/bench_flow.py --repeats {repeats}",
           "what": "no-op run of an up-to-date tiny pipeline (7 stages) against a running "
                   "Prefect server, median wall seconds",
           "seconds": {k: [round(v, 3) for v in vs] for k, vs in runs.items()},
           "median": {k: round(v, 3) for k, v in med.items()},
           "over_dvc_repro": {"flow, in-process": round(med["flow, in-process"] - base, 3),
                              "python -m flows run": round(med["python -m flows run"] - base, 3)},
           "targets": {"flow, in-process": 1.0, "python -m flows run": 2.5},
           "machine": machine_record()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
