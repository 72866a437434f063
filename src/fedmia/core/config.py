"""Typed, frozen configuration of each section: the bottom layer of the package.

**One definition per key.** The config schema (``fedmia/core/config.schema.yaml``, shipped
with the package) defines every key of every section once: its type, bounds, allowed
values, default and description. The workflow validates the whole config against it when
the Snakefile is parsed (:mod:`fedmia.workflow`, with the registered kinds filled in), the
configuration reference ``config/README.md`` is generated from it
(``python -m fedmia.kinds reference``), and each dataclass here takes its defaults from it
(:func:`schema_defaults`) and validates a mapping against its section (:meth:`Section.
from_dict`, the same validator and messages): a key's default or bound is never written
twice. The dataclasses are what the stages use: a rule passes its section as a plain
mapping (Snakemake compares params by their ``repr``) and the job builds the typed object.

This module imports nothing from fedmia: a ``kind`` is a plain name here. What depends on
the kind — whether it is registered, what a defense's parameters may be, whether a dataset
reads files — is checked by the registered kind itself, once, in :mod:`fedmia.workflow`
when the Snakefile is parsed and by the stage that builds it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, Self

import jsonschema
import yaml

#: The config schema (the registered kinds not yet filled in: ``fedmia.kinds.load_schema``).
SCHEMA_FILE = Path(__file__).with_name("config.schema.yaml")
LR_SCHEDULES = ("cosine", "exponential", "constant")
#: The named splits a dataset kind may offer besides the source's own (``split: null``).
DATASET_SPLITS = ("official",)
#: How the server weights the clients' uploads (``train.aggregation``, :class:`TrainConfig`).
AGGREGATIONS = ("data_size", "official_permuted")
#: How a round's participants are drawn (``train.participation.sampling``, :class:`Participation`).
SAMPLINGS = ("uniform", "poisson")


class ConfigError(ValueError):
    """Invalid configuration; the message names the offending key and the fix."""


@lru_cache(maxsize=1)
def raw_schema() -> dict[str, Any]:
    """The config schema as written (``x-kinds`` markers where the kinds go)."""
    return yaml.safe_load(SCHEMA_FILE.read_text())


def _kinds_as_names(node: Any) -> Any:
    """``node`` with every list of kinds (``x-kinds``) a plain name.

    This module knows no registry; the workflow checks the kinds
    (:func:`fedmia.kinds.load_schema`).
    """
    if isinstance(node, list):
        return [_kinds_as_names(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "x-kinds":
            out["type"] = "string"
        elif key not in ("x-kinds-default", "x-defense-blocks"):
            out[key] = _kinds_as_names(value)
    return out


def section_schema(path: Iterable[str]) -> dict[str, Any]:
    """The schema of the section at ``path`` (e.g. ``("$defs", "train")``), with ``$defs``.

    A kind is a plain name here (``x-kinds`` → a string).
    """
    node: Any = raw_schema()
    for key in path:
        node = node[key]
    return _kinds_as_names({**node, "$defs": raw_schema()["$defs"]})


def with_defaults(cls: type) -> type:
    """A jsonschema validator class that also fills in ``default`` values."""
    validate_props = cls.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):  # noqa: ANN001
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if isinstance(sub, dict) and "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_props(validator, properties, instance, schema)

    return jsonschema.validators.extend(cls, {"properties": set_defaults})


#: The validator of the config: JSON schema 2020-12, defaults filled in.
VALIDATOR = with_defaults(jsonschema.Draft202012Validator)


def _where(path: Iterable[Any]) -> str:
    parts = [f"[{p}]" if isinstance(p, int) else f".{p}" for p in path]
    return "".join(parts).lstrip(".") or "<top level>"


def raise_first(errors: list[jsonschema.ValidationError], prefix: str = "") -> None:
    """Raise a :class:`ConfigError` for the most relevant of ``errors`` (none: return).

    The message names the key (``prefix`` + its path), what is wrong, what is allowed
    (the nearest description up the schema) and, for an unknown or a missing key, the fix.
    """
    if not errors:
        return
    err = jsonschema.exceptions.best_match(errors)
    where = (
        prefix + _where(err.absolute_path)
        if err.absolute_path or not prefix
        else prefix.rstrip(".")
    )
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


def _plain(value: Any) -> Any:
    """A dataclass value as JSON data (tuples as lists), for validation."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def schema_defaults(*path: str):  # noqa: ANN201 (a class decorator)
    """Give a config dataclass's fields the defaults its schema section declares.

    Apply it below ``@dataclass``: each annotated field without a value of its own gets
    the ``default`` of the property of the same name (a list becomes a tuple); a field
    whose property has no default stays required. The class remembers its section
    (``schema_path``) for :meth:`Section.from_dict`.
    """

    def deco(cls: type) -> type:
        props = section_schema(path).get("properties", {})
        for name in cls.__annotations__:
            if name in cls.__dict__ or name not in props or "default" not in props[name]:
                continue
            default = props[name]["default"]
            if isinstance(default, dict):  # a dataclass field may not share a mutable one
                default = field(default_factory=lambda d=default: copy.deepcopy(d))
            setattr(cls, name, tuple(default) if isinstance(default, list) else default)
        cls.schema_path = tuple(path)
        return cls

    return deco


