"""Every bad input fedmia knows, in one list (issue 12).

Each case makes one bad call and checks three things:

(a) it fails: the documented exception of a library call, a non-zero exit of a command;
(b) its message names the problem and the fix: two patterns, both matched;
(c) it leaves no partial output: the files and folders the call would have written do not
    exist afterwards, and no file appeared under the case's folder (for workflow runs: no
    ``results/`` files of the failing stage).

Categories: config keys and values, dataset files, partitions, intermediate files, defense
strengths (library and config), and command lines (``snakemake``, ``python -m
fedmia.core.fingerprint``, ``bench/measures.py``), the last run as subprocesses.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import pickle
import re
import shutil
import subprocess
import sys
import tarfile
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import save_file

from fedmia import pipeline
from fedmia.attacker.attacks import (
    AttackSpec,
    OfficialProtocol,
    official_slots,
    outlier_filter_for,
    run_attack,
    run_attacks,
    validate_measures,
)
from fedmia.attacker.calibrated import LiraOptions, RmiaOptions
from fedmia.core import contracts
from fedmia.core.config import ConfigError, DefenseConfig, PartitionConfig, TrainConfig
from fedmia.federation import datasets as ds
from fedmia.federation.datasets import verify_md5
from fedmia.federation.defenses import InstaHideDefense, defense_from_config
from fedmia.federation.models import build_model
from fedmia.federation.partition import PartitionError
from fedmia.federation.state import FlatState
from fedmia.stages import io as fio
from fedmia.stages.recording import RecordingError, import_recording
from fedmia.stages.train import Checkpoint
from fedmia.workflow import load_workflow_config
from test_attacks import world
from test_config import DELETE, mutate
from test_datasets import (
    DERM,
    MIXED,
    _fake_urlopen,
    cifar_tarball,
    make_cifar,
    make_dermnet,
    make_fashion,
    make_folder,
    save_image,
    write_idx,
)
from test_defenses import build

REPO = Path(__file__).resolve().parents[1]
DEFAULT = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
TINY = yaml.safe_load((REPO / ".test" / "config" / "config.yaml").read_text())


# ----------------------------------------------------------------------------- machinery


class FixMissing(AssertionError):
    """The message names the problem but not the fix (a known gap)."""


@dataclass
class Ctx:
    """What a case's set-up gets: its own folder, monkeypatch and the session's fixtures."""

    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    request: pytest.FixtureRequest

    @cached_property
    def digits(self) -> dict[str, str]:
        """The prepared digits dataset (built once per session, outside ``tmp``)."""
        return self.request.getfixturevalue("digits_files")


#: A case's set-up: writes its inputs, returns the bad call and the outputs it must not leave.
Setup = Callable[[Ctx], tuple[Callable[[], Any], list[Path]]]


@dataclass(frozen=True)
class Bad:
    """One bad input: the exception, the problem and the fix its message names."""

    exc: type[BaseException]
    problem: str
    fix: str
    setup: Setup


def bad(
    id: str, exc: type[BaseException], problem: str, fix: str, setup: Setup, marks: Any = ()
) -> Any:
    return pytest.param(Bad(exc, problem, fix, setup), id=id, marks=marks)


def library(call: Callable[[], Any]) -> Setup:
    """A pure library call: it writes nothing."""
    return lambda ctx: (call, [])


def files_under(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).digest()
        for p in folder.rglob("*")
        if p.is_file()
    }


def check_fix(message: str, fix: str) -> None:
    if not re.search(fix, message):
        raise FixMissing(f"no fix /{fix}/ in: {message}")


# ----------------------------------------------------------- 1. config keys and values


def config_case(id: str, path: str, value: Any, problem: str, fix: str, marks: Any = ()):
    """The default config with ``path`` set to ``value`` (``DELETE``: removed)."""
    return bad(
        id,
        ConfigError,
        problem,
        fix,
        library(lambda: load_workflow_config(mutate(DEFAULT, path, value))),
        marks,
    )


def edited_config(edit: Callable[[dict], None]) -> Setup:
    def setup(ctx: Ctx):
        cfg = copy.deepcopy(DEFAULT)
        edit(cfg)
        return (lambda: load_workflow_config(cfg)), []

    return setup


def two_blocks(cfg: dict) -> None:
    cfg["grid"].append({**cfg["grid"][0], "partitions": ["iid"], "train": {"lr": 0.01}})


def dotted_key(cfg: dict) -> None:
    cfg["partitions"]["dir.1"] = cfg["partitions"].pop("dirichlet")


CONFIG = [
    config_case(
        "unknown-top-level-key",
        "bogus",
        1,
        r"at '<top level>': Additional properties .*'bogus' was unexpected",
        r"allowed keys are \['attack', 'checkpoint_every'",
    ),
    config_case(
        "unknown-train-key",
        "train.learning_rate",
        0.1,
        r"at 'train'.*'learning_rate' was unexpected",
        r"allowed keys are \[.*'lr'",
    ),
    config_case(
        "unknown-dataset-kind",
        "datasets.digits.kind",
        "mnist",
        r"at 'datasets.digits.kind': 'mnist' is not one of",
        r"\['digits', 'cifar100', 'fashion_mnist'",
    ),
    config_case(
        "unknown-model-kind",
        "models.alexnet.kind",
        "vgg",
        r"at 'models.alexnet.kind': 'vgg' is not one of",
        r"\['alexnet', 'resnet18', 'resnet18_bn'\]",
    ),
    config_case(
        "unknown-defense-kind",
        "defenses.none.kind",
        "magic",
        r"at 'defenses.none.kind': 'magic' is not one of",
        r"\['none', 'dp', ",
    ),
    config_case(
        "one-client",
        "partitions.iid.num_clients",
        1,
        r"at 'partitions.iid.num_clients': 1 is less than",
        r"the minimum of 2 \(number of clients K",
    ),
    config_case(
        "zero-rounds", "train.rounds", 0, r"at 'train.rounds': 0 is less than", r"the minimum of 1"
    ),
    config_case(
        "observed-round-after-the-last",
        "train.observe_rounds",
        [1, 31],
        r"train.observe_rounds': round\(s\) \[31\] are outside 1..30",
        r"drop them or raise rounds",
    ),
    config_case(
        "zero-beta",
        "partitions.dirichlet.beta",
        0,
        r"at 'partitions.dirichlet.beta': 0 is less than or equal to",
        r"the minimum of 0 \(Dirichlet concentration \(dirichlet only; > 0",
    ),
    config_case(
        "negative-beta",
        "partitions.dirichlet.beta",
        -1.0,
        r"at 'partitions.dirichlet.beta': -1.0 is less than or equal to",
        r"the minimum of 0",
    ),
    config_case(
        "dirichlet-without-beta",
        "partitions.dirichlet.beta",
        DELETE,
        r"at 'partitions.dirichlet': 'beta' is a required property",
        r"add it",
    ),
    config_case(
        "beta-on-iid",
        "partitions.iid.beta",
        1.0,
        r"at 'partitions.iid': only a 'dirichlet' partition takes beta",
        r"drop beta or set kind: dirichlet",
    ),
    config_case(
        "zero-batch-size",
        "train.batch_size",
        0,
        r"at 'train.batch_size': 0 is less than",
        r"the minimum of 1",
    ),
    config_case(
        "unknown-lr-schedule",
        "train.lr_schedule",
        "step",
        r"at 'train.lr_schedule': 'step' is not one of",
        r"\['cosine', 'exponential', 'constant'\]",
    ),
    config_case(
        "unknown-aggregation",
        "train.aggregation",
        "official",
        r"at 'train.aggregation': 'official' is not one of",
        r"\['data_size', 'official_permuted'\]",
    ),
    config_case(
        "grid-undefined-dataset",
        "grid.0.datasets",
        ["cifar100"],
        r"at 'grid\[0\].datasets': \['cifar100'\] not defined",
        r"defined datasets: \['digits'\]",
    ),
    config_case(
        "grid-undefined-partition",
        "grid.0.partitions",
        ["iid", "nope"],
        r"at 'grid\[0\].partitions': \['nope'\] not defined",
        r"defined partitions: \['dirichlet', 'iid'\]",
    ),
    config_case(
        "grid-train-out-of-range",
        "grid.0.train",
        {"batch_size": 0},
        r"at 'grid\[0\].train.batch_size': 0 is less than",
        r"the minimum of 1",
    ),
    config_case(
        "grid-train-unknown-key",
        "grid.0.train",
        {"learning_rate": 0.1},
        r"at 'grid\[0\].train': .*'learning_rate' was unexpected",
        r"allowed keys are \[.*'lr'",
    ),
    config_case(
        "grid-observed-round-after-the-last",
        "grid.0.train",
        {"observe_rounds": [50]},
        r"round\(s\) \[50\] are outside 1..30",
        r"drop them or raise rounds",
    ),
    bad(
        "cell-in-two-grid-blocks",
        ConfigError,
        r"at 'grid\[1\]': cell digits/alexnet/none/iid/seed0 also appears in an earlier grid "
        r"block with different training",
        r"keep each cell in one block",
        edited_config(two_blocks),
    ),
    bad(
        "key-with-a-dot",
        ConfigError,
        r"at 'partitions': 'dir.1' does not match",
        r"letters, digits, _ and - only; no dots",
        edited_config(dotted_key),
    ),
    config_case(
        "attack-round-not-observed",
        "attack.rounds",
        [10, 15],
        r"at 'attack.rounds': round\(s\) \[15\] are not observed in cell "
        r"digits/alexnet/none/iid/seed0 \(observed: \[1, 10, 20, 30\]",
        r"attack observed rounds only, or add them to train.observe_rounds",
    ),
    config_case(
        "no-attacked-round",
        "train.observe_every",
        40,
        r"has no attacked rounds: train.rounds = 30 < train.observe_every = 40",
        r"lower observe_every or list attack.rounds",
    ),
    config_case(
        "unknown-protocol",
        "attack.protocol",
        "leaky",
        r"at 'attack.protocol': 'leaky' is not valid",
        r"aligned .* official .* and/or heldout",
    ),
    config_case(
        "unknown-lira-variance",
        "attack.lira",
        {"variance": "robust"},
        r"at 'attack.lira.variance': 'robust' is not one of",
        r"\['shrunk', 'per_sample', 'pooled'\]",
    ),
    config_case(
        "unknown-lira-location",
        "attack.lira",
        {"location": "mode"},
        r"at 'attack.lira.location': 'mode' is not one of",
        r"\['mean', 'median'\]",
    ),
    config_case(
        "lira-ddof-two",
        "attack.lira",
        {"ddof": 2},
        r"at 'attack.lira.ddof': 2 is not one of",
        r"\[0, 1\]",
    ),
    config_case(
        "unknown-lira-key",
        "attack.lira",
        {"var": "pooled"},
        r"at 'attack.lira': .*'var' was unexpected",
        r"allowed keys are \['ddof', 'location', 'variance'\]",
    ),
    config_case(
        "rmia-a-above-one",
        "attack.rmia",
        {"a": 1.5},
        r"at 'attack.rmia.a': 1.5 is greater than the maximum of 1",
        r"offline a",
    ),
    config_case(
        "rmia-negative-a",
        "attack.rmia",
        {"a": -0.1},
        r"at 'attack.rmia.a': -0.1 is less than the minimum of 0",
        r"offline a",
    ),
    config_case(
        "rmia-zero-gamma",
        "attack.rmia",
        {"gamma": 0},
        r"at 'attack.rmia.gamma': 0 is less than or equal to the minimum of 0",
        r"likelihood-ratio threshold",
    ),
    config_case(
        "unknown-rmia-key",
        "attack.rmia",
        {"alpha": 0.3},
        r"at 'attack.rmia': .*'alpha' was unexpected",
        r"allowed keys are \['a', 'gamma'\]",
    ),
    config_case(
        "unknown-fpr-rule",
        "attack.fpr_rule",
        "strict",
        r"at 'attack.fpr_rule': 'strict' is not one of",
        r"\['at_most', 'below'\]",
    ),
    config_case(
        "unknown-attack",
        "attack.attacks",
        ["lira"],
        r"at 'attack.attacks\[0\]': 'lira' is not one of",
        r"\['loss', 'loss_series'",
    ),
    config_case(
        "attack-target-beyond-the-clients",
        "attack.targets",
        [12],
        r"at 'attack.targets': client\(s\) \[12\] do not exist in partition",
        r"list ids below num_clients, or all",
    ),
    config_case(
        "negative-attack-target",
        "attack.targets",
        [-1],
        r"at 'attack.targets\[0\]': -1 is less than the minimum of 0",
        r"target clients, \"all\" or a list of client ids",
    ),
    config_case(
        "zero-official-draws",
        "attack.official",
        {"draws": 0},
        r"at 'attack.official.draws': 0 is less than",
        r"the minimum of 1",
    ),
    config_case(
        "official-test-slots-over-the-pool",
        "attack.official",
        {"test_slots": 1001},
        r"at 'attack.official.test_slots': 1001 slots are drawn from partition 'iid' "
        r"but its eval_nonmembers is 1000 \(cell digits/alexnet/none/iid/seed0\)",
        r"needs eval_nonmembers >= 1001 \(raise it\) or lower test_slots",
    ),
    config_case(
        "official-client-slots-over-the-pool",
        "attack.official",
        {"client_slots": 30},
        r"partition 'iid' but its eval_members_per_client is 10",
        r"\(raise it\) or lower client_slots",
    ),
    config_case(
        "grid-zero-official-draws",
        "grid.0.attack",
        {"official": {"draws": 0}},
        r"at 'grid\[0\].attack.official.draws': 0 is less than",
        r"the minimum of 1",
    ),
    config_case(
        "grid-official-test-slots-over-the-pool",
        "grid.0.attack",
        {"official": {"test_slots": 2000}},
        r"at 'attack.official.test_slots': 2000 slots are drawn from partition 'iid'",
        r"or lower test_slots",
    ),
    config_case(
        "single-round-not-observed",
        "report.single_round",
        15,
        r"at 'report.single_round': round 15 is not observed in cell",
        r"pick an observed round",
    ),
    config_case(
        "unknown-single-round",
        "report.single_round",
        "best",
        r"at 'report.single_round': 'best' is not valid",
        r"best_tpr_per_target .* best_tpr_mean .* best_auc .* last .* or a round number",
    ),
    config_case(
        "unknown-utility",
        "report.utility",
        "max",
        r"at 'report.utility': 'max' is not one of \['final', 'best'\]",
        r"final .* or best",
    ),
    config_case(
        "unknown-hypervolume-front",
        "report.hypervolume_front",
        "paper",
        r"at 'report.hypervolume_front': 'paper' is not one of",
        r"own .* or with_undefended",
    ),
    config_case(
        "retired-single-round-best-tpr",
        "report.single_round",
        ["best_tpr", "last"],
        r"at 'report.single_round': 'best_tpr' is retired: it picked the round of "
        r"the best TPR@0.1% of the mean",
        r"write best_tpr_per_target .* or best_tpr_mean",
    ),
    config_case(
        "fedmia-attacks-with-two-clients",
        "partitions.iid.num_clients",
        2,
        r"at 'partitions.iid.num_clients': \['fedmia_loss', 'fedmia_cos'\] need at "
        r"least 2 non-target clients",
        r"raise it or drop those attacks",
    ),
    config_case(
        "audit-target-beyond-the-clients",
        "partitions.iid.audit_target",
        10,
        r"partitions.iid.audit_target",
        r"must be a client id in 0..9",
    ),
    config_case(
        "rounds-not-an-integer",
        "train.rounds",
        "thirty",
        r"at 'train.rounds': 'thirty' is not",
        r"of type 'integer'",
    ),
    config_case(
        "threads-not-an-integer", "threads", 1.5, r"at 'threads': 1.5 is not", r"of type 'integer'"
    ),
    config_case("grid-not-a-list", "grid", {}, r"at 'grid': \{\} is not", r"of type 'array'"),
    config_case("no-models", "models", {}, r"at 'models': \{\}", r"should be non-empty"),
    config_case(
        "negative-seed",
        "grid.0.seeds",
        [-1],
        r"at 'grid\[0\].seeds\[0\]': -1 is less than",
        r"the minimum of 0",
    ),
    config_case(
        "unknown-device",
        "device",
        "gpu",
        r"at 'device': 'gpu' does not match",
        r"auto \(CUDA when present, else CPU\), cpu, cuda or cuda:N",
    ),
    config_case(
        "image-too-small",
        "datasets.digits.image_size",
        4,
        r"at 'datasets.digits.image_size': 4 is less than",
        r"the minimum of 8",
    ),
    config_case(
        "digits-with-a-root",
        "datasets.digits.root",
        "/data",
        r"'digits' ships inside scikit-learn and reads no files",
        r"drop root",
    ),
    config_case(
        "files-dataset-without-a-root",
        "datasets.digits.kind",
        "dermnet",
        r"datasets.digits.root: 'dermnet' reads its files from disk",
        r"set root to the folder that holds them",
    ),
    config_case(
        "dataset-unknown-split",
        "datasets.digits.split",
        "kaggle",
        r"at 'datasets.digits.split': 'kaggle' is not one of \[None, 'official'\]",
        r"null = the source's own train/test split",
    ),
    config_case(
        "official-split-of-a-dataset-without-one",
        "datasets.digits.split",
        "official",
        r"datasets.digits.split: only 'dermnet' has the official code's split",
        r"drop split to use the train/test split of 'digits'",
    ),
    config_case(
        "pool-size-without-the-official-split",
        "datasets.digits.pool_size",
        100,
        r"datasets.digits.pool_size': only split: official takes it",
        r"drop it or set split: official",
    ),
    config_case(
        "official-test-size-zero",
        "datasets.digits.test_size",
        0,
        r"at 'datasets.digits.test_size': 0 is less than",
        r"the minimum of 1",
    ),
    config_case(
        "unknown-measure-route",
        "measure.route",
        "fast",
        r"at 'measure.route': 'fast' is not one of",
        r"\['layerwise', 'func'\]",
    ),
    config_case(
        "plugin-not-importable",
        "plugins",
        ["no_such_fedmia_plugin"],
        r"at 'plugins\[0\]': plugin 'no_such_fedmia_plugin' cannot be imported: no "
        r"module named 'no_such_fedmia_plugin'",
        r"put the folder that holds it on "
        r"PYTHONPATH \(or install it\) .* or drop it from plugins",
    ),
    config_case(
        "plugin-not-a-module-name",
        "plugins",
        ["my plugin.py"],
        r"at 'plugins\[0\]': 'my plugin.py' does not match",
        r"a module name",
    ),
    config_case(
        "dp-delta-of-one",
        "privacy.delta",
        1.0,
        r"at 'privacy.delta': 1.0 is greater than or equal to",
        r"the maximum of 1",
    ),
    config_case(
        "retired-report-dp-delta",
        "report.dp_delta",
        1e-5,
        r"at 'report.dp_delta': it moved to privacy.delta",
        r"write privacy: \{delta: ",
    ),
    # the typed configs, used from Python without the workflow's schema
    bad(
        "library-config-wrong-type",
        ConfigError,
        r"at 'train.rounds': '30' is not of type",
        r"'integer'",
        library(lambda: TrainConfig.from_dict({"rounds": "30"})),
    ),
    bad(
        "library-config-not-a-mapping",
        ConfigError,
        r"at 'train': must be a mapping",
        r"write it as 'key: value' lines",
        library(lambda: TrainConfig.from_dict(None)),
    ),
    bad(
        "library-config-observe-rounds-not-a-list",
        ConfigError,
        r"at 'train.observe_rounds': 5 is not of type 'array'",
        r"further observed rounds",
        library(lambda: TrainConfig.from_dict({"observe_rounds": 5})),
    ),
    bad(
        "library-config-fractional-clients",
        ConfigError,
        r"at 'partition.num_clients': 2.5 is not of type",
        r"'integer'",
        library(lambda: PartitionConfig.from_dict({"kind": "iid", "num_clients": 2.5})),
    ),
    bad(
        "library-config-missing-kind",
        ConfigError,
        r"at 'partition': 'kind' is a required property",
        r"add it",
        library(lambda: PartitionConfig.from_dict({"num_clients": 3})),
    ),
    bad(
        "library-defense-without-kind",
        ConfigError,
        r"defense: missing key 'kind'",
        r"add kind: one of \['augment'",
        library(lambda: defense_from_config({"sigma": 1})),
    ),
    bad(
        "library-defense-config-without-kind",
        ConfigError,
        r"defense: missing key 'kind'",
        r"add kind: the name of a registered defense",
        library(lambda: DefenseConfig.from_dict({"sigma": 1})),
    ),
]


# ------------------------------------------------------------------- 2. dataset files


def prepared_files(folder: Path) -> dict[str, Path]:
    return {k: Path(v) for k, v in contracts.prepared_paths(folder).items()}


def prepare_case(
    id: str,
    exc: type[BaseException],
    problem: str,
    fix: str,
    make: Callable[[Ctx, Path], None] | None,
    dataset: dict[str, Any],
    marks: Any = (),
):
    """The prepare stage on raw files that ``make(ctx, root)`` writes under ``tmp/raw``.

    ``root`` in ``dataset`` is given relative to ``tmp/raw``.
    """

    def setup(ctx: Ctx):
        raw = ctx.tmp / "raw"
        raw.mkdir()
        ctx.monkeypatch.setattr(ds, "FASHION_MNIST_DIRS", (ctx.tmp / "system-fashion-mnist",))
        if make is not None:
            make(ctx, raw)
        d = dict(dataset)
        if "root" in d and d["root"]:
            d["root"] = str(raw / d["root"])
        out = prepared_files(ctx.tmp / "out")
        return (lambda: pipeline.prepare(d, out)), [*out.values(), ctx.tmp / "out"]

    return bad(id, exc, problem, fix, setup, marks)


def cifar_truncated(ctx: Ctx, root: Path) -> None:
    make_cifar(root)
    train = root / "cifar-100-python" / "train"
    train.write_bytes(train.read_bytes()[:5000])


def cifar_with_code(ctx: Ctx, root: Path) -> None:
    make_cifar(root)
    (root / "cifar-100-python" / "meta").write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")


def cifar_incomplete(ctx: Ctx, root: Path) -> None:
    (root / "cifar-100-python").mkdir()
    (root / "cifar-100-python" / "train").write_bytes(b"")


def cifar_without_data(ctx: Ctx, root: Path) -> None:
    make_cifar(root)
    with open(root / "cifar-100-python" / "test", "wb") as f:
        pickle.dump({b"fine_labels": [1, 2]}, f)


def cifar_archive(ctx: Ctx, root: Path) -> None:
    (root / "cifar-100-python.tar.gz").write_bytes(cifar_tarball(ctx.tmp / "src"))


def cifar_download(payload: bytes | Exception | None, md5_matches: bool = False):
    def make(ctx: Ctx, root: Path) -> None:
        body = cifar_tarball(ctx.tmp / "src") if payload is None else payload
        ctx.monkeypatch.setattr("urllib.request.urlopen", _fake_urlopen(body, []))
        if md5_matches:
            ctx.monkeypatch.setattr(ds, "CIFAR100_MD5", hashlib.md5(body).hexdigest())

    return make


def unsafe_tarball() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("../evil")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    return buf.getvalue()


def cifar_unsafe_archive(ctx: Ctx, root: Path) -> None:
    body = unsafe_tarball()
    (root / "cifar-100-python.tar.gz").write_bytes(body)
    ctx.monkeypatch.setattr(ds, "CIFAR100_MD5", hashlib.md5(body).hexdigest())


def dermnet_train_only(ctx: Ctx, root: Path) -> None:
    save_image(root / "train" / "A" / "x.jpg", "RGB", (10, 10), (1, 2, 3))


def dermnet_other_classes(ctx: Ctx, root: Path) -> None:
    dermnet_train_only(ctx, root)
    save_image(root / "test" / "B" / "y.jpg", "RGB", (10, 10), (1, 2, 3))


def dermnet_empty_class(ctx: Ctx, root: Path) -> None:
    make_dermnet(root)
    (root / "train" / "Warts Photos").mkdir()
    (root / "test" / "Warts Photos").mkdir()
    (root / "test" / "Warts Photos" / "readme.txt").write_text("x")


def dermnet_hidden_class(ctx: Ctx, root: Path) -> None:
    make_dermnet(root)
    (root / "train" / ".ipynb_checkpoints").mkdir()


def dermnet_truncated(keep: float):
    def make(ctx: Ctx, root: Path) -> None:
        make_dermnet(root)
        f = root / "test" / DERM[2] / "t3.jpg"
        f.write_bytes(f.read_bytes()[: int(len(f.read_bytes()) * keep)])

    return make


def dermnet_not_an_image(ctx: Ctx, root: Path) -> None:
    make_dermnet(root)
    (root / "train" / DERM[1] / "zz.jpg").write_bytes(b"<html>404</html>")


def fashion_partial(ctx: Ctx, root: Path) -> None:
    write_idx(root / "train-images-idx3-ubyte", np.zeros((1, 28, 28), np.uint8), 2051)


def fashion_truncated(gz: bool):
    def make(ctx: Ctx, root: Path) -> None:
        make_fashion(root, dict.fromkeys(MIXED, gz))
        f = root / ("t10k-images-idx3-ubyte" + (".gz" if gz else ""))
        f.write_bytes(f.read_bytes()[:-50])

    return make


def fashion_swapped(ctx: Ctx, root: Path) -> None:
    make_fashion(root, dict.fromkeys(MIXED, False))
    a, b = root / "train-images-idx3-ubyte", root / "train-labels-idx1-ubyte"
    ra, rb = a.read_bytes(), b.read_bytes()
    a.write_bytes(rb)
    b.write_bytes(ra)


def fashion_count_mismatch(ctx: Ctx, root: Path) -> None:
    make_fashion(root, dict.fromkeys(MIXED, False))
    write_idx(root / "t10k-labels-idx1-ubyte", np.zeros(3, np.uint8), 2049)


def fashion_bad_label(ctx: Ctx, root: Path) -> None:
    make_fashion(root, dict.fromkeys(MIXED, False))
    write_idx(root / "t10k-labels-idx1-ubyte", np.array([9, 2, 1, 10], np.uint8), 2049)


def folder_train_only(ctx: Ctx, root: Path) -> None:
    make_folder(root / "train")


def md5_mismatch(ctx: Ctx):
    (ctx.tmp / "file.bin").write_bytes(b"hello")
    return (lambda: verify_md5(ctx.tmp / "file.bin", "0" * 32)), []


CIFAR = {"kind": "cifar100", "root": "."}
DERMNET = {"kind": "dermnet", "root": "."}
FASHION = {"kind": "fashion_mnist", "root": "."}
FOLDER = {"kind": "imagefolder", "root": "."}
REFETCH = rf"download {re.escape(ds.CIFAR100_URL)} again"

DATASETS = [
    # the dataset's config block
    prepare_case(
        "download-of-a-dataset-without-one",
        ConfigError,
        r"only 'cifar100' can be downloaded",
        r"put the files .* and drop download",
        None,
        {"kind": "dermnet", "root": "x", "download": True},
    ),
    prepare_case(
        "dermnet-without-root",
        ConfigError,
        r"'dermnet' reads its files from disk",
        r"set root to the folder",
        None,
        {"kind": "dermnet"},
    ),
    prepare_case(
        "imagefolder-without-root",
        ConfigError,
        r"'imagefolder' reads its files from disk",
        r"set root to the folder",
        None,
        {"kind": "imagefolder"},
    ),
    prepare_case(
        "cifar-download-without-root",
        ConfigError,
        r"'cifar100' reads its files",
        r"set root",
        None,
        {"kind": "cifar100", "download": True},
    ),
    prepare_case(
        "digits-with-root",
        ConfigError,
        r"'digits' ships inside scikit-learn",
        r"drop root",
        None,
        {"kind": "digits", "root": "x"},
    ),
    prepare_case(
        "download-not-a-boolean",
        ConfigError,
        r"at 'dataset.download': 'yes' is not of type",
        r"'boolean'",
        None,
        {"kind": "cifar100", "root": "x", "download": "yes"},
    ),
    prepare_case(
        "empty-root",
        ConfigError,
        r"at 'dataset.root': .*\(got ''\)",
        r"must be a folder path or null",
        None,
        {"kind": "cifar100", "root": ""},
    ),
    # CIFAR-100
    prepare_case(
        "cifar-missing-root",
        FileNotFoundError,
        r"dataset 'cifar100': root folder .*nope does not exist",
        r"put the files there .* or fix root",
        None,
        {"kind": "cifar100", "root": "nope"},
    ),
    prepare_case(
        "cifar-not-there",
        FileNotFoundError,
        r"CIFAR-100 not found: expected .*cifar-100-python/\{train,test,meta\}",
        r"Download .* into .* or set download: true",
        None,
        CIFAR,
    ),
    prepare_case(
        "cifar-incomplete-folder",
        FileNotFoundError,
        r"cifar-100-python lacks \['test', 'meta'\]",
        r"delete the folder and extract cifar-100-python.tar.gz",
        cifar_incomplete,
        CIFAR,
    ),
    prepare_case(
        "cifar-truncated-pickle",
        ValueError,
        r"cannot read the CIFAR-100 pickle .*cifar-100-python/train .*corrupt or "
        r"truncated",
        rf"delete the cifar-100-python folder and {REFETCH}",
        cifar_truncated,
        CIFAR,
    ),
    prepare_case(
        "cifar-pickle-with-code",
        ValueError,
        r"meta.*refusing to load the global os.system",
        rf"delete the cifar-100-python folder and {REFETCH}",
        cifar_with_code,
        CIFAR,
    ),
    prepare_case(
        "cifar-pickle-without-images",
        ValueError,
        r"test has no b'data' entry .* not a file of the CIFAR-100 python release",
        rf"re-download {re.escape(ds.CIFAR100_URL)}",
        cifar_without_data,
        CIFAR,
    ),
    prepare_case(
        "cifar-archive-md5-mismatch",
        ValueError,
        rf"MD5 mismatch for .*cifar-100-python.tar.gz: expected {ds.CIFAR100_MD5}",
        r"delete it and download it again",
        cifar_archive,
        CIFAR,
    ),
    prepare_case(
        "cifar-download-md5-mismatch",
        ValueError,
        rf"damaged and was deleted: MD5 mismatch.*expected {ds.CIFAR100_MD5}",
        r"Try again, or download it by hand into",
        cifar_download(None),
        {**CIFAR, "download": True},
    ),
    prepare_case(
        "cifar-download-network-failure",
        FileNotFoundError,
        r"could not download CIFAR-100 .*no route to host",
        r"download it by hand \(MD5 .*\) and put cifar-100-python.tar.gz",
        cifar_download(urllib.error.URLError("no route to host")),
        {**CIFAR, "download": True},
    ),
    prepare_case(
        "cifar-archive-with-unsafe-member",
        ValueError,
        r"cannot extract .*unsafe or unexpected archive member '../evil'",
        rf"delete it and {REFETCH}",
        cifar_unsafe_archive,
        CIFAR,
    ),
    bad(
        "md5-mismatch",
        ValueError,
        r"MD5 mismatch for .*file.bin: expected 0+, got",
        r"the file is corrupt or incomplete: delete it and download it again",
        md5_mismatch,
    ),
    # Dermnet and image folders
    prepare_case(
        "dermnet-missing-root",
        FileNotFoundError,
        r"dataset 'dermnet': root folder .*nope does not exist",
        r"put the files there .* or fix root",
        None,
        {"kind": "dermnet", "root": "nope"},
    ),
    prepare_case(
        "dermnet-without-test-folder",
        FileNotFoundError,
        r"Dermnet root .* has no test/ folder",
        r"unzip the Kaggle release there so that root/train/<class>/ and "
        r"root/test/<class>/ exist",
        dermnet_train_only,
        DERMNET,
    ),
    prepare_case(
        "dermnet-other-classes-in-test",
        ValueError,
        r"class folders differ .*only in train/: \['A'\].*only in test/: \['B'\]",
        r"make them hold the same classes",
        dermnet_other_classes,
        DERMNET,
    ),
    prepare_case(
        "dermnet-empty-class-folder",
        ValueError,
        r"class folder .*train/Warts Photos holds no images",
        r"add images or remove it",
        dermnet_empty_class,
        DERMNET,
    ),
    prepare_case(
        "dermnet-jpeg-cut-in-half",
        ValueError,
        r"cannot decode image .*t3\.jpg.*corrupt or truncated",
        r"download it again or delete it",
        dermnet_truncated(0.5),
        DERMNET,
    ),
    prepare_case(
        "dermnet-jpeg-missing-its-end",
        ValueError,
        r"cannot decode image .*t3\.jpg.*corrupt or truncated",
        r"download it again or delete it",
        dermnet_truncated(0.9),
        DERMNET,
    ),
    prepare_case(
        "dermnet-not-an-image",
        ValueError,
        r"cannot decode image .*zz\.jpg",
        r"download it again or delete it",
        dermnet_not_an_image,
        DERMNET,
    ),
    prepare_case(
        "dermnet-unknown-split",
        ConfigError,
        r"at 'dataset.split': 'kaggle' is not one of \[None, 'official'\]",
        r"null = the source's own train/test split",
        None,
        {**DERMNET, "split": "kaggle"},
    ),
    prepare_case(
        "dermnet-test-size-without-the-official-split",
        ConfigError,
        r"at 'dataset.test_size': only split: official takes it",
        r"drop it or set split: official",
        None,
        {**DERMNET, "test_size": 10},
    ),
    prepare_case(
        "dermnet-official-split-on-too-few-images",
        ValueError,
        r"the official split of Dermnet needs pool_size \+ test_size = 15000 \+ 4000 = "
        r"19000 images but .*/train and .*/test hold 14",
        r"lower pool_size or test_size \(the official 15,000 \+ 4,000 are for the "
        r"full Kaggle release",
        lambda ctx, root: make_dermnet(root),
        {**DERMNET, "split": "official"},
    ),
    prepare_case(
        "dermnet-official-split-sizes-over-the-tree",
        ValueError,
        r"needs pool_size \+ test_size = 11 \+ 4 = 15 images but .* hold 14",
        r"lower pool_size or test_size",
        lambda ctx, root: make_dermnet(root),
        {**DERMNET, "split": "official", "pool_size": 11, "test_size": 4},
    ),
    prepare_case(
        "dermnet-official-split-hidden-empty-class-folder",
        ValueError,
        r"class folder .*train/\.ipynb_checkpoints holds no images",
        r"add images or remove it",
        dermnet_hidden_class,
        {**DERMNET, "split": "official", "pool_size": 5, "test_size": 3},
    ),
    prepare_case(
        "imagefolder-missing-root",
        FileNotFoundError,
        r"dataset 'imagefolder': root folder .*nope does not exist",
        r"put the files there .* or fix root",
        None,
        {"kind": "imagefolder", "root": "nope"},
    ),
    prepare_case(
        "imagefolder-without-class-folders",
        ValueError,
        r"holds no class folders",
        r"the layout is .*/<class>/<image files>",
        None,
        FOLDER,
    ),
    prepare_case(
        "imagefolder-train-without-test",
        ValueError,
        r"has a train/ folder but no test/ folder",
        r"use root/<class>/ \(seeded split\) or both root/train/<class>/ and "
        r"root/test/<class>/",
        folder_train_only,
        FOLDER,
    ),
    # Fashion-MNIST
    prepare_case(
        "fashion-mnist-not-found",
        FileNotFoundError,
        r"raw \(missing \['train-labels-idx1-ubyte',.*system-fashion-mnist "
        r"\(absent\)",
        r"apt-get install dataset-fashion-mnist.*set root",
        fashion_partial,
        FASHION,
    ),
    prepare_case(
        "fashion-mnist-truncated",
        ValueError,
        r"t10k-images-idx3-ubyte: \d+ bytes, expected \d+",
        r"corrupt or truncated: download it again",
        fashion_truncated(False),
        FASHION,
    ),
    prepare_case(
        "fashion-mnist-truncated-gz",
        ValueError,
        r"t10k-images-idx3-ubyte.gz.*corrupt or truncated",
        r"download it again",
        fashion_truncated(True),
        FASHION,
    ),
    prepare_case(
        "fashion-mnist-swapped-files",
        ValueError,
        r"train-images-idx3-ubyte: idx magic number 2049, expected 2051",
        r"not the right idx file \(the file is corrupt or truncated: download it "
        r"again\)",
        fashion_swapped,
        FASHION,
    ),
    prepare_case(
        "fashion-mnist-count-mismatch",
        ValueError,
        r"holds 4 images but .* 3 labels",
        r"download them again",
        fashion_count_mismatch,
        FASHION,
    ),
    prepare_case(
        "fashion-mnist-label-out-of-range",
        ValueError,
        r"t10k-labels-idx1-ubyte: label 10 outside 0..9",
        r"download it again",
        fashion_bad_label,
        FASHION,
    ),
]


# ----------------------------------------------------------------------- 3. partitions

PART = dict(
    kind="iid", num_clients=3, samples_per_client=20, eval_members_per_client=10, eval_nonmembers=30
)


def partition_case(id: str, problem: str, fix: str, **part: Any):
    """The partition stage on the prepared digits (1,347 train / 450 test samples)."""

    def setup(ctx: Ctx):
        out = ctx.tmp / "partition.parquet"
        return (lambda: pipeline.partition(ctx.digits, {**PART, **part}, 0, out)), [out]

    return bad(id, PartitionError, problem, fix, setup)


PARTITIONS = [
    partition_case(
        "more-samples-than-the-dataset",
        r"asks for 3 clients × 1000 samples = 3000 training samples but the "
        r"dataset's training split has 1347",
        r"lower samples_per_client or "
        r"num_clients",
        samples_per_client=1000,
    ),
    partition_case(
        "more-nonmembers-than-the-test-split",
        r"eval_nonmembers = 500 but the test split has only 450 samples",
        r"lower eval_nonmembers",
        eval_nonmembers=500,
    ),
    partition_case(
        "more-eval-members-than-a-client-holds",
        r"hold fewer samples than eval_members_per_client = 21",
        r"lower it or give clients more samples",
        eval_members_per_client=21,
    ),
    partition_case(
        "dirichlet-cannot-give-every-client-its-members",
        r"dirichlet\(beta=0.01\) could not give all 10 clients at least 20 samples",
        r"raise beta, samples_per_client, or lower num_clients or "
        r"eval_members_per_client",
        kind="dirichlet",
        beta=0.01,
        num_clients=10,
        eval_members_per_client=20,
    ),
    partition_case(
        "more-canaries-than-the-held-out-pool",
        r"audit_canaries = 500 but only 420 held-out samples lie outside the "
        r"evaluation set",
        r"lower audit_canaries or eval_nonmembers",
        audit_canaries=500,
    ),
    partition_case(
        "too-few-held-out-samples-for-the-audit-s-fillers",
        r"audit_canaries = 300 needs 300 canaries and 300 fillers .* but only 120 "
        r"held-out samples remain outside the evaluation set and the canaries",
        r"lower audit_canaries, eval_nonmembers or samples_per_client",
        audit_canaries=300,
        samples_per_client=None,
    ),
]


# --------------------------------------------------------------- 4. intermediate files

CELL = dict(dataset="digits", model="alexnet", defense="none", partition="iid", seed=0)
MEASURES = ("loss", "logit_conf", "cos", "grad_diff", "grad_norm", "confidence")


def cell_inputs(ctx: Ctx, **part: Any) -> tuple[Path, pd.DataFrame]:
    """A partition of the digits and a (random) measure table of what the measure stage
    measures: its evaluation set and audit canaries."""
    part_file = ctx.tmp / "partition.parquet"
    pipeline.partition(ctx.digits, {**PART, **part}, 0, part_file)
    p = pd.read_parquet(part_file)
    ids = p.sample_id[p["eval"] | p["canary"]].to_numpy()
    rr, cc, ss = np.meshgrid([1, 2], np.arange(3), ids, indexing="ij")
    rng = np.random.default_rng(0)
    mdm = pd.DataFrame(
        {
            "round": rr.ravel().astype("int32"),
            "client_id": cc.ravel().astype("int32"),
            "sample_id": ss.ravel(),
            **{m: rng.random(rr.size).astype("float32") for m in MEASURES},
            "correct": True,
        }
    )
    return part_file, mdm


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def attack_case(
    id: str,
    exc: type[BaseException],
    problem: str,
    fix: str,
    *,
    table: Callable[[pd.DataFrame, pd.DataFrame], pd.DataFrame] = lambda m, p: m,
    partition: Callable[[pd.DataFrame], pd.DataFrame] | None = None,
    damage: Callable[[Path], None] | None = None,
    part: dict | None = None,
    marks: Any = (),
    **kw: Any,
):
    """The attack stage on a measure table and a partition edited by ``table(mdm, partition)``
    and ``partition(partition)``."""

    def setup(ctx: Ctx):
        part_file, mdm = cell_inputs(ctx, **(part or {}))
        mdm = table(mdm, pd.read_parquet(part_file))
        if partition is not None:
            fio.write_parquet(partition(pd.read_parquet(part_file)), part_file, "partition")
        mdm_file = ctx.tmp / "mdm.parquet"
        fio.write_parquet(mdm, mdm_file, "measures")
        if damage is not None:
            damage(mdm_file)
        out = ctx.tmp / "attacks"
        outputs = {a: out / f"{a}.parquet" for a in ("loss", "cos", "audit")}
        config = {
            "attacks": ["loss", "cos"],
            "bootstrap": 10,
            **{k: v for k, v in kw.items() if k != "audit"},
        }
        args = dict(
            measures_file=mdm_file,
            partition_file=part_file,
            cell=CELL,
            rounds=[1, 2],
            outputs=outputs,
            config=config,
            **{k: v for k, v in kw.items() if k == "audit"},
        )
        return (lambda: pipeline.attack(**args)), [*outputs.values(), out]

    return bad(id, exc, problem, fix, setup, marks)


def replicates_case(
    id: str,
    exc: type[BaseException],
    problem: str,
    *,
    edit: Callable[[pd.DataFrame], pd.DataFrame] = lambda r: r,
    damage: Callable[[Path], None] | None = None,
    missing: bool = False,
):
    """The report's table stage on a replicate file edited by ``edit`` (or damaged, or
    missing): it stops before writing any table, naming the fix (rerun the attack)."""

    def setup(ctx: Ctx):
        attack_file, rep_file = ctx.tmp / "loss.parquet", ctx.tmp / "replicates.parquet"
        fio.write_parquet(
            pd.DataFrame(columns=list(contracts.ATTACK_COLUMNS)).astype(contracts.ATTACK_DTYPES),
            attack_file,
            "attack",
        )
        rng = np.random.default_rng(0)
        reps = pd.DataFrame(
            [
                dict(
                    CELL,
                    attack="loss",
                    protocol="aligned",
                    draw=0,
                    target=t,
                    round=2,
                    **{
                        "auc_replicates": rng.random(8).astype("float32"),
                        "tpr@0.1%_replicates": np.zeros(8, "float32"),
                        "tpr@1%_replicates": np.zeros(8, "float32"),
                    },
                )
                for t in range(3)
            ]
        ).astype(contracts.REPLICATE_DTYPES)
        if not missing:
            fio.write_parquet(edit(reps), rep_file, "replicates")
        if damage is not None:
            damage(rep_file)
        out = ctx.tmp / "tables"
        outputs = {
            k: out / f"{k}.txt"
            for k in ("csv", "per_round", "md", "tex", "findings_csv", "findings_md")
        }
        return (
            lambda: pipeline.report_tables(
                attack_files=[attack_file],
                manifests=[],
                selections=["last"],
                fpr_rule="at_most",
                replicate_files=[rep_file],
                outputs=outputs,
            )
        ), [*outputs.values(), out]

    return bad(id, exc, problem, RERUN_ATTACK, setup)


def measure_case(
    id: str,
    exc: type[BaseException],
    problem: str,
    fix: str,
    *,
    rounds: list[int],
    observed: dict[int, bytes] | None = None,
    manifest: dict | None = None,
    partition: Callable[[pd.DataFrame], pd.DataFrame] | None = None,
    marks: Any = (),
):
    """The measure stage on ``observed`` round files (round → bytes) and a partition."""

    def setup(ctx: Ctx):
        obs = ctx.tmp / "observed"
        obs.mkdir()
        for r, raw in (observed or {}).items():
            fio.round_file(obs, r).write_bytes(raw)
        part_file = ctx.tmp / "partition.parquet"
        pipeline.partition(ctx.digits, PART, 0, part_file)
        if partition is not None:
            fio.write_parquet(partition(pd.read_parquet(part_file)), part_file, "partition")
        man = None
        if manifest is not None:
            man = ctx.tmp / "manifest.json"
            fio.write_manifest(manifest, man)
        out = ctx.tmp / "mdm.parquet"
        return (
            lambda: pipeline.measure(
                data=ctx.digits,
                partition_file=part_file,
                observed_dir=obs,
                rounds=rounds,
                manifest_file=man,
                device="cpu",
                output=out,
            )
        ), [out]

    return bad(id, exc, problem, fix, setup, marks)


def train_case(
    id: str,
    exc: type[BaseException],
    problem: str,
    fix: str,
    *,
    damage: Callable[[Path], None] | None = None,
    device: str = "cpu",
    marks: Any = (),
):
    """The train stage on a partition file that ``damage`` spoils, on ``device``."""

    def setup(ctx: Ctx):
        part_file = ctx.tmp / "partition.parquet"
        pipeline.partition(ctx.digits, PART, 0, part_file)
        if damage is not None:
            damage(part_file)
        out = ctx.tmp / "train"
        outputs = {
            "history": out / "history.parquet",
            "final": out / "final.safetensors",
            "observed": out / "observed",
            "manifest": out / "manifest.json",
        }
        return (
            lambda: pipeline.train(
                data=ctx.digits,
                partition_file=part_file,
                model={"kind": "alexnet"},
                defense={"kind": "none"},
                train_cfg=dict(rounds=1, batch_size=10),
                cell=CELL,
                device=device,
                threads=1,
                outputs=outputs,
            )
        ), [*outputs.values(), out]

    return bad(id, exc, problem, fix, setup, marks)


def half_partition(path: Path) -> None:
    fio.write_parquet(pd.read_parquet(path).iloc[:100], path, "partition")


def doubled(p: pd.DataFrame) -> pd.DataFrame:
    """A partition of a dataset twice the size (its evaluation set reaches past the digits)."""
    more = p.assign(sample_id=p.sample_id + len(p))
    return pd.concat([p, more], ignore_index=True)


RERUN_MEASURE = r"rerun the measure stage"
NOT_TENSORS = b"not a file fedmia wrote" * 10

RERUN_ATTACK = (
    r"delete .*replicates.parquet and rerun, or rerun its stage with snakemake "
    r"--forcerun attack"
)

INTERMEDIATE = [
    # the attack stage's replicates given to the report
    replicates_case(
        "replicate-file-missing",
        FileNotFoundError,
        r"replicates.parquet does not exist",
        missing=True,
    ),
    replicates_case(
        "truncated-replicate-file",
        contracts.FormatError,
        r"replicates.parquet is not a readable Parquet file .*truncated or damaged",
        damage=truncate,
    ),
    replicates_case(
        "replicate-file-missing-a-column",
        contracts.FormatError,
        r"replicates.parquet lacks column\(s\) \['tpr@0.1%_replicates'\]",
        edit=lambda r: r.drop(columns="tpr@0.1%_replicates"),
    ),
    replicates_case(
        "replicate-arrays-of-unequal-lengths",
        contracts.FormatError,
        r"replicate arrays of unequal lengths \[7, 8\]",
        edit=lambda r: r.assign(auc_replicates=[r.auc_replicates[0][:7], *r.auc_replicates[1:]]),
    ),
    replicates_case(
        "replicates-of-another-dtype",
        contracts.FormatError,
        r"column 'auc_replicates' must hold float32 arrays, found ndarray float64",
        edit=lambda r: r.assign(auc_replicates=[v.astype("float64") for v in r.auc_replicates]),
    ),
    # measure tables given to the attack stage
    attack_case(
        "measure-table-missing-a-round",
        ValueError,
        r"mdm.parquet lacks observed round\(s\) \[2\]",
        RERUN_MEASURE,
        table=lambda m, p: m[m["round"] != 2],
    ),
    attack_case(
        "measure-table-missing-a-client",
        ValueError,
        r"incomplete measure table .*round 2 lacks client\(s\) \[1\]",
        RERUN_MEASURE,
        table=lambda m, p: m[~((m["round"] == 2) & (m.client_id == 1))],
    ),
    attack_case(
        "measure-table-with-duplicates",
        ValueError,
        r"3 duplicated \(round, client_id, sample_id\)",
        RERUN_MEASURE,
        table=lambda m, p: pd.concat([m, m.iloc[:3]]),
    ),
    attack_case(
        "measure-table-with-nan",
        ValueError,
        r"measure column 'loss' has 1 NaN or infinite value",
        RERUN_MEASURE,
        table=lambda m, p: m.assign(loss=m.loss.where(m.index != 5)),
    ),
    attack_case(
        "measure-table-missing-a-column",
        ValueError,
        r"measure table lacks column\(s\) \['cos'\]",
        RERUN_MEASURE,
        table=lambda m, p: m.drop(columns="cos"),
    ),
    attack_case(
        "truncated-measure-parquet",
        ValueError,
        r"mdm.parquet is not a readable Parquet file .*truncated or damaged",
        r"delete .*mdm.parquet and rerun, or rerun its stage with snakemake "
        r"--forcerun measure",
        damage=truncate,
    ),
    attack_case(
        "measure-table-missing-canaries",
        ValueError,
        r"the measure table lacks 5 canaries",
        RERUN_MEASURE,
        table=lambda m, p: m[~m.sample_id.isin(p.sample_id[p.canary][:5])],
        part={"audit_canaries": 20},
        audit={"target": 0, "delta": 1e-5},
    ),
    attack_case(
        "measure-table-without-any-canary",
        ValueError,
        r"the measure table lacks 20 canaries",
        RERUN_MEASURE,
        table=lambda m, p: m[~m.sample_id.isin(p.sample_id[p.canary])],
        part={"audit_canaries": 20},
        audit={"target": 0, "delta": 1e-5},
    ),
    attack_case(
        "attack-targets-beyond-the-clients",
        ValueError,
        r"attack.targets \[5\] are not clients of this cell",
        r"\(0..2\)",
        targets=[5],
    ),
    attack_case(
        "partition-whose-evaluation-set-has-no-nonmembers",
        ValueError,
        r"target client 0 owns all 60 evaluation samples \(no non-members\)",
        r"rerun the partition stage|eval_nonmembers",
        partition=lambda p: p.assign(client_id=np.where(p["eval"], 0, p.client_id)),
        targets=[0],
    ),
    attack_case(
        "partition-of-another-evaluation-set",
        ValueError,
        r"mdm.parquet holds 1 sample\(s\) outside the evaluation set of "
        r".*partition.parquet",
        r"rerun the measure stage",
        partition=lambda p: p.assign(
            eval=p["eval"] & (p.sample_id != p.sample_id[p["eval"]].iloc[0])
        ),
    ),
    attack_case(
        "partition-without-the-eval-column",
        ValueError,
        r"partition.parquet lacks column",
        r"rerun the partition stage",
        partition=lambda p: p.drop(columns="eval"),
    ),
    # observed rounds and partitions given to the measure stage
    measure_case(
        "missing-observed-round-file",
        FileNotFoundError,
        r"observed round file\(s\) missing: \[.*round0002.safetensors'\]",
        r"rerun the train stage with these rounds observed",
        rounds=[1, 2],
        observed={1: NOT_TENSORS},
    ),
    measure_case(
        "round-the-train-stage-did-not-observe",
        ValueError,
        r"manifest.json: round\(s\) \[2\] were not observed by the train stage",
        r"rerun it \(snakemake --forcerun train\)",
        rounds=[1, 2],
        manifest={"observed_rounds": [1], "diverged_round": None},
    ),
    measure_case(
        "damaged-observed-round-file",
        ValueError,
        r"round0001.safetensors is not a readable safetensors file",
        r"rerun its stage with snakemake --forcerun train",
        rounds=[1],
        observed={1: NOT_TENSORS},
    ),
    measure_case(
        "partition-longer-than-the-dataset",
        ValueError,
        r"partition.parquet has 3594 rows but the dataset has 1797 samples",
        r"rerun the partition stage",
        rounds=[1],
        observed={1: NOT_TENSORS},
        partition=doubled,
    ),
    # partitions given to the train stage
    train_case(
        "partition-shorter-than-the-dataset",
        ValueError,
        r"partition.parquet has 100 rows but the dataset has 1797 samples",
        r"rerun the partition stage",
        damage=half_partition,
    ),
    # a config value only the running stage can check
    train_case(
        "cuda-on-a-machine-without-cuda",
        RuntimeError,
        r"device 'cuda' requested but CUDA is not available",
        r"set device: auto or cpu",
        device="cuda",
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here"),
    ),
    train_case(
        "truncated-partition-parquet",
        ValueError,
        r"partition.parquet is not a readable Parquet file .*truncated or damaged",
        r"rerun its stage with snakemake --forcerun partition",
        damage=truncate,
    ),
]

# ------------------------------------------------- 4a. recorded server views to import

REC_PART = dict(
    kind="iid", num_clients=3, samples_per_client=20, eval_members_per_client=5, eval_nonmembers=20
)
RECORD_AGAIN = r"restore the recording's files as they were recorded, or record the run again"


@pytest.fixture(scope="session")
def recorded_view(digits_files, tmp_path_factory) -> Path:
    """A tiny trained cell's folder: a recorded server view (rounds 1 and 2, K = 3)."""
    out = tmp_path_factory.mktemp("recorded")
    pipeline.partition(digits_files, REC_PART, 0, out / "partition.parquet")
    pipeline.train(
        data=digits_files,
        partition_file=out / "partition.parquet",
        model={"kind": "alexnet"},
        defense={"kind": "none"},
        train_cfg=dict(rounds=2, batch_size=10, observe_every=1),
        cell=CELL,
        device="cpu",
        threads=1,
        outputs={
            k: out / n
            for k, n in (
                ("history", "history.parquet"),
                ("final", "final.safetensors"),
                ("observed", "observed"),
                ("manifest", "manifest.json"),
            )
        },
    )
    return out


