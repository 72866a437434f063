"""A kind's parameters, defined once: the fields of a frozen dataclass.

A kind with parameters (every defense) declares them as dataclass fields, each with
its default (or none: required) and, through :func:`param`, its bounds and a
description::

    @dataclass(frozen=True)
    class SparsifyDefense(Defense):
        fraction: float = param(minimum=0, exclusive_maximum=1,
                                description="fraction of each layer's update zeroed")
        min_size: int = param(1000, minimum=0, description="smaller layers are untouched")

Everything else is read from those fields:

* :func:`validate` checks a config block's parameters (unknown and missing names, types,
  finiteness, bounds) and returns the values to build the dataclass with; its messages
  name the parameter, the value and what is allowed (:func:`allowed_text`);
* :func:`schema_block` is the kind's block of the workflow's JSON schema (the checked-in
  schema holds the built-in kinds' blocks, and a test compares them with this);
* :func:`describe` is the parameter column of the README's table;
* :func:`changed` names a built kind's parameters that are not at their defaults (the
  ``params`` column of the privacy–utility tables);
* :func:`numeric_parameters` and :func:`resolve_strength` serve a ``compose``'s strength
  axis (``'<step kind>.<parameter>'``).

Field types are ``float`` (a JSON number), ``int`` (an integer; a float with no
fractional part is accepted), ``bool`` and ``str`` (one of the values ``param``'s
``choices`` lists, e.g. a variant: ``variant: str = param("paper", choices=("paper",
"official"))``). A class may offer *presets*, named sets of
values (``ClassVar presets: {name: {parameter: value}}``, the first one the default): a
config block picks one with ``preset`` and overrides any value of it; the field defaults
are what a preset does not set.

This module imports nothing of fedmia but :mod:`fedmia.core.config` and no torch: the
workflow uses it when it parses the Snakefile.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from fedmia.core.config import ConfigError

#: The JSON-schema bound keywords a parameter may carry (field metadata keys).
BOUNDS = ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")
#: Field annotation → JSON-schema type.
TYPES = {"float": "number", "int": "integer", "bool": "boolean", "str": "string"}


def param(
    default: Any = dataclasses.MISSING,
    *,
    description: str = "",
    minimum: float | None = None,
    exclusive_minimum: float | None = None,
    maximum: float | None = None,
    exclusive_maximum: float | None = None,
    choices: tuple[str, ...] | None = None,
    note: str = "",
) -> Any:
    """A parameter field: its default (omit it: required), bounds or choices, description.

    Args:
        default: the value when the config block does not set it.
        description: what the parameter means (the schema's description).
        minimum: the value is ≥ this (JSON schema's ``minimum``).
        exclusive_minimum: the value is > this.
        maximum: the value is ≤ this.
        exclusive_maximum: the value is < this.
        choices: the values a ``str`` parameter may take (JSON schema's ``enum``).
        note: appended to the allowed values in the library's messages.
    """
    bounds = dict(
        zip(BOUNDS, (minimum, exclusive_minimum, maximum, exclusive_maximum), strict=True)
    )
    meta: dict[str, Any] = {k: v for k, v in bounds.items() if v is not None}
    if choices is not None:
        if default is not dataclasses.MISSING and default not in choices:
            raise ValueError(f"default {default!r} is not one of the choices {list(choices)}")
        meta["enum"] = list(choices)
    if description:
        meta["description"] = description
    if note:
        meta["note"] = note
    return dataclasses.field(default=default, metadata=meta)


def parameters(cls: type) -> list[dataclasses.Field]:
    """The parameter fields of ``cls`` in order (none for a class that is no dataclass)."""
    if not dataclasses.is_dataclass(cls):
        return []
    out = [f for f in dataclasses.fields(cls) if f.init]
    for f in out:
        if _type(f) not in TYPES:
            raise TypeError(
                f"{cls.__name__}.{f.name}: a parameter is float, int, bool or "
                f"str (got {f.type!r}); give the class its own from_params"
            )
        if (_type(f) == "str") != ("enum" in f.metadata):
            raise TypeError(
                f"{cls.__name__}.{f.name}: a str parameter, and only one, lists "
                f"its values: param(..., choices=(...))"
            )
    return out


def presets(cls: type) -> Mapping[str, Mapping[str, Any]]:
    """The presets of ``cls`` (``ClassVar presets``), the first one the default."""
    return getattr(cls, "presets", None) or {}


def _type(f: dataclasses.Field) -> str:
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _fmt(v: float) -> str:
    return f"{v:g}"


def value_text(v: Any) -> str:
    """A value as a config file writes it: ``true``, ``0.25``, ``45``, ``official``."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, str):
        return v
    return _fmt(v) if isinstance(v, int | float) else repr(v)


def _constraints(f: dataclasses.Field) -> dict[str, Any]:
    """A field's bounds and allowed values (``enum``), as JSON-schema keywords."""
    return {k: v for k, v in f.metadata.items() if k in (*BOUNDS, "enum")}


def _range(kind: str, bounds: Mapping[str, Any]) -> str:
    """``bounds`` in symbols: ``≥ 0``, ``> 0``, ``[0, 1)``, ``1..32`` (integers) or ``""``."""
    lo = (
        ("[", bounds["minimum"])
        if "minimum" in bounds
        else (("(", bounds["exclusiveMinimum"]) if "exclusiveMinimum" in bounds else None)
    )
    hi = (
        ("]", bounds["maximum"])
        if "maximum" in bounds
        else ((")", bounds["exclusiveMaximum"]) if "exclusiveMaximum" in bounds else None)
    )
    if lo and hi:
        if kind == "integer" and lo[0] == "[" and hi[0] == "]":
            return f"{_fmt(lo[1])}..{_fmt(hi[1])}"
        return f"{lo[0]}{_fmt(lo[1])}, {_fmt(hi[1])}{hi[0]}"
    if lo:
        return f"{'≥' if lo[0] == '[' else '>'} {_fmt(lo[1])}"
    if hi:
        return f"{'≤' if hi[0] == ']' else '<'} {_fmt(hi[1])}"
    return ""


def _is_interval(r: str) -> bool:
    return r[:1] in ("[", "(") or ".." in r


def allowed_text(kind: str, bounds: Mapping[str, Any]) -> str:
    """What a value of JSON-schema type ``kind`` within ``bounds`` may be, in words.

    E.g. ``"a number ≥ 0"``, ``"a number in [0, 1)"``, ``"an integer in 1..32"``, ``"true
    or false"``, ``"one of ['paper', 'official']"`` (a string; ``bounds`` has its ``enum``).
    """
    if kind == "boolean":
        return "true or false"
    if kind == "string":
        return f"one of {list(bounds['enum'])}"
    noun = "an integer" if kind == "integer" else "a number"
    r = _range(kind, bounds)
    return f"{noun} in {r}" if r and _is_interval(r) else f"{noun} {r}".rstrip()


def _within(v: float, bounds: Mapping[str, Any]) -> bool:
    return (
        v >= bounds.get("minimum", -math.inf)
        and v > bounds.get("exclusiveMinimum", -math.inf)
        and v <= bounds.get("maximum", math.inf)
        and v < bounds.get("exclusiveMaximum", math.inf)
    )


def check_value(kind: str, bounds: Mapping[str, Any], value: Any) -> Any:
    """``value`` as a valid value of JSON-schema type ``kind`` within ``bounds``, or None.

    A number is a finite int or float (not a bool), returned as a float; an integer is
    an int or a float without a fractional part (not a bool), returned as an int; a
    string is one of ``bounds["enum"]``.
    """
    if kind == "boolean":
        return value if isinstance(value, bool) else None
    if kind == "string":
        return value if isinstance(value, str) and value in bounds["enum"] else None
    if kind == "integer" and isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if kind == "integer" and not isinstance(value, int):
        return None
    if not math.isfinite(value) or not _within(value, bounds):
        return None
    return float(value) if kind == "number" else value


def invalid(owner: str, name: str, value: Any, allowed: str) -> ConfigError:
    """The error of a parameter value outside what is allowed."""
    return ConfigError(f"{owner}: parameter '{name}' = {value!r} is invalid; allowed: {allowed}")


def check_names(
    owner: str, given: Mapping[str, Any], allowed: Sequence[str], required: Sequence[str]
) -> None:
    """Unknown parameter names, then the first missing required one, raise ``ConfigError``."""
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ConfigError(
            f"{owner}: unknown parameter(s) {unknown}; allowed parameters are {sorted(allowed)}"
        )
    for name in required:
        if name not in given:
            raise ConfigError(
                f"{owner}: missing required parameter '{name}' (parameters: "
                f"{sorted(allowed)}); add it"
            )


def validate(cls: type, given: Mapping[str, Any], *, kind: str, what: str) -> dict[str, Any]:
    """The values to build ``cls`` with from a config block's parameters ``given``.

    Every parameter of ``cls`` gets the value ``given`` sets, else its preset's (when
    ``cls`` has presets), else its default; each is checked against its field's type and
    bounds.

    Args:
        cls: the kind's dataclass.
        given: the block's parameters (without ``kind``).
        kind: the kind's registered name (it names the kind in messages) ...
        what: ... and the registry's (``defense``).

    Raises:
        ConfigError: naming the kind, the parameter, the value and what is allowed.
    """
    owner = f"{what} '{kind}'"
    fields = parameters(cls)
    sets = presets(cls)
    allowed = [f.name for f in fields] + (["preset"] if sets else [])
    if not allowed and given:
        raise ConfigError(
            f"{owner} takes no parameters (got {sorted(given)}); drop them, or "
            f"pick the {what} they belong to as kind"
        )
    check_names(owner, given, allowed, [f.name for f in fields if _required(f)])
    preset: Mapping[str, Any] = {}
    if sets:
        name = given.get("preset", next(iter(sets)))
        if not isinstance(name, str) or name not in sets:
            raise invalid(owner, "preset", name, f"one of {sorted(sets)}")
        preset = sets[name]
    values = {}
    for f in fields:
        value = given[f.name] if f.name in given else preset.get(f.name, f.default)
        bounds = _constraints(f)
        ok = check_value(TYPES[_type(f)], bounds, value)
        if ok is None:
            text = allowed_text(TYPES[_type(f)], bounds)
            note = f.metadata.get("note")
            raise invalid(owner, f.name, value, f"{text} {note}" if note else text)
        values[f.name] = ok
    return values


def numeric_parameters(cls: type) -> list[str]:
    """Names of the numeric (float or int) parameters of ``cls``, in order."""
    return [f.name for f in parameters(cls) if TYPES[_type(f)] in ("number", "integer")]


def defaults(cls: type) -> dict[str, Any]:
    """Each parameter's default: its default preset's value, else its field's default.

    A required parameter (no default) is left out.
    """
    first = next(iter(presets(cls).values()), {})
    return {
        f.name: first.get(f.name, f.default)
        for f in parameters(cls)
        if f.name in first or not _required(f)
    }


def changed(obj: Any, skip: str | None = None) -> str:
    """The parameters of ``obj`` (a kind's dataclass) not at their defaults, but ``skip``.

    ``name=value`` (:func:`value_text`), comma-separated in field order; a required
    parameter always counts; ``""`` when every parameter but ``skip`` has its default.
    E.g. ``variant=official`` for a ``mixup`` whose strength ``alpha`` is skipped.
    """
    base = defaults(type(obj))
    return ", ".join(
        f"{f.name}={value_text(getattr(obj, f.name))}"
        for f in parameters(type(obj))
        if f.name != skip and (f.name not in base or getattr(obj, f.name) != base[f.name])
    )


def schema_property(f: dataclasses.Field, *, with_default: bool = True) -> dict[str, Any]:
    """The JSON-schema property of a parameter field."""
    prop: dict[str, Any] = {"type": TYPES[_type(f)]}
    prop.update(_constraints(f))
    if with_default and not _required(f):
        prop["default"] = f.default
    if "description" in f.metadata:
        prop["description"] = f.metadata["description"]
    return prop


def schema_block(cls: type, kind: str) -> dict[str, Any]:
    """The kind's JSON-schema block: ``{if: kind is <kind>, then: its parameters}``.

    ``then`` allows exactly ``kind`` and the parameters (with their types, bounds,
    descriptions and defaults; no defaults under presets, which set them) and requires
    the parameters without a default.
    """
    sets = presets(cls)
    fields = parameters(cls)
    props: dict[str, Any] = {"kind": True}
    if sets:
        first = next(iter(sets))
        props["preset"] = {
            "enum": list(sets),
            "description": f"defaults of the other parameters (default: {first})",
        }
    props.update({f.name: schema_property(f, with_default=not sets) for f in fields})
    then: dict[str, Any] = {}
    if sets:
        then["description"] = "`preset` gives every parameter not set here"
    required = [f.name for f in fields if _required(f)]
    if required:
        then["required"] = required
    then["additionalProperties"] = False
    then["properties"] = props
    return {"if": {"properties": {"kind": {"const": kind}}}, "then": then}


def block_numeric_parameters(block: Mapping[str, Any]) -> list[str]:
    """Names of the numeric parameters of a :func:`schema_block`, in order."""
    return [
        name
        for name, p in block["then"]["properties"].items()
        if isinstance(p, Mapping) and p.get("type") in ("number", "integer")
    ]


def describe(cls: type) -> str:
    """The parameters of ``cls`` in one line of Markdown (the README's defense table).

    E.g. for ``dp``: ``sigma`` ≥ 0, ``clip`` > 0 (each name in backticks, defaults in
    parentheses); a string parameter lists its values: ``variant`` ∈ {``paper``, ``official``}.
    """
    parts = []
    sets = presets(cls)
    if sets:
        parts.append("`preset` (" + ", ".join(f"`{s}`" for s in sets) + ")")
    for f in parameters(cls):
        kind = TYPES[_type(f)]
        r = _range(kind, {k: v for k, v in f.metadata.items() if k in BOUNDS})
        text = (
            "true/false"
            if kind == "boolean"
            else "∈ {" + ", ".join(f"`{c}`" for c in f.metadata["enum"]) + "}"
            if kind == "string"
            else f"∈ {r}"
            if r[:1] in ("[", "(")
            else r
        )
        default = "" if _required(f) else f" (default {value_text(f.default)})"
        parts.append(f"`{f.name}` {text}".rstrip() + default)
    return ", ".join(parts) or "—"


def resolve_strength(
    path: Any,
    kinds: Sequence[str],
    numeric: Sequence[Sequence[str]],
    owner: str = "defense 'compose'",
) -> tuple[int, str]:
    """Resolve a compose's strength axis: ``'<kind>.<parameter>'`` or ``'<index>.<parameter>'``.

    Args:
        path: the ``strength`` value of the config block.
        kinds: the steps' kinds, in order.
        numeric: the numeric parameters of each step (:func:`numeric_parameters`).
        owner: names the block in messages.

    Returns:
        ``(step index, parameter)``.

    Raises:
        ConfigError: a malformed path, a step that does not exist or is ambiguous, a
            parameter that is not a numeric parameter of its step.
    """
    example = f"'{kinds[0]}.<parameter>' or '0.<parameter>'"
    if not isinstance(path, str) or path.count(".") != 1:
        raise ConfigError(
            f"{owner}: strength = {path!r} is invalid; name one step's "
            f"parameter as '<step kind>.<parameter>' or '<step index>.<parameter>' "
            f"(0-based), e.g. {example}"
        )
    step, name = path.split(".")
    if step.isdigit():
        i = int(step)
        if i >= len(kinds):
            raise ConfigError(
                f"{owner}: strength = {path!r}: there is no step {i}; "
                f"steps are 0..{len(kinds) - 1} ({list(kinds)})"
            )
    else:
        hits = [j for j, k in enumerate(kinds) if k == step]
        if not hits:
            raise ConfigError(
                f"{owner}: strength = {path!r}: no step is of kind "
                f"'{step}'; the steps are {list(kinds)}"
            )
        if len(hits) > 1:
            raise ConfigError(
                f"{owner}: strength = {path!r}: steps {hits} are all "
                f"'{step}'; name the step by its index, e.g. '{hits[0]}.{name}'"
            )
        i = hits[0]
    if name not in numeric[i]:
        raise ConfigError(
            f"{owner}: strength = {path!r}: step {i} ('{kinds[i]}') has "
            f"no numeric parameter '{name}'; choose from {list(numeric[i])}"
        )
    return i, name
