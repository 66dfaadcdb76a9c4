"""The networks: the tutorial's exact architecture, the stronger ones, the model file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from stages.errors import UserError
from stages.models import (
    ARCHITECTURES,
    build_model,
    first_layer_title,
    load_model,
    save_model,
)

MEAN, STD = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]


def trainable(model: nn.Module) -> int:
    """Trainable parameters (frozen BatchNorm weights left out)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_seed_net_layers_and_parameter_count() -> None:
    model = build_model("seed_net", 10, MEAN, STD)
    trunk = model[1]
    shapes = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape[1:])))
             for m in (*trunk.features, *trunk.classifier)]
    trunk(model[0](torch.zeros(2, 3, 32, 32, dtype=torch.uint8)))  # unfolded: every layer
    for h in hooks:
        h.remove()
    # conv, pool, ReLU (pool first: the same function, see the next test)
    assert shapes == [(6, 28, 28), (6, 14, 14), (6, 14, 14),
                      (16, 10, 10), (16, 5, 5), (16, 5, 5), (16, 5, 5),
                      (400,), (120,), (120,), (84,), (84,), (10,)]
    convs = [m for m in trunk.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (3, 6, (5, 5)), (6, 16, (5, 5))]
    bn = [m for m in trunk.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bn) == 1 and trainable(bn[0]) == 32
    # the tutorial's 62,006 plus BatchNorm's 32; InputNorm has buffers only
    assert trainable(model) == 62_038


class _Contiguous(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous()


def _tutorial_net(seed: nn.Module) -> nn.Sequential:
    """The tutorial's layer order (conv, ReLU, nn.MaxPool2d) with ``seed``'s weights; its
    BatchNorm on NCHW as the seed net's (a layout, not a function, choice)."""
    f, c = seed.features, seed.classifier
    return nn.Sequential(f[0], nn.ReLU(), nn.MaxPool2d(2), f[3], nn.ReLU(), nn.MaxPool2d(2),
                         _Contiguous(), f[6], c)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_seed_net_is_the_tutorials_function_and_gradients(channels_last: bool,
                                                           bf16: bool) -> None:
    """Pooling before the ReLU (and the first pool in float32 under the CPU's bf16
    autocast, ``MaxPool2dF32``) changes no value and no gradient, bit for bit (the trunk,
    on normalised input; the folded normalisation is the next test's)."""
    torch.manual_seed(0)
    model = build_model("seed_net", 10, MEAN, STD)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = model[0](torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8).contiguous(
        memory_format=layout))
    y = torch.randint(0, 10, (16,))
    grads = []
    for net in (model[1], _tutorial_net(model[1])):
        net.zero_grad()
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            out = net(x)
            nn.functional.cross_entropy(out.float(), y).backward()
        grads.append((out.detach(), [p.grad.clone() for p in net.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.equal(a, b) for a, b in zip(grads[0][1], grads[1][1], strict=True))


def test_float32_pool_of_bf16_is_exact_ties_included() -> None:
    """Ties on purpose (bf16 has 8 bits of mantissa): the same indices, values, gradients."""
    from stages.models import MaxPool2dF32

    x = (torch.randint(-4, 5, (8, 6, 28, 28)).to(torch.bfloat16) / 4).contiguous(
        memory_format=torch.channels_last)
    grad = torch.randn(8, 6, 14, 14).to(torch.bfloat16)
    outs = []
    for pool in (nn.MaxPool2d(2), MaxPool2dF32(2)):
        xi = x.clone().requires_grad_()
        out = pool(xi)
        out.backward(grad)
        outs.append((out, xi.grad))
    assert outs[1][0].dtype == torch.bfloat16
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_normalisation_folded_into_the_first_conv(channels_last: bool, bf16: bool) -> None:
    """A uint8 batch goes straight into the first conv with ``InputNorm`` folded into its
    weights: the same outputs and gradients as normalising first, up to rounding; under
    bf16 autocast (where the folded gradient would lose precision) not folded at all."""
    torch.manual_seed(0)
    model = build_model("seed_net", 10, MEAN, STD)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8).contiguous(
        memory_format=layout)
    y = torch.randint(0, 10, (16,))
    results = []
    for run in (model, lambda u: model[1](model[0](u))):
        model.zero_grad()
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            out = run(x)
            nn.functional.cross_entropy(out.float(), y).backward()
        results.append((out.detach().float(), [p.grad.clone() for p in model.parameters()]))
    if bf16:
        assert torch.equal(results[0][0], results[1][0])
        assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1], strict=True))
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-4, atol=1e-5)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * b.abs().max())
    weight, bias = model[0].fold(model[1].features[0])
    assert weight.shape == (6, 3, 5, 5) and bias.shape == (6,)


