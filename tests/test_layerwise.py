"""The layer-wise route against the torch.func per-sample-gradient route (the reference).

Float32 comparisons use rtol=1e-5 and an absolute tolerance of 1e-5 × the largest
reference value: ⟨g_i, Δ_k⟩ sums terms of both signs over layers, so entries near
zero carry float32 rounding of the scale of the largest terms, not of themselves.
Float64 comparisons (the small models, with BatchNorm or GroupNorm) are tight: the
method is exact.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedmia.attacker import layerwise, measures
from fedmia.attacker.layerwise import (
    CONV_METHODS,
    ShiftShape,
    conv_costs,
    layerwise_grad_products,
    layerwise_products,
)
from fedmia.attacker.measures import (
    auto_grad_products,
    compute_round_measures,
    per_sample_grad_products,
)
from fedmia.federation.models import build_model
from fedmia.federation.nets import AlexNetCifar
from fedmia.federation.state import FlatState


@pytest.fixture
def float64():
    """Default dtype float64 (the reference allocates its accumulators in it)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def inputs(
    model: nn.Module,
    k: int,
    b: int,
    shape,
    num_classes: int,
    scale: float = 1e-2,
    seed: int = 0,
    perturb: float = 0.0,
):
    g = torch.Generator().manual_seed(seed)
    params = {
        n: p.detach() + perturb * torch.randn(p.shape, generator=g)
        for n, p in model.named_parameters()
    }
    buffers = {n: t.detach() for n, t in model.named_buffers()}
    updates = {n: scale * torch.randn(k, *p.shape, generator=g) for n, p in params.items()}
    x = torch.randn(b, *shape, generator=g)
    y = torch.randint(0, num_classes, (b,), generator=g)
    return params, buffers, x, y, updates


def close32(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    atol = 1e-5 * want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=atol, msg=what)


