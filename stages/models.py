"""The networks, and the model file that carries everything needed to use one.

Pure PyTorch: no file I/O except :func:`save_model` / :func:`load_model`. Every model starts
with :class:`InputNorm`, so a saved model takes raw uint8 images (N x 3 x 32 x 32) and
inference cannot drift from training.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stages.errors import UserError
from stages.io import check_classes
from stages.params import shorten

MODEL_FORMAT = "convflow-model/1"
#: Largest image side a model file may declare: the pipeline's images are 32 pixels; a
#: crafted file claiming more would make predict resize every photo to it (and blame it).
MAX_INPUT_SIDE = 1024


class InputNorm(nn.Module):
    """uint8 0-255 -> float 0-1 (the tutorial's divide by 255) -> per-channel standardised.

    ``mean``/``std`` are buffers, saved with the weights.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a uint8 batch becomes a float copy of our own, normalised in place: the same
        # three correctly rounded steps (bit-identical), one buffer instead of four (2.4x
        # faster for a 512-image batch on one thread: ~4 % of a seed-net step)
        own = x.dtype == torch.uint8
        x = x.float() if own else x
        if x.dim() == 4 and not x.is_contiguous() \
                and x.is_contiguous(memory_format=torch.channels_last):
            # channels-last: a (1, C, 1, 1) broadcast over it runs an inner loop of C values,
            # ~3x slower on the CPU. The same arithmetic on rows of H*W*C values instead,
            # against mean/std repeated per pixel: bit-identical, vectorised.
            n, c, h, w = x.shape
            rows = x.permute(0, 2, 3, 1).reshape(n, h * w * c)
            mean, std = self.mean.view(-1).repeat(h * w), self.std.view(-1).repeat(h * w)
            out = rows.div_(255.0).sub_(mean).div_(std) if own else (rows / 255.0 - mean) / std
            return out.view(n, h, w, c).permute(0, 3, 1, 2)
        if own:
            return x.div_(255.0).sub_(self.mean).div_(self.std)
        return (x / 255.0 - self.mean) / self.std

    def fold(self, conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor]:
        """``conv``'s weight and bias with this normalisation folded in (differentiably):
        ``conv(self(x)) == F.conv2d(x.float(), *self.fold(conv))`` up to rounding, for a
        conv without padding (a padded border would see raw zeros, not normalised ones).
        Per channel ``(x / 255 - mean) / std = x * scale + shift``: the scale goes into the
        weight, the shift, summed over each filter, into the bias."""
        scale, shift = 1.0 / (255.0 * self.std), -self.mean / self.std
        bias = (conv.weight * shift).sum((1, 2, 3))
        return conv.weight * scale, bias if conv.bias is None else bias + conv.bias


class NormNet(nn.Sequential):
    """``InputNorm`` then a trunk (saved as any ``nn.Sequential``). A trunk with
    ``forward_folded(x, norm)`` takes a uint8 batch straight into its first conv, with
    the normalisation folded into that conv's weights (:meth:`InputNorm.fold`): the same
    function up to rounding, without three passes over every pixel (~3 % of a float32
    seed-net step on the AVX2 path)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm, trunk = self[0], self[1]
        # not under autocast: the bf16 gradient of a folded weight, scaled back, loses the
        # first conv's gradient to cancellation (~20 % off); float32's is within ~1e-5
        if x.dtype == torch.uint8 and hasattr(trunk, "forward_folded") \
                and not torch.is_autocast_enabled(x.device.type):
            return trunk.forward_folded(x, norm)
        return super().forward(x)


class MaxPool2dF32(nn.MaxPool2d):
    """``nn.MaxPool2d`` that pools a CPU bfloat16 map in float32 and casts the result back.

    Exact, gradients and tie-breaking included: float32 holds every bf16 value, the max is
    one of the inputs, and the gradient routed back is a copy of a bf16 value (or zero).
    Faster only on few channels: PyTorch's CPU bf16 kernel for a channels-last map of the
    seed net's 6 channels takes 3.9 ms forward + backward per 256-image batch on 2 threads,
    this 2.8 ms; from 16 channels up bf16's own kernel is as fast or faster (64 channels:
    62 vs 130 ms), so only that pool uses this.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and x.device.type == "cpu":
            return super().forward(x.float()).to(torch.bfloat16)
        return super().forward(x)


