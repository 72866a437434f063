# Config validation, the grid of cells, wildcard constraints and get_* helpers.
# Everything here runs when the workflow is parsed: bad input stops the run before
# any job starts.
import dataclasses

from fedmia.core.fingerprint import fingerprint
from fedmia.attacker.attacks import families, outlier_filter_for
from fedmia.core.contracts import PREPARED_FILES
from fedmia.workflow import Cell, canonical, estimate_resources, load_workflow_config

# The schema ships with the package (fedmia/core/config.schema.yaml); its lists of kinds
# are filled from the registries, plugins included.
SPEC = load_workflow_config(config)
# The plugin modules (imported above, before validation): a param of every rule, whose
# job imports them before it builds anything.
PLUGINS = config["plugins"]


def code(stage):
    """Fingerprint of the library code a stage runs (a param: code changes rerun its jobs).

    Read statically from the installed package's source (no import, milliseconds), over
    the stage's entry module and everything it imports, plus torch/numpy/pandas versions,
    and the plugins' source (every job imports them).
    """
    return fingerprint([f"fedmia.stages.{stage}", "fedmia.core.logs"], plugins=PLUGINS)


CELL = "{dataset}/{model}/{defense}/{partition}/seed{seed}"
DATA = "results/data/{dataset}"
DATA_FILES = {key: f"{DATA}/{name}" for key, name in PREPARED_FILES.items()}
PARTITION = "results/partitions/{dataset}/{partition}/seed{seed}.parquet"
TRAIN = f"results/train/{CELL}"
# A recorded cell's server view, imported instead of trained (config recordings:)
IMPORTED = f"results/imported/{CELL}"
MDM = f"results/mdm/{CELL}.parquet"
# The threat views (threat.view) and, with the aggregate view, the aggregate's measures
VIEWS = list(config["threat"]["view"])
MDM_AGGREGATE = f"results/mdm/{CELL}.aggregate.parquet"
FIGURES = f"results/figures/{CELL}"
# Small image trees in an official layout that the workflow writes (config standins:)
STANDINS = "results/standins"
ATTACKS = config["attack"]["attacks"]
# GPUs per train and measure job: 1 when the config asks for CUDA; a cluster profile
# asks for one with device: auto too (set-resources: train: gpu: 1). Attack and report
# jobs never ask for one.
GPU = 1 if config["device"].startswith("cuda") else 0


def _alternatives(keys):
    return "|".join(sorted(keys))


wildcard_constraints:
    dataset=_alternatives(config["datasets"]),
    model=_alternatives(config["models"]),
    defense=_alternatives(config["defenses"]),
    partition=_alternatives(config["partitions"]),
    seed=r"\d+",
    standin=_alternatives(config["standins"]) or "(?!)",


def cell_of(wildcards):
    return Cell(
        wildcards.dataset,
        wildcards.model,
        wildcards.defense,
        wildcards.partition,
        int(wildcards.seed),
    )


def resources_of(stage, what):
    """A function of the wildcards: the estimated ``what`` (runtime, mem_mb) of ``stage``."""

    def get(wildcards):
        gpu = config["device"].startswith("cuda")
        return estimate_resources(SPEC, cell_of(wildcards), gpu=gpu)[stage][what]

    return get


def get_cell(wildcards):
    return dataclasses.asdict(cell_of(wildcards))


def view_folder(cell):
    """The folder of a cell's server view: trained (TRAIN) or imported (IMPORTED)."""
    pattern = IMPORTED if cell in SPEC.recorded else TRAIN
    return pattern.format(**dataclasses.asdict(cell))


def get_view(what):
    """A function of the wildcards: the cell's view file ``what`` (manifest.json, observed)."""
    return lambda wildcards: f"{view_folder(cell_of(wildcards))}/{what}"


def get_cell_partition(wildcards):
    """The partition the measures and attacks read: the partition stage's or the import's."""
    cell = cell_of(wildcards)
    if cell in SPEC.recorded:
        return f"{view_folder(cell)}/partition.parquet"
    return PARTITION.format(**dataclasses.asdict(cell))


def recording_of(wildcards):
    """The recording imported as this cell (a rule of recorded cells only)."""
    cell = cell_of(wildcards)
    if cell not in SPEC.recorded:
        raise ValueError(
            f"cell {cell.path} is trained, not recorded (config recordings:)"
        )
    return SPEC.recorded[cell]


