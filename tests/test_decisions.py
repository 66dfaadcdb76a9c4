"""The decisions the pipeline makes, at their edges: the mutants scripts/mutation.sh makes of
the gate, the params bounds, the data report, the input caps, publishing, slots and the
registry must each fail one of these (fast, in-process) tests."""

from __future__ import annotations

import hashlib
import http.client
import http.server
import json
import logging
import math
import os
import re
import socket
import subprocess
import sys
import threading
import urllib.error
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import PROJECT, dvc, git, init_and_commit
from test_decisions_flows import registry_dvc_yaml, set_identity

from flows import publish, registry, results_branch, runner, slots
from flows.runner import StageFailed
from stages.data_report import (
    build_report,
    class_balance_rows,
    find_duplicates,
    sha256_path,
    write_report,
)
from stages.errors import UserError
from stages.gate import read_baseline, unjudgeable, verdict
from stages.ingest import drop_duplicates
from stages.params import (
    OFFICIAL_CIFAR10_SHA256,
    OFFICIAL_CIFAR10_URL,
    GateParams,
    Params,
    accepted_range,
    flatten,
    load_yaml,
    parse_params,
    shorten,
)
from stages.sources import safety
from stages.sources.raw import RawData, validate_raw


# ------------------------------------------------------------------------------------ gate
def _prod(accuracy: float | None, version: str | None = "v1") -> dict:
    return {"version": version, "rev": "abc", "accuracy": accuracy}


@pytest.mark.parametrize(("accuracy", "prod", "passed"), [
    (0.85, 0.90, True),  # a drop of exactly gate.max_drop passes
    (0.849999, 0.90, False),  # a hair more does not
    (0.95, 0.90, True),  # better than production
])
def test_the_drop_limit_is_inclusive(accuracy: float, prod: float, passed: bool) -> None:
    result = verdict(accuracy, GateParams(max_drop=0.05), _prod(prod))
    assert result["passed"] is passed, result["reason"]
    assert result["drop"] == round(prod - accuracy, 6)
    assert ("more than gate.max_drop 0.0500" in result["reason"]) is not passed


@pytest.mark.parametrize(("accuracy", "passed"), [(0.5, True), (0.4999, False)])
def test_the_accuracy_floor_is_inclusive(accuracy: float, passed: bool) -> None:
    result = verdict(accuracy, GateParams(min_accuracy=0.5, max_drop=1), _prod(None, None))
    assert result["passed"] is passed
    assert ("below gate.min_accuracy 0.5000" in result["reason"]) is not passed


def test_the_default_gate_allows_a_two_point_drop_and_no_floor() -> None:
    p = GateParams()
    assert (p.min_accuracy, p.max_drop) == (0.0, 0.02)
    assert verdict(0.0, p, _prod(None, None))["passed"]
    assert verdict(0.88, p, _prod(0.90))["passed"]
    assert not verdict(0.8799, p, _prod(0.90))["passed"]


def test_a_passing_verdict_records_every_number_compared() -> None:
    result = verdict(0.91234567, GateParams(min_accuracy=0.5, max_drop=0.05), _prod(0.9))
    assert result == {
        "passed": True, "metric": "test.accuracy", "value": 0.912346, "min_accuracy": 0.5,
        "max_drop": 0.05, "production_version": "v1", "production_accuracy": 0.9,
        "drop": round(0.9 - 0.91234567, 6),
        "reason": "test.accuracy 0.9123 passes gate.min_accuracy 0.5000 and gate.max_drop "
                  "0.0500 (production v1 0.9000)"}
    alone = verdict(0.7, GateParams(), _prod(None, None))
    assert alone["drop"] is None and alone["production_version"] is None
    assert alone["reason"].endswith("(no model in production)")


def test_a_failed_drop_names_production_and_both_numbers() -> None:
    result = verdict(0.8, GateParams(max_drop=0.05), _prod(0.9, "v7"))
    assert result["reason"] == ("test.accuracy 0.8000 is 0.1000 below production v7 (0.9000), "
                                "more than gate.max_drop 0.0500")
    assert result["value"] == 0.8 and result["production_accuracy"] == 0.9


@pytest.mark.parametrize("accuracy", [0.0, 1.0])
def test_accuracies_at_the_ends_of_the_range_are_judged(accuracy: float) -> None:
    assert unjudgeable(accuracy, _prod(accuracy), "m.json", "p.yaml") is None
    assert verdict(accuracy, GateParams(max_drop=1), _prod(accuracy))["passed"]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -0.01, 1.01, True])
def test_an_accuracy_the_gate_cannot_judge_fails_naming_the_file(bad: float) -> None:
    result = verdict(bad, GateParams(), _prod(None, None), metrics_file="m.json")
    assert not result["passed"] and result["value"] is None
    assert result["reason"].startswith("m.json: test.accuracy is ")
    prod = verdict(0.9, GateParams(), _prod(bad), baseline_file="p.yaml")
    assert not prod["passed"] and prod["reason"].startswith("p.yaml: accuracy is ")
    assert prod["production_accuracy"] is None and prod["drop"] is None


def test_a_production_version_without_accuracy_fails() -> None:
    result = verdict(0.9, GateParams(), _prod(None, "v3"), baseline_file="p.yaml")
    assert not result["passed"]
    assert result["reason"].startswith("p.yaml: production version v3 has no accuracy")


def test_the_baseline_file(tmp_path: Path) -> None:
    path = tmp_path / "production.yaml"
    assert read_baseline(path) == {"version": None, "rev": None, "accuracy": None}
    path.write_text("")
    assert read_baseline(path) == {"version": None, "rev": None, "accuracy": None}
    path.write_text("version: v2\nrev: abc\naccuracy: 0.9\n")
    assert read_baseline(path) == {"version": "v2", "rev": "abc", "accuracy": 0.9}
    path.write_text("accuracy: 1\n")
    assert read_baseline(path)["accuracy"] == 1
    for text, message in (("- 1\n", "expected a mapping"), ("accuracy: true\n", "a number"),
                          ("accuracy: high\n", "a number"), ("version: 3\n", "a name"),
                          ("version: \"a\\tb\"\n", "a name")):
        path.write_text(text)
        with pytest.raises(UserError, match=message):
            read_baseline(path)


def _gate_main(tmp: Path, metrics: object, production: str | None = None,
               **gate: float) -> dict:
    from stages.gate import main
    from stages.io import read_json, write_json

    (tmp / "params.yaml").write_text(f"gate: {gate or {}}\n".replace("'", ""))
    write_json(tmp / "evaluate.json", metrics)
    if production is not None:
        (tmp / "production.yaml").write_text(production)
    main(["--metrics", str(tmp / "evaluate.json"), "--production",
          str(tmp / "production.yaml"), "--out", str(tmp / "gate.json")])
    return read_json(tmp / "gate.json")


def test_the_gate_stage_writes_its_verdict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    caplog.set_level("INFO", "convflow.gate")
    result = _gate_main(tmp_path, {"test": {"accuracy": 0.9}}, "version: v1\naccuracy: 0.95\n",
                        max_drop=0.05)
    assert result["passed"] and result["production_version"] == "v1"
    assert result["min_accuracy"] == 0.0 and result["drop"] == 0.05
    assert caplog.records[-1].getMessage().startswith("passed: test.accuracy 0.9000 passes")
    result = _gate_main(tmp_path, {"test": {"accuracy": 1}}, None, min_accuracy=0.5)
    assert result["value"] == 1.0 and result["min_accuracy"] == 0.5
    failed = _gate_main(tmp_path, {"test": {"accuracy": 0.4}}, None, min_accuracy=0.5)
    assert not failed["passed"] and failed["max_drop"] == 0.02
    assert caplog.records[-1].levelname == "WARNING"
    assert caplog.records[-1].getMessage() == f"FAILED: {failed['reason']}"
    assert failed["reason"].startswith("test.accuracy 0.4000 is below gate.min_accuracy")


@pytest.mark.parametrize("metrics", [{}, {"test": {}}, {"test": {"accuracy": True}},
                                     {"test": {"accuracy": "0.9"}}, {"test": 3}, []])