class Section:
    """A config section: built from a mapping validated against its schema section."""

    schema_path: ClassVar[tuple[str, ...]] = ()
    #: How messages name the section when the caller does not say (``train``, ``dataset``).
    key: ClassVar[str] = ""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str | None = None) -> Self:
        """Validate ``d`` against the section's schema (defaults filled in) and build it.

        Raises:
            ConfigError: naming the key (``where`` + its path), what is wrong, what is
                allowed and the fix.
        """
        where = where or cls.key or cls.schema_path[-1]
        if not isinstance(d, Mapping):
            raise ConfigError(
                f"invalid config at '{where}': must be a mapping of keys to "
                f"values (got {d!r}); write it as 'key: value' lines"
            )
        data = _plain(copy.deepcopy(dict(d)))
        validator = VALIDATOR(section_schema(cls.schema_path))
        raise_first(list(validator.iter_errors(data)), prefix=f"{where}.")
        names = {f.name for f in dataclasses.fields(cls)}
        built = cls(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names}
        )
        built.check(where)
        return built

    def check(self, where: str) -> None:
        """Checks across keys that the schema cannot express (raise :class:`ConfigError`)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON/YAML friendly)."""
        return _plain(dataclasses.asdict(self))


def _require(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"invalid config at '{where}': {msg}")


@dataclass(frozen=True)
@schema_defaults("properties", "datasets", "additionalProperties")
class DatasetConfig(Section):
    """How ``prepare`` builds a dataset's canonical arrays.

    Attributes:
        kind: registry name of the loader (:data:`fedmia.core.registry.DATASETS`; which kinds
            read files under ``root`` or can download them is the kind's to say).
        image_size: side of the square images the models see, in pixels.
        test_fraction: fraction held out as the test split (datasets without an official split).
        split_seed: seed of that split.
        root: folder of the raw files (``cifar100``, ``dermnet``, ``imagefolder``: required;
            ``fashion_mnist``: optional, searched before the system-wide copy; ``digits``:
            none, it ships with scikit-learn). A relative path is taken from the working
            directory.
        download: ``cifar100`` only: fetch the official archive into ``root`` (checked against
            its MD5) when ``root/cifar-100-python`` is missing.
        split: ``None``: the source's own train/test split (Dermnet: the Kaggle release's
            ``train/`` and ``test/`` folders); ``"official"``: the split of the official
            FedMIA code, for the kinds that offer it (``dermnet``: both folders merged,
            permuted with seed 42, the first ``pool_size`` to the clients, the last
            ``test_size`` the test set, the rest unused).
        pool_size: ``split: official`` only: images of the clients' pool (``None``: the
            official code's number, Dermnet 15,000).
        test_size: ``split: official`` only: images of the test set (``None``: the official
            code's number, Dermnet 4,000).
    """

    key = "dataset"

    kind: str
    image_size: int
    test_fraction: float
    split_seed: int
    root: str | None
    download: bool
    split: str | None
    pool_size: int | None
    test_size: int | None

    def check(self, where: str) -> None:
        """A root is a non-empty path; ``pool_size`` and ``test_size`` need ``split: official``."""
        _require(
            self.root is None or self.root.strip() != "",
            f"{where}.root",
            f"must be a folder path or null (got {self.root!r})",
        )
        for key in ("pool_size", "test_size"):
            _require(
                getattr(self, key) is None or self.split == "official",
                f"{where}.{key}",
                "only split: official takes it; drop it or set split: official",
            )


