"""Flower's own FedAvg against fedmia's on one config, next to fedmia's seed-to-seed spread.

    python examples/flower/compare.py [--out /tmp/flower_compare] [--seeds 0 1 2]

A measurement, not a test (tests/test_flower.py holds the bit-identical construction).
Both sides train every client with fedmia's local training and generators (the ClientApp
of tests/flower_fedmia_app.py); they differ only in the server: fedmia averages the
uploads in client-id order with torch (``w − Σ a_k Δ_k``), Flower's ``FedAvg`` averages the
replies' models in reply order in float32 NumPy, over nodes sampled by ``random.sample``
(unseeded). The script prints, per observed round, how far Flower's global model is from
fedmia's (same seed), and per attack the mean AUC and TPR@1 % over targets of Flower's run,
fedmia's same-seed run, and the range over fedmia's seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))  # the fedmia-equivalent ClientApp

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from flwr.app import ConfigRecord, Context  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

import flower_fedmia_app  # noqa: E402
from fedmia import pipeline  # noqa: E402
from fedmia.core.contracts import PREPARED_FILES, VIEW_FILES  # noqa: E402
from fedmia.federation.models import build_model  # noqa: E402
from fedmia.federation.partition import HELD_OUT  # noqa: E402
from fedmia.federation.state import FlatState  # noqa: E402
from fedmia.flower import ViewRecorder, unflatten  # noqa: E402
from fedmia.stages import io  # noqa: E402
from fedmia.stages.recording import import_recording  # noqa: E402

K = 10
PART = dict(kind="iid", num_clients=K, eval_members_per_client=50, eval_nonmembers=200)
TRAIN = dict(rounds=20, local_epochs=1, batch_size=32, lr=0.05, observe_every=5, observe_rounds=[1])
ROUNDS = [5, 10, 15, 20]
ATTACKS = ["loss", "cos", "grad_diff", "loss_series", "cos_series", "fedmia_loss", "fedmia_cos"]


def cell(seed: int) -> dict:
    """The cell of seed ``seed``."""
    return dict(dataset="digits", model="alexnet", defense="none", partition="iid", seed=seed)


def attacked(data: dict, part_file: Path, folder: Path, seed: int, out: Path) -> pd.DataFrame:
    """Measures and attacks of a cell's view: per attack the mean AUC and TPR@1 %."""
    pipeline.measure(
        data=data,
        partition_file=part_file,
        observed_dir=folder / "observed",
        rounds=[1, *ROUNDS],
        manifest_file=folder / "manifest.json",
        device="cpu",
        threads=1,
        output=out / "mdm.parquet",
    )
    outputs = {a: out / f"{a}.parquet" for a in ATTACKS}
    pipeline.attack(
        measures_file=out / "mdm.parquet",
        partition_file=part_file,
        cell=cell(seed),
        rounds=[1, *ROUNDS],
        manifest_file=folder / "manifest.json",
        config={"attacks": ATTACKS, "rounds": ROUNDS, "protocol": ["aligned"], "bootstrap": 0},
        outputs=outputs,
    )
    rows = []
    for a in ATTACKS:
        t = pd.read_parquet(outputs[a])
        t = t[t["round"].isin([-1, ROUNDS[-1]])]  # multi-round, or the last round
        rows.append({"attack": a, "auc": t["auc"].mean(), "tpr@1%": t["tpr@1%"].mean()})
    return pd.DataFrame(rows).set_index("attack")


def fedmia_run(data: dict, seed: int, out: Path) -> tuple[Path, Path]:
    """Train with fedmia's own FedAvg, seed ``seed`` in ``out``: its partition file and folder."""
    part_file = out / "partition.parquet"
    pipeline.partition(data, PART, seed, part_file)
    pipeline.train(
        data=data,
        partition_file=part_file,
        model={"kind": "alexnet"},
        defense={"kind": "none"},
        train_cfg=TRAIN,
        cell=cell(seed),
        device="cpu",
        threads=1,
        outputs={k: out / n for k, n in VIEW_FILES.items()} | {"history": out / "history.parquet"},
    )
    return part_file, out


