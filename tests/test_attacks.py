from __future__ import annotations

import math
import statistics

import numpy as np
import pandas as pd
import pytest

from fedmia.attacks import (
    ATTACKS,
    MEASURES,
    MULTI_ROUND,
    attack_scores,
    fedmia_cdf,
    run_attack,
    validate_measures,
)
from fedmia.metrics import METRICS

SINGLE = ["loss", "cos", "grad_norm"]
MULTI = ["loss_series", "cos_series", "fedmia_loss", "fedmia_cos"]


def phi(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def make_table(values: dict[str, np.ndarray], rounds, clients, sample_ids) -> pd.DataFrame:
    """Long measure table from R×K×N arrays (missing measures are zeros)."""
    shape = (len(rounds), len(clients), len(sample_ids))
    rr, cc, ss = np.meshgrid(rounds, clients, sample_ids, indexing="ij")
    cols = {m: np.broadcast_to(values.get(m, 0.0), shape).ravel() for m in MEASURES}
    return pd.DataFrame({"round": rr.ravel(), "client_id": cc.ravel(),
                         "sample_id": ss.ravel(), **cols})


def world(separation: float, *, k: int = 5, per_client: int = 30, held_out: int = 50,
          rounds=(1, 10, 20), seed: int = 0):
    """A cell whose members differ from non-members by ``separation`` noise units.

    Sample ids are scattered, not positions. Under its owner's upload a sample has
    lower loss, higher cos and grad_diff; grad_norm is lower for client 0's samples.
    """
    rng = np.random.default_rng(seed)
    n = k * per_client + held_out
    sample_ids = rng.permutation(np.arange(n) * 7 + 1000)
    own = np.r_[np.repeat(np.arange(k), per_client), np.full(held_out, -1)]
    owner = pd.Series(own, index=sample_ids)
    on_own = (own[None, :] == np.arange(k)[:, None]).astype(float)  # K×N
    shape = (len(rounds), k, n)
    noise = lambda: rng.random(shape)  # noqa: E731
    values = {
        "loss": 2.0 - separation * on_own + noise(),
        "cos": separation * on_own + noise(),
        "grad_diff": separation * on_own + noise(),
        "grad_norm": np.broadcast_to(
            1.0 - separation * (own == 0) + rng.random((len(rounds), 1, n)), shape),
    }
    return make_table(values, rounds, np.arange(k), sample_ids), owner


@pytest.mark.parametrize("name", ATTACKS.names())
def test_perfect_separation(name):
    mdm, owner = world(separation=100.0)
    res = run_attack(name, mdm, owner, targets=[0] if name == "grad_norm" else None)
    assert (res["auc"] == 1.0).all()
    assert (res["tpr@1%"] == 1.0).all()
    assert res["tpr@0.1%"].isna().all()  # 170 non-members cannot resolve FPR 0.1%
    assert (res["n_members"] == 30).all() and (res["n_nonmembers"] == 170).all()


@pytest.mark.parametrize("name", ATTACKS.names())
def test_identical_distributions(name):
    mdm, owner = world(separation=0.0, per_client=700, held_out=500)
    res = run_attack(name, mdm, owner)
    assert res["auc"].sub(0.5).abs().max() < 0.05


def test_output_columns_and_rounds():
    mdm, owner = world(separation=0.5)
    for name in ATTACKS.names():
        res = run_attack(name, mdm, owner, targets=[1, 3], roc_points=20)
        assert list(res.columns) == ["target", "round", *METRICS, "n_members", "n_nonmembers",
                                     "roc_fpr", "roc_tpr"]
        assert (res.roc_fpr.map(len) <= 20).all()
        rounds = {-1} if name in MULTI else {1, 10, 20} | ({-1} if name == "grad_diff" else set())
        assert set(res["round"]) == rounds
        assert len(res) == 2 * len(rounds)
        scores = attack_scores(name, mdm, 1)
        assert set(scores["round"]) == rounds
        assert len(scores) == len(rounds) * len(owner)


def test_scores_match_pandas_reference():
    mdm, _ = world(separation=0.5)
    t = mdm[mdm.client_id == 2]
    loss = attack_scores("loss", mdm, 2).merge(t, on=["round", "sample_id"])
    np.testing.assert_allclose(loss.score, -loss.loss)
    grad_norm = attack_scores("grad_norm", mdm, 2).merge(t, on=["round", "sample_id"])
    np.testing.assert_allclose(grad_norm.score, -grad_norm.grad_norm)
    for name, col, sign in (("loss_series", "loss", -1), ("cos_series", "cos", 1),
                            ("grad_diff", "grad_diff", 1)):
        s = attack_scores(name, mdm, 2)
        s = s[s["round"] == MULTI_ROUND].set_index("sample_id").score
        ref = sign * t.groupby("sample_id")[col].mean()
        np.testing.assert_allclose(s.sort_index(), ref.sort_index())


def tiny_table() -> pd.DataFrame:
    # 3 clients, 2 samples (ids 7 and 3), 1 round.
    loss = np.array([[[0.2, 1.5], [1.0, 0.5], [2.0, 0.7]]])  # 1×3×2: client × sample
    cos = np.array([[[0.1, 0.0], [0.3, 0.2], [0.6, 0.1]]])
    return make_table({"loss": loss, "cos": cos}, [5], [0, 1, 2], [7, 3])


def test_fedmia_hand_computed():
    mdm = tiny_table()
    # fedmia_loss, target 0: s = -loss.
    # Sample 7: s_t = -0.2, refs -1.0, -2.0 -> μ = -1.5, σ = sqrt((0.5² + 0.5²) / 1).
    # Sample 3: s_t = -1.5, refs -0.5, -0.7 -> μ = -0.6, σ = sqrt((0.1² + 0.1²) / 1).
    s = attack_scores("fedmia_loss", mdm, 0).set_index("sample_id").score
    assert s[7] == pytest.approx(phi((-0.2 + 1.5) / math.sqrt(0.5)), rel=1e-12)
    assert s[3] == pytest.approx(phi((-1.5 + 0.6) / math.sqrt(0.02)), rel=1e-9)
    # fedmia_cos, target 2: sample 7: s_t = 0.6, refs 0.1, 0.3; sample 3: s_t = 0.1, refs 0, 0.2.
    c = attack_scores("fedmia_cos", mdm, 2).set_index("sample_id").score
    assert c[7] == pytest.approx(phi((0.6 - 0.2) / math.sqrt(0.02)), rel=1e-12)
    assert c[3] == pytest.approx(0.5, rel=1e-12)
    assert set(c.index) == {3, 7}


def test_fedmia_outlier_filter():
    # 14 clients, target 0; sample 1 has one reference (client 13) far above the others.
    refs = [0.01 * i for i in range(12)]
    cos = np.zeros((1, 14, 2))
    cos[0, 0] = [0.2, 0.05]
    cos[0, 1:, 0] = [*refs, 1.0]
    cos[0, 1:, 1] = [*refs, 0.12]
    mdm = make_table({"cos": cos}, [1], np.arange(14), [1, 2])
    mu, sd = statistics.mean([*refs, 1.0]), statistics.stdev([*refs, 1.0])
    assert 1.0 > mu + 3 * sd  # the case is built so the filter drops it
    plain = attack_scores("fedmia_cos", mdm, 0).set_index("sample_id").score
    filt = attack_scores("fedmia_cos", mdm, 0, outlier_filter=True).set_index("sample_id").score
    assert plain[1] == pytest.approx(phi((0.2 - mu) / sd), rel=1e-12)
    assert filt[1] == pytest.approx(
        phi((0.2 - statistics.mean(refs)) / statistics.stdev(refs)), rel=1e-12)
    assert filt[1] > plain[1] + 0.3
    assert filt[2] == plain[2]  # nothing to drop for sample 2


def slow_fedmia(target, reference, outlier_filter):
    """Loop over rounds and samples with the statistics module."""
    out = np.empty(target.shape)
    for r in range(target.shape[0]):
        for i in range(target.shape[1]):
            ref = list(reference[r, :, i])
            mu, sd = statistics.mean(ref), statistics.stdev(ref)
            if outlier_filter:
                ref = [v for v in ref if v <= mu + 3 * sd]
                mu, sd = statistics.mean(ref), statistics.stdev(ref)
            out[r, i] = phi((target[r, i] - mu) / sd)
    return out


@pytest.mark.parametrize("outlier_filter", [False, True])
def test_fedmia_cdf_against_slow_reference(outlier_filter):
    rng = np.random.default_rng(3)
    target = rng.normal(size=(3, 40))
    reference = rng.normal(size=(3, 15, 40))
    reference[:, 0, ::2] += 8.0  # outliers in half the samples
    fast = fedmia_cdf(target, reference, outlier_filter=outlier_filter)
    np.testing.assert_allclose(fast, slow_fedmia(target, reference, outlier_filter), atol=1e-12)
    if outlier_filter:
        assert not np.allclose(fast, fedmia_cdf(target, reference))


def test_row_order_does_not_matter():
    mdm, owner = world(separation=0.3, seed=1)
    shuffled = mdm.sample(frac=1.0, random_state=0).reset_index(drop=True)
    owner_shuffled = owner.sample(frac=1.0, random_state=1)
    for name in ATTACKS.names():
        a = run_attack(name, mdm, owner, outlier_filter=True)
        b = run_attack(name, shuffled, owner_shuffled, outlier_filter=True)
        cols = [c for c in a.columns if not c.startswith("roc_")]
        pd.testing.assert_frame_equal(a[cols], b[cols])
        for c in ("roc_fpr", "roc_tpr"):
            assert all(np.array_equal(x, y) for x, y in zip(a[c], b[c], strict=True))
        pd.testing.assert_frame_equal(attack_scores(name, mdm, 2), attack_scores(name, shuffled, 2))


def test_validate_accepts_good_table():
    mdm, owner = world(separation=0.3)
    validate_measures(mdm, owner)
    validate_measures(mdm, owner, targets=[0, 4])


@pytest.mark.parametrize("case, match", [
    ("missing_column", r"lacks column\(s\) \['cos'\]"),
    ("float_round", "column 'round' must be integer"),
    ("missing_client", r"round 10 lacks client\(s\) \[2\]"),
    ("missing_samples", "round 20, client 1 lacks 3 of 200 samples"),
    ("duplicates", r"2 duplicated \(round, client_id, sample_id\) row"),
    ("nan", "column 'cos' has 4 NaN or infinite"),
    ("inf", "column 'loss' has 1 NaN or infinite"),
    ("unknown_sample", r"1 sample\(s\) of the measure table are not in owner"),
    ("no_members", "target client 3 owns none of the 200 evaluation samples"),
    ("no_nonmembers", "target client 0 owns all 200 evaluation samples"),
    ("unknown_target", "target client 9 has no rows"),
    ("empty", "empty"),
])
def test_validate_errors(case, match):
    mdm, owner = world(separation=0.3)
    targets = None
    if case == "missing_column":
        mdm = mdm.drop(columns="cos")
    elif case == "float_round":
        mdm["round"] = mdm["round"].astype(float)
    elif case == "missing_client":
        mdm = mdm[~((mdm["round"] == 10) & (mdm.client_id == 2))]
    elif case == "missing_samples":
        drop = mdm.index[(mdm["round"] == 20) & (mdm.client_id == 1)][:3]
        mdm = mdm.drop(drop)
    elif case == "duplicates":
        mdm = pd.concat([mdm, mdm.iloc[[5, 17]]])
    elif case == "nan":
        mdm.loc[[1, 50, 60, 70], "cos"] = np.nan
    elif case == "inf":
        mdm.loc[3, "loss"] = np.inf
    elif case == "unknown_sample":
        owner = owner.drop(owner.index[4])
    elif case == "no_members":
        owner = owner.where(owner != 3, -1)
    elif case == "no_nonmembers":
        owner = owner * 0
    elif case == "unknown_target":
        targets = [0, 9]
    elif case == "empty":
        mdm = mdm.iloc[:0]
    with pytest.raises(ValueError, match=match):
        validate_measures(mdm, owner, targets)


def test_run_attack_checks_only_its_measure():
    mdm, owner = world(separation=0.3)
    mdm.loc[[1, 2], "cos"] = np.nan
    assert len(run_attack("loss", mdm.drop(columns="grad_diff"), owner)) == 15
    with pytest.raises(ValueError, match="column 'cos' has 2"):
        run_attack("cos", mdm, owner)
    with pytest.raises(ValueError, match="unknown attack 'lira'"):
        run_attack("lira", mdm, owner)


def test_fedmia_needs_two_references():
    mdm, owner = world(separation=0.3, k=2)
    with pytest.raises(ValueError, match="at least 2 non-target clients"):
        run_attack("fedmia_loss", mdm, owner)
    assert len(run_attack("loss_series", mdm, owner)) == 2
