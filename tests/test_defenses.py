from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedmia.core.config import DefenseConfig, TrainConfig
from fedmia.federation.defenses import (
    DEFENSES,
    AugmentDefense,
    ComposeDefense,
    DataSpec,
    Defense,
    DPDefense,
    InstaHideDefense,
    MixupDefense,
    SparsifyDefense,
    SubsampleDefense,
    adjust_brightness,
    adjust_contrast,
    adjust_saturation,
    build_defense,
    crop,
    generator_on,
    jitter,
    params_of,
    rotate,
    strength_of,
)
from fedmia.federation.fedavg import DeviceData, local_train, run_fedavg
from fedmia.federation.state import Entry, FlatState, StateLayout

#: The CUDA case skips without CUDA, or fails where FEDMIA_REQUIRE_CUDA=1 (conftest).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def build(kind: str, **params):
    return build_defense(DefenseConfig(kind=kind, params=params))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def layout_of(*entries: tuple[str, int, bool]) -> StateLayout:
    """A layout of flat entries (name, numel, is_param) laid out back to back."""
    out, offset = [], 0
    for name, n, is_param in entries:
        out.append(Entry(name, (n,), offset, n, is_param))
        offset += n
    return StateLayout(tuple(out))


# a big conv-like layer, a BN running mean (not a parameter), a small bias, a mid-size layer
LAYOUT = layout_of(
    ("conv.weight", 20_000, True),
    ("bn.running_mean", 64, False),
    ("conv.bias", 64, True),
    ("fc.weight", 5_000, True),
)
BIG, BN, SMALL, FC = LAYOUT.entries


def update_for(layout: StateLayout, seed: int = 1, device: str = "cpu") -> torch.Tensor:
    return torch.randn(layout.size, generator=gen(seed)).to(device)


def images(b: int = 16, c: int = 3, h: int = 8, w: int = 8, seed: int = 2):
    g = gen(seed)
    return torch.randn(b, c, h, w, generator=g), torch.randint(0, 5, (b,), generator=g)


def spec(c: int = 3, num_classes: int = 5, device: str = "cpu") -> DataSpec:
    """A dataset description with distinct per-channel statistics (CIFAR-like)."""
    mean = torch.tensor([0.49, 0.48, 0.45][:c]).view(1, c, 1, 1).to(device)
    std = torch.tensor([0.20, 0.25, 0.30][:c]).view(1, c, 1, 1).to(device)
    return DataSpec(num_classes=num_classes, mean=mean, std=std)


SPEC = spec()


# ---------------------------------------------------------------------------- registry


def test_all_kinds_are_registered():
    assert set(DEFENSES.names()) == {
        "none",
        "dp",
        "dp_param_noise",
        "quantize",
        "sparsify",
        "mixup",
        "instahide",
        "subsample",
        "augment",
        "compose",
    }


def test_generator_on_cpu_is_gen_itself():
    g = gen()
    assert generator_on(g, torch.device("cpu")) is g


# ---------------------------------------------------------------------------------- dp


@pytest.mark.parametrize("device", DEVICES)
def test_dp_clip_bounds_the_parameter_norm(device):
    d = build("dp", sigma=1.0, clip=2.5)
    assert isinstance(d, DPDefense)
    mask = LAYOUT.param_mask().to(device)
    u = update_for(LAYOUT, device=device) * 10  # norm ≫ 2.5
    c = d.clipped(u, LAYOUT)
    assert torch.linalg.vector_norm(c[mask]) <= 2.5 * (1 + 1e-5)
    assert torch.linalg.vector_norm(c[mask]) == pytest.approx(2.5, rel=1e-5)
    # direction kept, BN statistics untouched
    torch.testing.assert_close(c[mask] / c[mask].norm(), u[mask] / u[mask].norm())
    assert torch.equal(c[~mask], u[~mask])
    # an update inside the ball is unchanged
    small = u / u[mask].norm()  # parameter norm 1 < 2.5
    torch.testing.assert_close(d.clipped(small, LAYOUT), small)


def test_dp_noise_std_is_sigma_times_clip():
    layout = layout_of(("w", 1_000_000, True))
    u = torch.zeros(layout.size)  # zero update: the upload is the noise alone
    up = build("dp", sigma=0.7, clip=3.0).upload(u, layout, gen(5))
    assert up.std().item() == pytest.approx(0.7 * 3.0, rel=0.02)
    assert abs(up.mean().item()) < 0.01


def test_dp_upload_is_clipped_plus_noise_and_seeded():
    d = build("dp", sigma=0.1, clip=1.0)
    u = update_for(LAYOUT) * 5
    a, b = d.upload(u, LAYOUT, gen(3)), d.upload(u, LAYOUT, gen(3))
    assert torch.equal(a, b)
    assert not torch.equal(a, d.upload(u, LAYOUT, gen(4)))
    mask = LAYOUT.param_mask()
    noise = a - d.clipped(u, LAYOUT)
    assert noise[mask].std().item() == pytest.approx(0.1, rel=0.05)
    assert torch.equal(a[~mask], u[~mask])
    # σ = 0 clips only
    torch.testing.assert_close(
        build("dp", sigma=0, clip=1.0).upload(u, LAYOUT, gen()), d.clipped(u, LAYOUT)
    )


def test_dp_param_noise_std_is_sigma_and_nothing_is_clipped():
    layout = layout_of(("w", 1_000_000, True), ("bn.running_var", 10, False))
    u = torch.randn(layout.size, generator=gen(9)) * 100  # huge norm: no clipping would shrink it
    up = build("dp_param_noise", sigma=0.05).upload(u, layout, gen(1))
    noise = (up - u)[:1_000_000]
    assert noise.std().item() == pytest.approx(0.05, rel=0.02)
    assert torch.equal(up[1_000_000:], u[1_000_000:])  # BN statistics pass through
    assert torch.equal(build("dp_param_noise", sigma=0).upload(u, layout, gen()), u)


