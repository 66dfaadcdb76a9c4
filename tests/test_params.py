"""The params schema: every user mistake is named; dvc.yaml declares exactly what is read."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from stages.errors import UserError
from stages.params import Params, flatten, load_params, parse_params

PROJECT = Path(__file__).resolve().parents[1]
#: The params group each stage takes from ``load_params()``.
GROUPS = {"fetch": "data", "ingest": "data", "normalize": "normalize", "train": "train",
          "evaluate": "evaluate", "plot": "plot", "gate": "gate"}
#: Stages that read only some keys of their group (the rest would re-run them for nothing).
PART = {"fetch": {"data.source", "data.path", "data.url", "data.sha256"}}


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
    schema = flatten(Params())
    declared = {name: spec["params"] for name, spec in _declared_in_dvc_yaml().items()}
    for stage, group in GROUPS.items():
        expected = PART.get(stage) or {k for k in schema if k.split(".")[0] == group}
        assert declared[stage] == expected, stage
    # the gate compares against the committed baseline: a change to it re-runs the gate
    gate = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]["gate"]["params"]
    assert {"${paths.production}": ["version", "accuracy"]} in gate


def _declared_in_dvc_yaml() -> dict[str, dict]:
    """Each stage's ``deps`` and ``params`` exactly as written in dvc.yaml (no DVC internals)."""
    stages = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, spec in stages.items():
        keys = set()
        for entry in spec.get("params", []):
            # a key of params.yaml ({file: [keys]}, another params file, is checked apart)
            keys |= {entry} if isinstance(entry, str) else set()
        entry = re.search(r"python -m ([\w.]+)", spec["cmd"])
        module = PROJECT / f"{entry.group(1).replace('.', '/')}.py" if entry else None
        out[name] = {"deps": spec.get("deps", []), "params": keys, "entry": module}
    return out


def _stage_sources(deps: list[str]) -> list[Path]:
    """The Python files among a stage's dvc.yaml deps: the code whose change re-runs it."""
    files: list[Path] = []
    for dep in deps:
        path = PROJECT / dep
        if "${" in dep or not path.exists():
            continue
        if path.is_dir():
            files += sorted(path.rglob("*.py"))
        elif path.suffix == ".py":
            files.append(path)
    return files


def _schema_prefixes() -> dict[str, str]:
    """Name of each params model class -> its dotted place in params.yaml ('' = the root)."""
    prefixes = {Params.__name__: ""}

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                prefixes[ann.__name__] = f"{prefix}{name}"
                walk(ann, f"{prefix}{name}.")

    walk(Params, "")
    return prefixes


class _ParamsReads(ast.NodeVisitor):
    """Which params keys a module reads, following the variables that hold a params object.

    A variable holds params when it is assigned ``load_params()`` (or a group or sub-group
    of it) or is a function argument annotated with a params class (``p: TrainParams``).
    Only ``<holder>.<key>`` counts as reading a key: a same-named attribute of anything
    else (``args.epochs``, ``model.compile``) does not, and neither does ``p.model_dump()``.
    """

    def __init__(self, prefixes: dict[str, str], leaves: set[str]) -> None:
        self.prefixes = prefixes
        self.groups = set(prefixes.values())  # every sub-model's dotted place
        self.leaves = leaves
        self.scopes: list[dict[str, str]] = [{}]
        self.keys: set[str] = set()
        self.loaded_groups: set[str] = set()

    def _annotation_prefix(self, ann: ast.expr | None) -> str | None:
        if ann is None:
            return None
        if isinstance(ann, ast.Constant) and isinstance(ann.value, str):
            ann = ast.parse(ann.value, mode="eval").body
        if isinstance(ann, ast.BinOp):  # TrainParams | None
            return self._annotation_prefix(ann.left) or self._annotation_prefix(ann.right)
        name = ann.attr if isinstance(ann, ast.Attribute) else getattr(ann, "id", None)
        return self.prefixes.get(name)

    def _prefix(self, node: ast.expr) -> str | None:
        """The params place ``node`` evaluates to, or None when it is not params."""
        if isinstance(node, ast.Name):
            return self.scopes[-1].get(node.id)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id == "load_params"):
            return ""
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "model_copy"):  # p.model_copy(update=...) is params too
            return self._prefix(node.func.value)
        if isinstance(node, ast.Attribute):
            base = self._prefix(node.value)
            if base is not None:
                place = f"{base}.{node.attr}" if base else node.attr
                if place in self.groups:
                    return place
        return None

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        scope = dict(self.scopes[-1])  # closures see the enclosing holders
        args = node.args
        for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs]:
            prefix = self._annotation_prefix(arg.annotation)
            if prefix is not None:
                scope[arg.arg] = prefix
            else:
                scope.pop(arg.arg, None)
        self.scopes.append(scope)
        self.generic_visit(node)
        self.scopes.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Assign(self, node: ast.Assign) -> None:
        self.generic_visit(node)
        prefix = self._prefix(node.value)
        for target in node.targets:
            if isinstance(target, ast.Name):
                if prefix is None:
                    self.scopes[-1].pop(target.id, None)
                else:
                    self.scopes[-1][target.id] = prefix

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self.generic_visit(node)
        prefix = self._annotation_prefix(node.annotation)
        if prefix is None and node.value is not None:
            prefix = self._prefix(node.value)
        if isinstance(node.target, ast.Name) and prefix is not None:
            self.scopes[-1][node.target.id] = prefix

    def visit_Attribute(self, node: ast.Attribute) -> None:
        base = self._prefix(node.value)
        if base is not None:
            place = f"{base}.{node.attr}" if base else node.attr
            if place in self.leaves:
                self.keys.add(place)
            if base == "" and place in self.groups:
                self.loaded_groups.add(place)
        self.generic_visit(node)


