# Config validation, the grid of cells, wildcard constraints and get_* helpers.
# Everything here runs when the workflow is parsed: bad input stops the run before
# any job starts.
import fedmia
from fedmia.workflow import Cell, canonical, load_workflow_config

SPEC = load_workflow_config(
    config, workflow.source_path("../schemas/config.schema.yaml")
)
VERSION = (
    fedmia.__version__
)  # a param of every rule: a new library version reruns its jobs

CELL = "{dataset}/{model}/{defense}/{partition}/seed{seed}"
DATA = "results/data/{dataset}"
DATA_FILES = {
    "images": f"{DATA}/images.npy",
    "labels": f"{DATA}/labels.npy",
    "is_test": f"{DATA}/is_test.npy",
    "meta": f"{DATA}/meta.json",
}
PARTITION = "results/partitions/{dataset}/{partition}/seed{seed}.parquet"
TRAIN = f"results/train/{CELL}"
GPU = 1 if config["device"].startswith("cuda") else 0


def _alternatives(keys):
    return "|".join(sorted(keys))


wildcard_constraints:
    dataset=_alternatives(config["datasets"]),
    model=_alternatives(config["models"]),
    defense=_alternatives(config["defenses"]),
    partition=_alternatives(config["partitions"]),
    seed=r"\d+",


def cell_of(wildcards):
    return Cell(
        wildcards.dataset,
        wildcards.model,
        wildcards.defense,
        wildcards.partition,
        int(wildcards.seed),
    )


def get_dataset_cfg(wildcards):
    return canonical(config["datasets"][wildcards.dataset])


def get_partition_cfg(wildcards):
    return canonical(config["partitions"][wildcards.partition])


def get_model_cfg(wildcards):
    return canonical(config["models"][wildcards.model])


def get_defense_cfg(wildcards):
    return canonical(config["defenses"][wildcards.defense])


def get_train_cfg(wildcards):
    return SPEC.train_for(cell_of(wildcards))


def get_final_output():
    out = []
    for cell in SPEC.cells:
        out.append(f"results/train/{cell.path}/history.parquet")
        out.append(f"results/train/{cell.path}/final.pt")
    return out
