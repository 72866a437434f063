"""Metrics of a membership inference attack from its scores (pure numpy).

Every function takes ``scores`` (float, N; higher = more likely a member) and
``is_member`` (bool, N) and thresholds as "predict member if score >= t". Equal
scores always fall on the same side of a threshold, so a tie is one step of the
ROC curve and is never split. All functions sort once; none loops over samples.

Definitions (``P`` members, ``Q`` non-members):

* ROC: the points ``(FP(t)/Q, TP(t)/P)`` for every distinct score ``t``, plus ``(0, 0)``.
* AUC: area under that curve = P(score of a member > score of a non-member) + ½ P(tie),
  identical to ``sklearn.metrics.roc_auc_score``.
* TPR at FPR α, by one of two rules (:data:`FPR_RULES`):

  - ``at_most`` (fedmia's default): the TPR of the most permissive threshold whose
    FPR ≤ α (the largest TPR among ROC points with FPR ≤ α). It is undefined (NaN)
    when ``Q·α < 1``: with fewer than 1/α non-members no threshold can resolve FPR = α.
  - ``below`` (the official FedMIA code, ``tpr[np.sum(fpr < α) - 1]`` on scikit-learn's
    ``roc_curve``): the TPR of the last ROC point with FPR *strictly* below α, on the
    curve thinned as scikit-learn's default ``drop_intermediate=True`` thins it (a point
    where both cumulative counts have a zero second difference is dropped). Without ties
    that is the largest TPR with FPR < α; a run of equal tied steps can drop the best
    point, and the official value is then lower — reproduced, not corrected. Always
    defined (the point (0, 0) qualifies); with ``Q·α ≤ 1`` it allows no false positive.
* Balanced accuracy: the best over thresholds of ``(TPR + 1 − FPR) / 2``; the trivial
  thresholds (everything or nothing is a member) are included, so it is ≥ 0.5.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from fedmia.core.contracts import FPR_LEVELS, METRICS, tpr_metric_name

#: How TPR at FPR α counts the FPR limit → how the tables say it: ``at_most`` FPR ≤ α
#: (fedmia), ``below`` FPR < α (the official code).
FPR_RULES = {"at_most": "TPR at FPR ≤ α (fedmia)", "below": "TPR at FPR < α (the official code)"}
__all__ = ["FPR_LEVELS", "FPR_RULES", "METRICS", "tpr_metric_name"]  # names of the metrics

# Slack for float round-off when comparing a count with alpha × count.
_EPS = 1e-9


class _Roc(NamedTuple):
    """Cumulative counts at the ROC points (length M+1 for M distinct scores)."""

    fp: np.ndarray  # int64 M+1, non-members with score >= threshold; starts at 0
    tp: np.ndarray  # int64 M+1, members with score >= threshold; starts at 0
    thresholds: np.ndarray  # float64 M+1, +inf then the distinct scores, decreasing
    n_pos: int
    n_neg: int


def check_scores(
    scores: np.ndarray, is_member: np.ndarray
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """The inputs of every metric, validated: ``(scores, is_member, P, Q)``.

    Returns float64 scores, bool labels and the numbers of members and non-members.

    Raises:
        ValueError: not 1-D, lengths differ, labels not boolean (or 0/1), scores not
            finite, or no members or no non-members.
    """
    s = np.asarray(scores, dtype=np.float64)
    m = np.asarray(is_member)
    if s.ndim != 1 or m.ndim != 1:
        raise ValueError(f"scores and is_member must be 1-D; got shapes {s.shape} and {m.shape}")
    if len(s) != len(m):
        raise ValueError(f"scores ({len(s)}) and is_member ({len(m)}) differ in length")
    if m.dtype != bool:
        if not np.isin(m, (0, 1)).all():
            raise ValueError("is_member must be boolean (or 0/1)")
        m = m.astype(bool)
    bad = int(np.count_nonzero(~np.isfinite(s)))
    if bad:
        raise ValueError(f"scores contain {bad} NaN or infinite value(s)")
    n_pos = int(m.sum())
    n_neg = len(m) - n_pos
    if n_pos == 0:
        raise ValueError(f"no members among the {len(m)} samples: the attack is undefined")
    if n_neg == 0:
        raise ValueError(f"no non-members among the {len(m)} samples: the attack is undefined")
    return s, m, n_pos, n_neg


def _roc(scores: np.ndarray, is_member: np.ndarray) -> _Roc:
    """Validate the inputs and count TP/FP at every distinct threshold (one sort)."""
    s, m, n_pos, n_neg = check_scores(scores, is_member)
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    tp = np.cumsum(m[order], dtype=np.int64)
    fp = np.arange(1, len(s) + 1, dtype=np.int64) - tp
    last = np.r_[s_sorted[1:] != s_sorted[:-1], True]  # last sample of each tie group
    return _Roc(np.r_[0, fp[last]], np.r_[0, tp[last]], np.r_[np.inf, s_sorted[last]], n_pos, n_neg)


def roc_counts(scores: np.ndarray, is_member: np.ndarray) -> _Roc:
    """The cumulative TP and FP counts at every distinct score of one row (one sort).

    What :func:`metrics_of`, :func:`roc_points_of` and
    :func:`fedmia.attacker.uncertainty.false_positives_of` take, so that a row scored
    many ways is sorted once. Validates as :func:`check_scores`.
    """
    return _roc(scores, is_member)


def roc_curve(
    scores: np.ndarray, is_member: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The exact ROC curve, one point per distinct score.

    Args:
        scores: float N, higher = more likely a member.
        is_member: bool N.

    Returns:
        ``(fpr, tpr, thresholds)``, each M+1 for M distinct scores: point ``i`` predicts
        "member" for ``score >= thresholds[i]``. Starts at ``(0, 0)`` (threshold +inf),
        ends at ``(1, 1)`` (the lowest score); both rates are non-decreasing.
    """
    r = _roc(scores, is_member)
    return r.fp / r.n_neg, r.tp / r.n_pos, r.thresholds


