"""The model registry (flows/registry.py) at its edges: the mutants scripts/mutation.sh makes
of it must each fail one of these (fast, in-process) tests or those in test_decisions.py."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from typing import Any

import gto.api
import pytest
import yaml
from conftest import git
from test_decisions_flows import _DVC_YAML, _Log, _origin, make_repo

from flows import registry
from flows.runner import StageFailed
from stages.errors import UserError


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return make_repo(tmp_path, monkeypatch)


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


def test_a_lock_entry_without_an_md5_gives_no_model_hash(repo: Path) -> None:
    """DVC 3 writes ``hash: md5`` beside ``md5:``; the algorithm's name is never taken for a
    hash (two models would then compare equal and no new version be registered)."""
    _, path = registry.model_artifact(repo)
    lock = {"schema": "2.0", "stages": {"train": {"cmd": "train", "outs": [
        {"path": path, "hash": "md5", "size": 1}]}}}
    (repo / "dvc.lock").write_text(yaml.safe_dump(lock))
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "a lock entry without md5")
    assert registry.model_hash(repo, "HEAD") is None
