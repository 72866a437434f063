"""The one-shot empirical privacy estimate (Andrew et al., ICLR 2024): fedmia.privacy.oneshot,
the canary clients of run_fedavg and the oneshot stage."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import integrate, optimize, stats
from scipy.stats import norm
from torch import nn

from conftest import TINY_CELL, TINY_PART, TINY_TRAIN
from fedmia.core.config import ConfigError, Participation, PrivacyConfig, TrainConfig
from fedmia.federation.defenses import Defense, DPDefense, defense_from_config, param_mask
from fedmia.federation.fedavg import (
    Canaries,
    DeviceData,
    canary_clip,
    canary_cosines,
    participants,
    run_fedavg,
)
from fedmia.federation.state import FlatState
from fedmia.privacy import oneshot as est
from fedmia.stages.oneshot import oneshot


def gdp_delta(eps: float, mu: float) -> float:
    """Gaussian DP's closed form: δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2)."""
    return norm.cdf(-eps / mu + mu / 2) - math.exp(eps + norm.logcdf(-eps / mu - mu / 2))


def gdp_epsilon(delta: float, mu: float) -> float:
    """ε of μ-GDP at δ, by root finding on the closed form."""
    top = mu * mu / 2 + 20 * mu + 20
    return optimize.brentq(lambda e: gdp_delta(e, mu) - delta, 0.0, top, xtol=1e-12)


def integrated_delta(eps, mu0, s0, mu1, s1) -> float:
    """δ(ε) by numerical integration of max(0, p − e^ε q), both orders (the slow reference)."""
    lo = min(mu0 - 40 * s0, mu1 - 40 * s1)
    hi = max(mu0 + 40 * s0, mu1 + 40 * s1)
    out = 0.0
    for (ma, sa), (mb, sb) in (((mu1, s1), (mu0, s0)), ((mu0, s0), (mu1, s1))):

        def f(x, ma=ma, sa=sa, mb=mb, sb=sb):
            return max(0.0, norm.pdf(x, ma, sa) - math.exp(eps) * norm.pdf(x, mb, sb))

        pts = np.linspace(lo, hi, 21)
        parts = zip(pts[:-1], pts[1:], strict=True)
        out = max(out, sum(integrate.quad(f, a, b, epsabs=1e-13)[0] for a, b in parts))
    return out


@pytest.mark.parametrize("mu", [0.05, 0.3, 1.0, 2.5, 6.0])
@pytest.mark.parametrize("eps", [0.0, 0.2, 1.0, 4.0, 12.0])
def test_equal_variances_give_gaussian_dp_s_closed_form(mu, eps):
    want = gdp_delta(eps, mu)
    for mu0, sigma in ((0.0, 1.0), (3.0, 0.01), (-2.0, 7.0)):  # shifted and scaled alike
        got = est.gaussian_delta(eps, mu0, sigma, mu0 + mu * sigma, sigma)
        assert got == pytest.approx(want, rel=1e-9, abs=1e-300)
        # and with the order of the two Gaussians swapped
        assert est.gaussian_delta(eps, mu0 + mu * sigma, sigma, mu0, sigma) == pytest.approx(
            want, rel=1e-9, abs=1e-300
        )


@pytest.mark.parametrize(
    "mu0, s0, mu1, s1", [(0, 1, 1, 1.5), (0, 1, 2, 0.6), (0.1, 0.02, 0.13, 0.05), (0, 1, 0, 2)]
)
@pytest.mark.parametrize("eps", [0.0, 0.5, 2.0])
def test_unequal_variances_match_numerical_integration(mu0, s0, mu1, s1, eps):
    got = est.gaussian_delta(eps, mu0, s0, mu1, s1)
    assert got == pytest.approx(integrated_delta(eps, mu0, s0, mu1, s1), rel=1e-6, abs=1e-10)