def _auc(r: _Roc) -> float:
    # Trapezoids on integer counts: exact up to the final division; a tie group is a
    # diagonal step, which counts member/non-member ties one half.
    return float(np.sum(np.diff(r.fp) * (r.tp[1:] + r.tp[:-1])) / (2 * r.n_pos * r.n_neg))


def roc_auc(scores: np.ndarray, is_member: np.ndarray) -> float:
    """Area under the ROC curve (ties count one half); equals sklearn's ``roc_auc_score``.

    Args:
        scores: float N, higher = more likely a member.
        is_member: bool N.
    """
    return _auc(_roc(scores, is_member))


def tpr_at_fpr_defined(n_nonmembers: int, alpha: float, rule: str = "at_most") -> bool:
    """Whether TPR at FPR ``alpha`` is defined with ``n_nonmembers`` under ``rule``.

    ``at_most``: FPR = α must be resolvable, ``n·α >= 1``; ``below``: always.
    """
    check_fpr_rule(rule)
    return rule == "below" or n_nonmembers * alpha >= 1 - _EPS


def check_fpr_rule(rule: str) -> None:
    """Raise ``ValueError`` naming the choices if ``rule`` is not one of :data:`FPR_RULES`."""
    if rule not in FPR_RULES:
        raise ValueError(f"unknown FPR rule '{rule}'; choose from {list(FPR_RULES)}")


def max_false_positives(n_nonmembers: int, alpha: float, rule: str = "at_most") -> int:
    """The most false positives a threshold may have at FPR level ``alpha`` under ``rule``.

    ``at_most``: ``⌊α·Q⌋`` (FPR ≤ α); ``below``: ``⌈α·Q⌉ − 1`` (FPR < α). Both with a
    1e-9 slack for round-off in ``α·Q``. Returns −1 where no threshold qualifies
    (``at_most`` with ``α·Q < 1`` is reported as undefined instead, see
    :func:`tpr_at_fpr_defined`).
    """
    if not 0 < alpha <= 1:
        raise ValueError(f"FPR level alpha must be in (0, 1]; got {alpha}")
    check_fpr_rule(rule)
    if rule == "at_most":
        return math.floor(alpha * n_nonmembers + _EPS)
    return math.ceil(alpha * n_nonmembers - _EPS) - 1


def _sklearn_kept(r: _Roc) -> np.ndarray:
    """Bool M+1: the ROC points scikit-learn's ``roc_curve(drop_intermediate=True)`` keeps.

    Its rule, on the points after (0, 0): keep the first, the last, and every point where
    the second difference of the FP or the TP counts is non-zero; (0, 0) is always kept.
    """
    fp, tp = r.fp[1:], r.tp[1:]
    keep = np.ones(len(r.fp), dtype=bool)
    if len(fp) > 2:
        keep[1:] = np.r_[True, (np.diff(fp, 2) != 0) | (np.diff(tp, 2) != 0), True]
    return keep


def _tpr_at_fpr(r: _Roc, alpha: float, rule: str = "at_most") -> float:
    max_fp = max_false_positives(r.n_neg, alpha, rule)
    if not tpr_at_fpr_defined(r.n_neg, alpha, rule):
        return math.nan
    fp, tp = (r.fp, r.tp) if rule == "at_most" else (r.fp[k := _sklearn_kept(r)], r.tp[k])
    i = np.searchsorted(fp, max_fp, side="right") - 1  # last point with FP <= max_fp
    return float(tp[i] / r.n_pos)


