"""The one validated schema for ``params.yaml``.

Every stage reads its parameters through :func:`load_params`, which validates the whole
file before any work is done: a wrong type, a non-positive size, an unknown key or invalid
YAML raises :class:`~stages.errors.UserError` naming the field and what it accepts.
A stage then uses only its own group(s); ``dvc.yaml`` declares exactly those keys, and
``tests/test_params.py`` proves the two agree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from stages.errors import UserError

PARAMS_FILE = "params.yaml"

# Upper bounds: far above any sane run, low enough that a typo (an extra zero or three) is
# refused here with the accepted range, not met later as an allocator error or an overflow.
#: Images a synthetic split may have (3 KB each: 500,000 is 1.5 GB) or an index may reach.
MAX_IMAGES = 500_000
#: Seeds: numpy's legacy generators and many tools take 32 bits.
MAX_SEED = 2**32 - 1
#: Images per batch.
MAX_BATCH = 65_536
#: Values YAML aliases (``*name``) may expand to in one file: ~80 in params.yaml, so a
#: file past this is an alias bomb (9 nested levels of 9 make 387 million), refused before
#: anything walks it (its error message once took 671 MB).
MAX_ALIAS_VALUES = 10_000
#: Characters of a user's value echoed in an error message.
SHOWN_CHARS = 80


def shorten(text: object, limit: int = SHOWN_CHARS) -> str:
    """``text`` as a string of at most ``limit`` characters (cut with "…")."""
    text = str(text)
    return text if len(text) <= limit else text[:limit - 1] + "…"


class _Group(BaseModel):
    """Base for every group: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


# --------------------------------------------------------------------------- data (ingest)
class SyntheticParams(_Group):
    """Size and seed of the procedurally drawn data set."""

    n_train: int = Field(10_000, gt=0, le=MAX_IMAGES,
                         description="training images (split evenly over 10 classes)")
    n_test: int = Field(2_000, gt=0, le=MAX_IMAGES, description="test images")
    seed: int = Field(0, ge=0, le=MAX_SEED)


OFFICIAL_CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
OFFICIAL_CIFAR10_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"


class DataParams(_Group):
    """Where ingest reads images from (``data.*``)."""

    source: Literal["synthetic", "cifar10", "npz", "imagefolder"] = "synthetic"
    path: str | None = Field(None, description="local archive, .npz or image folder")
    url: str = OFFICIAL_CIFAR10_URL
    sha256: str = Field(OFFICIAL_CIFAR10_SHA256, pattern=r"^[0-9a-fA-F]{64}$")
    drop_duplicates: bool = Field(False, description="drop exact duplicates (and test images) "
                                  "from train")
    synthetic: SyntheticParams = SyntheticParams()

    @model_validator(mode="after")
    def _path_needed(self) -> DataParams:
        if self.source != "synthetic" and not self.path:
            hint = (" (data/download: the fetch stage downloads data.url there)"
                    if self.source == "cifar10" else "")
            raise ValueError(
                f"data.source '{self.source}' reads a local file: set data.path to it{hint}"
            )
        return self


# ---------------------------------------------------------------------- normalize
class NormalizeParams(_Group):
    """Validation split and recorded statistics (``normalize.*``)."""

    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    standardize: bool = True


# ---------------------------------------------------------------------- train
class TrainParams(_Group):
    """Model and optimisation (``train.*``); ``stages/recipe.py`` names the presets."""

    model: str = "seed_net"
    device: str = "auto"
    epochs: int | float = Field(10, gt=0, le=10_000,
                                description="a fraction ends the last epoch early")
    batch_size: int = Field(256, gt=0, le=MAX_BATCH)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    # no upper bound: no lr crashes anything, and one too large for the model is caught as
    # a non-finite loss naming the step (the test of that uses lr 1e9)
    lr: float = Field(0.004, gt=0, allow_inf_nan=False)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0, le=1)
    decay_all: bool = Field(False, description="weight decay on biases and norms too")
    bias_lr_scale: float = Field(1.0, gt=0, le=10_000,
                                 description="lr factor for BatchNorm biases")
    schedule: Literal["onecycle", "cosine", "constant", "triangle"] = "onecycle"
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    augment_flip: bool = True
    flip_mode: Literal["random", "alternating"] = "random"
    augment_crop: int = Field(2, ge=0, le=16, description="random-crop padding in pixels; 0 = off")
    crop_fill: Literal["zeros", "reflect"] = "zeros"
    whiten_bias_epochs: int | None = Field(None, ge=0, le=10_000,
                                           description="null = train it throughout")
    lookahead: bool = False
    lookahead_start: int = Field(3, ge=0, le=10_000,
                                 description="first epoch (0-based) of lookahead")
    lookahead_every: int = Field(5, gt=0, le=1_000_000,
                                 description="steps between lookahead updates")
    lookahead_decay: float = Field(0.95, gt=0, lt=1)
    lookahead_power: float = Field(3.0, ge=0, le=100)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: Literal["auto", "on", "off"] | bool = "auto"
    compile: Literal["auto", "on", "off"] | bool = "auto"
    threads: int = Field(0, ge=0, le=1024, description="CPU threads; 0 = auto")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    nproc: int = Field(1, gt=0, le=64, description="processes (DDP) on this machine")
    log_every: int = Field(10, gt=0, le=1_000_000,
                           description="steps between loss-history points")