def test_epsilon_inverts_the_closed_form_and_grows_with_mu():
    delta = 1e-5
    eps = []
    for mu in (0.1, 0.5, 1.0, 2.0, 4.0, 8.0):
        e = est.gaussian_epsilon(delta, 0.0, 1.0, mu, 1.0)
        assert e == pytest.approx(gdp_epsilon(delta, mu), rel=1e-7)
        assert est.gaussian_delta(e, 0.0, 1.0, mu, 1.0) <= delta
        eps.append(e)
    assert all(a < b for a, b in zip(eps[:-1], eps[1:], strict=True))
    assert est.gaussian_epsilon(delta, 0.0, 1.0, 0.0, 1.0) == 0.0  # the same Gaussian
    assert est.gaussian_epsilon(delta, 0.0, 1.0, 1.0, 0.0) == math.inf  # a point mass
    assert est.gaussian_epsilon(delta, 0.0, 1.0, 600.0, 1.0) == pytest.approx(
        gdp_epsilon(delta, 600.0), rel=1e-6
    )  # far in the tails
    with pytest.raises(ValueError, match="delta must be in"):
        est.gaussian_epsilon(0.0, 0.0, 1.0, 1.0, 1.0)


def test_directions_are_seeded_unit_and_independent():
    a = est.canary_directions(5, 3000, seed=1)
    assert a.dtype == torch.float32 and a.shape == (5, 3000)
    torch.testing.assert_close(torch.linalg.vector_norm(a, dim=1), torch.ones(5))
    assert torch.equal(est.canary_directions(3, 3000, seed=1), a[:3])  # row j: its own key
    assert not torch.equal(est.canary_directions(5, 3000, seed=2), a)
    null = est.canary_directions(5, 3000, seed=1, kind=est.NULL)
    assert (null @ a.T).abs().max() < 0.1  # independent of the inserted ones


def test_null_canaries_cosines_are_normal_with_variance_one_over_d():
    d, m = 4000, 3000
    rng = np.random.default_rng(0)
    delta = torch.from_numpy(rng.standard_normal(d).astype(np.float32) * np.linspace(0, 3, d))
    cos = canary_cosines(est.canary_directions(m, d, 7, est.NULL), delta)
    c = cos.double().numpy() * math.sqrt(d)  # ~ N(0, 1)
    assert abs(c.mean()) < 4 / math.sqrt(m)
    assert c.var() == pytest.approx(1.0, abs=5 * math.sqrt(2 / m))
    assert stats.kstest(c, "norm").pvalue > 1e-3
    assert torch.isnan(canary_cosines(torch.ones(2, 3) / 3**0.5, torch.zeros(3))).all()


@pytest.mark.parametrize("sigma", [0.7, 1.5])
def test_known_answer_gaussian_mechanism(sigma):
    """A synthetic federation: the model delta is the n canaries' updates C·u_j plus N(0, σ²C²
    I). Canary c's projection on u_c is C plus noise of std C·√(σ² + (n − 1)/d) (the others'
    C·u_j·u_c are N(0, C²/d) each): a Gaussian mechanism of sensitivity C, μ-GDP with
    μ = 1/√(σ² + (n − 1)/d). The estimate (final model and, with one round, all iterates)
    gives that mechanism's ε, within what n canaries can tell."""
    d, n, m, c, delta = 20_000, 1000, 1000, 2.0, 1e-5
    u = est.canary_directions(n, d, seed=3)
    noise = torch.randn(d, generator=torch.Generator().manual_seed(4))
    model_delta = c * u.sum(0) + sigma * c * noise
    cos = canary_cosines(u, model_delta).numpy()
    mu = 1 / math.sqrt(sigma**2 + (n - 1) / d)
    want = gdp_epsilon(delta, mu)
    final = est.estimate_final(cos, d, delta)
    assert final["null_std"] == 1 / math.sqrt(d)
    # the fitted Gaussian in the null's units: N(μ, 1), within 4 standard errors
    assert final["mean"] * math.sqrt(d) == pytest.approx(mu, abs=4 / math.sqrt(n))
    assert final["std"] * math.sqrt(d) == pytest.approx(1, abs=4 / math.sqrt(2 * n))
    assert final["epsilon"] == pytest.approx(want, rel=0.2)
    null = canary_cosines(est.canary_directions(m, d, 3, est.NULL), model_delta)
    one_round = est.max_over_rounds(np.concatenate([cos, null.numpy()])[None])
    iterates = est.estimate_all_iterates(one_round[:n], one_round[n:], delta)
    assert iterates["epsilon"] == pytest.approx(want, rel=0.25)
    # more noise, a smaller ε
    more = torch.randn(d, generator=torch.Generator().manual_seed(5))
    weaker = model_delta + 2 * sigma * c * more
    cos3 = canary_cosines(u, weaker).numpy()
    assert est.estimate_final(cos3, d, delta)["epsilon"] < 0.6 * final["epsilon"]