# ---------------------------------------------------------------------------- quantize


@pytest.mark.parametrize("bits", [1, 2, 3, 8])
def test_quantize_levels_and_error(bits):
    u = update_for(LAYOUT)
    q = build("quantize", bits=bits).upload(u, LAYOUT, gen())
    for e in (BIG, SMALL, FC):
        v, qv = u[e.slice], q[e.slice]
        assert qv.unique().numel() <= 2**bits
        step = (v.max() - v.min()) / (2**bits - 1)
        assert (qv - v).abs().max() <= step / 2 * (1 + 1e-5) + 1e-7
        assert qv.min() == pytest.approx(v.min().item(), abs=1e-6)  # the range is kept
        assert qv.max() == pytest.approx(v.max().item(), abs=1e-6)
    assert torch.equal(q[BN.slice], u[BN.slice])


@pytest.mark.parametrize("variant", ["fedmia", "official"])
def test_quantize_32_bits_is_identity_and_constant_layers_stay(variant):
    u = update_for(LAYOUT)
    assert torch.equal(build("quantize", bits=32, variant=variant).upload(u, LAYOUT, gen()), u)
    u[SMALL.slice] = 0.25
    q = build("quantize", bits=2, variant=variant).upload(u, LAYOUT, gen())
    assert torch.equal(q[SMALL.slice], u[SMALL.slice])


def test_quantize_default_variant_is_fedmia():
    u = update_for(LAYOUT)
    assert build("quantize", bits=3).variant == "fedmia"
    assert torch.equal(
        build("quantize", bits=3).upload(u, LAYOUT, gen()),
        build("quantize", bits=3, variant="fedmia").upload(u, LAYOUT, gen()),
    )


def official_quant(ts: np.ndarray, bits: int) -> np.ndarray:
    """experiments/utils.py ``quant`` line by line, in float64 (``.int()`` of ≥ 0: floor)."""
    ts_min = ts.min()
    num_of_bins = 2**bits
    ts_q = ts - ts_min
    delta = ts_q.max() / num_of_bins
    ts_q = np.floor(ts_q / delta)
    return ts_q * delta + ts_min


def official_upload(u: torch.Tensor, layout: StateLayout, bits: int) -> torch.Tensor:
    """main.py: ``quant`` on each named parameter of ``local − global`` (= −update)."""
    out = u.clone()
    for e in layout.entries:
        if not e.is_param:
            continue
        d = -u[e.slice].to(torch.float64).numpy()
        with np.errstate(invalid="ignore"):
            q = official_quant(d, bits)
        out[e.slice] = torch.from_numpy(-q).to(u.dtype)
    return out


@pytest.mark.parametrize("bits", [1, 2, 3, 8, 16])
@pytest.mark.parametrize("seed", [1, 2])
def test_quantize_official_is_the_official_formula(bits, seed):
    u = update_for(LAYOUT, seed=seed) * 1e-3
    q = build("quantize", bits=bits, variant="official").upload(u, LAYOUT, gen())
    ref = official_upload(u, LAYOUT, bits)
    for e in (BIG, SMALL, FC):
        assert torch.equal(q[e.slice], ref[e.slice])
        d, qd = -u[e.slice], -q[e.slice]  # the official's model change and its quantization
        assert qd.unique().numel() <= 2**bits + 1
        assert qd.max() == d.max()  # the max lands on level 2**bits: itself
        assert qd.min() == d.min()  # level 0
        step = (d.max().double() - d.min().double()) / 2**bits
        err = qd.double() - d.double()
        ulp = d.abs().max().double() * 2**-23  # the float32 result rounds by half an ulp
        assert (err <= ulp).all() and (err > -step - ulp).all()  # rounded down
    assert torch.equal(q[BN.slice], u[BN.slice])
    if bits == 1:  # three levels: min, midpoint, max
        assert (-q[BIG.slice]).unique().numel() == 3


def test_quantize_official_is_biased_by_half_a_step():
    u = update_for(LAYOUT)
    for bits in (2, 4):
        q = build("quantize", bits=bits, variant="official").upload(u, LAYOUT, gen())
        d, qd = -u[BIG.slice].double(), -q[BIG.slice].double()
        step = (d.max() - d.min()) / 2**bits
        assert (qd - d).mean().item() == pytest.approx(-step.item() / 2, rel=0.05)
        fed = build("quantize", bits=bits).upload(u, LAYOUT, gen())
        assert abs((fed[BIG.slice].double() - u[BIG.slice].double()).mean().item()) < 0.02 * step


def test_quantize_official_constant_layer_passes_unchanged_where_the_official_gives_nan():
    u = update_for(LAYOUT)
    u[SMALL.slice] = -0.125
    q = build("quantize", bits=4, variant="official").upload(u, LAYOUT, gen())
    assert torch.equal(q[SMALL.slice], u[SMALL.slice])
    ref = official_upload(u, LAYOUT, 4)
    assert ref[SMALL.slice].isnan().all()  # 0 / 0 in the official code
    for e in (BIG, FC):
        assert torch.equal(q[e.slice], ref[e.slice])
    # a layer holding its max exactly once, the rest at its min: two levels, both exact
    layout = layout_of(("w", 5, True))
    v = torch.tensor([0.5, 0.5, -1.5, 0.5, 0.5])  # d = −v: max 1.5 (once), min −0.5
    out = build("quantize", bits=3, variant="official").upload(v, layout, gen())
    assert torch.equal(out, v)
    assert torch.equal(out, official_upload(v, layout, 3))


# ---------------------------------------------------------------------------- sparsify


