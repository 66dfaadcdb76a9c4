"""The results branch (flows/results_branch.py) at its edges: who a results commit is by,
which parents it has, what a refused push leaves behind; fast, on real git repositories."""

from __future__ import annotations

import json
import logging
import socket
import types
from pathlib import Path

import pytest
import yaml
from conftest import git
from test_decisions_flows import commit_run

from flows import results_branch
from flows.results_branch import PublishError, publish_results

METRICS = ["metrics/evaluate.json"]
_IDENTITY = [f"GIT_{who}_{what}" for who in ("AUTHOR", "COMMITTER") for what in ("NAME", "EMAIL")]


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A repository with one run committed on main; git's identity comes from the environment
    only (no global or system config), and the tests run from a folder that is no repository."""
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", "/dev/null")
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for var in _IDENTITY:
        monkeypatch.setenv(var, "test@convflow.invalid" if var.endswith("EMAIL") else "ci")
    root = tmp_path / "repo"
    (root / "metrics").mkdir(parents=True)
    lock = {"schema": "2.0", "stages": {"evaluate": {"outs": [{"path": "metrics/evaluate.json"}]}}}
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))
    _change(root, 0.75)
    return commit_run(root, monkeypatch)


def _change(repo: Path, accuracy: float) -> None:
    (repo / "metrics" / "evaluate.json").write_text(json.dumps({"test": {"accuracy": accuracy}}))


def _rev(repo: Path, rev: str = "HEAD") -> str:
    return git(repo, "rev-parse", rev).strip()


def _parents(repo: Path, commit: str) -> list[str]:
    return git(repo, "log", "-1", "--format=%P", commit).split()


def _by(repo: Path, commit: str) -> list[str]:
    """Author and committer of ``commit``."""
    return git(repo, "log", "-1", "--format=%an <%ae>%n%cn <%ce>", commit).splitlines()


def test_a_repositorys_own_identity_is_kept(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a machine with no identity at all commits as ``convflow worker``: one set in the
    repository's config, or an e-mail in the environment beside a configured name, is kept."""
    for var in _IDENTITY:
        monkeypatch.delenv(var)
    monkeypatch.setattr(socket, "gethostname", lambda: "node7")
    git(repo, "config", "user.name", "Lab Member")
    git(repo, "config", "user.email", "me@lab.invalid")
    _change(repo, 0.8)
    commit = publish_results(repo, "r", files=METRICS, remote=None)
    assert _by(repo, commit) == ["Lab Member <me@lab.invalid>"] * 2
    git(repo, "config", "--unset", "user.email")
    monkeypatch.setenv("GIT_AUTHOR_EMAIL", "ci@lab.invalid")
    monkeypatch.setenv("GIT_COMMITTER_EMAIL", "ci@lab.invalid")
    _change(repo, 0.9)
    commit = publish_results(repo, "r", files=METRICS, remote=None)
    assert _by(repo, commit) == ["Lab Member <ci@lab.invalid>"] * 2


def test_a_results_commit_has_the_branch_tip_and_the_runs_start_as_parents(repo: Path) -> None:
    start = _rev(repo)
    _change(repo, 0.8)
    first = publish_results(repo, "first", "results/x", files=METRICS, remote=None)
    assert _parents(repo, first) == [start]  # a new branch starts at the run's commit
    assert git(repo, "symbolic-ref", "HEAD").strip() == "refs/heads/results/x"
    assert _rev(repo, "main") == start
    git(repo, "checkout", "-q", "main")
    (repo / "code.py").write_text("newer code\n")
    git(repo, "add", "code.py")
    git(repo, "commit", "-qm", "newer code")
    newer = _rev(repo)
    _change(repo, 0.9)
    second = publish_results(repo, "second", "results/x", files=METRICS, remote=None)
    assert _parents(repo, second) == [first, newer]  # the branch's tip, then the run's start
    assert git(repo, "show", f"{second}:code.py") == "newer code\n"
    _change(repo, 0.95)
    third = publish_results(repo, "third", "results/x", files=METRICS, remote=None)
    assert _parents(repo, third) == [second]  # started from the tip: no second parent


def test_a_detached_head_needs_a_branch_named(repo: Path) -> None:
    git(repo, "checkout", "-q", "--detach")
    with pytest.raises(PublishError) as info:
        publish_results(repo, "r", files=METRICS, remote=None)
    assert info.value.message == "no branch to publish to: HEAD is detached; pass a branch"
    _change(repo, 0.8)
    commit = publish_results(repo, "r", "results/x", files=METRICS, remote=None)
    assert git(repo, "symbolic-ref", "HEAD").strip() == "refs/heads/results/x"
    assert _rev(repo) == commit


def _origin(repo: Path, declined: bool = False) -> Path:
    bare = repo.parent / "origin.git"
    git(repo.parent, "init", "-q", "--bare", "-b", "main", str(bare))
    git(repo, "remote", "add", "origin", bare.as_uri())
    git(repo, "push", "-q", "origin", "main")
    if declined:
        hook = bare / "hooks" / "pre-receive"
        hook.write_text("#!/bin/sh\necho protected >&2\nexit 1\n")
        hook.chmod(0o755)
    return bare


def test_a_declined_push_leaves_the_checkout_as_it_was(repo: Path) -> None:
    _origin(repo, declined=True)
    _change(repo, 0.8)
    status, start = git(repo, "status", "--porcelain"), _rev(repo)
    with pytest.raises(PublishError) as info:
        publish_results(repo, "r", "results/x", files=METRICS)
    assert info.value.message == (
        "could not push the results commit to origin/results/x: rejected [remote rejected] "
        "(pre-receive hook declined); nothing is lost: the outputs pushed to the DVC remote "
        "stay there; rerun to publish the results")
    assert git(repo, "status", "--porcelain") == status  # nothing staged, no file left
    assert (git(repo, "symbolic-ref", "HEAD").strip(), _rev(repo)) == ("refs/heads/main", start)
    assert git(repo, "branch", "--list", "results/x") == ""


@pytest.mark.parametrize("attempts", [0, 1, 3])
def test_a_rejected_push_is_tried_as_often_as_asked_waiting_longer_each_time(
        repo: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        attempts: int) -> None:
    """Another run always got there first: its history is in the repository pushed to."""
    origin = _origin(repo)
    other = repo.parent / "other.git"
    git(repo.parent, "clone", "-q", "--bare", origin.as_uri(), str(other))
    seed = repo.parent / "seed"
    git(repo.parent, "clone", "-q", other.as_uri(), str(seed))
    (seed / "x").write_text("elsewhere")
    git(seed, "add", "x")
    git(seed, "commit", "-qm", "another run")
    git(seed, "push", "-q", "origin", "main")
    git(repo, "remote", "set-url", "--push", "origin", other.as_uri())
    sleeps: list[float] = []
    monkeypatch.setattr(results_branch, "time", types.SimpleNamespace(sleep=sleeps.append))
    caplog.set_level(logging.WARNING, "convflow.publish")
    _change(repo, 0.8)
    with pytest.raises(PublishError) as info:
        publish_results(repo, "r", "main", files=METRICS, attempts=attempts)
    assert info.value.message.startswith("could not push the results commit to origin/main: "
                                         "rejected [rejected] (fetch first); nothing is lost")
    tries = max(1, attempts)
    assert caplog.messages == [
        "push of results to origin/main rejected (another run pushed first): fetching and "
        f"retrying ({i}/{attempts})" for i in range(1, tries + 1)]
    assert sleeps == [0.5 * i for i in range(1, tries + 1)]
