"""flows/publish.py on real git and DVC: what a run commits, where, and two runs racing.

Toy DVC pipelines (``python -c`` stages) in temp repos with a bare ``origin``; no object
store is needed here, because these only exercise the git half of publishing.
"""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import pytest
import yaml
from conftest import dvc, git
from prefect_fixtures import make_toy_repo, py_stage

SCORE = ("import json, yaml; n = yaml.safe_load(open('params.yaml'))['a']['n']; "
         "open('big.bin', 'w').write('x' * n); json.dump({'n': n}, open('m.json', 'w'))")
BRANCH = "results/nightly"


@pytest.fixture
def origin(tmp_path: Path) -> Path:
    """A bare origin holding a toy pipeline: a cached output and an uncached metrics file."""
    src = make_toy_repo(tmp_path / "src", {"score": {
        "cmd": py_stage(SCORE), "params": ["a.n"], "outs": ["big.bin"],
        "metrics": [{"m.json": {"cache": False}}]}})
    bare = tmp_path / "origin.git"
    git(tmp_path, "clone", "-q", "--bare", str(src), str(bare))
    return bare


def run_in_clone(origin: Path, dest: Path, n: int) -> Path:
    """A worker's clone of ``origin`` that ran the pipeline with ``a.n = n``."""
    git(dest.parent, "clone", "-q", str(origin), str(dest))
    (dest / "params.yaml").write_text(yaml.safe_dump({"a": {"n": n}}))
    dvc(dest, "repro")
    return dest


#: the test's git identity in this process too, for the commits the code under test makes
pytestmark = pytest.mark.usefixtures("git_identity")


def publish(root: Path, message: str, **kw) -> str | None:
    from flows.publish import publish_results

    return publish_results(root, message, **kw)


def test_results_files_are_the_lock_params_and_uncached_outputs(origin, tmp_path):
    from flows.publish import results_files

    work = run_in_clone(origin, tmp_path / "w", 3)
    # big.bin is DVC-cached (git-ignored by DVC): never committed; m.json is
    assert results_files(work) == [".gitignore", "dvc.lock", "m.json", "params.yaml"]


def test_a_run_commits_to_its_results_branch_and_leaves_main_alone(origin, tmp_path):
    work = run_in_clone(origin, tmp_path / "w", 3)
    start = git(work, "rev-parse", "HEAD").strip()
    commit = publish(work, "convflow: pipeline run r1 (id-1)", branch=BRANCH)
    assert git(origin, "rev-parse", BRANCH).strip() == commit
    assert git(origin, "rev-parse", "main").strip() == start        # main untouched
    # the clone is on the results commit now; its files were already those
    assert git(work, "rev-parse", "HEAD").strip() == commit
    assert git(work, "status", "--porcelain").strip() == ""
    assert git(origin, "log", "-1", "--format=%P", BRANCH).split() == [start]
    assert git(origin, "show", f"{BRANCH}:m.json").strip() == '{"n": 3}'
    assert "big.bin" not in git(origin, "ls-tree", "-r", "--name-only", BRANCH).split()
    # the same results again: nothing to commit
    assert publish(work, "convflow: pipeline run r2 (id-2)", branch=BRANCH) is None


def test_without_a_branch_it_commits_on_the_current_one(origin, tmp_path):
    work = run_in_clone(origin, tmp_path / "w", 4)
    commit = publish(work, "convflow: pipeline run r1 (id-1)")
    assert git(work, "rev-parse", "HEAD").strip() == commit
    assert git(origin, "rev-parse", "main").strip() == commit
    assert git(work, "status", "--porcelain").strip() == ""        # index in step


def _pre_push_hook(clone: Path, script: str) -> None:
    hook = clone / ".git" / "hooks" / "pre-push"
    hook.write_text(f"#!/bin/sh\n{script}\n")
    hook.chmod(hook.stat().st_mode | stat.S_IEXEC)