@pytest.mark.parametrize("fraction", [0.0, 0.29, 0.5, 0.9, 0.999])
def test_sparsify_zeroes_exactly_the_requested_fraction_of_large_layers(fraction):
    u = update_for(LAYOUT)
    s = build("sparsify", fraction=fraction).upload(u, LAYOUT, gen())
    for e in (BIG, FC):  # ≥ 1000 elements: sparsified
        zeros = int((s[e.slice] == 0).sum())
        assert zeros == math.floor(fraction * e.numel + 1e-9)
        kept = s[e.slice] != 0
        assert torch.equal(s[e.slice][kept], u[e.slice][kept])  # kept values unchanged
        if 0 < zeros < e.numel:  # the kept ones are the largest in magnitude
            assert u[e.slice][kept].abs().min() >= u[e.slice][~kept].abs().max()
    assert torch.equal(s[SMALL.slice], u[SMALL.slice])  # 64 < 1000: untouched
    assert torch.equal(s[BN.slice], u[BN.slice])


def test_sparsify_min_size_and_ties():
    d = build("sparsify", fraction=0.5, min_size=10_000)
    assert isinstance(d, SparsifyDefense)
    u = update_for(LAYOUT)
    s = d.upload(u, LAYOUT, gen())
    assert torch.equal(s[FC.slice], u[FC.slice])  # 5000 < 10000
    assert int((s[BIG.slice] == 0).sum()) == 10_000
    # all magnitudes tied: exactly half zeroed, the earlier positions first (deterministic)
    layout = layout_of(("w", 10, True))
    v = torch.tensor([1.0, -1.0] * 5)
    out = build("sparsify", fraction=0.3, min_size=0).upload(v, layout, gen())
    assert torch.equal(out, torch.tensor([0.0, 0.0, 0.0] + [-1.0, 1.0] * 3 + [-1.0]))


def test_sparsify_count_for_awkward_fractions():
    d = SparsifyDefense(fraction=0.29, min_size=0)
    assert d.num_zeroed(100) == 29
    assert d.num_zeroed(99) == 28
    assert SparsifyDefense(fraction=0.5).num_zeroed(999) == 0  # below min_size


# ------------------------------------------------------------------------------- mixup


@pytest.mark.parametrize("device", DEVICES)
def test_mixup_mixes_inputs_and_labels_with_the_same_lambda(device):
    d = build("mixup", alpha=1.0)
    assert isinstance(d, MixupDefense) and d.soft_targets
    x, y = images()
    x, y = x.to(device), y.to(device)
    lam, perm = d.draw(16, device, gen(7))
    assert 0.0 <= lam <= 1.0
    assert sorted(perm.tolist()) == list(range(16))
    xm, t = d.batch(x, y, spec(device=device), gen(7))  # same seed: same λ and permutation
    torch.testing.assert_close(xm, lam * x + (1 - lam) * x[perm])
    onehot = F.one_hot(y, 5).float()
    torch.testing.assert_close(t, lam * onehot + (1 - lam) * onehot[perm])
    torch.testing.assert_close(t.sum(1), torch.ones(16, device=device))
    assert t.shape == (16, 5) and xm.shape == x.shape
    # reproducible, and a different seed gives a different mix
    xm2, t2 = d.batch(x, y, spec(device=device), gen(7))
    assert torch.equal(xm, xm2) and torch.equal(t, t2)
    assert not torch.equal(xm, d.batch(x, y, spec(device=device), gen(8))[0])


def test_mixup_lambda_is_beta_distributed_and_tiny_alpha_is_stable():
    lams = torch.tensor([MixupDefense(alpha=2.0).draw(2, "cpu", gen(s))[0] for s in range(2000)])
    assert lams.mean().item() == pytest.approx(0.5, abs=0.02)
    assert lams.var().item() == pytest.approx(1 / (4 * 5), rel=0.15)  # Beta(2,2): 1/20
    tiny = [MixupDefense(alpha=0.01).draw(2, "cpu", gen(s))[0] for s in range(200)]
    assert all(0.0 <= v <= 1.0 and math.isfinite(v) for v in tiny)
    assert sum(min(v, 1 - v) < 1e-3 for v in tiny) > 150  # α → 0: λ near 0 or 1


@pytest.mark.parametrize("device", DEVICES)
def test_mixup_official_feeds_the_unmixed_inputs_with_the_mixed_labels(device):
    paper = build("mixup", alpha=1.0)
    official = build("mixup", alpha=1.0, variant="official")
    assert paper.variant == "paper" and official.soft_targets
    x, y = images()
    x, y = x.to(device), y.to(device)
    s = spec(device=device)
    xo, to = official.batch(x, y, s, gen(7))
    assert torch.equal(xo, x)  # the model sees exactly the unmixed inputs
    lam, perm = official.draw(16, device, gen(7))  # the same draws as the paper variant
    assert 0.05 < lam < 0.95  # a real mix at this seed
    onehot = F.one_hot(y, 5).float()
    torch.testing.assert_close(to, lam * onehot + (1 - lam) * onehot[perm])
    xp, tp = paper.batch(x, y, s, gen(7))
    assert torch.equal(to, tp) and not torch.equal(xp, x)
    # the official loss λ·CE(pred, y) + (1 − λ)·CE(pred, y[π]) is CE against these targets
    pred = torch.randn(16, 5, generator=gen(3)).to(device)
    official_loss = lam * F.cross_entropy(pred, y) + (1 - lam) * F.cross_entropy(pred, y[perm])
    torch.testing.assert_close(F.cross_entropy(pred, to), official_loss)


def test_mixup_accepts_soft_targets_for_composition():
    x, y = images()
    probs = torch.softmax(torch.randn(16, 5, generator=gen(3)), 1)
    d = MixupDefense(alpha=0.5)
    _, t = d.batch(x, probs, SPEC, gen(1))
    lam, perm = d.draw(16, "cpu", gen(1))
    torch.testing.assert_close(t, lam * probs + (1 - lam) * probs[perm])


# --------------------------------------------------------------------------- instahide


