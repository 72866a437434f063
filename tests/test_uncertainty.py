from __future__ import annotations

import hashlib
import math
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from fedmia.attacker import metrics, uncertainty
from fedmia.attacker.uncertainty import (
    bootstrap_replicates,
    false_positives_at,
    mean_interval,
    percentile_interval,
    resample_weights,
    stable_seed,
    two_stage_interval,
)

ALPHAS = (0.001, 0.01, 0.05, 0.1, 0.3)


def random_case(seed: int, n_pos: int = 80, n_neg: int = 320, ties: bool = False, d: float = 1.0):
    rng = np.random.default_rng(seed)
    is_member = rng.permutation(np.r_[np.ones(n_pos, bool), np.zeros(n_neg, bool)])
    scores = rng.normal(size=n_pos + n_neg) + d * is_member
    if ties:
        scores = np.round(scores * 2) / 2  # a dozen distinct values, many mixed ties
    return scores, is_member


def explicit_resample(scores, is_member, w_pos, w_neg):
    """The resampled data of one replicate: each sample repeated by its multiplicity."""
    s = np.r_[np.repeat(scores[is_member], w_pos), np.repeat(scores[~is_member], w_neg)]
    m = np.r_[np.ones(w_pos.sum(), bool), np.zeros(w_neg.sum(), bool)]
    return s, m


def strict_tpr(scores, is_member, alpha):
    """Largest TPR over the exact ROC with FP < alpha·Q (no scikit-learn thinning)."""
    fpr, tpr, _ = metrics.roc_curve(scores, is_member)
    q = (~is_member).sum()
    return tpr[np.rint(fpr * q) < alpha * q - 1e-9].max()


@pytest.mark.parametrize("rule", metrics.FPR_RULES)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_replicates_equal_metrics_on_explicit_resample(seed, ties, rule):
    scores, is_member = random_case(seed, ties=ties)
    n_boot = 30
    reps = bootstrap_replicates(
        scores, is_member, n_boot=n_boot, seed=seed + 100, alphas=ALPHAS, rule=rule
    )
    w_pos, w_neg = resample_weights(80, 320, n_boot=n_boot, seed=seed + 100)
    assert set(reps) == {"auc", *(metrics.tpr_metric_name(a) for a in ALPHAS)}
    for b in range(n_boot):
        s, m = explicit_resample(scores, is_member, w_pos[b], w_neg[b])
        assert reps["auc"][b] == pytest.approx(metrics.roc_auc(s, m), abs=1e-12)
        for a in ALPHAS:
            got = reps[metrics.tpr_metric_name(a)][b]
            if rule == "at_most":
                want = metrics.tpr_at_fpr(s, m, a, "at_most")
                if math.isnan(want):  # 320 non-members: FPR 0.1 % is not resolvable
                    assert a == 0.001 and math.isnan(got)
                    continue
            else:
                want = strict_tpr(s, m, a)
                official = metrics.tpr_at_fpr(s, m, a, "below")  # thinned ROC
                if ties:
                    assert official <= got + 1e-12
                else:  # copies of a sample add vertical/horizontal steps only
                    assert official == pytest.approx(got, abs=1e-12)
            assert got == pytest.approx(want, abs=1e-12)


def test_resample_is_stratified_and_reproducible():
    w_pos, w_neg = resample_weights(7, 50, n_boot=200, seed=1)
    assert w_pos.shape == (200, 7) and w_neg.shape == (200, 50)
    assert (w_pos.sum(axis=1) == 7).all() and (w_neg.sum(axis=1) == 50).all()
    assert w_pos.min() >= 0 and w_neg.min() >= 0
    assert np.abs(w_neg.mean(axis=0) - 1).max() < 0.3  # every sample equally likely
    scores, is_member = random_case(3, ties=True)
    a = bootstrap_replicates(scores, is_member, n_boot=100, seed=5)
    b = bootstrap_replicates(scores, is_member, n_boot=100, seed=5)
    c = bootstrap_replicates(scores, is_member, n_boot=100, seed=6)
    for k in a:
        assert a[k].dtype == np.float64 and a[k].shape == (100,)
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["auc"], c["auc"])
    # the first replicates do not depend on how many are drawn
    short = bootstrap_replicates(scores, is_member, n_boot=10, seed=5)
    np.testing.assert_array_equal(short["auc"], a["auc"][:10])