def test_the_gate_stage_needs_a_test_accuracy_number(tmp_path: Path, metrics: object,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"evaluate.json: no test.accuracy number; re-run "):
        _gate_main(tmp_path, metrics)
    assert not (tmp_path / "gate.json").exists()


# ----------------------------------------------------------------------------- data report
def _raw(train: list[int], test: list[int], labels: list[int] | None = None,
         **details: object) -> RawData:
    """Images whose pixels are all the given value (equal values = duplicate images)."""
    def images(values: list[int]) -> np.ndarray:
        return np.stack([np.full((3, 32, 32), v, np.uint8) for v in values])

    train_labels = np.asarray(labels if labels is not None else [v % 3 for v in train])
    return RawData(images(train), train_labels, images(test),
                   np.asarray([v % 3 for v in test]), ("a", "b", "c"), "npz", dict(details))


def test_duplicates_are_counted_apart_from_leaks() -> None:
    # train: 1, 1, 1, 2, 5, 5, 7 (two repeats of 1, one of 5); test holds 2 and 5 (leaks)
    data = _raw([1, 1, 1, 2, 5, 5, 7], [2, 5, 9])
    dups = find_duplicates(data)
    assert dups.within_train.tolist() == [1, 2, 5]
    assert dups.train_in_test.tolist() == [3, 4, 5]
    assert dups.drop().tolist() == [1, 2, 3, 4, 5]
    report = build_report(data, dups, 0, "ab" * 32, "d.npz")
    assert report["duplicates"] == {"within_train": 3, "train_in_test": 3,
                                    "dropped_from_train": 0}
    kept, _, dropped = drop_duplicates(data, True)
    assert dropped == 5 and [int(x[0, 0, 0]) for x in kept.train_images] == [1, 7]
    assert kept.train_labels.tolist() == [1, 1] and kept.test_labels is data.test_labels
    same, _, none = drop_duplicates(data, False)
    assert same is data and none == 0


def test_the_report_counts_images_per_class_and_split() -> None:
    data = _raw([0, 1, 2, 3, 4], [0, 1], labels=[0, 0, 2, 2, 2], sizes={"64x64": 3, "32x32": 4},
                resized=3)
    report = build_report(data, find_duplicates(data), 2, None, None)
    assert report == {
        "source": "npz", "input": {"path": None, "sha256": None}, "classes": 3,
        "images": {"train": {"total": 5, "a": 2, "b": 0, "c": 3},
                   "test": {"total": 2, "a": 1, "b": 1, "c": 0}},
        "sizes_seen": {"32x32": 4, "64x64": 3},
        "resized": {"images": 3, "how": "RGB, bilinear to 32x32 (no crop)"},
        "duplicates": {"within_train": 0, "train_in_test": 2, "dropped_from_train": 2}}
    plain = build_report(_raw([1, 2], [3]), find_duplicates(_raw([1, 2], [3])), 1, None, None)
    assert plain["sizes_seen"] == {"32x32": 4} and plain["resized"]["images"] == 0
    assert class_balance_rows(data) == [{"class": "a", "train": 2, "test": 1},
                                        {"class": "b", "train": 0, "test": 1},
                                        {"class": "c", "train": 3, "test": 0}]


def test_dropping_every_training_image_is_refused() -> None:
    with pytest.raises(UserError, match="d.npz: data.drop_duplicates removed all 2 training"):
        drop_duplicates(_raw([1, 1], [1]), True, "d.npz")


def test_the_input_hash_covers_names_and_bytes_but_not_hidden_files(tmp_path: Path) -> None:
    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "a" / "x.png").write_bytes(b"1")
    (tmp_path / "a" / "sub" / "y.png").write_bytes(b"2")
    first = sha256_path(tmp_path / "a")
    assert first == hashlib.sha256("".join(sorted(
        [f"x.png\0{hashlib.sha256(b'1').hexdigest()}\n",
         f"sub/y.png\0{hashlib.sha256(b'2').hexdigest()}\n"])).encode()).hexdigest()
    (tmp_path / "a" / ".DS_Store").write_bytes(b"junk")
    (tmp_path / "a" / ".git").mkdir()
    (tmp_path / "a" / ".git" / "z").write_bytes(b"junk")
    assert sha256_path(tmp_path / "a") == first
    (tmp_path / "a" / "sub" / "y.png").rename(tmp_path / "a" / "sub" / "w.png")
    assert sha256_path(tmp_path / "a") != first
    assert sha256_path(tmp_path / "a" / "x.png") == hashlib.sha256(b"1").hexdigest()


def test_ingest_refuses_a_label_outside_the_classes() -> None:
    data = _raw([1, 2], [3], labels=[0, 3])
    with pytest.raises(UserError, match=r"d.npz: train split.*label"):
        validate_raw(data, "d.npz")
    validate_raw(_raw([1, 2], [3], labels=[0, 2]), "d.npz")
    with pytest.raises(UserError, match="d.npz: the test split is empty"):
        validate_raw(replace(_raw([1], [2]), test_images=np.empty((0, 3, 32, 32), np.uint8),
                             test_labels=np.empty(0, np.int64)), "d.npz")


# --------------------------------------------------------------------------------- params
#: Every params default, as params.yaml documents it (a changed default must be deliberate).
DEFAULTS = {
    "data.source": "synthetic", "data.path": None, "data.url": OFFICIAL_CIFAR10_URL,
    "data.sha256": OFFICIAL_CIFAR10_SHA256, "data.drop_duplicates": False,
    "data.synthetic.n_train": 10000, "data.synthetic.n_test": 2000, "data.synthetic.seed": 0,
    "normalize.val_fraction": 0.1, "normalize.seed": 0, "normalize.standardize": True,
    "train.model": "seed_net", "train.device": "auto", "train.epochs": 10,
    "train.batch_size": 256, "train.optimizer": "adam", "train.lr": 0.004,
    "train.momentum": 0.9, "train.weight_decay": 0.0005, "train.decay_all": False,
    "train.bias_lr_scale": 1.0, "train.schedule": "onecycle", "train.label_smoothing": 0.1,
    "train.augment_flip": True, "train.flip_mode": "random", "train.augment_crop": 2,
    "train.crop_fill": "zeros", "train.whiten_bias_epochs": None, "train.lookahead": False,
    "train.lookahead_start": 3, "train.lookahead_every": 5, "train.lookahead_decay": 0.95,
    "train.lookahead_power": 3.0, "train.precision": "auto", "train.channels_last": "auto",
    "train.compile": "auto", "train.threads": 0, "train.seed": 0, "train.nproc": 1,
    "train.log_every": 10, "evaluate.batch_size": 1000, "evaluate.tta_flip": False,
    "evaluate.n_wrong": 16, "plot.dpi": 120, "plot.n_images": 10, "plot.kernel_image": 0,
    "gate.min_accuracy": 0.0, "gate.max_drop": 0.02,
}
SEED = 2**32 - 1
#: key: (lowest accepted, highest accepted, first refused below, first refused above)
BOUNDS = {
    "data.synthetic.n_train": (1, 500_000, 0, 500_001),
    "data.synthetic.n_test": (1, 500_000, 0, 500_001),
    "data.synthetic.seed": (0, SEED, -1, SEED + 1),
    "normalize.val_fraction": (0.0, 0.999999, -1e-6, 1.0),
    "normalize.seed": (0, SEED, -1, SEED + 1),
    "train.epochs": (1e-6, 10_000, 0, 10_000.5),  # int | float: the upper bound on both
    "train.batch_size": (1, 65_536, 0, 65_537),
    "train.lr": (1e-12, 1e9, 0, math.inf),
    "train.momentum": (0, 0.999999, -1e-6, 1),
    "train.weight_decay": (0, 1, -1e-6, 1.000001),
    "train.bias_lr_scale": (1e-6, 10_000, 0, 10_000.001),
    "train.label_smoothing": (0, 0.999999, -1e-6, 1),
    "train.augment_crop": (0, 16, -1, 17),
    "train.whiten_bias_epochs": (0, 10_000, -1, 10_001),
    "train.lookahead_start": (0, 10_000, -1, 10_001),
    "train.lookahead_every": (1, 1_000_000, 0, 1_000_001),
    "train.lookahead_decay": (1e-6, 0.999999, 0, 1),
    "train.lookahead_power": (0, 100, -1e-6, 100.000001),
    "train.threads": (0, 1024, -1, 1025),
    "train.seed": (0, SEED, -1, SEED + 1),
    "train.nproc": (1, 64, 0, 65),
    "train.log_every": (1, 1_000_000, 0, 1_000_001),
    "evaluate.batch_size": (1, 65_536, 0, 65_537),
    "evaluate.n_wrong": (0, 256, -1, 257),
    "plot.dpi": (1, 600, 0, 601),
    "plot.n_images": (1, 64, 0, 65),
    "plot.kernel_image": (0, 500_000, -1, 500_001),
    "gate.min_accuracy": (0, 1, -1e-6, 1.000001),
    "gate.max_drop": (0, 1, -1e-6, 1.000001),
}


