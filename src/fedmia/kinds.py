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
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from fedmia.attacker.attacks import ATTACKS, FINDINGS, PROTOCOLS
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
SCHEMA = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"
#: Every registry by family (the ``x-kinds`` names of the config schema).
REGISTRIES: dict[str, Registry[Any]] = {
    "datasets": DATASETS, "partitions": PARTITIONS, "models": MODELS, "defenses": DEFENSES,
    "measure routes": MEASURE_ROUTES, "attacks": ATTACKS, "protocols": PROTOCOLS,
    "selections": SELECTIONS, "findings": FINDINGS, "figures": FIGURES,
    "table figures": TABLE_FIGURES}


def kinds(family: str) -> list[str]:
    """The registered kinds of ``family`` in registration order.

    ``composable defenses``: the defenses that may be a step of a ``compose``.

    Raises:
        ValueError: an unknown family.
    """
    if family == "composable defenses":
        return [k for k in DEFENSES.registered() if DEFENSES.get(k).composable]
    if family not in REGISTRIES:
        raise ValueError(f"unknown family of kinds {family!r}; choose from "
                         f"{['composable defenses', *REGISTRIES]}")
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


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fedmia.kinds {list,defenses,schema}``."""
    parser = argparse.ArgumentParser(
        prog="python -m fedmia.kinds",
        description="Print the registered kinds, the README's table of defenses, or the "
                    "config schema the workflow validates against (kinds filled in).")
    parser.add_argument("what", choices=["list", "defenses", "schema"])
    args = parser.parse_args(argv)
    if args.what == "list":
        for family in REGISTRIES:
            sys.stdout.write(f"{family}: {', '.join(kinds(family))}\n")
    elif args.what == "defenses":
        sys.stdout.write(defense_table())
    else:
        sys.stdout.write(yaml.safe_dump(load_schema(), sort_keys=False, allow_unicode=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