def resign(rec: Path, name: str) -> None:
    """Write the current SHA-256 of ``rec/name`` into the manifest (as its recorder would)."""
    man = json.loads((rec / "manifest.json").read_text())
    man["view"]["files"][name] = fio.file_sha256(rec / name)
    (rec / "manifest.json").write_text(json.dumps(man))


def recording_case(
    id: str,
    exc: type[BaseException],
    problem: str,
    fix: str,
    *,
    damage: Callable[[Path], None],
    part: dict | None = None,
    marks: Any = (),
):
    """The import stage on a copy of a recorded view that ``damage`` spoils."""

    def setup(ctx: Ctx):
        rec = ctx.tmp / "rec"
        shutil.copytree(ctx.request.getfixturevalue("recorded_view"), rec)
        damage(rec)
        out = ctx.tmp / "imported"
        outputs = {
            "manifest": out / "manifest.json",
            "observed": out / "observed",
            "ownership": out / "ownership.parquet",
            "final": out / "final.safetensors",
            "partition": out / "partition.parquet",
        }
        return (
            lambda: import_recording(
                recording=rec,
                data=ctx.digits,
                model={"kind": "alexnet"},
                partition={**REC_PART, **(part or {})},
                cell=CELL,
                device="cpu",
                threads=1,
                outputs=outputs,
            )
        ), [*outputs.values(), out]

    return bad(id, exc, problem, fix, setup, marks)


