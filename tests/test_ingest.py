"""ingest: the synthetic source (the default) and the raw-data contract the stage writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from stages.ingest import main
from stages.io import load_split
from stages.models import build_model
from stages.sources.synthetic import CLASSES, generate


def test_synthetic_is_deterministic_balanced_and_seeded() -> None:
    a_img, a_lab = generate(500, seed=1, split="train")
    b_img, b_lab = generate(500, seed=1, split="train")
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)
    assert a_img.dtype == np.uint8 and a_img.shape == (500, 3, 32, 32)
    assert a_lab.dtype == np.int64 and np.bincount(a_lab).tolist() == [50] * 10
    other, _ = generate(500, seed=2, split="train")
    test, _ = generate(500, seed=1, split="test")
    assert not np.array_equal(a_img, other) and not np.array_equal(a_img, test)
    # images use the whole range, not a washed-out corner of it
    assert a_img.min() < 20 and a_img.max() > 235


def test_synthetic_classes_have_descriptive_names() -> None:
    assert len(CLASSES) == 10 and len(set(CLASSES)) == 10
    assert {"circle", "square", "stripes"} <= set(CLASSES)


def _nearest_centroid_accuracy(x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray,
                               y_te: np.ndarray) -> float:
    centroids = np.stack([x_tr[y_tr == c].mean(0) for c in range(10)])
    pred = np.argmin(((x_te[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    return float((pred == y_te).mean())


@pytest.mark.slow  # a real end-to-end run: over ~30 s on 2 cores
def test_mean_colour_does_not_give_the_class_away_but_a_cnn_learns_it() -> None:
    """The class is in the shape: mean colour is at chance, the seed net learns fast."""
    x_tr, y_tr = generate(2000, seed=0, split="train")
    x_te, y_te = generate(500, seed=0, split="test")
    colour = _nearest_centroid_accuracy(x_tr.reshape(2000, 3, -1).mean(2), y_tr,
                                        x_te.reshape(500, 3, -1).mean(2), y_te)
    assert colour < 0.16, f"mean colour predicts the class ({colour:.2f}); chance is 0.10"

    torch.manual_seed(0)
    model = build_model("seed_net", 10, [0.5] * 3, [0.28] * 3)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt = torch.from_numpy(x_tr)
    yt = torch.from_numpy(y_tr)
    for _ in range(2):
        model.train()
        for idx in torch.randperm(2000).split(32):
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(x_te)).argmax(1)
    acc = float((pred.numpy() == y_te).mean())
    assert acc > 0.3, f"the seed net reached only {acc:.2f} after 2 epochs on 2,000 images"


def test_main_writes_the_raw_contract(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {"data": {"synthetic": {"n_train": 200, "n_test": 50, "seed": 3}}}))
    main(["--out", "data/raw"])
    raw = tmp_path / "data" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == ["meta.json", "test.npz", "train.npz"]
    meta = json.loads((raw / "meta.json").read_text())
    assert meta["classes"] == list(CLASSES) and meta["source"] == "synthetic"
    assert (meta["n_train"], meta["n_test"]) == (200, 50)
    images, labels = load_split(raw / "train.npz")
    expected, expected_labels = generate(200, seed=3, split="train")
    assert np.array_equal(images, expected) and np.array_equal(labels, expected_labels)
    # no temp folders left beside the output
    assert [p.name for p in raw.parent.iterdir()] == ["raw"]
