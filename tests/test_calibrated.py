"""LiRA and RMIA from the server's view, against slow references written from the papers.

* FedMIA-I is LiRA on the loss with the mean, the per-sample variance and ddof 0: equal;
* LiRA's OUT Gaussian (mean or median; per-sample, pooled or limma-shrunk variance) and
  RMIA's likelihood ratio and population fraction, each against a loop over references
  and samples (RMIA in probability space, the fast code in log space);
* cross-fitting: every slot scored, against the other half's held-out slots only;
* the Neyman–Pearson case: a standardized shift c for every member, R independent
  rounds, 200 references: the summed-z attack reaches TPR(α) = 1 − Φ(z_{1−α} − c√R).
"""

from __future__ import annotations

import math
import statistics

import numpy as np
import pandas as pd
import pytest
from scipy import optimize, special
from scipy.stats import norm

from fedmia.attacker import calibrated
from fedmia.attacker.attacks import (
    ATTACKS,
    AttackSpec,
    MeasureCube,
    OfficialProtocol,
    Slots,
    aligned_slots,
    attack_scores,
    official_slots,
    owner_array,
    rmia_halves,
    run_attacks,
    score_slots,
)
from fedmia.attacker.calibrated import LiraOptions, RmiaOptions
from fedmia.attacker.metrics import roc_auc, tpr_at_fpr
from fedmia.attacker.uncertainty import bootstrap_replicates
from test_attacks import world

#: LiRA on the loss: FedMIA-I's statistic under LiRA's kind (not a registered attack).
LIRA_LOSS = AttackSpec("lira_loss", "loss", -1, "lira", "")
FEDMIA_LIKE = LiraOptions(variance="per_sample", location="mean", ddof=0)


# ------------------------------------------------------------------ FedMIA-I is a LiRA


def test_lira_with_fedmias_choices_is_fedmia_i_bit_for_bit():
    mdm, owner = world(separation=0.4, k=6, seed=3)
    for target in range(6):
        fed = attack_scores("fedmia_loss", mdm, target)
        lira = attack_scores(LIRA_LOSS, mdm, target, lira=FEDMIA_LIKE)
        np.testing.assert_array_equal(lira["score"].to_numpy(), fed["score"].to_numpy())
    # and under the official protocol's slots with self_mix = false (weighted references)
    cube = MeasureCube.from_frame(mdm, ["loss"])
    own = owner_array(cube, owner)
    sl = official_slots(
        own, 2, len(cube.rounds), cube.clients, OfficialProtocol(self_mix=False, seed=1), draw=0
    )
    x = -np.take_along_axis(cube.values["loss"], sl.index, axis=-1)
    every = np.ones(len(cube.rounds), dtype=bool)
    fed = score_slots(ATTACKS.get("fedmia_loss"), [x], 2, every, ref_weights=sl.ref_weights)
    lira = score_slots(LIRA_LOSS, [x], 2, every, ref_weights=sl.ref_weights, lira=FEDMIA_LIKE)
    np.testing.assert_array_equal(lira, fed)
    # the other choices differ (the equality is not vacuous)
    other = attack_scores(LIRA_LOSS, mdm, 0, lira=LiraOptions(variance="pooled", ddof=0))
    assert not np.allclose(other["score"], attack_scores("fedmia_loss", mdm, 0)["score"])


# -------------------------------------------------------------- LiRA, slow reference


def slow_prior(s2: list[float], d: list[float]) -> tuple[float, float]:
    """limma's fitFDist written out, the trigamma inverted by bracketing (not Newton)."""
    m = statistics.median(s2)
    s2 = [max(v, 1e-5 * m) for v in s2]
    e = [math.log(v) - special.digamma(k / 2) + math.log(k / 2) for v, k in zip(s2, d, strict=True)]
    emean = sum(e) / len(e)
    evar = sum((v - emean) ** 2 for v in e) / (len(e) - 1)
    evar -= sum(special.polygamma(1, k / 2) for k in d) / len(d)
    if evar <= 0:
        return math.inf, sum(s2) / len(s2)
    half = optimize.brentq(
        lambda y: special.polygamma(1, y) - evar, 1e-8, 1e8, xtol=1e-14, rtol=1e-14
    )
    d0 = 2 * half
    return d0, math.exp(emean + special.digamma(d0 / 2) - math.log(d0 / 2))