def _drop_round(rec: Path) -> None:
    (rec / "observed" / "round0002.safetensors").unlink()


def _other_architecture(rec: Path) -> None:
    f = rec / "observed" / "round0001.safetensors"
    obs = fio.load_observed(f)
    state = FlatState(build_model("alexnet", 12, 3, seed=0))  # 12 classes: another classifier
    p = state.layout.size
    fio.save_observed(
        f,
        global_state=torch.zeros(p),
        uploads=torch.zeros(3, p),
        client_ids=obs["client_ids"],
        num_samples=obs["num_samples"],
        meta={
            "round": 1,
            "layout": state.layout.to_list(),
            "model": {"kind": "alexnet", "num_classes": 12, "in_channels": 3},
        },
    )
    resign(rec, "observed/round0001.safetensors")


def _foreign_samples(rec: Path) -> None:
    own = fio.read_ownership(rec / "ownership.parquet")
    own.loc[own.sample_id >= 1790, "sample_id"] += 5000
    fio.write_ownership(own, rec / "ownership.parquet")
    resign(rec, "ownership.parquet")


def _truncated_round(rec: Path) -> None:
    truncate(rec / "observed" / "round0001.safetensors")
    resign(rec, "observed/round0001.safetensors")  # a recorder that wrote a broken file