def test_the_final_null_needs_a_large_model():
    with pytest.raises(ValueError, match="needs d ≥ 1000"):
        est.estimate_final([0.1, 0.2, 0.3], 999, 1e-5)
    with pytest.raises(ValueError, match="at least 2 finite"):
        est.estimate_final([0.1], 5000, 1e-5)


def test_one_shot_config_defaults_and_bounds():
    p = PrivacyConfig.from_dict({})
    assert (p.one_shot.canaries, p.one_shot.null_canaries, p.one_shot.enabled) == (0, 100, False)
    assert PrivacyConfig.from_dict({"one_shot": {"canaries": 5}}).one_shot.enabled
    for bad in ({"canaries": 1}, {"canaries": -1}, {"null_canaries": 1}, {"nulls": 3}):
        with pytest.raises(ConfigError, match="privacy.one_shot"):
            PrivacyConfig.from_dict({"one_shot": bad})


# ------------------------------------------------------------------- canary clients


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)
    )


def small_data(n: int = 40) -> DeviceData:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 6, 6), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    return DeviceData.from_arrays(images, labels, [0.5] * 3, [0.25] * 3, 3, torch.device("cpu"))


CLIENTS = [torch.arange(0, 6), torch.arange(6, 20), torch.arange(20, 30)]  # sizes 6, 14, 10


def run(cfg: TrainConfig, defense: Defense, canaries: Canaries | None, seed: int = 3):
    st = FlatState(small_model())
    recs = []
    for r in run_fedavg(
        st, small_data(), CLIENTS, torch.arange(30, 40), cfg, defense, seed, canaries=canaries
    ):
        recs.append(dict(sent=r.global_flat.clone(), uploads=r.uploads.clone(), rec=r))
    return st, recs


def make_canaries(st_dim: int, n: int, m: int, seed: int = 3) -> Canaries:
    u = [est.canary_directions(n, st_dim, seed), est.canary_directions(m, st_dim, seed, est.NULL)]
    return Canaries(torch.cat(u), inserted=n)


def dim() -> int:
    return int(FlatState(small_model()).layout.param_mask().sum())


def test_no_inserted_canary_leaves_training_unchanged():
    cfg = TrainConfig(rounds=3, batch_size=4, lr=0.1, participation={"fraction": 0.67})
    a, ra = run(cfg, Defense(), None)
    b, rb = run(cfg, Defense(), make_canaries(dim(), 0, 6))
    assert torch.equal(a.flat, b.flat)
    for x, y in zip(ra, rb, strict=True):
        assert torch.equal(x["uploads"], y["uploads"])
        assert x["rec"].participants == y["rec"].participants
        assert x["rec"].canary_round is None and y["rec"].canary_round.shape == (6,)


@pytest.mark.parametrize("sampling", ["uniform", "poisson"])
def test_canaries_are_clients_drawn_weighted_and_clipped_like_the_others(sampling):
    """dp (σ = 0, C = 0.3): a canary's upload is C·u on the parameters, 0 on BN statistics;
    participants are drawn over K + n clients; equal weights count the canaries."""
    k, n = 3, 2
    part = {"fraction": 0.6, "sampling": sampling}
    cfg = TrainConfig(rounds=4, batch_size=4, lr=0.1, participation=part)
    can = make_canaries(dim(), n, 4)
    st, recs = run(cfg, DPDefense(sigma=0.0, clip=0.3), can)
    mask = param_mask(st.layout, "cpu")
    seen = set()
    for rnd, x in enumerate(recs, 1):
        rec = x["rec"]
        assert rec.participants == participants(Participation(**part), 3, rnd, k + n).tolist()
        for i, c in enumerate(rec.participants):
            if c >= k:
                seen.add(c)
                row = x["uploads"][i]
                torch.testing.assert_close(row[mask], 0.3 * can.directions[c - k])
                assert torch.equal(row[~mask], torch.zeros(int((~mask).sum())))
                assert math.isnan(rec.client_loss[i])
        denom = 0.6 * (k + n) if sampling == "poisson" else len(rec.participants)
        assert rec.weights == [pytest.approx(1 / denom)] * len(rec.participants)
        nxt = recs[rnd]["sent"] if rnd < len(recs) else st.flat
        want = x["sent"] - torch.tensor(rec.weights) @ x["uploads"]
        torch.testing.assert_close(nxt, want)
        torch.testing.assert_close(
            rec.canary_round, canary_cosines(can.directions, (x["sent"] - nxt)[mask])
        )
    assert seen  # some canary took part


