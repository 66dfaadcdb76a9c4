"""Hostile or inconsistent input, one test per kind: exit 2, one line naming the file and
the fix, no traceback, nothing partial left; inputs that could exhaust memory run under an
address-space limit and must be refused in seconds (see docs/threat-model.md)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import PROJECT, subprocess_env
from PIL import Image, PngImagePlugin
from pydantic import BaseModel
from stage_cli import assert_user_error, run_stage
from train_data import write_processed, write_train_params

from stages.errors import UserError
from stages.io import atomic_dir
from stages.models import build_model, save_model
from stages.params import Params

#: Enough for Python, numpy, PIL and pydantic; far below what the inputs below would take.
MEMORY_MB = 700


def _ingest(work: Path, data: dict, **limits: float) -> subprocess.CompletedProcess:
    (work / "params.yaml").write_text(yaml.safe_dump({"data": data}))
    return run_stage("ingest", ["--out", "data/raw"], work, **limits)


def _assert_nothing_left(work: Path) -> None:
    assert not (work / "data" / "raw").exists()
    assert not list(work.glob("data/.raw.tmp-*"))


def _png(size: tuple[int, int] = (32, 32), mode: str = "RGB",
         info: PngImagePlugin.PngInfo | None = None) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


def _folder(root: Path, extra: dict[str, bytes] | None = None) -> Path:
    """train/{a,b}/x.png and test/a/x.png, plus ``extra`` files (relative path -> bytes)."""
    for rel in ("train/a/x.png", "train/b/x.png", "test/a/x.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(_png())
    for rel, blob in (extra or {}).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(blob)
    return root


# ------------------------------------------------------------------------ labels vs classes
@pytest.mark.parametrize(("labels", "classes", "message"), [
    (np.r_[np.arange(10), 255], None, "include 255 (outside 0..10)"),  # one stray 255
    (np.arange(10) + 10**12, None, "include 1000000000000, 1000000000001"),  # offset labels
    (np.r_[np.arange(10), 255], [f"c{i}" for i in range(10)],
     "label value(s) 255 outside 0..9"),
])
def test_labels_are_checked_against_the_classes(tmp_path: Path, labels: np.ndarray,
                                                classes: list[str] | None, message: str) -> None:
    """No class is ever invented from the largest label (that once took 6 GB and hung)."""
    arrays = {"X_train": np.zeros((len(labels), 32, 32, 3), np.uint8), "y_train": labels,
              "X_test": np.zeros((2, 32, 32, 3), np.uint8), "y_test": np.array([0, 1])}
    if classes:
        arrays["classes"] = np.array(classes)
    np.savez(tmp_path / "d.npz", **arrays)
    start = time.monotonic()
    proc = _ingest(tmp_path, {"source": "npz", "path": str(tmp_path / "d.npz")},
                   memory_mb=MEMORY_MB)
    assert_user_error(proc, "ingest", message)
    assert time.monotonic() - start < 30
    _assert_nothing_left(tmp_path)


# ------------------------------------------------------------------------ params bounds
def _numeric_fields(model: type, prefix: str = "") -> Iterator[tuple[str, object]]:
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):  # a nested group
            yield from _numeric_fields(ann, f"{prefix}{name}.")
        elif ann in (int, float):
            yield f"{prefix}{name}", field


#: Bounded by design elsewhere: too large an lr is a non-finite loss naming the step.
UNBOUNDED = {"train.lr"}


def test_every_numeric_param_has_an_upper_bound_shown_when_exceeded(tmp_path: Path) -> None:
    unbounded = {name for name, field in _numeric_fields(Params)
                 if not any(getattr(m, "le", None) is not None or getattr(m, "lt", None)
                            is not None for m in field.metadata)}
    assert unbounded == UNBOUNDED
    proc = _ingest(tmp_path, {"synthetic": {"n_train": 10**12}})
    assert_user_error(proc, "ingest", "data.synthetic.n_train: Input should be less than or "
                                      "equal to 500000 (got 1000000000000); accepted: "
                                      "0 < x <= 500000")


def test_a_run_sized_beyond_the_memory_is_one_line(tmp_path: Path) -> None:
    """Within the bounds, but not within this (limited) machine: no MemoryError traceback."""
    proc = _ingest(tmp_path, {"synthetic": {"n_train": 500_000}}, memory_mb=MEMORY_MB)
    assert_user_error(proc, "ingest", "out of memory; lower the sizes in params.yaml")
    _assert_nothing_left(tmp_path)


def test_a_key_given_twice_in_params_yaml_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("data:\n  source: synthetic\n  source: npz\n")
    proc = run_stage("ingest", ["--out", "data/raw"], tmp_path)
    assert_user_error(proc, "ingest", "params.yaml: invalid YAML at line 3, column 3: "
                                      "duplicate key 'source'")


# ------------------------------------------------------------------------ decompression caps
def _tar_gz(path: Path, members: dict[str, bytes | int]) -> Path:
    """A .tar.gz; an int member is that many zero bytes, streamed (never held in memory)."""
    with tarfile.open(path, "w:gz", compresslevel=9) as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(blob, int):
                info.size = blob
                tar.addfile(info, _Zeros(blob))
            else:
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    return path


class _Zeros(io.RawIOBase):
    def __init__(self, n: int) -> None:
        self.left = n

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return bytes(n)


def _lying_header(path: Path) -> Path:
    """A gzip'd tar whose one header claims a 3 GB member (the bytes are not there)."""
    info = tarfile.TarInfo("train/a/huge.png")
    info.size = 3 << 30
    header = info.tobuf(format=tarfile.GNU_FORMAT)
    path.write_bytes(zlib.compress(header + bytes(1 << 16), 9, wbits=31))
    return path


