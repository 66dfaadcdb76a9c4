"""The decisions of flows/* that tests/test_decisions.py leaves open, at their edges: the
mutants scripts/mutation.sh makes of the registry, publishing and the results branch must
each fail one of these (fast, in-process) tests."""

from __future__ import annotations

import json
import logging
import pickle
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import git

from flows import publish, results_branch
from flows.runner import StageFailed


class _Log:
    """A logger that keeps what was said, formatted."""

    def __init__(self) -> None:
        self.infos: list[str] = []
        self.warnings: list[str] = []

    def info(self, msg: str, *args: Any) -> None:
        self.infos.append(msg % args)

    def warning(self, msg: str, *args: Any) -> None:
        self.warnings.append(msg % args)


# ------------------------------------------------------------------------------- registry
def registry_dvc_yaml(artifact: str = "net-a", path: str = "models/net-a.pt") -> str:
    """A dvc.yaml with no stages that declares one model artifact (what GTO reads)."""
    return ("vars:\n  - paths:\n      metrics: metrics\n      production: production.yaml\n"
            f"stages: {{}}\nartifacts:\n  {artifact}:\n    path: {path}\n    type: model\n")


_DVC_YAML = registry_dvc_yaml()


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return make_repo(tmp_path, monkeypatch)


def set_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """The git author and committer of the commits a test makes in-process."""
    for var in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{var}_NAME", "convflow-test")
        monkeypatch.setenv(f"GIT_{var}_EMAIL", "test@convflow.invalid")


def make_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A git repository with the model artifact ``net-a``, one run committed; the tests run
    from a folder that is no repository, so the repository is always the one named."""
    set_identity(monkeypatch)
    root = tmp_path / "repo"
    (root / "metrics").mkdir(parents=True)
    (root / "dvc.yaml").write_text(_DVC_YAML)
    lock = {"schema": "2.0", "stages": {"train": {"outs": [{"path": "models/net-a.pt",
                                                            "md5": "a" * 32}]}}}
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))
    (root / "metrics" / "evaluate.json").write_text(json.dumps({"test": {"accuracy": 0.75}}))
    return commit_run(root, monkeypatch)


def commit_run(root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``root`` as a git repository on main with one commit; the test then runs from a
    sibling folder that is no repository."""
    git(root, "init", "-q", "-b", "main")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "run")
    (root.parent / "elsewhere").mkdir()
    monkeypatch.chdir(root.parent / "elsewhere")
    return root


def _origin(repo: Path) -> Path:
    bare = repo.parent / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", str(bare)], check=True)
    git(repo, "remote", "add", "origin", str(bare))
    return bare


# -------------------------------------------------------------------------------- publish
def test_a_remotes_url_is_read_from_dvcs_config_the_local_file_first(tmp_path: Path) -> None:
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text(
        "[core]\n    remote = team\n"
        "['remote \"team2\"']\n    url = /wrong/team2\n"
        "['remote \"team\"']\n    url_old = /wrong/old\n    url = s3://bucket/team\n"
        "[cache]\n    url = /wrong/cache\n"
        "['remote \"spare\"']\n    url=/mnt/spare\n")
    assert publish._remote_url(tmp_path, "team") == "s3://bucket/team"
    assert publish._remote_url(tmp_path, "spare") == "/mnt/spare"
    assert publish._remote_url(tmp_path, "gone") is None
    assert publish.describe_remote(tmp_path, "team") == "'team' (s3://bucket/team)"
    (tmp_path / ".dvc" / "config.local").write_text("['remote \"team\"']\n    url = /local\n")
    assert publish.describe_remote(tmp_path, "team") == "'team' (/local)"
    assert publish.describe_remote(tmp_path, "spare") == "'spare' (/mnt/spare)"
    assert publish.describe_remote(tmp_path, "gone") == "'gone'"


def test_outside_a_run_the_modules_own_logger_is_used() -> None:
    assert publish._run_logger() is publish.log


def test_a_step_is_retried_as_asked() -> None:
    step = publish._with_retries(publish.push_task, 3, 7.5)
    assert (step.retries, step.retry_delay_seconds) == (3, 7.5)
    assert step.name == "dvc-push"