def flower_run(data: dict, part_file: Path, seed: int, out: Path, cpus: int) -> None:
    """Flower's FedAvg over fedmia's ClientApp, recorded into ``out``."""
    part = pd.read_parquet(part_file)
    _, meta = io.load_prepared(data)
    settings = {
        "data": dict(data),
        "partition": str(part_file),
        "model": "alexnet",
        "train": TRAIN,
        "seed": seed,
    }
    model = build_model("alexnet", 10, 3, seed=seed)
    flat = FlatState(model)
    initial = unflatten(flat.flat.detach(), flat.layout)
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = ViewRecorder(
            FedAvg(
                fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=K, min_available_nodes=K
            ),
            folder=out,
            model=model,
            model_kind="alexnet",
            num_classes=10,
            in_channels=3,
            dataset={"kind": "digits", "num_samples": len(part), "sha256": meta["sha256"]},
            clients={c: part.sample_id[part.client_id == c].tolist() for c in range(K)},
            held_out=part.sample_id[part.client_id == HELD_OUT].tolist(),
            evaluation=part.sample_id[part["eval"]].tolist(),
            rounds=[1, *ROUNDS],
        )
        strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=TRAIN["rounds"],
            train_config=ConfigRecord({"fedmia": json.dumps(settings, sort_keys=True)}),
        )

    run_simulation(
        server_app=app,
        client_app=flower_fedmia_app.app,
        num_supernodes=K,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"include_dashboard": False, "num_cpus": cpus},
        },
    )


def main() -> None:
    """Run fedmia on each seed and Flower's FedAvg on the first; print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/flower_compare"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    out = args.out.resolve()
    torch.set_num_threads(1)
    data = {k: str(out / "data" / n) for k, n in PREPARED_FILES.items()}
    if not Path(data["meta"]).exists():
        pipeline.prepare({"kind": "digits"}, data)
    t0 = time.perf_counter()
    tables, views = {}, {}
    for seed in args.seeds:
        part_file, folder = fedmia_run(data, seed, out / f"fedmia{seed}")
        views[seed] = folder
        tables[f"fedmia seed {seed}"] = attacked(
            data, part_file, folder, seed, out / f"fedmia{seed}"
        )
    seed = args.seeds[0]
    part_file = out / f"fedmia{seed}" / "partition.parquet"
    flower_run(data, part_file, seed, out / "flower", args.cpus)
    cell_dir = out / "flower_cell"
    import_recording(
        recording=out / "flower",
        data=data,
        model={"kind": "alexnet"},
        partition=PART,
        cell=cell(seed),
        device="cpu",
        threads=1,
        outputs={
            "manifest": cell_dir / "manifest.json",
            "observed": cell_dir / "observed",
            "ownership": cell_dir / "ownership.parquet",
            "final": cell_dir / "final.safetensors",
            "partition": cell_dir / "partition.parquet",
        },
    )
    tables["flower"] = attacked(data, cell_dir / "partition.parquet", cell_dir, seed, cell_dir)
    print(
        f"config: digits, alexnet, K = {K} iid, {TRAIN['rounds']} rounds, attacked rounds "
        f"{ROUNDS}; fedmia seeds {args.seeds}; Flower's FedAvg with seed {seed}'s "
        f"partition, initial model and client generators; {time.perf_counter() - t0:.0f}s"
    )
    print("\nglobal model sent, Flower vs fedmia (same seed) | fedmia seed vs seed:")
    for r in [1, *ROUNDS]:
        a = io.load_observed(io.round_file(views[seed] / "observed", r))["global_state"]
        b = io.load_observed(io.round_file(out / "flower" / "observed", r))["global_state"]
        line = (
            f"round {r:3d}: max |Δw| {float((a - b).abs().max()):.3e}, "
            f"‖Δw‖/‖w‖ {float((a - b).norm() / a.norm()):.3e}"
        )
        if len(args.seeds) > 1:
            other = io.round_file(views[args.seeds[1]] / "observed", r)
            d = io.load_observed(other)["global_state"]
            line += (
                f" | seeds {seed}/{args.seeds[1]}: ‖Δw‖/‖w‖ {float((a - d).norm() / a.norm()):.3e}"
            )
        print(line)
    fed = pd.concat({k: v for k, v in tables.items() if k.startswith("fedmia")}, axis=1)
    summary = pd.DataFrame(
        {
            "flower auc": tables["flower"]["auc"],
            f"fedmia s{seed} auc": tables[f"fedmia seed {seed}"]["auc"],
            "|diff| auc": (tables["flower"]["auc"] - tables[f"fedmia seed {seed}"]["auc"]).abs(),
            "fedmia seeds auc range": fed.xs("auc", axis=1, level=1).max(axis=1)
            - fed.xs("auc", axis=1, level=1).min(axis=1),
            "fedmia seeds auc sd": fed.xs("auc", axis=1, level=1).std(axis=1),
            "flower tpr@1%": tables["flower"]["tpr@1%"],
            f"fedmia s{seed} tpr@1%": tables[f"fedmia seed {seed}"]["tpr@1%"],
            "fedmia seeds tpr@1% sd": fed.xs("tpr@1%", axis=1, level=1).std(axis=1),
        }
    )
    print(
        "\nper attack (aligned protocol, mean over the 10 targets; multi-round attacks over "
        f"rounds {ROUNDS}, single-round ones at round {ROUNDS[-1]}):"
    )
    print(summary.to_string(float_format=lambda v: f"{v:.4f}"))
    summary.to_csv(out / "compare.csv")


if __name__ == "__main__":
    main()