def slow_lira(x: np.ndarray, t: int, options: LiraOptions, weights=None) -> np.ndarray:
    """z of every (round, slot): loops over rounds, slots and reference clients."""
    r_n, k_n, s_n = x.shape
    z = np.empty((r_n, s_n))
    for r in range(r_n):
        refs = [
            [x[r, k, s] for k in range(k_n) if k != t and (weights is None or weights[r, k, s])]
            for s in range(s_n)
        ]
        means = [sum(v) / len(v) for v in refs]
        ss = [sum((a - mu) ** 2 for a in v) for v, mu in zip(refs, means, strict=True)]
        if options.variance == "per_sample":
            var = [q / max(len(v) - options.ddof, 1) for q, v in zip(ss, refs, strict=True)]
        elif options.variance == "pooled":
            pooled = sum(ss) / sum(max(len(v) - options.ddof, 1) for v in refs)
            var = [pooled] * s_n
        else:
            d = [len(v) - 1 for v in refs]
            # a slot with one reference value (d = 0) is not in the prior's fit
            fit = [(q / k, k) for q, k in zip(ss, d, strict=True) if k > 0]
            d0, s0 = slow_prior([f[0] for f in fit], [f[1] for f in fit])
            var = [
                s0 if math.isinf(d0) else (d0 * s0 + q) / (d0 + k)
                for q, k in zip(ss, d, strict=True)
            ]
        for s in range(s_n):
            mu = means[s] if options.location == "mean" else statistics.median(refs[s])
            z[r, s] = (x[r, t, s] - mu) / math.sqrt(var[s] + options.var_floor)
    return z


@pytest.mark.parametrize("variance", calibrated.VARIANCE_RULES)
@pytest.mark.parametrize("location", calibrated.LOCATIONS)
@pytest.mark.parametrize("ddof", [0, 1])
def test_lira_against_a_slow_reference(variance, location, ddof):
    rng = np.random.default_rng(7)
    r_n, k_n, s_n = 3, 6, 40
    # per-sample spreads that differ (a log-normal scale), so that shrinkage has work
    x = rng.normal(size=(r_n, 1, s_n)) + rng.lognormal(0, 0.7, (r_n, 1, s_n)) * rng.normal(
        size=(r_n, k_n, s_n)
    )
    options = LiraOptions(variance=variance, location=location, ddof=ddof)
    want = slow_lira(x, 2, options)
    others = [k for k in range(k_n) if k != 2]
    got = calibrated.lira_z(x[:, 2], x[:, others], options=options)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    every = np.ones(r_n, dtype=bool)
    mean = score_slots(AttackSpec("m", "cos", 1, "lira", ""), [x], 2, every, lira=options)
    summed = score_slots(
        AttackSpec("s", "cos", 1, "lira", "", combine="sum"), [x], 2, every, lira=options
    )
    np.testing.assert_allclose(mean[0], norm.cdf(want).mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(summed[0], want.sum(axis=0), rtol=1e-9, atol=1e-12)


def test_lira_weights_leave_reference_values_out():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 5, 30))
    w = rng.random((2, 5, 30)) > 0.3
    w[:, :, :] |= np.arange(5)[None, :, None] == 0  # every slot keeps a reference
    others = [0, 1, 3, 4]
    for options in (LiraOptions(), LiraOptions(variance="per_sample", location="median")):
        got = calibrated.lira_z(x[:, 2], x[:, others], weights=w[:, others], options=options)
        np.testing.assert_allclose(got, slow_lira(x, 2, options, weights=w), rtol=1e-9)


