"""Benchmark: every attack of a run, strongest first, with intervals, under each protocol.

Reads a run directory's ``results/tables/attacks.csv`` (the report stage's summary: the
mean over targets and seeds of each metric with its 95 % bootstrap interval) and prints,
per setting (dataset, model, defense, partition) and protocol, every attack — single-round
ones once per ``report.single_round`` selection — with TPR@0.1 %, TPR@1 % and AUC as
``mean [low, high]``, sorted by ``--sort`` (TPR@1 % by default; ties by the AUC). A TPR
that rests on fewer than 10 false positives is marked ``*``. Then the attack stage's
wall time per cell (``results/benchmarks/attack/``), when the run kept its benchmarks.

``--rmia-a A [A …]`` adds a sensitivity table of RMIA's ``a`` (never a choice: the runs use
the config's fixed value): the two RMIA attacks rerun on each cell's measure table
(aligned and heldout protocols, no bootstrap), the mean AUC and TPR@1 % over targets per
value.

The last lines are machine-readable: ``strongest_<setting>_<protocol>=<attack>`` (by the
sort metric) and ``attack_stage_s=<total seconds>`` (when benchmarks exist).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd

from fedmia.attacker.attacks import run_attacks
from fedmia.attacker.calibrated import RmiaOptions
from fedmia.core.contracts import tpr_metric_name
from fedmia.report.tables import ALL_ROUNDS, SETTING, attack_label, paper_rows
from fedmia.stages import io

METRICS = (tpr_metric_name(0.001), tpr_metric_name(0.01), "auc")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "run",
        nargs="?",
        default=".",
        type=Path,
        help="run directory (holds results/tables/attacks.csv)",
    )
    p.add_argument(
        "--sort",
        choices=METRICS,
        default=tpr_metric_name(0.01),
        help="metric the attacks are sorted by (descending)",
    )
    p.add_argument(
        "--selection",
        action="append",
        help="single-round selection(s) to show (default: every one in the table)",
    )
    p.add_argument(
        "--rmia-a",
        type=float,
        nargs="+",
        metavar="A",
        help="RMIA sensitivity: rerun rmia and rmia_sum with these values of a",
    )
    args = p.parse_args(argv)
    table = args.run / "results" / "tables" / "attacks.csv"
    if not table.is_file():
        p.error(
            f"{table} does not exist: give the directory of a finished run (snakemake "
            "writes results/tables/attacks.csv in its report stage)"
        )
    if args.rmia_a and not all(0 <= a <= 1 for a in args.rmia_a):
        p.error(f"argument --rmia-a: values must lie in [0, 1]; got {args.rmia_a}")
    return args


def _cell(row: pd.Series, metric: str) -> str:
    """``mean [low, high]`` (TPRs in percent), ``*`` where it rests on < 10 false positives."""
    mean = row.get(metric, math.nan)
    if not math.isfinite(mean):
        return "n/a"
    scale, fmt = (1, "{:.3f}") if metric == "auc" else (100, "{:.2f}")
    lo, hi = row.get(f"{metric}_lo", math.nan), row.get(f"{metric}_hi", math.nan)
    text = fmt.format(mean * scale)
    if math.isfinite(lo) and math.isfinite(hi):
        text += f" [{fmt.format(lo * scale)}, {fmt.format(hi * scale)}]"
    return text + ("*" if row.get(f"{metric}_few", False) else "")


def wide(summary: pd.DataFrame, selections: list[str] | None) -> pd.DataFrame:
    """One row per (setting, protocol, attack, selection) with the three metrics."""
    s = summary[summary["metric"].isin(METRICS)]
    if selections:
        s = s[s["single_round"].isin([*selections, ALL_ROUNDS])]
    keys = [*SETTING, "protocol", "attack", "single_round"]
    out = s.pivot_table(index=keys, columns="metric", values="mean", sort=False)
    for part, col in (("lo", "ci_low"), ("hi", "ci_high"), ("few", "low_count")):
        extra = s.pivot_table(index=keys, columns="metric", values=col, sort=False, aggfunc="first")
        out = out.join(extra.add_suffix(f"_{part}"))
    return out.reset_index()


def print_tables(table: pd.DataFrame, sort: str) -> dict[str, str]:
    """Print one sorted table per (setting, protocol); return the strongest attack of each."""
    strongest = {}
    other = "auc" if sort != "auc" else tpr_metric_name(0.01)
    for key, g in table.groupby([*SETTING, "protocol"], sort=False):
        g = g.sort_values([sort, other], ascending=False, na_position="last")
        name = "/".join(str(k) for k in key)
        print(
            f"\n{name} — sorted by {sort}; TPR in %, mean over targets and seeds "
            "[95 % interval]; * rests on < 10 false positives"
        )
        print(f"{'attack':<36}{'TPR@0.1%':>26}{'TPR@1%':>26}{'AUC':>24}")
        for _, row in g.iterrows():
            label = attack_label(row["attack"])
            if row["single_round"] != ALL_ROUNDS:
                label += f" @ {row['single_round']}"
            print(
                f"{label:<36}"
                + "".join(f"{_cell(row, m):>26}" for m in METRICS[:2])
                + f"{_cell(row, 'auc'):>24}"
            )
        top = g.iloc[0]
        if math.isfinite(top.get(sort, math.nan)):
            strongest[name.replace("/", "_")] = str(top["attack"])
    return strongest


def attack_stage_seconds(run: Path) -> float | None:
    """Print the attack stage's wall time per cell; their sum (None without benchmarks)."""
    files = sorted((run / "results" / "benchmarks" / "attack").rglob("*.tsv"))
    if not files:
        return None
    print("\nattack stage (results/benchmarks/attack), wall seconds per cell:")
    total = 0.0
    for f in files:
        s = float(pd.read_csv(f, sep="\t")["s"].iloc[0])
        total += s
        print(f"  {f.relative_to(run / 'results' / 'benchmarks' / 'attack')}: {s:.1f}")
    return total


