"""The Snakemake workflow end to end: dry runs, a tiny real run, reruns, bad input."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO, SNAKEMAKE, background_run
from fedmia.attacker.attacks import ATTACKS, finding_attacks
from fedmia.kinds import SCHEMA, load_schema
from fedmia.report.figures import FIGURES
from fedmia.report.findings import FINDINGS_COLUMNS
from fedmia.report.utility import PU_COLUMNS
from fedmia.stages.io import read_replicates

pytestmark = pytest.mark.workflow


def smk(cmd, repo: Path, workdir: Path, configfile: Path | None, *args: str):
    argv = [*cmd, "-s", str(repo / "Snakefile"), "-d", str(workdir), "--cores", "2"]
    if configfile is not None:
        argv += ["--configfile", str(configfile)]
    return subprocess.run(argv + list(args), capture_output=True, text=True, timeout=900)


def job_counts(out: str) -> dict[str, int]:
    """Parse the 'Job stats' table of a (dry) run."""
    table = out.split("Job stats:")[1].split("total")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


@pytest.fixture(scope="module")
def default_dry_run(snakemake_cmd, repo, tmp_path_factory) -> subprocess.CompletedProcess:
    """One dry run of config/config.yaml in an empty directory, read by several tests."""
    wd = tmp_path_factory.mktemp("default_dry_run")
    return smk(snakemake_cmd, repo, wd, repo / "config" / "config.yaml", "-n")


def test_default_config_dry_run(default_dry_run):
    r = default_dry_run
    assert r.returncode == 0, r.stderr
    assert job_counts(r.stdout + r.stderr) == {
        "all": 1,
        "prepare": 1,
        "partition": 2,
        "train": 2,
        "measure": 2,
        "attack": 2,
        "table": 1,
        "figure_rounds": 2,
        "figure_roc": 2,
        "figure_partitions": 1,
        "privacy_utility": 1,
        "figure_privacy_utility": 3,
    }


def without_torch(tmp_path: Path, *folders: Path) -> dict[str, str]:
    """An environment whose ``import torch`` (and matplotlib, dp-accounting) raises, with
    ``folders`` on PYTHONPATH."""
    fake = tmp_path / "fake"
    for name in ("torch", "matplotlib", "dp_accounting"):
        (fake / name).mkdir(parents=True, exist_ok=True)
        (fake / name / "__init__.py").write_text(f"raise ImportError('{name} imported')\n")
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(fake), *map(str, folders), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
    }


def test_parsing_the_workflow_never_imports_torch(snakemake_cmd, repo, tmp_path):
    """Every cluster job re-parses the Snakefile: a torch (or matplotlib, dp-accounting)
    that cannot be imported must not matter to a dry run — of the paper grid, and of a
    config with the toy plugin of docs/extending.md."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "toy_plugin.py").write_text(readme_plugin(repo))
    config = yaml.safe_load((repo / ".test" / "config" / "config.yaml").read_text())
    config.update(
        plugins=["toy_plugin"],
        defenses={"none": {"kind": "none"}, "noisy": {"kind": "input_noise", "std": 0.5}},
    )
    config["datasets"]["parity"] = {"kind": "digits_parity"}
    config["grid"][0].update(datasets=["digits", "parity"], defenses=["none", "noisy"])
    toy = tmp_path / "toy.yaml"
    toy.write_text(yaml.safe_dump(config))
    env = without_torch(tmp_path, plugins)
    for cfg in (repo / "config" / "paper.yaml", toy):
        argv = [
            *snakemake_cmd,
            "-s",
            str(repo / "Snakefile"),
            "-d",
            str(tmp_path / "wd"),
            "--cores",
            "2",
            "--configfile",
            str(cfg),
            "-n",
        ]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def test_every_registered_cell_figure_has_its_rule(default_dry_run):
    """Each per-cell figure kind (fedmia.report.figures.FIGURES) is a rule figure_<kind> whose
    output is results/figures/{cell}/<kind>.png, drawn for every cell; and no other."""
    r = default_dry_run
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    rules = {k.removeprefix("figure_") for k in job_counts(out) if k.startswith("figure_")}
    assert rules - {"partitions", "privacy_utility"} == set(FIGURES.names())
    for kind in FIGURES.names():
        assert f"results/figures/digits/alexnet/none/iid/seed0/{kind}.png" in out, kind


