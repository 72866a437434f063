from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from fedmia.config import ConfigError
from fedmia.workflow import check_keys_are_registered, load_schema, load_workflow_config

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


@pytest.fixture
def default_config() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def test_default_config_is_valid_and_defaults_are_filled(default_config):
    spec = load_workflow_config(default_config, SCHEMA)
    assert [c.path for c in spec.cells] == ["digits/alexnet/none/iid/seed0",
                                            "digits/alexnet/none/dirichlet/seed0"]
    assert spec.config["datasets"]["digits"]["split_seed"] == 0  # schema default
    assert spec.train_for(spec.cells[0])["momentum"] == 0.9
    assert spec.observed_rounds(spec.cells[0]) == [1, 10, 20, 30]


def test_schema_enums_match_the_registries():
    for what, (in_schema, registered) in check_keys_are_registered(load_schema(SCHEMA)).items():
        assert sorted(in_schema) == registered, what


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


@pytest.mark.parametrize("path, value, message", [
    ("bogus", 1, r"at '<top level>': Additional properties .*'bogus' was unexpected.*allowed keys"),
    ("train.learning_rate", 0.1, r"at 'train'.*'learning_rate' was unexpected.*allowed keys are"),
    ("datasets.digits.kind", "mnist", r"at 'datasets.digits.kind': 'mnist' is not one of "
                                      r"\['digits', 'fashion_mnist', 'cifar100'"),
    ("models.alexnet.kind", "vgg", r"at 'models.alexnet.kind': 'vgg' is not one of "
                                   r"\['alexnet', 'resnet18', 'resnet18_bn'\]"),
    ("defenses.none.kind", "magic", r"at 'defenses.none.kind': 'magic' is not one of"),
    ("partitions.iid.num_clients", 1, r"at 'partitions.iid.num_clients': 1 is less than the "
                                      r"minimum of 2 \(number of clients K"),
    ("train.rounds", 0, r"at 'train.rounds': 0 is less than the minimum of 1"),
    ("train.observe_rounds", [1, 31], r"train.observe_rounds: round\(s\) \[31\] are outside 1..30"),
    ("partitions.dirichlet.beta", 0, r"at 'partitions.dirichlet.beta': 0 is less than or equal "
                                     r"to the minimum of 0"),
    ("partitions.dirichlet.beta", -1.0, r"partitions.dirichlet.beta"),
    ("partitions.dirichlet.beta", DELETE, r"'beta' is a required property"),
    ("partitions.iid.beta", 1.0, r"only a 'dirichlet' partition takes beta"),
    ("train.batch_size", 0, r"at 'train.batch_size': 0 is less than the minimum of 1"),
    ("train.lr_schedule", "step", r"'step' is not one of \['cosine', 'exponential', 'constant'\]"),
    ("grid.0.datasets", ["cifar100"], r"at 'grid\[0\].datasets': \['cifar100'\] not defined; "
                                      r"defined datasets: \['digits'\]"),
    ("grid.0.train", {"batch_size": 0}, r"at 'grid\[0\].train.batch_size': 0 is less than"),
    ("grid.0.train", {"observe_rounds": [50]}, r"round\(s\) \[50\] are outside 1..30"),
    ("attack.rounds", [10, 15],
     r"at 'attack.rounds': round\(s\) \[15\] are not observed in "
     r"cell digits/alexnet/none/iid/seed0 \(observed: \[1, 10, 20, 30\]"),
    ("attack.protocol", "leaky", r"at 'attack.protocol'"),
    ("attack.fpr_rule", "strict", r"'strict' is not one of \['at_most', 'below'\]"),
    ("attack.official", {"draws": 0}, r"at 'attack.official.draws': 0 is less than the minimum"),
    ("attack.official", {"test_slots": 1001},
     r"at 'attack.official.test_slots': 1001 slots are drawn from partition 'iid' but its "
     r"eval_nonmembers is 1000 \(cell digits/alexnet/none/iid/seed0\); the official protocol "
     r"needs eval_nonmembers >= 1001"),
    ("attack.official", {"client_slots": 30},
     r"partition 'dirichlet' but its eval_members_per_client is 20"),
    ("grid.0.attack", {"official": {"draws": 0}},
     r"at 'grid\[0\].attack.official.draws': 0 is less than the minimum of 1"),
    ("grid.0.attack", {"official": {"test_slots": 2000}},
     r"at 'attack.official.test_slots': 2000 slots are drawn from partition 'iid'"),
    ("report.single_round", 15, r"at 'report.single_round': round 15 is not observed in cell"),
    ("report.single_round", "best", r"at 'report.single_round'"),
    ("train.observe_every", 40, r"has no attacked rounds: train.rounds = 30 < "
                                r"train.observe_every = 40"),
    ("partitions.iid.num_clients", 2, r"at 'partitions.iid.num_clients': \['fedmia_loss', "
                                      r"'fedmia_cos'\] need at least 2 non-target clients"),
])
def test_bad_input_names_key_and_allowed_values(default_config, path, value, message):
    with pytest.raises(ConfigError, match=message):
        load_workflow_config(mutate(default_config, path, value), SCHEMA)


