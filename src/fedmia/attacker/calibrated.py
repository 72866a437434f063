"""LiRA and RMIA from the server's view: the other clients' uploads as reference models.

Pure numpy. At an observed round the server holds K uploads; for target client ``t`` the
K − 1 others are reference models, trained without ``t``'s data: for a member of ``t``
every reference is OUT, for another client's sample exactly one (its owner) is IN, for a
held-out sample none. FedMIA (:func:`fedmia.attacker.attacks.fedmia_cdf`) is, in effect,
an offline LiRA on these references; this module holds the stronger calibrations of the
centralized literature, computed on the same arrays: a score ``s`` (``sign × measure``,
higher = member) of every slot under the target's upload, (..., S), and under the M
references, (..., M, S), with optional bool weights (..., M, S) saying which reference
values count (the official protocol's ``self_mix = false``).

**LiRA, offline** (Carlini et al. 2022, "Membership inference attacks from first
principles"), :func:`lira_z`: an OUT Gaussian N(μ, σ²) per slot over its reference values
and the one-sided z = (s − μ)/σ; the per-round score is Φ(z). Options
(:class:`LiraOptions`, ``attack.lira``):

* ``location``: μ is the ``mean`` (default, as LiRA) or the ``median`` of the references;
* ``variance`` — σ² of each slot, always about the references' mean:

  - ``per_sample``: its own references' variance, ``SS / (n − ddof)``;
  - ``pooled``: one variance per round, ``Σ SS / Σ (n − ddof)`` over the round's slots
    (LiRA's "global variance" for few references);
  - ``shrunk`` (default): empirical Bayes between the two, limma's moderated variance
    (Smyth 2004): with d = n − 1 and s² = SS / d, a scaled inverse-χ² prior (d₀, s₀²) is
    fitted per round by moments of log s² over the round's slots
    (:func:`fit_variance_prior`), and σ² = (d₀ s₀² + d s²) / (d₀ + d); d₀ → ∞ (no excess
    spread of log s² over its sampling spread) gives the pooled s₀², d₀ → 0 the
    per-sample s². ``ddof`` does not apply (the model fixes d = n − 1);

  plus a floor of 1e-8, as FedMIA's. The prior's fit uses every slot of the round, members
  and non-members alike, and no membership label.

With ``location = mean``, ``variance = per_sample`` and ``ddof = 0`` the LiRA score Φ(z)
is FedMIA's (Eq. 10) without its outlier filter, bit for bit (``tests/test_calibrated.py``).

**RMIA, offline** (Zarifzadeh et al. 2024, "Low-cost high-power membership inference
attacks"), :func:`rmia_log_lr`: the signal is p_y, handled as log p_y = −loss (the loss
is float64 from the logits, :func:`fedmia.attacker.measures.logit_statistics`):
LR(x) = Pr(x | θ_t) / Pr(x) with Pr(x) = ½((1 + a)·mean_k Pr(x | θ_k) + (1 − a)) over the
references (the offline approximation; ``a`` fixed, :class:`RmiaOptions`), in log space.
The score of x is the fraction of population samples z with LR(x) / LR(z) ≥ γ
(:func:`rmia_fraction`: one sort of the population, O((N_x + N_z) log N_z)). The
population is the held-out samples; population and scored samples are kept disjoint by
**cross-fitting** (:func:`crossfit_rmia`): every slot gets a seeded coin
(:func:`crossfit_halves`, independent of membership) and is scored against the held-out
slots of the *other* half, so no sample is lost and the FPR resolution is unchanged.
RMIA on the cosine is not defined (the cosine is no likelihood).

**Rounds and measures.** Per round a LiRA slot has a z (and a score Φ(z)), an RMIA slot
a log LR. The paper's combination averages the per-round scores; under a working IN model
N(μ_r + cσ_r, σ_r²), the log-likelihood ratio summed over independent rounds is monotone
in Σ_r z_r for any c > 0, so ``sum`` attacks add the z (over rounds and, for a combined
attack, over measures) and RMIA's add log LR_r before comparing with log γ. Rounds (and
the loss and the cosine of one sample) are correlated, so a sum is a working
combination, not the likelihood ratio itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.special import digamma, logsumexp, ndtr, polygamma

#: The variance floor added to every reference variance (FedMIA's ``var + 1e-8``).
VAR_FLOOR = 1e-8
#: LiRA's rules for σ² (:class:`LiraOptions`).
VARIANCE_RULES = ("per_sample", "pooled", "shrunk")
#: LiRA's estimates of μ (:class:`LiraOptions`).
LOCATIONS = ("mean", "median")
#: How a multi-round calibrated attack combines rounds (and measures): the mean of the
#: per-round scores (the paper's) or the sum of the per-round statistics (z, log LR).
COMBINES = ("mean", "sum")


@dataclass(frozen=True)
class LiraOptions:
    """How LiRA's OUT Gaussian is estimated (``attack.lira``; see the module docstring).

    Attributes:
        variance: ``per_sample``, ``pooled`` or ``shrunk`` (:data:`VARIANCE_RULES`).
        location: ``mean`` or ``median`` (:data:`LOCATIONS`).
        ddof: 0 or 1, of the ``per_sample`` and ``pooled`` variances.
        var_floor: added to every variance.
    """

    variance: str = "shrunk"
    location: str = "mean"
    ddof: int = 1
    var_floor: float = VAR_FLOOR

    def __post_init__(self) -> None:
        if self.variance not in VARIANCE_RULES:
            raise ValueError(
                f"unknown LiRA variance rule {self.variance!r}; set "
                f"attack.lira.variance to one of {list(VARIANCE_RULES)}"
            )
        if self.location not in LOCATIONS:
            raise ValueError(
                f"unknown LiRA location {self.location!r}; set "
                f"attack.lira.location to one of {list(LOCATIONS)}"
            )
        if self.ddof not in (0, 1):
            raise ValueError(
                f"LiRA's ddof must be 0 or 1; got {self.ddof!r}: set attack.lira.ddof to 0 or 1"
            )
        if not (self.var_floor >= 0 and math.isfinite(self.var_floor)):
            raise ValueError(f"the variance floor must be finite and >= 0; got {self.var_floor!r}")


@dataclass(frozen=True)
class RmiaOptions:
    """RMIA's fixed parameters (``attack.rmia``), never fit on membership labels.

    Attributes:
        a: the offline approximation's ``a`` in [0, 1]: Pr(x) = ½((1 + a)·Pr_OUT(x) +
            (1 − a)); 0.3 as ML Privacy Meter's default (the RMIA paper fits it on
            reference models; here it is a config value, and a sweep is sensitivity only).
        gamma: γ > 0, the likelihood-ratio threshold against each population sample (1 as
            the paper's default).
    """

    a: float = 0.3
    gamma: float = 1.0

    def __post_init__(self) -> None:
        if not (isinstance(self.a, int | float) and 0 <= self.a <= 1):
            raise ValueError(
                f"RMIA's a must be a number in [0, 1]; got {self.a!r}: set "
                "attack.rmia.a in [0, 1] (0.3 by default)"
            )
        if not (isinstance(self.gamma, int | float) and 0 < self.gamma < math.inf):
            raise ValueError(
                f"RMIA's gamma must be a finite number > 0; got "
                f"{self.gamma!r}: set attack.rmia.gamma > 0 (1 by default)"
            )


#: The default options (module-level, immutable: the default arguments of the callers).
DEFAULT_LIRA = LiraOptions()
DEFAULT_RMIA = RmiaOptions()


# ----------------------------------------------------------------------------- moments


def _weights(reference: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """Bool weights of ``reference`` (..., M, S), checked: every slot keeps a value."""
    w = (
        np.ones(reference.shape, dtype=bool)
        if weights is None
        else np.broadcast_to(np.asarray(weights, dtype=bool), reference.shape)
    )
    if not w.any(axis=-2).all():
        raise ValueError("every slot needs at least one reference value")
    return w


def moments(x: np.ndarray, w: np.ndarray, ddof: int) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean and variance over axis −2 (``w`` bool, same shape as ``x``).

    The variance divides by ``max(n − ddof, 1)`` for ``n`` values (0 for a single value).
    FedMIA's and LiRA's ``per_sample`` moments (one function: the equality of the two is
    exact).
    """
    n = w.sum(axis=-2)
    mu = np.where(w, x, 0.0).sum(axis=-2) / np.maximum(n, 1)
    ss = np.where(w, (x - mu[..., None, :]) ** 2, 0.0).sum(axis=-2)
    return mu, ss / np.maximum(n - ddof, 1)


def trigamma_inverse(x: float) -> float:
    """The y > 0 with ψ'(y) = x (x > 0), by limma's Newton iteration on 1/ψ' (Smyth 2004)."""
    if not x > 0:
        raise ValueError(f"trigamma_inverse needs x > 0; got {x}")
    if x > 1e7:
        return 1 / math.sqrt(x)
    if x < 1e-6:
        return 1 / x
    y = 0.5 + 1 / x
    for _ in range(50):
        tri = float(polygamma(1, y))
        dif = tri * (1 - tri / x) / float(polygamma(2, y))
        y += dif
        if -dif / y < 1e-8:
            break
    return y


def _elementwise(f: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
    """``f(x)`` for an elementwise ``f``, evaluated once when every ``x`` is the same value.

    The usual case (every slot has the same reference count, so one ψ and ψ' serve all
    S slots); the values are the ones ``f(x)`` gives, element for element.
    """
    if len(x) > 1 and (x == x[0]).all():
        return np.full(len(x), f(x[:1])[0])
    return f(x)


def fit_variance_prior(s2: np.ndarray, d: np.ndarray) -> tuple[float, float]:
    """Fit a scaled inverse-χ² prior to sample variances: limma's ``fitFDist``.

    Model (Smyth 2004): ``s²_i | σ²_i ~ σ²_i χ²_{d_i} / d_i`` and
    ``1/σ²_i ~ χ²_{d₀} / (d₀ s₀²)``. With ``e_i = log s²_i − ψ(d_i/2) + log(d_i/2)``:
    E e = log s₀² + ψ(d₀/2) − log(d₀/2) and Var e = mean ψ'(d_i/2) + ψ'(d₀/2), solved by
    moments; where the spread of ``e`` does not exceed its sampling part, d₀ = ∞ and s₀²
    is the mean of the s² (limma's choice since 2017). Zero variances are lifted to
    1e-5 × the median first (as limma).

    Args:
        s2: float U, sample variances (SS / d).
        d: float U, their degrees of freedom (> 0).

    Returns:
        ``(d0, s0_squared)``; d0 may be ``inf``.
    """
    s2 = np.maximum(np.asarray(s2, dtype=np.float64), 0.0)
    d = np.asarray(d, dtype=np.float64)
    if len(s2) < 2:
        return math.inf, float(s2.mean()) if len(s2) else 1.0
    m = float(np.median(s2))
    s2 = np.maximum(s2, 1e-5 * (m if m > 0 else 1.0))
    e = np.log(s2) - _elementwise(digamma, d / 2) + np.log(d / 2)
    emean = float(e.mean())
    evar = float(e.var(ddof=1)) - float(_elementwise(lambda y: polygamma(1, y), d / 2).mean())
    if evar > 0:
        d0 = 2 * trigamma_inverse(evar)
        return d0, math.exp(emean + float(digamma(d0 / 2)) - math.log(d0 / 2))
    return math.inf, float(s2.mean())


def _shrunk(ss: np.ndarray, n: np.ndarray) -> np.ndarray:
    """The limma moderated variance of every slot (…, S), one prior per leading index."""
    d = np.maximum(n - 1, 0).astype(np.float64)
    flat_ss, flat_d = ss.reshape(-1, ss.shape[-1]), d.reshape(-1, d.shape[-1])
    out = np.empty_like(flat_ss)
    for i, (row_ss, row_d) in enumerate(zip(flat_ss, flat_d, strict=True)):
        ok = row_d > 0
        d0, s0 = fit_variance_prior(row_ss[ok] / row_d[ok], row_d[ok])
        out[i] = s0 if math.isinf(d0) else (d0 * s0 + row_ss) / (d0 + row_d)
    return out.reshape(ss.shape)


def out_gaussian(
    reference: np.ndarray, weights: np.ndarray | None = None, options: LiraOptions = DEFAULT_LIRA
) -> tuple[np.ndarray, np.ndarray]:
    """LiRA's OUT Gaussian of every slot: μ and σ² (floor included).

    Args:
        reference: float (..., M, S), the slots' scores under M reference models; the
            leading axes (e.g. rounds) get a prior / pooled variance each.
        weights: optional bool (..., M, S), which reference values count.
        options: :class:`LiraOptions`.

    Returns:
        ``(mu, var)``, float64 (..., S) each.
    """
    x = np.asarray(reference, dtype=np.float64)
    w = _weights(x, weights)
    n = w.sum(axis=-2)
    mean = np.where(w, x, 0.0).sum(axis=-2) / n
    ss = np.where(w, (x - mean[..., None, :]) ** 2, 0.0).sum(axis=-2)
    if options.location == "mean":
        mu = mean
    else:
        mu = np.nanmedian(np.where(w, x, np.nan), axis=-2)
    if options.variance == "per_sample":
        var = ss / np.maximum(n - options.ddof, 1)
    elif options.variance == "pooled":
        pooled = ss.sum(axis=-1) / np.maximum(n - options.ddof, 1).sum(axis=-1)
        var = np.broadcast_to(pooled[..., None], ss.shape)
    else:
        var = _shrunk(ss, n)
    return mu, var + options.var_floor


def lira_z(
    target: np.ndarray,
    reference: np.ndarray,
    *,
    weights: np.ndarray | None = None,
    options: LiraOptions = DEFAULT_LIRA,
) -> np.ndarray:
    """LiRA's one-sided z = (s_t − μ_OUT) / σ_OUT of every slot (offline LiRA).

    Args:
        target: float (..., S), the score under the target's upload.
        reference: float (..., M, S), under M ≥ 2 reference uploads.
        weights: optional bool (..., M, S).
        options: :class:`LiraOptions`.

    Returns:
        float64 (..., S); Φ(z) is the per-round score (:func:`lira_cdf`).
    """
    if reference.shape[-2] < 2:
        raise ValueError(
            f"LiRA needs at least 2 reference (non-target) clients; got "
            f"{reference.shape[-2]}: use num_clients >= 3 or drop the LiRA "
            "attacks"
        )
    if options.variance == "per_sample" and options.location == "mean":
        # FedMIA's moments, so that this configuration is FedMIA's score bit for bit
        mu, var = moments(reference, _weights(reference, weights), options.ddof)
        return (target - mu) / np.sqrt(var + options.var_floor)
    mu, var = out_gaussian(reference, weights, options)
    return (target - mu) / np.sqrt(var)


def lira_cdf(
    target: np.ndarray,
    reference: np.ndarray,
    *,
    weights: np.ndarray | None = None,
    options: LiraOptions = DEFAULT_LIRA,
) -> np.ndarray:
    """Φ(:func:`lira_z`): the per-round LiRA score in [0, 1]."""
    return ndtr(lira_z(target, reference, weights=weights, options=options))


# -------------------------------------------------------------------------------- RMIA


def rmia_log_lr(
    target: np.ndarray, reference: np.ndarray, *, weights: np.ndarray | None = None, a: float = 0.3
) -> np.ndarray:
    """Offline RMIA's log LR(x) = log Pr(x | θ_t) − log Pr(x), in log space.

    Pr(x) = ½((1 + a)·P_OUT(x) + (1 − a)), P_OUT(x) the mean over the (weighted) references
    of Pr(x | θ_k); computed as log-sum-exps of log-probabilities, so that p_y near 0 or 1
    keeps its precision.

    Args:
        target: float (..., S), log Pr(x | θ_t) = log p_y (= −loss) under the target.
        reference: float (..., M, S), log p_y under M ≥ 1 references.
        weights: optional bool (..., M, S).
        a: in [0, 1].

    Returns:
        float64 (..., S).
    """
    RmiaOptions(a=a)  # validates a
    x = np.asarray(reference, dtype=np.float64)
    w = _weights(x, weights)
    log_out = logsumexp(np.where(w, x, -np.inf), axis=-2) - np.log(w.sum(axis=-2))
    with np.errstate(divide="ignore"):  # a = 1: log(1 − a) = −inf, as it should be
        log_pr = np.logaddexp(math.log1p(a) + log_out, math.log(1 - a) if a < 1 else -np.inf)
    return np.asarray(target, dtype=np.float64) - (log_pr - math.log(2))


def rmia_fraction(llr_x: np.ndarray, llr_z: np.ndarray, gamma: float = 1.0) -> np.ndarray:
    """RMIA's score: the fraction of population samples z with LR(x) / LR(z) ≥ γ.

    In log space, log LR(z) ≤ log LR(x) − log γ; one sort of the population and a binary
    search per x: O((N_x + N_z) log N_z).

    Args:
        llr_x: float N_x, log LR of the scored samples.
        llr_z: float N_z ≥ 1, log LR of the population.
        gamma: γ > 0.

    Returns:
        float64 N_x in [0, 1], multiples of 1 / N_z.
    """
    z = np.sort(np.asarray(llr_z, dtype=np.float64))
    if len(z) == 0:
        raise ValueError("RMIA needs a non-empty population")
    return np.searchsorted(z, np.asarray(llr_x) - math.log(gamma), side="right") / len(z)


def crossfit_halves(n_slots: int, seed: int | np.random.SeedSequence) -> np.ndarray:
    """A seeded fair coin per slot (bool S): the cross-fitting halves of RMIA.

    Drawn from ``seed`` and the number of slots only, hence independent of membership.
    """
    return np.random.default_rng(seed).random(n_slots) < 0.5


def crossfit_rmia(
    llr: np.ndarray, population: np.ndarray, halves: np.ndarray, gamma: float = 1.0
) -> np.ndarray:
    """RMIA scores of every slot, each against the population of the other half.

    Args:
        llr: float S, log LR of every slot.
        population: bool S, the slots that may serve as population z (held-out samples).
        halves: bool S, each slot's half (:func:`crossfit_halves`).
        gamma: γ > 0.

    Returns:
        float64 S: slot i's :func:`rmia_fraction` against the population slots j with
        ``halves[j] != halves[i]`` (a slot is never its own population).

    Raises:
        ValueError: a half whose slots have no population slot in the other half.
    """
    llr = np.asarray(llr, dtype=np.float64)
    population = np.asarray(population, dtype=bool)
    halves = np.asarray(halves, dtype=bool)
    out = np.empty(len(llr))
    for h in (False, True):
        scored = halves == h
        if not scored.any():
            continue
        pop = population & ~scored
        if not pop.any():
            raise ValueError(
                f"RMIA's cross-fitting left half {int(h)} without a held-out "
                f"population in the other half ({int(population.sum())} held-out "
                "slot(s) in all): raise the partition's eval_nonmembers"
            )
        out[scored] = rmia_fraction(llr[scored], llr[pop], gamma)
    return out
