"""A worker's clone as Prefect's git_clone makes it (shallow, over a file:// URL), made
ready by flows/checkout.py; what a run will ship checked before any work; push failures
classed right. Real git and DVC on toy pipelines, no server."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import pytest
import yaml
from conftest import dvc, git, run
from prefect_fixtures import make_toy_repo, py_stage

from stages.errors import UserError

SCORE = ("import json, yaml; n = yaml.safe_load(open('params.yaml'))['a']['n']; "
         "open('big.bin', 'w').write('x' * n); json.dump({'n': n}, open('m.json', 'w'))")
BRANCH = "results/nightly"


#: the test's git identity in this process too, for the commits the code under test makes
pytestmark = pytest.mark.usefixtures("git_identity")


@pytest.fixture
def origin(tmp_path: Path) -> Path:
    """A bare origin (two commits, a registry tag) of a toy pipeline with a DVC remote."""
    src = make_toy_repo(tmp_path / "src", {"score": {
        "cmd": py_stage(SCORE), "params": ["a.n"], "outs": ["big.bin"],
        "metrics": [{"m.json": {"cache": False}}]}})
    dvc(src, "remote", "add", "-d", "store", str(tmp_path / "dvc-store"))
    git(src, "commit", "-qam", "DVC remote")
    # on a commit a depth-1 clone lacks, as the registry's tags are (on results commits)
    git(src, "tag", "-a", "cifar-cnn#prod#1", "-m", "a stage tag", "HEAD~1")
    bare = tmp_path / "origin.git"
    git(tmp_path, "clone", "-q", "--bare", str(src), str(bare))
    return bare


def shallow_clone(origin: Path, dest: Path) -> Path:
    """What prefect.yaml's git_clone step does: ``git clone --depth 1 -b main <URL>``."""
    git(dest.parent, "clone", "-q", "--depth", "1", "-b", "main", origin.as_uri(), str(dest))
    assert git(dest, "rev-parse", "--is-shallow-repository").strip() == "true"
    return dest


def test_deepen_makes_a_shallow_file_url_clone_whole_with_its_tags(origin, tmp_path):
    from flows.checkout import deepen

    work = shallow_clone(origin, tmp_path / "w")
    assert git(work, "tag", "-l") == ""                      # what the gate saw on a worker
    assert deepen(work)
    assert git(work, "rev-parse", "--is-shallow-repository").strip() == "false"
    assert git(work, "rev-list", "--count", "HEAD").strip() == "2"
    assert git(work, "tag", "-l").split() == ["cifar-cnn#prod#1"]
    assert deepen(work)                                      # a whole clone: fine again


def test_a_shallow_clone_saves_experiments_once_deepened(origin, tmp_path):
    from flows.checkout import deepen

    work = shallow_clone(origin, tmp_path / "w")
    deepen(work)
    dvc(work, "exp", "run", "--temp", "-n", "deep-1", "-S", "a.n=3")
    assert "deep-1" in dvc(work, "exp", "list", "--names-only").stdout.split()


def test_the_next_run_starts_from_the_last_results_and_reruns_only_what_changed(
        origin, tmp_path):
    from flows.checkout import deepen, seed_from_results
    from flows.publish import publish_results

    first = shallow_clone(origin, tmp_path / "first")
    deepen(first)
    dvc(first, "repro")
    dvc(first, "push")
    publish_results(first, "convflow: run 1", branch=BRANCH)

    second = shallow_clone(origin, tmp_path / "second")      # main has not moved
    deepen(second)
    assert seed_from_results(second, BRANCH) == ["dvc.lock", "m.json", ".gitignore"]
    dvc(second, "pull")
    assert "Data and pipelines are up to date." in dvc(second, "status").stdout
    assert publish_results(second, "convflow: run 2", branch=BRANCH) is None  # no change

    third = shallow_clone(origin, tmp_path / "third")
    (third / "params.yaml").write_text(yaml.safe_dump({"a": {"n": 5}}))
    seed_from_results(third, BRANCH)
    assert "Running stage 'score'" in dvc(third, "repro").stdout
    assert seed_from_results(third, "results/none-yet") == []  # a first run: nothing

    # docs/team.md's one command that makes a result the team's baseline: a fast-forward
    # of main, or nothing at all when main moved on since the run started
    laptop, other = tmp_path / "laptop", tmp_path / "other"
    for dest in (laptop, other):
        git(tmp_path, "clone", "-q", origin.as_uri(), str(dest))
    git(other, "commit", "-q", "--allow-empty", "-m", "main moves on")
    git(other, "push", "-q", "origin", "main")
    refused = run(["git", "push", "origin", f"origin/{BRANCH}:main"], cwd=laptop, check=False)
    assert refused.returncode != 0 and "rejected" in refused.stderr, refused.stderr
    git(other, "push", "-q", "--force", "origin", "HEAD~1:main")  # main back where it was
    git(laptop, "push", "-q", "origin", f"origin/{BRANCH}:main")
    assert git(origin, "rev-parse", "main") == git(origin, "rev-parse", BRANCH)