def _params(key: str, value: object) -> dict:
    *groups, name = key.split(".")
    raw: dict = {name: value}
    for group in reversed(groups):
        raw = {group: raw}
    return raw


def test_every_default_is_the_documented_one() -> None:
    assert flatten(Params()) == DEFAULTS
    assert flatten(parse_params(None)) == DEFAULTS


@pytest.mark.parametrize("key", sorted(BOUNDS))
def test_each_bound_is_where_the_schema_says(key: str) -> None:
    low, high, below, above = BOUNDS[key]
    for ok in (low, high):
        assert flatten(parse_params(_params(key, ok)))[key] == ok
    for bad in (below, above):
        with pytest.raises(UserError, match=rf"params.yaml: {re.escape(key)}: "):
            parse_params(_params(key, bad))
    if isinstance(high, int) and not isinstance(above, float):
        with pytest.raises(UserError, match=re.escape(key)):
            parse_params(_params(key, high + 0.5))  # an int field takes no fraction


@pytest.mark.parametrize(("key", "value", "shown"), [
    ("train.epochs", 0, "(got 0); accepted: 0 < x <= 10000"),
    ("train.momentum", 1, "(got 1); accepted: 0 <= x < 1"),
    ("normalize.val_fraction", 1.5, "(got 1.5); accepted: 0.0 <= x < 1.0"),
    ("train.lr", -1, "(got -1); accepted: 0 < x"),
    ("train.lr", math.nan, "finite number (got nan); accepted: 0 < x"),
])
def test_a_value_out_of_range_names_the_range(key: str, value: float, shown: str) -> None:
    with pytest.raises(UserError) as info:
        parse_params(_params(key, value))
    assert str(info.value).startswith(f"invalid parameters:\n  params.yaml: {key}: ")
    assert str(info.value).endswith(shown)


def test_several_problems_are_listed_one_a_line() -> None:
    with pytest.raises(UserError) as info:
        parse_params({"train": {"epochs": 0, "lrr": 1}, "gate": "x"}, "p.yaml")
    lines = str(info.value).splitlines()
    assert lines[0] == "invalid parameters:" and len(lines) == 4
    assert "  p.yaml: unknown key 'train.lrr' in 'train'; accepted keys: augment_crop, " \
           "augment_flip, batch_size" in str(info.value)
    assert any(line.startswith("  p.yaml: gate: ") and "(got 'x')" in line for line in lines)
    assert accepted_range(("train", "model")) == ""
    assert accepted_range(("gate", "max_drop")) == "0 <= x <= 1"


def test_a_key_at_the_top_level_lists_the_groups() -> None:
    with pytest.raises(UserError, match=r"unknown key 'trian'; accepted keys: data, evaluate, "
                                        r"gate, normalize, plot, train$"):
        parse_params({"trian": {}})
    with pytest.raises(UserError, match="x.yaml: expected a mapping of groups .*got list"):
        parse_params([1], "x.yaml")


@pytest.mark.parametrize(("source", "hint"), [("npz", ""), ("imagefolder", ""),
                                              ("cifar10", " (data/download: the fetch stage")])
def test_sources_that_read_files_need_data_path(source: str, hint: str) -> None:
    with pytest.raises(UserError, match=re.escape(
            f"data.source '{source}' reads a local file: set data.path to it{hint}")):
        parse_params({"data": {"source": source}})
    assert parse_params({"data": {"source": source, "path": "x"}}).data.path == "x"


def test_shorten_cuts_long_values_with_an_ellipsis() -> None:
    assert shorten("a" * 80) == "a" * 80
    assert shorten("a" * 81) == "a" * 79 + "…"
    assert shorten(12345, 3) == "12…"


def test_unjudgeable_verdicts_say_what_to_do() -> None:
    assert verdict(math.nan, GateParams(), _prod(None, None))["reason"] == (
        "evaluate.json: test.accuracy is nan, not a number in [0, 1]; the gate cannot judge "
        "it (re-run evaluate: dvc repro -f evaluate)")
    assert verdict(0.9, GateParams(), _prod(2.0))["reason"] == (
        "production.yaml: accuracy is 2.0, not a number in [0, 1]; gate.max_drop cannot be "
        "checked (restore the file from git or let the flow rewrite it)")
    assert verdict(0.9, GateParams(), _prod(None, "v3"))["reason"] == (
        "production.yaml: production version v3 has no accuracy; gate.max_drop cannot be "
        "checked (record its test.accuracy there, or put a model with metrics in production)")


def test_the_gate_stage_fails_closed_on_nan_naming_its_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stages.gate import main
    from stages.io import read_json

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("gate: {}\n")
    (tmp_path / "m.json").write_text('{"test": {"accuracy": NaN}}')
    (tmp_path / "p.yaml").write_text("version: v1\naccuracy: 0.9\n")
    main(["--metrics", "m.json", "--production", "p.yaml", "--out", "g.json"])
    result = read_json(tmp_path / "g.json")
    assert not result["passed"] and result["reason"].startswith("m.json: test.accuracy is nan")
    (tmp_path / "m.json").write_text('{"test": {"accuracy": 0.9}}')
    (tmp_path / "p.yaml").write_text("version: v1\naccuracy: .nan\n")
    main(["--metrics", "m.json", "--production", "p.yaml", "--out", "g.json"])
    assert read_json(tmp_path / "g.json")["reason"].startswith("p.yaml: accuracy is nan")


def test_the_gate_stage_takes_three_required_paths(capsys: pytest.CaptureFixture[str]) -> None:
    from stages.gate import main

    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    for text in ("Stage ``gate``: the quality verdict on the evaluated model, written as a "
                 "metrics file.", "--metrics METRICS evaluate's metrics file (evaluate.json)",
                 "--production PRODUCTION production baseline (production.yaml)",
                 "--out OUT verdict file to write (gate.json)"):
        assert text in shown
    for missing in ("--metrics", "--production", "--out"):
        args = {"--metrics": "m", "--production": "p", "--out": "o"}
        del args[missing]
        with pytest.raises(SystemExit) as info:
            main([x for kv in args.items() for x in kv])
        assert info.value.code == 2
        assert f"the following arguments are required: {missing}" in capsys.readouterr().err


# ------------------------------------------------------------------------- input safety caps
def test_env_numbers_must_be_positive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONVFLOW_X", raising=False)
    assert safety.env_number("CONVFLOW_X", 3) == 3
    monkeypatch.setenv("CONVFLOW_X", "")
    assert safety.env_number("CONVFLOW_X", 3) == 3
    monkeypatch.setenv("CONVFLOW_X", "2.5")
    assert safety.env_number("CONVFLOW_X", 3) == 2.5
    for raw, message in (("lots", "CONVFLOW_X='lots': expected a number"),
                         ("0", "CONVFLOW_X='0': expected a positive number"),
                         ("-1", "CONVFLOW_X='-1': expected a positive number")):
        monkeypatch.setenv("CONVFLOW_X", raw)
        with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
            safety.env_number("CONVFLOW_X", 3)