@pytest.mark.parametrize(
    "k, bound", [(2, 0.65), (3, 0.65), (4, 0.65), (4, 0.9), (6, 0.65), (3, 0.51)]
)
def test_instahide_coefficients_follow_the_official_rejection_rule(k, bound):
    d = build("instahide", k=k, upper_bound=bound)
    c = d.coefficients(4000, gen(1))
    assert c.shape == (4000, k) and c.dtype == torch.float64
    assert (c >= 0).all()
    torch.testing.assert_close(c.sum(1), torch.ones(4000, dtype=torch.float64))
    top = c.amax(1)
    assert (top >= 0.5).all() and (top <= bound + 1e-12).all()
    assert torch.equal(c, d.coefficients(4000, gen(1)))


def test_instahide_coefficients_are_the_conditional_distribution():
    """Against the obvious sampler: |g|/Σ|g| drawn row by row until 0.5 ≤ max ≤ bound."""
    d = build("instahide", k=3, upper_bound=0.65)
    fast = d.coefficients(6000, gen(2))
    g = gen(3)
    slow = []
    while len(slow) < 6000:  # slow reference: one candidate at a time
        lam = torch.randn(3, generator=g, dtype=torch.float64).abs()
        lam = lam / lam.sum()
        if 0.5 <= lam.max() <= 0.65:
            slow.append(lam)
    slow = torch.stack(slow)
    # same distribution: sorted coefficients' means and the largest one's quantiles
    fs, ss = fast.sort(1, descending=True).values, slow.sort(1, descending=True).values
    torch.testing.assert_close(fs.mean(0), ss.mean(0), atol=0.006, rtol=0)
    q = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    torch.testing.assert_close(fs[:, 0].quantile(q), ss[:, 0].quantile(q), atol=0.006, rtol=0)


def official_instahide(x, y, coeffs, partners, signs, num_classes):
    """The official mixup_data + insta_criterion targets, written as the official loop."""
    mixed = coeffs[:, 0, None, None, None] * x
    ys = [y]
    for i in range(1, coeffs.shape[1]):
        mixed = mixed + coeffs[:, i, None, None, None] * x[partners[i]]
        ys.append(y[partners[i]])
        mixed = mixed * signs[i - 1].to(x.dtype)  # a new sign mask inside the partner loop
    target = sum(
        coeffs[:, i, None] * F.one_hot(ys[i], num_classes).to(x.dtype)
        for i in range(coeffs.shape[1])
    )
    return mixed, target


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [2, 3, 4])
def test_instahide_encodes_as_the_official_partner_loop(device, k):
    d = build("instahide", k=k)
    assert isinstance(d, InstaHideDefense) and d.upper_bound == 0.65
    assert d.soft_targets and d.whole_local_set
    x, y = images(b=32)
    x, y = x.to(device), y.to(device)
    coeffs, partners, signs = d.draw(x.shape, device, x.dtype, gen(4))
    assert partners.shape == (k, 32) and torch.equal(partners[0].cpu(), torch.arange(32))
    for row in partners:
        assert sorted(row.tolist()) == list(range(32))
    assert signs.shape == (k - 1, *x.shape)
    assert set(signs.unique().tolist()) == {-1, 1}
    assert (signs == 1).float().mean().item() == pytest.approx(0.5, abs=0.02)
    xm, t = d.batch(x, y, spec(device=device), gen(4))  # same seed: same draws
    want_x, want_t = official_instahide(x, y, coeffs, partners, signs, 5)
    torch.testing.assert_close(xm, want_x)
    torch.testing.assert_close(t, want_t)
    torch.testing.assert_close(t.sum(1), torch.ones(32, device=device))
    # |x'| is the mixture's magnitude only for k = 2 (one mask); for k ≥ 3 the partners
    # added after the first mask carry a different sign per pixel
    mixture = sum(coeffs[:, j, None, None, None] * x[partners[j]] for j in range(k))
    assert torch.allclose(xm.abs(), mixture.abs()) == (k == 2)
    xm2, t2 = d.batch(x, y, spec(device=device), gen(4))
    assert torch.equal(xm, xm2) and torch.equal(t, t2)


def test_instahide_k1_passes_data_through_and_draws_nothing():
    d = build("instahide", k=1)
    x, y = images()
    g = gen(2)
    xm, t = d.batch(x, y, SPEC, g)
    assert xm is x and t is y  # no sign flip at k = 1, hard labels
    assert torch.equal(torch.randn(3, generator=g), torch.randn(3, generator=gen(2)))


def test_instahide_k1_trains_exactly_like_no_defense():
    data = tiny_data()
    cfg = TrainConfig(rounds=1, local_epochs=3, batch_size=8, lr=0.1)
    ups = []
    for d in (build("none"), build("instahide", k=1)):
        st = FlatState(tiny_model())
        res = local_train(st, st.snapshot(), data, torch.arange(0, 20), cfg, 0.1, d, gen(5))
        ups.append(res.upload)
    assert torch.equal(ups[0], ups[1])


def test_instahide_mixes_over_the_whole_local_set_once_per_epoch():
    """local_train hands the whole shuffled local set to the hook, once per local epoch."""
    calls = []

    class Spy(InstaHideDefense):
        def batch(self, x, y, spec, gen):
            calls.append(x.shape[0])
            return super().batch(x, y, spec, gen)

    data = tiny_data()
    cfg = TrainConfig(rounds=1, local_epochs=3, batch_size=4, lr=0.1)
    st = FlatState(tiny_model())
    res = local_train(st, st.snapshot(), data, torch.arange(0, 18), cfg, 0.1, Spy(k=2), gen(1))
    assert calls == [18, 18, 18]
    assert res.samples == 54 and torch.isfinite(res.upload).all()


# --------------------------------------------------------------------------- subsample


