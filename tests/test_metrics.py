from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from fedmia.attacker.metrics import (
    METRICS,
    attack_metrics,
    balanced_accuracy,
    max_false_positives,
    roc_auc,
    roc_curve,
    roc_points,
    tpr_at_fpr,
    tpr_at_fpr_defined,
)


def random_case(seed: int, n: int = 500, ties: bool = False):
    rng = np.random.default_rng(seed)
    is_member = rng.random(n) < 0.3
    scores = rng.normal(size=n) + 0.7 * is_member
    if ties:
        scores = np.round(scores * 2) / 2  # a dozen distinct values, many ties
    return scores, is_member


def slow_points(scores, is_member):
    """(FPR, TPR) of "score >= t" for every candidate t, one Python loop per threshold."""
    p, q = is_member.sum(), (~is_member).sum()
    pts = [(0.0, 0.0)]
    for t in sorted(set(scores.tolist())):
        pred = scores >= t
        pts.append(((pred & ~is_member).sum() / q, (pred & is_member).sum() / p))
    return pts


def slow_tpr_at_fpr(scores, is_member, alpha):
    return max(tpr for fpr, tpr in slow_points(scores, is_member) if fpr <= alpha + 1e-12)


def slow_balanced_accuracy(scores, is_member):
    return max((tpr + 1 - fpr) / 2 for fpr, tpr in slow_points(scores, is_member))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_sklearn(seed, ties):
    scores, is_member = random_case(seed, ties=ties)
    assert roc_auc(scores, is_member) == pytest.approx(roc_auc_score(is_member, scores), abs=1e-12)


def test_auc_extremes_and_all_tied():
    m = np.array([False, False, True, True, True])
    s = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    assert roc_auc(s, m) == 1.0
    assert roc_auc(-s, m) == 0.0
    assert roc_auc(np.zeros(5), m) == 0.5
    assert roc_auc(s, m.astype(int)) == 1.0


def test_roc_curve_groups_ties():
    s = np.array([3.0, 2.0, 2.0, 2.0, 1.0])
    m = np.array([True, True, False, False, False])
    fpr, tpr, thr = roc_curve(s, m)
    np.testing.assert_allclose(fpr, [0, 0, 2 / 3, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 1, 1])
    np.testing.assert_array_equal(thr, [np.inf, 3, 2, 1])


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_against_slow_reference(seed, ties):
    scores, is_member = random_case(seed, n=300, ties=ties)
    for alpha in (0.01, 0.05, 0.1, 0.3, 1.0):
        assert tpr_at_fpr(scores, is_member, alpha) == pytest.approx(
            slow_tpr_at_fpr(scores, is_member, alpha), abs=1e-12
        )
    assert balanced_accuracy(scores, is_member) == pytest.approx(
        slow_balanced_accuracy(scores, is_member), abs=1e-12
    )
    fpr, tpr, _ = roc_curve(scores, is_member)
    np.testing.assert_allclose(np.c_[fpr, tpr], sorted(slow_points(scores, is_member)), atol=1e-12)


def test_tpr_at_fpr_exactly_alpha():
    # 1000 non-members, 100 members; exactly 10 non-members score above every member.
    nonmembers = np.r_[np.full(10, 5.0), np.linspace(-3, -1, 990)]
    members = np.linspace(0, 1, 100)
    s = np.r_[nonmembers, members]
    m = np.r_[np.zeros(1000, bool), np.ones(100, bool)]
    assert tpr_at_fpr(s, m, 0.01) == 1.0  # FPR = 10/1000 = alpha is allowed
    assert tpr_at_fpr(s, m, 0.009) == 0.0  # one fewer false positive: only the empty threshold
    assert tpr_at_fpr(s, m, 0.001) == 0.0


def test_tpr_at_fpr_tie_at_threshold_is_not_split():
    # 100 non-members; 2 of them tie with 30 members at score 1; 60 members at score 2,
    # 10 members below every non-member.
    s = np.r_[np.full(30, 1.0), np.full(60, 2.0), np.full(10, -1.0), 1.0, 1.0, np.zeros(98)]
    m = np.r_[np.ones(100, bool), np.zeros(100, bool)]
    assert tpr_at_fpr(s, m, 0.01) == 0.6  # FPR would be 2% at threshold 1: excluded
    assert tpr_at_fpr(s, m, 0.02) == 0.9
    assert tpr_at_fpr(s, m, 0.1) == 0.9  # the next step costs the 98 remaining non-members
    assert tpr_at_fpr(s, m, 1.0) == 1.0


def test_tpr_at_fpr_undefined():
    s, m = random_case(0, n=300)  # about 210 non-members
    n_neg = int((~m).sum())
    assert not tpr_at_fpr_defined(n_neg, 0.001)
    assert math.isnan(tpr_at_fpr(s, m, 0.001))
    assert tpr_at_fpr_defined(n_neg, 0.01)
    assert not math.isnan(tpr_at_fpr(s, m, 0.01))
    assert tpr_at_fpr_defined(1000, 0.001) and not tpr_at_fpr_defined(999, 0.001)
    assert tpr_at_fpr_defined(100, 0.01) and tpr_at_fpr_defined(10, 0.1)
    with pytest.raises(ValueError, match="alpha"):
        tpr_at_fpr(s, m, 0.0)