def tpr_at_fpr(
    scores: np.ndarray, is_member: np.ndarray, alpha: float, rule: str = "at_most"
) -> float:
    """TPR of the most permissive threshold whose FPR is within ``alpha`` by ``rule``.

    ``rule = "at_most"``: FPR ≤ α (NaN when there are fewer than ``1/alpha``
    non-members, see :func:`tpr_at_fpr_defined`); ``"below"``: FPR < α, as the
    official code. A threshold takes all samples of equal score, so a tie that
    straddles the FPR limit is excluded as a whole.

    Args:
        scores: float N, higher = more likely a member.
        is_member: bool N.
        alpha: FPR level in (0, 1].
        rule: one of :data:`FPR_RULES`.

    Returns:
        The TPR in [0, 1], or NaN where undefined.
    """
    return _tpr_at_fpr(_roc(scores, is_member), alpha, rule)


def _balanced_accuracy(r: _Roc) -> float:
    return float(np.max((r.tp / r.n_pos + 1 - r.fp / r.n_neg) / 2))


def balanced_accuracy(scores: np.ndarray, is_member: np.ndarray) -> float:
    """Best balanced accuracy over thresholds: ``max_t (TPR(t) + 1 − FPR(t)) / 2``.

    The maximum runs over every ROC point, the trivial ones included, so the
    result lies in [0.5, 1].

    Args:
        scores: float N, higher = more likely a member.
        is_member: bool N.
    """
    return _balanced_accuracy(_roc(scores, is_member))


def roc_points_of(r: _Roc, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`roc_points` from a row's counts (:func:`roc_counts`): no sort."""
    if max_points < 3:
        raise ValueError(f"max_points must be >= 3; got {max_points}")
    fpr, tpr = r.fp / r.n_neg, r.tp / r.n_pos
    if len(fpr) <= max_points:
        return fpr, tpr
    grid = np.unique(np.r_[0.0, np.geomspace(1 / r.n_neg, 1.0, max_points - 2)])
    i = np.searchsorted(r.fp, grid * r.n_neg + _EPS, side="right") - 1
    return np.r_[0.0, grid], np.r_[0.0, tpr[i]]


def roc_points(
    scores: np.ndarray, is_member: np.ndarray, max_points: int = 200
) -> tuple[np.ndarray, np.ndarray]:
    """A ROC curve of at most ``max_points`` points for (log-log) plots.

    A curve with at most ``max_points`` points is returned whole. Otherwise the FPR
    axis is sampled at ``max_points − 2`` log-spaced values from ``1/Q`` (the smallest
    non-zero FPR, ``Q`` non-members) to 1, plus FPR 0, and the TPR at each value ``x``
    is :func:`tpr_at_fpr` at ``x`` (the ROC as a step function, never optimistic);
    ``(0, 0)`` is prepended. The low-FPR region keeps as much detail as the high one.

    Args:
        scores: float N, higher = more likely a member.
        is_member: bool N.
        max_points: the most points returned (>= 3).

    Returns:
        ``(fpr, tpr)``, float64 arrays of equal length ≤ ``max_points``, both
        non-decreasing, from ``(0, 0)`` to ``(1, 1)``.
    """
    return roc_points_of(_roc(scores, is_member), max_points)


def attack_metrics(
    scores: np.ndarray, is_member: np.ndarray, rule: str = "at_most"
) -> dict[str, float]:
    """All metrics of one attack (one sort).

    Args:
        scores: float N, higher = more likely a member.
        is_member: bool N.
        rule: how TPR at FPR α counts the limit (:data:`FPR_RULES`).

    Returns:
        ``{name: value}`` for each name of :data:`METRICS` (``auc``, ``tpr@0.1%``,
        ``tpr@1%``, ``tpr@10%``, ``balanced_accuracy``; a TPR is NaN where undefined),
        plus ``n_members`` and ``n_nonmembers``.

    Raises:
        ValueError: lengths differ, scores are not finite, or a class is empty.
    """
    return metrics_of(_roc(scores, is_member), rule)


def metrics_of(r: _Roc, rule: str = "at_most") -> dict[str, float]:
    """:func:`attack_metrics` from a row's counts (:func:`roc_counts`): no sort."""
    out: dict[str, float] = {"auc": _auc(r)}
    out.update({tpr_metric_name(a): _tpr_at_fpr(r, a, rule) for a in FPR_LEVELS})
    out["balanced_accuracy"] = _balanced_accuracy(r)
    out["n_members"] = r.n_pos
    out["n_nonmembers"] = r.n_neg
    return out
