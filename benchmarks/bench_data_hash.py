"""What hashing the input costs on an unchanged pipeline, beside not hashing it (the old design).

Builds a temp git + DVC repository with this project's pipeline, reading the 60,000 real
CIFAR-10 JPEGs (``../shared/data/cifar10-jpeg.tar.gz``, extracted into ``data/images``) as
an ``imagefolder``, runs the pipeline once (1 training epoch), then times ``dvc status`` and
a no-op ``dvc repro`` (median of ``--repeats``) in two designs on the same repository:

- ``old``: ``data.path`` is a param only: ingest does not depend on the images;
- ``versioned``: ``data/images`` is tracked by ``dvc add`` and is a dependency of ingest
  (what ``dvc.yaml`` ships), so DVC checks the 60,000 files on every status;
- ``versioned_archive``: the same images as one ``.tar.gz`` under ``dvc add`` (imagefolder
  reads archives as they are), so DVC checks one file.

Also times the default synthetic ``dvc repro`` from scratch with and without the new
``fetch`` stage. Prints a table and writes ``benchmarks/results/data_hash.json``.

    python benchmarks/bench_data_hash.py [--repeats 3] [--out benchmarks/results/data_hash.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import yaml

PROJECT = Path(__file__).resolve().parents[1]
JPEGS = PROJECT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
DEP_LINE = "      - ${data.path}\n"
FAST = {"train": {"epochs": 1, "threads": 0}, "plot": {"dpi": 50}}


def env() -> dict[str, str]:
    """Subprocess environment: this interpreter first on PATH, no analytics."""
    e = dict(os.environ, DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="bench",
             GIT_AUTHOR_EMAIL="bench@convflow.invalid", GIT_COMMITTER_NAME="bench",
             GIT_COMMITTER_EMAIL="bench@convflow.invalid")
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e.get('PATH', '')}"
    return e


def sh(repo: Path, *cmd: str) -> float:
    """Run ``cmd`` in ``repo`` (failing loudly); its wall seconds."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=repo, env=env(), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n"
                         f"{proc.stderr}")
    return seconds


def dvc(repo: Path, *args: str) -> float:
    """Run the real dvc CLI; its wall seconds."""
    return sh(repo, sys.executable, "-m", "dvc", *args)


