"""What flows/publish.py asks a real ``dvc`` and tells the user, against local-folder DVC
remotes: which remote a pull or push goes to, which remote a failure names, where DVC's
output is logged, how often a remote's name is asked for (the mutants scripts/mutation.sh
makes of flows/publish.py must each fail one of these)."""

from __future__ import annotations

import locale
import logging
import os
import shutil
import sys
from pathlib import Path

import pytest
from conftest import dvc, init_and_commit
from test_decisions_flows import _Log

from flows import publish
from flows.integrity import object_key
from flows.runner import StageFailed

MD5 = "249c850f62ea50feb918b095fc56d763"  # of b"payload\n"
NOT_RETRIED = "not retried: fix the remote or its settings"


def _config(tmp_path: Path, default: str | None = "team") -> str:
    """DVC remotes in local folders: 'team' (an '=' in its URL), 'spare', and 'broken' (a
    folder under a file); ``default`` the default one."""
    core = f"[core]\n    analytics = false\n    remote = {default}\n" if default else \
        "[core]\n    analytics = false\n"
    return (core + f"['remote \"team\"']\n    url = {tmp_path / 'team=1'}\n"
            f"['remote \"spare\"']\n    url = {tmp_path / 'spare'}\n"
            f"['remote \"broken\"']\n    url = {tmp_path / 'not-a-dir' / 'store'}\n")


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A git + DVC repository tracking ``data.txt`` ("payload") with DVC, remotes as above."""
    repo = tmp_path / "repo"
    repo.mkdir()
    init_and_commit(repo, "empty")
    (repo / ".dvc" / "config").write_text(_config(tmp_path))
    (tmp_path / "not-a-dir").write_text("")
    (repo / "data.txt").write_text("payload\n")
    dvc(repo, "add", "-q", "data.txt")
    return repo


def _forget(repo: Path) -> None:
    """As on a fresh clone: neither the workspace copy nor the local cache has the data."""
    (repo / "data.txt").unlink()
    shutil.rmtree(repo / ".dvc" / "cache")


def test_push_and_pull_go_to_the_default_remote_and_their_output_to_the_log(
        store: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "convflow.publish")
    publish.dvc_push(store)  # outside a flow run: the module's logger
    assert (tmp_path / "team=1" / object_key(MD5)).read_text() == "payload\n"
    assert ("convflow.publish", "dvc push | 1 file pushed") in [
        (r.name, r.getMessage()) for r in caplog.records]
    _forget(store)
    log = _Log()
    publish.dvc_pull(store, logger=log)  # no remote named: the default one, no "-r"
    assert (store / "data.txt").read_text() == "payload\n"
    assert "dvc pull | 1 file fetched and 1 file added" in log.infos
    publish.dvc_push(store, "spare", logger=log)
    assert log.infos[-1] == "dvc push | 1 file pushed"
    assert (tmp_path / "spare" / object_key(MD5)).is_file()


def test_a_failed_transfer_names_the_remote_it_asked(store: Path, tmp_path: Path) -> None:
    _forget(store)
    log = _Log()
    with pytest.raises(StageFailed) as info:
        publish.dvc_pull(store, "broken", logger=log)  # not the default 'team'
    assert info.value.message.endswith(
        f"[DVC remote 'broken' ({tmp_path / 'not-a-dir' / 'store'}); {NOT_RETRIED}]")
    assert any(line.startswith("dvc pull | ERROR: ") for line in log.infos)
    with pytest.raises(StageFailed) as info:
        publish.exp_push(store, ["nope"], logger=log)  # no remote of its own: the default
    assert info.value.message == ("ERROR: 'nope' is not a valid experiment name "
                                  f"[DVC remote 'team' ({tmp_path / 'team=1'}); {NOT_RETRIED}]")
    assert "dvc exp push | ERROR: 'nope' is not a valid experiment name" in log.infos


def test_a_corrupted_copy_is_removed_and_named_with_the_remote_pulled_from(
        store: Path, tmp_path: Path) -> None:
    publish.dvc_push(store, "spare", logger=_Log())
    (store / "data.txt").unlink()
    cached = store / ".dvc" / "cache" / object_key(MD5)
    before = cached.stat()  # rotten bytes, same size and time: DVC trusts its cache
    cached.chmod(0o644)
    cached.write_text("garbage\n")
    os.utime(cached, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(StageFailed) as info:
        publish.dvc_pull(store, "spare", logger=_Log())
    assert info.value.message.startswith(
        f"corrupted object {object_key(MD5)} for data.txt in DVC remote 'spare' "
        f"({tmp_path / 'spare'}): its bytes do not match dvc.lock's md5")
    assert not (store / "data.txt").exists() and not cached.exists()
    assert (tmp_path / "spare" / object_key(MD5)).read_text() == "payload\n"


_FLAKY_DVC = """import os, subprocess, sys
log, fails, *args = sys.argv[1:]
with open(log, "a+") as fh:
    fh.seek(0)
    asked = len(fh.readlines())
    fh.write(f"{' '.join(args)} analytics-off={os.environ.get('DVC_NO_ANALYTICS')}\\n")
if asked < int(fails):
    sys.exit("ERROR: unexpected error - [Errno 11] Resource temporarily unavailable")
sys.exit(subprocess.call([sys.executable, "-m", "dvc", *args]))
"""


@pytest.mark.parametrize(("default", "fails", "described", "asked"), [
    (None, 0, "(no default DVC remote)", 1),  # DVC's "No default remote": asked once
    ("team", 1, "'team' ({tmp}/team=1)", 2),  # a hiccup: asked again
    ("team", 9, "(no default DVC remote)", 2),  # failing on: given up after the second try
], ids=["no default remote", "a hiccup", "failing on"])
def test_the_default_remotes_name_is_asked_again_only_after_a_hiccup(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, default: str | None, fails: int,
        described: str, asked: int) -> None:
    (tmp_path / "repo").mkdir()
    repo = init_and_commit(tmp_path / "repo", "empty")
    (repo / ".dvc" / "config").write_text(_config(tmp_path, default))
    (tmp_path / "flaky_dvc.py").write_text(_FLAKY_DVC)
    log = tmp_path / "asked.log"
    monkeypatch.setattr(publish, "dvc_command", lambda *args: [
        sys.executable, str(tmp_path / "flaky_dvc.py"), str(log), str(fails), *args])
    monkeypatch.delenv("DVC_NO_ANALYTICS", raising=False)
    assert publish.describe_remote(repo) == described.format(tmp=tmp_path)
    # no telemetry from a dvc that convflow starts, whatever the caller's environment
    assert log.read_text().splitlines() == ["remote default analytics-off=1"] * asked


def test_a_remotes_url_is_read_as_utf8_whatever_the_locale(tmp_path: Path) -> None:
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_bytes(
        "['remote \"team\"']\n    url = /mnt/données\n".encode())
    before = locale.setlocale(locale.LC_CTYPE)
    try:
        locale.setlocale(locale.LC_CTYPE, "C")  # an ASCII locale (no Python UTF-8 mode)
        assert publish.describe_remote(tmp_path, "team") == "'team' (/mnt/données)"
    finally:
        locale.setlocale(locale.LC_CTYPE, before)
