"""The workflow's view of the config: validation, defaults and the grid of cells.

``common.smk`` calls :func:`load_workflow_config` when the Snakefile is parsed, so
bad input stops the run before any job starts, with a message that names the key,
what is wrong and what is allowed.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from fedmia.config import (
    ConfigError,
    DatasetConfig,
    DefenseConfig,
    ModelConfig,
    PartitionConfig,
    TrainConfig,
)

SCHEMA = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


@dataclass(frozen=True, order=True)
class Cell:
    """One FedAvg run: ``(dataset, model, defense, partition, seed)``."""

    dataset: str
    model: str
    defense: str
    partition: str
    seed: int

    @property
    def path(self) -> str:
        """Path part ``{dataset}/{model}/{defense}/{partition}/seed{seed}``."""
        return f"{self.dataset}/{self.model}/{self.defense}/{self.partition}/seed{self.seed}"


def canonical(obj: Any) -> Any:
    """``obj`` with every mapping's keys sorted, recursively.

    Snakemake compares a rule's params as written; sorting makes a reordered
    config file (same content) not look like a change.
    """
    if isinstance(obj, Mapping):
        return {k: canonical(obj[k]) for k in sorted(obj)}
    if isinstance(obj, list | tuple):
        return [canonical(v) for v in obj]
    return obj


def _with_defaults(cls: type) -> type:
    """A jsonschema validator class that also fills in ``default`` values."""
    validate_props = cls.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):  # noqa: ANN001
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if isinstance(sub, dict) and "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_props(validator, properties, instance, schema)

    return jsonschema.validators.extend(cls, {"properties": set_defaults})


def _where(path) -> str:  # noqa: ANN001
    parts = []
    for p in path:
        parts.append(f"[{p}]" if isinstance(p, int) else f".{p}")
    return "".join(parts).lstrip(".") or "<top level>"


def _raise_first(errors: list[jsonschema.ValidationError], prefix: str = "") -> None:
    if not errors:
        return
    err = jsonschema.exceptions.best_match(errors)
    where = (prefix + _where(err.absolute_path) if err.absolute_path or not prefix
             else prefix.rstrip("."))
    msg = err.message
    if err.validator == "additionalProperties" and isinstance(err.schema.get("properties"), dict):
        msg += f"; allowed keys are {sorted(err.schema['properties'])}"
    if err.validator == "required":
        msg += "; add it"
    if err.validator == "not" and err.validator_value == {"required": ["beta"]}:
        msg = "only a 'dirichlet' partition takes beta; drop beta or set kind: dirichlet"
    desc = None
    if err.absolute_path:
        # an alternative of a oneOf/anyOf may lack the description of the key it failed
        # for: take the nearest one up the chain (it says what is allowed)
        node: jsonschema.ValidationError | None = err
        while node is not None and desc is None:
            desc = node.schema.get("description") if isinstance(node.schema, dict) else None
            node = node.parent
    raise ConfigError(f"invalid config at '{where}': {msg}" + (f" ({desc})" if desc else ""))


def load_schema(path: str | Path = SCHEMA) -> dict[str, Any]:
    """Read the config JSON schema (YAML)."""
    return yaml.safe_load(Path(path).read_text())


@dataclass(frozen=True)
class WorkflowSpec:
    """A validated config (defaults filled in) and the cells it asks for."""

    config: dict[str, Any]
    cells: tuple[Cell, ...]
    train: dict[Cell, dict[str, Any]]
    official: dict[Cell, dict[str, Any]]

    def train_for(self, cell: Cell) -> dict[str, Any]:
        """Resolved training config of ``cell`` (``train`` updated by its grid block)."""
        return canonical(self.train[cell])

    def observed_rounds(self, cell: Cell) -> list[int]:
        """Observed rounds of ``cell``."""
        return TrainConfig.from_dict(self.train[cell]).observed()

    def attack_rounds(self, cell: Cell) -> list[int]:
        """Rounds the attacks of ``cell`` use (``attack.rounds``, else observe_every's)."""
        rounds = self.config["attack"]["rounds"]
        if rounds is None:
            return TrainConfig.from_dict(self.train[cell]).every_rounds()
        return sorted(rounds)

    def official_for(self, cell: Cell) -> dict[str, Any]:
        """The official protocol's options of ``cell`` (``attack.official`` ∪ its block's)."""
        return canonical(self.official[cell])

    @property
    def protocols(self) -> list[str]:
        """The non-member protocols, as a list."""
        return _as_list(self.config["attack"]["protocol"])

    @property
    def selections(self) -> list[str | int]:
        """The single-round selections of the report, as a list."""
        return _as_list(self.config["report"]["single_round"])


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, list | tuple) else [value]


