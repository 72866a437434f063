"""The benchmark scripts run (--smoke) and end with their machine-readable lines."""

from __future__ import annotations

import math
import subprocess
import sys

import pandas as pd
import pytest

from fedmia.attacker.attacks import ATTACKS, run_attacks
from fedmia.report.tables import summarize
from fedmia.stages import io
from test_attacks import world

LINES = {
    "measures.py": ["speedup_vs_naive", "cost_vs_floor", "cost_vs_floor_cpu", "peak_rss_mb"],
    "train.py": [
        "fl_overhead",
        "fl_overhead_observed",
        "fl_overhead_cpu",
        "fedavg_samples_per_s",
        "central_samples_per_s",
    ],
}


@pytest.mark.parametrize("script", sorted(LINES))
def test_bench_smoke(repo, script):
    r = subprocess.run(
        [sys.executable, str(repo / "bench" / script), "--smoke", "--device", "cpu"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    values = dict(
        line.split("=", 1)
        for line in r.stdout.splitlines()
        if "=" in line and " " not in line.split("=", 1)[0]
    )
    for key in LINES[script]:
        assert key in values, r.stdout
    v = {k: float(values[k]) for k in LINES[script]}
    assert all(math.isfinite(x) for x in v.values()), v
    assert all(x > 0 for k, x in v.items() if "overhead" not in k), v
    assert values["device"] == "cpu"
    # the machine lines are the ratios of the medians in the printed table
    width = {"measures.py": 8, "train.py": 6}[script]
    table = {
        row.split()[0]: row.split() for row in r.stdout.splitlines() if len(row.split()) == width
    }
    if script == "measures.py":
        ms = {route: float(table[route][5]) for route in ("fedmia", "naive", "floor")}
        assert v["speedup_vs_naive"] == pytest.approx(ms["naive"] / ms["fedmia"], rel=2e-2)
        assert v["cost_vs_floor"] == pytest.approx(ms["fedmia"] / ms["floor"], rel=2e-2)
        assert "fedmia vs naive, max |a−b|/max|b|" in r.stdout  # the agreement was checked
    else:
        routes = ("fedavg", "fedavg_observed", "central")
        med = {route: float(table[route][1]) for route in routes}
        cpu = {route: float(table[route][5]) for route in routes}
        rate = float(table["fedavg"][4])
        assert v["fedavg_samples_per_s"] == pytest.approx(rate, rel=1e-2)
        assert v["fl_overhead"] == pytest.approx(med["fedavg"] / med["central"] - 1, rel=1e-2)
        assert v["fl_overhead_observed"] == pytest.approx(
            med["fedavg_observed"] / med["central"] - 1, rel=1e-2
        )
        assert v["fl_overhead_cpu"] == pytest.approx(cpu["fedavg"] / cpu["central"] - 1, rel=1e-2)


def test_bootstrap_coverage_smoke(repo):
    """The coverage simulation runs and prints each method's coverage at S = 3 and S = 1."""
    r = subprocess.run(
        [sys.executable, str(repo / "bench" / "bootstrap.py"), "--coverage", "--smoke"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    values = dict(
        line.split("=", 1)
        for line in r.stdout.splitlines()
        if "=" in line and " " not in line.split("=", 1)[0]
    )
    for method in ("old_s3", "t_s3", "old_s1", "joint_s1", "joint+targets_s1"):
        for metric in ("auc", "tpr@0.1%"):
            assert 0 <= float(values[f"coverage_runs_{method}_{metric}"]) <= 1
    assert "within-run" in r.stdout and "population" in r.stdout


def machine_lines(out: str) -> dict[str, str]:
    """The ``key=value`` lines of a benchmark's output."""
    return dict(
        line.split("=", 1)
        for line in out.splitlines()
        if "=" in line and " " not in line.split("=", 1)[0]
    )


def test_startup_smoke(repo):
    """Every job kind's start-up is timed, and the report and attack jobs import no torch."""
    r = subprocess.run(
        [sys.executable, str(repo / "bench" / "startup.py"), "--smoke"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    values = machine_lines(r.stdout)
    scripts = sorted(p.stem for p in (repo / "workflow" / "scripts").glob("*.py"))
    for name in ("python", "preamble", *scripts):
        assert float(values[f"startup_s_{name}"]) > 0, name
    imports = {
        row.split()[0]: row.split()[-1] for row in r.stdout.splitlines() if len(row.split()) == 5
    }
    assert "torch" in imports["train"] and "torch" in imports["measure"]
    for name in (
        "attack",
        "table",
        "figure_cell",
        "figure_table",
        "hypervolume",
        "privacy_utility",
    ):
        assert "torch" not in imports[name], (name, imports[name])


def test_attack_stage_smoke(repo, tmp_path):
    """The attack stage runs on a synthetic table of the paper cell's shape (scaled down)."""
    r = subprocess.run(
        [
            sys.executable,
            str(repo / "bench" / "attack_stage.py"),
            "--smoke",
            "--keep",
            str(tmp_path),
        ],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    values = machine_lines(r.stdout)
    assert int(values["attack_rows"]) == 31 * 10 * (10 * 50 + 100)  # rounds × clients × N
    assert float(values["attack_stage_s"]) >= float(values["attack_attacks_s"]) > 0
    assert float(values["attack_cpu_s"]) > 0
    assert float(values["attack_peak_rss_mb"]) > 0
    tables = sorted(p.stem for p in (tmp_path / "out").glob("*.parquet"))
    assert "replicates" in tables and len(tables) > 1
    assert int(values["attack_result_rows"]) > 0


def test_attacks_bench_prints_every_attack_sorted_with_intervals(repo, tmp_path):
    """bench/attacks.py on a run directory: per setting and protocol, every attack sorted by
    TPR@1 %, its three metrics with intervals, the attack stage's time, the RMIA sweep."""
    mdm, owner = world(0.5, k=4, per_client=30, held_out=150, seed=2)
    uploads = [a for a in ATTACKS.names() if "uploads" in ATTACKS.get(a).views]
    res = run_attacks(uploads, mdm, owner, n_boot=20)
    cell = dict(dataset="digits", model="alexnet", defense="none", partition="iid", seed=0)
    results = pd.concat([r.assign(**cell, attack=name) for name, r in res.items()])
    # rows of another membership level (as a run with threat views has), every AUC 0: not
    # in the tables (averaged in, they would halve every AUC)
    other = results.assign(membership="federation", target=-1, auc=0.0)
    client = summarize(results, ["last"])
    results = pd.concat([results, other])
    tables = tmp_path / "results" / "tables"
    tables.mkdir(parents=True)
    summarize(results, ["last"]).to_csv(tables / "attacks.csv", index=False)
    bench = tmp_path / "results" / "benchmarks" / "attack" / "digits" / "alexnet" / "none"
    bench.mkdir(parents=True)
    (bench / "iid.tsv").write_text("s\th:m:s\n12.5\t0:00:12\n")
    mdm_file = (
        tmp_path / "results" / "mdm" / "digits" / "alexnet" / "none" / "iid" / "seed0.parquet"
    )
    mdm_file.parent.mkdir(parents=True)
    io.write_parquet(mdm, mdm_file, "measures")
    part = pd.DataFrame({"sample_id": owner.index, "client_id": owner.to_numpy(), "eval": True})
    part_file = tmp_path / "results" / "partitions" / "digits" / "iid" / "seed0.parquet"
    part_file.parent.mkdir(parents=True)
    io.write_parquet(part, part_file, "partition")
    r = subprocess.run(
        [sys.executable, str(repo / "bench" / "attacks.py"), str(tmp_path), "--rmia-a", "0", "1"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    for protocol in ("aligned", "official", "heldout"):
        section = out.split(f"digits/alexnet/none/iid/{protocol} — sorted by tpr@1%")[1]
        section = section.split("\n\n")[0]
        labels = [line[:36].strip() for line in section.splitlines()[2:]]
        assert len(labels) == len(uploads)  # single-round ones at `last`
        assert "Loss-I (Blackbox-Loss) @ last" in labels and "lira_conf_cos_sum" in labels
        col = [line[62:88].split()[0] for line in section.splitlines()[2:]]  # TPR@1 %
        values = [float(v.rstrip("*")) for v in col if v != "n/a"]
        assert values == sorted(values, reverse=True)
        assert "[" in section  # intervals
        auc = client[
            (client.protocol == protocol)
            & (client.attack == "loss")
            & (client.single_round == "last")
            & (client.metric == "auc")
        ]["mean"].iloc[0]
        loss = next(line for line in section.splitlines() if line.startswith("Loss-I (B"))
        assert loss[88:].split()[0] == f"{auc:.3f}"  # the client level's AUC alone
    values = dict(
        line.split("=", 1)
        for line in out.splitlines()
        if "=" in line and " " not in line.split("=", 1)[0]
    )
    assert values["attack_stage_s"] == "12.5"
    assert values["strongest_digits_alexnet_none_iid_aligned"] in ATTACKS.names()
    assert "RMIA sensitivity to a" in out and out.count("rmia_sum") >= 4
    bad = subprocess.run(
        [sys.executable, str(repo / "bench" / "attacks.py"), str(tmp_path / "x")],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "give the directory of a finished run" in bad.stderr


def test_gpu_check_smoke_on_cpu(repo, tmp_path):
    """The GPU check, on the CPU at smoke size: every step runs, the deterministic reruns are
    byte-identical and the device-vs-CPU AUCs agree (trivially here: both are the CPU)."""
    r = subprocess.run(
        [
            sys.executable,
            str(repo / "bench" / "gpu_check.py"),
            "--device",
            "cpu",
            "--smoke",
            "--out",
            str(tmp_path / "check"),
        ],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    values = machine_lines(r.stdout)
    for name in (
        "data",
        "prepare",
        "train_measure",
        "train_measure_again",
        "measure_cpu",
        "agreement",
        "attack",
        "bench_measures",
        "bench_train",
    ):
        assert float(values[f"gpu_check_{name}_s"]) >= 0, name
    assert values["gpu_check_identical"] == "1"
    assert float(values["gpu_check_auc_max_diff"]) == 0.0
    assert values["device"] == "cpu"
    assert (tmp_path / "check" / "attacks" / "loss.parquet").stat().st_size > 0