def test_input_norm_channels_last_is_bit_identical() -> None:
    norm = build_model("seed_net", 10, MEAN, STD)[0]
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    fast = norm(x.contiguous(memory_format=torch.channels_last))
    assert fast.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(fast, norm(x))


def test_input_norm_makes_the_model_take_raw_uint8() -> None:
    model = build_model("seed_net", 10, MEAN, STD)
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    scaled = (x.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(
        1, 3, 1, 1)
    assert torch.allclose(model[0](x), scaled)
    model.eval()
    assert torch.allclose(model(x), model[1](scaled), rtol=1e-4, atol=1e-5)  # folded
    assert {"0.mean", "0.std"} <= set(model.state_dict())  # saved with the weights


@pytest.mark.parametrize("arch", sorted(set(ARCHITECTURES) - {"seed_net"}))
def test_stronger_models_run_and_learn_a_step(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch, 10, MEAN, STD)
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(8) % 10
    model[1].init_whitening(model[0](x))
    out = model(x)
    assert out.shape == (8, 10)
    loss = nn.functional.cross_entropy(out, y)
    loss.backward()
    assert not model[1].whiten.weight.requires_grad  # whitening stays frozen
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_whitening_decorrelates_patches() -> None:
    torch.manual_seed(0)
    model = build_model("air_small", 10, MEAN, STD)
    # correlated input: neighbouring pixels and channels share most of their value
    base = torch.rand(64, 1, 33, 33) * 255
    x = (base[:, :, :32, :32] * 0.8 + torch.rand(64, 3, 32, 32) * 51).to(torch.uint8)
    z = model[0](x)
    model[1].init_whitening(z)
    feats = model[1].whiten(z)[:, :12]  # the first half: +eigenvectors
    flat = feats.permute(0, 2, 3, 1).reshape(-1, 12).double()
    cov = flat.T @ flat / len(flat)  # second moments, as init_whitening uses
    off_diag = cov - torch.diag(torch.diag(cov))
    assert off_diag.abs().max() < 0.01
    assert torch.allclose(torch.diag(cov), torch.ones(12, dtype=cov.dtype), atol=0.1)


def test_model_file_round_trip_weights_only(tmp_path: Path) -> None:
    model = build_model("seed_net", 10, MEAN, STD)
    path = tmp_path / "model.pt"
    save_model(path, model, arch="seed_net", classes=[f"c{i}" for i in range(10)], mean=MEAN,
               std=STD, extra={"params": {"lr": 0.003}})
    blob = torch.load(path, weights_only=True)
    assert blob["arch"] == "seed_net" and blob["params"] == {"lr": 0.003}
    loaded, meta = load_model(path)
    assert not loaded.training
    assert meta["normalization"] == {"mean": MEAN, "std": STD}
    assert meta["input"]["dtype"] == "uint8"
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(loaded(x), model.eval()(x))


def test_unknown_model_name_lists_the_choices() -> None:
    with pytest.raises(UserError, match="train.model.*seed_net"):
        build_model("resnet9000", 10, MEAN, STD)


@pytest.mark.parametrize(("arch", "title"), [
    ("seed_net", "Learned first-layer filters"),
    ("air_small", "First-layer whitening filters (fixed"),
    ("airbench94", "First-layer whitening filters (fixed"),
])
def test_filters_figure_says_what_the_first_conv_is(arch: str, title: str) -> None:
    from stages import figures
    from stages.evaluate import first_layer_filters

    model = build_model(arch, 10, MEAN, STD)
    fig = figures.filters_figure(first_layer_filters(model)[0], 40, first_layer_title(model))
    assert fig.texts[0].get_text().startswith(title)
    # the airbench nets' first conv is the frozen whitening, not a learned layer
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.weight.requires_grad == (arch == "seed_net")


def test_airbench94_blocks_are_the_recipes() -> None:
    """BatchNorm scales frozen at 1 with eps 1e-12; convs start as identity on c_in filters."""
    model = build_model("airbench94", 10, MEAN, STD)
    group = model[1].groups[0]
    assert not group.norm1.weight.requires_grad and group.norm1.bias.requires_grad
    assert group.norm1.eps == 1e-12 and group.norm1.momentum == 0.4
    w = group.conv2.weight  # 64 -> 64: filter i copies input channel i
    assert torch.equal(w[3, 3], torch.tensor([[0., 0, 0], [0, 1, 0], [0, 0, 0]]))
    assert torch.equal(w[3, 4], torch.zeros(3, 3))
    assert trainable(model) == trainable(build_model("airbench", 10, MEAN, STD)) \
        - sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d))