def _changed_final(rec: Path) -> None:
    f = rec / "final.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 1
    f.write_bytes(bytes(raw))


def _emptied(rec: Path) -> None:
    """A recording's folder with nothing in it (the run was never recorded there)."""
    shutil.rmtree(rec)
    rec.mkdir()


def _no_rounds(rec: Path) -> None:
    """A view that records no round: its observed files gone, its manifest says so."""
    shutil.rmtree(rec / "observed")
    man = json.loads((rec / "manifest.json").read_text())
    man["view"]["observed_rounds"] = []
    man["view"]["files"] = {
        f: h for f, h in man["view"]["files"].items() if not f.startswith("observed/")
    }
    (rec / "manifest.json").write_text(json.dumps(man))


def _no_round_files(rec: Path) -> None:
    """The manifest lists rounds 1 and 2, its ``observed/`` folder holds no file."""
    shutil.rmtree(rec / "observed")
    (rec / "observed").mkdir()


NO_ROUND = r"records no round \(its view's observed_rounds is empty: nothing to attack\)"

RECORDINGS = [
    recording_case(
        "recording-empty-folder",
        FileNotFoundError,
        r"rec is empty: no recorded view there \(no manifest.json, no observed rounds\)",
        r"record the run into it first .* or set the recording's folder to the one the run "
        r"was recorded in",
        damage=_emptied,
    ),
    recording_case(
        "recording-without-observed-rounds",
        RecordingError,
        r"rec/manifest.json " + NO_ROUND,
        r"record at least one round of the run",
        damage=_no_rounds,
    ),
    recording_case(
        "recording-without-observed-files",
        RecordingError,
        r"recorded round 1: .*observed/round0001.safetensors is missing \(the manifest lists "
        r"the rounds \[1, 2\]\)",
        RECORD_AGAIN,
        damage=_no_round_files,
    ),
    recording_case(
        "recording-missing-a-round",
        RecordingError,
        r"recorded round 2: .*round0002.safetensors is missing",
        RECORD_AGAIN,
        damage=_drop_round,
    ),
    recording_case(
        "recording-upload-of-another-architecture",
        RecordingError,
        r"round0001.safetensors: an upload of another architecture than model "
        r"'alexnet' \(first difference: 'classifier.weight' \[12, 256\] vs "
        r"\[10, 256\]\)",
        r"set the recording's model to the architecture the run "
        r"trained",
        damage=_other_architecture,
    ),
    recording_case(
        "recording-sample-ids-not-in-the-dataset",
        RecordingError,
        r"ownership.parquet names 7 sample id\(s\) not in the dataset, e.g. "
        r"\[6790, 6791, 6792\]; the dataset has 1797 samples",
        r"set the recording's dataset to the one it trained on",
        damage=_foreign_samples,
    ),
    recording_case(
        "recording-truncated-file",
        RecordingError,
        r"round0001.safetensors is not a readable safetensors file .*truncated",
        RECORD_AGAIN,
        damage=_truncated_round,
    ),
    recording_case(
        "recording-hash-mismatch",
        RecordingError,
        r"final.safetensors: SHA-256 \w+… does not match the manifest's \w+… \(the "
        r"file was changed or truncated after recording\)",
        RECORD_AGAIN,
        damage=_changed_final,
    ),
    recording_case(
        "recording-without-a-manifest",
        FileNotFoundError,
        r"rec/manifest.json does not exist: no recorded view there",
        r"record the run first .* or fix the recording's folder",
        damage=lambda rec: (rec / "manifest.json").unlink(),
    ),
    recording_case(
        "recording-of-other-clients-than-the-partition",
        RecordingError,
        r"the view has 3 clients but partition 'iid' says num_clients 4",
        r"set it to 3",
        damage=lambda rec: None,
        part={"num_clients": 4},
    ),
]


