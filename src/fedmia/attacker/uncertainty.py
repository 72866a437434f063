"""Bootstrap uncertainty of attack metrics (pure numpy).

One attack on one target client at one round gives one AUC and one TPR at each FPR
level (:mod:`fedmia.attacker.metrics`). This module says how much those numbers would move
if the evaluation samples were drawn again.

Replicates of one row (:func:`stratified_replicates`, :func:`bootstrap_replicates`)
    Stratified, non-parametric bootstrap: each replicate resamples every stratum
    within itself, uniformly with replacement (:func:`bootstrap_replicates`: two strata,
    the ``P`` members and the ``Q`` non-members; the attack stage: one stratum per owner
    group — the held-out samples and each client's samples — whose draw every target's
    rows share, :func:`fedmia.attacker.attacks.bootstrap_strata`), and applies exactly the
    definitions of :mod:`fedmia.attacker.metrics` to the resampled data. A sample drawn twice
    is tied with itself: AUC counts each member/non-member tie one half, a threshold
    ("score ≥ t") takes all copies or none, and TPR at FPR α is the largest TPR among
    thresholds with at most
    :func:`fedmia.attacker.metrics.max_false_positives` false positives (``at_most``: NaN in
    every replicate when ``Q·α < 1``). The ``below`` rule is applied exactly
    (largest TPR with ``FP < α·Q``); scikit-learn's ROC thinning, which
    :mod:`fedmia.attacker.metrics` reproduces for that rule, is *not* reproduced in the
    replicates. On data without ties the two agree, also after resampling (copies
    of one sample add vertical or horizontal ROC steps only); with ties in the
    original scores a replicate can be higher than the thinned official value.

Interval of one row (:func:`percentile_interval`)
    The percentile interval: the ``(1 − level)/2`` and ``(1 + level)/2`` quantiles of
    the replicates (numpy's linear interpolation).

Interval of a mean over units (:func:`two_stage_interval`, :func:`mean_interval`)
    For the summary rows (mean over target clients and seeds); see there. They treat
    the (seed, target) units as independent, which the targets of one run are not.

Intervals of the findings (:func:`t_interval`, :func:`run_replicate_means`)
    A finding is a difference of two attacks, averaged over targets (and official
    draws) per run. Targets of one run share the trained models and the held-out
    non-member pool, so the runs (seeds) are the independent units. With S ≥ 2 seeds:
    the t-interval over the S per-seed means (S − 1 df; S = 2 is valid, and wide).
    With one seed the statement is about that run: its estimand is the mean over the
    run's targets of the expected difference over draws of the evaluation samples
    (members and the pool; the models fixed), and the interval is the percentile
    interval of :func:`run_replicate_means` over the replicates of one resample shared
    by all targets and attacks. Measured (``python bench/bootstrap.py --coverage
    --coverage-runs 400``: 400 simulated studies of runs with a run effect on the
    difference, T = 10 targets × 40 members sharing 1,000 held-out non-members
    (Q = 1,360), a sample difficulty shared by every target's scores (ρ = 0.6), B =
    1,000; ``bench_runs`` defines both estimands), the 95 % intervals of the paired
    difference covered

    =========================================  ==  ==========  =====  ========
    method                                     S   estimand    AUC    TPR@0.1%
    =========================================  ==  ==========  =====  ========
    (seed, target) units as independent (old)  3   population  64.5   89.7
    t over the per-seed means                  3   population  95.5   95.3
    targets as independent units (old)         1   within-run  90.7   83.8
    joint resample, mean over targets          1   within-run  94.5   98.0
    joint resample, targets also drawn         1   within-run  100    99.8
    =========================================  ==  ==========  =====  ========

    percent of the studies (binomial SE about 1.1 points). With 20 members per target
    and stronger sharing (``--sim-members 20 --sim-rho 0.8 --sim-target-sd 0.3
    --coverage-runs 600 --seed 2``) the same rows read 66.5 / 89.7, 96.7 / 93.5,
    90.3 / 66.5, 93.5 / 94.8 and 99.5 / 95.0 (AUC / TPR@0.1 %). Both new methods stay at
    or above 93 % in both; the old ones do not. Drawing the targets too counts the
    sampling noise twice (each target's value already carries it): it over-covers the
    AUC at about 1.7 × the width, so the findings use the mean over the fixed targets.
    The simulation is of the ``aligned`` protocol; under ``official`` the pool's slots
    are resampled as positions (:func:`fedmia.attacker.attacks.bootstrap_strata`), which leaves
    the pool's share of the noise out of a mean over targets.

Caveat — TPR at low FPR
    With ``m = ⌊α·Q⌋`` allowed false positives the TPR is set by the ``(m+1)``-th
    highest non-member score, an extreme order statistic. For small ``m`` its
    bootstrap distribution is discrete and too narrow: a resample mostly keeps the
    original sample's top non-members (the bootstrap of a sample maximum is the
    textbook failure: it reproduces the observed maximum with probability
    ``1 − (1 − 1/Q)^Q ≈ 63 %``). Percentile intervals of TPR therefore undercover
    when ``α·Q < 10``, badly when ``α·Q`` is 1 or 2 (FPR 0.1 % on 1,000–2,000
    non-members). Measured (``python bench/bootstrap.py --coverage --separation d``:
    500 members, 1,000 non-members, Gaussians ``d`` apart, B = 1,000, 200 samples),
    the 95 % intervals covered the population value in

    ======  =====  ========  ======  =======
    d       AUC    TPR@0.1%  TPR@1%  TPR@10%
    ======  =====  ========  ======  =======
    1       94.5   83.5      93.0    95.0
    2       95.0   75.5      93.5    94.5
    ======  =====  ========  ======  =======

    percent of the samples (α·Q = 1, 10, 100). Such an interval is a lower bound on
    the uncertainty, not a 95 % guarantee; state the number of false positives the
    TPR rests on (:func:`false_positives_at`) and the FPR resolution ``1/Q`` next to
    it. (``below`` with ``α·Q ≤ 1`` allows no false positive: the TPR then rests on
    the sample maximum of the non-members alone.)

Randomness
    Every function takes an integer ``seed`` (a stratum its own); :func:`stable_seed`
    derives one from the keys of a row or a stratum, so reruns are byte-identical
    (numpy does not promise the same ``Generator`` streams across its versions; pinned
    numpy, identical bytes). Replicate ``b`` depends only on the seeds, the scores and
    the order of the samples in each stratum (each stratum has its own stream), never
    on how the replicates are split into chunks (:data:`CHUNK_ENTRIES`) or on how many
    are drawn after it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import numbers
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from fedmia.attacker import metrics
from fedmia.core.lazy import scipy_sparse as sparse
from fedmia.core.lazy import scipy_stats as stats

#: Replicates are processed in chunks of about this many entries (replicates ×
#: samples): memory stays ~50 MB for any B and N (the int64 draws and the counts of a
#: chunk), and the work per row of a chunk outweighs numpy's per-call overhead (the time
#: hardly changed from 2¹⁸ to 2²³ on the paper's shape at 1/10 scale). The replicates do
#: not depend on it.
CHUNK_ENTRIES = 1 << 21
#: ... and of at most about this many entries (replicates × blocks) in a row's per-block
#: counts (:func:`_metrics_of_blocks`), so that they stay near the CPU's cache: at the
#: paper's full shape the official protocol's 15,000 slots (~3,100 blocks a side) make
#: :data:`CHUNK_ENTRIES` alone ~140 replicates a chunk, this ~80 (measured 1.3–1.5 ×
#: faster per row with int32 counts, ~1.1 × with :func:`_count_dtype`'s uint16). Nor do
#: the replicates depend on it.
BLOCK_ENTRIES = 1 << 18


class _Blocks(NamedTuple):
    """The samples of one row in runs that a resample cannot split (see :func:`_blocks`).

    Per side (members, non-members): a 0/1 matrix that sums the side's positions per
    block holding any of them (blocks × positions, CSR: one 1 per position), and those
    blocks' ids. A block holds one side only, except a tie group holding both (a
    *mixed* block).
    """

    sums: tuple[sparse.csr_array, sparse.csr_array]  # M×P, N×Q, of _count_dtype(P), (Q)
    ids: tuple[np.ndarray, np.ndarray]  # int64 M, N, increasing: the blocks' ids (0 … K−1)
    n_blocks: int  # K


def _blocks(
    scores: np.ndarray, is_member: np.ndarray, side_pos: np.ndarray | None = None
) -> _Blocks:
    """Group the samples, by decreasing score, into blocks of consecutive tie groups.

    A tie group is the set of samples with one score. Consecutive tie groups that
    hold only members are merged into one block, and so are consecutive groups that
    hold only non-members; a group holding both stays a block of its own. In any
    resample, the resampled counts per block determine the AUC and every TPR at FPR:
    members of one block beat the same non-members (and tie with the same ones),
    and the best threshold with FP ≤ m is found at a block end (inside a member run
    a later threshold only adds members; inside a non-member run it only adds FP).

    ``side_pos`` (int64 S) is each sample's position on its side (the bootstrap's
    order of the members, and of the non-members); default: input order. One sort.
    """
    s, m, _, _ = metrics.check_scores(scores, is_member)
    if side_pos is None:
        side_pos = np.empty(len(m), dtype=np.int64)
        side_pos[m], side_pos[~m] = np.arange(int(m.sum())), np.arange(int((~m).sum()))
    order = np.argsort(-s, kind="stable")
    s_sorted, m_sorted = s[order], m[order]
    group = np.cumsum(np.r_[True, s_sorted[1:] != s_sorted[:-1]]) - 1  # tie group, sorted
    n_groups = int(group[-1]) + 1
    has_member = np.bincount(group[m_sorted], minlength=n_groups) > 0
    has_nonmember = np.bincount(group[~m_sorted], minlength=n_groups) > 0
    kind = has_member.astype(np.int8) + 2 * has_nonmember  # 1, 2, or 3 (mixed)
    starts = np.r_[True, (kind[1:] != kind[:-1]) | (kind[1:] == 3)]
    block_of_group = np.cumsum(starts) - 1
    block = block_of_group[group]  # of each sample in sorted order: non-decreasing
    sums, ids = [], []
    for side in (m_sorted, ~m_sorted):
        b = block[side]
        starts = np.flatnonzero(np.r_[True, b[1:] != b[:-1]])
        n = len(b)
        sums.append(
            sparse.csr_array(
                (np.ones(n, dtype=_count_dtype(n)), side_pos[order[side]], np.r_[starts, n]),
                shape=(len(starts), n),
            )
        )
        ids.append(b[starts])
    return _Blocks(tuple(sums), tuple(ids), int(block_of_group[-1]) + 1)


def _streams(seed: int) -> tuple[np.random.SeedSequence, np.random.SeedSequence]:
    """The members' and the non-members' seeds of a bootstrap seeded ``seed``."""
    pos, neg = np.random.SeedSequence(seed).spawn(2)
    return pos, neg


def _draw(rng: np.random.Generator, n_boot: int, n: int) -> np.ndarray:
    """Indices (int64 n_boot×n) of ``n_boot`` resamples of ``n`` items with replacement.

    Drawing ``b1`` rows and then ``b2`` rows gives the same rows as drawing ``b1 + b2``
    at once (numpy keeps the spare half of a 64-bit draw in the generator's state),
    so blocks of replicates do not change the replicates; a test checks it.
    """
    return rng.integers(0, n, size=(n_boot, n), dtype=np.int64)


class Stratum(NamedTuple):
    """One stratum of a stratified resample: its seed and the slots it holds.

    Replicate ``b`` draws ``m = len(slots)`` positions of the stratum uniformly with
    replacement from a generator seeded ``seed`` (:func:`_draw`: row ``b`` of the
    stream) and takes ``slots[position]``. Two calls with strata of the same seed and
    size draw the same positions: that is how rows of different target clients share
    one resample (:func:`fedmia.attacker.attacks.run_attacks`).
    """

    seed: int | np.random.SeedSequence  # seed of the stratum's draws
    slots: np.ndarray  # int64 m: the slot (index into the scores) of each position


def _check_strata(strata: Sequence[Stratum], is_member: np.ndarray) -> list[np.ndarray]:
    """The strata's slot arrays (int64), checked.

    They must partition the slots, and each stratum hold only members or only non-members.
    """
    n = len(is_member)
    slots = [np.asarray(st.slots, dtype=np.int64).reshape(-1) for st in strata]
    every = np.sort(np.concatenate(slots)) if slots else np.empty(0, np.int64)
    if len(every) != n or not np.array_equal(every, np.arange(n)):
        raise ValueError(f"the strata must hold every one of the {n} slots exactly once")
    for i, sl in enumerate(slots):
        if len(sl) == 0:
            raise ValueError(f"stratum {i} is empty")
        if len(np.unique(is_member[sl])) != 1:
            raise ValueError(
                f"stratum {i} mixes members and non-members; a stratum holds one or the other"
            )
    return slots


def strata_weights(strata: Sequence[Stratum], n_slots: int, *, n_boot: int) -> np.ndarray:
    """How many times each replicate takes each slot (slow path, tests).

    Args:
        strata: as given to :func:`stratified_replicates`.
        n_slots: S.
        n_boot: B.

    Returns:
        int64 B×S; row ``b`` sums to ``len(slots)`` over each stratum's slots.
    """
    w = np.zeros((n_boot, n_slots), dtype=np.int64)
    rows = np.arange(n_boot)[:, None]
    for st in strata:
        sl = np.asarray(st.slots, dtype=np.int64)
        np.add.at(w, (rows, sl[_draw(np.random.default_rng(st.seed), n_boot, len(sl))]), 1)
    return w


def resample_weights(
    n_members: int, n_nonmembers: int, *, n_boot: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The multiplicities :func:`bootstrap_replicates` resamples with (slow path, tests).

    Args:
        n_members: P.
        n_nonmembers: Q.
        n_boot: B.
        seed: the seed given to :func:`bootstrap_replicates`.

    Returns:
        ``(w_members, w_nonmembers)``, int64 B×P and B×Q: how many times replicate ``b``
        takes the ``j``-th member (non-member), members and non-members each in the
        order they appear in the input; every row sums to P (Q).
    """
    pos, neg = _streams(seed)
    w = strata_weights(
        [Stratum(pos, np.arange(n_members)), Stratum(neg, n_members + np.arange(n_nonmembers))],
        n_members + n_nonmembers,
        n_boot=n_boot,
    )
    return w[:, :n_members], w[:, n_members:]


def _count_dtype(n: int) -> type[np.integer]:
    """The integer type of the resample counts of a side of ``n`` positions.

    A position's multiplicity, and a block's sum of them, never exceed the ``n`` draws
    of the side per replicate: uint16 while ``n`` < 2¹⁶ (the per-block sums, a sparse
    product, then read a quarter of the bytes of int64: 2.5–3 × faster at the paper's
    shape), else int32. Exact either way.
    """
    return np.uint16 if n <= np.iinfo(np.uint16).max else np.int32


def _multiplicities(drawn: np.ndarray, n: int) -> np.ndarray:
    """How often each of ``n`` positions is drawn in each of b replicates.

    ``drawn``: int64 b×m drawn positions (in 0 … n−1), m = n. Returns n×b
    (positions × replicates, the layout the per-block sums read) of
    :func:`_count_dtype` ``(n)``.
    """
    b = len(drawn)
    counts = np.bincount((drawn * b + np.arange(b)[:, None]).ravel(), minlength=n * b)
    return counts.astype(_count_dtype(n)).reshape(n, b)


def _fp_limits(n_nonmembers: int, alphas: Sequence[float], rule: str) -> dict[str, int | None]:
    """``{tpr_metric_name(α): most false positives allowed}``; None where undefined."""
    limits: dict[str, int | None] = {}
    for a in alphas:
        m = metrics.max_false_positives(n_nonmembers, a, rule)  # validates alpha and rule
        limits[metrics.tpr_metric_name(a)] = (
            m if metrics.tpr_at_fpr_defined(n_nonmembers, a, rule) else None
        )
    return limits


def _limit_prefix(sizes: np.ndarray, top: int) -> int:
    """How many of the top blocks holding non-members to search first for the TPR limits.

    ``sizes``: the non-members of each such block (in order); ``top``: the largest limit
    on the false positives. A replicate's false positives in the first j blocks are
    their count ± sampling noise, so past about twice the limit (plus a margin) every
    replicate has, in practice, left the limit behind; the caller checks it and
    searches all blocks where one has not.
    """
    return int(np.searchsorted(np.cumsum(sizes), 2 * top + 64 + 8 * math.sqrt(top + 1))) + 1


def _metrics_of_blocks(
    tp: np.ndarray, fp: np.ndarray, blocks: _Blocks, limits: dict[str, int | None]
) -> dict[str, np.ndarray]:
    """AUC and TPRs of b resamples from their counts per block.

    ``tp[j, i]`` (int M×b): the members, in resample ``i``, of the j-th block that holds
    members (``blocks.ids[0]``); ``fp[j, i]`` (int N×b) the non-members of the j-th block
    that holds non-members (``blocks.ids[1]``); blocks in decreasing score order
    (:func:`_blocks`). Returns float64 b per metric.
    """
    nb = tp.shape[1]
    member_ids, nonmember_ids = blocks.ids
    # int32: a count of members (non-members) never exceeds P (Q); the pair sums are int64
    tp_cum = np.zeros((tp.shape[0] + 1, nb), dtype=np.int32)  # row j: members of the
    np.cumsum(tp, axis=0, out=tp_cum[1:])  # blocks above the j-th block holding members
    n_pos, n_neg = int(tp_cum[-1, 0]), int(fp[:, 0].sum())  # every resample keeps P and Q
    before = np.searchsorted(member_ids, nonmember_ids)  # member blocks above each N-block
    tp_above = tp_cum[before]  # N×b: members above each block holding non-members
    # member/non-member pairs won + ½ tied, × 2 = Σ_k fp_k (2 · TP above k + tp_k); tp_k ≠ 0
    # only in a mixed block
    won2 = 2 * np.einsum("jb,jb->b", fp, tp_above, dtype=np.int64)
    mixed = np.flatnonzero(member_ids[np.minimum(before, len(member_ids) - 1)] == nonmember_ids)
    if len(mixed):
        won2 += np.einsum("jb,jb->b", fp[mixed], tp[before[mixed]], dtype=np.int64)
    out = {"auc": won2 / (2 * n_pos * n_neg)}
    defined = [m for m in limits.values() if m is not None]
    if defined:  # FP at each block end: in the top blocks, or all where one needs more
        top = max(defined)
        sizes = np.diff(blocks.sums[1].indptr)  # non-members per block
        fp_cum = np.cumsum(fp[: _limit_prefix(sizes, top)], axis=0, dtype=np.int32)
        if len(fp_cum) < len(fp) and not (fp_cum[-1] > top).all():
            fp_cum = np.cumsum(fp, axis=0, dtype=np.int32)
    cols = np.arange(nb)
    for name, m in limits.items():
        if m is None:
            out[name] = np.full(nb, np.nan)
            continue
        # the first block holding non-members that takes FP beyond m ends the admitted
        # blocks; every member above it counts (all of them when there is none)
        j = np.count_nonzero(fp_cum <= m, axis=0)
        admitted = np.where(
            j < len(tp_above), tp_above[np.minimum(j, len(tp_above) - 1), cols], n_pos
        )
        out[name] = admitted / n_pos
    return out


def bootstrap_replicates(
    scores: np.ndarray,
    is_member: np.ndarray,
    *,
    n_boot: int = 1000,
    seed: int,
    alphas: Sequence[float] = metrics.FPR_LEVELS,
    rule: str = "at_most",
) -> dict[str, np.ndarray]:
    """Stratified bootstrap replicates of the AUC and of TPR at each FPR level.

    :func:`stratified_replicates` with two strata, the members and the non-members
    (in input order), seeded by two streams spawned from ``seed``; see there and the
    module docstring.

    ``scores`` may hold R score vectors of the same samples (R×N: e.g. every attack
    and round of one target client). Replicate ``b`` then resamples the same members
    and non-members for every row (a paired bootstrap: differences between rows get
    honest intervals too), and the draws, about half the cost, are made once. Row
    ``r`` equals the call on ``scores[r]`` alone with the same seed.

    Args:
        scores: float N (or R×N), higher = more likely a member.
        is_member: bool N (P members, Q non-members, both > 0).
        n_boot: B, the number of replicates.
        seed: seed of the resample (see :func:`stable_seed`); the multiplicities are
            :func:`resample_weights` ``(P, Q, n_boot=B, seed=seed)``.
        alphas: FPR levels in (0, 1].
        rule: :data:`fedmia.attacker.metrics.FPR_RULES`; ``below`` is the exact strict rule
            (no scikit-learn thinning).

    Returns:
        ``{"auc": …, tpr_metric_name(α): …}``, each float64 B (R×B for R×N scores),
        replicate ``b`` at index ``b``; a TPR is all-NaN where undefined (``at_most``
        and ``Q·α < 1``).

    Raises:
        ValueError: invalid scores or labels (as :mod:`fedmia.attacker.metrics`), an FPR level
            outside (0, 1], an unknown rule, or ``n_boot < 1``.
    """
    m = np.asarray(is_member).astype(bool)
    pos, neg = _streams(seed)
    strata = [Stratum(pos, np.flatnonzero(m)), Stratum(neg, np.flatnonzero(~m))]
    return stratified_replicates(scores, m, strata, n_boot=n_boot, alphas=alphas, rule=rule)


def stratified_replicates(
    scores: np.ndarray,
    is_member: np.ndarray,
    strata: Sequence[Stratum],
    *,
    n_boot: int = 1000,
    alphas: Sequence[float] = metrics.FPR_LEVELS,
    rule: str = "at_most",
) -> dict[str, np.ndarray]:
    """Bootstrap replicates of the AUC and of TPR at each FPR level, resampled by strata.

    Replicate ``b`` resamples every stratum within itself (:class:`Stratum`: ``m`` of its
    ``m`` slots, uniformly with replacement, the draws seeded by the stratum's seed) and
    applies exactly the definitions of :mod:`fedmia.attacker.metrics` to the resampled data (see
    the module docstring for ties and the FPR rules). Each stratum holds only members
    or only non-members, so every replicate keeps P members and Q non-members: with one
    stratum of each, the plain stratified bootstrap; with the non-members split by the
    client that owns them, a bootstrap stratified by owner group, as valid for one row
    and able to share each group's resample with the rows of other target clients.

    No loop over samples or replicates: the slots are sorted once per row and grouped
    into blocks (:func:`_blocks`); per chunk of replicates (:data:`CHUNK_ENTRIES`),
    the drawn positions are counted once (how often each member and each non-member is
    drawn in each replicate: one ``bincount`` per side, shared by all rows), per row
    those counts are summed per block (a sparse 0/1 matrix per side, blocks ×
    positions), and cumulative sums over the blocks give every AUC (integer arithmetic,
    exact up to the final division) and, per α, every TPR (the last block end with
    FP ≤ m, searched in the top blocks that can hold it).

    Args:
        scores: float S (or R×S, R rows of the same slots: one resample serves all
            rows, a paired bootstrap), higher = more likely a member.
        is_member: bool S (P members, Q non-members, both > 0).
        strata: a partition of the S slots (every slot in exactly one stratum).
        n_boot: B, the number of replicates.
        alphas: FPR levels in (0, 1].
        rule: :data:`fedmia.attacker.metrics.FPR_RULES`; ``below`` is the exact strict rule.

    Returns:
        ``{"auc": …, tpr_metric_name(α): …}``, each float64 B (R×B for R×S scores);
        replicate ``b`` depends only on the strata (seeds and slots), the scores and
        ``b``; a TPR is all-NaN where undefined. The multiplicities are
        :func:`strata_weights`.

    Raises:
        ValueError: invalid scores or labels (as :mod:`fedmia.attacker.metrics`), strata that do
            not partition the slots or mix members and non-members, an FPR level
            outside (0, 1], an unknown rule, or ``n_boot < 1``.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1; got {n_boot}")
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim not in (1, 2):
        raise ValueError(f"scores must be 1-D (S) or 2-D (R×S); got shape {s.shape}")
    m = np.asarray(is_member).astype(bool)
    rows = s.reshape(-1, s.shape[-1])
    for row in rows:
        metrics.check_scores(row, is_member)  # the metrics' errors before the strata's
    slots = _check_strata(strata, m)
    limits = _fp_limits(int((~m).sum()), alphas, rule)
    # members and non-members each in stratum order: stratum k's positions are the
    # columns start_k … start_k + m_k − 1 of its side, so a drawn position plus start_k
    # is a position on that side (no gather, no concatenation per chunk)
    side = [bool(m[sl[0]]) for sl in slots]  # True: a member stratum
    start, n_side = [], [0, 0]
    for sl, k in zip(slots, side, strict=True):
        start.append(n_side[k])
        n_side[k] += len(sl)
    side_pos = np.empty(len(m), dtype=np.int64)  # each slot's position on its side
    for sl, a in zip(slots, start, strict=True):
        side_pos[sl] = a + np.arange(len(sl))
    blocks = [_blocks(row, m, side_pos) for row in rows]
    rngs = [np.random.default_rng(st.seed) for st in strata]
    out = {name: np.empty((len(blocks), n_boot)) for name in ("auc", *limits)}
    most_blocks = max(max(len(ids) for ids in bl.ids) for bl in blocks)
    step = max(1, min(CHUNK_ENTRIES // len(m), BLOCK_ENTRIES // most_blocks))
    for lo in range(0, n_boot, step):
        nb = min(step, n_boot - lo)
        drawn = [
            np.empty((nb, n_side[1]), dtype=np.int64),  # nb×P member positions
            np.empty((nb, n_side[0]), dtype=np.int64),
        ]  # nb×Q non-member positions
        for rng, sl, k, a in zip(rngs, slots, side, start, strict=True):
            np.add(_draw(rng, nb, len(sl)), a, out=drawn[not k][:, a : a + len(sl)])
        # how often each position is drawn (positions × replicates), shared by all
        # rows; per row, summed per block
        counts = [_multiplicities(d, d.shape[1]) for d in drawn]
        for r, bl in enumerate(blocks):
            tp, fp = (a @ c for a, c in zip(bl.sums, counts, strict=True))
            for name, values in _metrics_of_blocks(tp, fp, bl, limits).items():
                out[name][r, lo : lo + nb] = values
    return out if s.ndim == 2 else {name: v[0] for name, v in out.items()}


def percentile_interval(replicates: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap replicates, ignoring NaN.

    Args:
        replicates: float B.
        level: coverage in (0, 1).

    Returns:
        ``(low, high)``: the ``(1 − level)/2`` and ``(1 + level)/2`` quantiles (linear
        interpolation) of the non-NaN replicates; ``(nan, nan)`` if all are NaN.
        (A replicate of :func:`bootstrap_replicates` is NaN only where the metric is
        undefined for the row, and then all of them are.)
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1); got {level}")
    r = np.asarray(replicates, dtype=np.float64)
    if r.ndim != 1:
        raise ValueError(f"replicates must be 1-D; got shape {r.shape}")
    r = r[~np.isnan(r)]
    if len(r) == 0:
        return math.nan, math.nan
    low, high = np.percentile(r, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def _nanmean_rows(x: np.ndarray) -> np.ndarray:
    """Mean of each row of ``x`` (n×U) over its non-NaN entries; NaN for an all-NaN row."""
    ok = ~np.isnan(x)
    n = ok.sum(axis=1)
    total = np.where(ok, x, 0.0).sum(axis=1)
    return np.divide(total, n, out=np.full(len(x), np.nan), where=n > 0)


def mean_interval(
    values: np.ndarray, *, n_boot: int = 1000, seed: int, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over units (units resampled only).

    Each of ``n_boot`` outer replicates draws U units uniformly with replacement and
    averages their values (NaN values skipped, as in the point estimate of a table's
    mean); the interval is :func:`percentile_interval` of those means. This treats the
    units' values as exact: it is :func:`two_stage_interval` without within-unit noise,
    and with the same seed draws the same units.

    Args:
        values: float U, one value per unit (e.g. per target client and seed).
        n_boot: number of outer replicates.
        seed: seed of the unit draws.
        level: coverage in (0, 1).

    Returns:
        ``(low, high)``; NaN where every value is NaN.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or len(v) == 0:
        raise ValueError(f"values must be 1-D and non-empty; got shape {v.shape}")
    units = np.random.default_rng(seed).integers(0, len(v), size=(n_boot, len(v)))
    return percentile_interval(_nanmean_rows(v[units]), level)


def two_stage_interval(
    replicates: np.ndarray, *, n_boot: int = 1000, seed: int, level: float = 0.95
) -> tuple[float, float]:
    """Two-stage bootstrap interval of the mean of a metric over U units.

    Units are the rows of a summary: target clients × seeds. Estimator: each of
    ``n_boot`` outer replicates

    1. draws U unit indices uniformly with replacement (between-unit sampling), then
    2. for each drawn unit, draws one replicate index uniformly from ``0 … B−1``,
       independently for every draw (so a unit drawn twice usually contributes two
       different within-unit replicates), and takes that within-unit bootstrap
       replicate (within-unit sampling: which members and non-members were evaluated),
    3. averages the U values, skipping NaN (a metric undefined for a unit is left out
       of the mean, as in the table's point estimate).

    The interval is :func:`percentile_interval` of the outer means. With no
    within-unit noise (every row of ``replicates`` constant) it is exactly
    :func:`mean_interval` of the units' values with the same seed.

    Assumptions: the units are independent draws from the population of interest,
    and the within-unit replicates describe each unit's sampling error. Targets of
    one cell share a training run and most non-members (the held-out pool), so their
    errors are positively correlated; neither this estimator nor :func:`mean_interval`
    sees that correlation, and with few seeds the interval is too narrow for
    run-to-run variation.

    Under independence, resampling the units alone (:func:`mean_interval`) is
    already consistent, because each unit's point estimate carries its own sampling
    error. The two-stage estimator adds that error a second time (step 2), so it is
    conservative: the variance of its outer mean is about ``(S² + σ²_w)/U``, where
    ``S²`` is the observed between-unit variance (which contains ``σ²_w``) and
    ``σ²_w`` the mean within-unit variance — at most √2 × too wide, when the
    within-unit noise dominates (Davison & Hinkley 1997, §3.8). It is the safer
    choice with few units, where the between-unit spread is itself poorly estimated.

    Args:
        replicates: float U×B, row ``u`` the within-unit replicates of unit ``u``
            (from :func:`bootstrap_replicates`).
        n_boot: number of outer replicates.
        seed: seed of the outer draws.
        level: coverage in (0, 1).

    Returns:
        ``(low, high)``; NaN where every unit's replicates are NaN.
    """
    r = np.asarray(replicates, dtype=np.float64)
    if r.ndim != 2 or r.size == 0:
        raise ValueError(
            f"replicates must be 2-D (units × replicates), non-empty; got shape {r.shape}"
        )
    n_units, n_within = r.shape
    rng = np.random.default_rng(seed)
    units = rng.integers(0, n_units, size=(n_boot, n_units))  # first: as mean_interval
    within = rng.integers(0, n_within, size=(n_boot, n_units))
    return percentile_interval(_nanmean_rows(r[units, within]), level)


@functools.lru_cache(maxsize=256)
def _t_quantile(q: float, df: int) -> float:
    """Student-t quantile (cached: SciPy's costs ~1 ms a call, the findings make thousands)."""
    return float(stats.t.ppf(q, df))


def t_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean of S independent values (S − 1 degrees of freedom).

    ``mean ± t_{S−1, (1+level)/2} · sd / √S`` with the sample standard deviation (ddof 1):
    exact for normal values, and the interval of a mean over S runs (seeds) in the
    findings, each run's value the mean over its targets. With S = 2 (1 df) the
    quantile is 12.71 at 95 %: valid, and very wide.

    Args:
        values: float S, NaN values left out.
        level: coverage in (0, 1).

    Returns:
        ``(low, high)``; ``(nan, nan)`` with fewer than 2 values.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1); got {level}")
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"values must be 1-D; got shape {v.shape}")
    v = v[~np.isnan(v)]
    if len(v) < 2:
        return math.nan, math.nan
    half = _t_quantile((1 + level) / 2, len(v) - 1) * float(v.std(ddof=1)) / math.sqrt(len(v))
    return float(v.mean()) - half, float(v.mean()) + half


def run_replicate_means(replicates: np.ndarray, *, draw_targets: int | None = None) -> np.ndarray:
    """Replicates of a mean over the targets of one run, from a joint resample.

    ``replicates[t, b]`` is target ``t``'s value (e.g. a paired difference of two
    attacks) in replicate ``b`` of a resample *shared by all targets* (one draw of the
    held-out group and of each client's group per replicate,
    :func:`fedmia.attacker.attacks.run_attacks`).
    Replicate ``b`` of the mean averages the targets' values in replicate ``b`` (NaN left
    out). Because the replicate index is the same for every target, the correlation
    that the shared non-member pool induces between targets is kept: the percentile
    interval of these means is the within-run interval of the findings (the run and its
    targets fixed, the evaluation samples resampled; coverage in the module docstring).

    With ``draw_targets`` (a seed), replicate ``b`` first draws T targets uniformly with
    replacement (a fresh draw per replicate) and averages those: it adds the spread
    between the run's targets, which a mean over the fixed targets of one run does not
    have; measured, it over-covers (module docstring), so the findings do not use it.

    Args:
        replicates: float T×B.
        draw_targets: seed of the target draws, or ``None`` (all targets, each once).

    Returns:
        float64 B, one mean per replicate (NaN where every value is).
    """
    r = np.asarray(replicates, dtype=np.float64)
    if r.ndim != 2 or r.size == 0:
        raise ValueError(
            f"replicates must be 2-D (targets × replicates), non-empty; got shape {r.shape}"
        )
    n_targets, n_boot = r.shape
    if draw_targets is None:
        return _nanmean_rows(r.T)
    drawn = np.random.default_rng(draw_targets).integers(0, n_targets, size=(n_boot, n_targets))
    return _nanmean_rows(r[drawn, np.arange(n_boot)[:, None]])


def false_positives_at(
    scores: np.ndarray, is_member: np.ndarray, alpha: float, rule: str = "at_most"
) -> int:
    """The false positives the reported TPR at FPR ``alpha`` rests on.

    The TPR of :func:`fedmia.attacker.metrics.tpr_at_fpr` (``rule`` included, so ``below`` with
    scikit-learn's thinning) is ``TP/P`` for some number ``TP`` of members. This is
    the number of non-members at or above the strictest threshold reaching ``TP``
    members, i.e. with a score ≥ the lowest score among those members: the fewest
    false positives with which that TPR is reached, so a table can say "TPR 3.1 % at
    1 false positive". It is at most :func:`fedmia.attacker.metrics.max_false_positives`;
    the metric's own (most permissive) threshold may admit more non-members, up to
    that limit, without gaining a member. 0 when the TPR is 0.

    Args:
        scores: float N, higher = more likely a member.
        is_member: bool N.
        alpha: FPR level in (0, 1].
        rule: one of :data:`fedmia.attacker.metrics.FPR_RULES`.

    Returns:
        The number of false positives, or −1 where the TPR is undefined (NaN:
        ``at_most`` with fewer than ``1/alpha`` non-members).
    """
    return false_positives_of(metrics.roc_counts(scores, is_member), alpha, rule)


def false_positives_of(roc: metrics._Roc, alpha: float, rule: str = "at_most") -> int:
    """:func:`false_positives_at` from a row's counts (:func:`fedmia.attacker.metrics.roc_counts`).

    One sort serves the TPR, its false positives and the row's other metrics.
    """
    tpr = metrics._tpr_at_fpr(roc, alpha, rule)
    if math.isnan(tpr):
        return -1
    first = int(np.searchsorted(roc.tp, round(tpr * roc.n_pos), side="left"))
    return int(roc.fp[first])


def stable_seed(*keys: str | int | float | bool) -> int:
    """A seed in [0, 2⁶³) derived from ``keys``, the same in every process and machine.

    The keys are encoded as JSON (type-aware: ``1``, ``"1"``, ``1.0`` and ``True``
    differ) and hashed with BLAKE2b; Python's ``hash()`` is salted per process and is
    not used. Numpy scalars count as the Python number of the same value.

    Args:
        keys: e.g. ``("digits", "alexnet", "none", "iid", 0, "cos", 3, 10, "aligned")``.

    Raises:
        TypeError: a key that is not a str, int, float or bool.
    """
    canon: list[str | int | float | bool] = []
    for k in keys:
        if isinstance(k, bool | np.bool_):
            canon.append(bool(k))
        elif isinstance(k, numbers.Integral):
            canon.append(int(k))
        elif isinstance(k, numbers.Real):
            canon.append(float(k))
        elif isinstance(k, str):
            canon.append(k)
        else:
            raise TypeError(f"seed keys must be str, int, float or bool; got {type(k)!r}")
    text = json.dumps(canon, ensure_ascii=True, allow_nan=True, separators=(",", ":"))
    digest = hashlib.blake2b(text.encode("ascii"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1