@dataclass(frozen=True)
@schema_defaults("properties", "partitions", "additionalProperties")
class PartitionConfig(Section):
    """How the training split is dealt to clients and the evaluation set is drawn.

    Attributes:
        kind: registry name (:data:`fedmia.core.registry.PARTITIONS`): ``iid`` (equal random
            shards) or ``dirichlet`` (label-Dirichlet(β)).
        num_clients: K, at least 2.
        samples_per_client: training samples per client (iid: exactly; dirichlet: on
            average, K × this many samples are dealt). ``None``: the whole training split.
        eval_members_per_client: evaluation samples drawn from each client's own data.
        eval_nonmembers: held-out test samples in the evaluation set.
        beta: Dirichlet concentration β > 0 (``dirichlet`` only; smaller = more skewed).
        audit_canaries: m > 0 draws that many canaries from the held-out data (outside
            the evaluation set), each put in ``audit_target``'s training data by a fair
            coin, for a one-run ε audit (0: no audit). The target holds m slots: a canary
            left out is replaced by a held-out filler sample (never scored), so its data
            size is its shard + m whatever the coins.
        audit_target: the client the canaries may join.
    """

    key = "partition"

    kind: str
    num_clients: int
    samples_per_client: int | None
    eval_members_per_client: int
    eval_nonmembers: int
    audit_canaries: int
    audit_target: int
    beta: float | None = None  # the schema requires it for dirichlet and forbids it otherwise

    def check(self, where: str) -> None:
        """The audit's target is a client."""
        _require(
            self.audit_target < self.num_clients,
            f"{where}.audit_target",
            f"must be a client id in 0..{self.num_clients - 1}",
        )


@dataclass(frozen=True)
@schema_defaults("properties", "models", "additionalProperties")
class ModelConfig(Section):
    """A model architecture by registry name (:data:`fedmia.federation.models.MODELS`)."""

    key = "model"

    kind: str


@dataclass(frozen=True)
class DefenseConfig:
    """A defense by registry name (:data:`fedmia.core.registry.DEFENSES`) and its parameters.

    The parameters are the defense's to check: :func:`fedmia.federation.defenses.build_defense`.
    """

    kind: str
    params: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "defense") -> Self:
        """Split ``{kind: ..., <param>: ...}`` into the kind and its parameters."""
        if not (isinstance(d, Mapping) and "kind" in d):
            raise ConfigError(
                f"{where}: missing key 'kind'; add kind: the name of a registered defense"
            )
        return cls(kind=d["kind"], params={k: v for k, v in d.items() if k != "kind"})


@dataclass(frozen=True)
@schema_defaults("$defs", "train", "properties", "participation")
class Participation(Section):
    """Which clients take part in a round (``train.participation``).

    Attributes:
        fraction: f in (0, 1]. ``uniform``: m = round(fK) participants (half up, at least
            1), drawn without replacement; ``poisson``: each client independently with
            probability q = f, so a round may have none. 1.0: every client every round.
        sampling: ``uniform`` or ``poisson``.

    The draw itself is :func:`fedmia.federation.fedavg.participants`.
    """

    key: ClassVar[str] = "train.participation"
    fraction: float
    sampling: str

    @property
    def full(self) -> bool:
        """Every client takes part in every round (``fraction`` 1, either sampling)."""
        return self.fraction == 1.0

    def __str__(self) -> str:
        """How the logs name it: ``every client every round`` or e.g. ``poisson 0.1``."""
        return "every client every round" if self.full else f"{self.sampling} {self.fraction:g}"

    def size(self, num_clients: int) -> int:
        """``uniform``'s m = round(fK), half up, at least 1 (``poisson``: its mean is qK)."""
        return max(1, min(num_clients, math.floor(self.fraction * num_clients + 0.5)))