def test_shrinkage_between_the_per_sample_and_the_pooled_variance():
    rng = np.random.default_rng(4)
    ref = rng.lognormal(0, 1, (1, 1, 300)) * rng.normal(size=(1, 9, 300))
    per = calibrated.out_gaussian(ref, options=LiraOptions(variance="per_sample"))[1]
    shrunk = calibrated.out_gaussian(ref, options=LiraOptions())[1]
    d0, s0 = calibrated.fit_variance_prior(ref.var(axis=1, ddof=1)[0], np.full(300, 8.0))
    assert 0 < d0 < math.inf  # the spreads differ: a finite prior
    lo, hi = np.minimum(per, s0), np.maximum(per, s0)  # between s² (d = 8) and the prior's
    assert ((shrunk >= lo - 1e-12) & (shrunk <= hi + 1e-12)).all()
    np.testing.assert_allclose(shrunk - 1e-8, (d0 * s0 + 8 * (per - 1e-8)) / (d0 + 8), rtol=1e-10)
    # every slot with the same spread: no excess spread of log s², d0 = ∞, the pooled value
    same = np.repeat(rng.normal(size=(1, 9, 1)), 50, axis=-1) + rng.normal(size=(1, 1, 50))
    flat = calibrated.out_gaussian(same, options=LiraOptions())[1]
    assert (
        calibrated.fit_variance_prior(same.var(axis=1, ddof=1)[0], np.full(50, 8.0))[0] == math.inf
    )
    np.testing.assert_allclose(
        flat,
        calibrated.out_gaussian(same, options=LiraOptions(variance="pooled", ddof=1))[1],
        rtol=1e-12,
    )


def test_trigamma_inverse():
    for y in (1e-4, 0.01, 0.3, 1.0, 7.0, 250.0, 1e5):
        x = float(special.polygamma(1, y))
        assert calibrated.trigamma_inverse(x) == pytest.approx(y, rel=1e-6)


def test_the_combined_attack_sums_the_z_of_both_measures():
    mdm, owner = world(separation=0.3, seed=4)
    both = attack_scores("lira_conf_cos_sum", mdm, 1)["score"].to_numpy()
    conf = attack_scores("lira_conf_sum", mdm, 1)["score"].to_numpy()
    cos = attack_scores("lira_cos_sum", mdm, 1)["score"].to_numpy()
    np.testing.assert_allclose(both, conf + cos, rtol=1e-12, atol=1e-12)
    mean = AttackSpec("mean2", "logit_conf", 1, "lira", "", also=(("cos", 1),))
    m = attack_scores(mean, mdm, 1)["score"].to_numpy()
    np.testing.assert_allclose(
        m,
        (
            attack_scores("lira_conf", mdm, 1)["score"].to_numpy()
            + attack_scores("lira_cos", mdm, 1)["score"].to_numpy()
        )
        / 2,
        rtol=1e-12,
    )


# ---------------------------------------------------------------------------- RMIA


def slow_rmia(
    logp: np.ndarray,
    t: int,
    population: np.ndarray,
    halves: np.ndarray,
    a: float,
    gamma: float,
    combine: str,
) -> np.ndarray:
    """RMIA's definitions in probability space, a loop over references, samples and z."""
    r_n, k_n, s_n = logp.shape
    lr = np.empty((r_n, s_n))
    for r in range(r_n):
        for s in range(s_n):
            refs = [math.exp(logp[r, k, s]) for k in range(k_n) if k != t]
            pr_x = 0.5 * ((1 + a) * sum(refs) / len(refs) + (1 - a))
            lr[r, s] = math.exp(logp[r, t, s]) / pr_x
    stats = [lr[r] for r in range(r_n)] if combine == "mean" else [np.prod(lr, axis=0)]
    out = np.zeros(s_n)
    for values in stats:
        for i in range(s_n):
            pop = [j for j in range(s_n) if population[j] and halves[j] != halves[i]]
            out[i] += sum(values[i] / values[j] >= gamma for j in pop) / len(pop)
    return out / len(stats)