@pytest.fixture(scope="module")
def tiny_run(tiny_workflow):
    """The session's tiny run (conftest): its results are read, reruns planned from it."""
    return tiny_workflow


def test_tiny_end_to_end_run(tiny_run):
    wd, _, r = tiny_run
    for part in ("iid", "dirichlet"):
        cell = wd / "results" / "train" / "digits" / "alexnet" / "none" / part / "seed0"
        h = pd.read_parquet(cell / "history.parquet")
        assert h["round"].max() == 2 and (cell / "final.safetensors").exists()
        assert sorted(p.name for p in (cell / "observed").glob("round*")) == [
            "round0001.safetensors",
            "round0002.safetensors",
        ]
        log = (
            wd / "results" / "logs" / "train" / "digits" / "alexnet" / "none" / part / "seed0.log"
        ).read_text()
        assert "round 2/2" in log and "samples/s" in log
    assert (wd / "results" / "partitions" / "digits" / "iid" / "seed0.parquet").exists()
    tables = wd / "results" / "tables"
    table = pd.read_csv(tables / "attacks.csv")
    uploads = {a for a in ATTACKS.names() if "uploads" in ATTACKS.get(a).views}
    assert set(table.attack) == uploads  # the paper's, LiRA's and RMIA's (threat.view: uploads)
    assert set(table.metric) == {"auc", "tpr@0.1%", "tpr@1%", "tpr@10%", "balanced_accuracy"}
    assert set(table.protocol) == {"aligned", "official", "heldout"}
    calibrated = table[table.attack.str.startswith(("lira", "rmia")) & (table.metric == "auc")]
    assert calibrated["mean"].notna().all() and calibrated["ci_low"].notna().all()
    assert set(calibrated.protocol) == {"aligned", "official", "heldout"}
    default = load_schema(SCHEMA)["properties"]["report"]["properties"]["single_round"]
    assert set(table.single_round) == {*default["default"], "all attacked rounds"}
    keys = ["dataset", "model", "defense", "partition", "protocol", "single_round", "attack"]
    assert not table.duplicated([*keys, "view", "membership", "metric"]).any()
    # the uploads view at both membership levels: the federation level for the attacks of
    # one upload at a time (single-round and series), the strongest upload per sample
    assert set(zip(table.view, table.membership, strict=True)) == {
        ("uploads", "client"),
        ("uploads", "federation"),
    }
    federation = {a for a in uploads if ATTACKS.get(a).kind in ("single", "series")}
    assert set(table[table.membership == "federation"].attack) == federation
    assert set(table.fpr_rule) == {"at_most"}
    md = (tables / "attacks.md").read_text()
    assert "Loss-III (FedMIA-I)" in md and "### protocol official" in md
    assert "FPR resolution 1/" in md and "picked with hindsight" in md
    assert "lira_conf_cos_sum" in md and "rounds and measures are correlated" in md
    assert "### protocol heldout" in md
    assert r"\toprule" in (tables / "attacks.tex").read_text()
    # the replicates of the finding attacks reach the findings: one seed, so every defined
    # verdict is a within-run statement
    reps = read_replicates(
        wd
        / "results"
        / "attacks"
        / "digits"
        / "alexnet"
        / "none"
        / "iid"
        / "seed0"
        / "replicates.parquet"
    )
    assert set(reps.attack) == set(finding_attacks())
    found = pd.read_csv(tables / "findings.csv")
    assert list(found.columns) == list(FINDINGS_COLUMNS)
    auc = found[found.metric == "auc"]  # (TPR@0.1 % is undefined on 30 non-members)
    assert set(auc.method) == {"joint bootstrap, 1 run"} and set(auc.n_runs) == {1}
    assert auc.verdict.str.endswith("(1 run)").all()
    pu = pd.read_csv(tables / "privacy_utility.csv")
    assert list(pu.columns) == list(PU_COLUMNS)
    assert pu.test_accuracy.between(0, 1).all()
    for f in (
        "partitions.png",
        "partitions.pdf",
        "privacy_utility_cos.png",
        "digits/alexnet/none/iid/seed0/rounds.png",
        "digits/alexnet/none/iid/seed0/roc.pdf",
    ):
        assert (wd / "results" / "figures" / f).stat().st_size > 1000
    assert "round 1/2" in r.stderr  # progress reaches the terminal too