@dataclass(frozen=True)
@schema_defaults("$defs", "train")
class TrainConfig(Section):
    """FedAvg as the paper's official code runs it.

    Attributes:
        rounds: communication rounds T.
        local_epochs: passes over the local data per round.
        batch_size: local mini-batch size.
        lr: initial SGD learning rate.
        momentum: SGD momentum (a fresh optimizer is built every round).
        weight_decay: SGD weight decay.
        lr_schedule: ``cosine`` (per round, exactly as the official script), ``exponential``
            (``lr · lr_gamma^(r-1)``, as the paper's table) or ``constant``.
        lr_gamma: factor of the exponential schedule.
        observe_every: every this many rounds the server's view is saved (these rounds
            are also the default attacked rounds) ...
        observe_rounds: ... plus these rounds (default: round 1; observed and drawn in
            the per-round figures, attacked only when ``attack.rounds`` lists them).
        test_every: evaluate the global model on the test split every this many rounds
            (and at the last round).
        eval_batch_size: batch size of evaluation passes.
        aggregation: the weights of the uploads in the server's step
            ``w_{r+1} = w_r − Σ_k a_k Δ_k``. ``data_size`` (default): ``a_k = n_k / n``,
            client k's share of the training data. ``official_permuted``: the official
            code's (``main.py`` with ``--frac 1``): each round it lists the uploads in a
            fresh random order (``np.random.choice(range(K), K, replace=False)``) and
            weights the i-th listed upload by client i's share ``n_i / n``, so a client
            gets another client's share (identical to ``data_size`` when all clients hold
            as many samples); the order of round r is drawn from ``(seed, round)``
            (:func:`fedmia.federation.fedavg.aggregation_weights`). A defense whose weights must not
            depend on the data (``dp``, a ``compose`` holding it:
            ``Defense.data_independent_weights``) overrides both with equal weights
            ``a_k = 1 / K`` (a permutation of equal weights is the same weights); the
            manifest records the weights used (``aggregation_weights``). Only a round's
            participants are weighted.
        participation: which clients take part in each round (:class:`Participation`;
            default every client every round). Below fraction 1 every round is observed
            and is a default attacked round (:meth:`every_rounds`): a client is seen only
            in the rounds it took part in.
    """

    rounds: int
    local_epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    lr_schedule: str
    lr_gamma: float
    observe_every: int
    observe_rounds: tuple[int, ...]
    test_every: int
    eval_batch_size: int
    aggregation: str
    participation: Participation

    def __post_init__(self) -> None:
        object.__setattr__(self, "observe_rounds", tuple(self.observe_rounds))
        if isinstance(self.participation, Mapping):
            object.__setattr__(self, "participation", Participation(**self.participation))

    def check(self, where: str) -> None:
        """Every observed round is a round of the run."""
        bad = [r for r in self.observe_rounds if not 1 <= r <= self.rounds]
        _require(
            not bad,
            f"{where}.observe_rounds",
            f"round(s) {bad} are outside 1..{self.rounds} (the last round is "
            f"train.rounds = {self.rounds}); drop them or raise rounds",
        )

    def observed(self) -> list[int]:
        """Sorted observed rounds: ``observe_rounds`` ∪ :meth:`every_rounds`."""
        return sorted(set(self.observe_rounds) | set(self.every_rounds()))

    def every_rounds(self) -> list[int]:
        """The default attacked rounds: the multiples of ``observe_every`` up to ``rounds``.

        Under partial participation every round (a client is seen in a fraction of the
        rounds only; at f = 0.1 it would be in about 0.3 of the multiples of 10 of 30).
        """
        step = self.observe_every if self.participation.full else 1
        return list(range(step, self.rounds + 1, step))

    def lr_at(self, rnd: int) -> float:
        """Learning rate of round ``rnd`` (1-based).

        ``cosine`` is the official script's: it updates the rate *after* a round with the
        0-based index of the round just trained, so round 1 and round 2 use ``lr`` and
        round ``r ≥ 2`` uses ``lr · (1 + cos(π (r − 2) / T)) / 2``. ``exponential``:
        ``lr · γ^(r − 1)``; ``constant``: ``lr``.
        """
        if self.lr_schedule == "constant":
            return self.lr
        if self.lr_schedule == "exponential":
            return self.lr * self.lr_gamma ** (rnd - 1)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * max(rnd - 2, 0) / self.rounds))


@dataclass(frozen=True)
@schema_defaults("properties", "measure")
class MeasureConfig(Section):
    """The measure stage: how the per-sample measures are computed (``measure:``).

    Attributes:
        route: the measure route (:data:`fedmia.attacker.routes.MEASURE_ROUTES`).
        chunk_size: samples per chunk of the gradient products.
        batch_size: samples per forward pass of the clients' losses.
    """

    route: str
    chunk_size: int
    batch_size: int


