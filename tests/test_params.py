"""The params schema: every user mistake is named; dvc.yaml declares exactly what is read."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from stages.errors import UserError
from stages.params import Params, flatten, load_params, parse_params

PROJECT = Path(__file__).resolve().parents[1]


def test_shipped_params_are_valid_and_complete() -> None:
    params = load_params(PROJECT / "params.yaml")
    shipped = yaml.safe_load((PROJECT / "params.yaml").read_text())
    # every schema field is written out in params.yaml, so users see every knob
    assert set(flatten(params)) == set(_flat_dict(shipped))


def _flat_dict(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat_dict(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"train": {"epochs": "ten"}}, "train.epochs"),
        ({"train": {"batch_size": -4}}, "train.batch_size"),
        ({"train": {"batch_size": 0}}, "greater than 0"),
        ({"data": {"synthetic": {"n_train": 0}}}, "data.synthetic.n_train"),
        ({"train": {"epochz": 3}}, "unknown key 'train.epochz'"),
        ({"train": {"epochz": 3}}, "epochs"),  # the accepted keys are listed
        ({"trian": {}}, "unknown key 'trian'"),
        ({"data": {"source": "mnist"}}, "'synthetic'"),  # accepted values listed
        ({"data": {"source": "npz"}}, "data.path"),
        ({"normalize": {"val_fraction": 1.5}}, "normalize.val_fraction"),
        ({"data": {"sha256": "abc"}}, "data.sha256"),
    ],
)
def test_bad_params_name_the_field(raw: dict, expected: str) -> None:
    with pytest.raises(UserError) as info:
        parse_params(raw)
    assert expected in str(info.value)


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "params.yaml"
    bad.write_text("train:\n  epochs: [1, 2\n")
    with pytest.raises(UserError, match=r"params.yaml: invalid YAML at line \d+"):
        load_params(bad)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_declared_params_equal_schema_groups() -> None:
    """Each stage declares in dvc.yaml every key of the group(s) it reads, and nothing else."""
    from dvc.repo import Repo

    groups = {"ingest": "data", "normalize": "normalize", "train": "train",
              "evaluate": "evaluate", "plot": "plot"}
    schema = flatten(Params())
    with Repo(str(PROJECT)) as repo:
        declared = {
            stage.name: {k for dep in stage.params for k in dep.params}
            for stage in repo.index.stages
        }
    for stage, group in groups.items():
        expected = {k for k in schema if k.split(".")[0] == group}
        assert declared[stage] == expected, stage


# Which source files make up each stage (its module and the helpers only it uses).
STAGE_SOURCES = {
    "ingest": ["stages/ingest.py", "stages/sources"],
    "normalize": ["stages/normalize.py"],
    "train": ["stages/train.py", "stages/loader.py", "stages/recipe.py", "stages/models.py",
              "stages/device.py", "stages/ddp.py"],
    "evaluate": ["stages/evaluate.py"],
    "plot": ["stages/plot.py", "stages/figures.py"],
}
GROUPS = {"ingest": "data", "normalize": "normalize", "train": "train",
          "evaluate": "evaluate", "plot": "plot"}


def _sources(stage: str) -> list[Path]:
    files: list[Path] = []
    for rel in STAGE_SOURCES[stage]:
        path = PROJECT / rel
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path] if path.exists() else []
    return files


@pytest.mark.parametrize("stage", sorted(GROUPS))
def test_code_reads_exactly_the_declared_keys(stage: str) -> None:
    """Static proof, from the stage's source, that it reads only its group and every key of it.

    A stage reads params as ``load_params().<group>``; its code then uses ``<obj>.<field>``.
    Reading another group would let DVC miss a change; a declared key that no code reads
    would re-run the stage for nothing.
    """
    import ast

    groups_read: set[str] = set()
    attrs: set[str] = set()
    for file in _sources(stage):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Attribute):
                attrs.add(node.attr)
                call = node.value
                if (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)
                        and call.func.id == "load_params"):
                    groups_read.add(node.attr)
    assert groups_read == {GROUPS[stage]}, f"{stage} reads groups {groups_read}"
    group = GROUPS[stage]
    fields = {k.split(".")[-1] for k in flatten(Params()) if k.split(".")[0] == group}
    unread = {f for f in fields if f not in attrs}
    assert not unread, f"{stage} declares {group}.{sorted(unread)} but no code reads them"