def _check_attack_plan(spec: WorkflowSpec) -> None:
    """Cross-checks of the attack and report options against every cell."""
    config = spec.config
    attack = config["attack"]
    for cell in spec.cells:
        train = TrainConfig.from_dict(spec.train[cell])
        observed = train.observed()
        rounds = spec.attack_rounds(cell)
        if not rounds:
            raise ConfigError(
                f"invalid config: cell {cell.path} has no attacked rounds: train.rounds = "
                f"{train.rounds} < train.observe_every = {train.observe_every}; lower "
                "observe_every or list attack.rounds")
        lacking = sorted(set(rounds) - set(observed))
        if lacking:
            raise ConfigError(
                f"invalid config at 'attack.rounds': round(s) {lacking} are not observed in "
                f"cell {cell.path} (observed: {observed}); attack observed rounds only, or "
                "add them to train.observe_rounds")
        for how in spec.selections:
            if isinstance(how, int) and how not in observed:
                raise ConfigError(
                    f"invalid config at 'report.single_round': round {how} is not observed in "
                    f"cell {cell.path} (observed: {observed}); pick an observed round")
    fedmia = [a for a in attack["attacks"] if a.startswith("fedmia_")]
    targets = [] if attack["targets"] == "all" else attack["targets"]
    for key in sorted({c.partition for c in spec.cells}):
        part = PartitionConfig.from_dict(config["partitions"][key])
        beyond = sorted({t for t in targets if t >= part.num_clients})
        if beyond:
            raise ConfigError(
                f"invalid config at 'attack.targets': client(s) {beyond} do not exist in "
                f"partition '{key}' (num_clients {part.num_clients}, ids 0.."
                f"{part.num_clients - 1}); list ids below num_clients, or all")
        if fedmia and part.num_clients < 3:
            raise ConfigError(
                f"invalid config at 'partitions.{key}.num_clients': {fedmia} need at least 2 "
                f"non-target clients, i.e. num_clients >= 3 (got {part.num_clients}); raise it "
                "or drop those attacks")
    if "official" not in spec.protocols:
        return
    for cell in spec.cells:
        official = spec.official[cell]
        part = PartitionConfig.from_dict(config["partitions"][cell.partition])
        for which, pool, name in (("test_slots", part.eval_nonmembers, "eval_nonmembers"),
                                  ("client_slots", part.eval_members_per_client,
                                   "eval_members_per_client")):
            slots = official[which]
            if slots is not None and slots > pool:
                raise ConfigError(
                    f"invalid config at 'attack.official.{which}': {slots} slots are drawn "
                    f"from partition '{cell.partition}' but its {name} is {pool} (cell "
                    f"{cell.path}); the official protocol needs {name} >= {slots} (raise it) "
                    f"or lower {which}")


def load_workflow_config(config: dict[str, Any], schema_path: str | Path = SCHEMA) -> WorkflowSpec:
    """Validate ``config`` in place (filling defaults) and expand its grid.

    Raises:
        ConfigError: naming the first offending key, what is wrong and what is allowed.
    """
    schema = load_schema(schema_path)
    base = jsonschema.Draft202012Validator
    _raise_first(list(_with_defaults(base)(schema).iter_errors(config)))
    # Typed configs double-check each block (the package's own validation).
    for section, cls in (("datasets", DatasetConfig), ("models", ModelConfig),
                         ("partitions", PartitionConfig), ("defenses", DefenseConfig)):
        for key, block in config[section].items():
            cls.from_dict(block, where=f"{section}.{key}")
    train_validator = base({**schema["$defs"]["train"], "$defs": schema["$defs"]})
    official_validator = base({**schema["$defs"]["official"], "$defs": schema["$defs"]})
    TrainConfig.from_dict(config["train"], where="train")

    cells: list[Cell] = []
    train: dict[Cell, dict[str, Any]] = {}
    official: dict[Cell, dict[str, Any]] = {}
    for i, block in enumerate(config["grid"]):
        for section in ("datasets", "models", "defenses", "partitions"):
            missing = [k for k in block[section] if k not in config[section]]
            if missing:
                raise ConfigError(
                    f"invalid config at 'grid[{i}].{section}': {missing} not defined; "
                    f"defined {section}: {sorted(config[section])}"
                )
        merged = {**config["train"], **block.get("train", {})}
        block_official = {**config["attack"]["official"],
                          **block.get("attack", {}).get("official", {})}
        _raise_first(list(official_validator.iter_errors(block_official)),
                     prefix=f"grid[{i}].attack.official.")
        _raise_first(list(train_validator.iter_errors(merged)), prefix=f"grid[{i}].train.")
        TrainConfig.from_dict(merged, where=f"grid[{i}].train (merged with train)")
        for combo in itertools.product(block["datasets"], block["models"], block["defenses"],
                                       block["partitions"], block["seeds"]):
            cell = Cell(*combo)
            if cell in train and (train[cell], official[cell]) != (merged, block_official):
                raise ConfigError(
                    f"invalid config at 'grid[{i}]': cell {cell.path} also appears in an earlier "
                    "grid block with different training or attack settings; keep each cell in "
                    "one block"
                )
            if cell not in train:
                cells.append(cell)
                train[cell] = merged
                official[cell] = block_official
    spec = WorkflowSpec(config=config, cells=tuple(cells), train=train, official=official)
    _check_attack_plan(spec)
    return spec