def recording_config(edit: Callable[[dict, Path], None]) -> Setup:
    """The tiny config with a recording of the session's recorded view, edited."""

    def setup(ctx: Ctx):
        cfg = copy.deepcopy(TINY)
        cfg["partitions"]["rec"] = dict(REC_PART)
        cfg["recordings"] = {
            "run": dict(
                folder=str(ctx.request.getfixturevalue("recorded_view")),
                dataset="digits",
                model="alexnet",
                defense="none",
                partition="rec",
                seed=0,
            )
        }
        edit(cfg, ctx.tmp)
        return (lambda: load_workflow_config(cfg)), []

    return setup


def _also_in_the_grid(cfg: dict, tmp: Path) -> None:
    cfg["grid"][0]["partitions"].append("rec")


def _recording_damaged(damage: Callable[[Path], None]) -> Callable[[dict, Path], None]:
    """The config's recording copied to ``tmp/rec`` and spoilt by ``damage``."""

    def edit(cfg: dict, tmp: Path) -> None:
        shutil.copytree(cfg["recordings"]["run"]["folder"], tmp / "rec")
        damage(tmp / "rec")
        cfg["recordings"]["run"]["folder"] = str(tmp / "rec")

    return edit


RECORDING_CONFIGS = [
    bad(
        "config-recording-empty-folder",
        ConfigError,
        r"at 'recordings.run.folder': .*rec is empty: no recorded view there",
        r"record the run into it first",
        recording_config(_recording_damaged(_emptied)),
    ),
    bad(
        "config-recording-without-observed-rounds",
        ConfigError,
        r"at 'recordings.run.folder': .*rec/manifest.json " + NO_ROUND,
        r"record at least one round of the run",
        recording_config(_recording_damaged(_no_rounds)),
    ),
    bad(
        "config-recording-folder-without-a-manifest",
        ConfigError,
        r"at 'recordings.run.folder': .*nowhere/manifest.json does not exist",
        r"record the run first",
        recording_config(
            lambda cfg, tmp: cfg["recordings"]["run"].update(folder=str(tmp / "nowhere"))
        ),
    ),
    bad(
        "config-recording-attack-round-not-recorded",
        ConfigError,
        r"at 'recordings.run.attack_rounds': round\(s\) \[5\] are not in recording 'run'",
        r"attack recorded rounds only",
        recording_config(lambda cfg, tmp: cfg["recordings"]["run"].update(attack_rounds=[2, 5])),
    ),
    bad(
        "config-recording-of-an-undefined-model",
        ConfigError,
        r"at 'recordings.run.model': 'cnn' is not defined",
        r"defined models: \['alexnet'\]",
        recording_config(lambda cfg, tmp: cfg["recordings"]["run"].update(model="cnn")),
    ),
    bad(
        "config-recording-of-a-trained-cell",
        ConfigError,
        r"at 'recordings.run': cell digits/alexnet/none/rec/seed0 is also trained by a grid "
        r"block",
        r"give the recording another cell key",
        recording_config(_also_in_the_grid),
    ),
    bad(
        "config-recording-of-other-clients-than-the-partition",
        ConfigError,
        r"at 'partitions.rec.num_clients': recording 'run' has 3 clients",
        r"set it to 3",
        recording_config(lambda cfg, tmp: cfg["partitions"]["rec"].update(num_clients=5)),
    ),
]


