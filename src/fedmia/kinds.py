"""Every built-in kind, registered: what the config schema and the README derive from them.

Importing this module imports every module that fills a registry of
:mod:`fedmia.core.registry` (so it imports torch; the workflow never imports it). From the
registries come:

* the schema's lists of kinds and the defenses' parameter blocks
  (:func:`fedmia.workflow.kind_lists`, :func:`fedmia.workflow.defense_blocks`): the
  checked-in ``workflow/schemas/config.schema.yaml`` holds them for the built-in kinds,
  so that parsing the Snakefile needs no torch, and ``tests/test_config.py`` checks
  that they are exactly what the registries generate;
* the README's defense table (:func:`fedmia.federation.defenses.defense_table`).

After adding a kind in fedmia itself, print what to paste::

    python -m fedmia.kinds schema      # YAML: each kind list, and the $defs.defense blocks
    python -m fedmia.kinds defenses    # Markdown: the README's table of defenses

(a plugin's kinds need neither: the workflow adds them to the schema when it imports the
plugin).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from fedmia import report  # noqa: F401

# the modules that fill the registries (imported for that effect)
from fedmia.federation.defenses import defense_table
from fedmia.workflow import defense_blocks, kind_lists

__all__ = ["defense_table", "main", "schema_yaml"]


def _flow(value: Any) -> str:
    """``value`` as one line of YAML flow style (strings quoted where YAML needs it)."""
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=math.inf,
                          allow_unicode=True).strip().removesuffix("\n...").strip()


def _block_yaml(block: Mapping[str, Any], indent: str) -> list[str]:
    """One ``$defs.defense.allOf`` item, in the layout of the checked-in schema."""
    then = block["then"]
    lines = [f"{indent}- if: {_flow(block['if'])}", f"{indent}  then:"]
    for key, value in then.items():
        if key == "properties":
            lines.append(f"{indent}    properties:")
            lines += [f"{indent}      {name}: {_flow(prop)}" for name, prop in value.items()]
        else:
            lines.append(f"{indent}    {key}: {_flow(value)}")
    return lines


def schema_yaml() -> str:
    """The schema's parts that the registries generate, as YAML to paste.

    Each list of kinds (``<where in the schema>: [names]``), then the ``allOf`` list of
    ``$defs.defense`` (one block per kind that can be a compose step).
    """
    lines = ["# kinds: where in workflow/schemas/config.schema.yaml -> enum"]
    for where, names in kind_lists().items():
        lines.append(f"# {where}: {_flow(names)}")
    lines.append("# $defs.defense.allOf:")
    lines.append("    allOf:")
    for block in defense_blocks():
        lines += _block_yaml(block, "      ")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fedmia.kinds {schema,defenses}``: print what the registries generate."""
    parser = argparse.ArgumentParser(
        prog="python -m fedmia.kinds",
        description="Print the parts of the config schema or of the README that the "
                    "registered kinds generate.")
    parser.add_argument("what", choices=["schema", "defenses"],
                        help="schema: the lists of kinds and the defense blocks (YAML); "
                             "defenses: the README's table of defenses (Markdown)")
    args = parser.parse_args(argv)
    sys.stdout.write(schema_yaml() if args.what == "schema" else defense_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