def test_report_jobs_import_no_torch(snakemake_cmd, repo, tiny_run, tmp_path):
    """Every report job runs with a torch that raises on import (report jobs start fast).

    In a copy of the session's run: forcing ``hypervolume`` writes a table the tiny config
    does not ask for, and the shared run's results must stay as its run wrote them."""
    shared, cfg, _ = tiny_run
    wd = tmp_path / "wd"
    shutil.copytree(shared, wd, symlinks=True)
    fake = tmp_path / "fake" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('torch imported by a report job')\n")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(fake.parent), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
    }
    rules = [
        "table",
        "figure_rounds",
        "figure_roc",
        "figure_partitions",
        "privacy_utility",
        "figure_privacy_utility",
        "hypervolume",
    ]
    argv = [
        *snakemake_cmd,
        "-s",
        str(repo / "Snakefile"),
        "-d",
        str(wd),
        "--cores",
        "2",
        "--configfile",
        str(cfg),
        "--forcerun",
        *rules,
    ]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert set(job_counts(r.stdout + r.stderr)) - {"all"} == set(rules)


def test_second_run_does_nothing(snakemake_cmd, repo, tiny_run):
    wd, cfg, _ = tiny_run
    r = smk(snakemake_cmd, repo, wd, cfg)
    assert r.returncode == 0 and "Nothing to be done" in r.stdout + r.stderr


def test_changing_one_cells_training_reruns_only_that_cell(snakemake_cmd, repo, tiny_run):
    wd, cfg, _ = tiny_run
    config = yaml.safe_load(cfg.read_text())
    block = config["grid"][0]
    config["grid"] = [
        {**block, "partitions": ["iid"]},
        {**block, "partitions": ["dirichlet"], "train": {"lr": 0.02}},
    ]
    changed = wd / "changed.yaml"
    changed.write_text(yaml.safe_dump(config))
    r = smk(snakemake_cmd, repo, wd, changed, "-n")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert job_counts(out) == {
        "all": 1,
        "train": 1,
        "measure": 1,
        "attack": 1,
        "table": 1,
        "figure_rounds": 1,
        "figure_roc": 1,
        "figure_partitions": 1,
        "privacy_utility": 1,
        "figure_privacy_utility": 3,
    }
    assert "partition=dirichlet" in out and "partition=iid" not in out


def rerun_with(snakemake_cmd, repo, tiny_run, section: str, change: dict) -> dict[str, int]:
    wd, cfg, _ = tiny_run
    config = yaml.safe_load(cfg.read_text())
    config.setdefault(section, {}).update(change)
    changed = wd / f"changed_{section}.yaml"
    changed.write_text(yaml.safe_dump(config))
    r = smk(snakemake_cmd, repo, wd, changed, "-n")
    assert r.returncode == 0, r.stdout + r.stderr
    return job_counts(r.stdout + r.stderr)


def test_changing_a_figure_option_reruns_only_figures(snakemake_cmd, repo, tiny_run):
    counts = rerun_with(snakemake_cmd, repo, tiny_run, "report", {"dpi": 80})
    assert counts == {
        "all": 1,
        "figure_rounds": 2,
        "figure_roc": 2,
        "figure_partitions": 1,
        "figure_privacy_utility": 3,
    }


def test_changing_an_attack_option_reruns_attacks_and_report(snakemake_cmd, repo, tiny_run):
    counts = rerun_with(snakemake_cmd, repo, tiny_run, "attack", {"targets": [0, 1]})
    assert counts == {
        "all": 1,
        "attack": 2,
        "table": 1,
        "figure_rounds": 2,
        "figure_roc": 2,
        "figure_partitions": 1,
        "privacy_utility": 1,
        "figure_privacy_utility": 3,
    }


def test_html_report_builds_offline(snakemake_cmd, repo, tiny_run):
    wd, cfg, _ = tiny_run
    r = smk(snakemake_cmd, repo, wd, cfg, "--report", str(wd / "report.html"))
    assert r.returncode == 0, r.stdout + r.stderr
    html = (wd / "report.html").read_text(errors="replace")
    assert "attacks.csv" in html and "rounds.png" in html