def make_repo(dest: Path, params: dict, dvc_yaml: str) -> Path:
    """A git + DVC repository with the pipeline, ``params`` merged into params.yaml."""
    dest.mkdir(parents=True)
    for name in ("stages", "flows"):
        shutil.copytree(PROJECT / name, dest / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("params.yaml", ".gitignore", ".dvcignore"):
        shutil.copy2(PROJECT / name, dest / name)
    (dest / "dvc.yaml").write_text(dvc_yaml)
    shipped = yaml.safe_load((dest / "params.yaml").read_text())
    for group, values in params.items():
        shipped[group] = {**shipped.get(group, {}), **values}
    (dest / "params.yaml").write_text(yaml.safe_dump(shipped, sort_keys=False))
    sh(dest, "git", "init", "-q", "-b", "main")
    dvc(dest, "init", "-q")
    sh(dest, "git", "add", "-A")
    sh(dest, "git", "commit", "-qm", "pipeline")
    return dest


def timed(repo: Path, repeats: int) -> dict[str, list[float]]:
    """Wall seconds of ``dvc status`` and of a no-op ``dvc repro``, ``repeats`` times each."""
    out: dict[str, list[float]] = {"status": [], "repro": []}
    for _ in range(repeats):
        out["status"].append(round(dvc(repo, "status"), 3))
        out["repro"].append(round(dvc(repo, "repro"), 3))
    return out


def main() -> None:
    """Build, run once, time both designs, print and save the numbers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=PROJECT / "benchmarks/results/data_hash.json")
    args = parser.parse_args()
    if not JPEGS.is_file():
        raise SystemExit(f"{JPEGS} not found: this benchmark needs the real CIFAR-10 JPEGs")
    shipped_yaml = (PROJECT / "dvc.yaml").read_text()
    if DEP_LINE not in shipped_yaml:
        raise SystemExit(f"dvc.yaml has no '{DEP_LINE.strip()}' line to compare against")
    old_yaml = shipped_yaml.replace(DEP_LINE, "")
    load = os.getloadavg()
    results: dict = {"load_avg_at_start": [round(x, 2) for x in load], "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="bench-data-hash-") as tmp:
        # 1. the default synthetic pipeline: does the fetch stage slow `dvc repro` down?
        synth = {}
        for name, text in (("without fetch", _without_fetch(old_yaml)),
                           ("with fetch", shipped_yaml)):
            repo = make_repo(Path(tmp) / f"synth-{name.replace(' ', '-')}", {}, text)
            synth[name] = round(dvc(repo, "repro", "normalize"), 3)
        results["synthetic_repro_normalize_s"] = synth

        # 2. the 60,000 JPEGs, old design first (no dependency, no .dvc file)
        repo = make_repo(Path(tmp) / "jpeg", {
            "data": {"source": "imagefolder", "path": "data/images"}, **FAST}, old_yaml)
        with tarfile.open(JPEGS) as tar:
            tar.extractall(repo / "data" / "images", filter="data")
        n_files = sum(1 for p in (repo / "data" / "images").rglob("*.jpg"))
        results["input_files"] = n_files
        results["first_repro_s"] = round(dvc(repo, "repro"), 1)
        results["old"] = timed(repo, args.repeats)

        # 3. versioned: dvc add the folder, make it a dependency of ingest, record it
        results["dvc_add_s"] = round(dvc(repo, "add", "data/images"), 2)
        (repo / "dvc.yaml").write_text(shipped_yaml)
        results["dvc_commit_s"] = round(dvc(repo, "commit", "-f", "ingest"), 2)
        results["versioned"] = timed(repo, args.repeats)

        # 4. the same images as one .tar.gz (imagefolder reads it as is): one file to hash;
        # the folder is no longer tracked, so `dvc status` does not walk it either
        dvc(repo, "remove", "data/images.dvc")
        shutil.rmtree(repo / "data" / "images")
        shutil.copy2(JPEGS, repo / "data" / "images.tar.gz")
        dvc(repo, "add", "data/images.tar.gz")
        params = yaml.safe_load((repo / "params.yaml").read_text())
        params["data"]["path"] = "data/images.tar.gz"
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        results["archive_rerun_s"] = round(dvc(repo, "repro"), 1)  # ingest only: same raw
        results["versioned_archive"] = timed(repo, args.repeats)
        results["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        _save(results, args.out)  # before the temp folder's 120,000 files are deleted
    _print(results, args.repeats)


DESIGNS = {"old": "old (folder, not hashed)", "versioned": "versioned folder (dvc add)",
           "versioned_archive": "versioned .tar.gz (dvc add)"}


def _save(results: dict, out: Path) -> None:
    for design in DESIGNS:
        for what in ("status", "repro"):
            results[f"{design}_{what}_median_s"] = statistics.median(results[design][what])
    for design in ("versioned", "versioned_archive"):
        for what in ("status", "repro"):
            results[f"ratio_{design}_{what}"] = round(
                results[f"{design}_{what}_median_s"] / results[f"old_{what}_median_s"], 2)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


def _print(results: dict, repeats: int) -> None:
    load = results["load_avg_at_start"]
    print(f"input: {results['input_files']} JPEGs; load average {load[0]:.2f} at start, "
          f"{results['load_avg_at_end'][0]:.2f} at end, on {results['cpus']} CPUs")
    print(f"| no-op, median of {repeats} | " + " | ".join(DESIGNS.values()) + " |")
    print("|---|" + "---:|" * len(DESIGNS))
    for what in ("status", "repro"):
        cells = [f"{results[f'{d}_{what}_median_s']:.2f}" for d in DESIGNS]
        print(f"| dvc {what} s | " + " | ".join(cells) + " |")
    synth = results["synthetic_repro_normalize_s"]
    print(f"one-time: dvc add {results['dvc_add_s']} s; synthetic `dvc repro normalize` "
          f"from scratch: {synth}")


def _without_fetch(text: str) -> str:
    """``dvc.yaml`` as it was before the fetch stage: no fetch, ingest without its input."""
    spec = yaml.safe_load(text)
    del spec["stages"]["fetch"]
    spec["stages"]["ingest"]["deps"] = [d for d in spec["stages"]["ingest"]["deps"]
                                        if d != "${data.path}"]
    return yaml.safe_dump(spec, sort_keys=False)


if __name__ == "__main__":
    main()