def test_key_names_must_be_path_safe(default_config):
    cfg = copy.deepcopy(default_config)
    cfg["partitions"]["dir.1"] = cfg["partitions"].pop("dirichlet")
    with pytest.raises(ConfigError, match=r"'dir.1' does not match"):
        load_workflow_config(cfg, SCHEMA)


@pytest.mark.parametrize("defense, message", [
    ({"kind": "dp", "sigma": -0.1, "clip": 1.0},
     r"defenses.bad.sigma': -0.1 is less than the minimum of 0"),
    ({"kind": "dp", "sigma": 0.1, "clip": -1.0}, r"defenses.bad.clip': -1.0 is less than or equal"),
    ({"kind": "dp_param_noise", "sigma": -1}, r"defenses.bad.sigma'"),
    ({"kind": "quantize", "bits": 0}, r"defenses.bad.bits': 0 is less than the minimum of 1"),
    ({"kind": "quantize", "bits": 33}, r"defenses.bad.bits': 33 is greater than the maximum of 32"),
    ({"kind": "sparsify", "fraction": 1.0},
     r"defenses.bad.fraction': 1.0 is greater than or equal"),
    ({"kind": "sparsify", "fraction": -0.1}, r"defenses.bad.fraction'"),
    ({"kind": "mixup", "alpha": 0}, r"defenses.bad.alpha': 0 is less than or equal to the minimum"),
    ({"kind": "instahide", "k": 0}, r"defenses.bad.k': 0 is less than the minimum of 1"),
    ({"kind": "magic"}, r"defenses.bad.kind': 'magic' is not one of \['none', 'dp'"),
    ({"kind": "dp", "sigma": 0.1, "clip": 1.0, "noise": 2}, r"'noise' was unexpected"),
])
def test_bad_defenses_stop_before_any_job(default_config, defense, message):
    cfg = copy.deepcopy(default_config)
    cfg["defenses"]["bad"] = defense
    with pytest.raises(ConfigError, match=message):
        load_workflow_config(cfg, SCHEMA)


def test_every_defense_kind_validates(default_config):
    cfg = copy.deepcopy(default_config)
    cfg["defenses"].update({
        "dp": {"kind": "dp", "sigma": 0.5, "clip": 1.0},
        "pn": {"kind": "dp_param_noise", "sigma": 0.01},
        "q": {"kind": "quantize", "bits": 4},
        "s": {"kind": "sparsify", "fraction": 0.9},
        "m": {"kind": "mixup", "alpha": 1.0},
        "i": {"kind": "instahide", "k": 3},
        "sub": {"kind": "subsample", "fraction": 0.5},
        "aug": {"kind": "augment"},
        "aug_mild": {"kind": "augment", "preset": "mild", "rotation": 10},
        "aug_sub": {"kind": "compose", "steps": [{"kind": "augment"},
                                                 {"kind": "subsample", "fraction": 0.5}],
                    "strength": "subsample.fraction"},
    })
    spec = load_workflow_config(cfg, SCHEMA)
    # augment's defaults come from its preset in fedmia.defenses, not from the schema
    assert spec.config["defenses"]["aug"] == {"kind": "augment"}
    assert spec.config["defenses"]["aug_sub"]["steps"][1] == {"kind": "subsample", "fraction": 0.5}


