"""`python -m stages.predict IMAGE...` classifies PNG/JPEG files of any size."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import PROJECT, subprocess_env
from PIL import Image
from train_data import learnable_images, write_processed, write_train_params

from stages.errors import UserError
from stages.predict import load_image
from stages.predict import main as predict_main
from stages.train import main as train_main

LINE = re.compile(r"^(?P<path>\S+): (?P<ranked>(class\d \d\.\d{3}(, )?)+)$")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pipeline-like folder (dvc.yaml + models/model.pt) with a model trained on tiny data."""
    folder = tmp_path_factory.mktemp("trained")
    write_processed(folder / "proc", n_train=600, n_val=100)
    write_train_params(folder, epochs=3, batch_size=32)
    shutil.copy2(PROJECT / "dvc.yaml", folder / "dvc.yaml")
    mp = pytest.MonkeyPatch()
    mp.chdir(folder)
    try:
        train_main(["--data", "proc", "--model", "models/model.pt", "--checkpoint",
                    "models/checkpoint.pt", "--live", "dvclive/train"])
    finally:
        mp.undo()
    return folder


def _save(folder: Path, image: np.ndarray, name: str, size: tuple[int, int], mode: str) -> Path:
    """A CHW uint8 test image, upscaled to ``size`` and saved in ``mode`` (RGB/RGBA)."""
    img = Image.fromarray(image.transpose(1, 2, 0)).resize(size, Image.Resampling.NEAREST)
    path = folder / name
    img.convert(mode).save(path)
    return path


def test_predict_prints_top_classes_for_png_and_jpeg(trained: Path, tmp_path: Path) -> None:
    images, labels = learnable_images(20, seed=1)
    files = [_save(tmp_path, images[0], "big.png", (96, 96), "RGBA"),
             _save(tmp_path, images[1], "wide.jpg", (128, 64), "RGB"),
             _save(tmp_path, images[2], "same.png", (32, 32), "RGB")]
    proc = subprocess.run([sys.executable, "-m", "stages.predict", *map(str, files),
                           "--top", "3"], cwd=trained, capture_output=True, text=True,
                          env={**subprocess_env(), "PYTHONPATH": str(PROJECT)})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 3
    for line, path, label in zip(lines, files, labels[:3], strict=True):
        m = LINE.match(line)
        assert m and m["path"] == str(path), line
        ranked = [(name, float(p)) for name, p in
                  (item.rsplit(" ", 1) for item in m["ranked"].split(", "))]
        assert len(ranked) == 3
        probs = [p for _, p in ranked]
        assert probs == sorted(probs, reverse=True)
        assert ranked[0][0] == f"class{label}"  # the model trained on these patterns


def test_predict_reports_unreadable_files(trained: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    monkeypatch.chdir(trained)
    with pytest.raises(UserError, match="notes.png: not a readable PNG/JPEG image"):
        predict_main([str(bad)])
    # a decompression bomb (tiny file, 196 megapixels) is refused, not decoded
    from PIL import Image
    bomb = tmp_path / "bomb.png"
    Image.new("1", (14000, 14000)).save(bomb)
    with pytest.raises(UserError, match=r"bomb.png: 14000 x 14000 pixels, more than"):
        predict_main([str(bomb)])
    with pytest.raises(UserError, match="missing.jpg: no such image file"):
        predict_main([str(tmp_path / "missing.jpg")])
    with pytest.raises(UserError, match="model file not found"):
        predict_main(["--model", str(tmp_path / "none.pt"), str(bad)])


def test_load_image_resizes_any_mode(tmp_path: Path) -> None:
    path = tmp_path / "grey.png"
    Image.fromarray(np.full((50, 70), 200, np.uint8), mode="L").save(path)
    arr = load_image(path, (32, 32))
    assert arr.shape == (3, 32, 32) and arr.dtype == np.uint8 and (arr == 200).all()