def _png_text_bomb() -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "x" * (8 << 20), zip=True)  # 8 MB of text in about 8 KB
    return _png(info=info)


def _npz_bomb(path: Path) -> Path:
    np.savez_compressed(path, X_train=np.zeros((30_000, 32, 32, 3), np.uint8),
                        y_train=np.zeros(30_000, np.int64),
                        X_test=np.zeros((1, 32, 32, 3), np.uint8), y_test=np.zeros(1, np.int64))
    return path


BOMBS: dict[str, tuple[Callable[[Path], dict], str]] = {
    "tar member of 200 MB zeros": (lambda t: {"source": "imagefolder", "path": str(_tar_gz(
        t / "b.tar.gz", {"train/a/x.png": _png(), "train/b/z.png": 200 << 20}))},
        "would decompress to"),
    "tar header claiming 3 GB": (lambda t: {"source": "imagefolder",
                                            "path": str(_lying_header(t / "h.tar.gz"))},
                                 "would decompress to 3072.0 MB, more than the 32.0 MB allowed"),
    "PNG text chunk of 8 MB": (lambda t: {"source": "imagefolder", "path": str(_folder(
        t / "imgs", {"train/b/text.png": _png_text_bomb()}))},
        "text.png: not a readable PNG/JPEG image"),
    "PNG of 400 megapixels": (lambda t: {"source": "imagefolder", "path": str(_folder(
        t / "imgs", {"train/b/big.png": _png((20_000, 20_000), "1")}))},
        "big.png: 20000 x 20000 pixels, more than the 50,000,000 allowed"),
    "npz of 92 MB zeros": (lambda t: {"source": "npz", "path": str(_npz_bomb(t / "z.npz"))},
                           "X_train: would decompress to"),
}


