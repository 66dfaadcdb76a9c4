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

import gto.api
import pytest
import yaml
from conftest import git

from flows import publish, registry, results_branch
from flows.runner import StageFailed
from stages.errors import UserError


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
_DVC_YAML = """\
vars:
  - paths:
      metrics: metrics
      production: production.yaml
stages: {}
artifacts:
  net-a:
    path: models/net-a.pt
    type: model
"""


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A git repository with the model artifact ``net-a``, one run committed; the tests run
    from a folder that is no repository, so the repository is always the one named."""
    for var in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{var}_NAME", "convflow-test")
        monkeypatch.setenv(f"GIT_{var}_EMAIL", "test@convflow.invalid")
    root = tmp_path / "repo"
    (root / "metrics").mkdir(parents=True)
    (root / "dvc.yaml").write_text(_DVC_YAML)
    lock = {"schema": "2.0", "stages": {"train": {"outs": [{"path": "models/net-a.pt",
                                                            "md5": "a" * 32}]}}}
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))
    (root / "metrics" / "evaluate.json").write_text(json.dumps({"test": {"accuracy": 0.75}}))
    git(root, "init", "-q", "-b", "main")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "run")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    return root


def _origin(repo: Path) -> Path:
    bare = repo.parent / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", str(bare)], check=True)
    git(repo, "remote", "add", "origin", str(bare))
    return bare


def test_the_baseline_file_is_written_once_and_reads_version_first(repo: Path) -> None:
    log = _Log()
    assert registry.refresh_baseline(repo, log) == {"version": None, "rev": None,
                                                    "accuracy": None}
    text = (repo / "production.yaml").read_text()
    assert text.splitlines()[-3:] == ["version: null", "rev: null", "accuracy: null"]
    assert log.infos == ["production baseline is now None (test.accuracy None)"]
    registry.refresh_baseline(repo, log)  # unchanged: not rewritten, not said again
    assert len(log.infos) == 1 and (repo / "production.yaml").read_text() == text


def test_an_unreadable_registry_keeps_the_baseline_and_says_why(repo: Path) -> None:
    (repo / "production.yaml").write_text("version: kept\n")
    (repo / "dvc.yaml").write_text(_DVC_YAML.split("artifacts:")[0])  # no model declared
    log = _Log()
    assert registry.refresh_baseline(repo, log) is None
    assert log.warnings == ["model registry not readable (dvc.yaml: no model under "
                            "'artifacts:' to register): keeping production.yaml"]
    assert (repo / "production.yaml").read_text() == "version: kept\n"


def test_asking_for_origin_prints_nothing(repo: Path, capfd: pytest.CaptureFixture[str]
                                         ) -> None:
    assert registry.has_origin(repo) is False
    _origin(repo)
    assert registry.has_origin(repo) is True
    assert capfd.readouterr() == ("", "")


def test_a_failed_tag_push_names_the_artifact_and_gits_last_line(repo: Path) -> None:
    git(repo, "remote", "add", "origin", str(repo.parent / "missing.git"))
    with pytest.raises(StageFailed) as info:
        registry.push_tags(repo)
    failed = info.value
    assert (failed.stage, failed.kind, failed.transient) == ("git push", "step", True)
    assert failed.returncode not in (0, None)
    assert failed.message.startswith("the registry tags of 'net-a' were not pushed to origin: ")
    pushed = subprocess.run(["git", "push", "-q", "origin", "HEAD"], cwd=repo,
                            capture_output=True, text=True)
    assert failed.message.endswith(": " + pushed.stderr.strip().splitlines()[-1])


def test_ship_registers_promotes_and_pushes_the_named_repository(
        repo: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "convflow.registry")
    bare = _origin(repo)
    log = _Log()
    registry.ship(repo, "first model", "prod", True, log)
    assert log.infos[0] == "registered net-a@v0.0.1"
    assert log.infos[-1] == "net-a@v0.0.1 is now in stage 'prod'"
    assert registry.production(repo)["version"] == "v0.0.1"
    assert caplog.messages[-1] == "production baseline is now net-a@v0.0.1 (test.accuracy 0.75)"
    assert git(repo, "tag", "-l", "--format=%(contents:subject)", "net-a@v0.0.1").strip() \
        == "first model"
    pushed = git(bare, "tag", "-l").split()
    assert "net-a@v0.0.1" in pushed and any(t.startswith("net-a#prod#") for t in pushed)


def test_ship_without_push_keeps_the_tags_local(repo: Path) -> None:
    bare = _origin(repo)
    registry.ship(repo, "m", "prod", False, _Log())
    assert registry.production(repo)["version"] == "v0.0.1"
    assert git(bare, "tag", "-l") == ""


def test_ship_without_a_stage_only_registers(repo: Path, monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "convflow.registry")
    def ask_gto(*args: Any) -> None:
        raise AssertionError("GTO asked for a stage no tag names")
    monkeypatch.setattr(gto.api, "find_versions_in_stage", ask_gto)
    log = _Log()
    registry.ship(repo, "m", None, True, log)  # no origin: nothing pushed, no error
    assert registry.model_hash(repo, "HEAD") == "a" * 32
    registry.ship(repo, "m", None, True, log)  # the same model: the same version
    assert log.infos == ["registered net-a@v0.0.1"] * 2
    assert caplog.messages == ["model unchanged since net-a@v0.0.1: no new version"]
    assert registry.production(repo) is None  # from the tags alone (GTO's import is slow)


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


def test_promote_names_what_is_missing_and_shows_a_long_version_cut(repo: Path) -> None:
    with pytest.raises(UserError) as info:
        registry.promote(repo)
    assert str(info.value) == ("no registered version of 'net-a' to promote: a flow run that "
                               "passes the gate with --commit registers one")
    registry.register_version(repo, "m")
    for version, shown in (("x" * 40, "x" * 40), ("x" * 41, "x" * 40 + "...")):
        with pytest.raises(UserError, match=f"^version '{shown}': expected one like v0.0.3$"):
            registry.promote(repo, version)


def test_promote_tags_the_stage_and_pushes_only_when_asked(repo: Path) -> None:
    bare = _origin(repo)
    registry.register_version(repo, "m")
    assert registry.promote(repo, "v0.0.1") == "net-a@v0.0.1"
    assert git(bare, "tag", "-l") == ""  # not asked to push
    (stage_tag,) = git(repo, "tag", "-l", "net-a#prod#*").split()
    assert git(repo, "tag", "-l", "--format=%(contents:subject)", stage_tag).strip() == (
        "convflow: net-a@v0.0.1 -> prod")
    registry.promote(repo, "v0.0.1", "staging", push=True)  # in prod already, not in staging
    assert registry.production(repo, "staging")["version"] == "v0.0.1"
    assert set(git(bare, "tag", "-l").split()) == set(git(repo, "tag", "-l").split())


def test_a_gto_error_is_one_line_of_at_most_300_characters() -> None:
    from gto.exceptions import ArtifactNotFound, GTOException

    def fail(exc: Exception) -> Any:
        raise exc
    with pytest.raises(UserError) as info:
        registry._gto(fail, ArtifactNotFound("net-a"))
    assert str(info.value) == ("nothing is registered yet: a flow run that passes the gate "
                               "with --commit registers a version")
    assert registry._gto(fail, ArtifactNotFound("net-a"), missing=None) is None
    with pytest.raises(UserError) as info:
        registry._gto(fail, GTOException("bad  tag\n  here " + "x" * 400))
    assert str(info.value) == "model registry: " + ("bad tag here " + "x" * 400)[:300]
