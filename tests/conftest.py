"""Shared test fixtures: real git + DVC repositories in temp folders, tiny params."""

from __future__ import annotations

import atexit
import copy
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

# The Prefect flow tests share one real Prefect server per session (the fixture
# ``prefect_api``); it starts only when a test asks for it. A plugin, not an import, so that
# prefect_fixtures may use this module's helpers without a circular import.
pytest_plugins = ["prefect_fixtures"]

PROJECT = Path(__file__).resolve().parents[1]
#: The real CIFAR-10 JPEG images, beside the project root where a developer or CI has them.
SHARED_CIFAR_JPEG = PROJECT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"

#: Overrides that make the whole pipeline run in seconds on a 2-core CPU.
TINY_PARAMS: dict[str, Any] = {
    "data": {"synthetic": {"n_train": 400, "n_test": 200, "seed": 0}},
    "normalize": {"val_fraction": 0.1},
    "train": {"epochs": 2, "batch_size": 64, "threads": 1, "log_every": 2},
    "evaluate": {"batch_size": 128, "n_wrong": 8},
    "plot": {"dpi": 50},
}


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated recursively with ``over`` (neither is modified)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def subprocess_env() -> dict[str, str]:
    """Environment for dvc / stage subprocesses: this interpreter first on PATH, no telemetry."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        DVC_NO_ANALYTICS="1",
        GIT_AUTHOR_NAME="convflow-test", GIT_AUTHOR_EMAIL="test@convflow.invalid",
        GIT_COMMITTER_NAME="convflow-test", GIT_COMMITTER_EMAIL="test@convflow.invalid",
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
    )
    return env


def run(cmd: list[str], cwd: Path, check: bool = True, **kw: Any) -> subprocess.CompletedProcess:
    """Run a command, capturing text output; on failure with check=True show it all."""
    proc = subprocess.run(cmd, cwd=cwd, env=kw.pop("env", subprocess_env()), text=True,
                          capture_output=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc


def dvc(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the real ``dvc`` CLI in ``repo``."""
    return run([sys.executable, "-m", "dvc", *args], cwd=repo, check=check)


def git(repo: Path, *args: str) -> str:
    return run(["git", *args], cwd=repo).stdout


_RAN = re.compile(r"Running stage '([^']+)'")


def ran_stages(output: str) -> list[str]:
    """Names of the stages a ``dvc repro`` output says it ran, in order."""
    return _RAN.findall(output)


def write_params(repo: Path, overrides: dict[str, Any]) -> None:
    """Merge ``overrides`` into ``repo/params.yaml``."""
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text()) or {}
    path.write_text(yaml.safe_dump(deep_merge(params, overrides), sort_keys=False))


def make_pipeline_repo(dest: Path, overrides: dict[str, Any] | None = None) -> Path:
    """A fresh git + DVC repository holding this project's pipeline with tiny params."""
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("stages", "flows"):
        shutil.copytree(PROJECT / name, dest / name, ignore=ignore)
    for name in ("dvc.yaml", "params.yaml", "production.yaml", ".gitignore", ".dvcignore"):
        shutil.copy2(PROJECT / name, dest / name)
    params = deep_merge(yaml.safe_load((PROJECT / "params.yaml").read_text()), TINY_PARAMS)
    (dest / "params.yaml").write_text(yaml.safe_dump(deep_merge(params, overrides or {}),
                                                     sort_keys=False))
    return init_and_commit(dest, "pipeline")


@functools.cache
def _dvc_init_files() -> dict[str, bytes]:
    """What ``dvc init`` writes (``.dvc/config``, ``.dvc/.gitignore``, ``.dvcignore``), from one
    real ``dvc init`` per test process: ~0.5 s of CPU less for each of ~80 repositories."""
    scratch = Path(tempfile.mkdtemp(prefix="convflow-dvc-init-"))
    atexit.register(shutil.rmtree, scratch, True)
    git(scratch, "init", "-q")
    dvc(scratch, "init", "-q")
    return {name: (scratch / name).read_bytes()
            for name in (".dvc/config", ".dvc/.gitignore", ".dvcignore")}


def init_and_commit(dest: Path, message: str) -> Path:
    """Make ``dest`` a git + DVC repository (as ``dvc init`` leaves one) and commit it all."""
    git(dest, "init", "-q", "-b", "main")
    (dest / ".dvc").mkdir()
    for name, content in _dvc_init_files().items():
        if not (dest / name).exists():  # dvc init keeps a .dvcignore that is there
            (dest / name).write_bytes(content)
    # what `dvc config core.analytics false` writes, without a third DVC process per repo
    (dest / ".dvc" / "config").write_text("[core]\n    analytics = false\n")
    git(dest, "add", "-A")
    git(dest, "commit", "-q", "-m", message)
    return dest


@pytest.fixture
def pipeline_repo(tmp_path: Path) -> Path:
    """A temp git + DVC repo with the pipeline and tiny params, committed."""
    return make_pipeline_repo(tmp_path / "repo")


@pytest.fixture
def git_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """subprocess_env's git identity in this process too (for commits made in-process)."""
    for key, value in subprocess_env().items():
        if key.startswith("GIT_"):
            monkeypatch.setenv(key, value)


@pytest.fixture
def cifar_jpeg() -> Path:
    """The shared real CIFAR-10 JPEG archive; skips where a fresh clone does not have it."""
    if not SHARED_CIFAR_JPEG.is_file():
        pytest.skip(f"real CIFAR-10 images not found at {SHARED_CIFAR_JPEG} "
                    "(only developers' and CI machines have ../shared/data)")
    return SHARED_CIFAR_JPEG


@pytest.fixture(autouse=True, scope="session")
def _torch_threads() -> None:
    """Two busy processes with two OpenMP threads each crawl on a 2-core box: use one here."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under ``pytest -n N --dist loadgroup`` (pytest-xdist, as CI runs): the tests of a module
    that share a module-scoped fixture (a team of servers, a trained model) run on one worker,
    so it is built once; every other test goes to whichever worker is free, slow ones first."""
    for item in items:
        defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
        if any(d.scope == "module" for fixtures in defs.values() for d in fixtures):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    # the longest first (slow ones, in file order), so no worker starts one at the end
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