@pytest.mark.parametrize("fraction, n", [(0.5, 100), (0.25, 10), (0.01, 30), (1.0, 17), (0.3, 7)])
def test_subsample_size_subset_no_repetition(fraction, n):
    d = build("subsample", fraction=fraction)
    assert isinstance(d, SubsampleDefense)
    idx = torch.arange(1000, 1000 + n)
    sub = d.local_indices(idx, gen(3))
    assert sub.numel() == max(1, math.floor(fraction * n + 0.5))
    assert sub.unique().numel() == sub.numel()
    assert set(sub.tolist()) <= set(idx.tolist())
    assert torch.equal(sub, d.local_indices(idx, gen(3)))
    if fraction == 1.0:
        assert torch.equal(sub, idx)


# ----------------------------------------------------------------------------- augment


def pixels(b: int = 8, c: int = 3, h: int = 8, w: int = 8, seed: int = 2) -> torch.Tensor:
    """Random pixel images in [0, 1] on the 8-bit grid."""
    return torch.randint(0, 256, (b, c, h, w), generator=gen(seed)).float() / 255


def test_augment_presets_and_defaults():
    official = build("augment")
    assert isinstance(official, AugmentDefense)
    assert (official.padding, official.hflip, official.vflip, official.rotation) == (
        4,
        True,
        True,
        45.0,
    )
    assert (official.brightness, official.contrast, official.saturation) == (0.25, 0.8, 0.0)
    assert official == build("augment", preset="official")
    mild = build("augment", preset="mild")
    assert mild == AugmentDefense(**AugmentDefense.presets["mild"])
    assert (mild.vflip, mild.rotation, mild.saturation) == (False, 0.0, 0.2)
    # explicit parameters override the preset
    assert build("augment", preset="mild", rotation=10).rotation == 10
    assert official.jitter_ranges() == [(0, 0.75, 1.25), (1, pytest.approx(0.2), 1.8)]


@pytest.mark.parametrize("size, pad", [(32, 4), (64, 8), (28, 4), (8, 1), (16, 2)])
def test_augment_padding_is_scaled_from_32_pixels(size, pad):
    assert AugmentDefense(padding=4).pad_for(size, size) == (pad, pad)
    assert AugmentDefense(padding=4).pad_for(32, 64) == (4, 8)


def test_crop_is_a_window_of_the_zero_padded_image():
    p = pixels(b=6, h=7, w=9)
    dy, dx = torch.tensor([0, 4, 2, 1, 3, 4]), torch.tensor([0, 6, 3, 5, 1, 2])
    out = crop(p, dy, dx, 2, 3)
    for i in range(6):  # slow reference: slice the padded image
        padded = torch.zeros(3, 7 + 4, 9 + 6)
        padded[:, 2:9, 3:12] = p[i]
        torch.testing.assert_close(
            out[i], padded[:, dy[i] : dy[i] + 7, dx[i] : dx[i] + 9], rtol=0, atol=0
        )


def rotate_reference(img: torch.Tensor, degrees: float) -> torch.Tensor:
    """One image C×H×W, pixel by pixel: inverse-map each output pixel centre, nearest."""
    c, h, w = img.shape
    th = math.radians(degrees)
    out = torch.zeros_like(img)
    for r in range(h):
        for col in range(w):
            u, v = col + 0.5 - w / 2, r + 0.5 - h / 2
            x = math.cos(th) * u - math.sin(th) * v + w / 2
            y = math.sin(th) * u + math.cos(th) * v + h / 2
            xi, yi = math.floor(x), math.floor(y)
            if 0 <= xi < w and 0 <= yi < h:
                out[:, r, col] = img[:, yi, xi]
    return out


def test_rotate_matches_the_per_pixel_inverse_mapping():
    p = pixels(b=5, h=9, w=12)
    angles = torch.tensor([0.0, 12.5, -37.0, 45.0, -3.3])
    out = rotate(p, angles)
    for i in range(5):
        torch.testing.assert_close(out[i], rotate_reference(p[i], float(angles[i])), rtol=0, atol=0)
    assert torch.equal(out[0], p[0])  # 0° is the identity


def test_rotate_quarter_turns_are_exact_and_counter_clockwise():
    p = pixels(b=2, h=10, w=10)
    torch.testing.assert_close(
        rotate(p, torch.full((2,), 90.0)), p.rot90(1, dims=(2, 3)), rtol=0, atol=0
    )
    torch.testing.assert_close(rotate(p, torch.full((2,), 180.0)), p.flip(2, 3), rtol=0, atol=0)
    # a quarter turn of a bright top row moves it to the left column (counter-clockwise)
    bar = torch.zeros(1, 1, 6, 6)
    bar[..., 0, :] = 1
    assert torch.equal(rotate(bar, torch.tensor([90.0]))[0, 0, :, 0], torch.ones(6))


def test_rotate_matches_pil():
    """The official path: PIL's Image.rotate(angle, NEAREST, fillcolor=0) on 8-bit images."""
    Image = pytest.importorskip("PIL.Image")
    imgs = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=gen(7))
    angles = [10.0, -33.3, 45.0, -44.9, 29.9, 7.25]
    mismatched = 0
    for a in angles:
        ours = rotate(imgs.float(), torch.full((4,), a))
        for i in range(4):
            pil = Image.fromarray(imgs[i].permute(1, 2, 0).numpy()).rotate(
                a, Image.NEAREST, expand=False, fillcolor=(0, 0, 0)
            )
            ref = torch.tensor(np.array(pil), dtype=torch.float32).permute(2, 0, 1)
            mismatched += int((ref != ours[i]).any(0).sum())
    # PIL maps in 16.16 fixed point: only pixels within ~1e-4 of a grid line may differ
    assert mismatched <= 0.001 * len(angles) * 4 * 32 * 32


def jitter_reference(img: torch.Tensor, factors: list[float], order: list[int]) -> torch.Tensor:
    """One image C×H×W, the torchvision-tensor formulas, one operation at a time."""
    out = img.clone()
    for op in order:
        f = factors[op]
        luma = 0.299 * out[0] + 0.587 * out[1] + 0.114 * out[2]
        if op == 0:
            out = (f * out).clamp(0, 1)
        elif op == 1:
            out = (f * out + (1 - f) * luma.mean()).clamp(0, 1)
        else:
            out = (f * out + (1 - f) * luma).clamp(0, 1)
    return out