# --------------------------------------------------- 4b. files of another format version


def old_format(
    kind: str, write: Callable[[Path], None], read: Callable[[Path], Any], name: str
) -> Setup:
    """A ``kind`` file written by a fedmia whose format version was one lower."""

    def setup(ctx: Ctx):
        f = ctx.tmp / name
        version = contracts.FORMATS[kind]
        contracts.FORMATS[kind] = version - 1
        try:
            write(f)
        finally:
            contracts.FORMATS[kind] = version
        return (lambda: read(f)), []

    return setup


def _frame(f: Path, kind: str) -> None:
    fio.write_parquet(pd.DataFrame({"round": [1]}), f, kind)


FORMAT_VERSIONS = [
    bad(
        f"{kind}-file-of-an-older-format",
        contracts.FormatError,
        rf"has format '{kind}/{contracts.FORMATS[kind] - 1}', but this fedmia reads "
        rf"'{kind}/{contracts.FORMATS[kind]}'",
        rf"--forcerun {contracts.WRITER[kind]}",
        old_format(kind, write, read, name),
    )
    for kind, name, write, read in (
        (
            "partition",
            "p.parquet",
            lambda f: _frame(f, "partition"),
            lambda f: fio.read_parquet(f, "partition"),
        ),
        (
            "measures",
            "m.parquet",
            lambda f: _frame(f, "measures"),
            lambda f: fio.read_parquet(f, "measures"),
        ),
        (
            "attack",
            "a.parquet",
            lambda f: _frame(f, "attack"),
            lambda f: fio.read_parquet(f, "attack"),
        ),
        ("replicates", "r.parquet", lambda f: _frame(f, "replicates"), fio.read_replicates),
        (
            "audit",
            "audit.parquet",
            lambda f: _frame(f, "audit"),
            lambda f: fio.read_parquet(f, "audit"),
        ),
        (
            "observed",
            "round0001.safetensors",
            lambda f: fio.save_tensors(f, {"x": torch.zeros(1)}, {}, "observed"),
            fio.load_observed,
        ),
        ("manifest", "manifest.json", lambda f: fio.write_manifest({}, f), fio.read_manifest),
    )
] + [
    bad(
        "measures-file-given-as-a-partition",
        contracts.FormatError,
        rf"has format 'measures/{contracts.FORMATS['measures']}', but this fedmia reads "
        r"'partition/\d+'",
        r"--forcerun partition",
        lambda ctx: (
            _frame(ctx.tmp / "p.parquet", "measures"),
            (lambda: fio.read_parquet(ctx.tmp / "p.parquet", "partition"), []),
        )[1],
    ),
    bad(
        "checkpoint-of-another-format",
        contracts.FormatError,
        r"state.safetensors has no fedmia format tag",
        r"delete .*ckpt to start the cell afresh",
        lambda ctx: (
            _untagged_checkpoint(ctx.tmp / "ckpt"),
            (lambda: _load_checkpoint(ctx.tmp / "ckpt"), []),
        )[1],
    ),
]


def _untagged_checkpoint(folder: Path) -> None:
    folder.mkdir()
    save_file({"global_state": torch.zeros(2)}, str(folder / "state.safetensors"))


def _load_checkpoint(folder: Path) -> None:
    Checkpoint(folder, "key").load()


# ------------------------------------------ 4c. measure tables given to the attack code


def validate_case(
    id: str,
    problem: str,
    fix: str,
    edit: Callable[[pd.DataFrame, pd.Series], tuple[pd.DataFrame, pd.Series, list[int] | None]],
    marks: Any = (),
):
    def call() -> None:
        mdm, owner = world(separation=0.3)
        validate_measures(*edit(mdm, owner))

    return bad(id, ValueError, problem, fix, library(call), marks)


def _nan(mdm, owner):
    mdm.loc[[1, 50, 60, 70], "cos"] = np.nan
    return mdm, owner, None


def _inf(mdm, owner):
    mdm.loc[3, "loss"] = np.inf
    return mdm, owner, None


def _missing_samples(mdm, owner):
    return mdm.drop(mdm.index[(mdm["round"] == 20) & (mdm.client_id == 1)][:3]), owner, None


def attack_on_nan() -> None:
    mdm, owner = world(separation=0.3)
    mdm.loc[[1, 2], "cos"] = np.nan
    run_attack("cos", mdm, owner)


ATTACKS = [
    validate_case(
        "table-missing-a-column",
        r"lacks column\(s\) \['cos'\]",
        RERUN_MEASURE,
        lambda m, o: (m.drop(columns="cos"), o, None),
    ),
    validate_case(
        "table-with-float-rounds",
        r"column 'round' must be integer",
        r"must be integer",
        lambda m, o: (m.astype({"round": float}), o, None),
    ),
    validate_case(
        "table-missing-a-client",
        r"round 10 lacks client\(s\) \[2\]",
        r"every client needs every sample in "
        r"every round",
        lambda m, o: (m[~((m["round"] == 10) & (m.client_id == 2))], o, None),
    ),
    validate_case(
        "table-missing-samples",
        r"round 20, client 1 lacks 3 of 200 samples",
        r"every client needs every sample in every round",
        _missing_samples,
    ),
    validate_case(
        "table-with-duplicates",
        r"2 duplicated \(round, client_id, sample_id\) row",
        RERUN_MEASURE,
        lambda m, o: (pd.concat([m, m.iloc[[5, 17]]]), o, None),
    ),
    validate_case("table-with-nan", r"column 'cos' has 4 NaN or infinite", RERUN_MEASURE, _nan),
    validate_case("table-with-inf", r"column 'loss' has 1 NaN or infinite", RERUN_MEASURE, _inf),
    validate_case(
        "table-sample-without-owner",
        r"1 sample\(s\) of the measure table are not in owner",
        r"rerun the (measure|partition) stage",
        lambda m, o: (m, o.drop(o.index[4]), None),
    ),
    validate_case(
        "target-without-members",
        r"target client 3 owns none of the 200 evaluation samples",
        r"eval_members_per_client|drop it from attack.targets",
        lambda m, o: (m, o.where(o != 3, -1), None),
    ),
    validate_case(
        "target-without-nonmembers",
        r"target client 0 owns all 200 evaluation samples",
        r"eval_nonmembers",
        lambda m, o: (m, o * 0, None),
    ),
    validate_case(
        "unknown-target",
        r"target client 9 has no rows",
        r"\(clients: \[0, 1, 2, 3, 4\]\)",
        lambda m, o: (m, o, [0, 9]),
    ),
    validate_case(
        "empty-table", r"measure table is empty", RERUN_MEASURE, lambda m, o: (m.iloc[:0], o, None)
    ),
    bad(
        "attack-on-a-nan-measure",
        ValueError,
        r"column 'cos' has 2",
        RERUN_MEASURE,
        library(attack_on_nan),
    ),
    bad(
        "attack-by-an-unknown-name",
        ValueError,
        r"unknown attack 'lira'",
        r"choose from \['contrast_cos', 'contrast_loss', 'cos'",
        library(lambda: run_attack("lira", *world(separation=0.3))),
    ),
    bad(
        "fedmia-with-one-reference",
        ValueError,
        r"at least 2 non-target clients; got 1",
        r"num_clients >= 3|drop",
        library(lambda: run_attack("fedmia_loss", *world(separation=0.3, k=2))),
    ),
    bad(
        "unknown-lira-variance-rule",
        ValueError,
        r"unknown LiRA variance rule 'robust'",
        r"set attack.lira.variance to one of \['per_sample', 'pooled', 'shrunk'\]",
        library(lambda: LiraOptions(variance="robust")),
    ),
    bad(
        "unknown-lira-location-library",
        ValueError,
        r"unknown LiRA location 'mode'",
        r"set attack.lira.location to one of \['mean', 'median'\]",
        library(lambda: LiraOptions(location="mode")),
    ),
    bad(
        "rmia-a-outside-0-1",
        ValueError,
        r"RMIA's a must be a number in \[0, 1\]; got 2",
        r"set attack.rmia.a in \[0, 1\]",
        library(lambda: RmiaOptions(a=2)),
    ),
    bad(
        "rmia-gamma-not-positive",
        ValueError,
        r"RMIA's gamma must be a finite number > 0",
        r"set attack.rmia.gamma > 0",
        library(lambda: RmiaOptions(gamma=0.0)),
    ),
    bad(
        "rmia-on-the-cosine",
        ValueError,
        r"RMIA's signal is log p_y = −loss",
        r"give measure='loss', sign=-1",
        library(lambda: AttackSpec("rmia_cos", "cos", 1, "rmia", "")),
    ),
    bad(
        "rmia-without-a-held-out-population",
        ValueError,
        r"cross-fitting left half [01] without a held-out population",
        r"raise the partition's eval_nonmembers",
        library(
            lambda: run_attacks(
                ["rmia"], *world(separation=0.3, held_out=1), protocols=["aligned"], n_boot=0
            )
        ),
    ),
    bad(
        "lira-with-one-reference",
        ValueError,
        r"LiRA needs at least 2 reference",
        r"num_clients >= 3|drop",
        library(lambda: run_attack("lira_cos", *world(separation=0.3, k=2))),
    ),
    bad(
        "unknown-outlier-filter",
        ValueError,
        r"unknown outlier-filter policy 'sometimes'",
        r"choose from \['auto', 'always', 'never'\]",
        library(lambda: outlier_filter_for("sometimes", "fedmia_cos", "iid")),
    ),
    bad(
        "attack-round-not-in-the-table",
        ValueError,
        r"attack rounds \[30\] are not in the measure table \(observed rounds: \[1, 10, 20\]",
        r"attack only observed rounds",
        library(
            lambda: run_attacks(["loss_series"], *world(separation=0.5), attack_rounds=[10, 30])
        ),
    ),
    bad(
        "official-slots-over-the-pool",
        ValueError,
        r"draws 11 slots from the held-out samples but the evaluation set holds only 10",
        r"lower attack.official.test_slots or enlarge the partition's evaluation set",
        library(
            lambda: official_slots(
                np.r_[np.repeat([0, 1, 2], 6), np.full(10, -1)],
                1,
                5,
                np.arange(3),
                OfficialProtocol(test_slots=11),
                0,
            )
        ),
    ),
]


