"""Benchmark: ingest of a full-size CIFAR-10 archive and generation of 60,000 synthetic images.

    python benchmarks/bench_ingest.py            # all rows (about a minute on 2 cores)
    python benchmarks/bench_ingest.py --quick    # 1/10 size, to check the script

Builds, in a temp folder, an archive in the official ``cifar-10-python.tar.gz`` format
(5 x 10,000 train + 10,000 test images of random pixels, Python 2 pickles, gzip) and runs
the real stages on it as subprocesses: ``python -m stages.ingest`` (sha256 check, reading,
restricted unpickling, validation, writing ``data/raw``), then ``python -m stages.normalize``;
then the synthetic source at 50,000 + 10,000 images, as the generator alone and as the whole
ingest stage; and, where ``../shared/data/cifar10-jpeg.tar.gz`` exists, the imagefolder source
on it. Each subprocess runs under a small wrapper so its peak RSS is its own
(``resource.getrusage(RUSAGE_CHILDREN)``). Targets (issue 2): <= 10 s and <= 1.5 GB each for
the archive ingest and the 60,000-image generation.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the official-format writer the tests use

TARGET_S, TARGET_MB = 10.0, 1536.0
GENERATE = ("import time; from stages.sources.synthetic import generate; t = time.perf_counter();"
            " generate({n_train}, 0, 'train'); generate({n_test}, 0, 'test');"
            " print(f'{{time.perf_counter() - t:.2f}}')")


def measure(cmd: list[str], cwd: Path) -> dict:
    """Run ``cmd`` in a fresh wrapper process; wall and CPU seconds, peak RSS (MB), stdout."""
    wrapper = [sys.executable, __file__, "--child", json.dumps(cmd)]
    out = subprocess.run(wrapper, cwd=cwd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def child(cmd: list[str]) -> None:
    """The wrapper: run one command, report its wall time and peak RSS as JSON."""
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        sys.exit(proc.returncode)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
                      "peak_mb": usage.ru_maxrss / 1024,  # KiB on Linux
                      "stdout": proc.stdout.strip()}))


def main() -> None:
    """Build the inputs, time each step, print a table."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1/10 of the full size")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return

    from cifar_format import write_cifar_archive

    from stages.sources.safety import sha256_file

    scale = 10 if args.quick else 1
    n_train, n_test = 50_000 // scale, 10_000 // scale
    env_note = f"{os.cpu_count()} CPUs, python {sys.version.split()[0]}"
    rows: list[tuple[str, float, float, float, bool]] = []
    with tempfile.TemporaryDirectory(prefix="convflow-bench-") as tmp_name:
        tmp = Path(tmp_name)
        t = time.perf_counter()
        archive = write_cifar_archive(tmp / "cifar-10-python.tar.gz", n_train, n_test,
                                      compresslevel=1)
        size_mb = archive.stat().st_size / 1e6
        print(f"built {archive.name}: {size_mb:.0f} MB, {n_train} + {n_test} images "
              f"in {time.perf_counter() - t:.1f} s", flush=True)

        def stage(name: str, data: dict, cmd: list[str], targeted: bool) -> dict:
            work = tmp / name.replace(" ", "_")
            work.mkdir()
            (work / "params.yaml").write_text(yaml.safe_dump({"data": data}))
            result = measure(cmd, work)
            rows.append((name, result["wall_s"], result["cpu_s"], result["peak_mb"], targeted))
            return result

        ingest = [sys.executable, "-m", "stages.ingest", "--out", "data/raw"]
        cifar = {"source": "cifar10", "path": str(archive), "sha256": sha256_file(archive)}
        stage(f"ingest cifar10 archive ({size_mb:.0f} MB)", cifar, ingest, True)
        # normalize reads the raw output just written by the row above
        norm_dir = tmp / f"ingest_cifar10_archive_({size_mb:.0f}_MB)"
        result = measure([sys.executable, "-m", "stages.normalize", "--raw", "data/raw",
                          "--out", "data/processed"], norm_dir)
        rows.append((f"normalize {n_train} + {n_test}", result["wall_s"], result["cpu_s"],
                     result["peak_mb"], False))

        gen = GENERATE.format(n_train=n_train, n_test=n_test)
        result = stage(f"synthetic: generate {n_train + n_test} (process)", {},
                       [sys.executable, "-c", gen], True)
        rows.append((f"synthetic: generate {n_train + n_test} (in-process)",
                     float(result["stdout"]), float("nan"), float("nan"), False))
        synth = {"source": "synthetic", "synthetic": {"n_train": n_train, "n_test": n_test}}
        stage(f"ingest synthetic {n_train} + {n_test}", synth, ingest, False)

        jpeg = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
        if jpeg.is_file() and not args.quick:
            stage("ingest imagefolder cifar10-jpeg.tar.gz (60,000 JPEGs)",
                  {"source": "imagefolder", "path": str(jpeg)}, ingest, False)

    print(f"\nconvflow ingest benchmark ({env_note}); targets: <= {TARGET_S:.0f} s, "
          f"<= {TARGET_MB / 1024:.1f} GB peak RSS on the rows marked *\n")
    print(f"{'step':56} {'wall s':>7} {'CPU s':>6} {'peak RSS MB':>12}  target")
    for name, wall, cpu, peak, targeted in rows:
        ok = "" if not targeted else (
            "* ok" if wall <= TARGET_S and peak <= TARGET_MB else "* MISSED")
        cpu_s = "-" if cpu != cpu else f"{cpu:.2f}"
        peak_s = "-" if peak != peak else f"{peak:.0f}"
        print(f"{name:56} {wall:7.2f} {cpu_s:>6} {peak_s:>12}  {ok}")
    print("\nwall time on a busy machine exceeds CPU time; compare CPU s when the load is high")


if __name__ == "__main__":
    main()