@pytest.mark.parametrize("case", list(BOMBS))
def test_every_decompression_is_capped(tmp_path: Path, case: str) -> None:
    make, message = BOMBS[case]
    work = tmp_path / "work"
    work.mkdir()
    data = make(tmp_path)
    start = time.monotonic()
    proc = _ingest(work, data, memory_mb=MEMORY_MB)
    assert_user_error(proc, "ingest", message)
    assert time.monotonic() - start < 30, "refused, but not quickly"
    _assert_nothing_left(work)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with dvc.yaml-free model file, for predict --model."""
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    save_model(folder / "model.pt", build_model("seed_net", 2, [0.5] * 3, [0.25] * 3),
               arch="seed_net", classes=["a", "b"], mean=[0.5] * 3, std=[0.25] * 3, extra={})
    return folder


@pytest.mark.slow  # a real end-to-end run: over ~30 s on 2 cores
def test_predict_refuses_the_images_ingest_refuses_the_same_way(tmp_path: Path,
                                                                 model_dir: Path) -> None:
    (tmp_path / "big.png").write_bytes(_png((20_000, 20_000), "1"))
    (tmp_path / "text.png").write_bytes(_png_text_bomb())
    for name in ("big.png", "text.png"):
        work = tmp_path / name.replace(".", "_")
        work.mkdir()
        _folder(work / "imgs", {f"train/b/{name}": (tmp_path / name).read_bytes()})
        by_ingest = assert_user_error(_ingest(work, {"source": "imagefolder",
                                                      "path": str(work / "imgs")},
                                              memory_mb=MEMORY_MB), "ingest", name)
        by_predict = assert_user_error(run_stage(
            "predict", ["--model", str(model_dir / "model.pt"), str(tmp_path / name)],
            tmp_path), "predict", name)
        assert by_ingest.split(name, 1)[1] == by_predict.split(name, 1)[1]


# ------------------------------------------------------------------------ inconsistent files
def _processed(root: Path, damage: Callable[[Path], None]) -> None:
    write_processed(root / "proc", n_train=40, n_val=20)
    write_train_params(root, epochs=1)
    damage(root / "proc")


def _save_split(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    np.savez(path, images=images, labels=labels)


def _model_file(root: Path, **fields: object) -> Path:
    path = root / "model.pt"
    torch.manual_seed(0)
    save_model(path, build_model("seed_net", 10, [0.5] * 3, [0.25] * 3), arch="seed_net",
               classes=[f"class{i}" for i in range(10)], mean=[0.5] * 3, std=[0.25] * 3,
               extra={})
    blob = torch.load(path, weights_only=True)
    for key, value in fields.items():
        if value is None:
            blob.pop(key)
        else:
            blob[key] = value
    torch.save(blob, path)
    return path


TRAIN_ARGS = ["--data", "proc", "--model", "models/model.pt", "--checkpoint",
              "models/checkpoint.pt", "--live", "dvclive/train"]
EVAL_ARGS = ["--data", "proc", "--model", "model.pt", "--metrics", "metrics", "--out", "res"]
INCONSISTENT: dict[str, tuple[str, list[str], Callable[[Path], None], str]] = {
    "train labels >= class count": (
        "train", TRAIN_ARGS,
        lambda r: _processed(r, lambda p: _save_split(
            p / "val.npz", np.zeros((2, 3, 32, 32), np.uint8), np.array([3, 10]))),
        "proc/val.npz: label value(s) 10 outside 0..9 (there are 10 classes); "
        "re-run normalize: dvc repro -f normalize"),
    "split lengths disagree": (
        "train", TRAIN_ARGS,
        lambda r: _processed(r, lambda p: _save_split(
            p / "train.npz", np.zeros((5, 3, 32, 32), np.uint8), np.zeros(4, np.int64))),
        "proc/train.npz: 4 labels for 5 images; expected one per image; re-run normalize"),
    "image size differs from the model's": (
        "evaluate", EVAL_ARGS,
        lambda r: (_processed(r, lambda p: None),
                   _model_file(r, input={"shape": [3, 28, 28], "dtype": "uint8"})),
        "model.pt takes images of shape [3, 28, 28] (C x H x W) but proc holds [3, 32, 32]"),
    "model without normalization": (
        "evaluate", EVAL_ARGS,
        lambda r: (_processed(r, lambda p: None), _model_file(r, normalization=None)),
        "model.pt: 'normalization' lacks 3 mean and 3 std values; re-run `dvc repro -f train`"),
    "model whose weights are another architecture's": (
        "evaluate", EVAL_ARGS,
        lambda r: (_processed(r, lambda p: None), _model_file(r, arch="air_small")),
        "model.pt: the weights do not fit a air_small for 10 classes"),
}


@pytest.mark.parametrize("case", list(INCONSISTENT))
def test_inconsistent_files_are_caught_where_read(tmp_path: Path, case: str) -> None:
    stage, args, make, message = INCONSISTENT[case]
    make(tmp_path)
    assert_user_error(run_stage(stage, args, tmp_path), stage, message)
    assert not (tmp_path / "models" / "model.pt").exists()
    assert not (tmp_path / "metrics").exists() and not (tmp_path / "res").exists()


# ------------------------------------------------------------------------ disk full
@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[tuple[Path, dict[str, float]]]:
    """A 1 MB tmpfs (a real ENOSPC) where mounting is allowed, else a 1 MB file-size limit
    (a real EFBIG from the kernel): yields (folder, extra run_stage limits)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
        capture_output=True).returncode == 0
    try:
        yield mnt, ({} if mounted else {"file_mb": 1})
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=True)