@pytest.mark.parametrize("a", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("gamma", [1.0, 2.0])
@pytest.mark.parametrize("combine", ["mean", "sum"])
def test_rmia_against_a_slow_reference(a, gamma, combine):
    rng = np.random.default_rng(11)
    r_n, k_n, s_n = 3, 5, 60
    logp = -rng.exponential(1.0, (r_n, k_n, s_n))
    population = rng.random(s_n) < 0.6
    halves = calibrated.crossfit_halves(s_n, 5)
    spec = AttackSpec("r", "loss", -1, "rmia", "", combine=combine)
    got = score_slots(
        spec,
        [logp],
        1,
        np.ones(r_n, dtype=bool),
        rmia=RmiaOptions(a, gamma),
        population=population,
        halves=halves,
    )[0]
    np.testing.assert_allclose(
        got, slow_rmia(logp, 1, population, halves, a, gamma, combine), rtol=0, atol=1e-12
    )


def test_rmia_fraction_is_a_sort_and_a_search():
    rng = np.random.default_rng(0)
    x, z = rng.normal(size=500), rng.normal(size=300)
    z[:10] = x[:10]  # exact ties count: LR(x) / LR(z) = 1 ≥ γ = 1
    want = [(np.exp(xi - z) >= 1.0).mean() for xi in x]
    np.testing.assert_array_equal(calibrated.rmia_fraction(x, z, 1.0), want)
    with pytest.raises(ValueError, match="non-empty population"):
        calibrated.rmia_fraction(x, z[:0])


def test_crossfitting_scores_every_slot_against_the_other_half_only():
    rng = np.random.default_rng(3)
    llr = rng.normal(size=200)
    population = rng.random(200) < 0.5
    halves = calibrated.crossfit_halves(200, 9)
    got = calibrated.crossfit_rmia(llr, population, halves)
    assert np.isfinite(got).all() and len(got) == 200  # no sample lost
    for i in range(200):
        other = population & (halves != halves[i])
        assert got[i] == (llr[other] <= llr[i]).mean()
    # a change in a same-half population slot moves no score of that half
    same = np.flatnonzero(population & halves)[0]
    moved = llr.copy()
    moved[same] += 100.0
    again = calibrated.crossfit_rmia(moved, population, halves)
    keep = halves & (np.arange(200) != same)
    np.testing.assert_array_equal(again[keep], got[keep])
    with pytest.raises(ValueError, match="without a held-out population .* eval_nonmembers"):
        calibrated.crossfit_rmia(llr, population & halves, halves)


def test_crossfitting_coins_do_not_depend_on_membership():
    own = np.r_[np.repeat([0, 1, 2], 10), np.full(30, -1)]
    a, b = aligned_slots(own, 0), aligned_slots(own, 1)
    assert (a.is_member != b.is_member).any()
    np.testing.assert_array_equal(
        rmia_halves(a, ("k", "aligned", 0, 7)), rmia_halves(b, ("k", "aligned", 0, 7))
    )
    relabelled = Slots(a.index, ~a.is_member, a.group)
    np.testing.assert_array_equal(rmia_halves(relabelled, ("x",)), rmia_halves(a, ("x",)))
    halves = rmia_halves(a, ("k", "aligned", 0, 0))
    assert 0.3 < halves.mean() < 0.7  # a fair coin
    assert (halves != rmia_halves(a, ("k", "aligned", 0, 1))).any()  # seeded by the keys


def test_rmia_in_run_attacks_equals_attack_scores_and_the_slow_reference():
    mdm, owner = world(separation=0.5, k=4, per_client=15, held_out=40, seed=6)
    res = run_attacks(
        ["rmia", "rmia_sum"],
        mdm,
        owner,
        targets=[2],
        protocols=["aligned"],
        n_boot=0,
        rmia=RmiaOptions(a=0.5),
    )
    cube = MeasureCube.from_frame(mdm, ["loss"])
    own = owner_array(cube, owner)
    slots = aligned_slots(own, 2)
    halves = rmia_halves(slots, (0, "aligned", 0, 2))
    for name, combine in (("rmia", "mean"), ("rmia_sum", "sum")):
        sc = attack_scores(name, mdm, 2, owner=owner, rmia=RmiaOptions(a=0.5))
        want = slow_rmia(-cube.values["loss"], 2, own == -1, halves, 0.5, 1.0, combine)
        np.testing.assert_allclose(sc["score"].to_numpy(), want, atol=1e-12)
        assert res[name]["auc"].iloc[0] == pytest.approx(roc_auc(want, own == 2))


def test_rmia_needs_the_loss_and_a_population():
    with pytest.raises(
        ValueError,
        match=r"RMIA's signal is log p_y = −loss: give "
        r"measure='loss', sign=-1 .* not defined",
    ):
        AttackSpec("rmia_cos", "cos", 1, "rmia", "")
    with pytest.raises(
        ValueError,
        match=r"combine must be one of \['mean', 'sum'\], and "
        r"'mean' unless the kind is one of",
    ):
        AttackSpec("s", "cos", 1, "series", "", combine="sum")
    with pytest.raises(ValueError, match="only a 'lira' attack combines further signals"):
        AttackSpec("f", "cos", 1, "fedmia", "", also=(("loss", -1),))
    mdm, _ = world(0.3)
    with pytest.raises(ValueError, match="needs owner: its population is the held-out"):
        attack_scores("rmia", mdm, 0)


# ---------------------------------------------------------------- held-out protocol


def test_heldout_protocol_is_aligned_on_the_held_out_non_members():
    mdm, owner = world(separation=0.4, k=4, per_client=20, held_out=120, seed=8)
    names = ["loss", "fedmia_cos", "lira_conf"]
    opts = dict(n_boot=0, lira=LiraOptions(variance="per_sample"))
    held = run_attacks(names, mdm, owner, protocols=["heldout"], **opts)
    for target in range(4):
        keep = owner.index[(owner == target) | (owner == -1)]
        sub = run_attacks(
            names,
            mdm[mdm.sample_id.isin(keep)],
            owner.loc[keep],
            targets=[target],
            protocols=["aligned"],
            **opts,
        )
        for name in names:
            h = held[name][held[name].target == target].reset_index(drop=True)
            cols = ["round", "auc", "tpr@10%", "n_members", "n_nonmembers"]
            pd.testing.assert_frame_equal(h[cols], sub[name][cols])
            assert (h["n_nonmembers"] == 120).all()


# ------------------------------------------------------- the Neyman–Pearson case


def test_summed_z_reaches_the_neyman_pearson_roc():
    """Members shifted by c σ in each of R independent rounds; 200 references per sample.

    Σ_r z_r is N(cR, R) for members and N(0, R) for non-members, so the ROC of the
    summed z is the Neyman–Pearson ROC TPR(α) = 1 − Φ(z_{1−α} − c√R) and AUC Φ(c√R/√2)
    (up to the estimation noise of μ and σ from 200 references). Tolerance: AUC ± 0.01,
    TPR@1 % within 3 bootstrap standard errors. Averaging Φ(z) instead loses power.
    """
    rng = np.random.default_rng(2024)
    r_n, refs, members, nonmembers = 2, 200, 10_000, 10_000
    c = 1 / math.sqrt(r_n)  # c√R = 1
    n = members + nonmembers
    mu = rng.normal(size=(r_n, 1, n))
    sigma = rng.lognormal(0.0, 0.5, (r_n, 1, n))
    x = mu + sigma * rng.normal(size=(r_n, refs + 1, n))  # client 0 is the target
    is_member = np.arange(n) < members
    x[:, 0, is_member] += c * sigma[:, 0, is_member]
    every = np.ones(r_n, dtype=bool)
    summed = score_slots(ATTACKS.get("lira_conf_sum"), [x], 0, every)[0]
    shift = c * math.sqrt(r_n)
    assert roc_auc(summed, is_member) == pytest.approx(norm.cdf(shift / math.sqrt(2)), abs=0.01)
    tpr = tpr_at_fpr(summed, is_member, 0.01)
    se = float(
        np.std(bootstrap_replicates(summed, is_member, n_boot=200, seed=1)["tpr@1%"], ddof=1)
    )
    want = 1 - norm.cdf(norm.ppf(0.99) - shift)
    assert abs(tpr - want) <= 3 * se, (tpr, want, se)
    averaged = score_slots(ATTACKS.get("lira_conf"), [x], 0, every)[0]
    assert roc_auc(averaged, is_member) <= roc_auc(summed, is_member) + 0.002
