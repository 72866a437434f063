"""A cell's privacy record: its defense's dp-accounting event over the rounds it ran.

The train stage writes it into the cell's manifest (:func:`cell_privacy`); the report reads
it back (:func:`event_from_dict`) and computes ε (:mod:`fedmia.privacy.accounting`). Kept
apart from the accountants so that editing how ε is computed reruns only the report.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from fedmia.core.config import Participation
from fedmia.core.lazy import dp_accounting

#: Why a model's uploads have no finite ε whatever the defense (:func:`cell_privacy`).
UNNOISED_STATISTICS = (
    "the model's normalisation statistics (BatchNorm running mean/var) are uploaded "
    "without clipping or noise: they are a deterministic function of the client's data, "
    "so ε = ∞ whatever σ"
)


def event_to_dict(event: dp_accounting.DpEvent) -> dict[str, Any]:
    """A dp-accounting event as plain JSON data (``to_named_tuple``, recursively)."""
    return _plain(event.to_named_tuple())


def _plain(value: Any) -> Any:
    if hasattr(value, "_asdict"):
        return {k: _plain(v) for k, v in value._asdict().items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def event_from_dict(data: Mapping[str, Any]) -> dp_accounting.DpEvent:
    """The event :func:`event_to_dict` wrote.

    Raises:
        ValueError: a record that is not a dp-accounting event.
    """
    if not isinstance(data, Mapping) or "class_name" not in data:
        raise ValueError(f"not a dp-accounting event record: {data!r}")
    module = data.get("module_name", "dp_accounting.dp_event")
    if not str(module).startswith("dp_accounting"):
        raise ValueError(f"event class from {module!r}: only dp_accounting's events are read")
    cls = getattr(importlib.import_module(module), data["class_name"])
    fields = {k: _unplain(v) for k, v in data.items() if k not in ("module_name", "class_name")}
    return cls(**fields)


def _unplain(value: Any) -> Any:
    if isinstance(value, Mapping) and "class_name" in value:
        return event_from_dict(value)
    if isinstance(value, list):
        return [_unplain(v) for v in value]
    return value


#: The accountants' neighbouring relations an observer's record names (``accountant``).
ADD_OR_REMOVE, REPLACE_ONE = "add_or_remove", "replace_one"


def cell_privacy(
    privacy: Any,
    *,
    rounds: int,
    unnoised_state: bool,
    participation: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """The record of a cell's guarantee: its defense's event over the rounds it ran.

    Args:
        privacy: the defense's :class:`~fedmia.federation.defenses.Privacy` of one round
            (``None``: the defense claims no guarantee, and so does the cell).
        rounds: the rounds whose uploads the server saw (a diverged cell: up to the
            divergence).
        unnoised_state: the model uploads floating state that no defense perturbs
            (BatchNorm running statistics): no finite ε.
        participation: ``fraction``, ``sampling``, ``num_clients`` and ``client_rounds``
            (the rounds each client took part in, within ``rounds``); ``None`` or fraction
            1: every client uploads every round. Below 1 the server, which knows who took
            part (the draw is independent of the data and recorded), sees a client's
            upload in its own rounds only: the record composes the rounds of the client
            that took part most (each client's own ε composes its own ``client_rounds``,
            kept in the record) and adds ``observer`` (:func:`observer_record`).

    Returns:
        ``{"event": event_to_dict(...), "rounds", "relation", "note"}`` for the manifest
        (with ``client_rounds`` and ``observer`` under partial participation), or
        ``None``.
    """
    if privacy is None or rounds < 1:
        return None
    event, note = privacy.event, privacy.note
    if unnoised_state:
        event = dp_accounting.ComposedDpEvent([event, dp_accounting.NonPrivateDpEvent()])
        note = "; ".join(n for n in (note, UNNOISED_STATISTICS) if n)
    if participation is None or float(participation["fraction"]) == 1.0:
        return {
            "event": event_to_dict(dp_accounting.SelfComposedDpEvent(event, rounds)),
            "rounds": rounds,
            "relation": privacy.relation,
            "note": note,
        }
    client_rounds = [int(n) for n in participation["client_rounds"]]
    most = max(client_rounds)
    seen = (
        f"against the server, which knows who took part: the rounds a client took "
        f"part in, at most {most} of {rounds}"
    )
    return {
        "event": event_to_dict(dp_accounting.SelfComposedDpEvent(event, most)),
        "rounds": most,
        "relation": privacy.relation,
        "note": "; ".join(n for n in (note, seen) if n),
        "client_rounds": client_rounds,
        "observer": observer_record(
            privacy.event, rounds=rounds, unnoised_state=unnoised_state, participation=participation
        ),
    }


def observer_record(
    event: dp_accounting.DpEvent,
    *,
    rounds: int,
    unnoised_state: bool,
    participation: Mapping[str, Any],
) -> dict[str, Any]:
    """The guarantee against an observer of the global models only: sampling amplifies.

    ``event`` is the defense's per-round event: fedmia's ``dp`` declares
    ``GaussianDpEvent(σ/2)``, the Gaussian of a client's upload under replace-one
    (sensitivity 2C, noise σC). The observer does not know who took part:

    * ``poisson`` (q = fraction, the fixed denominator qK): adding or removing the
      target moves the sum of the uploads by its clipped update (≤ C) under its own
      noise σC — ``PoissonSampledDpEvent(q, GaussianDpEvent(σ))`` per round under
      add-or-remove (only the target's own noise counted: conservative), both
      accountants;
    * ``uniform`` (m of K): ``SampledWithoutReplacementDpEvent(K, m, GaussianDpEvent(σ/2))``
      per round, which dp-accounting's RDP accountant supports under replace-one only
      and its PLD accountant not at all: RDP only (``accountant: replace_one``).

    Composed over the ``rounds`` trained (the observer sees every global model). An event
    other than a Gaussian (or a model with un-noised statistics) has no amplified
    guarantee here: ``NonPrivateDpEvent`` or ``None`` with a note.
    """
    k = int(participation["num_clients"])
    q = float(participation["fraction"])
    if unnoised_state or isinstance(event, dp_accounting.NonPrivateDpEvent):
        return {
            "event": event_to_dict(dp_accounting.NonPrivateDpEvent()),
            "rounds": rounds,
            "accountant": ADD_OR_REMOVE,
            "note": "no finite ε against the server, none against an observer",
        }
    if not isinstance(event, dp_accounting.GaussianDpEvent):
        return {
            "event": None,
            "rounds": rounds,
            "accountant": ADD_OR_REMOVE,
            "note": "sampling amplification is accounted for a Gaussian mechanism only",
        }
    z = float(event.noise_multiplier)
    if participation["sampling"] == "poisson":
        step = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(2 * z))
        relation, note = (
            ADD_OR_REMOVE,
            (
                f"observer of the global models, Poisson sampling q = {q:g} (fixed denominator "
                "qK): PoissonSampledDpEvent(q, GaussianDpEvent(σ)), add-or-remove a client, the "
                "target's own noise only (conservative)"
            ),
        )
    else:
        m = Participation(fraction=q, sampling="uniform").size(k)
        step = dp_accounting.SampledWithoutReplacementDpEvent(k, m, event)
        relation, note = (
            REPLACE_ONE,
            (
                f"observer of the global models, uniform sampling of {m} of {k}: "
                "SampledWithoutReplacementDpEvent(K, m, GaussianDpEvent(σ/2)) under replace-one"
            ),
        )
    return {
        "event": event_to_dict(dp_accounting.SelfComposedDpEvent(step, rounds)),
        "rounds": rounds,
        "accountant": relation,
        "note": note,
    }