def check_keys_are_registered(schema: Mapping[str, Any]) -> dict[str, tuple[list, list]]:
    """Schema enums vs registries (``{what: (schema names, registry names)}``), for tests."""
    from fedmia.attacks import ATTACKS
    from fedmia.datasets import DATASETS
    from fedmia.defenses import DEFENSES
    from fedmia.measures import MEASURE_ROUTES
    from fedmia.models import MODELS
    from fedmia.partition import PARTITIONS

    props = schema["properties"]
    return {
        "datasets": (props["datasets"]["additionalProperties"]["properties"]["kind"]["enum"],
                     DATASETS.names()),
        "partitions": (props["partitions"]["additionalProperties"]["properties"]["kind"]["enum"],
                       PARTITIONS.names()),
        "models": (props["models"]["additionalProperties"]["properties"]["kind"]["enum"],
                   MODELS.names()),
        "defenses": (props["defenses"]["additionalProperties"]["properties"]["kind"]["enum"],
                     DEFENSES.names()),
        "measure routes": (props["measure"]["properties"]["route"]["enum"],
                           MEASURE_ROUTES.names()),
        "attacks": (props["attack"]["properties"]["attacks"]["items"]["enum"], ATTACKS.names()),
    }


# ----------------------------------------------------------------- cluster resources

#: Samples of each dataset kind (both splits), for resource estimates before ``prepare``
#: has run; a kind not listed (e.g. ``imagefolder``) is taken as 60,000.
DATASET_SAMPLES = {"digits": 1_797, "fashion_mnist": 70_000, "cifar100": 60_000,
                   "dermnet": 19_559}
#: Training samples per second per job, a deliberately low estimate (GPU: an older data-centre
#: card; CPU: one busy core, measured here: AlexNet 646/s, ResNet18 ~80/s). A model kind
#: not listed is costed as ResNet18.
THROUGHPUT = {"alexnet": {"gpu": 10_000, "cpu": 500},
              "resnet18": {"gpu": 2_000, "cpu": 60},
              "resnet18_bn": {"gpu": 2_000, "cpu": 60}}
#: Parameters of each model kind (100 classes; for memory estimates).
PARAMETERS = {"alexnet": 2_495_396, "resnet18": 11_220_132, "resnet18_bn": 11_220_132}


def estimate_resources(spec: WorkflowSpec, cell: Cell, gpu: bool) -> dict[str, dict[str, int]]:
    """Runtime (minutes) and memory (MB) requests of a cell's train, measure and attack jobs.

    Scaled by the model kind (throughput, parameters), the data (samples, image size),
    the clients and rounds, with a safety factor of 3 on time; a cluster scheduler needs
    an upper bound, not a forecast. Users override them with ``--set-resources``.
    """
    config = spec.config
    train = TrainConfig.from_dict(spec.train[cell])
    part = PartitionConfig.from_dict(config["partitions"][cell.partition])
    dataset = config["datasets"][cell.dataset]
    kind = config["models"][cell.model]["kind"]
    samples = DATASET_SAMPLES.get(dataset["kind"], 60_000)
    per_client = part.samples_per_client or int(samples * 0.8 / part.num_clients)
    train_samples = per_client * part.num_clients
    rate = THROUGHPUT.get(kind, THROUGHPUT["resnet18"])["gpu" if gpu else "cpu"]
    params = PARAMETERS.get(kind, PARAMETERS["resnet18"])
    image_mb = samples * 3 * dataset.get("image_size", 32) ** 2 / 1e6
    n_eval = part.num_clients * part.eval_members_per_client + part.eval_nonmembers
    observed = len(train.observed())
    train_s = train.rounds * train.local_epochs * train_samples / rate
    measure_s = observed * n_eval * 3 / rate  # one forward+backward and K forwards per sample
    rows = observed * part.num_clients * n_eval
    return {
        "train": {"runtime": int(10 + 3 * train_s / 60),
                  "mem_mb": int(4000 + 2 * image_mb + 4 * params * (part.num_clients + 8) / 1e6)},
        "measure": {"runtime": int(10 + 3 * measure_s / 60),
                    "mem_mb": int(4000 + 2 * image_mb + 4 * params * (part.num_clients + 8) / 1e6
                                  + rows * 60 / 1e6)},
        "attack": {"runtime": int(30 + rows / 2e5),
                   "mem_mb": int(4000 + rows * 100 / 1e6)},
    }