def rmia_sensitivity(run: Path, values: list[float]) -> None:
    """RMIA's AUC and TPR@1 % per value of ``a`` on every cell's measure table."""
    print(
        "\nRMIA sensitivity to a (aligned and heldout protocols, mean over targets; the "
        "runs use the config's fixed a — this table is no choice of it):"
    )
    print(f"{'cell':<46}{'a':>6}{'attack':>10}{'protocol':>10}{'AUC':>8}{'TPR@1%':>9}")
    for mdm_file in sorted((run / "results" / "mdm").rglob("*.parquet")):
        parts = mdm_file.relative_to(run / "results" / "mdm").with_suffix("").parts
        dataset, _, _, partition, seed = parts
        part = io.read_parquet(
            run / "results" / "partitions" / dataset / partition / f"{seed}.parquet", "partition"
        )
        mdm = io.read_parquet(mdm_file, "measures")
        if mdm.empty:
            continue
        ev = part[part["eval"]]
        owner = pd.Series(ev["client_id"].to_numpy(), index=ev["sample_id"].to_numpy())
        mdm = mdm[mdm["sample_id"].isin(owner.index)]
        for a in values:
            res = run_attacks(
                ["rmia", "rmia_sum"],
                mdm,
                owner,
                protocols=["aligned", "heldout"],
                n_boot=0,
                rmia=RmiaOptions(a=a),
            )
            for name, r in res.items():
                for protocol, g in r.groupby("protocol"):
                    print(
                        f"{'/'.join(parts):<46}{a:>6g}{name:>10}{protocol:>10}"
                        f"{g['auc'].mean():>8.3f}{100 * g['tpr@1%'].mean():>9.2f}"
                    )


def main(argv: list[str] | None = None) -> int:
    """Print the tables; return the exit status."""
    args = parse_args(argv)
    # the paper's view and level: the uploads' client-level rows (a run with threat views
    # has others, compared in results/tables/secure_aggregation.md)
    summary = paper_rows(pd.read_csv(args.run / "results" / "tables" / "attacks.csv"))
    table = wide(summary, args.selection)
    if table.empty:
        print("no attack rows in attacks.csv (for the selections asked)")
        return 1
    strongest = print_tables(table, args.sort)
    total = attack_stage_seconds(args.run)
    if args.rmia_a:
        rmia_sensitivity(args.run, args.rmia_a)
    print()
    for key, attack in strongest.items():
        print(f"strongest_{key}={attack}")
    if total is not None:
        print(f"attack_stage_s={total:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