def test_slurm_profile_dry_run(snakemake_cmd, repo, tmp_path):
    pytest.importorskip("snakemake_executor_plugin_slurm")
    r = smk(
        snakemake_cmd,
        repo,
        tmp_path,
        repo / ".test" / "config" / "config.yaml",
        "-n",
        "--profile",
        str(repo / "profiles" / "slurm"),
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert job_counts(r.stdout + r.stderr)["train"] == 2


def test_defense_sweep_dry_run(snakemake_cmd, repo, tmp_path):
    r = smk(snakemake_cmd, repo, tmp_path, repo / "config" / "defenses.yaml", "-n")
    assert r.returncode == 0, r.stdout + r.stderr
    counts = job_counts(r.stdout + r.stderr)
    assert counts["train"] == 37 and counts["privacy_utility"] == 1
    assert counts["hypervolume"] == 1


def test_paper_grid_dry_run_without_data(snakemake_cmd, repo, tmp_path):
    r = smk(snakemake_cmd, repo, tmp_path, repo / "config" / "paper.yaml", "-n")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout + r.stderr
    counts = job_counts(out)
    # 2 datasets × 2 models × (3 partitions × 3 seeds + 39 defense strengths) = 192 cells
    assert counts["train"] == 192 and counts["attack"] == 192 and counts["prepare"] == 2
    assert counts["hypervolume"] == 1 and counts["table"] == 1
    config = yaml.safe_load((repo / "config" / "paper.yaml").read_text())
    for key in config["defenses"]:  # every strength is planned, on both datasets
        for dataset in ("cifar100", "dermnet"):
            assert f"results/train/{dataset}/alexnet/{key}/" in out, key


def merged(base: dict, over: dict) -> dict:
    """``over`` merged over ``base`` as Snakemake merges a --configfile over the Snakefile's:
    mappings recursively, everything else (lists such as ``grid``) replaced."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = (
            merged(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else copy.deepcopy(value)
        )
    return out


#: Issue 18's config, tried as a new user would: a defense that diverges before its first
#: attacked round (round 2; round 1 is observed for the figures only).
EARLY_DIVERGENCE = yaml.safe_load("""
partitions: {iid: {kind: iid, num_clients: 3, samples_per_client: 20,
                   eval_members_per_client: 10, eval_nonmembers: 20}}
defenses: {none: {kind: none}, pn_huge: {kind: dp_param_noise, sigma: 5.0}}
train: {rounds: 4, local_epochs: 1, batch_size: 10, lr: 0.05, observe_every: 2}
grid: [{datasets: [digits], models: [alexnet], defenses: [none, pn_huge], partitions: [iid],
        seeds: [0]}]
""")


@background_run("diverging_run")
def _diverging_run(tmp: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """Issue 18's config over config/config.yaml, with `noisy` added (below): ``(working
    directory, completed snakemake)``."""
    config = merged(yaml.safe_load((REPO / "config" / "config.yaml").read_text()), EARLY_DIVERGENCE)
    config["defenses"]["noisy"] = {"kind": "dp_param_noise", "sigma": 1.0}
    config["grid"].append(
        {**config["grid"][0], "defenses": ["noisy"], "train": {"rounds": 3, "observe_every": 1}}
    )
    cfg = tmp / "diverge.yaml"
    cfg.write_text(yaml.safe_dump(config))
    wd = tmp / "wd"
    return wd, smk(list(SNAKEMAKE), REPO, wd, cfg)


@pytest.fixture(scope="module")
def diverging_run(background_runs) -> tuple[Path, subprocess.CompletedProcess]:
    """:func:`_diverging_run`, run in the session's background queue (conftest)."""
    return background_runs.result("diverging_run")