def test_jitter_applies_each_sample_its_own_order_of_operations():
    p = pixels(b=6)
    factors = torch.tensor(
        [
            [1.2, 0.3, 1.5],
            [0.8, 1.7, 0.5],
            [1.25, 1.8, 1.0],
            [0.75, 0.2, 1.3],
            [1.1, 1.4, 0.2],
            [0.9, 0.6, 1.6],
        ],
        dtype=torch.float64,
    )
    order = torch.tensor([[0, 1, 2], [2, 1, 0], [1, 0, 2], [0, 2, 1], [2, 0, 1], [1, 2, 0]])
    out = jitter(p, factors, order)
    for i in range(6):
        want = jitter_reference(p[i], factors[i].tolist(), order[i].tolist())
        torch.testing.assert_close(out[i], want)
    # with clamping, the order matters: brightness then contrast ≠ contrast then brightness
    bc = jitter(p, factors, order[:, :2].new_tensor([[0, 1]] * 6))
    cb = jitter(p, factors, order[:, :2].new_tensor([[1, 0]] * 6))
    assert not torch.allclose(bc, cb)
    # an operation not listed is not applied
    torch.testing.assert_close(
        jitter(p, factors, torch.tensor([[0]] * 6)), adjust_brightness(p, factors[:, 0])
    )


def test_jitter_operations_match_pil_up_to_8_bit_rounding():
    Image = pytest.importorskip("PIL.Image")
    ImageEnhance = pytest.importorskip("PIL.ImageEnhance")
    imgs = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8, generator=gen(8))
    p = imgs.float() / 255
    ops = [
        (adjust_brightness, ImageEnhance.Brightness),
        (adjust_contrast, ImageEnhance.Contrast),
        (adjust_saturation, ImageEnhance.Color),
    ]
    for ours_fn, pil_cls in ops:
        for f in (0.2, 0.75, 1.25, 1.8):
            ours = ours_fn(p, torch.full((3,), f))
            for i in range(3):
                pil = pil_cls(Image.fromarray(imgs[i].permute(1, 2, 0).numpy())).enhance(f)
                ref = torch.tensor(np.array(pil), dtype=torch.float32).permute(2, 0, 1)
                # PIL truncates to 8 bits and rounds the contrast mean to a grey level
                assert (ref / 255 - ours[i]).abs().max() <= 1.5 / 255


def test_augment_draws_per_sample_parameters_in_range():
    d = build("augment")
    dr = d.draw((4000, 3, 32, 32), "cpu", gen(9))
    assert dr.dy.min() == 0 and dr.dy.max() == 8 and dr.dx.min() == 0 and dr.dx.max() == 8
    assert dr.hflip.float().mean().item() == pytest.approx(0.5, abs=0.03)
    assert dr.vflip.float().mean().item() == pytest.approx(0.5, abs=0.03)
    assert (dr.degrees.abs() <= 45).all() and dr.degrees.abs().max() > 44
    assert dr.degrees.mean().item() == pytest.approx(0, abs=1.5)
    b, c = dr.factors[:, 0], dr.factors[:, 1]
    assert b.min() >= 0.75 and b.max() <= 1.25 and c.min() >= 0.2 and c.max() <= 1.8
    assert (dr.factors[:, 2] == 1).all()  # saturation off in the official preset
    assert dr.order.shape == (4000, 2)
    first_b = (dr.order[:, 0] == 0).float().mean().item()
    assert first_b == pytest.approx(0.5, abs=0.03)  # both orders, about equally often
    assert not torch.equal(dr.dy, d.draw((4000, 3, 32, 32), "cpu", gen(10)).dy)


def test_augment_batch_is_apply_in_pixel_space():
    """un-normalise → crop, flips, rotation, jitter → normalise, with the drawn parameters."""
    d = build("augment")
    x, y = images(b=16, h=32, w=32)
    a, ya = d.batch(x, y, SPEC, gen(1))
    assert torch.equal(ya, y)
    dr = d.draw(x.shape, "cpu", gen(1))
    p = SPEC.to_pixels(x)
    p = crop(p, dr.dy, dr.dx, 4, 4)
    p = torch.where(dr.hflip[:, None, None, None], p.flip(3), p)
    p = torch.where(dr.vflip[:, None, None, None], p.flip(2), p)
    p = rotate(p, dr.degrees)
    p = jitter(p, dr.factors, dr.order)
    torch.testing.assert_close(a, SPEC.normalise(p))


def test_augment_pads_and_rotates_with_black_pixels():
    d = build("augment", hflip=False, vflip=False, rotation=0, brightness=0, contrast=0)
    x, y = images(b=300, h=32, w=32)
    a, _ = d.batch(x, y, SPEC, gen(4))
    dr = d.draw(x.shape, "cpu", gen(4))
    p = SPEC.to_pixels(a)
    i = int(torch.nonzero((dr.dy == 0) & (dr.dx == 0))[0])  # shifted down-right by 4
    torch.testing.assert_close(p[i, :, :4], torch.zeros(3, 4, 32), atol=1e-6, rtol=0)
    torch.testing.assert_close(p[i, :, 4:, 4:], SPEC.to_pixels(x)[i, :, :28, :28])
    r = build("augment", padding=0, hflip=False, vflip=False, rotation=45, brightness=0, contrast=0)
    pr = SPEC.to_pixels(r.batch(x, y, SPEC, gen(5))[0])
    turned = r.draw(x.shape, "cpu", gen(5)).degrees.abs() > 30
    # a corner falls outside the turned image: black in pixel space
    torch.testing.assert_close(
        pr[turned][:, :, 0, 0], torch.zeros(int(turned.sum()), 3), atol=1e-6, rtol=0
    )