def test_unclipped_canaries_take_the_median_update_norm_and_the_median_size():
    cfg = TrainConfig(rounds=2, batch_size=4, lr=0.1)
    can = make_canaries(dim(), 2, 2)
    st, recs = run(cfg, Defense(), can)
    mask = param_mask(st.layout, "cpu")
    for x in recs:
        norms = torch.linalg.vector_norm(x["uploads"][:, mask], dim=1)
        median = float(torch.median(norms[:3]))  # the real uploads are the updates (none)
        torch.testing.assert_close(norms[3:], torch.full((2,), median))
        assert x["rec"].num_samples == [6, 14, 10, 10, 10]
        w = np.array([6, 14, 10, 10, 10]) / 50
        assert x["rec"].weights == pytest.approx(w.tolist())


def test_dp_noises_a_canary_as_any_upload():
    cfg = TrainConfig(rounds=1, batch_size=4, lr=0.1)
    can = make_canaries(dim(), 2, 0)
    sigma, clip = 0.5, 0.2
    st, recs = run(cfg, DPDefense(sigma=sigma, clip=clip), can)
    mask = param_mask(st.layout, "cpu")
    noise = recs[0]["uploads"][3:][:, mask] - clip * can.directions
    assert float(noise.std()) == pytest.approx(sigma * clip, rel=0.15)


@pytest.mark.parametrize(
    "block, clip",
    [
        ({"kind": "none"}, None),
        ({"kind": "dp", "sigma": 0.5, "clip": 2.0}, 2.0),
        ({"kind": "dp_param_noise", "sigma": 0.1}, None),
        (
            {
                "kind": "compose",
                "steps": [{"kind": "augment"}, {"kind": "dp", "sigma": 1, "clip": 3}],
            },
            3.0,
        ),
    ],
)
def test_canary_clip(block, clip):
    assert canary_clip(defense_from_config(block)) == clip


# ------------------------------------------------------------------- the stage


def test_the_stage_on_a_tiny_cell(train_cell, digits_files, tmp_path):
    """A tiny digits cell trained, then again with 4 canaries: every key of the result,
    inserted canaries above the null, the cell's own accuracy as "without"."""
    out = train_cell(tmp_path / "cell", TINY_PART, TINY_TRAIN, TINY_CELL)
    target = tmp_path / "oneshot.json"
    kw = dict(
        data=digits_files,
        partition_file=tmp_path / "cell" / "partition.parquet",
        manifest_file=out["manifest"],
        model={"kind": TINY_CELL["model"]},
        defense={"kind": "none"},
        train_cfg=TINY_TRAIN,
        cell=TINY_CELL,
        one_shot={"canaries": 4, "null_canaries": 8},
        delta=1e-5,
        device="cpu",
        threads=1,
        output=target,
    )
    oneshot(**kw)
    res = json.loads(target.read_text())
    keys = {
        "format", "canaries", "null_canaries", "dim", "delta", "final", "all_iterates",
        "test_accuracy_with_canaries", "test_accuracy_without", "estimate", "applies_to",
    }  # fmt: skip
    assert keys <= set(res)
    assert res["format"] == "oneshot/1" and res["estimate"] == est.ESTIMATE
    assert set(res["final"]) == {"mean", "std", "null_std", "epsilon"}
    assert set(res["all_iterates"]) == {"mean", "std", "null_mean", "null_std", "epsilon"}
    assert (res["canaries"], res["null_canaries"], res["delta"]) == (4, 8, 1e-5)
    assert res["final"]["mean"] > 10 * res["final"]["null_std"]
    assert res["all_iterates"]["mean"] > res["all_iterates"]["null_mean"]
    manifest = json.loads(out["manifest"].read_text())
    assert res["test_accuracy_without"] == manifest["final_test_accuracy"]
    assert 0 <= res["test_accuracy_with_canaries"] <= 1
    assert res["canary_scale"] == "median_update_norm" and res["num_clients"] == 3
    assert res["privacy"] is None  # no mechanism
    with pytest.raises(ValueError, match="canaries is 0"):
        oneshot(**{**kw, "one_shot": {"canaries": 0}})