def test_a_compose_step_is_the_standalone_defense_schema():
    defenses = load_schema(SCHEMA)["properties"]["defenses"]["additionalProperties"]
    assert defenses["else"] == {"$ref": "#/$defs/defense"}
    assert defenses["then"]["properties"]["steps"]["items"] == {"$ref": "#/$defs/defense"}
    step_kinds = load_schema(SCHEMA)["$defs"]["defense"]["properties"]["kind"]["enum"]
    assert sorted(step_kinds + ["compose"]) == sorted(defenses["properties"]["kind"]["enum"])


def compose(*steps, **extra) -> dict:
    return {"kind": "compose", "steps": list(steps), **extra}


@pytest.mark.parametrize("defense, message", [
    (compose({"kind": "augment"}, {"kind": "dp", "sigma": -1, "clip": 1.0}),
     r"at 'defenses.bad.steps\[1\].sigma': -1 is less than the minimum of 0"),
    (compose({"kind": "subsample", "fraction": 0.5, "frac": 1}),
     r"at 'defenses.bad.steps\[0\]'.*'frac' was unexpected.*allowed keys are \['fraction', "
     r"'kind'\]"),
    (compose({"kind": "magic"}), r"at 'defenses.bad.steps\[0\].kind': 'magic' is not one of "
                                 r"\['none', 'dp'"),
    (compose(compose({"kind": "none"})),
     r"at 'defenses.bad.steps\[0\].kind': 'compose' is not one of \[.*'augment'\] "
     r"\(defense kind \(a compose step cannot itself be a compose\)\)"),
    (compose(), r"at 'defenses.bad.steps': \[\] should be non-empty"),
    ({"kind": "compose"}, r"'steps' is a required property"),
    (compose({"kind": "augment"}, strength="padding"),
     r"at 'defenses.bad.strength': 'padding' does not match .*one step's parameter"),
    (compose({"kind": "augment"}, strength="subsample.fraction"),
     r"defenses.bad: defense 'compose': strength = 'subsample.fraction': no step is of kind "
     r"'subsample'"),
    (compose({"kind": "augment"}, mode=1), r"'mode' was unexpected.*allowed keys are \['kind', "
                                           r"'steps', 'strength'\]"),
    ({"kind": "augment", "preset": "strong"}, r"at 'defenses.bad.preset': 'strong' is not one of "
                                              r"\['official', 'mild'\]"),
    ({"kind": "augment", "rotation": 270}, r"at 'defenses.bad.rotation': 270 is greater than"),
    ({"kind": "instahide", "k": 3, "upper_bound": 0.5},
     r"at 'defenses.bad.upper_bound': 0.5 is less than or equal to the minimum of 0.5"),
])
def test_bad_compose_and_new_parameters_stop_before_any_job(default_config, defense, message):
    cfg = copy.deepcopy(default_config)
    cfg["defenses"]["bad"] = defense
    with pytest.raises(ConfigError, match=message):
        load_workflow_config(cfg, SCHEMA)


def test_attack_plan_defaults(default_config):
    spec = load_workflow_config(copy.deepcopy(default_config), SCHEMA)
    cell = spec.cells[0]
    assert spec.observed_rounds(cell) == [1, 10, 20, 30]
    assert spec.attack_rounds(cell) == [10, 20, 30]  # round 1 observed, not attacked
    assert spec.protocols == ["aligned", "official"]
    assert spec.selections == ["best_tpr", "last"]
    cfg = mutate(mutate(default_config, "attack.rounds", [1, 30]), "attack.protocol", "official")
    cfg = mutate(cfg, "report.single_round", "best_tpr")
    spec = load_workflow_config(cfg, SCHEMA)
    assert spec.attack_rounds(cell) == [1, 30]
    assert spec.protocols == ["official"] and spec.selections == ["best_tpr"]


def test_grid_block_overrides_the_official_draws_of_its_cells(default_config):
    cfg = mutate(default_config, "attack.official", {"draws": 7})
    cfg["grid"] = [{**cfg["grid"][0], "partitions": ["iid"]},
                   {**cfg["grid"][0], "partitions": ["dirichlet"],
                    "attack": {"official": {"test_slots": 500}}}]
    spec = load_workflow_config(cfg, SCHEMA)
    iid, dirichlet = spec.cells
    assert spec.official_for(iid) == {"client_slots": None, "draws": 7, "self_mix": True,
                                      "test_slots": None}
    assert spec.official_for(dirichlet)["test_slots"] == 500
    assert spec.official_for(dirichlet)["draws"] == 7  # the top level stays in force
