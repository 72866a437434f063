from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from fedmia.attacker import metrics
from fedmia.attacker.attacks import ATTACKS, OUTLIER_POLICIES, PROTOCOLS
from fedmia.core.config import AGGREGATIONS, DATASET_SPLITS, LR_SCHEDULES, ConfigError
from fedmia.core.params import param, parameters, schema_block, validate
from fedmia.federation.defenses import DEFENSES, Defense, defense_table
from fedmia.federation.models import MODELS
from fedmia.kinds import (
    REGISTRIES,
    defense_blocks,
    fill_kinds,
    kinds,
    load_schema,
    read_schema,
    reference,
)
from fedmia.report.tables import SELECTIONS
from fedmia.workflow import load_workflow_config

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "src" / "fedmia" / "core" / "config.schema.yaml"


@dataclass(frozen=True)
class ToyDefense(Defense):
    std: float = param(0.1, minimum=0, description="noise std")


@pytest.fixture
def default_config() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def test_default_config_is_valid_and_defaults_are_filled(default_config):
    spec = load_workflow_config(default_config, SCHEMA)
    assert [c.path for c in spec.cells] == [
        "digits/alexnet/none/iid/seed0",
        "digits/alexnet/none/dirichlet/seed0",
    ]
    assert spec.config["datasets"]["digits"]["split_seed"] == 0  # schema default
    assert spec.train_for(spec.cells[0])["momentum"] == 0.9
    assert spec.observed_rounds(spec.cells[0]) == [1, 10, 20, 30]


def test_no_kind_list_is_checked_into_the_schema():
    """Every list of kinds is a marker the registries fill (plugins included)."""
    raw = read_schema(SCHEMA)
    names = {k for reg in REGISTRIES.values() for k in reg.registered()}

    def lists(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "enum" and isinstance(value, list):  # a default may pick kinds
                    yield value
                yield from lists(value)
        elif isinstance(node, list):
            for value in node:
                yield from lists(value)

    for values in lists(raw):
        kinds_in = set(map(str, values)) & names - {"official"}  # a dataset split's name
        assert len(kinds_in) < 2, f"a list of kinds is checked into the schema: {values}"
    assert "allOf" not in raw["$defs"]["defense"]  # the defense blocks are generated


def test_the_schema_lists_exactly_the_registered_kinds():
    schema = load_schema(SCHEMA)
    kind = {
        f: schema["properties"][f]["additionalProperties"]["properties"]["kind"]["enum"]
        for f in ("datasets", "models", "partitions", "defenses")
    }
    for family, listed in kind.items():
        assert listed == kinds(family)
    assert schema["$defs"]["defense"]["properties"]["kind"]["enum"] == kinds("composable defenses")
    attack = schema["properties"]["attack"]["properties"]
    assert attack["attacks"]["items"]["enum"] == ATTACKS.registered()
    assert attack["attacks"]["default"] == ATTACKS.registered()  # the run order
    assert attack["protocol"]["default"] == PROTOCOLS.registered()
    assert schema["properties"]["measure"]["properties"]["route"]["enum"] == kinds("measure routes")


def test_schema_defense_blocks_are_generated_from_the_dataclasses():
    schema = load_schema(SCHEMA)
    filled = {
        b["if"]["properties"]["kind"]["const"]: b for b in schema["$defs"]["defense"]["allOf"]
    }
    generated = {b["if"]["properties"]["kind"]["const"]: b for b in defense_blocks()}
    assert filled == generated and set(filled) == set(kinds("composable defenses"))


def test_docs_defense_table_is_generated_from_the_dataclasses():
    """docs/defenses.md's table of defenses is what the registered defenses generate."""
    page = (REPO / "docs" / "defenses.md").read_text()
    assert defense_table() in page, "paste the output of: python -m fedmia.kinds defenses"


def test_the_readme_is_a_front_door():
    """At most 200 lines; every page it links exists."""
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for link in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme):
        if not link.startswith("http"):
            assert (REPO / link).exists(), f"README links {link}, which does not exist"


def test_schema_enums_of_settings_match_the_code():
    """The schema's other fixed choices are the code's constants."""
    props = load_schema(SCHEMA)["properties"]
    attack, report = props["attack"]["properties"], props["report"]["properties"]
    assert attack["fpr_rule"]["enum"] == list(metrics.FPR_RULES)
    assert attack["protocol"]["oneOf"][0]["enum"] == PROTOCOLS.registered()
    assert attack["fedmia_outlier_filter"]["enum"] == list(OUTLIER_POLICIES)
    assert report["round_plot_fpr"]["enum"] == list(metrics.FPR_LEVELS)
    assert load_schema(SCHEMA)["$defs"]["single_round"]["oneOf"][0]["enum"] == (
        SELECTIONS.registered()
    )
    report = load_schema(SCHEMA)["properties"]["report"]["properties"]
    assert report["table_metrics"]["items"]["enum"] == list(metrics.METRICS)
    assert load_schema(SCHEMA)["$defs"]["train"]["properties"]["lr_schedule"]["enum"] == list(
        LR_SCHEDULES
    )
    dataset = props["datasets"]["additionalProperties"]["properties"]
    assert dataset["split"]["enum"] == [None, *DATASET_SPLITS]
    assert load_schema(SCHEMA)["$defs"]["train"]["properties"]["aggregation"]["enum"] == list(
        AGGREGATIONS
    )