# ------------------------------------------------------------------ 5. defense strengths


def param_case(kind: str, params: dict, name: str, allowed: str):
    """A library defense whose parameter ``name`` is bad, and what is allowed."""
    value = re.escape(f"'{name}' = {params[name]!r}")
    return bad(
        f"{kind}-{name}-{params[name]}",
        ConfigError,
        rf"^defense: defense '{kind}': parameter {value} is invalid",
        rf"allowed: {allowed}",
        library(lambda: build(kind, **params)),
    )


def compose(*steps: dict, **extra: Any) -> dict:
    return {"kind": "compose", "steps": list(steps), **extra}


def defense_config_case(id: str, defense: dict, problem: str, fix: str):
    """A defense block in the workflow config (the schema's check)."""

    def edit(cfg: dict) -> None:
        cfg["defenses"]["bad"] = defense

    return bad(id, ConfigError, problem, fix, edited_config(edit))


def compose_case(id: str, params: dict, problem: str, fix: str):
    """A library compose with bad ``params``."""
    return bad(
        id,
        ConfigError,
        r"^defense: defense 'compose': " + problem,
        fix,
        library(lambda: build("compose", **params)),
    )


DEFENSES = [
    param_case("dp", dict(sigma=-0.1, clip=1.0), "sigma", r"a number ≥ 0"),
    param_case("dp", dict(sigma=0.1, clip=-1.0), "clip", r"a number > 0"),
    param_case("dp", dict(sigma=0.1, clip=0), "clip", r"a number > 0"),
    param_case("dp", dict(sigma="big", clip=1.0), "sigma", r"a number ≥ 0"),
    param_case("dp", dict(sigma=float("nan"), clip=1.0), "sigma", r"a number ≥ 0"),
    param_case("dp_param_noise", dict(sigma=-1), "sigma", r"a number ≥ 0"),
    param_case("quantize", dict(bits=0), "bits", r"an integer in 1..32"),
    param_case("quantize", dict(bits=33), "bits", r"an integer in 1..32"),
    param_case("quantize", dict(bits=2.5), "bits", r"an integer in 1..32"),
    param_case("sparsify", dict(fraction=1.0), "fraction", r"a number in \[0, 1\)"),
    param_case("sparsify", dict(fraction=-0.1), "fraction", r"a number in \[0, 1\)"),
    param_case("sparsify", dict(fraction=0.5, min_size=-1), "min_size", r"an integer ≥ 0"),
    param_case("mixup", dict(alpha=0), "alpha", r"a number > 0"),
    param_case("mixup", dict(alpha=-1.0), "alpha", r"a number > 0"),
    param_case("instahide", dict(k=0), "k", r"an integer ≥ 1"),
    param_case("instahide", dict(k=2, upper_bound=0.4), "upper_bound", r"a number in \(0.5, 1\]"),
    param_case(
        "instahide",
        dict(k=3, upper_bound=0.5),
        "upper_bound",
        r"a number in \(0.5, 1\] \(the largest coefficient must lie in \[0.5, "
        r"upper_bound\]",
    ),
    param_case("instahide", dict(k=3, upper_bound=1.5), "upper_bound", r"a number in \(0.5, 1\]"),
    param_case("subsample", dict(fraction=0), "fraction", r"a number in \(0, 1\]"),
    param_case("subsample", dict(fraction=1.2), "fraction", r"a number in \(0, 1\]"),
    param_case("augment", dict(padding=-1), "padding", r"an integer ≥ 0"),
    param_case("augment", dict(hflip="yes"), "hflip", r"true or false"),
    param_case("augment", dict(vflip=1), "vflip", r"true or false"),
    param_case("augment", dict(brightness=-0.2), "brightness", r"a number ≥ 0"),
    param_case("augment", dict(rotation=200), "rotation", r"a number in \[0, 180\]"),
    param_case("augment", dict(preset="strong"), "preset", r"one of \['mild', 'official'\]"),
    param_case(
        "mixup", dict(alpha=1.0, variant="offical"), "variant", r"one of \['paper', 'official'\]"
    ),
    param_case(
        "mixup", dict(alpha=1.0, variant=True), "variant", r"one of \['paper', 'official'\]"
    ),
    param_case(
        "quantize", dict(bits=4, variant="paper"), "variant", r"one of \['fedmia', 'official'\]"
    ),
    bad(
        "dp-without-clip",
        ConfigError,
        r"^defense: defense 'dp': missing required parameter 'clip'",
        r"add it",
        library(lambda: build("dp", sigma=0.1)),
    ),
    bad(
        "augment-unknown-parameter",
        ConfigError,
        r"^defense: defense 'augment': unknown parameter\(s\) \['flip'\]",
        r"allowed parameters are \['brightness', .*'hflip', .*'preset', .*'vflip'\]",
        library(lambda: build("augment", flip=True)),
    ),
    bad(
        "dp-unknown-parameter",
        ConfigError,
        r"^defense: defense 'dp': unknown parameter\(s\) \['noise'\]",
        r"allowed parameters are \['clip', 'sigma'\]",
        library(lambda: build("dp", sigma=0.1, clip=1.0, noise=2)),
    ),
    bad(
        "mixup-unknown-parameter",
        ConfigError,
        r"^defense: defense 'mixup': unknown parameter\(s\) \['beta'\]",
        r"allowed parameters are \['alpha', 'variant'\]",
        library(lambda: build("mixup", alpha=1.0, beta=1.0)),
    ),
    bad(
        "none-with-parameters",
        ConfigError,
        r"^defense: defense 'none' takes no parameters",
        r"drop them, or pick the defense they belong to",
        library(lambda: build("none", sigma=1.0)),
    ),
    bad(
        "unknown-defense",
        ConfigError,
        r"defense.kind: unknown defense 'magic'",
        r"choose from \[.*'dp'.*\]",
        library(lambda: build("magic")),
    ),
    bad(
        "defense-config-out-of-range",
        ConfigError,
        r"^defenses.sp: defense 'sparsify': parameter 'fraction' = 2",
        r"allowed: a number in",
        library(
            lambda: defense_from_config({"kind": "sparsify", "fraction": 2}, where="defenses.sp")
        ),
    ),
    bad(
        "instahide-k-too-large-to-draw",
        RuntimeError,
        r"instahide: could not draw coefficients with k = 40",
        r"lower k",
        library(lambda: InstaHideDefense(k=40).coefficients(1, torch.Generator())),
    ),
    compose_case("compose-without-steps", {}, r"missing required parameter 'steps'", r"add it"),
    compose_case(
        "compose-empty-steps",
        dict(steps=[]),
        r"parameter 'steps' = \[\] is invalid",
        r"allowed: a non-empty list of defenses, e.g.",
    ),
    compose_case(
        "compose-steps-not-a-list",
        dict(steps={"kind": "dp"}),
        r"parameter 'steps' = .* is invalid",
        r"allowed: a non-empty list",
    ),
    compose_case(
        "compose-step-without-kind",
        dict(steps=[{"sigma": 1.0}]),
        r"steps\[0\] = \{'sigma': 1.0\} is invalid",
        r"each step is a defense block with a 'kind', e.g.",
    ),
    compose_case(
        "compose-unknown-step",
        dict(steps=[{"kind": "augment"}, {"kind": "magic"}]),
        r"steps\[1\].kind: unknown defense 'magic'",
        r"choose from \[.*'subsample'",
    ),
    compose_case(
        "compose-bad-step-parameter",
        dict(steps=[{"kind": "augment"}, {"kind": "dp", "sigma": -1, "clip": 1.0}]),
        r"steps\[1\]: defense 'dp': parameter 'sigma' = -1 is invalid",
        r"allowed: a number ≥ 0",
    ),
    compose_case(
        "compose-step-unknown-parameter",
        dict(steps=[{"kind": "subsample", "fraction": 0.5, "frac": 1}]),
        r"steps\[0\]: defense 'subsample': unknown parameter\(s\) \['frac'\]",
        r"allowed parameters are \['fraction'\]",
    ),
    compose_case(
        "compose-nested",
        dict(steps=[compose({"kind": "none"})]),
        r"steps\[0\] is itself a compose; nesting is not supported",
        r"list its steps in the outer compose instead",
    ),
    compose_case(
        "compose-unknown-parameter",
        dict(steps=[{"kind": "augment"}], mode="x"),
        r"unknown parameter\(s\) \['mode'\]",
        r"allowed parameters are \['steps', "
        r"'strength'\]",
    ),
    compose_case(
        "compose-strength-not-a-parameter",
        dict(steps=[{"kind": "augment"}], strength="padding"),
        r"strength = 'padding' is invalid",
        r"name one step's parameter as "
        r"'<step kind>.<parameter>' or '<step index>.<parameter>'",
    ),
    compose_case(
        "compose-strength-of-a-missing-step",
        dict(steps=[{"kind": "augment"}], strength="subsample.fraction"),
        r"strength = 'subsample.fraction': no step is of kind 'subsample'",
        r"the steps are \['augment'\]",
    ),
    compose_case(
        "compose-strength-step-out-of-range",
        dict(steps=[{"kind": "augment"}], strength="3.padding"),
        r"strength = '3.padding': there is no step 3",
        r"steps are 0..0",
    ),
    compose_case(
        "compose-strength-not-numeric",
        dict(steps=[{"kind": "augment"}], strength="augment.preset"),
        r"strength = 'augment.preset': step 0 \('augment'\) has no numeric "
        r"parameter 'preset'",
        r"choose from \['padding', 'rotation', 'brightness', 'contrast', "
        r"'saturation'\]",
    ),
    compose_case(
        "compose-strength-ambiguous",
        dict(
            steps=[{"kind": "subsample", "fraction": 0.5}, {"kind": "subsample", "fraction": 0.8}],
            strength="subsample.fraction",
        ),
        r"strength = 'subsample.fraction': steps \[0, 1\] are all 'subsample'",
        r"name the step by its index, e.g. '0.fraction'",
    ),
    # the same blocks in the workflow config: the schema stops them before any job
    defense_config_case(
        "config-dp-negative-sigma",
        {"kind": "dp", "sigma": -0.1, "clip": 1.0},
        r"at 'defenses.bad.sigma': -0.1 is less than",
        r"the minimum of 0",
    ),
    defense_config_case(
        "config-dp-negative-clip",
        {"kind": "dp", "sigma": 0.1, "clip": -1.0},
        r"at 'defenses.bad.clip': -1.0 is less than or equal",
        r"the minimum of 0",
    ),
    defense_config_case(
        "config-param-noise-negative-sigma",
        {"kind": "dp_param_noise", "sigma": -1},
        r"at 'defenses.bad.sigma': -1 is less than",
        r"the minimum of 0",
    ),
    defense_config_case(
        "config-zero-bits",
        {"kind": "quantize", "bits": 0},
        r"at 'defenses.bad.bits': 0 is less than",
        r"the minimum of 1",
    ),
    defense_config_case(
        "config-33-bits",
        {"kind": "quantize", "bits": 33},
        r"at 'defenses.bad.bits': 33 is greater than",
        r"the maximum of 32",
    ),
    defense_config_case(
        "config-sparsify-everything",
        {"kind": "sparsify", "fraction": 1.0},
        r"at 'defenses.bad.fraction': 1.0 is greater than or equal",
        r"the maximum of 1",
    ),
    defense_config_case(
        "config-sparsify-negative",
        {"kind": "sparsify", "fraction": -0.1},
        r"at 'defenses.bad.fraction': -0.1 is less than",
        r"the minimum of 0",
    ),
    defense_config_case(
        "config-mixup-zero-alpha",
        {"kind": "mixup", "alpha": 0},
        r"at 'defenses.bad.alpha': 0 is less than or equal",
        r"the minimum of 0",
    ),
    defense_config_case(
        "config-instahide-zero-k",
        {"kind": "instahide", "k": 0},
        r"at 'defenses.bad.k': 0 is less than",
        r"the minimum of 1",
    ),
    defense_config_case(
        "config-dp-nan-sigma",
        {"kind": "dp", "sigma": float("nan"), "clip": 1.0},
        r"defenses.bad: defense 'dp': parameter 'sigma' = nan is invalid",
        r"allowed: a number ≥ 0",
    ),
    defense_config_case(
        "config-compose-step-infinite-alpha",
        compose({"kind": "mixup", "alpha": float("inf")}),
        r"defenses.bad: defense 'compose': steps\[0\]: defense 'mixup': "
        r"parameter 'alpha' = inf is invalid",
        r"allowed: a number > 0",
    ),
    defense_config_case(
        "config-unknown-defense",
        {"kind": "magic"},
        r"at 'defenses.bad.kind': 'magic' is not one of",
        r"\['none', 'dp'",
    ),
    defense_config_case(
        "config-dp-unknown-parameter",
        {"kind": "dp", "sigma": 0.1, "clip": 1.0, "noise": 2},
        r"at 'defenses.bad': .*'noise' was unexpected",
        r"allowed keys are \['clip', 'kind', 'sigma'\]",
    ),
    defense_config_case(
        "config-compose-bad-step-parameter",
        compose({"kind": "augment"}, {"kind": "dp", "sigma": -1, "clip": 1.0}),
        r"at 'defenses.bad.steps\[1\].sigma': -1 is less than",
        r"the minimum of 0",
    ),
    defense_config_case(
        "config-compose-step-unknown-parameter",
        compose({"kind": "subsample", "fraction": 0.5, "frac": 1}),
        r"at 'defenses.bad.steps\[0\]'.*'frac' was unexpected",
        r"allowed keys are \['fraction', 'kind'\]",
    ),
    defense_config_case(
        "config-compose-unknown-step",
        compose({"kind": "magic"}),
        r"at 'defenses.bad.steps\[0\].kind': 'magic' is not one of",
        r"\['none', 'dp'",
    ),
    defense_config_case(
        "config-compose-nested",
        compose(compose({"kind": "none"})),
        r"at 'defenses.bad.steps\[0\].kind': 'compose' is not one of",
        r"a compose step cannot itself be a compose",
    ),
    defense_config_case(
        "config-compose-empty", compose(), r"at 'defenses.bad.steps': \[\]", r"should be non-empty"
    ),
    defense_config_case(
        "config-compose-without-steps",
        {"kind": "compose"},
        r"at 'defenses.bad': 'steps' is a required property",
        r"add it",
    ),
    defense_config_case(
        "config-compose-strength-not-a-parameter",
        compose({"kind": "augment"}, strength="padding"),
        r"at 'defenses.bad.strength': 'padding' does not match",
        r"one step's parameter: '<step kind>.<parameter>'",
    ),
    defense_config_case(
        "config-compose-strength-of-a-missing-step",
        compose({"kind": "augment"}, strength="subsample.fraction"),
        r"defenses.bad: defense 'compose': strength = 'subsample.fraction': no "
        r"step is of kind 'subsample'",
        r"the steps are \['augment'\]",
    ),
    defense_config_case(
        "config-compose-unknown-key",
        compose({"kind": "augment"}, mode=1),
        r"at 'defenses.bad': .*'mode' was unexpected",
        r"allowed keys are \['kind', 'steps', 'strength'\]",
    ),
    defense_config_case(
        "config-augment-unknown-preset",
        {"kind": "augment", "preset": "strong"},
        r"at 'defenses.bad.preset': 'strong' is not one of",
        r"\['official', 'mild'\]",
    ),
    defense_config_case(
        "config-mixup-unknown-variant",
        {"kind": "mixup", "alpha": 1.0, "variant": "offical"},
        r"at 'defenses.bad.variant': 'offical' is not one of",
        r"\['paper', 'official'\]",
    ),
    defense_config_case(
        "config-compose-quantize-unknown-variant",
        compose({"kind": "quantize", "bits": 4, "variant": "paper"}),
        r"at 'defenses.bad.steps\[0\].variant': 'paper' is not one of",
        r"\['fedmia', 'official'\]",
    ),
    defense_config_case(
        "config-augment-rotation",
        {"kind": "augment", "rotation": 270},
        r"at 'defenses.bad.rotation': 270 is greater than",
        r"the maximum of 180",
    ),
    defense_config_case(
        "config-instahide-infeasible-bound",
        {"kind": "instahide", "k": 3, "upper_bound": 0.5},
        r"at 'defenses.bad.upper_bound': 0.5 is less than or equal",
        r"the minimum of 0.5 .*coefficients are redrawn until the largest is "
        r"in \[0.5, upper_bound\]",
    ),
]

