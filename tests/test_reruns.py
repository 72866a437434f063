"""Which stages an edit of each module of fedmia reruns: written down, checked statically.

Every rule's ``code`` param is the fingerprint of its stage's entry module and what it
imports (:mod:`fedmia.core.fingerprint`; ``workflow/rules/common.smk``'s ``code()``):
editing a module changes the fingerprints of exactly the stages below, and Snakemake
reruns their jobs (and, through their new outputs, everything downstream). A new module
must be added here, deliberately; a change of import that changes a row fails until the
table says so. ``tests/test_workflow.py`` checks a few of these rows end to end with
``snakemake -n`` on an edited copy of the package.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmia.core.fingerprint import import_closure

SRC = Path(__file__).resolve().parents[1] / "src"
STAGES = ("prepare", "partition", "train", "recording", "measure", "attack", "report", "oneshot")

#: module → the stages whose code param an edit of it changes.
RERUNS = {
    "fedmia": STAGES,  # every stage
    "fedmia.attacker": ("measure", "attack", "report"),
    "fedmia.attacker.attacks": ("attack", "report"),
    "fedmia.attacker.calibrated": ("attack", "report"),
    "fedmia.attacker.layerwise": ("measure",),
    "fedmia.attacker.measures": ("measure",),
    "fedmia.attacker.metrics": ("attack", "report"),
    "fedmia.attacker.routes": ("measure",),
    "fedmia.attacker.uncertainty": ("attack", "report"),
    "fedmia.core": STAGES,  # every stage
    "fedmia.core.config": STAGES,  # every stage
    "fedmia.core.contracts": STAGES,  # every stage
    "fedmia.core.fingerprint": ("train", "oneshot"),
    "fedmia.core.lazy": ("prepare", "train", "recording", "measure", "attack", "report", "oneshot"),
    "fedmia.core.lockfile": ("train", "recording", "oneshot"),
    "fedmia.core.logs": STAGES,  # every stage
    "fedmia.core.params": ("train", "recording", "measure", "report", "oneshot"),
    "fedmia.core.registry": STAGES,  # every stage
    "fedmia.federation": (
        "prepare",
        "partition",
        "train",
        "recording",
        "measure",
        "report",
        "oneshot",
    ),
    "fedmia.federation.datasets": ("prepare",),
    "fedmia.federation.defenses": ("train", "recording", "measure", "report", "oneshot"),
    "fedmia.federation.fedavg": ("train", "recording", "measure", "oneshot"),
    "fedmia.federation.models": ("train", "recording", "measure", "oneshot"),
    "fedmia.federation.nets": ("train", "recording", "measure", "oneshot"),
    "fedmia.federation.partition": ("partition", "train", "recording", "measure", "oneshot"),
    "fedmia.federation.state": ("train", "recording", "measure", "report", "oneshot"),
    "fedmia.flower": (),
    "fedmia.kinds": (),
    "fedmia.pipeline": (),
    "fedmia.privacy": ("train", "attack", "report", "oneshot"),
    "fedmia.privacy.accounting": ("report",),
    "fedmia.privacy.audit": ("attack",),
    "fedmia.privacy.events": ("train", "report", "oneshot"),
    "fedmia.report": ("report",),
    "fedmia.report.figures": ("report",),
    "fedmia.report.findings": ("report",),
    "fedmia.report.tables": ("report",),
    "fedmia.report.utility": ("report",),
    "fedmia.report.secagg": ("report",),
    "fedmia.stages": STAGES,  # every stage
    "fedmia.stages.attack": ("attack",),
    "fedmia.stages.compute": ("train", "recording", "measure", "oneshot"),
    "fedmia.stages.io": STAGES,  # every stage
    "fedmia.stages.measure": ("measure",),
    "fedmia.stages.partition": ("partition",),
    "fedmia.stages.prepare": ("prepare",),
    "fedmia.stages.recording": ("recording",),
    "fedmia.stages.report": ("report",),
    "fedmia.stages.train": ("train", "oneshot"),
    "fedmia.privacy.oneshot": ("oneshot",),
    "fedmia.stages.oneshot": ("oneshot",),
    "fedmia.workflow": (),
}


def stage_closure(stage: str) -> set[str]:
    """The modules a stage's rules fingerprint (common.smk: the entry and the logging)."""
    return import_closure([f"fedmia.stages.{stage}", "fedmia.core.logs"])


def package_modules() -> set[str]:
    out = set()
    for path in (SRC / "fedmia").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        out.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def test_the_table_covers_every_module():
    assert set(RERUNS) == package_modules(), "add the new module to RERUNS"


@pytest.mark.parametrize("module", sorted(RERUNS))
def test_an_edit_reruns_exactly_the_stages_the_table_says(module):
    closures = {s: stage_closure(s) for s in STAGES}
    assert tuple(s for s in STAGES if module in closures[s]) == RERUNS[module]


def test_what_the_issues_asked():
    """An edit of the metrics reruns no training; one of the audit no partition."""
    assert "train" not in RERUNS["fedmia.attacker.metrics"]
    assert RERUNS["fedmia.privacy.audit"] == ("attack",)
    assert RERUNS["fedmia.privacy.accounting"] == ("report",)  # ε at δ: the report's
    # dotted path
    assert RERUNS["fedmia.federation.nets"] == ("train", "recording", "measure", "oneshot")
