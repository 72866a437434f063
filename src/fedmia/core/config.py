"""Typed, frozen configuration of each stage: the bottom layer of the package.

Each dataclass mirrors one block of ``config/config.yaml`` (documented in
``workflow/schemas/config.schema.yaml``). ``from_dict`` rejects unknown keys and
invalid values with a message naming the key, so the package gives the same clear
errors when it is used from Python without the workflow's schema validation.

This module imports nothing from fedmia: a ``kind`` is a plain name here. What depends
on the kind — whether it is registered, what a defense's parameters may be, whether a
dataset reads files — is checked by the registered kind itself (the registries of
:mod:`fedmia.core.registry`), once, in :mod:`fedmia.workflow` when the Snakefile is parsed
and by the stage that builds it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Self

LR_SCHEDULES = ("cosine", "exponential", "constant")
#: The named splits a dataset kind may offer besides the source's own (``split: null``).
DATASET_SPLITS = ("official",)
#: How the server weights the clients' uploads (``train.aggregation``, :class:`TrainConfig`).
AGGREGATIONS = ("data_size", "official_permuted")


class ConfigError(ValueError):
    """Invalid configuration; the message names the offending key and the fix."""


def _check_keys(cls: type, d: Mapping[str, Any], where: str) -> None:
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: must be a mapping of keys to values (got {d!r}); write "
                          "it as 'key: value' lines")
    fields = dataclasses.fields(cls)
    allowed = {f.name for f in fields}
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed keys are {sorted(allowed)}")
    missing = [f.name for f in fields if f.name not in d and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {missing}; add them")


#: What a field's (simple) annotation allows: a description and a test.
_TYPES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "int": ("an integer", lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)),
    "float": ("a number", lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
}


def _check_types(cfg: Any, where: str) -> None:
    """Reject a field whose value does not fit its annotation (``int``, ``float | None``, ...).

    Fields of other annotations (tuples, mappings) are checked where they are parsed.
    """
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        alternatives = [a.strip() for a in str(f.type).split("|")]
        if value is None and "None" in alternatives:
            continue
        known = [_TYPES[a] for a in alternatives if a in _TYPES]
        if known and not any(ok(value) for _, ok in known):
            what = " or ".join([d for d, _ in known] + ["null"] * ("None" in alternatives))
            raise ConfigError(f"{where}.{f.name}: must be {what} (got {value!r})")


def _require(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: {msg}")


@dataclass(frozen=True)
class DatasetConfig:
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

    kind: str
    image_size: int = 32
    test_fraction: float = 0.25
    split_seed: int = 0
    root: str | None = None
    download: bool = False
    split: str | None = None
    pool_size: int | None = None
    test_size: int | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "dataset") -> Self:
        """Build from a config mapping, rejecting unknown keys and bad values."""
        _check_keys(cls, d, where)
        cfg = cls(**d)
        _check_types(cfg, where)
        _require(cfg.image_size >= 8, f"{where}.image_size", "must be >= 8")
        _require(0.0 < cfg.test_fraction < 1.0, f"{where}.test_fraction", "must be in (0, 1)")
        _require(cfg.root is None or (isinstance(cfg.root, str) and cfg.root.strip() != ""),
                 f"{where}.root", f"must be a folder path or null (got {cfg.root!r})")
        _require(isinstance(cfg.download, bool), f"{where}.download",
                 f"must be true or false (got {cfg.download!r})")
        _require(cfg.split is None or cfg.split in DATASET_SPLITS, f"{where}.split",
                 f"must be null (the source's own split) or one of {list(DATASET_SPLITS)} "
                 f"(got {cfg.split!r})")
        for key in ("pool_size", "test_size"):
            value = getattr(cfg, key)
            if value is not None:
                _require(value >= 1, f"{where}.{key}", f"must be >= 1 or null (got {value})")
                _require(cfg.split == "official", f"{where}.{key}",
                         "only split: official takes it; drop it or set split: official")
        return cfg


@dataclass(frozen=True)
class PartitionConfig:
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

    kind: str
    num_clients: int = 10
    samples_per_client: int | None = None
    eval_members_per_client: int = 50
    eval_nonmembers: int = 200
    beta: float | None = None
    audit_canaries: int = 0
    audit_target: int = 0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "partition") -> Self:
        """Build from a config mapping, rejecting unknown keys and bad values."""
        _check_keys(cls, d, where)
        cfg = cls(**d)
        _check_types(cfg, where)
        _require(cfg.num_clients >= 2, f"{where}.num_clients",
                 f"K = {cfg.num_clients}: federated learning needs at least 2 clients")
        _require(cfg.samples_per_client is None or cfg.samples_per_client >= 1,
                 f"{where}.samples_per_client", "must be >= 1 or null")
        _require(cfg.eval_members_per_client >= 1, f"{where}.eval_members_per_client",
                 "must be >= 1")
        _require(cfg.eval_nonmembers >= 1, f"{where}.eval_nonmembers", "must be >= 1")
        _require(cfg.audit_canaries >= 0, f"{where}.audit_canaries", "must be >= 0")
        _require(0 <= cfg.audit_target < cfg.num_clients, f"{where}.audit_target",
                 f"must be a client id in 0..{cfg.num_clients - 1}")
        if cfg.kind == "dirichlet":
            _require(cfg.beta is not None and cfg.beta > 0, f"{where}.beta",
                     f"the Dirichlet concentration must be > 0 (got {cfg.beta})")
        else:
            _require(cfg.beta is None, f"{where}.beta", "only a 'dirichlet' partition takes beta; "
                     "drop beta or set kind: dirichlet")
        return cfg


@dataclass(frozen=True)
class ModelConfig:
    """A model architecture by registry name (:data:`fedmia.core.registry.MODELS`)."""

    kind: str

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "model") -> Self:
        """Build from a config mapping, rejecting unknown keys and bad values."""
        _check_keys(cls, d, where)
        cfg = cls(**d)
        _check_types(cfg, where)
        return cfg


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
        _require(isinstance(d, Mapping) and "kind" in d, where,
                 "missing key 'kind'; add kind: the name of a registered defense")
        return cls(kind=d["kind"], params={k: v for k, v in d.items() if k != "kind"})


@dataclass(frozen=True)
class TrainConfig:
    """FedAvg as the paper's official code runs it.

    Attributes:
        rounds: communication rounds T (every client takes part in every round).
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
            manifest records the weights used (``aggregation_weights``).
    """

    rounds: int = 30
    local_epochs: int = 1
    batch_size: int = 100
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"
    lr_gamma: float = 0.99
    observe_every: int = 10
    observe_rounds: tuple[int, ...] = (1,)
    test_every: int = 1
    eval_batch_size: int = 500
    aggregation: str = "data_size"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "train") -> Self:
        """Build from a config mapping, rejecting unknown keys and bad values."""
        _check_keys(cls, d, where)
        d = dict(d)
        if "observe_rounds" in d:
            rounds = d["observe_rounds"]
            _require(isinstance(rounds, list | tuple) and all(_TYPES["int"][1](r) for r in rounds),
                     f"{where}.observe_rounds", f"must be a list of integers (got {rounds!r})")
            d["observe_rounds"] = tuple(int(r) for r in rounds)
        cfg = cls(**d)
        _check_types(cfg, where)
        _require(cfg.rounds >= 1, f"{where}.rounds", f"must be >= 1 (got {cfg.rounds})")
        _require(cfg.local_epochs >= 1, f"{where}.local_epochs", "must be >= 1")
        _require(cfg.batch_size >= 1, f"{where}.batch_size",
                 f"must be >= 1 (got {cfg.batch_size})")
        _require(cfg.eval_batch_size >= 1, f"{where}.eval_batch_size", "must be >= 1")
        _require(cfg.lr > 0, f"{where}.lr", "must be > 0")
        _require(0 <= cfg.momentum < 1, f"{where}.momentum", "must be in [0, 1)")
        _require(cfg.weight_decay >= 0, f"{where}.weight_decay", "must be >= 0")
        _require(cfg.lr_schedule in LR_SCHEDULES, f"{where}.lr_schedule",
                 f"unknown schedule '{cfg.lr_schedule}'; choose from {list(LR_SCHEDULES)}")
        _require(0 < cfg.lr_gamma <= 1, f"{where}.lr_gamma", "must be in (0, 1]")
        _require(cfg.aggregation in AGGREGATIONS, f"{where}.aggregation",
                 f"unknown aggregation '{cfg.aggregation}'; choose from {list(AGGREGATIONS)}")
        _require(cfg.observe_every >= 1, f"{where}.observe_every", "must be >= 1")
        _require(cfg.test_every >= 1, f"{where}.test_every", "must be >= 1")
        bad = [r for r in cfg.observe_rounds if not 1 <= r <= cfg.rounds]
        _require(not bad, f"{where}.observe_rounds",
                 f"round(s) {bad} are outside 1..{cfg.rounds} (the last round is "
                 f"train.rounds = {cfg.rounds}); drop them or raise rounds")
        return cfg

    def observed(self) -> list[int]:
        """Sorted observed rounds: ``observe_rounds`` ∪ :meth:`every_rounds`."""
        return sorted(set(self.observe_rounds) | set(self.every_rounds()))

    def every_rounds(self) -> list[int]:
        """The multiples of ``observe_every`` up to ``rounds`` (the default attacked rounds)."""
        return list(range(self.observe_every, self.rounds + 1, self.observe_every))

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

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON/YAML friendly)."""
        d = dataclasses.asdict(self)
        d["observe_rounds"] = list(self.observe_rounds)
        return d