class _Steps:
    """Stand-ins for the flow's Prefect tasks (and the DVC process): what was run, in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, output: str = "", status: int = 0,
                 timed_out: bool = False) -> None:
        self.calls: list[tuple] = []
        self.ran = (output, status, timed_out)
        for name in ("fetch_task", "pull_task", "push_task", "publish_task"):
            monkeypatch.setattr(publish, name, _Step(name, self.calls))
        monkeypatch.setattr(publish, "run_guarded", self.run_guarded)

    def run_guarded(self, cmd: list[str], root: Path, step: str, timeout_s: float,
                    log: Any) -> tuple[str, int, bool]:
        self.calls.append((step, cmd[cmd.index("dvc") + 1:], timeout_s))
        return self.ran


class _Step:
    def __init__(self, name: str, calls: list[tuple]) -> None:
        self.name, self.calls, self.options = name, calls, None

    def with_options(self, retries: int, retry_delay_seconds: float) -> _Step:
        self.options = (retries, retry_delay_seconds)
        return self

    def __call__(self, *args: Any) -> str:
        self.calls.append((self.name, args, self.options))
        return "c0ffee"


def test_a_run_starts_with_fetch_then_pull_each_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    steps = _Steps(monkeypatch)
    publish.start_run(Path("/r"), 4, 2.5, "results/x")
    assert steps.calls == [("fetch_task", ("/r", "results/x"), (4, 2.5)),
                           ("pull_task", ("/r",), (4, 2.5))]


def test_a_run_pushes_its_outputs_before_it_commits(repo: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    steps = _Steps(monkeypatch)
    assert publish.finish_run(repo, "pipeline", False, False) is None and steps.calls == []
    assert publish.finish_run(repo, "pipeline", True, False, retries=3, retry_delay_s=1.5) is None
    assert steps.calls == [("push_task", (str(repo),), (3, 1.5))]
    assert publish.finish_run(repo, "sweep", False, True) == "c0ffee"  # local: not pushed
    name, (root, message, branch, remote), _ = steps.calls[-1]
    assert (name, root, branch, remote) == ("publish_task", str(repo), None, None)
    assert message.startswith("convflow: sweep run manual (None) from ")
    monkeypatch.setenv("PREFECT__RUNTIME__DEPLOYMENT__NAME", "nightly")
    publish.finish_run(repo, "pipeline", False, True)
    assert steps.calls[-1][1][2:] == ("results/nightly", "origin")
    assert "Deployment: nightly" in steps.calls[-1][1][1]
    publish.finish_run(repo, "pipeline", False, True, branch="results/mine")
    assert steps.calls[-1][1][2:] == ("results/mine", "origin")


def test_a_run_retries_each_step_twice_10_s_apart_unless_told(
        repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    steps = _Steps(monkeypatch)
    publish.start_run(repo)
    publish.finish_run(repo, "pipeline", True, False)
    assert [(name, options) for name, _, options in steps.calls] == [
        ("fetch_task", (2, 10.0)), ("pull_task", (2, 10.0)), ("push_task", (2, 10.0))]


def test_a_results_commit_names_the_flow_run(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    steps = _Steps(monkeypatch)
    monkeypatch.setenv("PREFECT__RUNTIME__FLOW_RUN__NAME", "brave-cat")
    monkeypatch.setenv("PREFECT__RUNTIME__FLOW_RUN__ID", "0b5e7c1d")
    publish.finish_run(repo, "pipeline", False, True)
    message = steps.calls[-1][1][1]
    assert message.startswith("convflow: pipeline run brave-cat (0b5e7c1d) from ")
    assert "\nFlow run: brave-cat (0b5e7c1d)\n" in message


def test_pull_and_push_name_the_remote_and_the_run_cache(
        repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    steps = _Steps(monkeypatch)
    publish.dvc_pull(repo, "spare")
    publish.dvc_push(repo, "spare")
    publish.exp_push(repo, ["e1", "e2"])
    publish.exp_push(repo, [])
    assert steps.calls == [
        ("dvc pull", ["pull", "--allow-missing", "--run-cache", "-r", "spare"], 3 * 3600),
        ("dvc push", ["push", "--run-cache", "-r", "spare"], 3 * 3600),
        ("dvc exp push", ["exp", "push", "--run-cache", "origin", "e1", "e2"], 3 * 3600)]


@pytest.mark.parametrize(("ran", "detail", "transient"), [
    (("ERROR: a\nok\nERROR: b \nERROR: a\n", 1, False), "ERROR: a ERROR: b", True),
    (("fine\nERROR: failed to transfer 'x'\n", 0, False), "ERROR: failed to transfer 'x'", True),
    (("ERROR: 403 Forbidden\n", 1, False), "ERROR: 403 Forbidden", False),
    (("ERROR: 403 Forbidden\n", None, True),
     "ERROR: no answer within 10800 s (stalled transfer)", True)])
def test_a_failed_transfer_says_why_where_and_whether_a_retry_helps(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ran: tuple, detail: str,
        transient: bool) -> None:
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text("['remote \"spare\"']\n    url = /mnt/spare\n")
    _Steps(monkeypatch, *ran)
    with pytest.raises(StageFailed) as info:
        publish.dvc_push(tmp_path, "spare")
    hint = "retrying may help" if transient else "not retried: fix the remote or its settings"
    assert info.value.message == f"{detail} [DVC remote 'spare' (/mnt/spare); {hint}]"
    assert (info.value.stage, info.value.kind, info.value.transient) == (
        "dvc push", "step", transient)
    assert info.value.returncode == ran[1]


# ------------------------------------------------------------------------- results branch
METRICS = ["metrics/evaluate.json"]


def _change(repo: Path, accuracy: float) -> None:
    (repo / "metrics" / "evaluate.json").write_text(json.dumps({"test": {"accuracy": accuracy}}))


def test_a_local_results_commit_says_where_it_went(repo: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "convflow.publish")
    _change(repo, 0.8)
    commit = results_branch.publish_results(repo, "r", files=METRICS, remote="nowhere")
    assert caplog.messages[-1] == (f"committed results {commit[:12]} on 'main' (no git remote "
                                   "'nowhere': not pushed)")
    assert results_branch.publish_results(repo, "r", files=METRICS, remote=None) is None
    assert caplog.messages[-1] == "results on 'main' are already these: nothing to commit"


def test_a_pushed_results_commit_says_where_and_at_which_attempt(
        repo: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "convflow.publish")
    bare = _origin(repo)
    _change(repo, 0.8)
    commit = results_branch.publish_results(repo, "r", "results/x", files=METRICS)
    assert caplog.messages[-1] == f"pushed results {commit[:12]} to origin/results/x (attempt 1)"
    assert git(bare, "rev-parse", "results/x").strip() == commit


def _author(repo: Path, rev: str) -> str:
    return git(repo, "log", "-1", "--format=%an <%ae>", rev).strip()


@pytest.mark.parametrize(("host", "email"), [("node7", "convflow@node7"),
                                             ("", "convflow@worker")])
def test_a_machine_without_a_git_identity_commits_as_the_worker_of_its_host(
        repo: Path, monkeypatch: pytest.MonkeyPatch, host: str, email: str) -> None:
    for var in ("AUTHOR", "COMMITTER"):
        monkeypatch.delenv(f"GIT_{var}_NAME")
        monkeypatch.delenv(f"GIT_{var}_EMAIL")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", "/dev/null")
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setattr(socket, "gethostname", lambda: host)
    _change(repo, 0.8)
    commit = results_branch.publish_results(repo, "r", files=METRICS, remote=None)
    assert _author(repo, commit) == f"convflow worker <{email}>"


def test_a_machine_with_a_git_identity_commits_as_it(repo: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "node7")
    _change(repo, 0.8)
    commit = results_branch.publish_results(repo, "r", files=METRICS, remote=None)
    assert _author(repo, commit) == "convflow-test <test@convflow.invalid>"  # the env's
    monkeypatch.delenv("GIT_COMMITTER_EMAIL")
    git(repo, "config", "user.email", "me@lab.invalid")
    _change(repo, 0.9)
    commit = results_branch.publish_results(repo, "r", files=METRICS, remote=None)
    assert _author(repo, commit) == "convflow-test <test@convflow.invalid>"


def test_a_failed_git_command_is_named_with_gits_error(tmp_path: Path) -> None:
    git(tmp_path, "init", "-q")
    with pytest.raises(results_branch.PublishError) as info:
        results_branch.publish_results(tmp_path, "r", remote=None)
    failed = info.value
    assert failed.message.startswith("git rev-parse HEAD failed: fatal: ")
    assert (failed.stage, failed.kind, failed.returncode, failed.transient) == (
        "git push", "step", None, False)
    again = pickle.loads(pickle.dumps(failed))  # Prefect may pickle a task's exception
    assert type(again) is results_branch.PublishError and again.message == failed.message
