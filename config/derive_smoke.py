"""Derive ``config/paper_smoke.yaml`` from ``config/paper.yaml``: the paper's grid, tiny.

    python config/derive_smoke.py > config/paper_smoke.yaml

``tests/test_paper_smoke.py`` checks that the checked-in ``paper_smoke.yaml`` is what this
script writes from today's ``paper.yaml``, so the two cannot drift. The smoke run
(``snakemake --cores all --configfile config/paper_smoke.yaml``) exercises every cell kind
of the paper grid end to end on this CPU in minutes. The rule, applied to ``paper.yaml``:

1. **Datasets.** ``cifar100`` → scikit-learn's ``digits`` (real, shipped with a dependency;
   32 px, a 60 % test split); ``dermnet`` keeps its kind, its options and the official split
   (``split: official``), read from a stand-in tree in the Kaggle layout that the workflow
   writes from digits (``standins:``, 10 classes × 12 train + 6 test images), with a pool of
   ``K × SAMPLES`` images and a test set of ``TEST`` images.
2. **Partitions.** Every partition keeps its key, kind and β; ``K = 3`` clients (FedMIA
   needs two non-target clients), ``SAMPLES`` samples per client (a ``null`` — the whole
   training split — stays ``null`` where the partition only meets a dataset whose training
   split is the official pool of ``K × SAMPLES`` images, so it deals exactly that pool),
   evaluation members ``min(paper's, MEMBERS)`` (Dirichlet: ``DIR_MEMBERS``,
   as skewed shards are small) and ``min(paper's, TEST)`` held-out non-members.
3. **Defenses**, **measure**, **attack** and **report** options: verbatim, every defense
   and strength; the official protocol's draw sizes (``test_slots``, ``client_slots``, in
   ``attack.official`` and in every grid block) are capped by the evaluation pools.
4. **Training.** The paper's optimiser, schedule, batch-size-free options and test cadence;
   ``ROUNDS`` rounds observed every ``OBSERVE`` (round 1 observed for the figures only, as
   the paper's), one local epoch, batch 10. Cells that diverge are results, as in the paper
   grid (unclipped noise σ ≥ 0.1 does).
5. **Grid.** Every block in order with its datasets, partitions and overrides. AlexNet runs
   every block as the paper does (the undefended cells with their three seeds; the CIFAR-100
   stand-in with every defense and strength, Dermnet with the first strength of each defense
   kind); ResNet18 (about 50 times AlexNet's cost per sample here) runs the undefended
   blocks with their first seed only, so both models, both datasets, every partition and
   every defense kind meet at a size that runs here.
6. ``device: cpu``, ``threads: 1``.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
K, SAMPLES, MEMBERS, DIR_MEMBERS, TEST = 3, 20, 10, 4, 40
ROUNDS, OBSERVE = 4, 2
STANDIN = {"train_per_class": 12, "test_per_class": 6, "image_size": 32}
STANDIN_ROOT = "results/standins/dermnet"
#: Paper dataset key → the smoke run's (CIFAR-100 cannot be downloaded here).
DATASETS = {"cifar100": "digits"}
#: Per dataset of a defense block: whether every strength is kept (else the first per kind).
EVERY_STRENGTH = {"cifar100": True, "dermnet": False}
#: The model that runs every block; the others run the undefended blocks' first seed.
FULL_MODEL = "alexnet"


def _dataset(key: str, block: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    if key == "cifar100":
        return DATASETS[key], {"kind": "digits", "image_size": 32, "test_fraction": 0.6}
    if block["kind"] == "dermnet":
        out = {
            **block,
            "root": STANDIN_ROOT,
            "image_size": STANDIN["image_size"],
            "pool_size": K * SAMPLES,
            "test_size": TEST,
        }
        return key, out
    raise ValueError(f"no smoke rule for dataset '{key}' (kind {block['kind']}); add one")


def _partition(block: dict[str, Any], pooled: bool) -> dict[str, Any]:
    out = dict(block, num_clients=K)
    if out.get("samples_per_client") is not None or not pooled:
        out["samples_per_client"] = SAMPLES
    cap = DIR_MEMBERS if out["kind"] == "dirichlet" else MEMBERS
    out["eval_members_per_client"] = min(out["eval_members_per_client"], cap)
    out["eval_nonmembers"] = min(out["eval_nonmembers"], TEST)
    return out


def _official(block: dict[str, Any], members: int) -> dict[str, Any]:
    out = dict(block)
    if out.get("test_slots") is not None:
        out["test_slots"] = min(out["test_slots"], TEST)
    if out.get("client_slots") is not None:
        out["client_slots"] = min(out["client_slots"], members)
    return out


def _first_of_each_kind(keys: list[str], defenses: dict[str, Any]) -> list[str]:
    seen: dict[str, str] = {}
    for key in keys:
        seen.setdefault(defenses[key]["kind"], key)
    return list(seen.values())


def derive(paper: dict[str, Any]) -> dict[str, Any]:
    """The smoke config of ``paper`` (a ``config/paper.yaml`` mapping); see the module doc."""
    paper = copy.deepcopy(paper)
    out: dict[str, Any] = {"device": "cpu", "threads": 1, "standins": {"dermnet": STANDIN}}
    out["datasets"] = dict(_dataset(k, v) for k, v in paper["datasets"].items())
    out["models"] = paper["models"]
    pooled = {k: v.get("pool_size") is not None for k, v in out["datasets"].items()}
    meets: dict[str, set[str]] = {}
    for block in paper["grid"]:
        for part in block["partitions"]:
            meets.setdefault(part, set()).update(DATASETS.get(d, d) for d in block["datasets"])
    out["partitions"] = {
        k: _partition(v, all(pooled[d] for d in meets.get(k, ())))
        for k, v in paper["partitions"].items()
    }
    members = min(p["eval_members_per_client"] for p in out["partitions"].values())
    out["defenses"] = paper["defenses"]
    out["train"] = {
        **paper["train"],
        "rounds": ROUNDS,
        "observe_every": OBSERVE,
        "observe_rounds": [1],
        "local_epochs": 1,
        "batch_size": 10,
    }
    for section in ("measure", "attack", "report"):
        if section in paper:
            out[section] = paper[section]
    if "official" in out.get("attack", {}):
        out["attack"]["official"] = _official(out["attack"]["official"], members)
    grid = []
    for block in paper["grid"]:
        block = dict(block)
        (dataset,) = block["datasets"]
        if block["defenses"] != ["none"]:
            if not EVERY_STRENGTH[dataset]:
                block["defenses"] = _first_of_each_kind(block["defenses"], paper["defenses"])
        block["datasets"] = [DATASETS.get(dataset, dataset)]
        if "official" in block.get("attack", {}):
            block["attack"] = {
                **block["attack"],
                "official": _official(block["attack"]["official"], members),
            }
        others = [m for m in block["models"] if m != FULL_MODEL]
        grid.append({**block, "models": [FULL_MODEL]})
        if others and block["defenses"] == ["none"]:
            grid.append({**block, "models": others, "seeds": block["seeds"][:1]})
    out["grid"] = grid
    return out


HEADER = """\
# GENERATED by config/derive_smoke.py from config/paper.yaml — do not edit; rerun
#   python config/derive_smoke.py > config/paper_smoke.yaml
# (tests/test_paper_smoke.py checks it is current). The paper's grid at tiny sizes: every
# defense and strength, every partition, both models, the official Dermnet split on a
# stand-in tree in the Kaggle layout (written by the workflow from digits), digits standing
# in for CIFAR-100, 3 clients, 4 rounds. A smoke test of the pipeline, not a result:
#   snakemake --cores all --configfile config/paper_smoke.yaml
"""


def render(paper_file: Path = HERE / "paper.yaml") -> str:
    """The text of ``paper_smoke.yaml`` derived from ``paper_file``."""
    smoke = derive(yaml.safe_load(paper_file.read_text()))
    return HEADER + yaml.safe_dump(smoke, sort_keys=False, width=96)


if __name__ == "__main__":
    sys.stdout.write(render())
