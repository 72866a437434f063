"""Flower runs, recorded by fedmia.flower and audited (the ``fedmia[flower]`` extra).

(a) Equivalence by construction: a Flower app that trains with fedmia's local training and
aggregates with fedmia's step, recorded by the ViewRecorder, gives fedmia's own server view
bit for bit, and so the same attack tables. (b) The example of ``examples/flower`` — an
ordinary Flower app with Flower's own FedAvg — is recorded and audited by the workflow as
a user would. Nothing phones home: no Flower telemetry, no Ray usage statistics, no Ray
dashboard.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"  # before Flower is imported
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
if os.environ.get("FEDMIA_REQUIRE_FLOWER") != "1":  # CI sets it: there they must run
    pytest.importorskip("flwr", reason="Flower is the fedmia[flower] extra")

from flwr.app import Context  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

import flower_fedmia_app  # noqa: E402
from conftest import SNAKEMAKE, background_run  # noqa: E402
from fedmia import pipeline  # noqa: E402
from fedmia.core.contracts import VIEW_FILES  # noqa: E402
from fedmia.federation.models import build_model  # noqa: E402
from fedmia.federation.partition import HELD_OUT  # noqa: E402
from fedmia.federation.state import FlatState  # noqa: E402
from fedmia.flower import ViewRecorder, unflatten  # noqa: E402
from fedmia.stages import io  # noqa: E402
from fedmia.stages.recording import import_recording  # noqa: E402

pytestmark = pytest.mark.flower

REPO = Path(__file__).resolve().parents[1]
K = 3
PART = dict(
    kind="iid", num_clients=K, samples_per_client=20, eval_members_per_client=10, eval_nonmembers=20
)
TRAIN = dict(rounds=3, local_epochs=1, batch_size=10, lr=0.05, observe_every=1, observe_rounds=[1])
CELL = dict(dataset="digits", model="alexnet", defense="none", partition="iid", seed=0)
#: Ray on the test machine: one CPU per client, no dashboard
BACKEND = {
    "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
    "init_args": {"include_dashboard": False, "num_cpus": 2},
}


def flower_run(digits_files, part_file: Path, folder: Path) -> None:
    """The fedmia-equivalent Flower app over K simulated nodes, recorded into ``folder``."""
    part = pd.read_parquet(part_file)
    _, meta = io.load_prepared(digits_files)
    settings = {
        "data": dict(digits_files),
        "partition": str(part_file),
        "model": "alexnet",
        "train": TRAIN,
        "seed": CELL["seed"],
    }
    model = build_model("alexnet", 10, 3, seed=CELL["seed"])
    initial = unflatten(FlatState(model).flat.detach(), FlatState(model).layout)
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = ViewRecorder(
            flower_fedmia_app.FedmiaAggregation(settings, K),
            folder=folder,
            model=model,
            model_kind="alexnet",
            num_classes=10,
            in_channels=3,
            dataset={"kind": "digits", "num_samples": len(part), "sha256": meta["sha256"]},
            clients={c: part.sample_id[part.client_id == c].tolist() for c in range(K)},
            held_out=part.sample_id[part.client_id == HELD_OUT].tolist(),
            evaluation=part.sample_id[part["eval"]].tolist(),
        )
        strategy.start(grid=grid, initial_arrays=initial, num_rounds=3)

    torch.set_num_threads(1)
    run_simulation(
        server_app=app, client_app=flower_fedmia_app.app, num_supernodes=K, backend_config=BACKEND
    )


def imported_cell(digits_files, folder: Path, out: Path) -> dict[str, Path]:
    """A recording imported, measured and attacked: the cell's files."""
    files = {
        "manifest": out / "manifest.json",
        "observed": out / "observed",
        "ownership": out / "ownership.parquet",
        "final": out / "final.safetensors",
        "partition": out / "partition.parquet",
    }
    import_recording(
        recording=folder,
        data=digits_files,
        model={"kind": "alexnet"},
        partition=PART,
        cell=CELL,
        device="cpu",
        threads=1,
        outputs=files,
    )
    pipeline.measure(
        data=digits_files,
        partition_file=files["partition"],
        observed_dir=files["observed"],
        rounds=[1, 2, 3],
        manifest_file=files["manifest"],
        device="cpu",
        threads=1,
        output=out / "mdm.parquet",
    )
    attacks = ["loss", "cos", "loss_series", "fedmia_loss", "fedmia_cos"]
    outputs = {a: out / f"{a}.parquet" for a in attacks}
    pipeline.attack(
        measures_file=out / "mdm.parquet",
        partition_file=files["partition"],
        cell=CELL,
        rounds=[1, 2, 3],
        manifest_file=files["manifest"],
        config={"attacks": attacks, "rounds": [1, 2, 3], "bootstrap": 20},
        outputs=outputs,
    )
    return {**files, **outputs}