def test_a_registered_kind_reaches_the_schema(monkeypatch):
    """What a plugin registers is in the schema's lists (and a defense's block)."""
    monkeypatch.setattr(DEFENSES, "_items", dict(DEFENSES._items))
    monkeypatch.setattr(MODELS, "_items", dict(MODELS._items))
    DEFENSES.register("input_noise")(ToyDefense)
    MODELS.register("tiny", impl="toy:tiny", samples_per_s={"gpu": 1, "cpu": 1}, parameters=1)
    schema = fill_kinds(read_schema(SCHEMA))
    assert (
        "tiny"
        in schema["properties"]["models"]["additionalProperties"]["properties"]["kind"]["enum"]
    )
    assert "input_noise" in schema["$defs"]["defense"]["properties"]["kind"]["enum"]
    assert schema["$defs"]["defense"]["allOf"][-1] == schema_block(ToyDefense, "input_noise")


def test_a_string_parameter_is_one_of_its_choices():
    """A ``str`` parameter (a variant) lists its values; they reach the schema and checks."""

    @dataclass(frozen=True)
    class Variants:
        variant: str = param("a", choices=("a", "b"), description="which")

    assert schema_block(Variants, "v")["then"]["properties"]["variant"] == {
        "type": "string",
        "enum": ["a", "b"],
        "default": "a",
        "description": "which",
    }
    assert validate(Variants, {"variant": "b"}, kind="v", what="defense") == {"variant": "b"}
    with pytest.raises(
        ConfigError,
        match=r"'variant' = 'c' is invalid; allowed: one of "
        r"\['a', 'b'\]",
    ):
        validate(Variants, {"variant": "c"}, kind="v", what="defense")
    with pytest.raises(ValueError, match=r"default 'c' is not one of the choices"):
        param("c", choices=("a", "b"))

    @dataclass(frozen=True)
    class NoChoices:
        variant: str = param("a")

    with pytest.raises(TypeError, match=r"lists its values: param\(..., choices="):
        parameters(NoChoices)