# ---------------------------------------------------------------------- evaluate
class EvaluateParams(_Group):
    """Test-set evaluation (``evaluate.*``)."""

    batch_size: int = Field(1000, gt=0, le=MAX_BATCH)
    tta_flip: bool = False
    n_wrong: int = Field(16, ge=0, le=256,
                         description="most confidently wrong images kept for plots")


# ---------------------------------------------------------------------- plot
class PlotParams(_Group):
    """Figures (``plot.*``)."""

    dpi: int = Field(120, gt=0, le=600)
    n_images: int = Field(10, gt=0, le=64)
    kernel_image: int = Field(0, ge=0, le=MAX_IMAGES,
                              description="test image used in the kernel demo")


# ---------------------------------------------------------------------- gate
class GateParams(_Group):
    """What a new model must reach before the flow ships it (``gate.*``)."""

    min_accuracy: float = Field(0.0, ge=0, le=1, description="absolute floor on test accuracy")
    max_drop: float = Field(0.02, ge=0, le=1,
                            description="largest accuracy drop allowed below production")


class Params(_Group):
    """All of ``params.yaml``."""

    data: DataParams = DataParams()
    normalize: NormalizeParams = NormalizeParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    plot: PlotParams = PlotParams()
    gate: GateParams = GateParams()


def _field_name(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc if not str(p).startswith("function-"))


def _accepted(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Names accepted at the level that holds ``loc[-1]``."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            return []
    return sorted(model.model_fields)


def accepted_range(loc: tuple[Any, ...]) -> str:
    """The bounds of the numeric field at ``loc``, e.g. ``1 <= x <= 10000`` ('' if none)."""
    model: type[BaseModel] = Params
    field = None
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
    low = high = ""
    for bound in getattr(field, "metadata", []):
        for attr, side in (("gt", "<"), ("ge", "<=")):
            if getattr(bound, attr, None) is not None:
                low = f"{getattr(bound, attr)} {side} "
        for attr, side in (("lt", "<"), ("le", "<=")):
            if getattr(bound, attr, None) is not None:
                high = f" {side} {getattr(bound, attr)}"
    return f"{low}x{high}" if low or high else ""


_RANGE_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal",
                 "finite_number")


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem, each naming the dotted field and what it accepts."""
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        name = _field_name(loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            where = _field_name(loc[:-1])
            options = ", ".join(_accepted(Params, loc))
            lines.append(
                f"{source}: unknown key '{shorten(name)}'"
                + (f" in '{where}'" if where else "")
                + (f"; accepted keys: {options}" if options else "")
            )
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {shorten(repr(got))})"
            bounds = accepted_range(loc) if e["type"] in _RANGE_ERRORS else ""
            accepts = f"; accepted: {bounds}" if bounds else ""
            lines.append(f"{source}: {name}: {e['msg']}{shown}{accepts}")
    return "invalid parameters:\n  " + "\n  ".join(lines)


def parse_params(raw: Any, source: str = PARAMS_FILE) -> Params:
    """Validate an already-parsed mapping; raise UserError naming every bad field."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping of groups (data, normalize, ...), "
                        f"got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise UserError(format_validation_error(err, source)) from None


class SafeYamlLoader(yaml.SafeLoader):
    """YAML's safe loader, with two refusals.

    A key given twice in one mapping is an error (as DVC says): plain YAML keeps the last
    silently, so the run would use a value the user did not see. Aliases may expand to at
    most :data:`MAX_ALIAS_VALUES` values, and never into their own anchor, so an alias bomb
    is refused while it is read, before anything (a validator, an error message) walks it.
    """

    def compose_document(self) -> yaml.Node:
        self._alias_values, self._sizes = 0, {}
        return super().compose_document()

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            node = self.anchors.get(event.anchor)
            if node is not None and id(node) not in self._sizes:
                raise yaml.composer.ComposerError(
                    None, None, f"alias *{shorten(event.anchor, 40)} inside its own anchor",
                    event.start_mark)
            self._alias_values += self._sizes.get(id(node), 0)
            if self._alias_values > MAX_ALIAS_VALUES:
                raise yaml.composer.ComposerError(
                    None, None, f"aliases expand to more than {MAX_ALIAS_VALUES:,} values "
                    "(an alias bomb?); write the values out", event.start_mark)
            return super().compose_node(parent, index)
        node = super().compose_node(parent, index)
        # the values this node expands to, known once it is complete (aliases count whole)
        children = (node.value if isinstance(node, yaml.SequenceNode) else
                    [n for pair in node.value for n in pair]
                    if isinstance(node, yaml.MappingNode) else [])
        self._sizes[id(node)] = 1 + sum(self._sizes.get(id(c), 1) for c in children)
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{shorten(key)}'", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, path: str | Path) -> Any:
    """Parse YAML ``text`` read from ``path`` with :class:`SafeYamlLoader`; one-line errors."""
    try:
        return yaml.load(text, Loader=SafeYamlLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = shorten(" ".join(str(getattr(err, "problem", None) or err).split()), 200)
        raise UserError(f"{path}: invalid YAML{where}: {problem}") from None


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate ``params.yaml`` (or another file)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: parameters file not found; run from the repository root "
                        "or pass its path") from None
    return parse_params(load_yaml(text, path), str(path))


def flatten(model: BaseModel, prefix: str = "") -> dict[str, Any]:
    """Dotted leaf keys of a params model, as DVC names them (``train.lr``)."""
    out: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        key = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            out.update(flatten(value, key + "."))
        else:
            out[key] = value
    return out
