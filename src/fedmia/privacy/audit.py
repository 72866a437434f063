"""One-run empirical lower bound on ε (Steinke, Nasr & Jagielski, NeurIPS 2023).

*Privacy auditing with one (1) training run* (arXiv 2305.08846). The auditor picks
``m`` canaries and includes each one in training independently with probability ½
(a fair coin, recorded). After the one run it scores every canary (higher = more
likely included), abstains on most, guesses "in" for the ``r₊`` highest scores and
"out" for the ``r₋`` lowest; ``r = r₊ + r₋`` guesses of which ``v`` are correct.

A canary is the unit whose inclusion the audited guarantee protects: sample canaries audit
a sample-level ε, whole-client canaries (a client that trains or not) a client-level one.

The bound (the paper's main theorem for (ε, δ)-DP, evaluated as in its Appendix D
code, ``p_value_DP_audit`` / ``get_eps_audit``). If the training is (ε, δ)-DP with
respect to adding or removing one canary, then with ``q = e^ε / (1 + e^ε)``

    P[≥ v correct] ≤ P[Bin(r, q) ≥ v] + 2mδ · max_{i = 1..v} (1/i) P[v > Bin(r, q) ≥ v − i]

(:func:`audit_p_value`; the max over ``i ∈ [m]`` in the theorem is attained at ``i ≤ v``,
since for ``i ≥ v`` the event no longer grows). Observing ``v`` correct guesses rejects
(ε, δ)-DP at level β when that p-value is below β; :func:`epsilon_lower_bound` returns
the largest such ε, found as the paper's code finds it: grow an upper end in steps of 1
until the p-value reaches β, then bisect (here to an absolute width of 1e-9 instead of
30 halvings) and return the lower end, whose p-value is < β.

What m allows. With all ``r`` guesses correct and δ = 0 the p-value is ``q^r``, so the
bound is at most :func:`max_epsilon_lower_bound` ``= −ln(β^{−1/r} − 1) ≈ ln(r / ln(1/β))``;
δ > 0 only adds to the p-value, and ``r ≤ m``: 1,000 canaries at β = 0.05 can never
show more than ε ≈ 5.81, whatever the mechanism.

Choosing the number of guesses. The best (r₊, r₋) depends on the scores; choosing it on
the same canaries that are then audited would void the guarantee. :func:`audit_from_scores`
splits the canaries at random into two halves (seeded): on the selection half it tries
every choice and keeps the one with the largest bound; on the audit half it reports the
bound of that choice alone. Conditioned on the selection half's coins the choice is fixed
and the mechanism is still (ε, δ)-DP in the audit half's canaries, so the theorem
applies there with ``m`` = the audit half's size. (The alternative, a Bonferroni
correction β / #choices over all canaries, is not implemented.) Equal scores are
ordered by a random key drawn from the same seed, never by position, so that a caller
who sorts canaries by inclusion cannot leak it through ties.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from fedmia.attacker import calibrated, uncertainty
from fedmia.attacker.attacks import (
    ATTACKS,
    MULTI_ROUND,
    REMEASURE,
    RMIA_HALVES,
    SELECTED,
    MeasureCube,
    attacked_mask,
    score_slots,
    target_rounds,
)
from fedmia.attacker.calibrated import DEFAULT_LIRA, DEFAULT_RMIA, LiraOptions, RmiaOptions
from fedmia.core.contracts import AUDIT_COLUMNS

log = logging.getLogger(__name__)

#: Default significance level β of the bound (95 % confidence).
DEFAULT_BETA = 0.05
#: Default (fraction guessed "in", fraction guessed "out") of a half's canaries tried by
#: :func:`audit_from_scores`: "in" only, and symmetric, each at total fractions
#: 1 %, 2 %, 5 %, 10 %, 20 %, 50 % (and guessing every canary).
DEFAULT_CHOICES: tuple[tuple[float, float], ...] = (
    *((f, 0.0) for f in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)),
    *((f / 2, f / 2) for f in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)),
)
# Absolute width at which the bisection on ε stops.
_TOL = 1e-9


def _check_counts(num_canaries: int, num_guesses: int, num_correct: int) -> None:
    if not 0 <= num_correct <= num_guesses <= num_canaries:
        raise ValueError(
            "need 0 <= num_correct <= num_guesses <= num_canaries, got "
            f"{num_correct}, {num_guesses}, {num_canaries}"
        )


def audit_p_value(
    num_canaries: int, num_guesses: int, num_correct: int, epsilon: float, delta: float
) -> float:
    """Upper bound on P[≥ v of r guesses correct] under (ε, δ)-DP (the main theorem).

    Args:
        num_canaries: m, canaries each included with probability ½.
        num_guesses: r ≤ m guesses (abstentions excluded).
        num_correct: v ≤ r correct guesses.
        epsilon: ε ≥ 0 of the null hypothesis.
        delta: δ in [0, 1] of the null hypothesis.

    Returns:
        The p-value in [0, 1].
    """
    _check_counts(num_canaries, num_guesses, num_correct)
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and 0 <= delta <= 1, got {epsilon}, {delta}")
    r, v = num_guesses, num_correct
    q = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of ε-DP randomized response
    tail = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    alpha = 0.0
    if v > 0:
        # cumulative[i-1] = P[v > Binomial(r, q) >= v - i], i = 1..v
        cumulative = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, q))
        alpha = float(np.max(cumulative / np.arange(1, v + 1)))
    return min(tail + alpha * delta * 2 * num_canaries, 1.0)


def epsilon_lower_bound(
    num_canaries: int, num_guesses: int, num_correct: int, delta: float, beta: float = DEFAULT_BETA
) -> float:
    """The largest ε whose p-value for ``v`` correct of ``r`` guesses is below β.

    Training that is (ε, δ)-DP for any smaller ε would show ``num_correct`` or more
    correct guesses with probability below β; so with confidence 1 − β it is not
    (ε′, δ)-DP for ε′ below the returned value. 0 when the guesses show nothing.

    Args:
        num_canaries: m, canaries each included with probability ½.
        num_guesses: r ≤ m guesses.
        num_correct: v ≤ r correct guesses.
        delta: δ in [0, 1] of the guarantee being audited.
        beta: significance level in (0, 1).

    Returns:
        The lower bound on ε (nats), within 1e-9 below the exact root.
    """
    _check_counts(num_canaries, num_guesses, num_correct)
    if not 0 < beta < 1:
        raise ValueError(f"beta must be in (0, 1), got {beta}")

    def p(eps: float) -> float:
        return audit_p_value(num_canaries, num_guesses, num_correct, eps, delta)

    lo, hi = 0.0, 1.0  # keep p(lo) < β (or lo = 0) and p(hi) >= β
    while p(hi) < beta:
        lo, hi = hi, hi + 1.0
    while hi - lo > _TOL:
        mid = (lo + hi) / 2
        if p(mid) < beta:
            lo = mid
        else:
            hi = mid
    return lo


def max_epsilon_lower_bound(num_guesses: int, beta: float = DEFAULT_BETA) -> float:
    """The largest bound r guesses can give: all correct, δ = 0: ``−ln(β^{−1/r} − 1)``.

    ``≈ ln(r / ln(1/β))`` for large r; 0 guesses give 0.
    """
    if num_guesses == 0:
        return 0.0
    return -math.log(math.expm1(-math.log(beta) / num_guesses))


@dataclass(frozen=True)
class GuessCount:
    """The outcome of one (r₊, r₋) choice on a set of canaries."""

    guesses_in: int  # r₊, the highest scores guessed "in"
    guesses_out: int  # r₋, the lowest scores guessed "out"
    correct_in: int  # of them, included
    correct_out: int  # of them, excluded

    @property
    def num_guesses(self) -> int:
        """The number of guesses r = r₊ + r₋."""
        return self.guesses_in + self.guesses_out

    @property
    def num_correct(self) -> int:
        """The number of correct guesses v."""
        return self.correct_in + self.correct_out


def count_guesses(
    order: np.ndarray, included: np.ndarray, guesses_in: int, guesses_out: int
) -> GuessCount:
    """Guess "in" for the first ``guesses_in`` of ``order`` and "out" for the last ``guesses_out``.

    Args:
        order: int (n,), canary positions from highest to lowest score.
        included: bool (n,), the coins, indexed by position.
        guesses_in: r₊ ≥ 0.
        guesses_out: r₋ ≥ 0 with r₊ + r₋ ≤ n.
    """
    n = len(order)
    if guesses_in < 0 or guesses_out < 0 or guesses_in + guesses_out > n:
        raise ValueError(f"need r+, r- >= 0 and r+ + r- <= {n}, got {guesses_in}, {guesses_out}")
    top, bottom = order[:guesses_in], order[n - guesses_out :]
    return GuessCount(
        guesses_in, guesses_out, int(included[top].sum()), int((~included[bottom]).sum())
    )


@dataclass(frozen=True)
class AuditResult:
    """A one-run audit: the bound on the audit half and how its guesses were chosen.

    Attributes:
        epsilon: the lower bound on ε (nats) at ``delta``, confidence 1 − ``beta``.
        num_canaries: m of the bound, the audit half's canaries.
        num_guesses: r = r₊ + r₋ on the audit half.
        num_correct: v on the audit half.
        guesses_in, guesses_out, correct_in, correct_out: r₊, r₋ and their correct counts.
        delta, beta: the δ audited and the significance level.
        rule: how the choice was made (``"holdout"``).
        choice: the (fraction "in", fraction "out") chosen on the selection half.
        selection_canaries: canaries of the selection half.
        selection_epsilon: the chosen choice's bound on the selection half (biased
            upwards by the selection; reported only to show what was chosen).
    """

    epsilon: float
    num_canaries: int
    num_guesses: int
    num_correct: int
    guesses_in: int
    guesses_out: int
    correct_in: int
    correct_out: int
    delta: float
    beta: float
    rule: str
    choice: tuple[float, float]
    selection_canaries: int
    selection_epsilon: float

    def to_dict(self) -> dict[str, Any]:
        """The result as a flat dict (the choice as two columns)."""
        row = asdict(self)
        row["choice_in"], row["choice_out"] = row.pop("choice")
        return row


def _counts(n: int, choice: tuple[float, float]) -> tuple[int, int]:
    """(r₊, r₋) of a fraction choice on n canaries."""
    f_in, f_out = choice
    if f_in < 0 or f_out < 0 or f_in + f_out > 1:
        raise ValueError(f"a choice needs fractions >= 0 summing to <= 1, got {choice}")
    k_in = round(f_in * n)
    return k_in, min(round(f_out * n), n - k_in)


def _halves(n: int, holdout_seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The random split of n canaries: ``(selection half, audit half, tie-breaking key)``."""
    rng = np.random.default_rng(holdout_seed)
    perm = rng.permutation(n)
    tie_key = rng.random(n)
    return perm[: n // 2], perm[n // 2 :], tie_key


def _check_scores(
    scores: np.ndarray, included: np.ndarray, choices: Sequence[tuple[float, float]]
) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=float)
    included = np.asarray(included, dtype=bool)
    if (
        scores.ndim not in (1, 2)
        or scores.shape[-1:] != included.shape
        or included.ndim != 1
        or len(included) < 2
    ):
        raise ValueError("scores (m, or attacks × m) and included (m) must be aligned, with m >= 2")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite")
    if not choices:
        raise ValueError("choices must not be empty")
    return scores, included