def test_chunks_do_not_change_replicates(monkeypatch):
    scores, is_member = random_case(4, n_pos=150, n_neg=1100)
    whole = bootstrap_replicates(scores, is_member, n_boot=50, seed=2)
    monkeypatch.setattr(uncertainty, "CHUNK_ENTRIES", 3 * 1250 + 7)  # 3 replicates a chunk
    chunked = bootstrap_replicates(scores, is_member, n_boot=50, seed=2)
    for k in whole:
        np.testing.assert_array_equal(whole[k], chunked[k])


def test_paired_rows_equal_single_calls():
    scores, is_member = random_case(5, ties=True)
    other, _ = random_case(6, ties=False)
    batch = bootstrap_replicates(
        np.stack([scores, other]), is_member, n_boot=40, seed=9, rule="below"
    )
    for r, s in enumerate((scores, other)):
        single = bootstrap_replicates(s, is_member, n_boot=40, seed=9, rule="below")
        for k in single:
            assert batch[k].shape == (2, 40)
            np.testing.assert_array_equal(batch[k][r], single[k])
    with pytest.raises(ValueError, match="1-D"):
        bootstrap_replicates(np.zeros((2, 2, 2)), np.ones(2, bool), seed=0)


def test_undefined_levels_and_input_errors():
    scores, is_member = random_case(7)  # 320 non-members
    at_most = bootstrap_replicates(scores, is_member, n_boot=20, seed=0)
    below = bootstrap_replicates(scores, is_member, n_boot=20, seed=0, rule="below")
    assert np.isnan(at_most["tpr@0.1%"]).all()
    assert not np.isnan(below["tpr@0.1%"]).any()  # below: no false positive allowed
    assert not np.isnan(at_most["tpr@1%"]).any()
    w_pos, w_neg = resample_weights(80, 320, n_boot=20, seed=0)
    for b in range(3):  # below with Q·α < 1: the members above every non-member
        s, m = explicit_resample(scores, is_member, w_pos[b], w_neg[b])
        assert below["tpr@0.1%"][b] == strict_tpr(s, m, 0.001)
    with pytest.raises(ValueError, match="no members"):
        bootstrap_replicates(scores, np.zeros(len(scores), bool), seed=0)
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_replicates(np.r_[np.nan, scores[1:]], is_member, seed=0)
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_replicates(scores, is_member, seed=0, alphas=(0.0,))
    with pytest.raises(ValueError, match="unknown FPR rule"):
        bootstrap_replicates(scores, is_member, seed=0, rule="strict")
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_replicates(scores, is_member, seed=0, n_boot=0)


def test_auc_interval_covers_true_auc_about_95_percent():
    # two Gaussians d apart: AUC = Φ(d/√2); 200 samples of 300 members + 700 non-members
    d, n_pos, n_neg, reps = 1.0, 300, 700, 200
    true_auc = norm.cdf(d / math.sqrt(2))
    rng = np.random.default_rng(2024)
    hits = 0
    for rep in range(reps):
        m = np.r_[np.ones(n_pos, bool), np.zeros(n_neg, bool)]
        s = rng.normal(size=n_pos + n_neg) + d * m
        low, high = percentile_interval(
            bootstrap_replicates(s, m, n_boot=400, seed=rep, alphas=())["auc"]
        )
        hits += low <= true_auc <= high
    assert 0.88 <= hits / reps <= 0.99, hits / reps


def test_tpr_at_low_fpr_interval_is_wide():
    # 1,000 non-members: TPR at FPR 0.1 % rests on one false positive
    scores, is_member = random_case(8, n_pos=500, n_neg=1000, d=2.0)
    point = metrics.attack_metrics(scores, is_member)
    reps = bootstrap_replicates(scores, is_member, n_boot=1000, seed=1)
    widths = {}
    for k in ("tpr@0.1%", "tpr@10%"):
        low, high = percentile_interval(reps[k])
        assert low <= point[k] <= high
        widths[k] = (high - low) / point[k]
    tpr = point["tpr@0.1%"]
    member_sampling_only = 2 * 1.96 * math.sqrt(tpr * (1 - tpr) / 500)
    assert (
        percentile_interval(reps["tpr@0.1%"])[1] - percentile_interval(reps["tpr@0.1%"])[0]
        > 2 * member_sampling_only
    )
    assert widths["tpr@0.1%"] > 3 * widths["tpr@10%"]


def test_percentile_interval():
    r = np.arange(101, dtype=float)  # quantile q of 0..100 is 100 q exactly
    assert percentile_interval(r) == pytest.approx((2.5, 97.5))
    assert percentile_interval(r, level=0.5) == pytest.approx((25.0, 75.0))
    assert percentile_interval(np.r_[r, np.nan, np.nan]) == pytest.approx((2.5, 97.5))
    low, high = percentile_interval(np.full(5, np.nan))
    assert math.isnan(low) and math.isnan(high)
    with pytest.raises(ValueError, match="level"):
        percentile_interval(r, level=1.0)
    with pytest.raises(ValueError, match="1-D"):
        percentile_interval(np.zeros((2, 3)))


