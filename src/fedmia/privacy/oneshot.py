"""One-shot empirical privacy estimate for federated learning (Andrew et al., ICLR 2024).

*One-shot empirical privacy estimation for federated learning* (arXiv 2302.03098). Beside
the K real clients, ``n`` **canary clients** take part in training, each sampled like any
client; a canary's update is a fixed random direction ``u_c``, uniform on the unit sphere
of the ``d`` trainable parameters (:func:`canary_directions`), scaled to the clip norm of
the defense (or, without clipping, to the round's median update norm) and passed through
the defense like every client's update (:func:`fedmia.federation.fedavg.run_fedavg`).
Further ``m`` **null canaries** are drawn the same way but never inserted.

**Sign.** fedmia's uploads are ``Δ_k = w_r − w_local`` and the server steps
``w_{r+1} = w_r − Σ_k a_k Δ_k``. A canary uploads ``Δ_c = s · u_c`` (``s`` its scale, before
the defense's noise), so it moves the model by ``−a_c s u_c``. The statistics therefore use
the model delta in the uploads' sign, ``w_r − w_{r+1}`` per round and ``w_0 − w_T`` in
total: an inserted canary has a positive expected cosine with it, a null canary zero.

**Statistics** (cosines on the trainable-parameter coordinates,
:func:`fedmia.federation.fedavg.canary_cosines`):

* final model: ``cos(u_c, w_0 − w_T)`` of each inserted canary. A null canary is
  independent of the model delta, so its cosine has mean 0 and variance exactly ``1/d``,
  approximately Gaussian for large ``d``: the null is N(0, 1/d), used for ``d ≥``
  :data:`MIN_DIM` (:func:`estimate_final`);
* all iterates: ``max_r cos(u_c, w_{r−1} − w_r)``, the maximum over the rounds; its null is
  fitted (Gaussian mean and std) to the same statistic of the null canaries
  (:func:`estimate_all_iterates`).

**ε.** The inserted canaries' statistic is summarised by a Gaussian N(μ₁, σ₁²) (sample mean,
std with ddof 1), the null by N(μ₀, σ₀²); ε is the smallest ε ≥ 0 at which the pair of
Gaussians is (ε, δ)-indistinguishable in both orders (:func:`gaussian_epsilon`, from the
exact privacy profile :func:`gaussian_delta`, unequal variances allowed). This is an
**estimate, not a bound**: it describes how far one canary's presence is seen by an
observer of the aggregate / final model (under fedmia's ``uploads`` view the server sees
each canary's own upload and learns more), with the Gaussian fit standing in for the true
distributions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.special import log_ndtr, ndtr

from fedmia.core.lazy import torch

#: The format tag of a one-shot result (``results/oneshot/{cell}.json``).
ONESHOT_FORMAT = "oneshot/1"
#: What the result is: said in every result and table that shows it.
ESTIMATE = "one-shot empirical estimate, not a bound"
#: Whom the estimate is about.
APPLIES_TO = "the observer of the aggregate / final model"
#: The smallest number of trainable parameters for which the final-model null N(0, 1/d)
#: is used (Andrew et al.: the cosine of a random direction is close to Gaussian there).
MIN_DIM = 1000
#: Spawn key of the canaries' random stream (1-7 are :mod:`fedmia.federation.partition`'s
#: and :mod:`fedmia.attacker.attacks`' streams).
STREAM_CANARY = 8
#: The two kinds of canaries: key of their directions' generators.
INSERTED, NULL = 0, 1


def canary_directions(num: int, dim: int, seed: int, kind: int = INSERTED) -> torch.Tensor:
    """``num`` directions uniform on the unit sphere of R^dim (float32 num×dim, CPU).

    Row ``j`` is a normalised standard Gaussian vector drawn on the CPU by a torch generator
    seeded from ``(seed,`` :data:`STREAM_CANARY` ``, kind, j)``: the same for any ``num`` and
    any device the run uses; the inserted (``kind`` :data:`INSERTED`) and null
    (:data:`NULL`) canaries are independent.
    """
    if num < 0 or dim < 1:
        raise ValueError(f"need num ≥ 0 canaries and dim ≥ 1 (got num={num}, dim={dim})")
    out = torch.empty(num, dim, dtype=torch.float32)
    gen = torch.Generator()
    for j in range(num):
        key = np.random.SeedSequence([seed, STREAM_CANARY, kind, j]).generate_state(2, np.uint64)
        gen.manual_seed(int(key[0] >> np.uint64(2)))
        torch.randn(dim, generator=gen, out=out[j])
        out[j] /= torch.linalg.vector_norm(out[j], dtype=torch.float64).to(torch.float32)
    return out


def _log_prob(lo: float, hi: float) -> float:
    """The log of P(lo < Z < hi) for a standard normal Z (accurate far in either tail)."""
    if lo >= hi:
        return -math.inf
    if lo > 0:  # both in the upper tail: P(−hi < Z < −lo)
        lo, hi = -hi, -lo
    la = float(log_ndtr(hi))
    lb = float(log_ndtr(lo))
    if lb == -math.inf:
        return la
    return la + math.log1p(-math.exp(min(lb - la, 0.0)))


def _profile(eps: float, m: float, s: float) -> float:
    """δ(ε) of P = N(m, s²) against Q = N(0, 1): ``sup_S P(S) − e^ε Q(S)``.

    The supremum is attained on S = {z : log p(z)/q(z) > ε}, where the log-likelihood
    ratio minus ε is the quadratic ``A z² + B z + C`` with ``A = (1 − 1/s²)/2``,
    ``B = m/s²``, ``C = −ln s − m²/(2s²) − ε``: a half-line when ``A = 0`` (equal
    variances), the outside of its roots when ``A > 0``, the inside when ``A < 0``.
    """
    a = 0.5 * (1.0 - 1.0 / s**2)
    b = m / s**2
    c = -math.log(s) - m**2 / (2 * s**2) - eps
    if abs(a) < 1e-12 * max(1.0, abs(b)):  # equal variances: a half-line
        if b == 0:
            return 0.0
        t = -c / b
        parts = [(t, math.inf)] if b > 0 else [(-math.inf, t)]
    else:
        disc = b * b - 4 * a * c
        if disc <= 0:
            parts = [(-math.inf, math.inf)] if a > 0 else []
        else:
            q = -0.5 * (b + math.copysign(math.sqrt(disc), b))
            r1, r2 = sorted((q / a, c / q))
            parts = [(-math.inf, r1), (r2, math.inf)] if a > 0 else [(r1, r2)]
    if not parts:
        return 0.0
    p = sum(float(ndtr((hi - m) / s) - ndtr((lo - m) / s)) for lo, hi in parts)
    log_q = float(np.logaddexp.reduce([_log_prob(lo, hi) for lo, hi in parts]))
    return max(0.0, p - math.exp(min(eps + log_q, 700.0)))


def gaussian_delta(eps: float, mu0: float, sigma0: float, mu1: float, sigma1: float) -> float:
    """The privacy profile δ(ε) of the pair N(μ₀, σ₀²), N(μ₁, σ₁²): both orders, the larger.

    ``max(sup_S P₁(S) − e^ε P₀(S), sup_S P₀(S) − e^ε P₁(S))``, computed exactly from the
    likelihood-ratio regions (:func:`_profile`). Equal variances give Gaussian DP's
    ``Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2)`` with ``μ = |μ₁ − μ₀| / σ``.
    """
    if not (sigma0 > 0 and sigma1 > 0):
        raise ValueError(f"the Gaussians need positive stds (got {sigma0}, {sigma1})")
    return max(
        _profile(eps, (mu1 - mu0) / sigma0, sigma1 / sigma0),
        _profile(eps, (mu0 - mu1) / sigma1, sigma0 / sigma1),
    )


def gaussian_epsilon(
    delta: float, mu0: float, sigma0: float, mu1: float, sigma1: float, *, tol: float = 1e-9
) -> float:
    """The smallest ε ≥ 0 with :func:`gaussian_delta` ``(ε) ≤ δ`` (bisection).

    δ(ε) is non-increasing in ε: the upper end doubles from 1 until δ(hi) ≤ δ (``inf`` past
    2⁶⁰), then bisection to an absolute width ``tol`` (relative above 1); the upper end is
    returned. A zero std (a point mass): ε = 0 against the same point mass, else ∞.

    Raises:
        ValueError: δ outside (0, 1) or a non-finite argument.
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1) (got {delta})")
    if not all(math.isfinite(v) for v in (mu0, sigma0, mu1, sigma1)):
        raise ValueError(f"non-finite Gaussian parameters {(mu0, sigma0, mu1, sigma1)}")
    if sigma0 <= 0 or sigma1 <= 0:  # a point mass: told apart from anything else
        return 0.0 if (sigma0, mu0) == (sigma1, mu1) else math.inf

    def f(e: float) -> float:
        return gaussian_delta(e, mu0, sigma0, mu1, sigma1)

    if f(0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while f(hi) > delta:
        lo, hi = hi, 2 * hi
        if hi > 2.0**60:
            return math.inf
    while hi - lo > tol * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if f(mid) <= delta else (mid, hi)
    return hi


def _mean_std(values: Sequence[float] | np.ndarray, what: str) -> tuple[float, float]:
    """Sample mean and std (ddof 1) of finite ``values`` (at least 2)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or len(v) < 2 or not np.isfinite(v).all():
        raise ValueError(f"{what}: need at least 2 finite values (got {v.tolist()[:5]}...)")
    return float(v.mean()), float(v.std(ddof=1))


def estimate_final(cosines: Sequence[float] | np.ndarray, dim: int, delta: float) -> dict[str, Any]:
    """The final-model estimate from the inserted canaries' cosines with ``w_0 − w_T``.

    Args:
        cosines: float n (n ≥ 2), one per inserted canary.
        dim: d, the number of trainable parameters (≥ :data:`MIN_DIM`).
        delta: δ of the estimate.

    Returns:
        ``{"mean", "std", "null_std", "epsilon"}``: the canaries' Gaussian, the null's std
        ``1/√d`` (mean 0) and ε of the two at δ.

    Raises:
        ValueError: ``dim`` below :data:`MIN_DIM` (the null is not Gaussian enough), or
            fewer than 2 finite cosines.
    """
    if dim < MIN_DIM:
        raise ValueError(
            f"the final-model null N(0, 1/d) needs d ≥ {MIN_DIM} trainable parameters "
            f"(got d = {dim}); use a larger model"
        )
    mean, std = _mean_std(cosines, "final-model cosines of the inserted canaries")
    null_std = 1.0 / math.sqrt(dim)
    eps = gaussian_epsilon(delta, 0.0, null_std, mean, std)
    return {"mean": mean, "std": std, "null_std": null_std, "epsilon": eps}


def estimate_all_iterates(
    inserted: Sequence[float] | np.ndarray, null: Sequence[float] | np.ndarray, delta: float
) -> dict[str, Any]:
    """The all-iterates estimate from the maxima over rounds of the canaries' cosines.

    Args:
        inserted: float n (n ≥ 2), ``max_r cos(u_c, w_{r−1} − w_r)`` of each inserted canary
            (:func:`max_over_rounds`).
        null: float m (m ≥ 2), the same statistic of each null canary: its Gaussian fit is
            the null.
        delta: δ of the estimate.

    Returns:
        ``{"mean", "std", "null_mean", "null_std", "epsilon"}``.
    """
    mean, std = _mean_std(inserted, "all-iterates maxima of the inserted canaries")
    null_mean, null_std = _mean_std(null, "all-iterates maxima of the null canaries")
    eps = gaussian_epsilon(delta, null_mean, null_std, mean, std)
    return {"mean": mean, "std": std, "null_mean": null_mean, "null_std": null_std, "epsilon": eps}


def max_over_rounds(per_round: np.ndarray) -> np.ndarray:
    """Each canary's maximum cosine over the rounds (float64 n), rounds without a delta skipped.

    Args:
        per_round: float R×n, the cosines of the n canaries with each round's delta (NaN in
            a round whose model did not move).

    Raises:
        ValueError: no round with a model delta.
    """
    a = np.asarray(per_round, dtype=np.float64)
    rows = np.isfinite(a).all(axis=1)
    if a.ndim != 2 or not rows.any():
        raise ValueError("no round moved the model: the all-iterates statistic is undefined")
    return a[rows].max(axis=0)