def _bound(
    scores: np.ndarray,
    included: np.ndarray,
    tie_key: np.ndarray,
    idx: np.ndarray,
    choice: tuple[float, float],
    delta: float,
    beta: float,
) -> tuple[float, GuessCount]:
    """The bound and the guesses of ``choice`` on the canaries ``idx``."""
    order = np.lexsort((tie_key[idx], -scores[idx]))  # highest first, ties by the key
    count = count_guesses(order, included[idx], *_counts(len(idx), choice))
    eps = epsilon_lower_bound(len(idx), count.num_guesses, count.num_correct, delta, beta)
    return eps, count


def _result(
    scores: np.ndarray,
    included: np.ndarray,
    tie_key: np.ndarray,
    select: np.ndarray,
    audit: np.ndarray,
    choice: tuple[float, float],
    selection_epsilon: float,
    delta: float,
    beta: float,
) -> AuditResult:
    eps, count = _bound(scores, included, tie_key, audit, choice, delta, beta)
    return AuditResult(
        epsilon=eps,
        num_canaries=len(audit),
        num_guesses=count.num_guesses,
        num_correct=count.num_correct,
        guesses_in=count.guesses_in,
        guesses_out=count.guesses_out,
        correct_in=count.correct_in,
        correct_out=count.correct_out,
        delta=delta,
        beta=beta,
        rule="holdout",
        choice=tuple(choice),
        selection_canaries=len(select),
        selection_epsilon=selection_epsilon,
    )


