"""Accounted ε from the dp-accounting events the defenses declare (pure computation).

**Who owns what.** A defense that is a privacy mechanism declares the event of one round
of one client's upload and the neighbouring relation it assumes
(:meth:`fedmia.federation.defenses.Defense.privacy`; ``compose`` composes its steps'); the
train stage composes the rounds it ran (:func:`cell_privacy`: every client every round,
sampling rate 1, or under partial participation the rounds a client took part in, with an
observer's sampled event beside it, and the event of a secure-aggregation server that sees
each round's sum only, :func:`aggregate_epsilon`; a model whose normalisation statistics
pass un-noised has no finite ε) and records the composed event in the cell's manifest;
the report computes ε at ``privacy.delta`` from that record (:func:`epsilon_of`), so
changing δ reruns no training, and a plugin's mechanism is accounted like fedmia's.

fedmia's ``dp``. Every round each client clips the trainable-parameter part of its
update to L2 norm ``C`` and adds ``N(0, (σC)²)`` to every coordinate of its own
upload; the server averages the uploads with equal weights (``dp`` has
``data_independent_weights``): with FedAvg's ``n_k / n`` it would learn every client's
data size un-noised, and ε would be infinite under any relation that changes a size.
The neighbouring relation: one client's local data replaced by any other dataset, of
any size. That moves the client's clipped update by at most ``2C`` and nothing else the
server sees depends on the data, so each upload is a Gaussian mechanism with L2
sensitivity ``2C`` and noise std ``σC``. In the units of `dp-accounting`_ (sensitivity
one, the add-or-remove-one relation) that is a Gaussian with noise multiplier
``z = σC / 2C = σ / 2`` (:func:`noise_multiplier`): the same privacy loss distribution.
The guarantee is **client-level** against the server (it implies the sample-level one);
the ``T`` rounds compose.

Secure aggregation. A server that sees each round only the sum of its m participants'
uploads (and who took part) sees a client's clipped update (≤ 2C from any other) under
the m independent noises, std ``σC√m``: a Gaussian with noise multiplier ``σ√m / 2`` per
round the client took part in, composed over its rounds, with no amplification by
sampling (the server knows who took part): :func:`fedmia.privacy.events.aggregate_record`,
:func:`aggregate_epsilon`.

Two accountants, one relation. ε at δ comes from Google's ``dp-accounting`` with both

* the RDP accountant (Rényi DP of the Gaussian, ``α / (2z²)`` per round at each order of
  ``DEFAULT_RDP_ORDERS``, converted to (ε, δ) with the improved conversion of Canonne,
  Kamath & Steinke 2020, Prop. 12 / Asoodeh et al. 2020, Eq. 20), and
* the PLD accountant (privacy loss distribution, pessimistic discretisation; the T-fold
  self-composition of a Gaussian is one Gaussian with noise ``z / √T``, which the
  accountant uses, so it is exact up to the discretisation step),

both under :func:`neighboring_relation` (add-or-remove-one). The PLD accountant under
``REPLACE_ONE`` would double the sensitivity internally (≈3× larger ε than RDP at the
same σ); using one constant for both keeps them comparable.

Skipping PLD. RDP is computed first. PLD's grid of privacy-loss values spans a range of
about 4·ε, so its step grows with ε: ``1e-4 · max(1, ε_RDP)`` (dp-accounting's default
step for ε ≤ 1, a relative 1e-4 above; so a bounded grid, ~0.2 s on one core, where a
fixed 1e-4 step takes a minute and GBs at ε ~ 10³). Where ``ε_RDP > pld_skip_above``
(default 10⁴: σ ≤ 0.01 at T = 1, σ ≤ 0.08 at T = 30, σ ≤ 0.25 at T = 300) PLD is
skipped and reported as ``None`` with the reason: ``e^ε`` is then far beyond floating
point and the mechanism is, for any purpose, not private; the RDP value alone says so.

No finite ε. An event holding a ``NonPrivateDpEvent`` has ε = ∞, and the record's note
says why: σ = 0, ``dp_param_noise`` (no clipping), a model whose normalisation statistics
are uploaded un-noised, a ``compose`` in which a step fedmia cannot vouch for follows the
mechanism.

.. _dp-accounting: https://github.com/google/differential-privacy/tree/main/python
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from fedmia.core.lazy import LazyModule, dp_accounting
from fedmia.privacy.events import ADD_OR_REMOVE, REPLACE_ONE, event_from_dict

#: The accountants, imported on first use (dp-accounting takes seconds to import, and
#: every report job imports this module).
pld = LazyModule("dp_accounting.pld")
rdp = LazyModule("dp_accounting.rdp")

log = logging.getLogger(__name__)


def neighboring_relation() -> Any:
    """The relation of both accountants: add or remove one unit (``ADD_OR_REMOVE_ONE``).

    The unit is a client's whole update, sensitivity one after normalising by ``2C``.
    """
    return dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE


def accountant_relation(accountant: str) -> Any:
    """The dp-accounting relation a record names.

    ``add_or_remove``: fedmia's (:func:`neighboring_relation`); ``replace_one``: the only
    relation under which dp-accounting's RDP accountant composes sampling without
    replacement (an observer of a cell with uniform partial participation,
    :func:`fedmia.privacy.events.observer_record`).
    """
    if accountant == ADD_OR_REMOVE:
        return neighboring_relation()
    if accountant == REPLACE_ONE:
        return dp_accounting.NeighboringRelation.REPLACE_ONE
    raise ValueError(
        f"unknown accountant relation {accountant!r}; choose {ADD_OR_REMOVE!r} or {REPLACE_ONE!r}"
    )


#: Default δ of the reports.
DEFAULT_DELTA = 1e-5
#: Above this ε_RDP the PLD accountant is skipped (see the module docstring).
PLD_SKIP_ABOVE = 1e4
#: PLD discretisation step at ε ≤ 1; above, the step is this times ε_RDP.
PLD_BASE_INTERVAL = 1e-4


@dataclass(frozen=True)
class EpsilonReport:
    """ε at δ of a composed event, from both accountants.

    Attributes:
        rounds: number of rounds T composed.
        delta: the δ at which ε is reported.
        epsilon_rdp: ε from the RDP accountant (``inf`` when there is no finite ε).
        rdp_order: the Rényi order α at which the RDP conversion is tightest
            (``None`` when ε is infinite).
        epsilon_pld: ε from the PLD accountant (pessimistic), ``None`` when skipped.
        pld_interval: the PLD discretisation step in units of privacy loss (nats),
            ``None`` when PLD was not run; ``epsilon_pld`` exceeds the exact ε by at
            most about this much.
        note: why PLD was skipped or why ε is infinite; empty otherwise.
        relation: the neighbouring relation the event assumes (its defense's).
    """

    rounds: int
    delta: float
    epsilon_rdp: float
    rdp_order: float | None
    epsilon_pld: float | None
    pld_interval: float | None
    note: str = ""
    relation: str = ""

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


def _check(rounds: int, delta: float) -> None:
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def rdp_epsilon(
    event: dp_accounting.DpEvent, delta: float, accountant: str = ADD_OR_REMOVE
) -> tuple[float, float]:
    """ε at δ and the optimal order of ``event`` from dp-accounting's RDP accountant.

    ``accountant``: the neighbouring relation (:func:`accountant_relation`).
    """
    acc = rdp.RdpAccountant(neighboring_relation=accountant_relation(accountant))
    acc.compose(event)
    eps, order = acc.get_epsilon_and_optimal_order(delta)
    return float(eps), float(order)


def pld_interval(epsilon_rdp: float) -> float:
    """PLD discretisation step for a mechanism whose RDP ε is ``epsilon_rdp`` (nats)."""
    return PLD_BASE_INTERVAL * max(1.0, epsilon_rdp)


def pld_epsilon(event: dp_accounting.DpEvent, delta: float, interval: float) -> float:
    """ε at δ of ``event`` from dp-accounting's PLD accountant (pessimistic estimate).

    Args:
        event: the composed event.
        delta: target δ in (0, 1).
        interval: discretisation step of the privacy loss (nats); the result exceeds the
            exact ε by at most about this much.
    """
    acc = pld.PLDAccountant(neighboring_relation(), value_discretization_interval=interval)
    acc.compose(event)
    return float(acc.get_epsilon(delta))


def gaussian_rounds(z: float, rounds: int) -> dp_accounting.DpEvent:
    """T rounds of one Gaussian upload with noise multiplier z."""
    return dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), rounds)


#: Why an event under replace-one has no PLD ε (:func:`epsilon_of`).
NO_PLD_REPLACE_ONE = (
    "no PLD ε: dp-accounting's PLD accountant does not support sampling "
    "without replacement; RDP under replace-one only"
)


def epsilon_of(
    event: dp_accounting.DpEvent,
    *,
    rounds: int,
    delta: float = DEFAULT_DELTA,
    relation: str = "",
    note: str = "",
    pld_skip_above: float = PLD_SKIP_ABOVE,
    accountant: str = ADD_OR_REMOVE,
) -> EpsilonReport:
    """ε at δ of a composed event, RDP first, then PLD unless ``ε_RDP > pld_skip_above``.

    An infinite ε (a ``NonPrivateDpEvent`` inside) is reported as ∞ by both, with
    ``note`` saying why.

    Args:
        event: the event of all the rounds (e.g. a cell's, :func:`cell_privacy`).
        rounds: the rounds it composes (for the report).
        delta: target δ in (0, 1).
        relation: its neighbouring relation (for the report).
        note: why it has no finite ε, where it has none.
        pld_skip_above: skip PLD where the RDP ε exceeds this.
        accountant: the accountants' neighbouring relation (:func:`accountant_relation`);
            ``replace_one``: RDP only (:data:`NO_PLD_REPLACE_ONE`).
    """
    _check(rounds, delta)
    eps_rdp, order = rdp_epsilon(event, delta, accountant)
    if accountant == REPLACE_ONE and math.isfinite(eps_rdp):
        return EpsilonReport(
            rounds=rounds,
            delta=delta,
            epsilon_rdp=eps_rdp,
            rdp_order=order,
            epsilon_pld=None,
            pld_interval=None,
            note="; ".join(n for n in (note, NO_PLD_REPLACE_ONE) if n),
            relation=relation,
        )
    if not math.isfinite(eps_rdp):
        return EpsilonReport(
            rounds=rounds,
            delta=delta,
            epsilon_rdp=math.inf,
            rdp_order=None,
            epsilon_pld=math.inf,
            pld_interval=None,
            note=note,
            relation=relation,
        )
    if eps_rdp > pld_skip_above:
        skipped = (
            f"PLD skipped: ε_RDP = {eps_rdp:.4g} > {pld_skip_above:g}; at this size "
            "the mechanism is not private in any useful sense"
        )
        log.info("%s", skipped)
        return EpsilonReport(
            rounds=rounds,
            delta=delta,
            epsilon_rdp=eps_rdp,
            rdp_order=order,
            epsilon_pld=None,
            pld_interval=None,
            note="; ".join(n for n in (note, skipped) if n),
            relation=relation,
        )
    step = pld_interval(eps_rdp)
    return EpsilonReport(
        rounds=rounds,
        delta=delta,
        epsilon_rdp=eps_rdp,
        rdp_order=order,
        epsilon_pld=pld_epsilon(event, delta, step),
        pld_interval=step,
        note=note,
        relation=relation,
    )


def accounted_epsilon(
    sigma: float,
    rounds: int,
    *,
    delta: float = DEFAULT_DELTA,
    pld_skip_above: float = PLD_SKIP_ABOVE,
) -> EpsilonReport:
    """Client-level ε at δ of fedmia's ``dp`` with noise multiplier σ over T rounds.

    The event of :meth:`fedmia.federation.defenses.DPDefense.privacy` (a Gaussian with
    noise multiplier σ/2 each round), composed T times; σ = 0 has ε = ∞.
    """
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
    _check(rounds, delta)
    if sigma == 0:
        return epsilon_of(
            dp_accounting.NonPrivateDpEvent(),
            rounds=rounds,
            delta=delta,
            note="σ = 0: the clipped update is uploaded without noise, so ε = ∞",
        )
    return epsilon_of(
        gaussian_rounds(noise_multiplier(sigma), rounds),
        rounds=rounds,
        delta=delta,
        pld_skip_above=pld_skip_above,
    )


def record_epsilon(
    record: Mapping[str, Any],
    *,
    delta: float = DEFAULT_DELTA,
    pld_skip_above: float = PLD_SKIP_ABOVE,
) -> EpsilonReport:
    """ε at δ of a cell's record (:func:`fedmia.privacy.events.cell_privacy`, from its manifest)."""
    return epsilon_of(
        event_from_dict(record["event"]),
        rounds=int(record["rounds"]),
        delta=delta,
        relation=record.get("relation", ""),
        note=record.get("note", ""),
        pld_skip_above=pld_skip_above,
    )


def observer_epsilon(
    record: Mapping[str, Any],
    *,
    delta: float = DEFAULT_DELTA,
    pld_skip_above: float = PLD_SKIP_ABOVE,
) -> EpsilonReport | None:
    """ε at δ against an observer of the global models only (partial participation).

    From a cell record's ``observer`` (:func:`fedmia.privacy.events.observer_record`):
    the sampled event over the rounds trained, under its ``accountant`` relation.
    ``None``: no such record (full participation) or no amplified guarantee for the
    defense's event (the record's note says why).
    """
    return _view_epsilon(record, "observer", delta=delta, pld_skip_above=pld_skip_above)


def aggregate_epsilon(
    record: Mapping[str, Any],
    *,
    delta: float = DEFAULT_DELTA,
    pld_skip_above: float = PLD_SKIP_ABOVE,
) -> EpsilonReport | None:
    """ε at δ against a secure-aggregation server, which sees each round's sum only.

    From a cell record's ``aggregate`` (:func:`fedmia.privacy.events.aggregate_record`):
    under ``dp``, a Gaussian with noise multiplier ``σ√m / 2`` per round a client took part
    in (m the round's participants), composed over the rounds of the most exposed client,
    no amplification by sampling. ``None``: a record without it (written before it
    existed).
    """
    return _view_epsilon(record, "aggregate", delta=delta, pld_skip_above=pld_skip_above)


def _view_epsilon(
    record: Mapping[str, Any], view: str, *, delta: float, pld_skip_above: float
) -> EpsilonReport | None:
    """ε at δ of the record's sub-record ``view`` (``observer``, ``aggregate``), or ``None``."""
    sub = record.get(view)
    if not sub or sub.get("event") is None:
        return None
    return epsilon_of(
        event_from_dict(sub["event"]),
        rounds=int(sub["rounds"]),
        delta=delta,
        relation=record.get("relation", ""),
        note=sub.get("note", ""),
        pld_skip_above=pld_skip_above,
        accountant=sub.get("accountant", ADD_OR_REMOVE),
    )


def client_epsilons(
    record: Mapping[str, Any], *, delta: float = DEFAULT_DELTA
) -> list[float] | None:
    """Each client's RDP ε at δ against the server: its own rounds composed.

    Under partial participation the record keeps ``client_rounds``; client c's guarantee
    composes the defense's per-round event over its ``client_rounds[c]`` rounds (0
    rounds: ε = 0, nothing of it was seen). ``None`` without ``client_rounds``.
    """
    counts = record.get("client_rounds")
    if counts is None:
        return None
    composed = event_from_dict(record["event"])
    step = composed.event if isinstance(composed, dp_accounting.SelfComposedDpEvent) else composed
    by_count = {
        n: 0.0 if n == 0 else rdp_epsilon(dp_accounting.SelfComposedDpEvent(step, n), delta)[0]
        for n in set(counts)
    }
    return [by_count[n] for n in counts]
