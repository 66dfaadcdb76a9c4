"""The decisions of stages/* that tests/test_decisions.py leaves open, at their edges: the
mutants scripts/mutation.sh makes of the params bounds, the data report and the input caps
must each fail one of these (fast, in-process) tests."""

from __future__ import annotations

import numpy as np
import pytest

from stages import data_report
from stages.gate import headline, main, verdict
from stages.params import GateParams, Params, _accepted, accepted_range
from stages.sources.raw import RawData


# --------------------------------------------------------------------------------- params
@pytest.mark.parametrize("loc", [("nosuch",), ("train", "nosuch"), ("nosuch", "epochs"),
                                 ("train", "epochs", "deeper")])
def test_a_path_that_is_no_numeric_field_has_no_range(loc: tuple[str, ...]) -> None:
    assert accepted_range(loc) == ""


def test_the_range_of_a_nested_field() -> None:
    assert accepted_range(("data", "synthetic", "seed")).startswith("0 <= x <= ")
    assert accepted_range(("normalize", "val_fraction")) == "0.0 <= x < 1.0"


def test_keys_accepted_below_a_field_that_is_no_group_are_none() -> None:
    assert _accepted(Params, ("train", "epochs", "x")) == []  # epochs is a number
    assert _accepted(Params, ("nosuch", "x")) == []
    assert _accepted(Params, ("data", "synthetic", "x")) == ["n_test", "n_train", "seed"]
    assert "epochs" in _accepted(Params, ("train", "x"))


# ---------------------------------------------------------------------------- data report
def test_a_label_past_the_class_list_is_never_dropped_from_the_counts() -> None:
    assert data_report._per_class(np.array([0, 1, 1]), ("a", "b")) == {"a": 1, "b": 2}
    assert data_report._per_class(np.array([], np.int64), ("a", "b")) == {"a": 0, "b": 0}
    with pytest.raises(ValueError):
        data_report._per_class(np.array([0, 2]), ("a", "b"))


def test_the_headline_is_the_images_kept_per_split() -> None:
    def images(n: int) -> np.ndarray:
        return np.stack([np.full((3, 32, 32), v, np.uint8) for v in range(n)])
    data = RawData(images(3), np.array([0, 1, 1]), images(2), np.array([1, 0]), ("a", "b"),
                   "npz", {})
    report = data_report.build_report(data, data_report.find_duplicates(data), 1, None, None)
    assert data_report.headline(report) == {"images": {"train": 3, "test": 2}}


# ----------------------------------------------------------------------------------- gate
def test_the_headline_is_whether_it_passed_and_the_drop() -> None:
    result = verdict(0.8, GateParams(min_accuracy=0.5, max_drop=0.02),
                     {"version": "v1", "rev": "abc", "accuracy": 0.9})
    assert headline(result) == {"passed": False, "drop": pytest.approx(0.1)}


def test_the_help_names_the_headline_file(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "its headline metrics file to write (verdict.json)" in " ".join(
        capsys.readouterr().out.split())
