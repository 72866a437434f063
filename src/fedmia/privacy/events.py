"""A cell's privacy record: its defense's dp-accounting event over the rounds it ran.

The train stage writes it into the cell's manifest (:func:`cell_privacy`); the report reads
it back (:func:`event_from_dict`) and computes ε (:mod:`fedmia.privacy.accounting`). Kept
apart from the accountants so that editing how ε is computed reruns only the report.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from fedmia.core.lazy import dp_accounting

#: Why a model's uploads have no finite ε whatever the defense (:func:`cell_privacy`).
UNNOISED_STATISTICS = (
    "the model's normalisation statistics (BatchNorm running mean/var) are uploaded "
    "without clipping or noise: they are a deterministic function of the client's data, "
    "so ε = ∞ whatever σ")


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


def cell_privacy(privacy: Any, *, rounds: int, unnoised_state: bool) -> dict[str, Any] | None:
    """The record of a cell's guarantee: its defense's event over the rounds it ran.

    Args:
        privacy: the defense's :class:`~fedmia.federation.defenses.Privacy` of one round
            (``None``: the defense claims no guarantee, and so does the cell).
        rounds: the rounds whose uploads the server saw (a diverged cell: up to the
            divergence); every client uploads every round.
        unnoised_state: the model uploads floating state that no defense perturbs
            (BatchNorm running statistics): no finite ε.

    Returns:
        ``{"event": event_to_dict(...), "rounds", "relation", "note"}`` for the manifest,
        or ``None``.
    """
    if privacy is None or rounds < 1:
        return None
    event, note = privacy.event, privacy.note
    if unnoised_state:
        event = dp_accounting.ComposedDpEvent([event, dp_accounting.NonPrivateDpEvent()])
        note = "; ".join(n for n in (note, UNNOISED_STATISTICS) if n)
    return {"event": event_to_dict(dp_accounting.SelfComposedDpEvent(event, rounds)),
            "rounds": rounds, "relation": privacy.relation, "note": note}