def params_read_by(files: list[Path]) -> tuple[set[str], set[str]]:
    """(top-level groups taken from the params object, leaf keys read through it) in ``files``."""
    visitor = _ParamsReads(_schema_prefixes(), set(flatten(Params())))
    for file in files:
        visitor.visit(ast.parse(file.read_text(), filename=str(file)))
    return visitor.loaded_groups, visitor.keys


@pytest.mark.parametrize("stage", sorted(GROUPS))
def test_code_reads_exactly_the_declared_keys(stage: str) -> None:
    """Static proof, from the code dvc.yaml lists as the stage's deps, that it reads its keys.

    The stage takes one group from ``load_params()``; every key dvc.yaml declares is read
    from that params object somewhere in the stage's code, and no undeclared one is.
    Reading an undeclared key lets DVC miss a change; declaring a key that no code reads
    re-runs the stage for nothing (and hides that the code forgot a param).
    """
    stages = _declared_in_dvc_yaml()
    declared = stages[stage]
    sources = _stage_sources(declared["deps"])
    # another stage's module among the deps (plot imports evaluate's helpers) is shared code:
    # its main() loads that stage's group, which this stage never calls
    others = {s["entry"] for name, s in stages.items() if name != stage}
    groups, _ = params_read_by([f for f in sources if f not in others])
    _, keys = params_read_by(sources)
    assert groups == {GROUPS[stage]}, f"{stage} takes the params groups {sorted(groups)}"
    group = GROUPS[stage]
    keys = {k for k in keys if k.split(".")[0] == group}  # shared helpers may type other groups
    unread = sorted(declared["params"] - keys)
    assert not unread, f"{stage}: dvc.yaml declares {unread}, but its code never reads them"
    undeclared = sorted(keys - declared["params"])
    assert not undeclared, f"{stage} reads {undeclared}, which dvc.yaml does not declare"


def test_params_reads_follow_the_params_object_only() -> None:
    """The analysis counts ``p.lr`` on a params holder, never a same-named attribute elsewhere."""
    code = (
        "def f(p: TrainParams, args):\n"
        "    return p.lr, args.epochs, p.model_dump()\n"
        "def g():\n"
        "    d = load_params().data\n"
        "    return d.synthetic.n_train\n"
        "def h(p):\n"
        "    return p.seed\n"
    )
    visitor = _ParamsReads(_schema_prefixes(), set(flatten(Params())))
    visitor.visit(ast.parse(code))
    assert visitor.keys == {"train.lr", "data.synthetic.n_train"}
    assert visitor.loaded_groups == {"data"}


def _imported_stage_modules(entry: Path) -> set[Path]:
    """The ``stages/`` files ``entry`` imports, directly or through each other (any depth)."""
    seen: set[Path] = set()
    todo = [entry]
    while todo:
        path = todo.pop()
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if isinstance(node, ast.ImportFrom) and node.module == "stages":
                names = [f"stages.{a.name}" for a in node.names]  # from stages import figures
            for name in names:
                if name.startswith("stages."):
                    base = PROJECT / name.replace(".", "/")
                    todo.append(base / "__init__.py" if base.is_dir() else base.with_suffix(".py"))
    return seen


@pytest.mark.parametrize("stage", sorted(_declared_in_dvc_yaml()))
def test_every_imported_stage_module_is_a_dependency(stage: str) -> None:
    """A stage re-runs when any code it runs changes: dvc.yaml lists each module it imports."""
    spec = _declared_in_dvc_yaml()[stage]
    if spec["entry"] is None:
        pytest.fail(f"{stage}: its cmd is not `python -m stages.<module>`")
    listed = set(_stage_sources(spec["deps"]))
    missing = sorted(str(p.relative_to(PROJECT)) for p in _imported_stage_modules(spec["entry"])
                     if p.name != "__init__.py" or p.parent.name != "stages")
    missing = [m for m in missing if PROJECT / m not in listed]
    assert not missing, f"dvc.yaml stage '{stage}' runs code it does not list in deps: {missing}"