class SeedNet(nn.Module):
    """The tutorial's net: conv 3->6 k5, pool, conv 6->16 k5, pool, BN(16), fc 400-120-84-n."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            # ReLU after the pool: the same function and gradients (max and ReLU commute),
            # on a quarter of the values; layer indices (and so saved weights) unchanged
            nn.Conv2d(3, 6, 5), MaxPool2dF32(2), nn.ReLU(),
            nn.Conv2d(6, 16, 5), nn.MaxPool2d(2), nn.ReLU(),
            nn.BatchNorm2d(16),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120), nn.ReLU(),
            nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._from_conv1(self.features[0](x))

    def forward_folded(self, x: torch.Tensor, norm: InputNorm) -> torch.Tensor:
        """``forward(norm(x))`` for a uint8 ``x``, ``norm`` folded into the first conv
        (exact up to rounding: that conv has no padding)."""
        return self._from_conv1(F.conv2d(x.float(), *norm.fold(self.features[0])))

    def _from_conv1(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features
        x = f[5](f[4](f[3](f[2](f[1](x)))))
        # BatchNorm and Flatten on NCHW: BatchNorm's CPU backward on a channels-last map of
        # 16 channels takes twice as long, and Flatten would copy it to NCHW anyway
        return self.classifier(f[6](x.contiguous()))


class ConvGroup(nn.Module):
    """conv3x3 -> max-pool 2 -> BN -> GELU -> conv3x3 -> BN -> GELU (airbench's block).

    ``airbench94=True`` is that recipe's exact block: BatchNorm eps 1e-12 with its scale
    frozen at 1 (only the bias learns), and each conv's first ``c_in`` filters initialised
    to the identity (``dirac_``), an implicit residual at the start of training.
    """

    def __init__(self, c_in: int, c_out: int, airbench94: bool = False) -> None:
        super().__init__()
        eps = 1e-12 if airbench94 else 1e-5
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding="same", bias=False)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = nn.BatchNorm2d(c_out, eps=eps, momentum=0.4)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding="same", bias=False)
        self.norm2 = nn.BatchNorm2d(c_out, eps=eps, momentum=0.4)
        self.act = nn.GELU()
        if airbench94:
            for conv in (self.conv1, self.conv2):
                with torch.no_grad():
                    nn.init.dirac_(conv.weight[:conv.in_channels])
            for norm in (self.norm1, self.norm2):
                norm.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


class AirNet(nn.Module):
    """An airbench-style net: 2x2 whitening conv, three conv groups, global max-pool, linear.

    After KellerJordan/cifar10-airbench: the first conv is initialised from the training
    patches' eigenvectors (:meth:`init_whitening`) and frozen, so the later layers see
    decorrelated input from the first step; the logits are scaled down (``1/9``) to keep the
    early softmax soft. ``widths`` sizes it: ``air_small`` for CPUs, ``airbench`` for GPUs.
    ``airbench94=True`` (arch ``airbench94``) takes that recipe's blocks (see
    :class:`ConvGroup`); its final ``MaxPool2d(3)`` on the 3x3 map is the global max here.
    """

    def __init__(self, num_classes: int = 10, widths: Sequence[int] = (64, 256, 256),
                 airbench94: bool = False) -> None:
        super().__init__()
        self.whiten = nn.Conv2d(3, 24, kernel_size=2, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        self.groups = nn.Sequential(
            ConvGroup(24, widths[0], airbench94), ConvGroup(widths[0], widths[1], airbench94),
            ConvGroup(widths[1], widths[2], airbench94),
        )
        self.head = nn.Linear(widths[2], num_classes, bias=False)
        self.act = nn.GELU()
        self.scale = 1 / 9

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the frozen first conv to whiten 2x2 patches of ``images`` (already normalised)."""
        c, h, w = images.shape[1], self.whiten.kernel_size[0], self.whiten.kernel_size[1]
        patches = images.float().unfold(2, h, 1).unfold(3, w, 1)
        patches = patches.transpose(1, 3).reshape(-1, c, h, w).double()
        flat = patches.reshape(len(patches), -1)
        cov = (flat.T @ flat) / len(flat)
        eigval, eigvec = torch.linalg.eigh(cov)
        eigval, eigvec = eigval.flip(0), eigvec.T.reshape(-1, c, h, w).flip(0)
        kernels = eigvec / torch.sqrt(eigval + eps).view(-1, 1, 1, 1)
        self.whiten.weight.copy_(torch.cat((kernels, -kernels)).float())
        self.whiten.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.groups(self.act(self.whiten(x)))
        x = torch.amax(x, dim=(2, 3))
        return self.head(x) * self.scale


#: name -> constructor(num_classes) of the trunk that follows InputNorm.
ARCHITECTURES: dict[str, Callable[[int], nn.Module]] = {
    "seed_net": SeedNet,
    # CPU-sized: 0.29M trainable params; the GPU-sized airbench94 layout below has 1.97M
    "air_small": lambda n: AirNet(n, widths=(32, 64, 128)),
    # 2-core CPU, 10 minutes: 1.16M trainable params, ~2.4x air_small's time per epoch
    "air_medium": lambda n: AirNet(n, widths=(64, 128, 256)),
    "airbench": lambda n: AirNet(n, widths=(64, 256, 256)),
    # KellerJordan/cifar10-airbench airbench94.py's network exactly (frozen BN scales, ...)
    "airbench94": lambda n: AirNet(n, widths=(64, 256, 256), airbench94=True),
}


def build_model(arch: str, num_classes: int, mean: Sequence[float],
                std: Sequence[float]) -> nn.Sequential:
    """``InputNorm`` followed by the named architecture."""
    if arch not in ARCHITECTURES:
        raise UserError(f"train.model: unknown model '{arch}'; "
                        f"choose one of: {', '.join(sorted(ARCHITECTURES))}")
    return NormNet(InputNorm(mean, std), ARCHITECTURES[arch](num_classes))