CASES = (
    CONFIG
    + DATASETS
    + PARTITIONS
    + INTERMEDIATE
    + RECORDINGS
    + RECORDING_CONFIGS
    + FORMAT_VERSIONS
    + ATTACKS
    + DEFENSES
)


@pytest.mark.parametrize("case", CASES)
def test_bad_input(case: Bad, tmp_path, monkeypatch, request):
    call, outputs = case.setup(Ctx(tmp_path, monkeypatch, request))
    before = files_under(tmp_path)
    with pytest.raises(case.exc, match=case.problem) as info:
        call()
    assert [p for p in outputs if p.exists()] == []
    assert files_under(tmp_path) == before  # no partial output, no temporary file
    check_fix(str(info.value), case.fix)


# ------------------------------------------------------ 6. command lines (and 1, 2 end to end)


@dataclass(frozen=True)
class Command:
    """A bad command line, run in a fresh folder holding ``config`` as ``config.yaml``.

    ``fix`` is None where the message is not fedmia's to write (Snakemake's own errors).
    ``outputs``: folders (relative) in which no file may be left.
    """

    argv: list[str]
    problem: str
    fix: str | None
    config: dict | None = None
    outputs: tuple[str, ...] = ("results",)


def smk(*args: str, config: bool = False) -> list[str]:
    """``snakemake`` on the repository's Snakefile (the test runs it as ``snakemake_cmd``,
    through this interpreter)."""
    return [
        "snakemake",
        "-s",
        str(REPO / "Snakefile"),
        "--cores",
        "1",
        *args,
        *(["--configfile", "config.yaml"] if config else []),
    ]


def tiny(path: str, value: Any) -> dict:
    return mutate(TINY, path, value)


MISSING_ROOT = mutate(
    tiny("datasets.imgs", {"kind": "imagefolder", "root": "no/such/folder"}),
    "grid.0.datasets",
    ["imgs"],
)


def command(id: str, cmd: Command, marks: Any = ()) -> Any:
    return pytest.param(cmd, id=id, marks=marks)


COMMANDS = [
    command(
        "snakemake-configfile-does-not-exist",
        Command(
            smk("-n", "--configfile", "nonexistent.yaml"),
            r"No such file or directory: 'nonexistent.yaml'",
            None,
        ),
    ),
    command(
        "snakemake-bad-config-override",
        Command(
            smk("-n", "--config", "threads=0", config=True),
            r"invalid config at 'threads': 0 is less than",
            r"the minimum of 1",
            TINY,
        ),
    ),
    command(
        "snakemake-config-out-of-range",
        Command(
            smk("-n", config=True),
            r"invalid config at 'partitions.iid.num_clients': 1 is less than",
            r"the minimum of 2",
            tiny("partitions.iid.num_clients", 1),
        ),
    ),
    command(
        "snakemake-attack-round-not-observed",
        Command(
            smk("-n", config=True),
            r"invalid config at 'attack.rounds': round\(s\) \[3\] are not observed",
            r"add them to train.observe_rounds",
            tiny("attack.rounds", [2, 3]),
        ),
    ),
    command(
        "snakemake-target-that-does-not-exist",
        Command(
            smk("-n", "results/mdm/cifar100/alexnet/none/iid/seed0.parquet", config=True),
            r"No rule to produce results/mdm/cifar100/alexnet/none/iid/seed0.parquet",
            None,
            TINY,
        ),
    ),
    command(
        "snakemake-dataset-root-missing",
        Command(
            smk("results/data/imgs/meta.json", config=True),
            r"dataset 'imagefolder': root folder no/such/folder does not exist",
            r"put the files there .* or fix root",
            MISSING_ROOT,
            outputs=("results/data",),
        ),
    ),
    command(
        "fingerprint-without-a-module",
        Command(
            [sys.executable, "-m", "fedmia.core.fingerprint"],
            r"the following arguments are required: ENTRY",
            r"usage: python -m fedmia.core.fingerprint",
        ),
    ),
    command(
        "fingerprint-of-a-module-outside-fedmia",
        Command(
            [sys.executable, "-m", "fedmia.core.fingerprint", "json"],
            r"\['json'\] are not modules of fedmia",
            r"name modules of the installed fedmia, e.g. "
            r"fedmia.pipeline .*need --root",
        ),
    ),
    command(
        "fingerprint-of-a-missing-module",
        Command(
            [sys.executable, "-m", "fedmia.core.fingerprint", "fedmia.nope"],
            r"no module 'fedmia.nope' in package 'fedmia'",
            r"e.g. fedmia.pipeline",
        ),
    ),
    command(
        "bench-zero-chunk",
        Command(
            [sys.executable, str(REPO / "bench" / "measures.py"), "--chunk", "0"],
            r"argument --chunk: 0 is too small",
            r"give an integer >= 1",
        ),
    ),
    command(
        "bench-unknown-route",
        Command(
            [sys.executable, str(REPO / "bench" / "measures.py"), "--routes", "fast"],
            r"argument --routes: unknown route\(s\) \['fast'\]",
            r"choose from \['fedmia', 'naive', 'floor', 'torch.func'\]",
        ),
    ),
]


@pytest.mark.workflow
@pytest.mark.parametrize("cmd", COMMANDS)
def test_bad_command_line(cmd: Command, request, tmp_path):
    wd = tmp_path / "wd"
    wd.mkdir()
    if cmd.config is not None:
        (wd / "config.yaml").write_text(yaml.safe_dump(cmd.config))
    argv = cmd.argv
    if argv[0] == "snakemake":  # smk()
        argv = [*request.getfixturevalue("snakemake_cmd"), *argv[1:]]
    r = subprocess.run(argv, cwd=wd, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert re.search(cmd.problem, out), out
    if cmd.fix is not None:
        assert re.search(cmd.fix, out), out
    for rel in cmd.outputs:
        left = [p for p in (wd / rel).rglob("*") if p.is_file()] if (wd / rel).exists() else []
        assert left == [], left