def test_the_size_caps_and_their_knobs(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CONVFLOW_MAX_FILE_MB", "CONVFLOW_MAX_EXPANSION", "CONVFLOW_MAX_DOWNLOAD_MB"):
        monkeypatch.delenv(name, raising=False)
    assert safety.max_file_bytes() == 64 << 20
    assert safety.expansion_budget(1000) == (32 << 20) + 50 * 1000
    assert safety.download_cap("0" * 64) == 512 << 20
    assert safety.download_cap(OFFICIAL_CIFAR10_SHA256.upper()) == 170_498_071
    monkeypatch.setenv("CONVFLOW_MAX_FILE_MB", "0.5")
    monkeypatch.setenv("CONVFLOW_MAX_EXPANSION", "2")
    monkeypatch.setenv("CONVFLOW_MAX_DOWNLOAD_MB", "3")
    assert safety.max_file_bytes() == 1 << 19
    assert safety.expansion_budget(1000) == (32 << 20) + 2000
    assert safety.download_cap("0" * 64) == 3 << 20
    assert str(safety.too_big("a.tar", 3 << 20, 1 << 20, "KNOB")) == (
        "a.tar: would decompress to 3.0 MB, more than the 1.0 MB allowed (a decompression "
        "bomb or a file that is not what it claims); refused. If you trust it, raise KNOB")


def test_only_regular_files_are_read_up_to_the_cap(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVFLOW_MAX_FILE_MB", str(100 / (1 << 20)))  # 100 bytes
    (tmp_path / "ok").write_bytes(b"x" * 100)
    assert safety.read_regular_file(tmp_path / "ok") == b"x" * 100
    (tmp_path / "big").write_bytes(b"x" * 101)
    with pytest.raises(UserError, match=r"big: would decompress to 0\.0 MB.*MAX_FILE_MB$"):
        safety.read_regular_file(tmp_path / "big")
    with pytest.raises(UserError, match=r"status: holds more than the 100 bytes allowed for "
                                        r"one file \(its size said 0 bytes\)"):
        safety.read_regular_file("/proc/self/status")  # claims 0 bytes, holds more
    with pytest.raises(UserError, match=r"nope: no such image file$"):
        safety.read_regular_file(tmp_path / "nope")
    os.mkfifo(tmp_path / "fifo")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "sock"))
        for path, kind in (("fifo", "a FIFO"), ("/dev/null", "a device"), (".", "a folder"),
                           ("sock", "a socket")):
            with pytest.raises(UserError, match=rf"^{tmp_path / path}: {kind}, not a regular "
                                                rf"file; only regular image files are read "
                                                rf"\(replace it with the file itself\)$"):
                safety.read_regular_file(tmp_path / path)


@pytest.mark.parametrize(("url", "name"), [
    ("https://example.org/a/cifar.tar.gz?x=1", "cifar.tar.gz"),
    ("https://example.org/", "cifar-10-python.tar.gz")])
def test_a_download_is_stored_under_the_urls_file_name(url: str, name: str) -> None:
    assert safety.archive_name(url) == name


@pytest.mark.parametrize(("url", "message"), [
    ("ftp://example.org/c.tar.gz", "is not an http:// or https:// URL"),
    ("https:///c.tar.gz", "is not an http:// or https:// URL"),
    ("http://example.org/a/..", "ends in '..', not a file name"),
    ("http://[::1/c.tar.gz", "is not a valid URL"),
])
def test_only_http_urls_of_a_file_are_downloaded(url: str, message: str) -> None:
    with pytest.raises(UserError, match=re.escape(f"data.url: {url!r} {message}")):
        safety.check_url(url)
    safety.check_url("HTTPS://example.org/c.tar.gz")
    safety.check_url("http://example.org/c.tar.gz")


def test_a_checksum_is_compared_case_blind(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"abc")
    digest = hashlib.sha256(b"abc").hexdigest()
    assert safety.sha256_file(tmp_path / "f") == digest
    safety.verify_sha256(tmp_path / "f", digest.upper(), "fix")
    with pytest.raises(UserError) as info:
        safety.verify_sha256(tmp_path / "f", "AB" * 32, "Fix it.")
    assert str(info.value) == (f"{tmp_path / 'f'}: sha256 mismatch: expected {'ab' * 32}, got "
                               f"{digest}. Fix it.")


@pytest.mark.parametrize(("err", "transient", "text"), [
    (http.client.IncompleteRead(b""), True, "download of U was cut off before the end; run "
                                            "again. H"),
    (urllib.error.HTTPError("U", 404, "Not Found", {}, None), False,
     "could not download U: HTTP 404 Not Found; check data.url. H"),
    (urllib.error.HTTPError("U", 408, "Timeout", {}, None), True,
     "could not download U: HTTP 408 Timeout. H"),
    (urllib.error.HTTPError("U", 429, "Slow down", {}, None), True,
     "could not download U: HTTP 429 Slow down. H"),
    (urllib.error.HTTPError("U", 499, "Odd", {}, None), False,
     "could not download U: HTTP 499 Odd; check data.url. H"),
    (urllib.error.HTTPError("U", 500, "Oops", {}, None), True,
     "could not download U: HTTP 500 Oops. H"),
    (urllib.error.URLError(TimeoutError()), True,
     "could not download U: the server sent nothing for 7 s (timed out); run again later. H"),
    (TimeoutError(), True,
     "could not download U: the server sent nothing for 7 s (timed out); run again later. H"),
    (urllib.error.URLError("refused"), True, "could not download U: refused. H"),
    (ConnectionResetError("reset"), True, "could not download U: reset. H"),
    (ValueError("bad"), False, "data.url: cannot download 'U' (bad)"),
])
def test_a_failed_download_is_retried_only_when_it_may_pass(err: Exception, transient: bool,
                                                            text: str) -> None:
    failure = safety._failure(err, "U", 7, "H")
    assert isinstance(failure, safety.DownloadError) is transient
    assert isinstance(failure, UserError) and str(failure) == text


def test_a_malformed_baseline_is_one_line_naming_file_value_and_fix(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    fix = "restore it from git, or let `python -m flows run` rewrite it from the registry"
    for text, message in (
            ("- 1\n", "expected a mapping (version, rev, accuracy), got a list"),
            ("accuracy: high\n", "accuracy must be a number or null, got 'high'"),
            ("version: 3\n", "version must be a name or null, got 3")):
        path.write_text(text)
        with pytest.raises(UserError) as info:
            read_baseline(path)
        assert str(info.value) == f"{path}: {message}; {fix}"
    path.write_text("accuracy: [1\n")
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}: invalid YAML at line 2"):
        read_baseline(path)


def test_a_report_file_is_written_whole(tmp_path: Path) -> None:
    write_report(tmp_path / "m" / "data.json", {"a": [1, 2]})
    assert json.loads((tmp_path / "m" / "data.json").read_text()) == {"a": [1, 2]}
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["data.json"]