def first_layer_title(model: nn.Module) -> str:
    """What the first conv's filters are, for a figure's title: learned, or the fixed
    whitening of an airbench-style net."""
    if any(isinstance(m, AirNet) for m in model.modules()):
        return "First-layer whitening filters (fixed from the training images' 2×2 patches)"
    return "Learned first-layer filters"


def save_model(path: str | Path, model: nn.Module, *, arch: str, classes: Sequence[str],
               mean: Sequence[float], std: Sequence[float], extra: dict[str, Any]) -> None:
    """Write weights plus provenance; loadable with ``torch.load(weights_only=True)``.

    ``extra`` holds plain data only (params that made it, data summary, metrics...).
    """
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    model = getattr(model, "module", model)  # unwrap DDP
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_torch({
        "format": MODEL_FORMAT,
        "arch": arch,
        "classes": list(classes),
        "input": {"shape": [3, 32, 32], "dtype": "uint8", "layout": "NCHW", "range": [0, 255]},
        "normalization": {"mean": [float(m) for m in mean], "std": [float(s) for s in std]},
        "state_dict": state,
        **extra,
    }, path)


def save_torch(obj: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` through memory, then one plain write: a full disk is then an OSError
    (ENOSPC) that :func:`stages.io.atomic_file` reports in one line, where torch's own
    writer raises a RuntimeError that hides it."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with open(path, "wb") as f:
        f.write(buffer.getbuffer())


def load_model(path: str | Path, map_location: str | torch.device = "cpu"
               ) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a saved model (in eval mode) and return it with its metadata."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: model file not found; run `dvc repro train` first")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's to fix
        # torch's own text runs to many lines and suggests weights_only=False: never echo that
        text = str(err).strip()
        if "Weights only load failed" in text:
            reason = "not a torch file, or it holds objects beyond weights and plain data"
        else:
            reason = text.splitlines()[0] if text else type(err).__name__
        raise UserError(f"{path}: not a readable convflow model ({reason}); "
                        "re-run `dvc repro train` or pass the right --model") from None
    if not isinstance(blob, dict) or blob.get("format") != MODEL_FORMAT:
        raise UserError(f"{path}: not a convflow model file (format {MODEL_FORMAT} expected)")
    model = _rebuild(blob, path)
    model.eval()
    meta = {k: v for k, v in blob.items() if k != "state_dict"}
    return model.to(map_location), meta


def _numbers(values: object, n: int) -> bool:
    return isinstance(values, list) and len(values) == n and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        for v in values)


def check_model_meta(blob: dict[str, Any]) -> str | None:
    """What is wrong with a model file's metadata (None if nothing): every field a reader
    uses is checked here, so a crafted file is one line, never a traceback or a blamed image."""
    norm, spec = blob.get("normalization"), blob.get("input")
    shape = spec.get("shape") if isinstance(spec, dict) else None
    arch = blob.get("arch")
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        return f"architecture {shorten(repr(arch))} is not one of {sorted(ARCHITECTURES)}"
    try:  # printable (a newline would forge output lines), distinct, 2..MAX_CLASSES
        check_classes(blob.get("classes"), "'classes'", "")
    except UserError as err:
        return str(err).rstrip("; ")
    if not isinstance(norm, dict) or not all(
            isinstance(norm.get(k), list) and len(norm[k]) == 3 for k in ("mean", "std")):
        return "'normalization' lacks 3 mean and 3 std values"
    if not (_numbers(norm["mean"], 3) and _numbers(norm["std"], 3)):
        return (f"'normalization' mean {shorten(norm['mean'])} / std {shorten(norm['std'])} "
                "are not all finite numbers")
    if min(norm["std"]) <= 0:
        return f"'normalization' std {norm['std']} is not positive"
    if not (isinstance(shape, list) and len(shape) == 3 and shape[0] == 3 and all(
            isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_INPUT_SIDE
            for v in shape)):
        return (f"input shape {shorten(repr(shape))} is not [3, height, width] with sides of "
                f"1 to {MAX_INPUT_SIDE} pixels")
    if not isinstance(blob.get("state_dict"), dict):
        return "it holds no weights ('state_dict')"
    return None


def _rebuild(blob: dict[str, Any], path: Path) -> nn.Module:
    """The model a file describes; a field missing or not fitting the rest is one UserError."""
    fix = "re-run `dvc repro -f train` or pass the right --model"
    problem = check_model_meta(blob)
    if problem:
        raise UserError(f"{path}: {problem}; {fix}")
    norm = blob["normalization"]
    model = build_model(blob["arch"], len(blob["classes"]), norm["mean"], norm["std"])
    try:
        model.load_state_dict(blob["state_dict"])
    except (RuntimeError, TypeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: the weights do not fit a {blob['arch']} for "
                        f"{len(blob['classes'])} classes ({shorten(first, 200)}); {fix}") from None
    return model