def test_a_flower_app_training_as_fedmia_records_fedmias_view_bit_for_bit(digits_files, tmp_path):
    part_file = tmp_path / "partition.parquet"
    pipeline.partition(digits_files, PART, CELL["seed"], part_file)
    trained = tmp_path / "fedmia"
    pipeline.train(
        data=digits_files,
        partition_file=part_file,
        model={"kind": "alexnet"},
        defense={"kind": "none"},
        train_cfg=TRAIN,
        cell=CELL,
        device="cpu",
        threads=1,
        outputs={k: trained / n for k, n in VIEW_FILES.items()}
        | {"history": trained / "history.parquet"},
    )
    recorded = tmp_path / "flower"
    flower_run(digits_files, part_file, recorded)

    view = io.read_view(recorded / "manifest.json")
    assert (view["rounds"], view["observed_rounds"], view["num_clients"]) == (3, [1, 2, 3], K)
    for r in (1, 2, 3):
        a = io.load_observed(io.round_file(trained / "observed", r))
        b = io.load_observed(io.round_file(recorded / "observed", r))
        for t in ("global_state", "uploads", "client_ids", "num_samples"):
            assert torch.equal(a[t], b[t]), (r, t)
        assert a["layout"] == b["layout"]
    fa, _ = io.load_tensors(trained / "final.safetensors", "final")
    fb, _ = io.load_tensors(recorded / "final.safetensors", "final")
    assert torch.equal(fa["global_state"], fb["global_state"])
    own_a, own_b = (io.read_ownership(f / "ownership.parquet") for f in (trained, recorded))
    pd.testing.assert_frame_equal(own_a[own_a.client_id >= 0], own_b[own_b.client_id >= 0])

    cells = [
        imported_cell(digits_files, f, tmp_path / name)
        for f, name in ((trained, "cell_fedmia"), (recorded, "cell_flower"))
    ]
    pd.testing.assert_frame_equal(
        pd.read_parquet(cells[0]["partition"]), pd.read_parquet(cells[1]["partition"])
    )
    for name in ("loss", "cos", "loss_series", "fedmia_loss", "fedmia_cos"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(cells[0][name]), pd.read_parquet(cells[1][name]), obj=name
        )


@background_run("flower_example")
def _flower_example(tmp: Path):
    """examples/flower as its README says, in ``tmp/wd``: run.py, then snakemake on
    audit.yaml (the second only where the first succeeded): ``(wd, recording, env, run,
    audit or None)``."""
    wd = tmp / "wd"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "FLWR_TELEMETRY_ENABLED": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    rec = wd / "results" / "recordings" / "flower_digits"
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "examples" / "flower" / "run.py"),
            "--out",
            str(rec),
            "--cpus",
            "2",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    if run.returncode != 0:
        return wd, rec, env, run, None
    audit = subprocess.run(
        [
            *SNAKEMAKE,
            "-s",
            str(REPO / "Snakefile"),
            "-d",
            str(wd),
            "--cores",
            "2",
            "--configfile",
            str(REPO / "examples" / "flower" / "audit.yaml"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    return wd, rec, env, run, audit


@pytest.fixture(scope="module")
def flower_example(background_runs):
    """:func:`_flower_example`, run in the session's background queue (conftest)."""
    return background_runs.result("flower_example")


def test_the_example_flower_app_is_recorded_and_audited(flower_example, snakemake_cmd):
    """examples/flower as its README says: run.py, then snakemake on audit.yaml
    (:func:`_flower_example`); then a new recording reruns the import."""
    wd, rec, env, run, audit = flower_example
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    view = io.read_view(rec / "manifest.json")
    assert view["model"]["kind"] == "digits_cnn" and view["num_clients"] == 10
    assert view["observed_rounds"] == [5, 10, 15, 20, 25, 30]
    assert audit.returncode == 0, audit.stdout[-3000:] + audit.stderr[-3000:]
    table = pd.read_csv(wd / "results" / "tables" / "attacks.csv")
    assert set(table["dataset"]) == {"flower_digits"} and set(table["model"]) == {"cnn"}
    assert {"fedmia_loss", "fedmia_cos", "loss"} <= set(table["attack"])
    assert (wd / "results" / "tables" / "attacks.md").read_text().count("flower_iid") > 0
    man = json.loads(
        (
            wd
            / "results"
            / "imported"
            / "flower_digits"
            / "cnn"
            / "none"
            / "flower_iid"
            / "seed0"
            / "manifest.json"
        ).read_text()
    )
    assert man["final_test_accuracy"] > 0.8  # the app learns the digits
    part = pd.read_parquet(
        wd
        / "results"
        / "imported"
        / "flower_digits"
        / "cnn"
        / "none"
        / "flower_iid"
        / "seed0"
        / "partition.parquet"
    )
    ev = part[part["eval"]]
    assert ev.groupby("client_id").size().to_dict() == {
        HELD_OUT: 200,
        **dict.fromkeys(range(10), 50),
    }
    assert np.isin(ev.sample_id[ev.client_id == HELD_OUT], np.flatnonzero(part.is_test)).all()

    # a new recording reruns the import even when its manifest keeps its date (the SHA-256
    # of the manifest is a param of the rule)
    manifest = rec / "manifest.json"
    stat = manifest.stat()
    manifest.write_text(manifest.read_text() + "\n")
    os.utime(manifest, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    dry = subprocess.run(
        [
            *snakemake_cmd,
            "-s",
            str(REPO / "Snakefile"),
            "-d",
            str(wd),
            "--cores",
            "2",
            "--configfile",
            str(REPO / "examples" / "flower" / "audit.yaml"),
            "-n",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-3000:]
    assert "rule import_recording:" in dry.stdout and "rule measure:" in dry.stdout, dry.stdout
