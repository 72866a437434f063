"""A cell's privacy record: its defense's dp-accounting event over the rounds it ran.

Against the server of the uploads (the record's ``event``), an observer of the global
models under partial participation (``observer``) and a secure-aggregation server that
sees each round's sum only (``aggregate``).

The train stage writes it into the cell's manifest (:func:`cell_privacy`); the report reads
it back (:func:`event_from_dict`) and computes ε (:mod:`fedmia.privacy.accounting`). Kept
apart from the accountants so that editing how ε is computed reruns only the report.
"""

from __future__ import annotations

import importlib
import math
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
            (the rounds each client took part in, within ``rounds``), optionally
            ``participants`` (the client ids of each round 1, 2, …, for
            :func:`aggregate_record`); ``None`` or fraction 1: every client uploads every
            round. Below 1 the server, which knows who took part (the draw is independent
            of the data and recorded), sees a client's upload in its own rounds only: the
            record composes the rounds of the client that took part most (each client's
            own ε composes its own ``client_rounds``, kept in the record) and adds
            ``observer`` (:func:`observer_record`).

    Returns:
        ``{"event": event_to_dict(...), "rounds", "relation", "note", "aggregate"}`` for
        the manifest (``aggregate``: the guarantee against a secure-aggregation server,
        :func:`aggregate_record`; with ``client_rounds`` and ``observer`` under partial
        participation), or ``None``.
    """
    if privacy is None or rounds < 1:
        return None
    event, note = privacy.event, privacy.note
    if unnoised_state:
        event = dp_accounting.ComposedDpEvent([event, dp_accounting.NonPrivateDpEvent()])
        note = "; ".join(n for n in (note, UNNOISED_STATISTICS) if n)
    if participation is None or float(participation["fraction"]) == 1.0:
        record = {
            "event": event_to_dict(dp_accounting.SelfComposedDpEvent(event, rounds)),
            "rounds": rounds,
            "relation": privacy.relation,
            "note": note,
        }
    else:
        client_rounds = [int(n) for n in participation["client_rounds"]]
        most = max(client_rounds)
        seen = (
            f"against the server, which knows who took part: the rounds a client took "
            f"part in, at most {most} of {rounds}"
        )
        record = {
            "event": event_to_dict(dp_accounting.SelfComposedDpEvent(event, most)),
            "rounds": most,
            "relation": privacy.relation,
            "note": "; ".join(n for n in (note, seen) if n),
            "client_rounds": client_rounds,
            "observer": observer_record(
                privacy.event,
                rounds=rounds,
                unnoised_state=unnoised_state,
                participation=participation,
            ),
        }
    record["aggregate"] = aggregate_record(
        privacy.event,
        rounds=rounds,
        unnoised_state=unnoised_state,
        participation=participation,
        server=record,
    )
    return record


#: What the aggregate's guarantee assumes of the other participants (:func:`aggregate_record`).
HONEST_PARTICIPANTS = (
    "every other participant adds its noise (a participant who knows its own noise sees "
    "the others' sum with one upload's noise less)"
)


def _round_sizes(rounds: int, participation: Mapping[str, Any]) -> tuple[list[list[int]], str]:
    """Per client, the number of participants of each round it took part in, and how known.

    From ``participation["participants"]`` (each round's client ids, the first ``rounds``
    rounds) where recorded; else full participation (K every round), or uniform sampling
    (m = ``Participation.size(K)`` in each of a client's ``client_rounds``). Poisson
    sampling without the rounds' participants: each round counted with one participant,
    the client itself (its m is random) — the server's own guarantee.
    """
    k = int(participation["num_clients"])
    if participation.get("participants") is not None:
        sizes: list[list[int]] = [[] for _ in range(k)]
        for clients in list(participation["participants"])[:rounds]:
            for c in clients:
                sizes[int(c)].append(len(clients))
        return sizes, "each round's actual participants"
    q = float(participation["fraction"])
    if q == 1.0:
        return [[k] * rounds for _ in range(k)], f"every client every round, m = {k}"
    counts = [int(n) for n in participation["client_rounds"]]
    if participation["sampling"] == "uniform":
        m = Participation(fraction=q, sampling="uniform").size(k)
        return [[m] * n for n in counts], f"uniform sampling, m = {m} of {k} every round"
    return [[1] * n for n in counts], (
        "the rounds' participants are not recorded (Poisson: m is random): each counted "
        "as m = 1, the server's ε"
    )


def aggregate_record(
    event: dp_accounting.DpEvent,
    *,
    rounds: int,
    unnoised_state: bool,
    participation: Mapping[str, Any] | None,
    server: Mapping[str, Any],
) -> dict[str, Any]:
    """The guarantee against a secure-aggregation server: it sees only each round's sum.

    Under secure aggregation the server sees, each round, the (equally weighted) sum of
    the m participants' uploads and who took part, never one upload. fedmia's ``dp``
    declares ``GaussianDpEvent(z)``, z = σ/2 (each upload: clipped update, sensitivity
    2C, plus N(0, (σC)²) per coordinate, :meth:`fedmia.federation.defenses.DPDefense.
    privacy`). With the other participants' clipped updates held fixed (any values), the
    sum moves by the target's ≤ 2C and carries the m independent noises, std σC√m: a
    Gaussian mechanism with noise multiplier ``σ√m / 2 = z√m`` under the server's
    relation (dp's equal weights, or Poisson's fixed denominator qK, only scale the sum:
    post-processing). The rounds a client took part in compose; **no amplification by
    sampling** (the server knows who took part, :func:`cell_privacy`). A round the client
    sat out shows nothing of it. Composed Gaussians are one Gaussian with
    ``1/z_eff² = Σ_r 1/(z² m_r)``, so the client of largest ``Σ_r 1/m_r`` over its rounds
    has the largest ε at every δ: the record composes its rounds,
    ``ComposedDpEvent([SelfComposedDpEvent(GaussianDpEvent(z√m), n_m), …])`` over the
    distinct m of its rounds (one ``SelfComposedDpEvent`` when all are equal).
    ``m`` (:func:`_round_sizes`): the recorded participants of each round, else K (full),
    else uniform's m; Poisson without them: m = 1 (the server's ε, the note says so).
    Assumes :data:`HONEST_PARTICIPANTS`.

    The sum is a function of the uploads, so the server's ε bounds it whatever the
    defense: a per-round event other than a bare Gaussian (a ``compose``, a plugin's
    mechanism) keeps the server's event (``server``) with a note; a non-private one (σ = 0,
    un-noised normalisation statistics: their sum, the others' fixed, reveals the
    target's) stays ∞.

    Returns:
        ``{"event", "rounds", "accountant", "note"}`` as :func:`observer_record`
        (``rounds``: the composed client's rounds; ``accountant``: add-or-remove, the
        server's units).
    """
    if unnoised_state or isinstance(event, dp_accounting.NonPrivateDpEvent):
        return {
            "event": event_to_dict(dp_accounting.NonPrivateDpEvent()),
            "rounds": int(server["rounds"]),
            "accountant": ADD_OR_REMOVE,
            "note": "no finite ε against the server, none against the sum of the uploads",
        }
    if not isinstance(event, dp_accounting.GaussianDpEvent) or participation is None:
        why = (
            "the number of participants is not recorded"
            if participation is None
            else "the noise of the summed uploads is accounted for a Gaussian mechanism only"
        )
        return {
            "event": server["event"],
            "rounds": int(server["rounds"]),
            "accountant": ADD_OR_REMOVE,
            "note": f"{why}: the server's ε (the sum is a function of the uploads)",
        }
    sizes, known = _round_sizes(rounds, participation)
    worst = max(range(len(sizes)), key=lambda c: sum(1.0 / m for m in sizes[c]))
    counts = {m: sizes[worst].count(m) for m in sorted(set(sizes[worst]))}
    z = float(event.noise_multiplier)
    steps = [
        dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z * math.sqrt(m)), n)
        for m, n in counts.items()
    ]
    if not steps:  # no client took part in any round
        steps = [dp_accounting.SelfComposedDpEvent(event, 0)]
    composed = steps[0] if len(steps) == 1 else dp_accounting.ComposedDpEvent(steps)
    shown = ", ".join(f"{n} with m = {m}" for m, n in counts.items()) or "none"
    note = (
        f"secure aggregation: the server sees each round's sum of the m participants' "
        f"uploads (noise σC√m on sensitivity 2C), GaussianDpEvent(σ√m/2) per round a client "
        f"took part in, no amplification (the server knows who took part); {known}; the "
        f"most exposed client's rounds: {shown}; {HONEST_PARTICIPANTS}"
    )
    return {
        "event": event_to_dict(composed),
        "rounds": len(sizes[worst]),
        "accountant": ADD_OR_REMOVE,
        "note": note,
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