def slow_two_stage(replicates, n_boot, seed, level):
    """The two-stage estimator spelled out with loops, from the same random draws."""
    u, b = replicates.shape
    rng = np.random.default_rng(seed)
    units = rng.integers(0, u, size=(n_boot, u))
    within = rng.integers(0, b, size=(n_boot, u))
    means = []
    for i in range(n_boot):
        vals = [replicates[units[i, j], within[i, j]] for j in range(u)]
        vals = [v for v in vals if not math.isnan(v)]
        means.append(sum(vals) / len(vals) if vals else math.nan)
    means = np.array(means)
    means = means[~np.isnan(means)]
    return tuple(np.percentile(means, [50 * (1 - level), 50 * (1 + level)]))


def test_two_stage_matches_slow_reference():
    rng = np.random.default_rng(0)
    reps = rng.normal(size=(6, 50)) * 0.1 + rng.normal(size=(6, 1))
    reps[2] = np.nan  # a unit where the metric is undefined is left out of the mean
    assert two_stage_interval(reps, n_boot=300, seed=4, level=0.9) == pytest.approx(
        slow_two_stage(reps, 300, 4, 0.9), abs=1e-12
    )


def test_two_stage_without_within_noise_is_the_between_unit_interval():
    rng = np.random.default_rng(1)
    values = rng.normal(size=12)
    constant = np.repeat(values[:, None], 200, axis=1)  # no within-unit noise
    assert two_stage_interval(constant, seed=3) == mean_interval(values, seed=3)
    low, high = mean_interval(values, seed=3)
    sem = values.std(ddof=1) / math.sqrt(12)
    assert 3 * sem < high - low < 5 * sem  # ≈ 2 × 1.96 standard errors


def test_two_stage_is_wider_with_within_unit_noise():
    rng = np.random.default_rng(2)
    u, b, sigma_w = 10, 500, 0.05
    values = 0.7 + 0.01 * rng.normal(size=u)  # little between-unit spread
    reps = values[:, None] + sigma_w * rng.normal(size=(u, b))
    plain = mean_interval(values, seed=5)
    two = two_stage_interval(reps, seed=5)
    assert two[1] - two[0] > 3 * (plain[1] - plain[0])
    # about (S² + σ_w²)/U of variance: ±1.96 of that
    expected = 2 * 1.96 * math.sqrt((values.var(ddof=1) + sigma_w**2) / u)
    assert two[1] - two[0] == pytest.approx(expected, rel=0.2)
    assert two[0] < values.mean() < two[1]
    low, high = two_stage_interval(np.full((3, 4), np.nan), seed=0)
    assert math.isnan(low) and math.isnan(high)


def slow_false_positives(scores, is_member, alpha, rule):
    """Fewest non-members over thresholds "score >= t" that keep the reported TP."""
    tpr = metrics.tpr_at_fpr(scores, is_member, alpha, rule)
    if math.isnan(tpr):
        return -1
    need = round(tpr * is_member.sum())
    return min(
        int((~is_member & (scores >= t)).sum())
        for t in [np.inf, *set(scores.tolist())]
        if (is_member & (scores >= t)).sum() >= need
    )


@pytest.mark.parametrize("rule", metrics.FPR_RULES)
@pytest.mark.parametrize("ties", [False, True])
def test_false_positives_at_against_slow_reference(ties, rule):
    for seed in range(4):
        scores, is_member = random_case(seed, n_pos=60, n_neg=1000, ties=ties)
        for a in (0.001, 0.002, 0.01, 0.1):
            fp = false_positives_at(scores, is_member, a, rule)
            assert fp == slow_false_positives(scores, is_member, a, rule)
            assert 0 <= fp <= metrics.max_false_positives(1000, a, rule)


def test_false_positives_at_examples():
    # 5 members on top, then a non-member, 3 members, a non-member, the rest below
    s = np.r_[np.linspace(10, 9, 5), 8.5, 8.0, 7.9, 7.8, 7.5, np.linspace(0, 1, 998)]
    m = np.r_[np.ones(5, bool), False, np.ones(3, bool), np.zeros(999, bool)]
    # FPR 0.1 % of 1,000: at most 1 FP -> TPR 8/8 reached with 1 FP
    assert metrics.tpr_at_fpr(s, m, 0.001) == 1.0
    assert false_positives_at(s, m, 0.001) == 1
    # below: FP < 1 -> TPR 5/8 with 0 FP
    assert metrics.tpr_at_fpr(s, m, 0.001, "below") == 5 / 8
    assert false_positives_at(s, m, 0.001, "below") == 0
    # TPR 0: the empty threshold
    assert false_positives_at(-s, m, 0.001) == 0
    # undefined: fewer than 1/α non-members
    assert false_positives_at(s[:100], m[:100], 0.001) == -1


