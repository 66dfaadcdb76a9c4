"""A corrupted object in the S3 remote (a real SeaweedFS store) is caught on a fresh clone."""

from __future__ import annotations

import logging
from contextlib import closing
from pathlib import Path

import pytest
from conftest import dvc, git
from prefect_fixtures import make_toy_repo, py_stage
from team_fixtures import BUCKET, object_store  # noqa: F401 (the module's store)

MAKE = ("import os; open('model.pt', 'wb').write(bytes(range(256)) * 40); "
        "os.makedirs('data', exist_ok=True); "
        "[open(f'data/{i}.bin', 'wb').write(bytes([i]) * 3000) for i in range(3)]")


def _flip(store, key: str, at: int = 100) -> None:
    """Flip one byte of the stored object ``key`` in place (what a bad disk or copy does)."""
    with closing(store.client()) as client:
        body = bytearray(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
        body[at] ^= 0xFF
        client.put_object(Bucket=BUCKET, Key=key, Body=bytes(body))


def _pushed(tmp_path: Path, store, prefix: str) -> Path:
    repo = make_toy_repo(tmp_path / "src", {"make": {"cmd": py_stage(MAKE),
                                                     "outs": ["model.pt", "data"]}})
    dvc(repo, "remote", "add", "-d", "storage", f"s3://{BUCKET}/{prefix}")
    dvc(repo, "remote", "modify", "storage", "endpointurl", store.endpoint)
    dvc(repo, "repro")
    (repo / "images.bin").write_bytes(bytes(range(200)) * 50)  # data a user `dvc add`-ed
    dvc(repo, "add", "images.bin")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "outputs")
    dvc(repo, "push")
    return repo


def _fresh_clone(repo: Path, dest: Path) -> Path:
    git(dest.parent, "clone", "-q", "--depth", "1", f"file://{repo}", str(dest))
    return dest


@pytest.mark.slow  # a store, a push and two fresh clones pulling from it
def test_a_corrupted_object_in_the_s3_remote_is_caught_on_a_fresh_clone(
        object_store, tmp_path) -> None:  # noqa: F811
    from flows.integrity import locked_md5, md5_of, object_key
    from flows.publish import dvc_pull
    from flows.runner import StageFailed

    repo = _pushed(tmp_path, object_store, "corrupt")
    assert locked_md5(repo)["data"].endswith(".dir")  # a directory output, checked per file
    targets = ["model.pt", "data/1.bin", "images.bin"]
    md5s = [md5_of(repo / t) for t in targets]
    keys = [f"corrupt/{object_key(m)}" for m in md5s]
    for key in keys:
        _flip(object_store, key)

    clone = _fresh_clone(repo, tmp_path / "clone")
    with pytest.raises(StageFailed) as caught:
        dvc_pull(clone, logger=logging.getLogger("test"))
    message = caught.value.message
    assert "\n" not in message and "Traceback" not in message
    named = [t for t, m in zip(targets, md5s, strict=True)
             if f"corrupted object {object_key(m)} for {t} (and 2 more)" in message]
    assert len(named) == 1, message
    assert f"'storage' (s3://{BUCKET}/corrupt)" in message and not caught.value.transient
    # nothing downstream can read the garbage, and the remote still has the objects
    assert not any((clone / t).exists() for t in targets)
    assert (clone / "data" / "0.bin").exists()  # what was whole stays
    assert set(keys) <= set(object_store.keys("corrupt"))
    status = dvc(clone, "status").stdout  # no longer clean over garbage
    assert "not in cache:       model.pt" in status and "not in cache:       data" in status

    for key in keys:  # the objects whole again: a fresh clone pulls without complaint
        _flip(object_store, key)
    good = _fresh_clone(repo, tmp_path / "good")
    dvc_pull(good, logger=logging.getLogger("test"))
    assert [md5_of(good / t) for t in targets] == md5s
