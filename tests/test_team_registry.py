"""The model registry as a team uses it: ``python -m flows promote [--push]`` and a fresh
clone's ``predict --stage prod``, each mistake one line; a version only for a new model.

Real git, DVC and GTO on a toy pipeline whose "model" is a small file (no training).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from conftest import PROJECT, dvc, git, run, subprocess_env
from prefect_fixtures import make_toy_repo, py_stage

MODEL = ("import os, yaml; p = yaml.safe_load(open('params.yaml')); os.makedirs('models', "
         "exist_ok=True); open('models/model.pt', 'w').write('weights %s' % p['a']['n'])")
FIGURE = ("import yaml; p = yaml.safe_load(open('params.yaml')); "
          "open('fig.txt', 'w').write('dpi %s' % p['b']['dpi'])")


#: the test's git identity in this process too, for the commits the code under test makes
pytestmark = pytest.mark.usefixtures("git_identity")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A toy pipeline with a model artifact, run and committed, with a bare origin."""
    repo = make_toy_repo(tmp_path / "repo", {
        "train": {"cmd": py_stage(MODEL), "params": ["a.n"], "outs": ["models/model.pt"]},
        "plot": {"cmd": py_stage(FIGURE), "params": ["b.dpi"],
                 "outs": [{"fig.txt": {"cache": False}}]}},
        params={"a": {"n": 1}, "b": {"dpi": 50}})
    doc = yaml.safe_load((repo / "dvc.yaml").read_text())
    doc["artifacts"] = {"cifar-cnn": {"path": "models/model.pt", "type": "model"}}
    (repo / "dvc.yaml").write_text(yaml.safe_dump(
        {"vars": [{"paths": {"model": "models/model.pt"}}], **doc}, sort_keys=False))
    dvc(repo, "remote", "add", "-d", "store", str(tmp_path / "dvc-store"))
    dvc(repo, "repro")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "a model")
    origin = tmp_path / "origin.git"
    git(tmp_path, "init", "-q", "--bare", "-b", "main", str(origin))
    git(repo, "remote", "add", "origin", origin.as_uri())
    git(repo, "push", "-q", "origin", "main")
    return repo


def flows_cli(repo: Path, *args: str) -> tuple[int, str, str]:
    proc = run([sys.executable, "-m", "flows", *args, "--root", str(repo)], cwd=PROJECT,
               check=False)
    return proc.returncode, proc.stdout, proc.stderr


def assert_one_line(code: int, err: str, *words: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("convflow.flow: error: "), err
    assert len(lines[0]) < 400, lines[0]
    for word in words:
        assert word in lines[0], lines[0]


def commit_change(repo: Path, params: dict) -> None:
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    dvc(repo, "repro")
    git(repo, "commit", "-qam", f"params {params}")


def test_a_version_is_registered_only_when_the_model_file_changed(repo):
    from flows.registry import register_version

    assert register_version(repo, "run 1") == "cifar-cnn@v0.0.1"
    commit_change(repo, {"a": {"n": 1}, "b": {"dpi": 60}})   # figures only
    assert register_version(repo, "run 2") == "cifar-cnn@v0.0.1"
    assert git(repo, "tag", "-l").split() == ["cifar-cnn@v0.0.1"]
    commit_change(repo, {"a": {"n": 2}, "b": {"dpi": 60}})   # a new model
    assert register_version(repo, "run 3") == "cifar-cnn@v0.0.2"


def test_promote_is_idempotent_pushes_its_tags_and_never_prints_a_traceback(repo, tmp_path):
    from flows.registry import register_version

    code, _, err = flows_cli(repo, "promote")
    assert_one_line(code, err, "no registered version of 'cifar-cnn'")
    register_version(repo, "run 1")
    for args, words in ((["v9.9.9"], ["v9.9.9"]), (["nonsense"], ["expected one like"]),
                        (["--stage", "bad stage"], ["'bad stage' is not a valid name"]),
                        (["--stage", "s" * 100_000], ["is not a valid name"])):
        code, _, err = flows_cli(repo, "promote", *args)
        assert_one_line(code, err, *words)
    for _ in range(2):  # the second time: already in prod, nothing to do, no error
        code, out, err = flows_cli(repo, "promote", "--push")
        assert code == 0, err
        assert out.strip() == "cifar-cnn@v0.0.1 -> prod"
    assert git(repo, "tag", "-l", "cifar-cnn#prod*").split() == ["cifar-cnn#prod#1"]
    remote = git(repo, "ls-remote", "--tags", "origin").split()
    assert {"refs/tags/cifar-cnn@v0.0.1", "refs/tags/cifar-cnn#prod#1"} <= set(remote)


def predict_prod(clone: Path) -> tuple[int, str]:
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 120, 40)).save(clone / "cat.png")
    env = {**subprocess_env(), "PYTHONPATH": str(PROJECT)}
    proc = run([sys.executable, "-m", "stages.predict", "--stage", "prod", "cat.png"],
               cwd=clone, env=env, check=False)
    return proc.returncode, proc.stderr


def test_a_fresh_clones_predict_names_what_is_missing_in_one_line(repo, tmp_path):
    from flows.registry import promote, register_version

    register_version(repo, "run 1")
    git(repo, "push", "-q", "origin", "refs/tags/*")
    laptop = tmp_path / "laptop"
    git(tmp_path, "clone", "-q", git(repo, "remote", "get-url", "origin").strip(), str(laptop))
    code, err = predict_prod(laptop)                      # nothing promoted (or not pushed)
    assert code == 2 and "Traceback" not in err, err
    assert "no version of 'cifar-cnn' is in registry stage 'prod'" in err
    assert "python -m flows promote --stage prod --push" in err

    promote(repo, push=True)                              # the tag is pushed; the model not
    git(laptop, "fetch", "-q", "--tags")
    code, err = predict_prod(laptop)
    assert code == 2 and "Traceback" not in err, err
    assert "is in neither the DVC cache nor the DVC remote" in err and "dvc push" in err
    assert len(err.strip().splitlines()) == 1, err

    dvc(repo, "push")                                     # pushed, then corrupted in the remote
    objects = [p for p in (tmp_path / "dvc-store").rglob("*") if p.is_file()]
    (model,) = [p for p in objects if p.read_bytes().startswith(b"weights")]
    model.write_bytes(b"weights 9")
    code, err = predict_prod(laptop)
    assert code == 2 and "Traceback" not in err, err
    assert "does not match its md5 in dvc.lock" in err and "corrupted object" in err, err
    assert not list((laptop / ".dvc/tmp/registry").rglob("model.pt"))  # nothing written