def audit_from_scores(
    scores: np.ndarray,
    included: np.ndarray,
    *,
    delta: float,
    beta: float = DEFAULT_BETA,
    choices: Sequence[tuple[float, float]] = DEFAULT_CHOICES,
    holdout_seed: int = 0,
) -> AuditResult:
    """One-run ε lower bound from canary scores, the guess counts chosen on a held-out half.

    Args:
        scores: float (m,), the auditor's score of each canary (higher = more likely
            included); finite.
        included: bool (m,), each canary's coin, aligned with ``scores``.
        delta: δ of the guarantee being audited, in [0, 1].
        beta: significance level in (0, 1).
        choices: candidate (fraction "in", fraction "out") of a half's canaries,
            rounded to counts; tried on the selection half.
        holdout_seed: seed of the random split into halves and of the tie-breaking key.

    Returns:
        An :class:`AuditResult`.
    """
    scores, included = _check_scores(scores, included, choices)
    if scores.ndim != 1:
        raise ValueError("scores and included must be 1-D, of equal length >= 2")
    return select_and_audit(
        scores[None], included, delta=delta, beta=beta, choices=choices, holdout_seed=holdout_seed
    )[1]


def select_and_audit(
    scores: np.ndarray,
    included: np.ndarray,
    *,
    delta: float,
    beta: float = DEFAULT_BETA,
    choices: Sequence[tuple[float, float]] = DEFAULT_CHOICES,
    holdout_seed: int = 0,
) -> tuple[int, AuditResult]:
    """One-run ε bound of the best of several attacks, chosen with the guesses on held-out canaries.

    The largest of several per-attack bounds is not a 95 % bound (each is one at level
    β; their maximum is exceeded by chance more often). Here the attack is chosen as
    the guess counts are: on the selection half of one random split, every (attack,
    choice) pair is tried and the one with the largest bound is kept (the first among
    equals, attacks in the given order); the bound is that pair's on the audit half
    alone. Conditioned on the selection half the choice is fixed, so the theorem applies
    on the audit half as for one attack (see the module docstring). With one attack
    this is :func:`audit_from_scores`.

    Args:
        scores: float A×m, attack ``a``'s score of each canary (higher = more likely
            included); finite.
        included: bool (m,), each canary's coin.
        delta: δ of the guarantee being audited.
        beta: significance level in (0, 1).
        choices: candidate guess fractions, as :func:`audit_from_scores`.
        holdout_seed: seed of the one split (and tie-breaking key) for all attacks.

    Returns:
        ``(a, result)``: the chosen attack's row in ``scores`` and its :class:`AuditResult`.
    """
    scores, included = _check_scores(scores, included, choices)
    if scores.ndim != 2 or len(scores) == 0:
        raise ValueError("scores must be 2-D (attacks × canaries) with at least one attack")
    select, audit, tie_key = _halves(len(included), holdout_seed)
    tried = np.array(
        [[_bound(s, included, tie_key, select, c, delta, beta)[0] for c in choices] for s in scores]
    )  # A × choices
    a, c = np.unravel_index(int(np.argmax(tried)), tried.shape)  # first among equals
    return int(a), _result(
        scores[a], included, tie_key, select, audit, choices[c], float(tried[a, c]), delta, beta
    )