@pytest.mark.parametrize("kwargs, message", [
    ({"promote": "bad stage"}, "registry stage 'bad stage' is not a valid name"),
    ({"promote": "p" * 5000}, "is not a valid name"),
    ({"promote": "prod", "commit": False}, "needs commit"),
    ({"branch": "results/a..b"}, "results branch 'results/a..b' is not a valid git branch"),
    ({"branch": "results/-x~^:"}, "is not a valid git branch name"),
])
def test_preflight_refuses_what_could_not_ship_in_one_line(origin, tmp_path, kwargs,
                                                             message):
    from flows.checkout import preflight

    work = shallow_clone(origin, tmp_path / "w")
    options = {"pull": False, "push": False, "commit": True, "branch": None,
               "promote": None, **kwargs}
    with pytest.raises(UserError, match=message) as caught:
        preflight(work, **options)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 300


def test_preflight_needs_the_remotes_a_run_uses(tmp_path):
    from flows.checkout import preflight

    repo = make_toy_repo(tmp_path / "toy", {"s": {"cmd": py_stage("pass")}})
    with pytest.raises(UserError, match="no default DVC remote"):
        preflight(repo, pull=True, push=False, commit=False, branch=None, promote=None)
    with pytest.raises(UserError, match="has none"):
        preflight(repo, pull=False, push=False, commit=True, branch=BRANCH, promote=None)
    preflight(repo, pull=False, push=False, commit=True, branch=None, promote="prod")


def test_permanent_dvc_errors_are_whole_words_only():
    from flows.publish import _PERMANENT

    hashed = "ERROR: failed to transfer 'md5/ab/403fe12c0d' - connection reset by peer"
    assert not _PERMANENT.search(hashed)                     # a hash is no HTTP status
    assert _PERMANENT.search("ERROR: An error occurred (403) when calling HeadObject")
    assert _PERMANENT.search("ERROR: 'r-2; r-1' are not valid experiment names")


def test_a_push_declined_by_a_server_hook_is_not_retried(origin, tmp_path):
    from flows.publish import PublishError, publish_results

    calls = tmp_path / "calls"
    hook = origin / "hooks" / "pre-receive"
    hook.write_text(f"#!/bin/sh\necho x >> {calls}\necho 'results are frozen' >&2\nexit 1\n")
    hook.chmod(hook.stat().st_mode | stat.S_IEXEC)
    work = tmp_path / "w"
    git(tmp_path, "clone", "-q", origin.as_uri(), str(work))
    dvc(work, "repro")
    with pytest.raises(PublishError, match="pre-receive hook declined"):
        publish_results(work, "convflow: run 1", branch=BRANCH)
    assert calls.read_text().count("x") == 1                 # one attempt, not five


def test_the_flow_validates_before_any_work(prefect_api, origin, tmp_path):
    """``run --commit --promote 'bad name'``: one line, exit 2, nothing run or committed."""
    work = tmp_path / "w"
    git(tmp_path, "clone", "-q", origin.as_uri(), str(work))
    for name in ("flows", "stages"):
        (work / name).symlink_to(Path(__file__).resolve().parents[1] / name)
    proc = run([sys.executable, "-m", "flows", "run", "--root", str(work), "--commit",
                "--promote", "bad name"], cwd=work, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("convflow.flow: error: ") and "bad name" in lines[-1]
    assert "Traceback" not in proc.stderr
    assert not (work / "big.bin").exists()                   # no stage ran
    assert git(work, "tag", "-l").split() == ["cifar-cnn#prod#1"]
