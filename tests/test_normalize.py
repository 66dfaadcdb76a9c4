"""normalize: stratified validation split, train-only statistics, class counts; the raw
layout (uint8 N x 3 x 32 x 32) passes through unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from stage_cli import assert_user_error, run_stage

from stages.errors import UserError
from stages.ingest import write_raw
from stages.io import load_split
from stages.normalize import channel_stats, main, make_splits, stratified_split
from stages.params import NormalizeParams
from stages.sources.raw import RawData


def _raw(n_train: int = 300, n_test: int = 60, n_classes: int = 3, seed: int = 0) -> RawData:
    rng = np.random.default_rng(seed)
    return RawData(
        rng.integers(0, 256, (n_train, 3, 32, 32), dtype=np.uint8),
        np.arange(n_train) % n_classes,
        rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8),
        np.arange(n_test) % n_classes,
        tuple(f"c{i}" for i in range(n_classes)), source="test",
    )


def test_split_is_stratified_disjoint_and_seeded() -> None:
    labels = np.repeat(np.arange(4), [100, 50, 30, 20])
    train, val = stratified_split(labels, 0.2, seed=3, n_classes=4)
    assert np.intersect1d(train, val).size == 0
    assert len(train) + len(val) == len(labels)
    # every class gives the same fraction, even the rare ones
    assert np.bincount(labels[val], minlength=4).tolist() == [20, 10, 6, 4]
    again, _ = stratified_split(labels, 0.2, seed=3, n_classes=4)
    other, _ = stratified_split(labels, 0.2, seed=4, n_classes=4)
    assert np.array_equal(train, again)
    assert not np.array_equal(train, other)


def test_stats_are_exact_and_from_the_train_split_only() -> None:
    raw = _raw()
    # make the test split wildly different: it must not move the statistics
    test = (np.full_like(raw.test_images, 255), raw.test_labels)
    out = make_splits((raw.train_images, raw.train_labels), test, raw.classes, "test",
                      NormalizeParams(val_fraction=0.2, seed=0))
    train_nchw = out.splits["train"][0]
    as_float = train_nchw.astype(np.float64) / 255
    np.testing.assert_allclose(out.stats["mean"], as_float.mean(axis=(0, 2, 3)), atol=1e-9)
    np.testing.assert_allclose(out.stats["std"], as_float.std(axis=(0, 2, 3)), atol=1e-9)
    assert out.stats["class_counts"] == {"train": [80, 80, 80], "val": [20, 20, 20],
                                         "test": [20, 20, 20]}


def test_images_keep_the_raw_layout_and_pixels() -> None:
    raw = _raw()
    out = make_splits((raw.train_images, raw.train_labels), (raw.test_images, raw.test_labels),
                      raw.classes, "test", NormalizeParams(val_fraction=0.0))
    images, labels = out.splits["train"]
    assert images.dtype == np.uint8 and images.shape == (300, 3, 32, 32)
    assert images.flags["C_CONTIGUOUS"] and labels.dtype == np.int64
    assert np.array_equal(images, raw.train_images)
    assert out.splits["val"][0].shape == (0, 3, 32, 32)


def test_standardize_false_records_identity_statistics() -> None:
    raw = _raw()
    out = make_splits((raw.train_images, raw.train_labels), (raw.test_images, raw.test_labels),
                      raw.classes, "test", NormalizeParams(standardize=False))
    assert out.stats["mean"] == [0.0, 0.0, 0.0] and out.stats["std"] == [1.0, 1.0, 1.0]


def test_channel_stats_constant_image() -> None:
    mean, std = channel_stats(np.full((2, 3, 4, 4), 51, np.uint8))
    assert mean == pytest.approx([0.2] * 3) and std == pytest.approx([0.0] * 3)


def test_main_writes_the_processed_contract(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            ) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"normalize": {"val_fraction": 0.1}}))
    write_raw(tmp_path / "raw", _raw())
    main(["--raw", "raw", "--out", "processed"])
    stats = json.loads((tmp_path / "processed" / "stats.json").read_text())
    assert stats["classes"] == ["c0", "c1", "c2"] and stats["source"] == "test"
    assert set(stats) >= {"mean", "std", "class_counts"}
    sizes = {}
    for split in ("train", "val", "test"):
        images, labels = load_split(tmp_path / "processed" / f"{split}.npz")
        assert images.dtype == np.uint8 and images.shape[1:] == (3, 32, 32)
        assert np.bincount(labels).tolist() == stats["class_counts"][split]
        sizes[split] = len(labels)
    assert sizes == {"train": 270, "val": 30, "test": 60}


def test_missing_raw_is_a_clear_error_and_removes_stale_output(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("{}\n")
    stale = tmp_path / "processed"
    stale.mkdir()
    (stale / "stats.json").write_text("{}")
    with pytest.raises(UserError, match="raw/meta.json: missing"):
        main(["--raw", "raw", "--out", "processed"])
    assert not stale.exists()


def test_cli_exit_2_without_traceback(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"normalize": {"val_fraction": 2}}))
    proc = run_stage("normalize", ["--raw", "raw", "--out", "processed"], tmp_path)
    assert_user_error(proc, "normalize", "normalize.val_fraction")
    assert not (tmp_path / "processed").exists()