def with_bn_statistics(model: nn.Module, shape, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(1.5 * torch.randn(8, *shape, generator=g) + 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def alexnet_case():
    torch.manual_seed(0)
    model = AlexNetCifar(10).eval()
    args = inputs(model, k=3, b=6, shape=(3, 32, 32), num_classes=10)
    return model, args, per_sample_grad_products(model, *args)


@pytest.fixture(scope="module")
def resnet_bn_case():
    torch.manual_seed(0)
    model = with_bn_statistics(build_model("resnet18_bn", 10, seed=0), (3, 32, 32))
    bn = model.layer1[0].bn1
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    args = inputs(model, k=3, b=6, shape=(3, 32, 32), num_classes=10)
    return model, args, per_sample_grad_products(model, *args)


@pytest.fixture(scope="module")
def resnet_gn_case():
    """The paper's ResNet18 (GroupNorm(32)) on 16×16 inputs (maps down to 2×2), weights
    perturbed so that the GroupNorm scales and shifts are not 1 and 0."""
    model = build_model("resnet18", 10, seed=0).eval()
    assert isinstance(model.layer1[0].bn1, nn.GroupNorm)
    args = inputs(model, k=3, b=4, shape=(3, 16, 16), num_classes=10, perturb=0.05)
    return model, args, per_sample_grad_products(model, *args)


@pytest.mark.parametrize("method", CONV_METHODS)
@pytest.mark.parametrize("case", ["alexnet_case", "resnet_bn_case", "resnet_gn_case"])
def test_cifar_models_match_torch_func(request, case, method):
    model, args, (dots, sqnorm) = request.getfixturevalue(case)
    got_dots, got_sq = layerwise_products(model, *args, conv_method=method)
    assert got_dots.shape == dots.shape and got_sq.shape == sqnorm.shape
    close32(got_dots, dots, "dots")
    close32(got_sq, sqnorm, "sqnorm")


@pytest.mark.parametrize("kind", ["alexnet", "resnet18"])  # the paper's two models
def test_paper_models_never_fall_back_to_torch_func(monkeypatch, caplog, kind):
    def refuse(*args, **kwargs):
        raise AssertionError("the torch.func route was taken")

    monkeypatch.setattr(measures, "per_sample_grad_products", refuse)
    model = build_model(kind, 10, seed=0).eval()
    args = inputs(model, k=2, b=2, shape=(3, 16, 16), num_classes=10)
    dots, sqnorm = auto_grad_products(model, *args)
    assert dots.shape == (2, 2) and bool(torch.isfinite(dots).all()) and bool((sqnorm > 0).all())
    assert "layer-wise route unavailable" not in caplog.text


class Tiny(nn.Module):
    """Conv stride/padding/dilation/'same'/'valid' variants, BatchNorm, a Linear on a 4-D input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv_b = nn.Conv2d(4, 5, 3, padding=2, dilation=2)
        self.conv_c = nn.Conv2d(5, 6, (2, 4), padding="same", dilation=(1, 2))  # asymmetric
        self.conv_d = nn.Conv2d(6, 6, (3, 2), stride=(1, 2), padding="valid", bias=False)
        self.bn_noaffine = nn.BatchNorm2d(6, affine=False)
        self.mix = nn.Linear(6, 7)  # applied to B×H×W×C: T = H·W positions
        self.fc = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.conv_a(x)), inplace=True)
        h = F.relu(self.conv_b(h), inplace=True)
        h = torch.tanh(self.conv_c(h))
        h = self.bn_noaffine(self.conv_d(h))
        h = self.mix(h.permute(0, 2, 3, 1))  # B×H×W×7
        return self.fc(h.mean((1, 2)))


def tiny(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(3)
    return with_bn_statistics(Tiny(), (3, 12, 12)).to(dtype)


class TinyGroupNorm(nn.Module):
    """GroupNorm variants: several groups, one group, one channel per group, a non-default
    eps, no affine terms, a residual sum, an in-place op on its output, a 2-D input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.gn_a = nn.GroupNorm(3, 6)
        self.conv_b = nn.Conv2d(6, 4, 3, padding=1)
        self.gn_b = nn.GroupNorm(1, 4, eps=1e-3)
        self.conv_c = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.gn_c = nn.GroupNorm(4, 4)
        self.gn_plain = nn.GroupNorm(2, 4, affine=False)
        self.fc = nn.Linear(4, 6)
        self.gn_fc = nn.GroupNorm(2, 6)  # on B×6
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.gn_a(self.conv_a(x)), inplace=True)  # B×6×6×6
        h = torch.tanh(self.gn_b(self.conv_b(h)))
        h = self.gn_plain(self.gn_c(self.conv_c(h)) + h)
        h = F.relu(self.gn_fc(self.fc(h.mean((2, 3)))), inplace=True)
        return self.out(h)


def tiny_gn(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(4)
    return TinyGroupNorm().eval().to(dtype)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("method", CONV_METHODS)
@pytest.mark.parametrize("make", [tiny, tiny_gn], ids=["tiny", "tiny_groupnorm"])
def test_tiny_variants_exact_in_float64(float64, make, method):
    model = make(torch.float64)
    # params differ from the module's own tensors: the route must use the given ones
    args = inputs(model, k=4, b=5, shape=(3, 12, 12), num_classes=3, scale=0.1, perturb=0.05)
    dots, sqnorm = per_sample_grad_products(model, *args)
    got_dots, got_sq = layerwise_products(model, *args, conv_method=method)
    assert got_dots.dtype == torch.float64
    torch.testing.assert_close(got_dots, dots, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_sq, sqnorm, rtol=1e-10, atol=1e-12)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("method", CONV_METHODS)
def test_sub_batches_give_the_same_result(method):
    model = tiny()
    args = inputs(model, k=2, b=7, shape=(3, 12, 12), num_classes=3)
    want = layerwise_products(model, *args, conv_method=method)
    got = layerwise_products(model, *args, conv_method=method, max_buffer_floats=1)
    close32(got[0], want[0], "dots")
    close32(got[1], want[1], "sqnorm")


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_leaves_model_untouched_and_no_hooks():
    model = tiny().train()  # called in train mode: evaluated in eval mode, mode restored
    before = {n: t.clone() for n, t in model.state_dict().items()}
    params = dict(model.named_parameters())  # the model's own tensors, requiring grad
    buffers = dict(model.named_buffers())
    updates = {n: 0.01 * torch.randn(2, *p.shape) for n, p in params.items()}
    x, y = torch.randn(4, 3, 12, 12), torch.randint(0, 3, (4,))
    dots, sq = layerwise_grad_products(model, params, buffers, x, y, updates)
    model.eval()
    want = per_sample_grad_products(model, params, buffers, x, y, updates)
    close32(dots, want[0], "dots")
    close32(sq, want[1], "sqnorm")
    for n, t in model.state_dict().items():
        assert torch.equal(t, before[n]), n
    assert all(p.grad is None for p in model.parameters())
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
    model.train()
    with pytest.raises(NotImplementedError):
        layerwise_grad_products(
            nn.Sequential(nn.LayerNorm(3)),
            {"0.weight": torch.ones(3)},
            {},
            torch.randn(2, 3),
            torch.zeros(2, dtype=torch.long),
            {"0.weight": torch.ones(1, 3)},
        )
    assert all(m.training for m in model.modules())


def test_compute_round_measures_with_layerwise_route_equals_default():
    torch.manual_seed(1)
    model = AlexNetCifar(10)
    state = FlatState(model)
    w = state.snapshot()
    uploads = 0.01 * torch.randn(3, w.numel())
    x, y = torch.randn(7, 3, 32, 32), torch.randint(0, 10, (7,))
    want = compute_round_measures(state, w, uploads, x, y, chunk_size=4, batch_size=5)
    got = compute_round_measures(
        state, w, uploads, x, y, chunk_size=4, batch_size=5, grad_products=layerwise_grad_products
    )
    assert torch.equal(state.flat, w)
    for name in ("loss", "cos", "grad_diff", "grad_norm", "confidence", "correct"):
        a, b = getattr(got, name), getattr(want, name)
        if a.dtype == torch.bool:
            assert torch.equal(a, b), name
        else:
            close32(a, b, name)


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.fc(x))


class InPlaceAfterUse(nn.Module):
    """fc2 reads fc1's output, which is then changed in place (legal: fc2's weight is no leaf)."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.fc1, self.fc2, self.inplace = nn.Linear(5, 6), nn.Linear(6, 3), inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fc1(x)
        out = self.fc2(z)
        z = z.mul_(2) if self.inplace else z * 2
        return out + z.sum(1, keepdim=True)


def test_input_changed_in_place_after_use_is_recomputed_from_copies(caplog):
    caplog.set_level(logging.DEBUG, logger="fedmia.attacker.layerwise")
    torch.manual_seed(0)
    model = InPlaceAfterUse(inplace=False).eval()
    args = inputs(model, k=2, b=4, shape=(5,), num_classes=3)
    want = per_sample_grad_products(model, *args)
    model.inplace = True
    got = layerwise_grad_products(model, *args)
    close32(got[0], want[0], "dots")
    close32(got[1], want[1], "sqnorm")
    assert "recomputing with copied layer inputs" in caplog.text


def one(model: nn.Module, shape):
    params = {n: p.detach() for n, p in model.named_parameters()}
    updates = {n: torch.randn(2, *p.shape) for n, p in params.items()}
    return (
        model,
        params,
        dict(model.named_buffers()),
        torch.randn(2, *shape),
        torch.zeros(2, dtype=torch.long),
        updates,
    )


@pytest.mark.parametrize(
    ("model", "shape", "match"),
    [
        (nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), (4,), "LayerNorm.*torch.func"),
        (nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten()), (4, 5, 5), "groups=2"),
        (
            nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), nn.Flatten()),
            (2, 3, 3),
            "padding_mode",
        ),
        (
            nn.Sequential(nn.Flatten(), nn.BatchNorm1d(4, track_running_stats=False)),
            (4,),
            "running statistics",
        ),
        (Shared(), (3,), "more than once"),
    ],
)
def test_unsupported_models_raise_clearly(model, shape, match):
    with pytest.raises(NotImplementedError, match=match):
        layerwise_grad_products(*one(model.eval(), shape))
    for m in model.modules():
        assert not m._forward_hooks


def test_unknown_method_rejected():
    with pytest.raises(ValueError, match="unknown conv_method"):
        layerwise_products(*one(nn.Linear(2, 2), (2,)), conv_method="fast")


def test_cost_model_choices():
    def best(c, d, t, k=10):
        costs = conv_costs(c, d, t, k)
        return min(costs, key=costs.__getitem__)

    assert best(10, 256, 1) == "ghost"  # Linear: δᵀΔa and ‖δ‖²‖a‖²
    assert best(64, 576, 1024) == "materialise"  # ResNet18 stage 1: T² far too large
    # blocked G_i: C·D·(T + K) multiply-adds, weighted 4, against ghost's K·C·D·T
    assert best(384, 1728, 4) == "ghost"  # AlexNet conv3 on 2×2 maps: 56 vs 40 per C·D
    assert best(192, 1600, 16) == "materialise"  # AlexNet conv2 on 4×4 maps: 108 vs 160

    def best_conv(conv: nn.Conv2d, hw: int, out: int, k: int = 10) -> str:
        shape = ShiftShape(
            conv.in_channels,
            layerwise._shift_pairs(conv, (hw, hw), (out, out)),
            conv.in_channels * hw * hw,
        )
        d = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        costs = conv_costs(conv.out_channels, d, out * out, k, shape)
        return min(costs, key=costs.__getitem__)

    net = AlexNetCifar(100).features
    # its 2×2 layers: 16 of the 36 (position, tap) pairs meet the input
    assert [best_conv(net[i], 2, 2) for i in (6, 8, 10)] == ["shift"] * 3
    assert best_conv(net[3], 4, 4) == "taps"  # C_in 64 (shift's GEMMs run slower), 196 of 400 pairs
    assert best_conv(net[0], 32, 8) == "materialise"  # C_in 3
    resnet = build_model("resnet18", 10, seed=0)
    assert best_conv(resnet.layer1[0].conv1, 32, 32) == "materialise"  # T = 1024


class Unused(nn.Module):
    def __init__(self, const: bool) -> None:
        super().__init__()
        self.fc, self.never, self.const = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3)
        self.use_const = const

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(x)
        if self.use_const:  # parameterised, but not downstream of the input
            out = out + self.const(torch.ones(1, 3))
        return out


def test_unused_layers_count_zero_and_input_independent_layers_raise():
    torch.manual_seed(0)
    model = Unused(const=False).eval()
    args = inputs(model, k=2, b=4, shape=(3,), num_classes=3)
    want = per_sample_grad_products(model, *args)
    got = layerwise_grad_products(model, *args)
    close32(got[0], want[0], "dots")
    close32(got[1], want[1], "sqnorm")
    model.use_const = True
    with pytest.raises(NotImplementedError, match="const.*do not depend on the input"):
        layerwise_grad_products(model, *args)


class SmallMaps(nn.Module):
    """Convolutions on 4×4 and 2×2 maps, where ``shift`` takes the unfolded input's Gram
    matrix from the input's own (``_gram_map``): padding 1 and 2, stride 2, dilation 2,
    an asymmetric 'same' kernel, a 1×1 output, no bias, outputs that read only padding."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 5, 3, padding=1)  # 4×4 → 4×4
        self.conv_b = nn.Conv2d(5, 6, 3, stride=2, padding=1)  # → 2×2
        self.conv_c = nn.Conv2d(6, 4, 3, padding=2, dilation=2)  # → 2×2
        self.conv_d = nn.Conv2d(4, 5, (2, 3), padding="same", bias=False)  # → 2×2
        self.conv_e = nn.Conv2d(5, 4, 2)  # → 1×1, no padding
        # → 3×3 of which 8 outputs read nothing but padding (the earliest form: an output
        # with no tap inside the input)
        self.conv_f = nn.Conv2d(4, 4, 1, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv_a(x))
        h = F.relu(self.conv_b(h), inplace=True)
        h = torch.tanh(self.conv_c(h)) + h[:, :4]
        h = torch.tanh(self.conv_d(h))
        return self.fc(torch.tanh(self.conv_f(self.conv_e(h))).mean((2, 3)))


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("method", ["shift", "taps", "auto"])
def test_small_maps_exact_in_float64(float64, method):
    torch.manual_seed(5)
    model = SmallMaps().eval()
    args = inputs(model, k=3, b=5, shape=(3, 4, 4), num_classes=3, scale=0.1)
    dots, sqnorm = per_sample_grad_products(model, *args)
    got_dots, got_sq = layerwise_products(model, *args, conv_method=method)
    torch.testing.assert_close(got_dots, dots, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_sq, sqnorm, rtol=1e-10, atol=1e-12)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Conv2d(2, 3, 5, padding=2),
        nn.Conv2d(2, 3, 3, stride=2, padding=1),
        nn.Conv2d(2, 3, 3, padding=2, dilation=2),
        nn.Conv2d(2, 3, (2, 3), padding="same", dilation=(1, 2)),
        nn.Conv2d(2, 3, (3, 2), stride=(1, 2), padding="valid"),
        nn.Conv2d(2, 3, 11, stride=4, padding=5),
        nn.Conv2d(2, 3, 1, padding=1),
    ],
    ids=[
        "3x3p1",
        "5x5p2",
        "stride2",
        "dilation2",
        "same_asym",
        "valid_stride",
        "alexnet1",
        "1x1p1_padding_only_outputs",
    ],
)
@pytest.mark.parametrize("hw", [(2, 2), (4, 5), (9, 7)])
def test_tap_ranges_and_gram_map_match_the_unfolded_input(float64, conv, hw):
    x = torch.randn(3, 2, *hw)
    if min(hw) < max(conv.kernel_size) and conv.padding == "valid":
        pytest.skip("the kernel does not fit the input without padding")
    u = layerwise._unfold(conv, x, "bdt")  # 3×D×T, with the padding's zeros
    out_hw = tuple(conv.double()(x).shape[2:])
    rows, cols = layerwise._tap_geometry(conv, hw, out_hw)
    # the (position, tap) pairs that meet the input: exactly the unfolded entries that are
    # not padding (an input of ones marks them)
    ones = layerwise._unfold(conv, torch.ones(1, 1, *hw), "bdt")[0]  # (kh·kw)×T
    assert layerwise._shift_pairs(conv, hw, out_hw) == int(ones.sum())
    assert sum(o1 - o0 for _, o0, o1, _ in rows) * sum(o1 - o0 for _, o0, o1, _ in cols) == int(
        ones.sum()
    )
    m = layerwise._gram_map(hw, out_hw, conv.stride, rows, cols)
    xf = x.reshape(3, 2, -1)
    got = (torch.bmm(xf.transpose(1, 2), xf).reshape(3, -1) @ m).view_as(
        torch.bmm(u.transpose(1, 2), u)
    )
    torch.testing.assert_close(got, torch.bmm(u.transpose(1, 2), u), rtol=1e-12, atol=1e-12)