def get_dataset_standin(wildcards):
    """The stand-in tree a dataset reads (its root under STANDINS), if any."""
    root = config["datasets"][wildcards.dataset].get("root") or ""
    name = root[len(STANDINS) + 1 :] if root.startswith(f"{STANDINS}/") else None
    return [root] if name in config["standins"] else []


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


def get_observed_rounds(wildcards):
    return SPEC.observed_rounds(cell_of(wildcards))


def get_attack_params(wildcards):
    """The attack stage's arguments for one cell: its resolved ``attack`` section and the
    choices that depend on its partition."""
    cell = cell_of(wildcards)
    kind = config["partitions"][wildcards.partition]["kind"]
    return {
        "config": SPEC.attack_for(cell),
        "outlier_filter": {
            a: outlier_filter_for(config["attack"]["fedmia_outlier_filter"], a, kind)
            for a in ATTACKS
        },
        "audit": {
            "target": config["partitions"][wildcards.partition]["audit_target"],
            "delta": config["privacy"]["delta"],
        },
    }


def cell_attack_files(cell_pattern=CELL):
    """attack name -> its result file, for the cell ``cell_pattern`` (wildcards or filled)."""
    return {a: f"results/attacks/{cell_pattern}/{a}.parquet" for a in ATTACKS}


def get_all_audits(wildcards=None):
    return cell_paths(f"results/attacks/{CELL}/audit.parquet")


def get_all_replicates(wildcards=None):
    return cell_paths(f"results/attacks/{CELL}/replicates.parquet")


def get_cell_attacks(wildcards):
    return list(cell_attack_files().values())


def get_figure_options():
    """The report options every figure uses (the others do not rerun figures)."""
    return canonical({k: config["report"][k] for k in ("dpi", "width")})


def get_report_options():
    """The report options a per-cell figure uses."""
    return canonical(
        {
            **get_figure_options(),
            "round_plot_fpr": config["report"]["round_plot_fpr"],
            "single_round": SPEC.selections,
        }
    )


def cell_paths(pattern, **extra):
    """``pattern`` filled in for every cell of the grid (and the ``extra`` wildcards)."""
    return [pattern.format(**dataclasses.asdict(c), **extra) for c in SPEC.cells]


def get_all_attacks(wildcards=None):
    return [
        p for a in ATTACKS for p in cell_paths(f"results/attacks/{CELL}/{a}.parquet")
    ]


def get_all_manifests(wildcards=None):
    return [f"{view_folder(c)}/manifest.json" for c in SPEC.cells]


def get_all_oneshot(wildcards=None):
    """Every trained cell's one-shot estimate where the config enables it, else nothing.

    ``ONESHOT_OUTPUTS`` of oneshot.smk (a recorded cell cannot be trained again).
    """
    return ONESHOT_OUTPUTS


def get_families():
    """Attack families with at least one configured attack (privacy-utility figures)."""
    return [f for f, members in families().items() if set(members) & set(ATTACKS)]


def has_defense_strengths():
    """Whether any cell runs a defense other than ``none`` (then Table 2 is written)."""
    return any(config["defenses"][c.defense]["kind"] != "none" for c in SPEC.cells)


def has_audit():
    """Whether any cell's partition plants audit canaries (then the audit figure is drawn)."""
    return any(
        config["partitions"][c.partition]["audit_canaries"] > 0 for c in SPEC.cells
    )


def get_final_output():
    return [
        "results/tables/attacks.csv",
        "results/tables/attacks.md",
        "results/tables/attacks.tex",
        "results/tables/findings.csv",
        "results/figures/partitions.png",
        "results/tables/privacy_utility.csv",
        *(["results/tables/hypervolume.csv"] if has_defense_strengths() else []),
        *(["results/figures/privacy_audit.png"] if has_audit() else []),
        *(["results/tables/secure_aggregation.csv"] if "aggregate" in VIEWS else []),
        *expand("results/figures/privacy_utility_{family}.png", family=get_families()),
        *cell_paths(f"{FIGURES}/rounds.png"),
        *cell_paths(f"{FIGURES}/roc.png"),
    ]