def test_parsing_modules_import_no_torch():
    """The modules the Snakefile imports at parse time (common.smk) import no torch."""
    code = (
        "import sys, fedmia.workflow, fedmia.stages.io, fedmia.core.fingerprint, "
        "fedmia.attacker.attacks; "
        "bad = [m for m in ('torch', 'sklearn') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_grid_block_overrides_reach_only_its_cells(default_config):
    cfg = default_config
    cfg["grid"] = [
        {**cfg["grid"][0], "partitions": ["iid"]},
        {**cfg["grid"][0], "partitions": ["dirichlet"], "train": {"rounds": 40}},
    ]
    spec = load_workflow_config(cfg, SCHEMA)
    rounds = {c.partition: spec.train_for(c)["rounds"] for c in spec.cells}
    assert rounds == {"iid": 30, "dirichlet": 40}


def mutate(cfg: dict, path: str, value) -> dict:
    cfg = copy.deepcopy(cfg)
    *parents, last = path.split(".")
    node = cfg
    for p in parents:
        node = node[int(p)] if p.isdigit() else node.setdefault(p, {})
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return cfg


DELETE = object()


def test_every_defense_kind_validates(default_config):
    cfg = copy.deepcopy(default_config)
    cfg["defenses"].update(
        {
            "dp": {"kind": "dp", "sigma": 0.5, "clip": 1.0},
            "pn": {"kind": "dp_param_noise", "sigma": 0.01},
            "q": {"kind": "quantize", "bits": 4},
            "s": {"kind": "sparsify", "fraction": 0.9},
            "m": {"kind": "mixup", "alpha": 1.0},
            "i": {"kind": "instahide", "k": 3},
            "sub": {"kind": "subsample", "fraction": 0.5},
            "aug": {"kind": "augment"},
            "aug_mild": {"kind": "augment", "preset": "mild", "rotation": 10},
            "aug_sub": {
                "kind": "compose",
                "steps": [{"kind": "augment"}, {"kind": "subsample", "fraction": 0.5}],
                "strength": "subsample.fraction",
            },
        }
    )
    spec = load_workflow_config(cfg, SCHEMA)
    # augment's defaults come from its preset in fedmia.federation.defenses, not from the schema
    assert spec.config["defenses"]["aug"] == {"kind": "augment"}
    assert spec.config["defenses"]["aug_sub"]["steps"][1] == {"kind": "subsample", "fraction": 0.5}


def test_a_compose_step_is_the_standalone_defense_schema():
    defenses = load_schema(SCHEMA)["properties"]["defenses"]["additionalProperties"]
    assert defenses["else"] == {"$ref": "#/$defs/defense"}
    assert defenses["then"]["properties"]["steps"]["items"] == {"$ref": "#/$defs/defense"}
    step_kinds = load_schema(SCHEMA)["$defs"]["defense"]["properties"]["kind"]["enum"]
    assert sorted(step_kinds + ["compose"]) == sorted(defenses["properties"]["kind"]["enum"])


def test_attack_plan_defaults(default_config):
    spec = load_workflow_config(copy.deepcopy(default_config), SCHEMA)
    cell = spec.cells[0]
    schema_default = load_schema(SCHEMA)["properties"]["report"]["properties"]["single_round"][
        "default"
    ]
    DEFAULT_SELECTIONS = default_config.get("report", {}).get("single_round", schema_default)
    assert spec.observed_rounds(cell) == [1, 10, 20, 30]
    assert spec.attack_rounds(cell) == [10, 20, 30]  # round 1 observed, not attacked
    assert spec.protocols == ["aligned", "official", "heldout"]
    assert spec.selections == DEFAULT_SELECTIONS
    cfg = mutate(mutate(default_config, "attack.rounds", [1, 30]), "attack.protocol", "official")
    cfg = mutate(cfg, "report.single_round", "best_tpr_mean")
    spec = load_workflow_config(cfg, SCHEMA)
    assert spec.attack_rounds(cell) == [1, 30]
    assert spec.protocols == ["official"] and spec.selections == ["best_tpr_mean"]


def test_grid_block_overrides_the_official_draws_of_its_cells(default_config):
    cfg = mutate(default_config, "attack.official", {"draws": 7})
    cfg["grid"] = [
        {**cfg["grid"][0], "partitions": ["iid"]},
        {
            **cfg["grid"][0],
            "partitions": ["dirichlet"],
            "attack": {"official": {"test_slots": 500}},
        },
    ]
    spec = load_workflow_config(cfg, SCHEMA)
    iid, dirichlet = spec.cells
    assert spec.official_for(iid) == {
        "client_slots": None,
        "draws": 7,
        "self_mix": True,
        "test_slots": None,
    }
    assert spec.official_for(dirichlet)["test_slots"] == 500
    assert spec.official_for(dirichlet)["draws"] == 7  # the top level stays in force


NEW_DEFENSE = '''

@DEFENSES.register("upload_scale")
@dataclass(frozen=True)
class UploadScale(Defense):
    """``upload_scale``: the upload multiplied by a factor (a test defense)."""

    factor: float = param(1.0, exclusive_minimum=0, description="scale of the upload")
    strength_param = "factor"
    privacy_step = "upload"

    def upload(self, update, layout, gen):
        return update * self.factor
'''


def test_adding_a_defense_inside_fedmia_touches_one_file(tmp_path):
    """Append a defense to a copy of federation/defenses.py and nothing else: the workflow
    validates it (the schema lists it, its block checks its parameters), it builds and runs
    its hook, and the README table generator has its row."""
    src = tmp_path / "src"
    shutil.copytree(
        REPO / "src" / "fedmia", src / "fedmia", ignore=shutil.ignore_patterns("__pycache__")
    )
    defenses = src / "fedmia" / "federation" / "defenses.py"
    defenses.write_text(defenses.read_text() + NEW_DEFENSE)
    config = yaml.safe_load((REPO / ".test" / "config" / "config.yaml").read_text())
    config["defenses"]["scaled"] = {"kind": "upload_scale", "factor": 2.0}
    config["grid"][0]["defenses"] = ["none", "scaled"]
    code = f"""
import sys, torch, yaml
from fedmia.workflow import load_workflow_config
from fedmia.kinds import load_schema, main
from fedmia.core.config import ConfigError
from fedmia.federation.defenses import defense_from_config, defense_table
config = yaml.safe_load({yaml.safe_dump(config)!r})
spec = load_workflow_config(config, {str(SCHEMA)!r})
assert any(c.defense == "scaled" for c in spec.cells)
schema = load_schema({str(SCHEMA)!r})
assert "upload_scale" in schema["$defs"]["defense"]["properties"]["kind"]["enum"]
bad = yaml.safe_load({yaml.safe_dump(config)!r})
bad["defenses"]["scaled"]["factor"] = -1.0
try:
    load_workflow_config(bad, {str(SCHEMA)!r})
    sys.exit("a negative factor was accepted")
except ConfigError as e:
    assert "factor" in str(e), e
d = defense_from_config({{"kind": "upload_scale", "factor": 3.0}})
assert torch.equal(d.upload(torch.ones(2), None, None), torch.full((2,), 3.0))
assert "| `upload_scale` |" in defense_table()
"""
    env = {**os.environ, "PYTHONPATH": str(src)}
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_configuration_reference_is_generated_from_the_schema():
    """config/README.md is what the schema and the registries generate."""
    assert (REPO / "config" / "README.md").read_text() == reference(), (
        "config/README.md is stale: python -m fedmia.kinds reference > config/README.md"
    )
