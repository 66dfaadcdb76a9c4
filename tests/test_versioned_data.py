"""Inputs are versioned data: DVC hashes what ingest reads, so a change to the bytes re-runs
the pipeline and a touch does not; the data report counts classes, sizes and duplicates."""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import dvc, git, make_pipeline_repo, ran_stages, run, subprocess_env, write_params

from stages.io import load_split

ALL = ["fetch", "ingest", "normalize", "train", "evaluate", "plot", "gate"]
AFTER_INGEST = ["ingest", "normalize", "train", "evaluate", "plot", "gate"]
#: Small enough that a whole pipeline run takes seconds.
FAST = {"train": {"epochs": 1, "batch_size": 16}, "evaluate": {"n_wrong": 2},
        "plot": {"n_images": 2}}


def _png(path: Path, seed: int, size: tuple[int, int] = (32, 32)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
    Image.fromarray(pixels).save(path)


def _image_folder(root: Path, classes: list[str], n_train: int = 6, n_test: int = 3,
                  seed: int = 0) -> None:
    for c, cls in enumerate(classes):
        for split, n in (("train", n_train), ("test", n_test)):
            for i in range(n):
                _png(root / split / cls / f"{i}.png", seed * 10_000 + c * 100 + i * 2
                     + (split == "test"))


def _lock_dep(repo: Path, stage: str, path: str) -> str:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return next(d["md5"] for d in lock["stages"][stage]["deps"] if d["path"] == path)


def _repro(repo: Path, *args: str) -> list[str]:
    return ran_stages(dvc(repo, "repro", *args).stdout)


def _report(repo: Path) -> dict:
    return json.loads((repo / "metrics" / "data_report.json").read_text())


def _touch_all(folder: Path) -> None:
    for path in folder.rglob("*"):
        os.utime(path, (path.stat().st_atime + 100, path.stat().st_mtime + 100))


@pytest.mark.slow  # the whole tiny pipeline four times (~60 s on 2 busy cores)
def test_imagefolder_under_dvc_add_change_touch_and_new_class(tmp_path: Path) -> None:
    repo = make_pipeline_repo(tmp_path / "repo", {
        "data": {"source": "imagefolder", "path": "data/images"}, **FAST})
    images = repo / "data" / "images"
    _image_folder(images, ["cat", "dog"])
    dvc(repo, "add", "data/images")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "my images")

    assert sorted(_repro(repo)) == sorted(ALL)
    first = _lock_dep(repo, "ingest", "data/images")
    report = _report(repo)
    assert report["images"]["train"] == {"total": 12, "cat": 6, "dog": 6}
    assert report["input"]["path"] == "data/images" and len(report["input"]["sha256"]) == 64
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "trained on cat and dog")

    _touch_all(images)  # new mtimes, same bytes
    assert _repro(repo) == []

    _png(images / "train" / "cat" / "0.png", seed=999)  # one image's bytes change
    assert _repro(repo) == AFTER_INGEST
    second = _lock_dep(repo, "ingest", "data/images")
    assert second != first
    assert _report(repo)["input"]["sha256"] != report["input"]["sha256"]

    for split, n in (("train", 4), ("test", 2)):  # a new class, one image of another size
        for i in range(n):
            _png(images / split / "owl" / f"{i}.png", seed=5000 + i + 10 * (split == "test"),
                 size=(48, 40) if i == 0 else (32, 32))
    assert _repro(repo) == AFTER_INGEST
    assert _lock_dep(repo, "ingest", "data/images") not in (first, second)
    report = _report(repo)
    assert report["classes"] == 3
    assert report["images"]["train"]["owl"] == 4 and report["images"]["test"]["owl"] == 2
    assert report["sizes_seen"] == {"32x32": 22, "48x40": 2}
    assert report["resized"]["images"] == 2
    balance = json.loads((repo / "metrics" / "class_balance.json").read_text())
    assert balance[-1] == {"class": "owl", "train": 4, "test": 2}

    # `dvc add` records the new version; `dvc metrics diff` shows the headline change in
    # the data, `git diff` of the committed report the class that came
    dvc(repo, "add", "data/images")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "an owl class")
    diff = json.loads(dvc(repo, "metrics", "diff", "HEAD~1", "--json").stdout)
    assert diff["metrics/data.json"] == {
        "images.train": {"old": 12, "new": 16, "diff": 4},
        "images.test": {"old": 6, "new": 8, "diff": 2}}
    changed = git(repo, "diff", "HEAD~1", "--", "metrics/data_report.json")
    assert '+      "owl": 4' in changed and '+  "classes": 3,' in changed