def test_augment_with_every_step_off_is_the_identity():
    d = build(
        "augment",
        padding=0,
        hflip=False,
        vflip=False,
        rotation=0,
        brightness=0,
        contrast=0,
        saturation=0,
    )
    x, y = images()
    torch.testing.assert_close(d.batch(x, y, SPEC, gen(1))[0], x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("preset", ["official", "mild"])
def test_augment_preserves_shape_dtype_and_is_seeded(device, dtype, preset):
    d = build("augment", preset=preset)
    x, y = images(b=32, h=28, w=28)
    x, y = x.to(device=device, dtype=dtype), y.to(device)
    s = spec(device=device)
    a, ya = d.batch(x, y, s, gen(1))
    assert a.shape == x.shape and a.dtype == dtype and a.device == x.device
    assert torch.equal(ya, y)
    assert torch.equal(a, d.batch(x, y, s, gen(1))[0])
    assert not torch.equal(a, d.batch(x, y, s, gen(2))[0])
    p = s.to_pixels(a)
    assert p.min() >= -1e-5 and p.max() <= 1 + 1e-5  # black fill and clamped jitter


# ------------------------------------------------------------ BN statistics pass through


@pytest.mark.parametrize(
    "kind, params",
    [
        ("dp", dict(sigma=1.0, clip=0.5)),
        ("dp_param_noise", dict(sigma=1.0)),
        ("quantize", dict(bits=1)),
        ("quantize", dict(bits=1, variant="official")),
        ("sparsify", dict(fraction=0.9, min_size=0)),
    ],
)
def test_upload_defenses_leave_bn_statistics_unchanged(kind, params):
    u = update_for(LAYOUT) * 3
    up = build(kind, **params).upload(u, LAYOUT, gen(1))
    assert torch.equal(up[BN.slice], u[BN.slice])
    assert not torch.equal(up[BIG.slice], u[BIG.slice])
    assert up.shape == u.shape and up.dtype == u.dtype


# ------------------------------------------------------------------------- bad configs


def test_defense_config_from_dict_keeps_the_parameters():
    cfg = DefenseConfig.from_dict({"kind": "sparsify", "fraction": 0.5}, where="defenses.sp")
    assert cfg.params == {"fraction": 0.5}


# -------------------------------------------------------------------------- end to end


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


def tiny_data(n: int = 40) -> DeviceData:
    g = gen(0)
    images = torch.randint(0, 256, (n, 3, 6, 6), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    return DeviceData.from_arrays(images, labels, [0.5] * 3, [0.25] * 3, 3, torch.device("cpu"))


E2E = [
    ("dp", dict(sigma=0.1, clip=0.01)),
    ("dp_param_noise", dict(sigma=0.01)),
    ("quantize", dict(bits=2)),
    ("quantize", dict(bits=2, variant="official")),
    ("sparsify", dict(fraction=0.5, min_size=0)),
    ("mixup", dict(alpha=1.0)),
    ("mixup", dict(alpha=1.0, variant="official")),
    ("instahide", dict(k=2)),
    ("instahide", dict(k=3)),
    ("subsample", dict(fraction=0.5)),
    ("augment", dict()),
    ("augment", dict(preset="mild")),
    (
        "compose",
        dict(
            steps=[{"kind": "augment"}, {"kind": "subsample", "fraction": 0.5}],
            strength="subsample.fraction",
        ),
    ),
    (
        "compose",
        dict(
            steps=[
                {"kind": "augment", "preset": "mild"},
                {"kind": "instahide", "k": 2},
                {"kind": "sparsify", "fraction": 0.5, "min_size": 0},
            ]
        ),
    ),
]


def one_round(defense, model0: nn.Module) -> tuple[torch.Tensor, FlatState]:
    data = tiny_data()
    client_idx = [torch.arange(0, 16), torch.arange(16, 32)]
    cfg = TrainConfig(rounds=1, local_epochs=1, batch_size=8, lr=0.1)
    st = FlatState(copy.deepcopy(model0))
    recs = list(run_fedavg(st, data, client_idx, torch.arange(32, 40), cfg, defense, seed=0))
    assert len(recs) == 1
    return recs[0].uploads.clone(), st


@pytest.mark.parametrize("kind, params", E2E)
def test_one_fedavg_round_with_each_defense(kind, params):
    model0 = tiny_model()
    base, _ = one_round(build("none"), model0)
    up, st = one_round(build(kind, **params), model0)
    assert up.shape == base.shape and torch.isfinite(up).all()
    assert torch.isfinite(st.flat).all()
    assert not torch.equal(up, base)
    again, _ = one_round(build(kind, **params), model0)
    assert torch.equal(up, again)  # reproducible from the seed
    mask = st.layout.param_mask()
    if kind == "instahide":  # k = 1: exactly as without a defense
        assert torch.equal(one_round(build("instahide", k=1), model0)[0], base)
    if kind in ("quantize", "sparsify"):  # upload-only: BN statistics as without defense
        assert torch.equal(up[:, ~mask], base[:, ~mask])
    if kind == "dp":  # without noise, every client's parameter update is clipped
        clipped, _ = one_round(build("dp", sigma=0, clip=0.01), model0)
        assert (torch.linalg.vector_norm(clipped[:, mask], dim=1) <= 0.01 * (1 + 1e-5)).all()


# ----------------------------------------------------------------------------- compose


class Recorder(Defense):
    """A step that records which hooks ran, in order, and marks what it returns."""

    def __init__(self, name: str, log: list, soft: bool = False, whole: bool = False):
        self.name, self.log, self.soft_targets, self.whole_local_set = name, log, soft, whole

    def local_indices(self, idx, gen):
        self.log.append(("local_indices", self.name))
        return idx[1:]

    def batch(self, x, y, spec, gen):
        self.log.append(("batch", self.name))
        return x + 1, y

    def upload(self, update, layout, gen):
        self.log.append(("upload", self.name))
        return update * 2


def test_compose_runs_each_hook_of_its_steps_in_order():
    log = []
    d = ComposeDefense(
        steps=(Recorder("a", log), Recorder("b", log, soft=True)), step_kinds=("a", "b")
    )
    assert d.soft_targets and not d.whole_local_set
    assert torch.equal(d.local_indices(torch.arange(5), gen()), torch.arange(2, 5))
    x, y = images()
    torch.testing.assert_close(d.batch(x, y, SPEC, gen())[0], x + 2)
    u = update_for(LAYOUT)
    torch.testing.assert_close(d.upload(u, LAYOUT, gen()), u * 4)
    assert log == [
        ("local_indices", "a"),
        ("local_indices", "b"),
        ("batch", "a"),
        ("batch", "b"),
        ("upload", "a"),
        ("upload", "b"),
    ]
    assert ComposeDefense(
        steps=(Recorder("a", log), Recorder("b", log, whole=True)), step_kinds=("a", "b")
    ).whole_local_set


def test_compose_equals_its_steps_applied_one_after_the_other():
    d = build(
        "compose",
        steps=[
            {"kind": "augment"},
            {"kind": "mixup", "alpha": 1.0},
            {"kind": "subsample", "fraction": 0.5},
            {"kind": "sparsify", "fraction": 0.5, "min_size": 0},
            {"kind": "dp", "sigma": 0.1, "clip": 1.0},
        ],
    )
    assert isinstance(d, ComposeDefense) and d.soft_targets and not d.whole_local_set
    assert d.step_kinds == ("augment", "mixup", "subsample", "sparsify", "dp")
    aug, mix, sub, sp, dp = d.steps
    x, y = images(b=16, h=32, w=32)
    g1, g2 = gen(3), gen(3)
    xc, tc = d.batch(x, y, SPEC, g1)
    xa, ya = aug.batch(x, y, SPEC, g2)
    xm, tm = mix.batch(xa, ya, SPEC, g2)
    assert torch.equal(xc, xm) and torch.equal(tc, tm)
    idx = torch.arange(100)
    assert torch.equal(d.local_indices(idx, gen(4)), sub.local_indices(idx, gen(4)))
    u = update_for(LAYOUT)
    assert torch.equal(
        d.upload(u, LAYOUT, gen(5)), dp.upload(sp.upload(u, LAYOUT, gen(5)), LAYOUT, gen(5))
    )


@pytest.mark.parametrize(
    "block, strength",
    [
        ({"kind": "none"}, float("nan")),
        ({"kind": "dp", "sigma": 0.3, "clip": 1.0}, 0.3),
        ({"kind": "augment"}, 4.0),  # the preset's padding, though not written in the block
        ({"kind": "instahide", "k": 3}, 3.0),
        (
            {
                "kind": "compose",
                "steps": [{"kind": "augment"}, {"kind": "subsample", "fraction": 0.25}],
                "strength": "subsample.fraction",
            },
            0.25,
        ),
        (
            {
                "kind": "compose",
                "steps": [
                    {"kind": "augment", "rotation": 30},
                    {"kind": "subsample", "fraction": 0.25},
                ],
                "strength": "0.rotation",
            },
            30.0,
        ),
        (
            {
                "kind": "compose",
                "steps": [
                    {"kind": "subsample", "fraction": 0.5},
                    {"kind": "subsample", "fraction": 0.8},
                ],
                "strength": "1.fraction",
            },
            0.8,
        ),
        (
            {
                "kind": "compose",
                "steps": [{"kind": "sparsify", "fraction": 0.5}],
                "strength": "sparsify.min_size",
            },
            1000.0,
        ),  # a default value
        ({"kind": "compose", "steps": [{"kind": "augment"}]}, float("nan")),
    ],
)
def test_strength_of(block, strength):
    got = strength_of(block)
    assert (math.isnan(got) and math.isnan(strength)) or got == pytest.approx(strength)


@pytest.mark.parametrize(
    "block, params",
    [
        ({"kind": "none"}, ""),
        ({"kind": "mixup", "alpha": 1.0}, ""),
        ({"kind": "mixup", "alpha": 1.0, "variant": "paper"}, ""),  # a default, written out
        ({"kind": "mixup", "alpha": 1.0, "variant": "official"}, "variant=official"),
        ({"kind": "quantize", "bits": 4, "variant": "official"}, "variant=official"),
        ({"kind": "quantize", "bits": 4}, ""),
        ({"kind": "dp", "sigma": 0.3, "clip": 5.0}, "clip=5"),  # required: always named
        ({"kind": "sparsify", "fraction": 0.5, "min_size": 10}, "min_size=10"),
        ({"kind": "augment"}, ""),
        ({"kind": "augment", "padding": 2}, ""),  # the strength
        (
            {"kind": "augment", "preset": "mild", "brightness": 0.25},
            "vflip=false, rotation=0, contrast=0.2, saturation=0.2",
        ),  # against the default preset
        (
            {
                "kind": "compose",
                "steps": [{"kind": "augment"}, {"kind": "subsample", "fraction": 0.25}],
                "strength": "subsample.fraction",
            },
            "augment + subsample",
        ),
        (
            {
                "kind": "compose",
                "steps": [
                    {"kind": "augment"},
                    {"kind": "mixup", "alpha": 0.5, "variant": "official"},
                ],
            },
            "augment + mixup(alpha=0.5, variant=official)",
        ),
    ],
)
def test_params_of_names_what_is_not_the_strength_nor_a_default(block, params):
    assert params_of(block) == params


def test_compose_with_instahide_encodes_the_whole_local_set():
    d = build("compose", steps=[{"kind": "augment"}, {"kind": "instahide", "k": 2}])
    assert d.whole_local_set and d.soft_targets
    base, _ = one_round(build("none"), tiny_model())
    up, st = one_round(d, tiny_model())
    assert torch.isfinite(up).all() and not torch.equal(up, base)