# ---------------------------------------------------------------------------------- slots
@pytest.fixture
def no_slot_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("CONVFLOW_SLOT", "CONVFLOW_SLOT_STAGES", "CONVFLOW_LEASE_S",
                 "CONVFLOW_SLOT_WAIT_S", "CONVFLOW_SLOT_NOTICE_S", "CONVFLOW_DEVICES",
                 "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_the_default_slot_and_the_ways_to_turn_it_off(no_slot_env: pytest.MonkeyPatch) -> None:
    assert slots.slot_name() == "convflow-gpu" and slots.slot_stages() == {"train"}
    no_slot_env.setenv("CONVFLOW_SLOT", "  team-gpus ")
    assert slots.slot_name() == "team-gpus"
    for off in ("", " ", "off", "OFF", "none", "None", "0"):
        no_slot_env.setenv("CONVFLOW_SLOT", off)
        assert slots.slot_name() is None, off
    no_slot_env.setenv("CONVFLOW_SLOT_STAGES", " train, evaluate ,,")
    assert slots.slot_stages() == {"train", "evaluate"}


def test_lease_and_wait_settings(no_slot_env: pytest.MonkeyPatch) -> None:
    assert slots.lease_s() == 60.0  # Prefect's shortest lease
    no_slot_env.setenv("CONVFLOW_LEASE_S", "30")
    assert slots.lease_s() == 60.0
    no_slot_env.setenv("CONVFLOW_LEASE_S", "90.5")
    assert slots.lease_s() == 90.5
    assert runner.env_seconds("CONVFLOW_SLOT_WAIT_S", 7.0) == 7.0
    no_slot_env.setenv("CONVFLOW_SLOT_WAIT_S", "0")
    assert runner.env_seconds("CONVFLOW_SLOT_WAIT_S", 7.0) == 0.0
    slots.check_settings()
    for bad in ("-1", "inf", "soon", "nan", "x" * 60):
        no_slot_env.setenv("CONVFLOW_SLOT_NOTICE_S", bad)
        with pytest.raises(UserError) as info:
            slots.check_settings()
        assert str(info.value) == (f"CONVFLOW_SLOT_NOTICE_S={bad[:40]!r}: expected a number of "
                                   "seconds, 0 or more")
    no_slot_env.delenv("CONVFLOW_SLOT_NOTICE_S")
    for name in ("CONVFLOW_START_S", "CONVFLOW_CRASH_CHECK_S"):  # the crash automations'
        no_slot_env.setenv(name, "soon")
        with pytest.raises(UserError, match=f"^{name}='soon': expected a number of seconds"):
            slots.check_settings()
        no_slot_env.delenv(name)


def test_devices_come_from_the_first_variable_set(no_slot_env: pytest.MonkeyPatch) -> None:
    no_slot_env.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert slots.gpu_ids() == ["2", "3"]
    no_slot_env.setenv("CONVFLOW_DEVICES", " 0, ,1,-1")
    assert slots.gpu_ids() == ["0", "1"]
    no_slot_env.setenv("CONVFLOW_DEVICES", "")
    assert slots.gpu_ids() == []
    no_slot_env.delenv("CONVFLOW_DEVICES")
    no_slot_env.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert slots.gpu_ids() == []


def test_without_a_gpu_driver_torch_is_not_asked(tmp_path: Path) -> None:
    """A flow run on a CPU machine does not pay torch's import (~1.3 s) to learn it has no GPU;
    with a driver's file present, torch is asked."""
    code = ("import sys; from flows import slots; slots.GPU_DRIVER_FILES = (sys.argv[1],); "
            "print(slots.gpu_ids(), 'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items()
           if k not in ("CONVFLOW_DEVICES", "CUDA_VISIBLE_DEVICES")}
    ask = [sys.executable, "-c", code]
    absent = subprocess.run([*ask, str(tmp_path / "none")], env=env, cwd=PROJECT,
                            capture_output=True, text=True, check=True)
    assert absent.stdout.split() == ["[]", "False"]
    present = subprocess.run([*ask, str(tmp_path)], env=env, cwd=PROJECT,
                             capture_output=True, text=True, check=True)
    assert present.stdout.split()[-1] == "True"


def test_a_device_limit_names_slot_host_and_device(no_slot_env: pytest.MonkeyPatch) -> None:
    no_slot_env.setattr(socket, "gethostname", lambda: "node/1:a%b")
    assert slots.machine() == "node-1-a-b"
    assert slots.device_limit("0") == "convflow-gpu:node-1-a-b:0"
    assert slots.device_limit("GPU-1/2", "pool") == "pool:node-1-a-b:GPU-1-2"
    no_slot_env.setattr(socket, "gethostname", lambda: "")
    assert slots.machine() == "localhost"


def test_a_pool_hands_out_each_device_once_at_a_time() -> None:
    pool = slots.DevicePool(["0", "1"])
    with pool.device() as a, pool.device() as b:
        assert {a["CUDA_VISIBLE_DEVICES"], b["CUDA_VISIBLE_DEVICES"]} == {"0", "1"}
    with pool.device() as again:
        assert again["CUDA_VISIBLE_DEVICES"] in {"0", "1"}
    with slots.DevicePool([]).device() as none:
        assert none == {}


# ------------------------------------------------------------------------------- registry
REGISTRY_DVC_YAML = registry_dvc_yaml("cifar-cnn", "models/model.pt")


@pytest.fixture
def registry_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A git repository with a model artifact; ``_run(repo, md5, acc)`` commits a run."""
    set_identity(monkeypatch)
    repo = tmp_path / "repo"
    (repo / "metrics").mkdir(parents=True)
    (repo / "dvc.yaml").write_text(REGISTRY_DVC_YAML)
    monkeypatch.chdir(tmp_path)  # the repository is always named, never found from here
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "pipeline")
    return repo


def _run(repo: Path, md5: str, accuracy: float | str) -> str:
    lock = {"schema": "2.0", "stages": {"train": {"outs": [{"path": "models/model.pt",
                                                            "md5": md5}]}}}
    (repo / "dvc.lock").write_text(yaml.safe_dump(lock))
    (repo / "metrics" / "evaluate.json").write_text(
        accuracy if isinstance(accuracy, str) else json.dumps({"test": {"accuracy": accuracy}}))
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "--allow-empty", "-m", f"run {md5}")
    return git(repo, "rev-parse", "HEAD").strip()


def _tags(repo: Path) -> list[str]:
    return git(repo, "tag", "-l").split()


def test_a_version_is_registered_only_for_a_new_model(registry_repo: Path) -> None:
    repo = registry_repo
    first = _run(repo, "a" * 32, 0.8)
    assert registry.model_hash(repo, first) == "a" * 32
    assert registry.model_hash(repo, "HEAD~1") is None  # no dvc.lock there
    assert registry.register_version(repo, "m") == "cifar-cnn@v0.0.1"
    _run(repo, "a" * 32, 0.8)  # only the figures changed
    assert registry.register_version(repo, "m") == "cifar-cnn@v0.0.1"
    _run(repo, "b" * 32, 0.85)
    assert registry.register_version(repo, "m") == "cifar-cnn@v0.0.2"
    assert sorted(_tags(repo)) == ["cifar-cnn@v0.0.1", "cifar-cnn@v0.0.2"]


def test_promote_sets_the_baseline_once(registry_repo: Path) -> None:
    repo = registry_repo
    assert registry.production(repo) is None
    assert registry.refresh_baseline(repo) == {"version": None, "rev": None, "accuracy": None}
    with pytest.raises(UserError, match="no registered version of 'cifar-cnn' to promote"):
        registry.promote(repo)
    rev = _run(repo, "a" * 32, 0.8)
    registry.register_version(repo, "m")
    _run(repo, "b" * 32, 0.9)
    registry.register_version(repo, "m")
    assert registry.promote(repo, "v0.0.1") == "cifar-cnn@v0.0.1"
    assert registry.production(repo) == {"artifact": "cifar-cnn", "version": "v0.0.1",
                                         "rev": rev}
    baseline = yaml.safe_load((repo / "production.yaml").read_text())
    assert baseline == {"version": "cifar-cnn@v0.0.1", "rev": rev, "accuracy": 0.8}
    assert (repo / "production.yaml").read_text().startswith("# The model in production")
    tags = _tags(repo)
    assert registry.promote(repo, "v0.0.1") == "cifar-cnn@v0.0.1"
    assert _tags(repo) == tags  # idempotent: no second stage tag
    assert registry.promote(repo) == "cifar-cnn@v0.0.2"  # the latest by default
    assert yaml.safe_load((repo / "production.yaml").read_text())["accuracy"] == 0.9
    assert registry.promote(repo, "v0.0.1", stage="staging") == "cifar-cnn@v0.0.1"
    assert registry.production(repo)["version"] == "v0.0.2"
    assert registry.production(repo, "staging")["version"] == "v0.0.1"


@pytest.mark.parametrize(("version", "shown"), [
    ("1.0", "'1.0'"), ("v1.2", "'v1.2'"), ("v0.0.1x", "'v0.0.1x'"),
    ("v" + "1" * 50, repr("v" + "1" * 39 + "...")),
])
def test_a_version_must_be_semver(registry_repo: Path, version: str, shown: str) -> None:
    _run(registry_repo, "a" * 32, 0.8)
    registry.register_version(registry_repo, "m")
    with pytest.raises(UserError, match=re.escape(f"version {shown}: expected one like v0.0.3")):
        registry.promote(registry_repo, version)
    with pytest.raises(UserError, match="model registry: "):
        registry.promote(registry_repo, "v9.9.9")


def test_accuracy_is_read_from_the_runs_metrics(registry_repo: Path) -> None:
    repo = registry_repo
    assert registry.accuracy_at(repo, _run(repo, "a" * 32, 0.75)) == 0.75
    assert registry.accuracy_at(repo, _run(repo, "a" * 32, "{not json")) is None
    assert registry.accuracy_at(repo, _run(repo, "a" * 32, '{"test": {}}')) is None
    assert registry.accuracy_at(repo, _run(repo, "a" * 32, '{"test": {"accuracy": "x"}}')) is None
    assert registry.accuracy_at(repo, _run(repo, "a" * 32, "[]")) is None
    assert registry.accuracy_at(repo, "HEAD~5") is None  # before any metrics


def test_tags_are_pushed_to_origin_or_the_failure_is_retryable(registry_repo: Path,
                                                                tmp_path: Path) -> None:
    repo = registry_repo
    _run(repo, "a" * 32, 0.8)
    assert not registry.has_origin(repo)
    registry.ship(repo, "m", "prod", push=True, flow_log=logging.getLogger("t"))  # no origin
    assert registry.production(repo)["version"] == "v0.0.1"
    git(tmp_path, "init", "-q", "--bare", "-b", "main", "origin.git")
    git(repo, "remote", "add", "origin", (tmp_path / "origin.git").as_uri())
    assert registry.has_origin(repo)
    git(repo, "tag", "other")
    registry.push_tags(repo)
    pushed = git(tmp_path / "origin.git", "tag", "-l").split()
    assert "cifar-cnn@v0.0.1" in pushed and "other" not in pushed
    assert any(t.startswith("cifar-cnn#prod#") for t in pushed)
    git(repo, "remote", "set-url", "origin", (tmp_path / "gone.git").as_uri())
    with pytest.raises(StageFailed) as info:
        registry.push_tags(repo)
    failed = info.value
    assert (failed.stage, failed.returncode, failed.transient, failed.kind) == (
        "git push", 128, True, "step")
    assert str(failed).endswith("the registry tags of 'cifar-cnn' were not pushed to origin: "
                                "and the repository exists.")  # git's last line


def test_ship_registers_and_promotes_only_when_asked(registry_repo: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    repo = registry_repo
    _run(repo, "a" * 32, 0.8)
    log = logging.getLogger("t")
    caplog.set_level("INFO", "t")
    registry.ship(repo, "run 7 passed", None, push=False, flow_log=log)
    assert _tags(repo) == ["cifar-cnn@v0.0.1"] and registry.production(repo) is None
    assert git(repo, "tag", "-l", "--format=%(contents:subject)", "cifar-cnn@v0.0.1").strip() \
        == "run 7 passed"
    _run(repo, "b" * 32, 0.9)
    registry.ship(repo, "m", "staging", push=False, flow_log=log)
    assert registry.production(repo, "staging")["version"] == "v0.0.2"
    assert registry.production(repo) is None
    assert [r.getMessage() for r in caplog.records if r.name == "t"] == [
        "registered cifar-cnn@v0.0.1", "registered cifar-cnn@v0.0.2",
        "cifar-cnn@v0.0.2 is now in stage 'staging'"]
    (repo / "dvc.yaml").write_text(REGISTRY_DVC_YAML.split("artifacts:")[0])
    tags = _tags(repo)
    registry.ship(repo, "m", "prod", push=False, flow_log=log)  # nothing declared: no-op
    assert _tags(repo) == tags


# ------------------------------------------------------------------------ stage retries
@pytest.mark.parametrize(("stage", "status", "timed_out", "transient"), [
    ("fetch", None, True, True),  # a stalled download
    ("ingest", None, True, True),
    ("train", None, True, False),  # a stalled training repeats itself
    ("train", 75, False, True),  # the stage said: worth a retry
    ("fetch", 2, False, False),  # a user error is never retried
    ("fetch", -9, False, False),  # killed (the OOM killer)
])
def test_which_stage_failures_are_retried(stage: str, status: int | None, timed_out: bool,
                                          transient: bool) -> None:
    from flows.runner import DEFAULT_RETRY_STAGES, is_transient

    assert set(DEFAULT_RETRY_STAGES) == {"fetch", "ingest"}
    assert is_transient(stage, status, timed_out) is transient


# ------------------------------------------------------------------- publishing results
@pytest.fixture
def results_repo(registry_repo: Path, tmp_path: Path) -> Path:
    """``registry_repo`` with one run committed, a bare ``origin`` holding main, and a newer
    metrics file in the workspace (the results to publish)."""
    _run(registry_repo, "a" * 32, 0.8)
    git(tmp_path, "init", "-q", "--bare", "-b", "main", "origin.git")
    git(registry_repo, "remote", "add", "origin", (tmp_path / "origin.git").as_uri())
    git(registry_repo, "push", "-q", "origin", "main")
    (registry_repo / "metrics" / "evaluate.json").write_text('{"test": {"accuracy": 0.9}}')
    return registry_repo


def test_results_are_one_commit_on_the_branch_pushed_once(results_repo: Path,
                                                          tmp_path: Path) -> None:
    repo, start = results_repo, git(results_repo, "rev-parse", "HEAD").strip()
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    lock["stages"]["evaluate"] = {"params": {"params.yaml": {"evaluate.batch_size": 8}},
                                  "outs": [{"path": "metrics/evaluate.json"}]}
    (repo / "dvc.lock").write_text(yaml.safe_dump(lock))
    (repo / "params.yaml").write_text("evaluate:\n  batch_size: 8\n")
    (repo / "notes.txt").write_text("not a result")
    assert results_branch.results_files(repo) == ["dvc.lock", "metrics/evaluate.json",
                                                  "params.yaml"]
    lock["stages"]["plot"] = {"outs": [{"path": "reports/figures/"}]}
    (repo / "dvc.lock").write_text(yaml.safe_dump(lock))
    (repo / "reports" / "figures" / "new").mkdir(parents=True)
    (repo / "reports" / "figures" / "new" / "a.png").write_bytes(b"png")
    (repo / "reports" / ".gitignore").write_text("/cached\n")
    assert results_branch.results_files(repo) == [
        "dvc.lock", "metrics/evaluate.json", "params.yaml", "reports/.gitignore",
        "reports/figures/new/a.png"]
    (repo / "dvc.lock").write_text(yaml.safe_dump({**lock, "stages": {
        k: v for k, v in lock["stages"].items() if k != "plot"}}))
    (repo / "reports" / "figures" / "new" / "a.png").unlink()
    commit = results_branch.publish_results(repo, "results", "results/nightly")
    origin = tmp_path / "origin.git"
    assert git(origin, "rev-parse", "results/nightly").strip() == commit
    assert git(repo, "rev-parse", "HEAD").strip() == commit  # the branch is checked out
    assert git(repo, "log", "-1", "--format=%P %s", commit).split() == [start, "results"]
    assert "notes.txt" not in git(repo, "show", "--name-only", "--format=", commit)
    assert results_branch.publish_results(repo, "again", "results/nightly") is None
    (repo / "metrics" / "evaluate.json").write_text('{"test": {"accuracy": 0.95}}')
    second = results_branch.publish_results(repo, "newer", "results/nightly")
    assert git(repo, "log", "-1", "--format=%P", second).split() == [commit]


def test_without_a_remote_results_are_committed_locally(results_repo: Path) -> None:
    repo = results_repo
    commit = results_branch.publish_results(repo, "local", remote=None,
                                            files=["metrics/evaluate.json"])
    assert git(repo, "rev-parse", "main").strip() == commit
    assert results_branch.publish_results(repo, "local", remote="nowhere",
                                          files=["metrics/evaluate.json"]) is None
    git(repo, "checkout", "-q", "--detach")
    with pytest.raises(results_branch.PublishError, match="HEAD is detached"):
        results_branch.publish_results(repo, "x", remote=None)


def test_a_push_is_retried_only_when_another_run_pushed_first(
        results_repo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Fetching from ``origin`` but pushing to another repository with its own history makes
    every push a non-fast-forward; a hook that declines the push is refused for good."""
    repo = results_repo
    other = tmp_path / "other.git"
    git(tmp_path, "clone", "-q", "--bare", (tmp_path / "origin.git").as_uri(), str(other))
    seed = tmp_path / "seed"
    git(tmp_path, "clone", "-q", other.as_uri(), str(seed))
    (seed / "x").write_text("elsewhere")
    git(seed, "add", "x")
    git(seed, "commit", "-qm", "another run")
    git(seed, "push", "-q", "origin", "main")
    git(repo, "remote", "set-url", "--push", "origin", other.as_uri())
    caplog.set_level("WARNING", "convflow.publish")
    with pytest.raises(results_branch.PublishError) as info:
        results_branch.publish_results(repo, "r", "main", attempts=2,
                                       files=["metrics/evaluate.json"])
    assert "could not push the results commit to origin/main: rejected " in str(info.value)
    assert [r.getMessage()[-5:] for r in caplog.records] == ["(1/2)", "(2/2)"]
    caplog.clear()
    hook = other / "hooks" / "pre-receive"
    hook.write_text("#!/bin/sh\necho protected >&2\nexit 1\n")
    hook.chmod(0o755)
    declined = r"origin/results/x: rejected \[remote rejected\] \(pre-receive"
    with pytest.raises(results_branch.PublishError, match=declined):
        results_branch.publish_results(repo, "r", "results/x", files=["metrics/evaluate.json"])
    assert caplog.records == []  # declined by the server: not retried


@pytest.mark.parametrize(("porcelain", "rejected"), [
    ("To o\n!\tabc:refs/heads/main\t[rejected] (fetch first)\nDone", True),
    ("To o\n!\tabc:refs/heads/main\t[remote rejected] (pre-receive hook declined)", False),
    ("To o\n=\tabc:refs/heads/main\t[up to date]\nDone", False),
    ("!\tabc:refs/heads/main\t[remote rejected] (failed to update ref)", True),
    ("!\tabc:refs/heads/main\t[remote rejected] (cannot lock ref 'refs/heads/main')", True),
    ("!\tabc:refs/heads/main\t[remote rejected] (incorrect old value provided)", True),
    ("remote: \t[rejected] by policy", False),  # only git's ref lines count
    ("", False),
])
def test_only_a_non_fast_forward_is_a_race(porcelain: str, rejected: bool) -> None:
    assert results_branch._rejected(porcelain) is rejected


def test_why_a_push_failed() -> None:
    def proc(out: str, err: str, code: int = 1) -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess([], code, out, err)

    assert results_branch._push_failure(proc("!\tc:r\t[rejected] (fetch first)\n", "")) == \
        "rejected [rejected] (fetch first)"
    assert results_branch._push_failure(proc("", "fatal: a\n\nfatal: b\nfatal: no access \n")) \
        == "fatal: no access"
    error = results_branch.PublishError("why")
    assert (error.stage, error.returncode, error.transient, error.kind) == (
        "git push", None, False, "step")
    assert results_branch._push_failure(proc("", "", 128)) == "git push exited with status 128"


def test_a_deployment_runs_results_branch_and_message(registry_repo: Path) -> None:
    assert results_branch.default_branch("nightly") == "results/nightly"
    assert results_branch.default_branch(None) is None
    start = git(registry_repo, "rev-parse", "HEAD").strip()
    assert results_branch.run_message("pipeline", registry_repo, "brave-cat", 7, "nightly") == (
        f"convflow: pipeline run brave-cat (7) from {start[:12]}\n\nFlow run: brave-cat (7)\n"
        f"Started from: {start}\nDeployment: nightly")
    assert results_branch.run_message("sweep", registry_repo, None, 8, None).splitlines() == [
        f"convflow: sweep run manual (8) from {start[:12]}", "", "Flow run: manual (8)",
        f"Started from: {start}"]


@pytest.mark.parametrize(("output", "permanent"), [
    ("ERROR: failed to push data to the cloud - 403 Forbidden", True),
    ("ERROR: An error occurred (AccessDenied) when calling PutObject", True),
    ("ERROR: no remote specified in the default section of the config", True),
    ("ERROR: config file error: 'remote' is not a valid section", True),
    ("ERROR: Unable to locate credentials", True),
    ("ERROR: failed to transfer 'md5: 5f4036403' - Connection refused", False),
    ("ERROR: unexpected error - 503 Service Unavailable", False),
])
def test_only_remote_errors_a_retry_cannot_fix_are_permanent(output: str,
                                                             permanent: bool) -> None:
    assert bool(publish._PERMANENT.search(output)) is permanent


def test_a_dvc_transfer_names_the_remote_and_whether_to_retry(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    init_and_commit(repo, "empty")
    (repo / "data.txt").write_text("payload")
    dvc(repo, "add", "-q", "data.txt")
    assert publish.describe_remote(repo) == "(no default DVC remote)"
    (tmp_path / "not-a-dir").write_text("")
    dvc(repo, "remote", "add", "-d", "team", str(tmp_path / "not-a-dir" / "store"))
    dvc(repo, "remote", "add", "spare", str(tmp_path / "spare"))
    assert publish.describe_remote(repo).startswith("'team'")
    assert publish.describe_remote(repo, "spare") == f"'spare' ({tmp_path / 'spare'})"
    assert publish.describe_remote(repo, "gone") == "'gone'"
    with pytest.raises(StageFailed) as info:
        publish.dvc_push(repo, logger=logging.getLogger("t"))
    assert not info.value.transient and info.value.stage == "dvc push"
    assert "[DVC remote 'team'" in str(info.value)
    assert str(info.value).endswith("; not retried: fix the remote or its settings]")
    publish.dvc_push(repo, "spare", logger=logging.getLogger("t"))
    assert len(list((tmp_path / "spare").rglob("*"))) > 1  # the object landed
    publish.exp_push(repo, [])  # no experiments: nothing to do, no remote needed


@pytest.mark.parametrize(("raw", "line"), [
    ({"train": {"batch_size": "ten"}}, "params.yaml: train.batch_size: Input should be a "
                                       "valid integer, unable to parse string as an integer "
                                       "(got 'ten')"),
    ({"data": {"source": "npz"}}, "params.yaml: data: Value error, data.source 'npz' reads a "
                                  "local file: set data.path to it"),  # no echo of the group
])
def test_a_type_error_says_what_it_got_and_no_range(raw: dict, line: str) -> None:
    with pytest.raises(UserError) as info:
        parse_params(raw)
    assert str(info.value) == f"invalid parameters:\n  {line}"


# ------------------------------------------------------------------------ params YAML
def test_a_key_given_twice_is_an_error_naming_its_line() -> None:
    with pytest.raises(UserError) as info:
        load_yaml("train:\n  epochs: 1\n  lr: 2\n  epochs: 3\n", "p.yaml")
    assert str(info.value) == ("p.yaml: invalid YAML at line 4, column 3: duplicate key "
                               "'epochs'")
    assert load_yaml("a: {x: 1, y: [1, 2]}\nb: 2\n", "p.yaml") == {"a": {"x": 1, "y": [1, 2]},
                                                                 "b": 2}


def test_aliases_expand_up_to_the_cap() -> None:
    items = ", ".join(["1"] * 9_999)  # the list node counts as 1 + 9,999 values
    assert len(load_yaml(f"a: &x [{items}]\nb: *x\n", "p.yaml")["b"]) == 9_999
    with pytest.raises(UserError, match=r"p.yaml: invalid YAML at line 2, column 4: aliases "
                                        r"expand to more than 10,000 values \(an alias bomb\?\)"):
        load_yaml(f"a: &x [{items}, 1]\nb: *x\n", "p.yaml")
    with pytest.raises(UserError, match="more than 10,000 values"):
        load_yaml(f"a: &x [{', '.join(['1'] * 5_000)}]\nb: *x\nc: *x\n", "p.yaml")
    assert load_yaml("a: &x {k: 1}\nb: *x\n", "p.yaml") == {"a": {"k": 1}, "b": {"k": 1}}


def test_an_alias_inside_its_anchor_or_undefined_is_refused() -> None:
    with pytest.raises(UserError) as info:
        load_yaml("a: &x [1, *x]\n", "p.yaml")
    assert str(info.value) == ("p.yaml: invalid YAML at line 1, column 11: alias *x inside its "
                               "own anchor")
    with pytest.raises(UserError, match="found undefined alias"):
        load_yaml("a: *nope\n", "p.yaml")


def test_a_yaml_error_is_one_line_with_its_place_when_known() -> None:
    with pytest.raises(UserError) as info:
        load_yaml("a: [1\n", "p.yaml")
    assert str(info.value) == ("p.yaml: invalid YAML at line 2, column 1: expected ',' or ']', "
                               "but got '<stream end>'")
    with pytest.raises(UserError) as info:
        load_yaml("a: \x00", "p.yaml")  # a reader error has no line
    assert str(info.value) == ("p.yaml: invalid YAML: unacceptable character #x0000: special "
                               'characters are not allowed in "<unicode string>", position 3')


def test_every_slot_setting_is_checked_up_front(no_slot_env: pytest.MonkeyPatch) -> None:
    for name in ("CONVFLOW_LEASE_S", "CONVFLOW_SLOT_WAIT_S", "CONVFLOW_SLOT_NOTICE_S"):
        no_slot_env.setenv(name, "soon")
        with pytest.raises(UserError, match=f"^{name}='soon'"):
            slots.check_settings()
        no_slot_env.delenv(name)
    slots.check_settings()


def test_without_device_variables_torch_counts_the_devices(
        no_slot_env: pytest.MonkeyPatch) -> None:
    no_slot_env.setattr(slots, "_torch_devices", lambda: 2)
    assert slots.gpu_ids() == ["0", "1"]
    no_slot_env.setenv("CONVFLOW_DEVICES", "5")
    with slots.DevicePool().device() as env:
        assert env == {"CUDA_VISIBLE_DEVICES": "5"}


def test_no_duplicates_are_empty_index_arrays() -> None:
    dups = find_duplicates(_raw([1, 2], [3]))
    assert dups.within_train.dtype == dups.train_in_test.dtype == np.int64
    assert dups.drop().tolist() == []


class _Web(http.server.BaseHTTPRequestHandler):
    """/redirect-ftp, /redirect-ok, /big (a length over any small cap), /endless (no length),
    /small (3 bytes)."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path.startswith("/redirect-"):
            target = ("ftp://127.0.0.1/c.tar.gz" if self.path == "/redirect-ftp" else
                      f"http://127.0.0.1:{self.server.server_port}/small")
            self.send_response(302)
            self.send_header("Location", target)
            self.end_headers()
            return
        body = {"/big": b"x" * 4096, "/endless": b"y" * 4096, "/small": b"abc"}[self.path]
        self.send_response(200)
        if self.path != "/endless":
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def web(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("no_proxy", "*")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Web)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_download_past_its_cap_is_refused_and_leaves_nothing(
        web: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVFLOW_MAX_DOWNLOAD_MB", str(1024 / (1 << 20)))  # 1,024 bytes
    for path in ("/big", "/endless"):  # announced too long, or found too long while read
        with pytest.raises(UserError) as info:
            safety.download(web + path, tmp_path / "dl" / "c.tar.gz", "0" * 64)
        assert str(info.value) == (
            f"{web}{path}: the server sends more than 1,024 bytes; if the file really is "
            "larger, raise CONVFLOW_MAX_DOWNLOAD_MB; refused, nothing was kept. Check data.url")
        assert list((tmp_path / "dl").iterdir()) == []
    monkeypatch.setattr(safety, "CIFAR10_ARCHIVE_BYTES", 1024)
    with pytest.raises(UserError, match=r"more than 1,024 bytes \(the CIFAR-10 archive is "
                                        r"1,024\); refused"):
        safety.download(web + "/big", tmp_path / "dl" / "c.tar.gz", OFFICIAL_CIFAR10_SHA256)


def test_a_download_of_exactly_the_cap_is_kept(web: str, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CONVFLOW_MAX_DOWNLOAD_MB", str(3 / (1 << 20)))  # 3 bytes
    sha = hashlib.sha256(b"abc").hexdigest()
    dest = safety.download(web + "/redirect-ok", tmp_path / "c.tar.gz", sha)
    assert dest.read_bytes() == b"abc"
    assert "c.tar.gz: 100%" in capfd.readouterr().err  # the progress bar names the file
    with pytest.raises(UserError) as info:
        safety.download(web + "/redirect-ftp", tmp_path / "d.tar.gz", sha)
    assert str(info.value) == (f"data.url: '{web}/redirect-ftp' redirects to "
                               "'ftp://127.0.0.1/c.tar.gz', not an http(s) URL; refused")


def test_one_device_pool_per_process_and_utc_clock_times() -> None:
    assert slots.device_pool() is slots.device_pool()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", slots._clock())


def test_ship_pushes_its_tags_and_the_baseline_is_rewritten_only_on_change(
        registry_repo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    repo = registry_repo
    caplog.set_level("INFO", "convflow.registry")
    plain = tmp_path / "plain"  # not a git repository: its registry cannot be read
    plain.mkdir()
    (plain / "dvc.yaml").write_text(REGISTRY_DVC_YAML)
    assert registry.refresh_baseline(plain) is None and not (plain / "production.yaml").exists()
    assert caplog.records[-1].getMessage().startswith("model registry not readable (")
    assert caplog.records[-1].getMessage().endswith("): keeping production.yaml")
    _run(repo, "a" * 32, 0.8)
    git(tmp_path, "init", "-q", "--bare", "-b", "main", "origin.git")
    git(repo, "remote", "add", "origin", (tmp_path / "origin.git").as_uri())
    registry.ship(repo, "m", "prod", push=True, flow_log=logging.getLogger("t"))
    pushed = git(tmp_path / "origin.git", "tag", "-l")
    assert "cifar-cnn@v0.0.1" in pushed and "cifar-cnn#prod#" in pushed
    caplog.clear()
    (repo / "production.yaml").write_text("# edited by hand\n" + (repo / "production.yaml")
                                          .read_text().split("\n", 3)[-1])
    registry.refresh_baseline(repo)  # same values: the file is left as it is
    assert (repo / "production.yaml").read_text().startswith("# edited by hand")
    assert caplog.records == []


def test_load_params_names_the_file(tmp_path: Path) -> None:
    from stages.params import load_params

    path = tmp_path / "p.yaml"
    with pytest.raises(UserError) as info:
        load_params(path)
    assert str(info.value) == (f"{path}: parameters file not found; run from the repository "
                               "root or pass its path")
    path.write_text("train:\n  batch_size: 0\n")
    with pytest.raises(UserError, match=rf"^invalid parameters:\n  {re.escape(str(path))}: "
                                        r"train.batch_size: "):
        load_params(path)
    path.write_text("train:\n  batch_size: 7\n")
    assert load_params(path).train.batch_size == 7


def test_nested_values_count_towards_the_alias_cap() -> None:
    def aliased(anchor: str) -> str:
        return f"a: &x {anchor}\nb: *x\n"

    assert load_yaml(aliased(f"[[{', '.join(['1'] * 9_998)}]]"), "p.yaml")["b"][0][-1] == 1
    with pytest.raises(UserError, match="more than 10,000 values"):
        load_yaml(aliased(f"[[{', '.join(['1'] * 9_999)}]]"), "p.yaml")
    pairs = ", ".join(f"k{i}: 1" for i in range(4_999))  # 1 + 2 x 4,999 values
    assert len(load_yaml(aliased(f"{{{pairs}}}"), "p.yaml")["b"]) == 4_999
    with pytest.raises(UserError, match="more than 10,000 values"):
        load_yaml(aliased(f"{{{pairs}, k: 1}}"), "p.yaml")
    long = "n" * 50
    with pytest.raises(UserError, match=f"alias \\*{'n' * 39}… inside its own anchor"):
        load_yaml(f"a: &{long} [*{long}]\n", "p.yaml")
