"""The workflow's view of the config: plugins, validation, defaults and the grid of cells.

``common.smk`` calls :func:`load_workflow_config` when the Snakefile is parsed, so
bad input stops the run before any job starts, with a message that names the key,
what is wrong and what is allowed.

**Parsing imports no torch** (every cluster job parses the Snakefile again). Every module
that defines kinds imports without torch (:mod:`fedmia.core.lazy`; a network is named by
a dotted path), so the parse imports them all (:mod:`fedmia.kinds`) and fills the
schema's lists of kinds and its per-defense blocks from the registries
(:func:`load_schema`): nothing about a kind is checked into the schema.

**Plugins** (the config's ``plugins:``) are imported first, before anything is
validated: their kinds land in the same registries, so the schema lists them and they
are validated like the built-in ones. A plugin must keep torch out of its import too
(docs/extending.md).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema

from fedmia.attacker.attacks import ATTACKS, CALIBRATED_KINDS, attacks_for_views
from fedmia.core.config import (
    VALIDATOR,
    AttackConfig,
    ConfigError,
    DatasetConfig,
    ModelConfig,
    PartitionConfig,
    ReportConfig,
    TrainConfig,
    raise_first,
)
from fedmia.core.contracts import VIEW_FILES, FormatError
from fedmia.core.params import (
    allowed_text,
    block_numeric_parameters,
    resolve_strength,
)
from fedmia.core.registry import PluginError, import_plugins
from fedmia.federation.datasets import DATASETS
from fedmia.federation.models import MODELS
from fedmia.kinds import SCHEMA, fill_kinds, read_schema
from fedmia.report.tables import RETIRED_SELECTIONS
from fedmia.stages.io import file_sha256, no_round, read_view


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


@dataclass(frozen=True)
class Recording:
    """A recorded server view imported as a cell (``recordings.<key>``), read at parse time.

    Attributes:
        key: its key in ``recordings``.
        folder: the recording's folder.
        manifest: its ``manifest.json`` (the import rule's input).
        sha256: the manifest's SHA-256 (a param of the import rule: a new recording reruns
            the import, and Snakemake would date the folder by the folder alone).
        rounds: rounds the run trained.
        observed: the recorded rounds.
        attacked: the rounds the attacks use.
        num_clients: the clients of the view.
    """

    key: str
    folder: str
    manifest: str
    sha256: str
    rounds: int
    observed: tuple[int, ...]
    attacked: tuple[int, ...]
    num_clients: int


@dataclass(frozen=True)
class WorkflowSpec:
    """A validated config (defaults filled in), its cells, and the typed sections.

    Each section is parsed once, here: ``trains`` holds each cell's :class:`TrainConfig`
    (``train`` updated by its grid block), ``partitions`` each partition's
    :class:`PartitionConfig`, ``report`` the :class:`ReportConfig`, ``attack`` the
    :class:`AttackConfig` (each cell's resolution: :meth:`attack_for`). The rules pass the
    plain mappings (:meth:`train_for`) and each job builds its typed object again.
    """

    config: dict[str, Any]
    cells: tuple[Cell, ...]
    train: dict[Cell, dict[str, Any]]
    official: dict[Cell, dict[str, Any]]
    trains: dict[Cell, TrainConfig]
    partitions: dict[str, PartitionConfig]
    report: ReportConfig
    attack: AttackConfig
    recorded: dict[Cell, Recording]

    def train_for(self, cell: Cell) -> dict[str, Any]:
        """Resolved training config of ``cell`` (``train`` updated by its grid block)."""
        return canonical(self.train[cell])

    def observed_rounds(self, cell: Cell) -> list[int]:
        """Observed rounds of ``cell`` (a recorded cell: its recorded rounds)."""
        if cell in self.recorded:
            return list(self.recorded[cell].observed)
        return self.trains[cell].observed()

    def attack_rounds(self, cell: Cell) -> list[int]:
        """Rounds the attacks of ``cell`` use (``attack.rounds``, else observe_every's).

        A recorded cell: its recording's ``attack_rounds``, else ``attack.rounds``, else
        every recorded round.
        """
        if cell in self.recorded:
            return list(self.recorded[cell].attacked)
        rounds = self.attack.rounds
        if rounds is None:
            return self.trains[cell].every_rounds()
        return sorted(rounds)

    def official_for(self, cell: Cell) -> dict[str, Any]:
        """The official protocol's options of ``cell`` (``attack.official`` ∪ its block's)."""
        return canonical(self.official[cell])

    def attack_for(self, cell: Cell) -> dict[str, Any]:
        """The ``attack`` section resolved for ``cell`` (its rounds, its official options).

        What the attack stage receives (:class:`AttackConfig`'s fields as plain data).
        """
        resolved = {
            **self.attack.to_dict(),
            "rounds": self.attack_rounds(cell),
            "official": self.official[cell],
        }
        return canonical(resolved)

    @property
    def protocols(self) -> list[str]:
        """The non-member protocols, as a list."""
        return self.attack.protocols

    @property
    def selections(self) -> list[str | int]:
        """The single-round selections of the report, as a list."""
        return self.report.selections


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, list | tuple) else [value]


def _check_participation(spec: WorkflowSpec) -> None:
    """Uniform sampling leaves every round at least 2 references for the attacks needing them.

    FedMIA, LiRA and RMIA compare a target with the other participants of a round and
    skip a round with fewer than 2 (:func:`fedmia.attacker.attacks.target_rounds`): with
    m = round(fK) < 3 they would have no round at all. (Poisson sampling varies m: such
    rounds are skipped where they occur.)
    """
    referenced = [
        a for a in spec.attack.attacks or () if ATTACKS.get(a).kind in ("fedmia", *CALIBRATED_KINDS)
    ]
    if not referenced:
        return
    for cell, train in spec.trains.items():
        p, k = train.participation, spec.partitions[cell.partition].num_clients
        if not p.full and p.sampling == "uniform" and p.size(k) < 3:
            raise ConfigError(
                f"invalid config at 'train.participation.fraction' (cell {cell.path}): "
                f"uniform sampling takes m = {p.size(k)} of {k} clients per round, but "
                f"{referenced} need at least 2 other participants in a round (m >= 3); "
                "raise the fraction or drop those attacks"
            )


def _attacks_for_views(config: dict[str, Any], listed: bool) -> None:
    """Keep the attacks that apply under a configured view (``threat.view``), in place.

    The default list (every registered attack) drops those that apply under none
    (:attr:`fedmia.attacker.attacks.AttackSpec.views`: ``contrast`` without the aggregate
    view); a listed one that applies under none is a :class:`ConfigError`.
    """
    views = config["threat"]["view"]
    try:
        config["attack"]["attacks"] = attacks_for_views(
            config["attack"]["attacks"] if listed else None, views
        )
    except ValueError as e:
        raise ConfigError(f"invalid config at 'attack.attacks': {e}") from None


def _check_attack_plan(spec: WorkflowSpec) -> None:
    """Cross-checks of the attack and report options against every cell."""
    for cell in spec.cells:
        observed = spec.observed_rounds(cell)
        rounds = spec.attack_rounds(cell)
        if cell in spec.recorded:
            rec = spec.recorded[cell]
            lacking = sorted(set(rounds) - set(observed))
            if lacking:
                own = spec.config["recordings"][rec.key].get("attack_rounds")
                where = (
                    f"recordings.{rec.key}.attack_rounds" if own is not None else "attack.rounds"
                )
                raise ConfigError(
                    f"invalid config at '{where}': round(s) {lacking} are not in recording "
                    f"'{rec.key}' ({rec.manifest} records rounds {list(observed)}); attack "
                    f"recorded rounds only (set recordings.{rec.key}.attack_rounds)"
                )
        train = spec.trains.get(cell)
        if train is not None and not rounds:
            raise ConfigError(
                f"invalid config: cell {cell.path} has no attacked rounds: train.rounds = "
                f"{train.rounds} < train.observe_every = {train.observe_every}; lower "
                "observe_every or list attack.rounds"
            )
        lacking = sorted(set(rounds) - set(observed))
        if lacking:
            raise ConfigError(
                f"invalid config at 'attack.rounds': round(s) {lacking} are not observed in "
                f"cell {cell.path} (observed: {observed}); attack observed rounds only, or "
                "add them to train.observe_rounds"
            )
        for how in spec.selections:
            if isinstance(how, int) and how not in observed:
                raise ConfigError(
                    f"invalid config at 'report.single_round': round {how} is not observed in "
                    f"cell {cell.path} (observed: {observed}); pick an observed round"
                )
    fedmia = [a for a in spec.attack.attacks or () if ATTACKS.get(a).kind == "fedmia"]
    targets = [] if spec.attack.targets == "all" else spec.attack.targets
    for key in sorted({c.partition for c in spec.cells}):
        part = spec.partitions[key]
        beyond = sorted({t for t in targets if t >= part.num_clients})
        if beyond:
            raise ConfigError(
                f"invalid config at 'attack.targets': client(s) {beyond} do not exist in "
                f"partition '{key}' (num_clients {part.num_clients}, ids 0.."
                f"{part.num_clients - 1}); list ids below num_clients, or all"
            )
        if fedmia and part.num_clients < 3:
            raise ConfigError(
                f"invalid config at 'partitions.{key}.num_clients': {fedmia} need at least 2 "
                f"non-target clients, i.e. num_clients >= 3 (got {part.num_clients}); raise it "
                "or drop those attacks"
            )
    _check_participation(spec)
    if "official" not in spec.protocols:
        return
    for cell in spec.cells:
        official = spec.official_for(cell)
        part = spec.partitions[cell.partition]
        for which, pool, name in (
            ("test_slots", part.eval_nonmembers, "eval_nonmembers"),
            ("client_slots", part.eval_members_per_client, "eval_members_per_client"),
        ):
            slots = official[which]
            if slots is not None and slots > pool:
                raise ConfigError(
                    f"invalid config at 'attack.official.{which}': {slots} slots are drawn "
                    f"from partition '{cell.partition}' but its {name} is {pool} (cell "
                    f"{cell.path}); the official protocol needs {name} >= {slots} (raise it) "
                    f"or lower {which}"
                )


def load_workflow_config(config: dict[str, Any], schema_path: str | Path = SCHEMA) -> WorkflowSpec:
    """Validate ``config`` in place (filling defaults) and expand its grid.

    Raises:
        ConfigError: naming the first offending key, what is wrong and what is allowed.
    """
    raw = read_schema(schema_path)
    _load_plugins(config, raw)
    schema = fill_kinds(raw)
    report = config.get("report")
    if isinstance(report, dict) and "dp_delta" in report:
        raise ConfigError(
            "invalid config at 'report.dp_delta': it moved to privacy.delta (the "
            "audit reads it too, not only the report); write privacy: {delta: "
            f"{report['dp_delta']}}} instead"
        )
    for how in _as_list(report.get("single_round", []) if isinstance(report, dict) else []):
        if isinstance(how, str) and how in RETIRED_SELECTIONS:
            raise ConfigError(f"invalid config at 'report.single_round': {RETIRED_SELECTIONS[how]}")
    listed = isinstance(config.get("attack"), dict) and "attacks" in config["attack"]
    raise_first(list(VALIDATOR(schema).iter_errors(config)))
    _attacks_for_views(config, listed)
    # The typed sections, parsed once (checks across keys), then each kind checks what
    # depends on it.
    for key, block in config["datasets"].items():
        where = f"datasets.{key}"
        DATASETS.get(block["kind"]).check(DatasetConfig.from_dict(block, where=where), where)
    for key, block in config["models"].items():
        ModelConfig.from_dict(block, where=f"models.{key}")
    partitions = {
        key: PartitionConfig.from_dict(block, where=f"partitions.{key}")
        for key, block in config["partitions"].items()
    }
    for key, block in config["defenses"].items():
        _check_defense(block, schema, f"defenses.{key}")
    report = ReportConfig.from_dict(config["report"], where="report")
    official_validator = VALIDATOR({**schema["$defs"]["official"], "$defs": schema["$defs"]})

    cells: list[Cell] = []
    train: dict[Cell, dict[str, Any]] = {}
    trains: dict[Cell, TrainConfig] = {}
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
        block_official = {
            **config["attack"]["official"],
            **block.get("attack", {}).get("official", {}),
        }
        raise_first(
            list(official_validator.iter_errors(block_official)),
            prefix=f"grid[{i}].attack.official.",
        )
        train_cfg = TrainConfig.from_dict(merged, where=f"grid[{i}].train")
        for combo in itertools.product(
            block["datasets"],
            block["models"],
            block["defenses"],
            block["partitions"],
            block["seeds"],
        ):
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
                trains[cell] = train_cfg
                official[cell] = block_official
    recorded = _recordings(config, partitions)
    for cell, rec in recorded.items():
        if cell in train:
            raise ConfigError(
                f"invalid config at 'recordings.{rec.key}': cell {cell.path} is also trained "
                "by a grid block; give the recording another cell key (e.g. its own defense, "
                "partition or seed key)"
            )
        cells.append(cell)
        official[cell] = dict(config["attack"]["official"])
    if not cells:
        raise ConfigError(
            "invalid config at 'grid': no cell to run; add a grid block or a "
            "recording (recordings:)"
        )
    spec = WorkflowSpec(
        config=config,
        cells=tuple(cells),
        train=train,
        official=official,
        trains=trains,
        partitions=partitions,
        report=report,
        attack=AttackConfig.from_dict(config["attack"]),
        recorded=recorded,
    )
    _check_attack_plan(spec)
    return spec


def _recordings(
    config: dict[str, Any], partitions: Mapping[str, PartitionConfig]
) -> dict[Cell, Recording]:
    """The recorded cells (``recordings:``), their manifests read (the view block only).

    Raises:
        ConfigError: a key naming no entry of its section, a recording without a readable
            manifest, one whose clients are not its partition's, two recordings of one cell.
    """
    out: dict[Cell, Recording] = {}
    for key, block in config["recordings"].items():
        where = f"recordings.{key}"
        for field, section in (
            ("dataset", "datasets"),
            ("model", "models"),
            ("defense", "defenses"),
            ("partition", "partitions"),
        ):
            if block[field] not in config[section]:
                raise ConfigError(
                    f"invalid config at '{where}.{field}': '{block[field]}' is "
                    f"not defined; defined {section}: {sorted(config[section])}"
                )
        manifest = Path(block["folder"]) / VIEW_FILES["manifest"]
        try:
            view = read_view(manifest)
        except (FileNotFoundError, FormatError) as e:
            raise ConfigError(f"invalid config at '{where}.folder': {e}") from None
        part = partitions[block["partition"]]
        if part.num_clients != view["num_clients"]:
            raise ConfigError(
                f"invalid config at 'partitions.{block['partition']}.num_clients': recording "
                f"'{key}' has {view['num_clients']} clients ({manifest}) but the partition "
                f"says {part.num_clients}; set it to {view['num_clients']}"
            )
        observed = tuple(view["observed_rounds"])
        if not observed:
            raise ConfigError(f"invalid config at '{where}.folder': {no_round(manifest)}")
        chosen = block["attack_rounds"] or config["attack"]["rounds"]
        cell = Cell(
            block["dataset"],
            block["model"],
            block["defense"],
            block["partition"],
            int(block["seed"]),
        )
        if cell in out:
            raise ConfigError(
                f"invalid config at '{where}': cell {cell.path} is also "
                f"recording '{out[cell].key}'; give each recording its own cell "
                "key"
            )
        out[cell] = Recording(
            key=key,
            folder=block["folder"],
            manifest=str(manifest),
            sha256=file_sha256(manifest),
            rounds=int(view["rounds"]),
            observed=observed,
            attacked=tuple(sorted(chosen)) if chosen else observed,
            num_clients=int(view["num_clients"]),
        )
    return out


# ------------------------------------------------------------- plugins and kinds


def _load_plugins(config: dict[str, Any], schema: Mapping[str, Any]) -> None:
    """Check the config's ``plugins`` (as the schema says) and import them, in order."""
    plugins = config.get("plugins", [])
    spec = schema["properties"]["plugins"]
    raise_first(list(jsonschema.Draft202012Validator(spec).iter_errors(plugins)), prefix="plugins")
    for i, name in enumerate(plugins):
        try:
            import_plugins([name])
        except PluginError as e:
            raise ConfigError(f"invalid config at 'plugins[{i}]': {e}") from None


def _block_kind(block: Mapping[str, Any]) -> str:
    return block["if"]["properties"]["kind"]["const"]


def _defense_blocks_by_kind(schema: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {_block_kind(b): b for b in schema["$defs"]["defense"]["allOf"]}


def _check_parameters(block: Mapping[str, Any], rules: Mapping[str, Any], owner: str) -> None:
    """The finiteness the schema cannot express: a number parameter must not be NaN or ∞."""
    props = rules["then"]["properties"]
    for name, value in block.items():
        prop = props.get(name)
        if (
            isinstance(prop, Mapping)
            and prop.get("type") in ("number", "integer")
            and isinstance(value, float)
            and not math.isfinite(value)
        ):
            raise ConfigError(
                f"{owner}: parameter '{name}' = {value!r} is invalid; allowed: "
                f"{allowed_text(prop['type'], prop)}"
            )


def _check_defense(block: Mapping[str, Any], schema: Mapping[str, Any], where: str) -> None:
    """What a defense block needs beyond the schema: finite numbers, a compose's strength.

    Without importing the defenses (torch): the rules come from the schema's blocks,
    which :func:`defense_blocks` generates from the defenses' dataclasses.
    """
    rules = _defense_blocks_by_kind(schema)
    kind = block["kind"]
    if "steps" not in block:  # a standalone defense
        _check_parameters(
            {k: v for k, v in block.items() if k != "kind"},
            rules[kind],
            f"{where}: defense '{kind}'",
        )
        return
    kinds = [step["kind"] for step in block["steps"]]
    for i, step in enumerate(block["steps"]):
        _check_parameters(
            {k: v for k, v in step.items() if k != "kind"},
            rules[step["kind"]],
            f"{where}: defense '{kind}': steps[{i}]: defense '{step['kind']}'",
        )
    if block.get("strength") is not None:
        try:
            resolve_strength(
                block["strength"],
                kinds,
                [block_numeric_parameters(rules[k]) for k in kinds],
                f"defense '{kind}'",
            )
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None


# ----------------------------------------------------------------- cluster resources

#: Samples assumed for a dataset kind that does not say (its ``samples`` fact; e.g.
#: ``imagefolder``), and the model kind whose cost a kind without its own is given.
DEFAULT_SAMPLES = 60_000


def estimate_resources(spec: WorkflowSpec, cell: Cell, gpu: bool) -> dict[str, dict[str, int]]:
    """Runtime (minutes) and memory (MB) requests of a cell's train, measure and attack jobs.

    A recorded cell's ``train`` entry is its import's (hashing and checking its files).

    Scaled by the model kind (throughput, parameters), the data (samples, image size),
    the clients and rounds, with a safety factor of 3 on time; a cluster scheduler needs
    an upper bound, not a forecast. Users override them with ``--set-resources``.
    """
    config = spec.config
    train = spec.trains.get(cell)  # None: a recorded cell, imported instead of trained
    part = spec.partitions[cell.partition]
    dataset = config["datasets"][cell.dataset]
    kind = config["models"][cell.model]["kind"]
    samples = DATASETS.facts(dataset["kind"]).get("samples") or DEFAULT_SAMPLES
    per_client = part.samples_per_client or int(samples * 0.8 / part.num_clients)
    train_samples = per_client * part.num_clients
    cost = MODELS.facts(kind)
    missing = [k for k in ("samples_per_s", "parameters") if k not in cost]
    if missing:
        raise ConfigError(
            f"model kind '{kind}' does not state its cost {missing}: the cluster's resource "
            f"estimates need them; register it with MODELS.register('{kind}', impl=..., "
            "samples_per_s={'gpu': ..., 'cpu': ...}, parameters=...)"
        )
    rate = cost["samples_per_s"]["gpu" if gpu else "cpu"]
    params = cost["parameters"]
    image_mb = samples * 3 * dataset.get("image_size", 32) ** 2 / 1e6
    n_eval = part.num_clients * part.eval_members_per_client + part.eval_nonmembers
    observed = len(spec.observed_rounds(cell))
    train_s = 0 if train is None else train.rounds * train.local_epochs * train_samples / rate
    measure_s = observed * n_eval * 3 / rate  # one forward+backward and K forwards per sample
    rows = observed * part.num_clients * n_eval
    return {
        "train": {
            "runtime": int(10 + 3 * train_s / 60),
            "mem_mb": int(4000 + 2 * image_mb + 4 * params * (part.num_clients + 8) / 1e6),
        },
        "measure": {
            "runtime": int(10 + 3 * measure_s / 60),
            "mem_mb": int(
                4000 + 2 * image_mb + 4 * params * (part.num_clients + 8) / 1e6 + rows * 60 / 1e6
            ),
        },
        "attack": {"runtime": int(30 + rows / 2e5), "mem_mb": int(4000 + rows * 100 / 1e6)},
    }