def _npz(path: Path, seed: int = 0, n_train: int = 40, n_test: int = 20) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, X_train=rng.integers(0, 256, (n_train, 32, 32, 3), np.uint8),
             y_train=np.arange(n_train) % 2, X_test=rng.integers(0, 256, (n_test, 32, 32, 3),
                                                                 np.uint8),
             y_test=np.arange(n_test) % 2, classes=np.array(["even", "odd"]))


@pytest.mark.slow  # the whole tiny pipeline three times
def test_npz_outside_the_repo_is_an_external_dependency(tmp_path: Path) -> None:
    data = tmp_path / "shared" / "d.npz"  # outside the repository, named by a relative path
    _npz(data)
    repo = make_pipeline_repo(tmp_path / "repo", {
        "data": {"source": "npz", "path": "../shared/d.npz"}, **FAST})
    assert sorted(_repro(repo)) == sorted(ALL)
    first = _lock_dep(repo, "ingest", "../shared/d.npz")

    _touch_all(data.parent)
    assert _repro(repo) == []
    assert dvc(repo, "status", "--json").stdout.strip() == "{}"

    _npz(data, seed=1)  # same shape, other bytes
    assert _repro(repo) == AFTER_INGEST
    assert _lock_dep(repo, "ingest", "../shared/d.npz") != first


def test_duplicate_leak_is_reported_and_dropped_on_request(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, (20, 32, 32, 3), np.uint8)
    x_test = rng.integers(0, 256, (6, 32, 32, 3), np.uint8)
    x_train[3] = x_test[2]    # a test image copied into train: a leak
    x_train[7] = x_train[5]   # a repeat within train
    np.savez(tmp_path / "d.npz", X_train=x_train, y_train=np.arange(20) % 2,
             X_test=x_test, y_test=np.arange(6) % 2)

    def ingest(drop: bool) -> tuple[dict, np.ndarray, str]:
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(
            {"data": {"source": "npz", "path": "d.npz", "drop_duplicates": drop}}))
        proc = run([sys.executable, "-m", "stages.ingest", "--out", "raw",
                    "--report", "data.json", "--balance", "balance.json"], cwd=tmp_path,
                   env={**subprocess_env(), "PYTHONPATH": str(Path(__file__).parents[1])})
        images, _ = load_split(tmp_path / "raw" / "train.npz")
        return json.loads((tmp_path / "data.json").read_text()), images, proc.stderr

    report, images, log = ingest(drop=False)
    assert report["duplicates"] == {"within_train": 1, "train_in_test": 1,
                                    "dropped_from_train": 0}
    assert "1 training image(s) also in the test split (a leak)" in log
    assert len(images) == 20 and report["images"]["train"]["total"] == 20

    report, images, _ = ingest(drop=True)
    assert report["duplicates"] == {"within_train": 1, "train_in_test": 1,
                                    "dropped_from_train": 2}
    assert len(images) == 18 and report["images"]["train"]["total"] == 18
    kept = {img.transpose(1, 2, 0).tobytes() for img in images}  # raw is N x 3 x 32 x 32
    assert x_test[2].tobytes() not in kept and x_train[5].tobytes() in kept
    assert len(kept) == 18