@dataclass(frozen=True)
@schema_defaults("properties", "attack")
class AttackConfig(Section):
    """The attack stage (``attack:``): which attacks, against whom, and how they are scored.

    The workflow passes each cell its resolved section: ``rounds`` the cell's attacked
    rounds and ``official`` the run's options updated by the cell's grid block.

    Attributes:
        attacks: attack code names (``None``: every registered attack).
        protocol: a non-member protocol or a list of them (``None``: every registered one).
        targets: ``"all"`` or a list of target client ids.
        rounds: the rounds multi-round attacks combine and single-round attacks are
            selected from (``None``: every round of the measure table).
        official: the official protocol's options (its ``seed`` is the cell's).
        fpr_rule: ``at_most`` or ``below``.
        fedmia_ddof: ddof of FedMIA's reference variance.
        fedmia_outlier_filter: ``auto``, ``always`` or ``never`` (resolved per partition
            kind by the workflow).
        lira: LiRA's options (``variance``, ``location``, ``ddof``).
        rmia: RMIA's options (``a``, ``gamma``).
        roc_points: points of the stored ROC curve per row.
        bootstrap: bootstrap replicates per row for the intervals.
    """

    key: ClassVar[str] = "attack"
    attacks: tuple[str, ...] | None = None  # the schema's default: the registered kinds
    protocol: str | tuple[str, ...] | None = None
    targets: str | tuple[int, ...]
    rounds: tuple[int, ...] | None
    official: Mapping[str, Any]
    fpr_rule: str
    fedmia_ddof: int
    fedmia_outlier_filter: str
    lira: Mapping[str, Any]
    rmia: Mapping[str, Any]
    roc_points: int
    bootstrap: int

    @property
    def protocols(self) -> list[str] | None:
        """``protocol`` as a list (``None``: every registered protocol)."""
        p = self.protocol
        return None if p is None else [p] if isinstance(p, str) else list(p)


@dataclass(frozen=True)
@schema_defaults("properties", "report")
class ReportConfig(Section):
    """Tables and figures (``report:``); changing them reruns only report rules.

    Attributes:
        single_round: how single-round attacks are reported (a selection name or a round,
            or a list of them: one table section each).
        table_metrics: the metric rows of the Table-1 layout.
        utility: ``final`` or ``best`` test accuracy in the privacy–utility tables.
        hypervolume_front: ``own`` or ``with_undefended`` points in Table 2.
        round_plot_fpr: FPR of the TPR-versus-round figure.
        dpi: resolution of the PNG figures.
        width: figure width in inches.
    """

    single_round: Any
    table_metrics: tuple[str, ...]
    utility: str
    hypervolume_front: str
    round_plot_fpr: float
    dpi: int
    width: float

    @property
    def selections(self) -> list[Any]:
        """``single_round`` as a list."""
        s = self.single_round
        return list(s) if isinstance(s, list | tuple) else [s]


@dataclass(frozen=True)
@schema_defaults("properties", "threat")
class ThreatConfig(Section):
    """What the attacking server sees (``threat:``).

    Attributes:
        view: the threat views (:data:`fedmia.attacker.attacks.VIEWS`), each a column value
            of every result: ``uploads`` (each participant's upload) and/or ``aggregate``
            (secure aggregation: the aggregate of the participants' updates alone).
    """

    view: tuple[str, ...]


@dataclass(frozen=True)
@schema_defaults("properties", "privacy", "properties", "one_shot")
class OneShotConfig(Section):
    """The canaries of the one-shot estimate (``privacy.one_shot``, :mod:`fedmia.privacy.oneshot`).

    Attributes:
        canaries: canary clients inserted beside the K real ones (0: no estimate; else ≥ 2).
        null_canaries: canaries drawn but never inserted (≥ 2): the all-iterates null.
    """

    key: ClassVar[str] = "privacy.one_shot"
    canaries: int
    null_canaries: int

    @property
    def enabled(self) -> bool:
        """Whether the estimate is made (any canary)."""
        return self.canaries > 0


@dataclass(frozen=True)
@schema_defaults("properties", "privacy")
class PrivacyConfig(Section):
    """The (ε, δ) the report states and the audit bounds (``privacy:``).

    Attributes:
        delta: δ of the accounted ε of a privacy mechanism, of the one-run audit's bound and
            of the one-shot estimate.
        one_shot: the one-shot estimate's canaries (:class:`OneShotConfig`).
    """

    delta: float
    one_shot: OneShotConfig

    def __post_init__(self) -> None:
        if isinstance(self.one_shot, Mapping):
            object.__setattr__(self, "one_shot", OneShotConfig(**self.one_shot))