def test_stable_seed():
    keys = ("digits", "alexnet", "none", "iid", 0, "cos", 3, 10, "aligned")
    seed = stable_seed(*keys)
    assert seed == stable_seed(*keys)
    assert 0 <= seed < 2**63
    # the documented encoding, spelled out: compact JSON, BLAKE2b-64, top 63 bits
    text = '["digits","alexnet","none","iid",0,"cos",3,10,"aligned"]'
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    assert seed == int.from_bytes(digest, "big") >> 1 == 6437146691271234531
    assert stable_seed(*keys[:-1], "official") != seed
    assert len({stable_seed(1), stable_seed("1"), stable_seed(1.0), stable_seed(True)}) == 4
    assert stable_seed(np.int64(3), np.float32(0.5)) == stable_seed(3, 0.5)
    with pytest.raises(TypeError, match="seed keys"):
        stable_seed([1, 2])
    # a fresh interpreter with another hash salt gives the same seed
    code = f"from fedmia.attacker.uncertainty import stable_seed; print(stable_seed(*{keys!r}))"
    for salt in ("0", "12345"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env={"PYTHONHASHSEED": salt, "PATH": ""},
            check=True,
        )
        assert int(out.stdout) == seed


def test_benchmark_smoke(repo):
    r = subprocess.run(
        [sys.executable, str(repo / "bench" / "bootstrap.py"), "--smoke"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    values = dict(
        line.split("=", 1)
        for line in r.stdout.splitlines()
        if "=" in line and " " not in line.split("=", 1)[0]
    )
    for key in (
        "bootstrap_ms_default_iid",
        "bootstrap_ms_paper",
        "projected_default_s",
        "projected_default_paired_s",
    ):
        assert float(values[key]) > 0, key


# ------------------------------------------------- the joint resample shared by targets


def test_joint_resample_equals_metrics_on_the_expanded_data():
    """Slow reference: per replicate, each sample's multiplicity drawn by hand from its
    owner group's stream, the data repeated accordingly, AUC from scikit-learn and TPR
    from fedmia.attacker.metrics on the expanded data; one draw per group serves every target."""
    rng = np.random.default_rng(0)
    own = rng.permutation(np.r_[np.full(30, -1), np.repeat([0, 1, 2], 8)])  # 54 samples
    scores = np.round(rng.normal(size=(3, 2, len(own))) * 3) / 3  # target × row × sample, ties
    n_boot = 25
    groups = [-1, 0, 1, 2]
    seeds = {g: stable_seed("cell", "aligned", 0, g, int((own == g).sum())) for g in groups}
    weight = np.zeros((n_boot, len(own)), dtype=np.int64)  # shared by every target
    for g in groups:
        members = np.flatnonzero(own == g)
        draws = np.random.default_rng(seeds[g]).integers(
            0, len(members), size=(n_boot, len(members))
        )
        for b in range(n_boot):
            for j in draws[b]:
                weight[b, members[j]] += 1
    for t in (0, 1, 2):
        is_member = own == t
        strata = [uncertainty.Stratum(seeds[g], np.flatnonzero(own == g)) for g in groups]
        reps = uncertainty.stratified_replicates(
            scores[t], is_member, strata, n_boot=n_boot, alphas=(0.05, 0.25)
        )
        np.testing.assert_array_equal(
            uncertainty.strata_weights(strata, len(own), n_boot=n_boot), weight
        )
        for b in range(n_boot):
            s = np.repeat(scores[t], weight[b], axis=1)
            m = np.repeat(is_member, weight[b])
            assert m.sum() == 8 and (~m).sum() == 46  # stratified: the counts are kept
            for r in range(2):
                assert reps["auc"][r, b] == pytest.approx(roc_auc_score(m, s[r]), abs=1e-12)
                for a in (0.05, 0.25):
                    assert reps[metrics.tpr_metric_name(a)][r, b] == pytest.approx(
                        metrics.tpr_at_fpr(s[r], m, a), abs=1e-12
                    )


def test_two_strata_are_the_plain_stratified_bootstrap_and_strata_are_checked():
    scores, is_member = random_case(8, ties=True)
    pos, neg = uncertainty._streams(3)
    strata = [
        uncertainty.Stratum(pos, np.flatnonzero(is_member)),
        uncertainty.Stratum(neg, np.flatnonzero(~is_member)),
    ]
    plain = bootstrap_replicates(scores, is_member, n_boot=20, seed=3)
    general = uncertainty.stratified_replicates(scores, is_member, strata, n_boot=20)
    for k in plain:
        np.testing.assert_array_equal(plain[k], general[k])
    half = np.flatnonzero(~is_member)[:5]
    with pytest.raises(ValueError, match="every one of the 400 slots exactly once"):
        uncertainty.stratified_replicates(scores, is_member, strata[:1], n_boot=5)
    with pytest.raises(ValueError, match="mixes members and non-members"):
        uncertainty.stratified_replicates(
            scores,
            is_member,
            [
                uncertainty.Stratum(1, np.r_[np.flatnonzero(is_member), half]),
                uncertainty.Stratum(2, np.setdiff1d(np.flatnonzero(~is_member), half)),
            ],
            n_boot=5,
        )


def test_t_interval_by_hand():
    v = np.array([0.12, 0.05, 0.09, 0.15])
    half = stats.t.ppf(0.975, 3) * np.std(v, ddof=1) / 2
    assert uncertainty.t_interval(v) == pytest.approx((v.mean() - half, v.mean() + half))
    two = np.array([0.1, 0.2])  # 1 df: t = 12.706
    assert uncertainty.t_interval(two) == pytest.approx(
        (0.15 - 12.7062 * 0.05, 0.15 + 12.7062 * 0.05), rel=1e-4
    )
    assert uncertainty.t_interval(np.r_[v, np.nan]) == uncertainty.t_interval(v)
    assert all(math.isnan(x) for x in uncertainty.t_interval(np.array([0.3, np.nan])))
    lo, hi = uncertainty.t_interval(v, level=0.5)
    assert hi - lo == pytest.approx(2 * stats.t.ppf(0.75, 3) * np.std(v, ddof=1) / 2)


def test_run_replicate_means_by_hand():
    rng = np.random.default_rng(1)
    reps = rng.normal(size=(5, 40))
    reps[2, 3] = np.nan
    fixed = uncertainty.run_replicate_means(reps)
    got = uncertainty.run_replicate_means(reps, draw_targets=7)
    drawn = np.random.default_rng(7).integers(0, 5, size=(40, 5))
    for b in range(40):
        vals = [reps[t, b] for t in drawn[b] if not np.isnan(reps[t, b])]
        assert got[b] == pytest.approx(np.mean(vals))
        assert fixed[b] == pytest.approx(np.mean([v for v in reps[:, b] if not np.isnan(v)]))
    with pytest.raises(ValueError, match="targets × replicates"):
        uncertainty.run_replicate_means(reps[0])


@pytest.mark.parametrize("rule", metrics.FPR_RULES)
@pytest.mark.parametrize("ties", [False, True])
def test_replicates_of_a_large_pool_equal_metrics_on_explicit_resample(monkeypatch, ties, rule):
    """5,000 non-members: the TPR limits are searched in the top blocks first (and in all
    of them where a replicate has not passed the limit there: forced below)."""
    scores, is_member = random_case(11, n_pos=150, n_neg=5000, ties=ties)
    if ties:
        scores = np.round(scores * 20) / 20  # many tie groups, members and non-members mixed
    n_boot = 6
    reps = bootstrap_replicates(scores, is_member, n_boot=n_boot, seed=4, alphas=ALPHAS, rule=rule)
    w_pos, w_neg = resample_weights(150, 5000, n_boot=n_boot, seed=4)
    for b in range(n_boot):
        s, m = explicit_resample(scores, is_member, w_pos[b], w_neg[b])
        assert reps["auc"][b] == pytest.approx(metrics.roc_auc(s, m), abs=1e-12)
        for a in ALPHAS:
            want = metrics.tpr_at_fpr(s, m, a) if rule == "at_most" else strict_tpr(s, m, a)
            assert reps[metrics.tpr_metric_name(a)][b] == pytest.approx(want, abs=1e-12)
    searched = []
    monkeypatch.setattr(
        uncertainty, "_limit_prefix", lambda sizes, top: searched.append(len(sizes)) or 1
    )
    forced = bootstrap_replicates(
        scores, is_member, n_boot=n_boot, seed=4, alphas=ALPHAS, rule=rule
    )
    assert searched and min(searched) > 1  # one block searched first: not enough
    for k in reps:
        np.testing.assert_array_equal(forced[k], reps[k])