def audit_attacks(
    names: Sequence[str],
    mdm: pd.DataFrame,
    canaries: pd.Series,
    target: int,
    *,
    attack_rounds: Iterable[int] | None = None,
    ddof: int = 0,
    outlier_filter: Mapping[str, bool] | None = None,
    lira: LiraOptions = DEFAULT_LIRA,
    rmia: RmiaOptions = DEFAULT_RMIA,
    population: Sequence[int] | np.ndarray | None = None,
    delta: float,
    beta: float = DEFAULT_BETA,
    seed: int = 0,
    partial: bool = False,
) -> pd.DataFrame:
    """The one-run ε audit of each attack (aligned protocol) on the target's canaries.

    Each attack scores every canary against ``target`` as it scores a sample (the
    other clients, none of which trains on a canary, are FedMIA's references); a
    single-round attack at the last attacked round (no hindsight: picking a round on
    the canaries would void the bound), a multi-round one over the attacked rounds.

    Partial participation (``partial``): the target is sampled like every client (the
    draw does not depend on the coins), so the canaries are audited in the rounds the
    draw gave it, as the attack stage attacks a target: a single-round attack at the last
    attacked round it took part in, a multi-round one over the rounds of
    :func:`fedmia.attacker.attacks.target_rounds` (FedMIA, LiRA, RMIA: those with at least
    :data:`~fedmia.attacker.attacks.MIN_REFERENCES` other participants, the round's other
    participants their references). An attack without such a round has no row; a
    target that took part in no attacked round gives no row at all (logged).
    :func:`fedmia.privacy.audit.audit_from_scores` turns the scores and the coins into the
    lower bound on ε at ``delta`` (guess counts chosen on a held-out half). Each such
    row is a bound at level β for *that* attack, chosen before the audit; the largest
    of them is not. One more row, ``attack = "selected"``
    (:func:`fedmia.privacy.audit.select_and_audit`), chooses the attack and the guess counts
    together on the selection half of one split and bounds ε on the other half: the
    audit of "the best attack", at level β.

    Args:
        names: attack names.
        mdm: measure table holding the canaries' rows.
        canaries: ``sample_id`` → bool, the canary's coin (True: in the target's data).
        target: the client the canaries may have joined.
        attack_rounds: as :func:`run_attacks`.
        ddof: as :func:`run_attacks`.
        outlier_filter: as :func:`run_attacks`.
        lira: as :func:`run_attacks`.
        rmia: as :func:`run_attacks`.
        population: sample ids of held-out samples of the measure table, RMIA's
            population (needed by RMIA attacks only): the canaries and these samples are
            cross-fitted as the evaluation set is (each canary is scored against the
            population of the other half; coins seeded by ``seed``). LiRA's pooled or
            shrunk variance is fitted over the canaries and these samples.
        delta: δ of the guarantee audited.
        beta: significance level of the bound.
        seed: seed of the held-out split (e.g. the cell's).
        partial: the measure table holds the rounds' participants only
            (:meth:`fedmia.attacker.attacks.MeasureCube.from_frame`, ``partial``).

    Returns:
        One row per attack, then the ``selected`` row (its ``selected_attack`` names the
        chosen attack, its ``round`` is that attack's), :data:`fedmia.core.contracts.AUDIT_COLUMNS`;
        ``round`` −1 for a multi-round score. No row without an attacked round (of the
        target's, under partial participation).
    """
    specs = [ATTACKS.get(n) for n in names]
    ids = np.sort(canaries.index.to_numpy())
    pop = np.setdiff1d(
        np.asarray(population if population is not None else [], dtype=np.int64), ids
    )
    if population is None and any(s.kind == "rmia" for s in specs):
        raise ValueError(
            "the audit of an RMIA attack needs a population: pass the held-out "
            "evaluation samples' ids (population=...)"
        )
    lacking = np.setdiff1d(np.r_[ids, pop], mdm["sample_id"].unique())
    if len(lacking):
        raise ValueError(
            f"the measure table lacks {len(lacking)} canaries or population "
            f"samples, e.g. sample_id {lacking[0]}{REMEASURE}"
        )
    cube = MeasureCube.from_frame(
        mdm[mdm["sample_id"].isin(np.r_[ids, pop])],
        sorted({m for s in specs for m in s.measures}),
        partial=partial,
    )
    is_canary = np.isin(cube.sample_ids, ids)
    included = canaries.reindex(cube.sample_ids[is_canary]).to_numpy().astype(bool)
    attacked = attacked_mask(cube, attack_rounds)
    if partial and target not in cube.clients:
        log.warning("audit: target client %d took part in no observed round: no audit row", target)
        return pd.DataFrame(columns=list(AUDIT_COLUMNS))
    t = cube.client_index(target)
    present = cube.present
    own = attacked if present is None else attacked & present[:, t]  # the target's rounds
    if attacked.any() and not own.any():
        log.warning("audit: target client %d took part in no attacked round: no audit row", target)
    filt = dict(outlier_filter or {})
    halves = calibrated.crossfit_halves(
        len(cube.sample_ids), uncertainty.stable_seed(seed, RMIA_HALVES)
    )
    out, scored = [], []
    for spec in specs:
        used = target_rounds(spec.kind, t, attacked, present)
        if not used.any():
            if own.any():
                log.info(
                    "audit: %s has no attacked round with enough other participants for "
                    "target client %d: no row",
                    spec.name,
                    target,
                )
            continue
        xs = [sign * cube.values[m] for m, sign in spec.signals]
        scores = score_slots(
            spec,
            xs,
            t,
            attacked,
            ddof=ddof,
            outlier_filter=filt.get(spec.name, False),
            lira=lira,
            rmia=rmia,
            population=~is_canary,
            halves=halves,
            present=present,
        )[:, is_canary]
        if spec.kind == "single":
            last = int(np.flatnonzero(used)[-1])
            rnd, sc = int(cube.rounds[last]), scores[last]
        else:
            rnd, sc = MULTI_ROUND, scores[0]
        res = audit_from_scores(
            sc,
            included,
            delta=delta,
            beta=beta,
            holdout_seed=uncertainty.stable_seed(seed, spec.name),
        )
        out.append(_audit_row(spec.name, target, rnd, res, ""))
        scored.append((spec.name, rnd, sc))
    if scored:
        a, res = select_and_audit(
            np.stack([sc for _, _, sc in scored]),
            included,
            delta=delta,
            beta=beta,
            holdout_seed=uncertainty.stable_seed(seed, SELECTED),
        )
        out.append(_audit_row(SELECTED, target, scored[a][1], res, scored[a][0]))
    return pd.DataFrame(out, columns=list(AUDIT_COLUMNS))


def _audit_row(
    attack: str, target: int, rnd: int, res: AuditResult, selected: str
) -> dict[str, Any]:
    return {
        "attack": attack,
        "target": target,
        "round": rnd,
        "epsilon_empirical": res.epsilon,
        "num_canaries": res.num_canaries,
        "num_guesses": res.num_guesses,
        "num_correct": res.num_correct,
        "delta": res.delta,
        "beta": res.beta,
        "rule": res.rule,
        "choice": f"{res.choice[0]:g} in / {res.choice[1]:g} out",
        "selected_attack": selected,
    }