class TwoPaths(nn.Module):
    """conv_b reads the input through an operation, not the input itself: no seed reaches
    it, so the route must go back to the input for it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(2, 3, 3, padding=1)
        self.conv_b = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv_a(x)) + torch.tanh(self.conv_b(2 * x))
        return self.fc(h.mean((2, 3)))


def test_a_layer_no_seed_reaches_is_recomputed_back_to_the_input(float64, caplog):
    caplog.set_level(logging.DEBUG, logger="fedmia.attacker.layerwise")
    torch.manual_seed(6)
    model = TwoPaths().eval()
    args = inputs(model, k=2, b=4, shape=(2, 5, 5), num_classes=2, scale=0.1)
    dots, sqnorm = per_sample_grad_products(model, *args)
    got_dots, got_sq = layerwise_products(model, *args)
    torch.testing.assert_close(got_dots, dots, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_sq, sqnorm, rtol=1e-10, atol=1e-12)
    assert "no output gradient reached layer(s) ['conv_b']" in caplog.text


def test_tap_major_updates_are_made_once_per_update_tensor():
    upd = torch.randn(2, 3, 4, 3, 3)
    cache = layerwise._TAP_MAJOR
    taps = cache.get(upd, "shift")
    assert taps.shape == (6, 9, 4)
    torch.testing.assert_close(taps[:, 4], upd[:, :, :, 1, 1].reshape(6, 4), rtol=0, atol=0)
    outer = cache.get(upd, "taps")  # the other layout: an entry of its own
    assert outer.shape == (9, 2, 12)
    torch.testing.assert_close(outer[5], upd[:, :, :, 1, 2].reshape(2, 12), rtol=0, atol=0)
    assert cache.get(upd, "shift") is taps  # the same tensor, unchanged: reused
    upd.mul_(2)  # changed in place: made again
    again = cache.get(upd, "shift")
    torch.testing.assert_close(again[:, 0], upd[:, :, :, 0, 0].reshape(6, 4), rtol=0, atol=0)
    other = upd.clone()  # equal values, another tensor: its own entry
    assert cache.get(other, "shift") is not again