def test_a_push_rejected_because_another_run_pushed_first_is_retried(origin, tmp_path):
    first = run_in_clone(origin, tmp_path / "first", 5)
    second = run_in_clone(origin, tmp_path / "second", 6)
    # the first run pushes while the second is pushing: the second's push is rejected
    once = tmp_path / "raced"
    code = ("import sys; from flows.publish import publish_results; "
            f"publish_results({str(first)!r}, 'convflow: pipeline run first (id-1)', "
            f"branch={BRANCH!r})")
    _pre_push_hook(second, f'[ -e "{once}" ] || {{ touch "{once}"; '
                           f'cd "{Path.cwd()}" && "{sys.executable}" -c "{code}"; }}')
    commit = publish(second, "convflow: pipeline run second (id-2)", branch=BRANCH)
    assert once.exists(), "the race did not happen"
    log = git(origin, "log", "--format=%s", f"main..{BRANCH}").splitlines()
    assert log == ["convflow: pipeline run second (id-2)",
                   "convflow: pipeline run first (id-1)"]          # both landed, in order
    assert git(origin, "rev-parse", BRANCH).strip() == commit
    assert git(origin, "show", f"{BRANCH}:m.json").strip() == '{"n": 6}'
    first_commit = git(origin, "rev-parse", f"{BRANCH}~1").strip()
    assert git(origin, "show", f"{first_commit}:m.json").strip() == '{"n": 5}'  # not rewritten
    # on top of the other run's commit (whose parent is the shared start commit)
    assert git(origin, "log", "-1", "--format=%P", BRANCH).split() == [first_commit]


def test_a_push_that_keeps_being_rejected_fails_clearly(origin, tmp_path):
    from flows.publish import PublishError

    first = run_in_clone(origin, tmp_path / "first", 5)
    second = run_in_clone(origin, tmp_path / "second", 6)
    code = ("import sys; from flows.publish import publish_results; "
            f"publish_results({str(first)!r}, 'convflow: pipeline run first (id-1)', "
            f"branch={BRANCH!r})")
    _pre_push_hook(second, f'cd "{Path.cwd()}" && "{sys.executable}" -c "{code}"')
    # one attempt only: the other run's push wins and this one gives up, saying so
    with pytest.raises(PublishError, match=r"could not push the results commit to "
                       r"origin/results/nightly: .*rejected.*nothing is lost"):
        publish(second, "convflow: pipeline run second (id-2)", branch=BRANCH, attempts=1)
    log = git(origin, "log", "--format=%s", f"main..{BRANCH}").splitlines()
    assert log == ["convflow: pipeline run first (id-1)"]


def test_the_flow_commits_on_a_results_branch_with_the_run_and_start_in_the_message(
        prefect_api, origin, tmp_path):
    from flows.pipeline import pipeline

    work = tmp_path / "w"
    git(tmp_path, "clone", "-q", str(origin), str(work))
    start = git(work, "rev-parse", "HEAD").strip()
    state = pipeline(root=str(work), commit=True, branch=BRANCH, return_state=True)
    assert state.is_completed(), state.message
    message = git(origin, "log", "-1", "--format=%B", BRANCH)
    run_id = str(state.state_details.flow_run_id)
    assert message.startswith("convflow: pipeline run ") and run_id in message
    assert f"Started from: {start}" in message


def test_a_run_from_a_newer_main_joins_the_results_history(origin, tmp_path):
    first = run_in_clone(origin, tmp_path / "first", 3)
    older = publish(first, "convflow: pipeline run r1 (id-1)", branch=BRANCH)
    dev = tmp_path / "dev"
    git(tmp_path, "clone", "-q", str(origin), str(dev))
    (dev / "NOTES.md").write_text("a change on main\n")
    git(dev, "add", "NOTES.md")
    git(dev, "commit", "-q", "-m", "main moves on")
    git(dev, "push", "-q", "origin", "main")
    second = run_in_clone(origin, tmp_path / "second", 4)
    start = git(second, "rev-parse", "HEAD").strip()
    publish(second, "convflow: pipeline run r2 (id-2)", branch=BRANCH)
    # parents: the branch's tip (history kept) and the new start (its code is the tree's)
    assert git(origin, "log", "-1", "--format=%P", BRANCH).split() == [older, start]
    assert "NOTES.md" in git(origin, "ls-tree", "--name-only", BRANCH).split()