def test_diverging_defense_cells_are_flagged_results(diverging_run):
    """Defenses that break the model finish the workflow, write every table and figure, and
    are flagged: `pn_huge` (issue 18's config over config/config.yaml) diverges before its
    first attacked round — figures say why they are empty, tables show n/a; `noisy` diverges
    in round 2 after an attacked round 1 (utility chance, attacks on round 1 only)."""
    wd, r = diverging_run
    assert r.returncode == 0, r.stderr[-3000:]
    cells = "results/train/digits/alexnet/{}/iid/seed0/manifest.json"
    huge = json.loads((wd / cells.format("pn_huge")).read_text())
    assert huge["diverged_round"] == 2 and huge["observed_rounds"] == [1]
    man = json.loads((wd / cells.format("noisy")).read_text())
    assert man["diverged_round"] == 2 and man["observed_rounds"] == [1]
    pu = pd.read_csv(wd / "results" / "tables" / "privacy_utility.csv")
    for key in ("pn_huge", "noisy"):
        flagged = pu[pu.defense == key]
        assert flagged.diverged.all() and (flagged.diverged_round == 2).all()
        assert np.allclose(flagged.test_accuracy, 0.1)  # chance, 10 classes
        assert (flagged.last_finite_accuracy > 0).all()
    assert not pu[pu.defense == "none"].diverged.any()
    assert pu[pu.defense == "pn_huge"]["mean"].isna().all()  # n/a: nothing attacked
    multi = pu[(pu.defense == "noisy") & (pu.attack == "cos_series")]
    assert set(multi.rounds.astype(str)) == {"1"}  # one round instead of three
    table = pd.read_csv(wd / "results" / "tables" / "attacks.csv")
    for key in ("pn_huge", "noisy"):
        assert (table[table.defense == key].diverged == "seed 0 diverged in round 2").all()
    md = (wd / "results/tables/attacks.md").read_text()
    assert "diverged in round 2" in md and "n/a where training diverged before the first" in md
    figures = wd / "results" / "figures"
    for name in ("rounds", "roc"):
        for ext in ("png", "pdf"):
            assert (figures / "digits/alexnet/pn_huge/iid/seed0" / f"{name}.{ext}").stat().st_size
    hv = pd.read_csv(wd / "results" / "tables" / "hypervolume.csv")
    # with few non-members TPR@0.1% is undefined for every point: each front is n/a, not 0
    assert set(hv.kind) == {"dp_param_noise"} and hv.hypervolume.isna().all()


# ------------------------------------------------------- code changes rerun what they affect


def _code_edit_reruns(snakemake_cmd, repo, tiny_run, tmp_path, module: str) -> dict[str, int]:
    """Counts of a dry run after a real code edit in ``module`` of a copy of the package."""
    wd, cfg, _ = tiny_run
    src = tmp_path / "src"
    shutil.copytree(
        repo / "src" / "fedmia", src / "fedmia", ignore=shutil.ignore_patterns("__pycache__")
    )
    env = {**os.environ, "PYTHONPATH": str(src)}
    if module:
        f = src / "fedmia" / f"{module}.py"
        f.write_text(f.read_text() + "\n_EDITED = True  # a code change, not a comment\n")
    argv = [
        *snakemake_cmd,
        "-s",
        str(repo / "Snakefile"),
        "-d",
        str(wd),
        "--cores",
        "2",
        "--configfile",
        str(cfg),
        "-n",
    ]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    return {} if "Nothing to be done" in out else job_counts(out)


REPORT_JOBS = {
    "table": 1,
    "figure_rounds": 2,
    "figure_roc": 2,
    "figure_partitions": 1,
    "privacy_utility": 1,
    "figure_privacy_utility": 3,
    "all": 1,
}


@pytest.mark.parametrize(
    "module, expected",
    [
        ("", {}),  # the same code from another path: nothing to do
        ("report/tables", REPORT_JOBS),
        ("attacker/metrics", {"attack": 2, **REPORT_JOBS}),  # no training (issue 19)
        ("privacy/audit", {"attack": 2, **REPORT_JOBS}),  # no partition, no training
        ("federation/fedavg", {"train": 2, "measure": 2, "attack": 2, **REPORT_JOBS}),
    ],
)
def test_code_edits_rerun_exactly_what_they_affect(
    snakemake_cmd, repo, tiny_run, tmp_path, module, expected
):
    assert _code_edit_reruns(snakemake_cmd, repo, tiny_run, tmp_path, module) == expected


def job_resources(out: str) -> list[tuple[str, dict[str, str]]]:
    """(rule, resources) of every job a dry run lists."""
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", out):
        m = re.match(r"(?:local)?rule (\w+):", block)
        res = re.search(r"^\s+resources: (.*)$", block, re.M)
        if m:
            pairs = dict(kv.split("=", 1) for kv in res[1].split(", ")) if res else {}
            jobs.append((m[1], pairs))
    return jobs


