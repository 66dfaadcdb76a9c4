"""ingest, sources npz and imagefolder: users' own files, and the real CIFAR-10 JPEGs."""

from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.errors import UserError
from stages.sources.imagefolder import load_imagefolder
from stages.sources.npz import load_npz
from stages.sources.raw import CIFAR10_CLASSES, validate_raw


# ----------------------------------------------------------------------------------- npz
def _npz(path: Path, **arrays: np.ndarray) -> Path:
    rng = np.random.default_rng(0)
    base = {
        "X_train": rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8),
        "y_train": (np.arange(20) % 10).reshape(-1, 1).astype(np.uint8),  # Keras' N x 1
        "X_test": rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8),
        "y_test": np.arange(6) % 10,
    }
    base.update(arrays)
    np.savez(path, **{k: v for k, v in base.items() if v is not None})
    return path


def test_npz_tutorial_layout(tmp_path: Path) -> None:
    path = _npz(tmp_path / "cifar10.npz")
    data = load_npz(str(path))
    validate_raw(data, str(path))
    with np.load(path) as z:  # the tutorial's channels-last images, in the NCHW contract
        assert np.array_equal(data.train_images, z["X_train"].transpose(0, 3, 1, 2))
        assert data.train_labels.tolist() == z["y_train"][:, 0].tolist()
    assert data.train_labels.dtype == np.int64 and data.classes == CIFAR10_CLASSES


def test_npz_channels_first_and_class_names(tmp_path: Path) -> None:
    nchw = np.random.default_rng(1).integers(0, 256, (20, 3, 32, 32), dtype=np.uint8)
    path = _npz(tmp_path / "d.npz", X_train=nchw, y_train=np.arange(20) % 2,
                y_test=np.arange(6) % 2, classes=np.array(["cat", "dog"]))
    data = load_npz(str(path))
    assert np.array_equal(data.train_images, nchw) and data.classes == ("cat", "dog")


# object arrays and float images: the command-line suite (test_ingest_bad_inputs.py)
@pytest.mark.parametrize(("arrays", "message"), [
    ({"y_test": None}, "missing y_test"),
    ({"X_test": np.zeros((6, 28, 28), np.uint8)}, r"X_test: shape \(6, 28, 28\)"),
    ({"y_train": np.arange(19)}, "y_train"),
])
def test_npz_bad_input(tmp_path: Path, arrays: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        load_npz(str(_npz(tmp_path / "d.npz", **arrays)))


def test_npz_labels_out_of_range_and_not_a_zip(tmp_path: Path) -> None:
    path = _npz(tmp_path / "d.npz", y_test=np.array([0, 1, 2, 3, 4, -1]),
                classes=np.array([f"c{i}" for i in range(10)]))
    with pytest.raises(UserError, match=r"test split: label value\(s\) -1 outside 0\.\.9"):
        validate_raw(load_npz(str(path)), str(path))
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(UserError, match="not a valid .npz"):
        load_npz(str(junk))


# --------------------------------------------------------------------------- imagefolder
def _image(path: Path, colour: tuple[int, int, int], size: int = 32, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", (size, size), colour)
    im.convert(mode).save(path)


def _folder(root: Path) -> Path:
    """train: cat 2 PNG (one 64x48, one grey), dog 1 JPEG; test: cat 1, dog 1."""
    _image(root / "train" / "cat" / "a.png", (250, 0, 0))
    Image.new("RGB", (64, 48), (240, 10, 10)).save(root / "train" / "cat" / "big.png")
    _image(root / "train" / "cat" / "grey.png", (100, 100, 100), mode="L")
    _image(root / "train" / "dog" / "b.jpg", (0, 0, 250))
    _image(root / "test" / "cat" / "c.PNG", (250, 0, 0))
    _image(root / "test" / "dog" / "d.jpeg", (0, 0, 250))
    (root / "train" / "notes.txt").write_text("not an image")
    return root


def _check_folder_data(data) -> None:  # noqa: ANN001
    validate_raw(data, "test")
    assert data.classes == ("cat", "dog")
    assert data.train_labels.tolist() == [0, 0, 0, 1] and data.test_labels.tolist() == [0, 1]
    assert data.train_images[0, :, 5, 5].tolist() == [250, 0, 0]      # a.png
    assert data.train_images[1, :, 5, 5].tolist() == [240, 10, 10]    # big.png, resized
    assert data.train_images[2, :, 5, 5].tolist() == [100, 100, 100]  # grey -> RGB
    assert abs(int(data.train_images[3, 2, 5, 5]) - 250) < 8          # JPEG is lossy


def test_imagefolder_folder_resizes_with_a_log_note(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="convflow.ingest"):
        data = load_imagefolder(str(_folder(tmp_path / "imgs")))
    _check_folder_data(data)
    assert "resized 1 image(s)" in caplog.text and "ignored 1 file(s)" in caplog.text


def test_imagefolder_tar_gz_inside_a_top_level_folder(tmp_path: Path) -> None:
    root = _folder(tmp_path / "mydata")
    archive = tmp_path / "mydata.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="mydata")
    _check_folder_data(load_imagefolder(str(archive)))


def test_imagefolder_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_imagefolder(str(tmp_path / "nowhere"))
    root = _folder(tmp_path / "imgs")
    _image(root / "test" / "fox" / "e.png", (1, 2, 3))
    with pytest.raises(UserError, match="test/ has class folder"):
        load_imagefolder(str(root))
    flat = tmp_path / "flat"
    _image(flat / "cat" / "a.png", (1, 2, 3))
    with pytest.raises(UserError, match="no train/<class>/ folders"):
        load_imagefolder(str(flat))


def test_imagefolder_archive_with_an_escaping_member(tmp_path: Path) -> None:
    root = _folder(tmp_path / "imgs")
    archive = tmp_path / "imgs.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname=".")
        info = tarfile.TarInfo("train/cat/../../../escaped.png")
        blob = (root / "train" / "cat" / "a.png").read_bytes()
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
    with pytest.raises(UserError, match="unsafe member"):
        load_imagefolder(str(archive))


@pytest.mark.slow  # a real end-to-end run: over ~30 s on 2 cores
@pytest.mark.realdata
def test_imagefolder_on_the_real_cifar10_jpegs(cifar_jpeg: Path) -> None:
    data = load_imagefolder(str(cifar_jpeg))
    validate_raw(data, str(cifar_jpeg))
    assert data.classes == CIFAR10_CLASSES
    assert data.train_images.shape == (50_000, 3, 32, 32)
    assert data.test_images.shape == (10_000, 3, 32, 32)
    assert np.bincount(data.train_labels).tolist() == [5000] * 10
    assert np.bincount(data.test_labels).tolist() == [1000] * 10
    # real photographs, not blank decodes
    assert 80 < data.train_images.mean() < 180 and data.train_images.std() > 40