def test_attack_metrics_keys_and_values():
    s, m = random_case(1, n=2000, ties=True)
    out = attack_metrics(s, m)
    assert list(METRICS) == ["auc", "tpr@0.1%", "tpr@1%", "tpr@10%", "balanced_accuracy"]
    assert set(out) == {*METRICS, "n_members", "n_nonmembers"}
    assert out["n_members"] == m.sum() and out["n_nonmembers"] == (~m).sum()
    assert out["auc"] == pytest.approx(roc_auc_score(m, s), abs=1e-12)
    for alpha, name in ((0.001, "tpr@0.1%"), (0.01, "tpr@1%"), (0.1, "tpr@10%")):
        assert out[name] == tpr_at_fpr(s, m, alpha)  # ~1400 non-members: all defined
        assert not math.isnan(out[name])
    small = attack_metrics(*random_case(1, n=300))
    assert math.isnan(small["tpr@0.1%"]) and not math.isnan(small["tpr@1%"])
    assert out["balanced_accuracy"] == balanced_accuracy(s, m)


def test_errors():
    s = np.array([0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="no members"):
        attack_metrics(s, np.zeros(3, bool))
    with pytest.raises(ValueError, match="no non-members"):
        roc_auc(s, np.ones(3, bool))
    with pytest.raises(ValueError, match="NaN"):
        roc_auc(np.array([0.1, np.nan, 0.3]), np.array([True, False, True]))
    with pytest.raises(ValueError, match="NaN or infinite"):
        roc_auc(np.array([0.1, np.inf, 0.3]), np.array([True, False, True]))
    with pytest.raises(ValueError, match="length"):
        roc_auc(s, np.array([True, False]))
    with pytest.raises(ValueError, match="boolean"):
        roc_auc(s, np.array([0, 2, 1]))


def test_roc_points():
    s, m = random_case(2, n=5000)
    n_neg = int((~m).sum())
    fpr, tpr = roc_points(s, m, max_points=50)
    assert len(fpr) == len(tpr) <= 50
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert fpr[fpr > 0].min() == pytest.approx(1 / n_neg)  # the low-FPR end is kept
    for x, y in zip(fpr[2:], tpr[2:], strict=True):  # step function = TPR at FPR <= x
        assert y == tpr_at_fpr(s, m, x)
    # a short curve comes back whole
    s2, m2 = random_case(3, n=40)
    f_full, t_full, _ = roc_curve(s2, m2)
    f2, t2 = roc_points(s2, m2)
    np.testing.assert_array_equal(f2, f_full)
    np.testing.assert_array_equal(t2, t_full)


def official_tpr(scores, is_member, alpha):
    """The official FedMIA code's TPR at FPR alpha: tpr[np.sum(fpr < alpha) - 1]."""
    fpr, tpr, _ = sk_roc_curve(is_member.astype(int), scores)
    return tpr[np.sum(fpr < alpha) - 1]


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(12))
def test_tpr_below_rule_matches_official_code(seed, ties):
    scores, is_member = random_case(seed, ties=ties)
    for alpha in (0.001, 0.01, 0.05, 0.1, 0.5):
        assert tpr_at_fpr(scores, is_member, alpha, "below") == pytest.approx(
            official_tpr(scores, is_member, alpha), abs=1e-12
        )


def test_fpr_rules_differ_exactly_at_the_limit():
    # 1,000 non-members, 10 members; FPR exactly 1 % reachable with 10 false positives
    s = np.r_[np.full(10, 5.0), np.linspace(4, 3, 10), np.linspace(2, 0, 990)]
    m = np.r_[np.ones(10, bool), np.zeros(1000, bool)]
    assert tpr_at_fpr(s, m, 0.01, "at_most") == 1.0
    assert tpr_at_fpr(s, m, 0.01, "below") == 1.0  # the members come before any FP
    # 5 members, then 10 non-members, then 5 members: the 10th false positive decides
    s2 = np.r_[np.full(5, 5.0), np.full(5, 2.5), np.linspace(4, 3, 10), np.linspace(2, 0, 990)]
    assert tpr_at_fpr(s2, m, 0.01, "at_most") == 1.0  # 10 FP = 1 % is allowed
    assert tpr_at_fpr(s2, m, 0.01, "below") == 0.5  # only 9 FP allowed
    assert max_false_positives(1000, 0.01, "at_most") == 10
    assert max_false_positives(1000, 0.01, "below") == 9
    assert max_false_positives(999, 0.001, "below") == 0
    # below is defined with fewer than 1/alpha non-members: no false positive allowed
    small = np.r_[np.ones(3, bool), np.zeros(50, bool)]
    sc = np.r_[[9.0, 8.0, 0.5], np.linspace(1, 0, 50)]
    assert math.isnan(tpr_at_fpr(sc, small, 0.001, "at_most"))
    assert tpr_at_fpr(sc, small, 0.001, "below") == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="unknown FPR rule 'strict'"):
        tpr_at_fpr(sc, small, 0.01, "strict")


def test_tpr_below_reproduces_sklearn_thinning_with_ties():
    # equal tied steps (1 FP, 1 TP) three times: scikit-learn drops the middle points, so
    # the official value at FPR < 0.5 is that of the first tie group, not the best
    s = np.array([3, 3, 2, 2, 1, 1, 0, 0], dtype=float)
    m = np.array([1, 0, 1, 0, 1, 0, 1, 0], dtype=bool)
    assert official_tpr(s, m, 0.7) == tpr_at_fpr(s, m, 0.7, "below") == 0.25
    assert tpr_at_fpr(s, m, 0.7, "at_most") == 0.5  # the exact curve keeps (0.5, 0.5)
