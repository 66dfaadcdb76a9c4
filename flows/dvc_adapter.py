"""The one door to DVC: everything convflow asks DVC, behind a small typed interface.

Nothing else in convflow imports ``dvc``. DVC's Python internals are used only where the
public ways cost too much on every flow run or do not answer: the stage graph, the
per-stage "changed?" check (~0.1 s in-process against ~1 s for a ``dvc`` subprocess), the
metrics and params the flow reports after each run (``dvc.api.metrics_show`` merges the
files and drops their names; three ``dvc ... --json`` subprocesses added ~1-5 s to an
up-to-date run), and which files DVC expects git to track. The experiments table, read
once per sweep, comes from ``dvc exp show --json``. Each answer's shape is
checked here, so a DVC release that changes one fails with :class:`DvcMismatch` naming
what changed, not somewhere inside a flow run; ``tests/test_dvc_adapter.py`` exercises
every function against a real repository. The versions it passes on bound ``dvc`` in
``pyproject.toml``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict


class DvcMismatch(RuntimeError):
    """The installed DVC answered in a shape this adapter does not know."""

    def __init__(self, what: str):
        super().__init__(f"installed DVC {dvc_version()} no longer fits convflow's adapter: "
                         f"{what}")


class DvcError(RuntimeError):
    """DVC refused (a broken dvc.yaml, an unknown revision...); ``str()`` is DVC's message."""


@dataclass(frozen=True)
class StageNode:
    """A pipeline stage: its name, the stages it reads from directly, and all its upstream."""

    name: str
    deps: frozenset[str] = frozenset()
    upstream: frozenset[str] = frozenset()


class MetricRow(TypedDict):
    """One scalar metric of the workspace (``dvc metrics show``)."""

    file: str
    metric: str
    value: Any


class DiffRow(TypedDict):
    """One changed metric or param (``dvc metrics diff`` / ``dvc params diff``)."""

    file: str
    key: str
    old: Any
    new: Any
    diff: Any


def dvc_version() -> str:
    """The installed DVC's version string."""
    from importlib.metadata import version

    return version("dvc")


def dvc_command(*args: str) -> list[str]:
    """``dvc args...`` run by this interpreter, so DVC and the stages use the same venv."""
    return [sys.executable, "-m", "dvc", *args]


def dvc_env() -> dict[str, str]:
    """Environment for DVC subprocesses: this interpreter's folder first on PATH, no telemetry."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def dvc_json(root: str | Path, *args: str) -> Any:
    """The parsed ``--json`` output of ``dvc args... --json`` run in ``root``."""
    proc = subprocess.run(dvc_command(*args, "--json"), cwd=root, env=dvc_env(),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR")]
        raise DvcError((errors or proc.stderr.splitlines() or ["failed"])[-1])
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise DvcMismatch(f"`dvc {' '.join(args)} --json` printed no JSON") from None


# ------------------------------------------------------------ in-process (DVC's internals)

@contextmanager
def _in_dir(folder: str | Path) -> Iterator[None]:
    """cwd = ``folder`` inside the block (DVC names stages relative to the cwd), then back."""
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


@contextmanager
def _internals(what: str) -> Iterator[None]:
    """DVC's own errors as :class:`DvcError`; a changed internal as :class:`DvcMismatch`."""
    try:
        from dvc.exceptions import DvcException
    except ImportError as exc:
        raise DvcMismatch(f"dvc.exceptions.DvcException: {exc}") from exc
    try:
        yield
    except DvcException as exc:
        raise DvcError(" ".join(str(exc).split())) from exc
    except (ImportError, AttributeError, TypeError) as exc:
        raise DvcMismatch(f"{what}: {type(exc).__name__}: {exc}") from exc


#: One open repo per root, reused while no stage has run: opening one and reading its index
#: costs ~0.1-0.3 s, which an up-to-date pipeline would otherwise pay once per stage.
_REPOS: dict[str, Any] = {}


def _repo(root: str | Path) -> Any:
    key = str(Path(root).resolve())
    if key not in _REPOS:
        with _internals("dvc.repo.Repo"), _in_dir(key):
            from dvc.repo import Repo

            _REPOS[key] = Repo(key)
    return _REPOS[key]


def forget(root: str | Path) -> None:
    """Close the cached repo of ``root``: a stage ran, or dvc.yaml may have changed."""
    repo = _REPOS.pop(str(Path(root).resolve()), None)
    if repo is not None:
        repo.close()


def default_remote(root: str | Path) -> str:
    """The default DVC remote's name, '' if none: what ``dvc remote default`` prints, without
    its process (~0.4 s of CPU each run)."""
    with _internals("Repo.config['core']"):
        return _repo(root).config["core"].get("remote") or ""


def stages_in_order(root: str | Path) -> list[StageNode]:
    """The pipeline stages in the order ``dvc repro`` runs them, with their upstream stages."""
    with _internals("the stage graph (Repo.index.graph, plan_repro)"), _in_dir(root):
        import networkx as nx
        from dvc.repo.reproduce import plan_repro
        from dvc.stage import PipelineStage

        graph = _repo(root).index.graph  # edges point from a stage to the stages it reads

        def names(stages: Any) -> frozenset[str]:
            # `.dvc` files track data and have no command: not stages of the pipeline
            return frozenset(s.addressing for s in stages if isinstance(s, PipelineStage))

        return [StageNode(stage.addressing, names(graph.successors(stage)),
                          names(nx.descendants(graph, stage)))
                for stage in plan_repro(graph) if isinstance(stage, PipelineStage)]