@contextmanager
def web(folder: Path) -> Iterator[str]:
    """``folder`` served over http on loopback while the block runs; its base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def _closed_port() -> int:
    with socket.socket() as sock:  # bound, then closed: nothing listens there
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow  # two repositories, the whole tiny pipeline twice
def test_cifar10_archive_is_pulled_from_the_remote_and_runs_offline(tmp_path: Path) -> None:
    from cifar_format import random_batches, write_tar

    from stages.sources.safety import sha256_file

    (tmp_path / "web").mkdir()
    archive = write_tar(tmp_path / "web" / "cifar-10-python.tar.gz",
                        random_batches(50, 20, seed=3))
    remote = tmp_path / "remote"
    with web(tmp_path / "web") as url:  # the archive's website, on loopback
        repo = make_pipeline_repo(tmp_path / "repo", {"data": {
            "source": "cifar10", "url": f"{url}/{archive.name}",
            "sha256": sha256_file(archive)}, **FAST})
        dvc(repo, "remote", "add", "-d", "team", str(remote))
        assert sorted(_repro(repo)) == sorted(ALL)
    assert (repo / "data" / "download" / "cifar-10-python.tar.gz").read_bytes() == \
        archive.read_bytes()
    assert _report(repo)["input"]["sha256"] == sha256_file(archive)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "cifar10 run")
    dvc(repo, "push")

    shutil.rmtree(archive.parent)  # the internet is gone: data.url cannot be reached
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], cwd=tmp_path)
    dvc(clone, "pull", "fetch")  # only the archive; everything after it is rebuilt offline
    ran = _repro(clone)
    # fetch is up to date: nothing is downloaded; the rebuilt metrics equal the committed
    # ones bit for bit, so the gate (which reads only committed files) has nothing to do
    assert ran == [s for s in AFTER_INGEST if s != "gate"]
    assert (clone / "models" / "model.pt").is_file()
    assert dvc(clone, "status", "--json").stdout.strip() == "{}"
    # the same bytes in, the same raw data out
    for name in ("train.npz", "test.npz"):
        assert (clone / "data/raw" / name).read_bytes() == (repo / "data/raw" / name).read_bytes()


def test_fetch_without_the_internet_is_transient_and_names_dvc_pull(tmp_path: Path) -> None:
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    write_params_file = tmp_path / "params.yaml"
    write_params_file.write_text(yaml.safe_dump({"data": {
        "source": "cifar10", "path": "data/download",
        "url": f"http://127.0.0.1:{_closed_port()}/gone.tar.gz"}}))
    proc = run([sys.executable, "-m", "stages.fetch", "--out", "data/download"], cwd=tmp_path,
               check=False, env={**subprocess_env(),
                                 "PYTHONPATH": str(Path(__file__).parents[1])})
    assert proc.returncode == 75, proc.stderr
    assert "dvc pull fetch" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "data" / "download").exists()


def test_synthetic_fetch_is_a_note_only(pipeline_repo: Path) -> None:
    assert _repro(pipeline_repo, "fetch") == ["fetch"]
    assert [p.name for p in (pipeline_repo / "data" / "download").iterdir()] == ["README.txt"]
    write_params(pipeline_repo, {"data": {"synthetic": {"seed": 3}}})
    assert _repro(pipeline_repo, "fetch") == []  # synthetic params are not fetch's business


@pytest.mark.slow  # one experiment of the whole tiny pipeline, through Prefect
def test_sweep_with_a_relative_npz_path_outside_the_repo(prefect_api, tmp_path: Path) -> None:
    from flows.sweep import sweep

    _npz(tmp_path / "shared" / "d.npz")
    repo = make_pipeline_repo(tmp_path / "repo", {
        "data": {"source": "npz", "path": "../shared/d.npz"}, **FAST})
    rows = sweep({"train.seed": [1]}, root=str(repo), max_parallel=1, name_prefix="rel")
    assert [r["experiment"] for r in rows] == ["rel-1"]
    assert rows[0]["metrics/data.json:images.train"] == 40
    assert rows[0]["params.yaml:data.path"] == str((tmp_path / "shared" / "d.npz").resolve())


@pytest.mark.slow  # the whole tiny pipeline twice, through Prefect
def test_scheduled_flow_run_retrains_after_images_are_added(prefect_api, tmp_path: Path) -> None:
    from flows.pipeline import pipeline

    repo = make_pipeline_repo(tmp_path / "repo", {
        "data": {"source": "imagefolder", "path": "data/images"}, **FAST})
    _image_folder(repo / "data" / "images", ["cat", "dog"])
    dvc(repo, "add", "data/images")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "my images")
    first = {r["stage"]: r["status"] for r in pipeline(root=str(repo), commit=True)}
    assert set(first.values()) == {"ran"}

    # new images arrive (as a scheduled run would find them); the next run retrains
    for i in range(6, 9):
        _png(repo / "data" / "images" / "train" / "dog" / f"{i}.png", seed=7000 + i)
    second = {r["stage"]: r["status"] for r in pipeline(root=str(repo))}
    assert second == {"fetch": "up to date", **{s: "ran" for s in AFTER_INGEST}}
    assert _report(repo)["images"]["train"]["dog"] == 9