def test_cluster_jobs_ask_for_gpus_and_scaled_resources(snakemake_cmd, repo, tmp_path):
    """A profile that asks for GPUs gets them for train and measure jobs also with
    device: auto; attack and report jobs never ask; runtime and memory scale with the
    model and data (that report jobs run locally is checked on a real SLURM,
    tests/test_slurm.py)."""
    profile = tmp_path / "profile"
    profile.mkdir()
    (profile / "config.yaml").write_text(
        "set-resources:\n  train:\n    gpu: 1\n  measure:\n    gpu: 1\n"
    )
    config = yaml.safe_load((repo / "config" / "paper.yaml").read_text())
    config["device"] = "auto"
    cfg = tmp_path / "auto.yaml"
    cfg.write_text(yaml.safe_dump(config))
    pytest.importorskip("snakemake_executor_plugin_slurm")
    r = smk(
        snakemake_cmd,
        repo,
        tmp_path / "wd",
        cfg,
        "-n",
        "--profile",
        str(profile),
        "--executor",
        "slurm",
        "--jobs",
        "10",
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    jobs = job_resources(out)
    by_rule: dict[str, list[dict[str, str]]] = {}
    for rule, res in jobs:
        by_rule.setdefault(rule, []).append(res)
    assert all(res.get("gpu") == "1" for res in by_rule["train"] + by_rule["measure"])
    assert not any(
        "gpu" in res and res["gpu"] != "0" for rule, res in jobs if rule not in ("train", "measure")
    )
    runtime = {}
    # one block per job (a job's wildcards and resources follow its rule line)
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", out):
        if not block.startswith("rule train:"):
            continue
        m = re.search(
            r"wildcards: dataset=(\w+), model=(\w+), defense=none, partition=(\w+)", block
        )
        if m:
            runtime[m.groups()] = int(re.search(r"runtime=(\d+)", block)[1])
    assert runtime[("cifar100", "resnet18", "iid")] > runtime[("cifar100", "alexnet", "iid")]
    assert runtime[("cifar100", "alexnet", "iid")] > runtime[("dermnet", "alexnet", "derm_iid")]


# ------------------------------------------------------------------------------ plugins


def readme_plugin(repo: Path) -> str:
    """The toy plugin of docs/extending.md (between its markers)."""
    text = (repo / "docs" / "extending.md").read_text()
    m = re.search(r"<!-- toy-plugin -->\n```python\n(.*?)```\n<!-- /toy-plugin -->", text, re.S)
    assert m, "docs/extending.md lost its toy plugin (the <!-- toy-plugin --> block)"
    return m.group(1)


@background_run("plugin_run")
def _plugin_run(tmp: Path):
    """The tiny workflow with the toy plugin of docs/extending.md (a temp dir on PYTHONPATH): a
    dataset, a defense and an attack that fedmia does not know, the defense alone and as a
    compose step. ``(tmp, working directory, config, run(configfile, *args), completed
    snakemake)``."""
    repo = REPO
    (tmp / "plugins").mkdir()
    (tmp / "plugins" / "toy_plugin.py").write_text(readme_plugin(repo))
    config = yaml.safe_load((repo / ".test" / "config" / "config.yaml").read_text())
    config["plugins"] = ["toy_plugin"]
    config["defenses"].update(
        {
            "noisy": {"kind": "input_noise", "std": 0.5},
            "noisy_sub": {
                "kind": "compose",
                "steps": [{"kind": "input_noise"}, {"kind": "subsample", "fraction": 0.5}],
                "strength": "input_noise.std",
            },
        }
    )
    config["attack"] = {
        "attacks": ["loss", "loss_series", "confidence_series"],
        "protocol": "aligned",
    }
    config["datasets"]["parity"] = {"kind": "digits_parity"}
    config["grid"][0].update(defenses=["none", "noisy", "noisy_sub"], partitions=["iid"])
    config["grid"].append(
        {
            "datasets": ["parity"],
            "models": ["alexnet"],
            "defenses": ["none"],
            "partitions": ["iid"],
            "seeds": [0],
        }
    )
    cfg = tmp / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(tmp / "plugins"), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
    }
    wd = tmp / "wd"

    def run(configfile: Path, *args: str) -> subprocess.CompletedProcess:
        argv = [
            *SNAKEMAKE,
            "-s",
            str(repo / "Snakefile"),
            "-d",
            str(wd),
            "--cores",
            "2",
            "--configfile",
            str(configfile),
            *args,
        ]
        return subprocess.run(argv, capture_output=True, text=True, timeout=900, env=env)

    return tmp, wd, config, run, run(cfg)