def stage_command(root: str | Path, name: str) -> str:
    """The command of stage ``name`` as ``dvc repro`` would run it (templates resolved)."""
    repo = _repo(root)
    with _internals("Repo.stage.collect(name).cmd"), _in_dir(root):
        (stage,) = repo.stage.collect(name)
        cmd = stage.cmd
        return cmd if isinstance(cmd, str) else " && ".join(cmd)


def stage_changed(root: str | Path, name: str) -> bool:
    """DVC's own verdict, in-process: would ``dvc repro --single-item name`` run the stage?"""
    repo = _repo(root)
    # the cached repo's index (dvc.yaml and dvc.lock parsed once per repo), as `dvc repro`
    # does: Repo.stage.collect parses both again for every stage, ~1 s of a no-op run
    with _internals("Repo.index.stages[name].changed()"), _in_dir(root), repo.lock:
        found = [s for s in repo.index.stages if s.addressing == name]
        if len(found) != 1:
            raise DvcError(f"stage '{name}' not found in dvc.yaml")
        return bool(found[0].changed())


# ------------------------------------------------------------ the command line's JSON

def _flatten(prefix: str, value: Any) -> list[tuple[str, Any]]:
    """Nested dicts as ("a.b.c", leaf) pairs, the way DVC names params and metrics."""
    if isinstance(value, dict):
        out: list[tuple[str, Any]] = []
        for key, sub in value.items():
            out.extend(_flatten(f"{prefix}.{key}" if prefix else str(key), sub))
        return out
    return [(prefix, value)]


def _scalar(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool)) or value is None


def metrics_rows(root: str | Path) -> list[MetricRow]:
    """The workspace's scalar metrics, one row per file and key (``dvc metrics show``).

    A metrics file DVC cannot read (missing, torn) has no rows.
    """
    # in-process: `dvc metrics show --json` answers the same (this is what it prints) but
    # costs ~1 s more per flow run; dvc.api.metrics_show merges the files and drops names
    with _internals("Repo.metrics.show()"), _in_dir(root):
        shown = _repo(root).metrics.show()
    try:
        files = shown[""]["data"] if shown else {}
        return [MetricRow(file=file, metric=key, value=value)
                for file, entry in sorted(files.items())
                for key, value in _flatten("", entry.get("data") or {}) if _scalar(value)]
    except (KeyError, TypeError, AttributeError) as exc:
        raise DvcMismatch(f"Repo.metrics.show() shape: {exc!r}") from exc


def _diff_rows(answer: Any, command: str) -> list[DiffRow]:
    try:
        return [DiffRow(file=file, key=key, old=change.get("old"), new=change.get("new"),
                        diff=change.get("diff"))
                for file, keys in sorted((answer.get("diff") or {}).items())
                for key, change in sorted(keys.items())]
    except (TypeError, AttributeError) as exc:
        raise DvcMismatch(f"{command} shape: {exc!r}") from exc


def metrics_diff(root: str | Path, rev: str = "HEAD") -> list[DiffRow]:
    """Metrics that differ between ``rev`` and the workspace (``dvc metrics diff rev``)."""
    with _internals("Repo.metrics.diff()"), _in_dir(root):
        answer = _repo(root).metrics.diff(a_rev=rev)
    return _diff_rows(answer, "Repo.metrics.diff()")


def params_diff(root: str | Path, rev: str = "HEAD") -> list[DiffRow]:
    """Params that differ between ``rev`` and the workspace (``dvc params diff rev``)."""
    with _internals("Repo.params.diff()"), _in_dir(root):
        answer = _repo(root).params.diff(a_rev=rev)
    return _diff_rows(answer, "Repo.params.diff()")


def exp_rows(root: str | Path, names: set[str] | None = None) -> list[dict[str, Any]]:
    """Experiments as flat rows: experiment, rev, baseline, ``file:key`` params and metrics.

    ``names`` keeps only those experiments (``dvc exp show``).
    """
    rows = []
    try:
        for baseline in dvc_json(root, "exp", "show"):
            for group in baseline.get("experiments") or []:
                for rev in group.get("revs") or []:
                    if names is not None and rev.get("name") not in names:
                        continue
                    data = rev.get("data") or {}
                    row: dict[str, Any] = {"experiment": rev.get("name"),
                                           "rev": (rev.get("rev") or "")[:7],
                                           "baseline": (baseline.get("rev") or "")[:7]}
                    for kind in ("metrics", "params"):
                        for file, entry in (data.get(kind) or {}).items():
                            for key, value in _flatten("", entry.get("data") or {}):
                                row[f"{file}:{key}"] = value
                    rows.append(row)
    except (TypeError, AttributeError) as exc:
        raise DvcMismatch(f"`dvc exp show --json` shape: {exc!r}") from exc
    return rows
