"""The contract between convflow and the installed DVC: every function of ``flows/dvc_adapter``.

Each test runs the adapter against a real git + DVC repository and fails with "installed
DVC X.Y no longer fits convflow's adapter: <what>" when DVC answers in another shape.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import dvc, git
from prefect_fixtures import make_toy_repo, py_stage

from flows import dvc_adapter as adapter

ONE = "import yaml; p = yaml.safe_load(open('params.yaml')); open('one.txt', 'w').write('1')"
SCORE = ("import json, yaml; n = yaml.safe_load(open('params.yaml'))['a']['n']; "
         "json.dump({'acc': n / 10, 'deep': {'x': 2}}, open('m.json', 'w'))")
PLOT = "import json; json.dump([{'step': 0, 'loss': 1.0}], open('p.json', 'w'))"


def fits(condition: bool, what: str) -> None:
    """Fail with the contract's message when the installed DVC answers differently."""
    if not condition:
        pytest.fail(f"installed DVC {adapter.dvc_version()} no longer fits convflow's "
                    f"adapter: {what}")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """one -> score (uncached metric), one -> curve (uncached plot), plus a `dvc add`ed file."""
    root = make_toy_repo(tmp_path_factory.mktemp("contract") / "toy", {
        "one": {"cmd": py_stage(ONE), "params": ["a.n"], "outs": ["one.txt"]},
        "score": {"cmd": py_stage(SCORE), "deps": ["one.txt"],
                  "params": ["a.n", {"other.yaml": ["c"]}],
                  "metrics": [{"m.json": {"cache": False}}]},
        "curve": {"cmd": py_stage(PLOT), "deps": ["one.txt"],
                  "plots": [{"p.json": {"cache": False}}]},
    })
    (root / "other.yaml").write_text("c: 3\n")
    (root / "input.txt").write_text("data a user tracks with `dvc add`\n")
    dvc(root, "add", "input.txt")  # a `.dvc` file is a stage without a name or command
    dvc(root, "repro")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "reproduced")
    return root


def test_stages_in_order_give_direct_and_transitive_upstream(repo: Path) -> None:
    nodes = adapter.stages_in_order(repo)
    names = [n.name for n in nodes]
    fits(sorted(names) == ["curve", "one", "score"], f"stages_in_order names: {names}")
    fits(names[0] == "one", f"stages_in_order is not DVC's run order: {names}")
    by_name = {n.name: n for n in nodes}
    fits(by_name["score"].deps == {"one"} and by_name["score"].upstream == {"one"},
         f"stage edges: {by_name['score']}")
    fits(by_name["one"].deps == frozenset() == by_name["one"].upstream,
         f"stage edges: {by_name['one']}")


def test_stage_command_is_the_resolved_cmd(repo: Path) -> None:
    cmd = adapter.stage_command(repo, "one")
    fits(cmd == py_stage(ONE), f"stage_command: {cmd!r}")


def test_stage_changed_follows_params(repo: Path) -> None:
    fits(adapter.stage_changed(repo, "one") is False, "stage_changed on an up-to-date stage")
    (repo / "params.yaml").write_text("a:\n  n: 4\n")
    try:
        adapter.forget(repo)
        fits(adapter.stage_changed(repo, "one") is True, "stage_changed after a params edit")
        fits(adapter.stage_changed(repo, "curve") is False, "stage_changed of an unaffected "
             "stage (its upstream changed, it did not)")
        rows = adapter.params_diff(repo, "HEAD")
        fits(rows == [{"file": "params.yaml", "key": "a.n", "old": 1, "new": 4, "diff": 3}],
             f"params_diff: {rows}")
    finally:
        git(repo, "checkout", "--", "params.yaml")
        adapter.forget(repo)


def test_metrics_rows_and_diff(repo: Path) -> None:
    rows = adapter.metrics_rows(repo)
    fits(rows == [{"file": "m.json", "metric": "acc", "value": 0.1},
                  {"file": "m.json", "metric": "deep.x", "value": 2}], f"metrics_rows: {rows}")
    fits(adapter.metrics_diff(repo, "HEAD") == [], "metrics_diff of an unchanged workspace")
    (repo / "m.json").write_text('{"acc": 0.5, "deep": {"x": 2}}')
    try:
        diff = adapter.metrics_diff(repo, "HEAD")
        fits(len(diff) == 1 and diff[0]["key"] == "acc" and diff[0]["old"] == 0.1
             and diff[0]["new"] == 0.5 and diff[0]["diff"] == pytest.approx(0.4),
             f"metrics_diff: {diff}")
    finally:
        git(repo, "checkout", "--", "m.json")
    with pytest.raises(adapter.DvcError, match="unknown Git revision"):
        adapter.metrics_diff(repo, "no-such-rev")


def test_exp_rows_name_params_and_metrics(repo: Path) -> None:
    dvc(repo, "exp", "run", "-n", "contract-exp", "-S", "a.n=3")
    git(repo, "checkout", "--", ".")
    adapter.forget(repo)
    rows = adapter.exp_rows(repo, {"contract-exp"})
    fits(len(rows) == 1, f"exp_rows: {rows}")
    row = rows[0]
    fits(row["experiment"] == "contract-exp" and len(row["rev"]) == 7
         and row["params.yaml:a.n"] == 3 and row["m.json:acc"] == 0.3, f"exp_rows: {row}")


def test_a_mismatch_names_the_installed_version() -> None:
    message = str(adapter.DvcMismatch("the stage graph: AttributeError: gone"))
    assert message == (f"installed DVC {adapter.dvc_version()} no longer fits convflow's "
                       "adapter: the stage graph: AttributeError: gone")


def test_default_remote_is_what_dvc_remote_default_prints(repo: Path) -> None:
    assert adapter.default_remote(repo) == ""
    dvc(repo, "remote", "add", "-d", "store", str(repo.parent / "store"))
    adapter.forget(repo)
    assert adapter.default_remote(repo) == dvc(repo, "remote", "default").stdout.strip() == "store"