@pytest.fixture(scope="module")
def plugin_run(background_runs):
    """:func:`_plugin_run`, run in the session's background queue (conftest), once it
    succeeded: ``(tmp, working directory, config, run(configfile, *args))``."""
    tmp, wd, config, run, r = background_runs.result("plugin_run")
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, wd, config, run


def test_a_plugin_dataset_defense_and_attack_run_end_to_end(plugin_run):
    _, wd, _, _ = plugin_run
    tables = wd / "results" / "tables"
    table = pd.read_csv(tables / "attacks.csv")
    assert set(table.attack) == {"loss", "loss_series", "confidence_series"}
    assert set(table.defense) == {"none", "noisy", "noisy_sub"}
    assert set(table.dataset) == {"digits", "parity"}
    meta = json.loads((wd / "results" / "data" / "parity" / "meta.json").read_text())
    assert meta["kind"] == "digits_parity" and meta["classes"] == ["even", "odd"]
    conf = table[(table.attack == "confidence_series") & (table.metric == "auc")]
    conf = conf[conf.membership == "client"]  # the federation level has its own rows
    assert len(conf) == 4 and conf["mean"].between(0, 1).all()
    assert (conf.single_round == "all attacked rounds").all()  # a multi-round attack
    assert "confidence_series" in (tables / "attacks.md").read_text()
    pu = pd.read_csv(tables / "privacy_utility.csv")
    strength = pu.drop_duplicates("defense").set_index("defense")
    assert strength.loc["noisy", "kind"] == "input_noise"
    assert strength.loc["noisy", "strength"] == 0.5
    assert strength.loc["noisy_sub", "strength"] == 0.1  # the step's default std
    assert pd.isna(strength.loc["noisy", "params"])  # "" (nothing but the strength) in a CSV
    assert strength.loc["noisy_sub", "params"] == "input_noise + subsample(fraction=0.5)"
    hv = pd.read_csv(tables / "hypervolume.csv")
    assert {"input_noise", "compose"} <= set(hv.kind)
    # its own privacy-utility figure: the family is the plugin attack's
    assert (wd / "results" / "figures" / "privacy_utility_confidence.png").stat().st_size > 1000
    # the noise reached training: the noisy cell's uploads differ from the undefended one's
    obs = "results/train/digits/alexnet/{}/iid/seed0/observed/round0002.safetensors"
    assert (wd / obs.format("none")).read_bytes() != (wd / obs.format("noisy")).read_bytes()


def test_plugin_kinds_are_validated_before_any_job(plugin_run):
    tmp, _, config, run = plugin_run
    bad = copy.deepcopy(config)
    bad["defenses"]["noisy"]["std"] = -1
    cfg = tmp / "bad.yaml"
    cfg.write_text(yaml.safe_dump(bad))
    r = run(cfg, "-n")
    assert r.returncode != 0
    assert "invalid config at 'defenses.noisy.std': -1 is less than the minimum of 0" in (
        r.stdout + r.stderr
    )
    bad = copy.deepcopy(config)
    bad["datasets"]["parity"]["root"] = "/data"
    cfg.write_text(yaml.safe_dump(bad))
    r = run(cfg, "-n")
    assert r.returncode != 0
    assert "'digits_parity' is built from scikit-learn's digits and reads no files; drop root" in (
        r.stdout + r.stderr
    )


def test_a_plugin_code_change_reruns_what_imports_it(plugin_run):
    tmp, _, _, run = plugin_run
    r = run(tmp / "config.yaml", "-n")
    assert "Nothing to be done" in r.stdout + r.stderr
    plugin = tmp / "plugins" / "toy_plugin.py"
    original = plugin.read_text()
    try:
        plugin.write_text(original + "\n_EDITED = True  # a code change, not a comment\n")
        r = run(tmp / "config.yaml", "-n")
        counts = job_counts(r.stdout + r.stderr)
        assert r.returncode == 0 and counts["prepare"] == 2, counts
        assert counts["train"] == 4 and counts["attack"] == 4, counts
    finally:
        plugin.write_text(original)
