"""Every kind the config can name, by family: the catalogue of the registries.

Importing this module imports every module that defines kinds; none of them imports torch
or matplotlib at import (:mod:`fedmia.core.lazy`), so the workflow imports it when it
parses the Snakefile. From the registries come the config schema's lists of kinds and
its per-defense blocks (:func:`fedmia.workflow.load_schema`), validation, the cluster's
resource estimates, the per-cell figure rules and the tables' captions — plugins' kinds
included, since they register into the same registries.

    python -m fedmia.kinds list        # every family and its kinds
    python -m fedmia.kinds defenses    # the README's table of defenses (Markdown)
    python -m fedmia.kinds schema      # the config schema with every kind filled in (YAML)
    python -m fedmia.kinds reference   # config/README.md, the configuration reference
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from fedmia.attacker.attacks import ATTACKS, FINDINGS, PROTOCOLS, VIEWS
from fedmia.attacker.routes import MEASURE_ROUTES
from fedmia.core.params import schema_block
from fedmia.core.registry import Registry
from fedmia.federation.datasets import DATASETS
from fedmia.federation.defenses import DEFENSES, defense_table
from fedmia.federation.models import MODELS
from fedmia.federation.partition import PARTITIONS
from fedmia.report.figures import FIGURES, TABLE_FIGURES
from fedmia.report.tables import SELECTIONS

#: The config schema (kinds not filled in: :func:`load_schema`).
SCHEMA = Path(__file__).resolve().parent / "core" / "config.schema.yaml"
#: Every registry by family (the ``x-kinds`` names of the config schema).
REGISTRIES: dict[str, Registry[Any]] = {
    "datasets": DATASETS,
    "partitions": PARTITIONS,
    "models": MODELS,
    "defenses": DEFENSES,
    "measure routes": MEASURE_ROUTES,
    "attacks": ATTACKS,
    "protocols": PROTOCOLS,
    "views": VIEWS,
    "selections": SELECTIONS,
    "findings": FINDINGS,
    "figures": FIGURES,
    "table figures": TABLE_FIGURES,
}


def kinds(family: str) -> list[str]:
    """The registered kinds of ``family`` in registration order.

    ``composable defenses``: the defenses that may be a step of a ``compose``.

    Raises:
        ValueError: an unknown family.
    """
    if family == "composable defenses":
        return [k for k in DEFENSES.registered() if DEFENSES.get(k).composable]
    if family not in REGISTRIES:
        raise ValueError(
            f"unknown family of kinds {family!r}; choose from "
            f"{['composable defenses', *REGISTRIES]}"
        )
    return REGISTRIES[family].registered()


def read_schema(path: str | Path = SCHEMA) -> dict[str, Any]:
    """The config JSON schema (YAML) as written: kinds not yet filled in."""
    return yaml.safe_load(Path(path).read_text())


def load_schema(path: str | Path = SCHEMA) -> dict[str, Any]:
    """The config JSON schema with every registered kind filled in (plugins: import first).

    Where the schema says ``x-kinds: <family>`` the registered kinds of that family become
    the ``enum`` (:func:`fedmia.kinds.kinds`; ``x-kinds-default``: the ``default``), and
    ``x-defense-blocks`` becomes the ``allOf`` of one block per composable defense,
    generated from its dataclass (:func:`defense_blocks`).
    """
    return fill_kinds(read_schema(path))


def fill_kinds(schema: Any) -> Any:
    """``schema`` with its ``x-kinds``, ``x-kinds-default`` and ``x-defense-blocks`` filled."""
    if isinstance(schema, list):
        return [fill_kinds(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "x-kinds":
            out["enum"] = kinds(value)
        elif key == "x-kinds-default":
            out["default"] = kinds(value)
        elif key == "x-defense-blocks":
            out["allOf"] = defense_blocks()
        else:
            out[key] = fill_kinds(value)
    return out


def defense_blocks() -> list[dict[str, Any]]:
    """The ``$defs.defense`` blocks of the registered defenses that can be compose steps.

    Each generated from its dataclass (:func:`fedmia.core.params.schema_block`).
    """
    return [schema_block(DEFENSES.get(k), k) for k in kinds("composable defenses")]


def _allowed(prop: dict[str, Any]) -> str:
    """What a schema property allows, in words (type, bounds, choices)."""
    if "enum" in prop:
        return "one of " + ", ".join(f"`{v}`" if v is not None else "`null`" for v in prop["enum"])
    if "oneOf" in prop:
        return "; or ".join(_allowed(p) for p in prop["oneOf"])
    if "const" in prop:
        return f"`{prop['const']}`"
    kind = prop.get("type", "")
    kinds = kind if isinstance(kind, list) else [kind]
    words = {
        "integer": "an integer",
        "number": "a number",
        "boolean": "true or false",
        "string": "a string",
        "array": "a list",
        "object": "a mapping",
        "null": "null",
    }
    text = " or ".join(words.get(k, str(k)) for k in kinds if k)
    signs = (
        ("minimum", "≥"),
        ("exclusiveMinimum", ">"),
        ("maximum", "≤"),
        ("exclusiveMaximum", "<"),
    )
    bounds = [f"{sign} {prop[key]:g}" for key, sign in signs if key in prop]
    if "items" in prop and isinstance(prop["items"], dict):
        text += " of " + _allowed(prop["items"]).replace("one of", "each one of")
    return text + (" " + ", ".join(bounds) if bounds else "")


def _default(prop: dict[str, Any]) -> str:
    if "default" not in prop:
        return "(required)" if prop.get("x-required") else "—"
    text = yaml.safe_dump(prop["default"], default_flow_style=True).strip()
    return f"`{text.removesuffix('...').strip()}`"


def _rows(props: dict[str, Any], prefix: str, defs: dict[str, Any]) -> list[str]:
    rows = []
    for name, prop in props.items():
        if "$ref" in prop:
            prop = {
                **defs[prop["$ref"].rsplit("/", 1)[-1]],
                **{k: v for k, v in prop.items() if k != "$ref"},
            }
        desc = " ".join(str(prop.get("description", "")).split()).replace("|", "\\|")
        if prop.get("type") == "object" and "properties" in prop:
            rows += _rows(prop["properties"], f"{prefix}{name}.", defs)
            continue
        rows.append(f"| `{prefix}{name}` | {_default(prop)} | {_allowed(prop)} | {desc} |")
    return rows


def reference() -> str:
    """The configuration reference (``config/README.md``), generated from the schema.

    One table per section of the config: every key, its default, what it allows and what
    it means — the schema's own words, kinds filled in from the registries.
    """
    schema = load_schema()
    defs = schema["$defs"]
    out = [
        "# Configuration reference",
        "",
        "GENERATED by `python -m fedmia.kinds reference > config/README.md` from the config "
        "schema (`src/fedmia/core/config.schema.yaml`) and the registered kinds; "
        "`tests/test_config.py` checks it is current. A config file given with "
        "`--configfile` is merged over `config/config.yaml` (mappings merge key by key, a "
        'list such as `grid` replaces). Defense parameters: README "Defenses" (`python -m '
        "fedmia.kinds defenses`).",
        "",
    ]
    top, sections = [], []
    for section, prop in schema["properties"].items():
        if "$ref" in prop and "key_map" not in prop["$ref"]:
            ref = defs[prop["$ref"].rsplit("/", 1)[-1]]
            prop = {**ref, **{k: v for k, v in prop.items() if k != "$ref"}}
        desc = " ".join(str(prop.get("description", "")).split())
        if prop.get("type") == "object" and "properties" in prop:
            body = _rows(prop["properties"], f"{section}.", defs)
        elif (
            isinstance(prop.get("additionalProperties"), dict)
            and "properties" in prop["additionalProperties"]
        ):
            body = _rows(prop["additionalProperties"]["properties"], f"{section}.<key>.", defs)
        elif section == "grid":
            body = _rows(prop["items"]["properties"], "grid[].", defs)
        else:  # a key of its own: the first table
            top.append(f"| `{section}` | {_default(prop)} | {_allowed(prop)} | {desc} |")
            continue
        sections += [
            f"## `{section}`",
            "",
            desc,
            "",
            "| key | default | allowed | meaning |",
            "|---|---|---|---|",
            *body,
            "",
        ]
    out += [
        "## Top-level keys",
        "",
        "| key | default | allowed | meaning |",
        "|---|---|---|---|",
        *top,
        "",
        *sections,
    ]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fedmia.kinds {list,defenses,schema}``."""
    parser = argparse.ArgumentParser(
        prog="python -m fedmia.kinds",
        description="Print the registered kinds, the README's table of defenses, or the "
        "config schema the workflow validates against (kinds filled in).",
    )
    parser.add_argument("what", choices=["list", "defenses", "schema", "reference"])
    args = parser.parse_args(argv)
    if args.what == "list":
        for family in REGISTRIES:
            sys.stdout.write(f"{family}: {', '.join(kinds(family))}\n")
    elif args.what == "defenses":
        sys.stdout.write(defense_table())
    elif args.what == "reference":
        sys.stdout.write(reference())
    else:
        sys.stdout.write(yaml.safe_dump(load_schema(), sort_keys=False, allow_unicode=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
