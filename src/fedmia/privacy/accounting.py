"""Accounted ε of fedmia's clipped client-level ``dp`` defense (pure computation).

The mechanism. Every round each client clips the trainable-parameter part of its
update to L2 norm ``C`` and adds ``N(0, (σC)²)`` to every coordinate of its own
upload; every client uploads every round (sampling rate 1) for ``T`` rounds, and the
attacker is the server, which sees every upload. The server averages the uploads with
equal weights, ``w_{r+1} = w_r − (1/K) Σ_k Δ̃_k`` (``dp`` has
``data_independent_weights``, :func:`fedmia.federation.fedavg.aggregation_rule`): with FedAvg's
``n_k / n`` it would learn every client's data size un-noised, and ε would be infinite
under any relation that changes a size.

The neighbouring relation: one client's local data replaced by any other dataset, of
any size (one sample changed, added or removed, or all of it). That moves the client's
clipped update by at most ``2C`` and nothing else the server sees depends on the data,
so each upload is a Gaussian mechanism with L2 sensitivity ``2C`` and noise std ``σC``.
In the units of `dp-accounting`_ (sensitivity one, the add-or-remove-one relation) that
is a Gaussian with noise multiplier ``z = σC / 2C = σ / 2`` (:func:`noise_multiplier`):
the same privacy loss distribution, a shift of ``1 / z`` in units of the noise std.
The guarantee is **client-level** against the server (it implies the sample-level one);
the ``T`` rounds compose.

Two accountants, one relation. ε at δ comes from Google's ``dp-accounting`` with both

* the RDP accountant (Rényi DP of the Gaussian, ``α / (2z²)`` per round at each order of
  ``DEFAULT_RDP_ORDERS``, converted to (ε, δ) with the improved conversion of Canonne,
  Kamath & Steinke 2020, Prop. 12 / Asoodeh et al. 2020, Eq. 20), and
* the PLD accountant (privacy loss distribution, pessimistic discretisation; the T-fold
  self-composition of a Gaussian is one Gaussian with noise ``z / √T``, which the
  accountant uses, so it is exact up to the discretisation step),

both under :data:`NEIGHBORING_RELATION` (add-or-remove-one). The PLD accountant under
``REPLACE_ONE`` would double the sensitivity internally (≈3× larger ε than RDP at the
same σ); using one constant for both keeps them comparable.

Skipping PLD. RDP is computed first. PLD's grid of privacy-loss values spans a range of
about 4·ε, so its step grows with ε: ``1e-4 · max(1, ε_RDP)`` (dp-accounting's default
step for ε ≤ 1, a relative 1e-4 above; so a bounded grid, ~0.2 s on one core, where a
fixed 1e-4 step takes a minute and GBs at ε ~ 10³). Where ``ε_RDP > pld_skip_above``
(default 10⁴: σ ≤ 0.01 at T = 1, σ ≤ 0.08 at T = 30, σ ≤ 0.25 at T = 300) PLD is
skipped and reported as ``None`` with the reason: ``e^ε`` is then far beyond floating
point and the mechanism is, for any purpose, not private; the RDP value alone says so.

No finite ε. σ = 0 (clipping without noise) has ε = ∞; so do the cases in
:data:`UNBOUNDED_REASONS` (:func:`unbounded_epsilon`): ``dp_param_noise`` (no clipping),
a model whose normalisation statistics are uploaded un-noised, and a ``compose`` in which
a step that reads the data follows ``dp``.

.. _dp-accounting: https://github.com/google/differential-privacy/tree/main/python
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import dp_accounting
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

log = logging.getLogger(__name__)

#: The neighbouring relation of both accountants: add or remove one unit (here a
#: client's whole update), sensitivity one after normalising by ``2C``.
NEIGHBORING_RELATION = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
#: Default δ of the reports.
DEFAULT_DELTA = 1e-5
#: Above this ε_RDP the PLD accountant is skipped (see the module docstring).
PLD_SKIP_ABOVE = 1e4
#: PLD discretisation step at ε ≤ 1; above, the step is this times ε_RDP.
PLD_BASE_INTERVAL = 1e-4

#: Why a configuration has no finite ε, by name (:func:`unbounded_epsilon`).
UNBOUNDED_REASONS: dict[str, str] = {
    "no_noise": "σ = 0: the clipped update is uploaded without noise, so ε = ∞",
    "dp_param_noise": (
        "dp_param_noise adds noise to an unclipped update: its sensitivity to a client's "
        "data is unbounded, so no noise scale gives a finite ε"),
    "unnoised_statistics": (
        "the model's normalisation statistics (BatchNorm running mean/var) are uploaded "
        "without clipping or noise: they are a deterministic function of the client's "
        "data, so ε = ∞ whatever σ"),
    "data_step_after_dp": (
        "in this compose a step that reads the client's data follows dp: its output is "
        "not post-processing of the noised update, so dp's ε does not bound it (ε = ∞)"),
}


@dataclass(frozen=True)
class EpsilonReport:
    """ε at δ of one ``dp`` configuration, from both accountants.

    Attributes:
        sigma: the defense's noise multiplier σ (noise std / clipping norm C).
        rounds: number of rounds T composed (every client uploads every round).
        delta: the δ at which ε is reported.
        noise_multiplier: ``z = σ / 2``, the Gaussian's noise std per unit of L2
            sensitivity under add-or-remove (0 when σ = 0; NaN for unbounded cases).
        epsilon_rdp: ε from the RDP accountant (``inf`` when there is no finite ε).
        rdp_order: the Rényi order α at which the RDP conversion is tightest
            (``None`` when ε is infinite).
        epsilon_pld: ε from the PLD accountant (pessimistic), ``None`` when skipped.
        pld_interval: the PLD discretisation step in units of privacy loss (nats),
            ``None`` when PLD was not run; ``epsilon_pld`` exceeds the exact ε by at
            most about this much.
        note: why PLD was skipped or why ε is infinite; empty otherwise.
        neighboring_relation: the relation both accountants used.
        level: ``"client"``: adjacent inputs differ in one client's whole local data.
    """

    sigma: float
    rounds: int
    delta: float
    noise_multiplier: float
    epsilon_rdp: float
    rdp_order: float | None
    epsilon_pld: float | None
    pld_interval: float | None
    note: str = ""
    neighboring_relation: str = NEIGHBORING_RELATION.name.lower()
    level: str = "client"

    @property
    def finite(self) -> bool:
        """True when the RDP accountant gives a finite ε."""
        return math.isfinite(self.epsilon_rdp)

    def to_dict(self) -> dict[str, Any]:
        """The report as a flat dict (for a JSON or Parquet row)."""
        return asdict(self)


def noise_multiplier(sigma: float) -> float:
    """The normalised Gaussian noise multiplier ``z = σ / 2`` of ``dp`` with noise σ.

    The upload's sensitivity is ``2C`` and its noise std ``σC``; per unit of
    sensitivity the std is ``σ / 2`` (dimensionless).
    """
    return sigma / 2.0


def _check(sigma: float, rounds: int, delta: float) -> None:
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def _event(z: float, rounds: int) -> dp_accounting.DpEvent:
    """T rounds of one Gaussian upload with noise multiplier z."""
    return dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), rounds)


def rdp_epsilon(z: float, rounds: int, delta: float) -> tuple[float, float]:
    """ε at δ and the optimal order from dp-accounting's RDP accountant.

    Args:
        z: Gaussian noise multiplier (std per unit of L2 sensitivity), > 0.
        rounds: number of self-compositions T ≥ 1.
        delta: target δ in (0, 1).

    Returns:
        ``(epsilon, order)``.
    """
    acc = RdpAccountant(neighboring_relation=NEIGHBORING_RELATION)
    acc.compose(_event(z, rounds))
    eps, order = acc.get_epsilon_and_optimal_order(delta)
    return float(eps), float(order)


def pld_interval(epsilon_rdp: float) -> float:
    """PLD discretisation step for a mechanism whose RDP ε is ``epsilon_rdp`` (nats)."""
    return PLD_BASE_INTERVAL * max(1.0, epsilon_rdp)


def pld_epsilon(z: float, rounds: int, delta: float, interval: float) -> float:
    """ε at δ from dp-accounting's PLD accountant (pessimistic estimate).

    Args:
        z: Gaussian noise multiplier (std per unit of L2 sensitivity), > 0.
        rounds: number of self-compositions T ≥ 1.
        delta: target δ in (0, 1).
        interval: discretisation step of the privacy loss (nats); the result exceeds the
            exact ε by at most about this much.
    """
    acc = PLDAccountant(NEIGHBORING_RELATION, value_discretization_interval=interval)
    acc.compose(_event(z, rounds))
    return float(acc.get_epsilon(delta))


def accounted_epsilon(sigma: float, rounds: int, *, delta: float = DEFAULT_DELTA,
                      pld_skip_above: float = PLD_SKIP_ABOVE) -> EpsilonReport:
    """Client-level ε at δ of ``dp`` with noise multiplier σ over T rounds.

    RDP first; then PLD with step :func:`pld_interval` unless ``ε_RDP > pld_skip_above``.
    σ = 0 gives ε = ∞ from both without calling the accountants.

    Args:
        sigma: the ``dp`` defense's σ (noise std / clipping norm), ≥ 0.
        rounds: number of rounds T ≥ 1 in which every client uploads.
        delta: target δ in (0, 1).
        pld_skip_above: skip PLD where the RDP ε exceeds this.

    Returns:
        An :class:`EpsilonReport`.
    """
    _check(sigma, rounds, delta)
    z = noise_multiplier(sigma)
    if z == 0:
        return EpsilonReport(sigma=sigma, rounds=rounds, delta=delta, noise_multiplier=0.0,
                             epsilon_rdp=math.inf, rdp_order=None, epsilon_pld=math.inf,
                             pld_interval=None, note=UNBOUNDED_REASONS["no_noise"])
    eps_rdp, order = rdp_epsilon(z, rounds, delta)
    if eps_rdp > pld_skip_above:
        note = (f"PLD skipped: ε_RDP = {eps_rdp:.4g} > {pld_skip_above:g}; at this size "
                "the mechanism is not private in any useful sense")
        log.info("σ=%g T=%d: %s", sigma, rounds, note)
        return EpsilonReport(sigma=sigma, rounds=rounds, delta=delta, noise_multiplier=z,
                             epsilon_rdp=eps_rdp, rdp_order=order, epsilon_pld=None,
                             pld_interval=None, note=note)
    step = pld_interval(eps_rdp)
    eps_pld = pld_epsilon(z, rounds, delta, step)
    return EpsilonReport(sigma=sigma, rounds=rounds, delta=delta, noise_multiplier=z,
                         epsilon_rdp=eps_rdp, rdp_order=order, epsilon_pld=eps_pld,
                         pld_interval=step)


def unbounded_epsilon(reason: str, *, sigma: float, rounds: int,
                      delta: float = DEFAULT_DELTA) -> EpsilonReport:
    """A report of ε = ∞ for a configuration without a finite guarantee.

    Args:
        reason: a key of :data:`UNBOUNDED_REASONS` (``"no_noise"``,
            ``"dp_param_noise"``, ``"unnoised_statistics"``, ``"data_step_after_dp"``).
        sigma: the defense's noise parameter, recorded as given (for ``dp_param_noise``
            it is a std in parameter units, not a multiplier).
        rounds: number of rounds T ≥ 1.
        delta: the δ of the report.

    Returns:
        An :class:`EpsilonReport` with ε_RDP = ε_PLD = ∞ and the reason as its note.

    Raises:
        ValueError: for an unknown reason.
    """
    if reason not in UNBOUNDED_REASONS:
        raise ValueError(f"unknown reason {reason!r}; choose from {sorted(UNBOUNDED_REASONS)}")
    return EpsilonReport(sigma=sigma, rounds=rounds, delta=delta, noise_multiplier=math.nan,
                         epsilon_rdp=math.inf, rdp_order=None, epsilon_pld=math.inf,
                         pld_interval=None, note=UNBOUNDED_REASONS[reason])


#: Defense kinds that only transform the upload and never read the client's data again:
#: after ``dp`` they are post-processing of the noised update.
UPLOAD_ONLY_KINDS = ("dp", "dp_param_noise", "quantize", "sparsify", "none")
#: Defense kinds that act during local training (which samples, what each batch looks
#: like): they run before any upload hook, whatever their place in a ``compose``, so dp's
#: clipping still bounds their effect on the upload.
TRAINING_KINDS = ("mixup", "instahide", "augment", "subsample")


def defense_epsilon(defense: Mapping[str, Any], *, rounds: int, delta: float = DEFAULT_DELTA,
                    unnoised_state: bool = False) -> EpsilonReport | None:
    """The accounted ε of a defense config block, ∞ with a reason, or ``None`` (no claim).

    * ``dp``: :func:`accounted_epsilon` over ``rounds`` (every upload a Gaussian
      mechanism, every client every round); ∞ if the model uploads un-noised
      normalisation statistics (``unnoised_state``).
    * ``dp_param_noise``: ∞ (no clipping).
    * ``compose`` holding ``dp``: dp's ε when every later step is upload-only
      post-processing (:data:`UPLOAD_ONLY_KINDS`) or acts during training
      (:data:`TRAINING_KINDS`; fedmia applies a compose hook by hook, so those run before
      any upload, whatever their place in the list); ∞ if a later step is of another
      kind (one fedmia cannot vouch for, e.g. a plugin's), which might read the data
      after the noise. A compose with ``dp_param_noise`` and no ``dp``: ∞.
    * any other kind: ``None`` — the defense claims no formal guarantee.

    Args:
        defense: ``{kind: ..., <param>: ...}`` as in the config.
        rounds: rounds whose uploads the server saw (a diverged run: up to divergence).
        delta: δ of the reported (ε, δ).
        unnoised_state: the model uploads floating state that is not a parameter
            (BatchNorm running statistics), which no defense perturbs.
    """
    kind = defense["kind"]
    dp: Mapping[str, Any] | None = None
    if kind == "dp":
        dp = defense
    elif kind == "compose":
        kinds = [step["kind"] for step in defense["steps"]]
        if "dp" in kinds:
            i = kinds.index("dp")
            dp = defense["steps"][i]
            unknown = [k for k in kinds[i + 1:] if k not in (*UPLOAD_ONLY_KINDS, *TRAINING_KINDS)]
            if unknown:
                return unbounded_epsilon("data_step_after_dp", sigma=float(dp["sigma"]),
                                         rounds=rounds, delta=delta)
        elif "dp_param_noise" in kinds:
            sigma = float(defense["steps"][kinds.index("dp_param_noise")]["sigma"])
            return unbounded_epsilon("dp_param_noise", sigma=sigma, rounds=rounds,
                                     delta=delta)
    elif kind == "dp_param_noise":
        return unbounded_epsilon("dp_param_noise", sigma=float(defense["sigma"]),
                                 rounds=rounds, delta=delta)
    if dp is None:
        return None
    if unnoised_state:
        return unbounded_epsilon("unnoised_statistics", sigma=float(dp["sigma"]),
                                 rounds=rounds, delta=delta)
    return accounted_epsilon(float(dp["sigma"]), rounds, delta=delta)
