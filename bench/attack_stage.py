"""Benchmark: the attack stage on a synthetic measure table of a paper cell's exact shape.

The shape comes from ``config/paper.yaml`` (``--config``, ``--cell``); by default its
largest cell, CIFAR-100 iid: 10 clients × 5,000 evaluation members + 10,000 held-out =
60,000 evaluation samples, 31 observed rounds (round 1 and every 10th of 300) × 10
clients = 18.6 M measure rows. The attack options are the config's for that cell:
every attack of ``attack.attacks``, both protocols (``official`` with 5 draws of 1,000
held-out and 1,000 slots per other client), ``fpr_rule: below``, B = 1,000 bootstrap
replicates per row, the 30 attacked rounds.

The measures are synthetic (every numeric column of the measure contract, a member of
client k scores a little differently under client k's upload, no ties) and written as
the measure stage writes them, with the partition file; then the attack stage
(:func:`fedmia.stages.attack.attack`) runs on them in a fresh process, as a job would.
Timed: the stage's wall time, of which the attacks proper (the stage's log line), the
process's CPU time (user + system: on a shared machine the load stretches the wall time,
much less the CPU time) and its peak resident memory.

``--scale f`` multiplies the evaluation members and held-out samples (and the official
slots) by f for a quick look; ``--smoke`` is a tiny run for CI. The last lines are
machine-readable: ``attack_rows`` (measure rows), ``attack_stage_s``,
``attack_attacks_s``, ``attack_cpu_s``, ``attack_peak_rss_mb``, ``attack_result_rows``.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from fedmia.attacker.attacks import outlier_filter_for
from fedmia.core.contracts import MEASURE_DTYPES, MEASURE_KEYS
from fedmia.stages import io
from fedmia.workflow import Cell, WorkflowSpec, load_workflow_config

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--config", type=Path, default=REPO / "config" / "paper.yaml")
    p.add_argument(
        "--cell",
        default="cifar100/alexnet/none/iid/seed0",
        help="dataset/model/defense/partition/seed<seed> of a cell of the config",
    )
    p.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="factor on the evaluation samples and the official slots",
    )
    p.add_argument("--n-boot", type=int, default=None, help="bootstrap replicates (config's)")
    p.add_argument("--draws", type=int, default=None, help="official draws (config's)")
    p.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="write the files and results here and keep them (default: a temp dir)",
    )
    p.add_argument("--smoke", action="store_true", help="tiny shape, few replicates (for CI)")
    p.add_argument("--run-stage", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.scale, args.n_boot, args.draws = 0.01, 20, 1
    return args


def cell_of(text: str) -> Cell:
    """A :class:`Cell` from its path part ``dataset/model/defense/partition/seed<seed>``."""
    parts = text.split("/")
    if len(parts) != 5 or not parts[4].startswith("seed"):
        raise SystemExit(f"--cell {text!r}: give dataset/model/defense/partition/seed<n>")
    return Cell(*parts[:4], int(parts[4][4:]))


def attack_options(spec: WorkflowSpec, cell: Cell) -> dict:
    """The attack stage's options for ``cell``, as the workflow gives them.

    The attack rule's params (``workflow/rules/common.smk``, ``get_attack_params``)
    without the audit: ``config`` (the cell's resolved ``attack`` section) and
    ``outlier_filter``.
    """
    attacks = list(spec.config["attack"]["attacks"])
    kind = spec.config["partitions"][cell.partition]["kind"]
    config = spec.attack_for(cell)
    config["attacks"] = attacks
    return {
        "config": config,
        "outlier_filter": {
            a: outlier_filter_for(spec.config["attack"]["fedmia_outlier_filter"], a, kind)
            for a in attacks
        },
    }


def plan(args: argparse.Namespace) -> dict:
    """The cell's shape and the attack stage's options, from the config."""
    config = yaml.safe_load(args.config.read_text())
    spec = load_workflow_config(config)
    cell = cell_of(args.cell)
    if cell not in spec.cells:
        raise SystemExit(f"--cell {args.cell} is not a cell of {args.config}")
    part = spec.partitions[cell.partition]
    members = max(2, round(part.eval_members_per_client * args.scale))
    heldout = max(2, round(part.eval_nonmembers * args.scale))
    options = attack_options(spec, cell)
    official = options["config"]["official"]
    for key in ("test_slots", "client_slots"):
        if official.get(key) is not None:
            official[key] = max(1, round(official[key] * args.scale))
    if args.draws is not None:
        official["draws"] = args.draws
    if args.n_boot is not None:
        options["config"]["bootstrap"] = args.n_boot
    return {
        "cell": {
            "dataset": cell.dataset,
            "model": cell.model,
            "defense": cell.defense,
            "partition": cell.partition,
            "seed": cell.seed,
        },
        "clients": part.num_clients,
        "members": members,
        "heldout": heldout,
        "rounds": spec.observed_rounds(cell),
        "options": options,
        "attacks": options["config"]["attacks"],
    }


def synthetic_tables(
    clients: int, members: int, heldout: int, rounds: list[int], seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A measure table (every (round, client, sample)) and its partition.

    Sample ``i < clients·members`` belongs to client ``i // members``, the rest are
    held out. Every numeric measure column of :data:`MEASURE_DTYPES` gets continuous
    values (no ties): a per-sample level plus noise per (round, client), shifted for a
    member under its own client's upload; ``grad_norm`` is one value per (round,
    sample), as the measure stage writes it.
    """
    rng = np.random.default_rng(seed)
    n = clients * members + heldout
    owner = np.full(n, -1, dtype=np.int64)
    owner[: clients * members] = np.repeat(np.arange(clients), members)
    r, k = len(rounds), clients
    own = owner[None, :] == np.arange(k)[:, None]  # K×N: sample's owner is this client
    level = rng.standard_normal(n).astype(np.float32)
    columns: dict[str, np.ndarray] = {
        "round": np.repeat(np.asarray(rounds, dtype=np.int32), k * n),
        "client_id": np.tile(np.repeat(np.arange(k, dtype=np.int32), n), r),
        "sample_id": np.tile(np.arange(n, dtype=np.int64), r * k),
    }
    for name, dtype in MEASURE_DTYPES.items():
        if name in MEASURE_KEYS:
            continue
        if dtype == "bool":
            columns[name] = rng.random(r * k * n) < 0.5
            continue
        if name == "grad_norm":
            v = np.repeat(rng.standard_normal((r, 1, n), dtype=np.float32), k, axis=1)
        else:
            v = rng.standard_normal((r, k, n), dtype=np.float32)
            v += level + 0.5 * own[None]
        columns[name] = v.reshape(-1).astype(dtype)
    part = pd.DataFrame(
        {
            "sample_id": np.arange(n, dtype=np.int64),
            "client_id": owner,
            "is_test": owner < 0,
            "eval": np.ones(n, dtype=bool),
            "canary": np.zeros(n, dtype=bool),
            "canary_in": np.zeros(n, dtype=bool),
            "filler": np.zeros(n, dtype=bool),
        }
    )
    return pd.DataFrame(columns), part


def run_stage(folder: Path) -> int:
    """The child process: the attack stage on ``folder``'s files; prints its timings."""
    from fedmia.stages.attack import attack  # noqa: PLC0415 (the child's own import)

    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    job = json.loads((folder / "job.json").read_text())
    outputs = {name: folder / "out" / f"{name}.parquet" for name in job["attacks"]}
    outputs["replicates"] = folder / "out" / "replicates.parquet"
    t0 = time.perf_counter()
    attack(
        measures_file=folder / "mdm.parquet",
        partition_file=folder / "partition.parquet",
        cell=job["cell"],
        rounds=job["rounds"],
        **job["options"],
        outputs=outputs,
    )
    seconds = time.perf_counter() - t0
    rows = sum(len(pd.read_parquet(f)) for name, f in outputs.items() if name != "replicates")
    print(f"stage_s={seconds:.2f}")
    print(f"result_rows={rows}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return the exit status."""
    args = parse_args(argv)
    if args.run_stage is not None:
        return run_stage(args.run_stage)
    job = plan(args)
    k, m, h, rounds = job["clients"], job["members"], job["heldout"], job["rounds"]
    n = k * m + h
    opts = job["options"]["config"]
    print(
        f"cell {args.cell} of {args.config.name} (scale {args.scale:g}): {k} clients × {m} "
        f"members + {h} held-out = {n:,} samples; {len(rounds)} observed rounds "
        f"({len(opts['rounds'])} attacked); {len(rounds) * k * n:,} measure rows"
    )
    print(
        f"{len(opts['attacks'])} attacks, protocols {opts['protocol']}, official "
        f"{opts['official']}, fpr_rule {opts['fpr_rule']}, B = {opts['bootstrap']}"
    )
    with tempfile.TemporaryDirectory(prefix="fedmia-bench-attack-") as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        mdm, part = synthetic_tables(k, m, h, rounds)
        io.write_parquet(mdm, folder / "mdm.parquet", "measures")
        io.write_parquet(part, folder / "partition.parquet", "partition")
        del mdm
        (folder / "job.json").write_text(json.dumps(job))
        size_mb = (folder / "mdm.parquet").stat().st_size / 2**20
        print(f"wrote the measure table ({size_mb:.0f} MiB) in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        r = subprocess.run(
            [sys.executable, __file__, "--run-stage", str(folder)], capture_output=True, text=True
        )
        wall = time.perf_counter() - t0
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        peak_mb = usage.ru_maxrss / 1024  # KiB
        cpu = usage.ru_utime + usage.ru_stime  # of the job process: a shared machine's load
        # stretches the wall time, much less the CPU time
        if r.returncode != 0:
            print(r.stdout + r.stderr[-5000:])
            return r.returncode
    vals = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    found = re.search(r"attacks × \d+ targets × \S+ in ([\d.]+)s", r.stderr)
    attacks_s = float(found[1]) if found else float("nan")
    stage_s = float(vals["stage_s"])
    print(f"\n{'':<34}{'s':>9}")
    print(f"{'attack stage (job process)':<34}{wall:>9.1f}")
    print(f"{'  the stage function':<34}{stage_s:>9.1f}")
    print(f"{'    of which the attacks':<34}{attacks_s:>9.1f}")
    print(f"{'  CPU time of the job process':<34}{cpu:>9.1f}")
    print(f"peak RSS of the job process: {peak_mb:,.0f} MiB")
    print()
    print(f"attack_rows={len(rounds) * k * n}")
    print(f"attack_stage_s={wall:.2f}")
    print(f"attack_attacks_s={attacks_s:.2f}")
    print(f"attack_cpu_s={cpu:.2f}")
    print(f"attack_peak_rss_mb={peak_mb:.1f}")
    print(f"attack_result_rows={vals['result_rows']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