def test_a_full_disk_is_one_line_naming_the_path_and_nothing_is_left(
        tiny_disk: tuple[Path, dict[str, float]]) -> None:
    work, limits = tiny_disk
    proc = _ingest(work, {"synthetic": {"n_train": 1000, "n_test": 100}}, **limits)
    line = assert_user_error(proc, "ingest", "data/raw: ")
    assert "needs 3.4 MB" in line or "needs more than" in line, line
    assert "free" in line
    _assert_nothing_left(work)
    if not limits:  # on the tmpfs: a write that fails half-way leaves no temp folder either
        with pytest.raises(UserError, match=r"out: out of space \(No space left on device\)"):
            with atomic_dir(work / "out") as tmp:
                (tmp / "big").write_bytes(bytes(4 << 20))
        assert not (work / "out").exists() and not list(work.rglob(".*.tmp-*"))


# ------------------------------------------------------------------------ smaller edges
# a symlinked class folder is refused: tests/test_hardening_inputs.py
@pytest.mark.parametrize("bad", ["train/ca\nt/x.png", "train/a/x\r.png", "train/a/x\x1b.png"])
def test_newlines_and_control_characters_in_names_are_refused(tmp_path: Path,
                                                              bad: str) -> None:
    root = _folder(tmp_path / "imgs", {bad: _png()})
    work = tmp_path / "work"
    work.mkdir()
    proc = _ingest(work, {"source": "imagefolder", "path": str(root)})
    assert_user_error(proc, "ingest", "has a newline or control character in its name")
    _assert_nothing_left(work)


def test_a_train_run_killed_mid_way_leaves_no_current_looking_summary(tmp_path: Path) -> None:
    """dvclive's metrics.json is written when training ends, not after every epoch: a killed
    run's epoch-1 numbers must not pass for the result of `dvc metrics show`."""
    write_processed(tmp_path / "proc", n_train=200, n_val=20)
    write_train_params(tmp_path, epochs=1000, batch_size=50)
    stale = tmp_path / "dvclive" / "train" / "metrics.json"
    stale.parent.mkdir(parents=True)
    stale.write_text('{"train": {"acc": 0.99}}')  # what an earlier, finished run left
    proc = subprocess.Popen([sys.executable, "-m", "stages.train", *TRAIN_ARGS], cwd=tmp_path,
                            env={**subprocess_env(), "PYTHONPATH": str(PROJECT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "models" / "checkpoint.pt"
    try:
        deadline = time.monotonic() + 120
        while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert checkpoint.exists(), "no epoch finished"
        time.sleep(0.5)  # a little into the next epochs
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (tmp_path / "dvclive/train/plots/metrics/train/acc.tsv").is_file()  # it did log
    assert not stale.exists()
    assert not (tmp_path / "models" / "model.pt").exists()
