from __future__ import annotations

import json
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TINY_CELL as CELL
from conftest import TINY_PART as PART
from conftest import TINY_TRAIN as TRAIN
from conftest import train_arguments
from fedmia import pipeline
from fedmia.attacker.uncertainty import stable_seed
from fedmia.core.contracts import REPLICATE_COLUMNS
from fedmia.core.lockfile import lock_sha256
from fedmia.federation.models import build_model
from fedmia.federation.state import FlatState, StateLayout
from fedmia.privacy.accounting import accounted_epsilon
from fedmia.privacy.audit import audit_from_scores, max_epsilon_lower_bound, select_and_audit
from fedmia.stages import io
from fedmia.stages.io import read_replicates
from fedmia.stages.train import Checkpoint


@pytest.fixture(scope="module")
def cell(train_cell, tmp_path_factory):
    return train_cell(tmp_path_factory.mktemp("cell"), PART, TRAIN, CELL)


def test_prepared_digits(digits_files):
    arrays, meta = io.load_prepared(digits_files)
    assert arrays["images"].shape == (1797, 3, 32, 32) and arrays["images"].dtype == np.uint8
    assert set(np.unique(arrays["labels"])) == set(range(10))
    assert meta["num_test"] == arrays["is_test"].sum() == 450
    assert meta["classes"] == [str(i) for i in range(10)] and len(meta["sha256"]) == 64
    # every class is in both splits (stratified), and channels are replicated grey
    assert set(np.unique(arrays["labels"][arrays["is_test"]])) == set(range(10))
    assert (arrays["images"][:, 0] == arrays["images"][:, 2]).all()


def test_history_contents(cell):
    h = pd.read_parquet(cell["history"])
    assert list(h.columns) == pipeline.HISTORY_COLUMNS
    assert len(h) == 4 * (3 + 1)  # K client rows + one global row per round
    glob = h[h.client_id == -1].set_index("round")
    assert glob.test_accuracy.notna().tolist() == [False, True, False, True]  # test_every 2
    assert (glob.num_samples == 60).all()
    clients = h[h.client_id >= 0]
    assert (clients.num_samples == 20).all() and clients.test_loss.isna().all()
    # the server's weight of each upload (n_k / n), in client rows only
    assert (clients.aggregation_weight == np.float32(1 / 3)).all()
    assert glob.aggregation_weight.isna().all()
    assert pipeline.read_manifest(cell["manifest"])["aggregation_weights"] == "data_size"
    assert np.allclose(clients.groupby("round").train_loss.mean(), glob.train_loss)
    lrs = glob.lr.to_numpy()
    assert lrs[0] == lrs[1] == pytest.approx(0.05)  # the official cosine: rounds 1, 2 at lr
    assert (np.diff(lrs[1:]) < 0).all()  # then cosine decay


def test_the_manifest_records_the_lock_the_environment_was_installed_from(cell):
    # the sha256 of requirements/py311-linux-x86_64-cpu.txt in CI; None for an unlocked install
    assert pipeline.read_manifest(cell["manifest"])["lock_sha256"] == lock_sha256()


def test_observed_rounds_hold_the_server_view(cell):
    files = sorted(p.name for p in cell["observed"].iterdir())
    assert files == ["round0001.safetensors", "round0002.safetensors", "round0004.safetensors"]
    r1 = io.load_observed(io.round_file(cell["observed"], 1))
    layout = StateLayout.from_list(r1["layout"])
    assert r1["uploads"].shape == (3, layout.size) and r1["global_state"].shape == (layout.size,)
    assert r1["num_samples"].tolist() == [20, 20, 20] and r1["round"] == 1
    # round 1's global model is the seeded initial model
    init = FlatState(build_model("alexnet", 10, 3, seed=0)).flat
    assert torch.equal(r1["global_state"], init)
    # the next observed round's model is this round's aggregate, w_2 = w_1 − mean(Δ_k)
    r2 = io.load_observed(io.round_file(cell["observed"], 2))
    torch.testing.assert_close(r2["global_state"], r1["global_state"] - r1["uploads"].mean(0))
    final, _ = io.load_tensors(cell["final"], "final")
    r4 = io.load_observed(io.round_file(cell["observed"], 4))
    torch.testing.assert_close(final["global_state"], r4["global_state"] - r4["uploads"].mean(0))


def test_same_seed_gives_byte_identical_history(train_cell, tmp_path, cell):
    again = train_cell(tmp_path, PART, TRAIN, CELL)
    assert again["history"].read_bytes() == cell["history"].read_bytes()
    assert (tmp_path / "partition.parquet").read_bytes() == (
        cell["history"].parent / "partition.parquet"
    ).read_bytes()


@pytest.fixture(scope="module")
def measured(cell, digits_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("mdm") / "mdm.parquet"
    pipeline.measure(
        data=digits_files,
        partition_file=cell["history"].parent / "partition.parquet",
        observed_dir=cell["observed"],
        rounds=[1, 2, 4],
        device="cpu",
        threads=1,
        output=out,
    )
    return out


def test_measure_table_contents(measured, cell):
    mdm = pd.read_parquet(measured)
    part = pd.read_parquet(cell["history"].parent / "partition.parquet")
    n_eval = int(part["eval"].sum())
    assert list(mdm.columns) == [
        "round",
        "client_id",
        "sample_id",
        "loss",
        "logit_conf",
        "cos",
        "grad_diff",
        "grad_norm",
        "correct",
        "confidence",
    ]
    assert mdm.loss.dtype == mdm.logit_conf.dtype == np.float64 and (mdm.loss > 0).all()
    assert (
        len(mdm) == 3 * 3 * n_eval and not mdm.duplicated(["round", "client_id", "sample_id"]).any()
    )
    assert set(mdm.sample_id) == set(part.sample_id[part["eval"]])
    # grad_norm does not depend on the client
    assert (mdm.groupby(["round", "sample_id"]).grad_norm.nunique() == 1).all()
    assert mdm[["loss", "cos", "grad_diff", "grad_norm"]].notna().all().all()
    # grad_diff = 2<g,Δ> − ‖g‖² and cos = <g,Δ> / (‖g‖ ‖Δ‖) agree, with ‖Δ_k‖ of the
    # uploads the server saw (trainable parameters only)
    obs = io.load_observed(io.round_file(cell["observed"], 2))
    mask = StateLayout.from_list(obs["layout"]).param_mask()
    upd_norm = obs["uploads"][:, mask].double().norm(dim=1).numpy()  # K
    r2 = mdm[mdm["round"] == 2]
    dot = (r2.grad_diff + r2.grad_norm) / 2
    cos = dot / (np.sqrt(r2.grad_norm) * upd_norm[r2.client_id.to_numpy()])
    np.testing.assert_allclose(cos, r2.cos, rtol=2e-3, atol=1e-6)


def test_a_diverged_cell_is_a_result(digits_files, train_cell, tmp_path):
    """Strong unclipped parameter noise breaks the model in round 2: training stops, every
    output is written, the manifest flags the cell, and measures and attacks use round 1."""
    noise = {"kind": "dp_param_noise", "sigma": 1.0}
    outputs = train_cell(tmp_path, PART, {**TRAIN, "observe_every": 1}, CELL, noise)
    man = pipeline.read_manifest(outputs["manifest"])
    assert man["diverged_round"] == 2 and man["last_finite_round"] == 1
    assert man["planned_observed_rounds"] == [1, 2, 3, 4] and man["observed_rounds"] == [1]
    assert man["final_test_accuracy"] == pytest.approx(0.1)  # chance: 1 / 10 classes
    assert 0 < man["last_finite_test_accuracy"] < 1
    assert sorted(p.name for p in outputs["observed"].iterdir()) == ["round0001.safetensors"]
    h = pd.read_parquet(outputs["history"])
    assert h["round"].max() == 2 and (h[["dataset", "seed"]].iloc[0].tolist() == ["digits", 0])
    mdm_file = tmp_path / "mdm.parquet"
    pipeline.measure(
        data=digits_files,
        partition_file=tmp_path / "partition.parquet",
        observed_dir=outputs["observed"],
        rounds=[1, 2, 3, 4],
        manifest_file=outputs["manifest"],
        device="cpu",
        threads=1,
        output=mdm_file,
    )
    assert set(pd.read_parquet(mdm_file)["round"]) == {1}
    files = {a: tmp_path / f"{a}.parquet" for a in ("cos", "cos_series")}
    pipeline.attack(
        measures_file=mdm_file,
        partition_file=tmp_path / "partition.parquet",
        cell=CELL,
        rounds=[1, 2, 3, 4],
        manifest_file=outputs["manifest"],
        config={"attacks": list(files), "rounds": [1, 2, 3, 4]},
        outputs=files,
    )
    series = pd.read_parquet(files["cos_series"])
    assert set(series["n_rounds"]) == {1}  # fewer rounds than planned
    assert set(pd.read_parquet(files["cos"])["round"]) == {1}


def test_a_cell_that_diverges_before_any_observed_round_has_empty_results(
    digits_files, train_cell, tmp_path
):
    noise = {"kind": "dp_param_noise", "sigma": 1e30}
    outputs = train_cell(tmp_path, PART, TRAIN, CELL, noise)
    man = pipeline.read_manifest(outputs["manifest"])
    assert man["diverged_round"] == 1 and man["observed_rounds"] == []
    mdm_file = tmp_path / "mdm.parquet"
    pipeline.measure(
        data=digits_files,
        partition_file=tmp_path / "partition.parquet",
        observed_dir=outputs["observed"],
        rounds=[1, 2, 4],
        manifest_file=outputs["manifest"],
        device="cpu",
        threads=1,
        output=mdm_file,
    )
    assert len(pd.read_parquet(mdm_file)) == 0
    out = {"loss": tmp_path / "loss.parquet", "replicates": tmp_path / "replicates.parquet"}
    pipeline.attack(
        measures_file=mdm_file,
        partition_file=tmp_path / "partition.parquet",
        cell=CELL,
        rounds=[1, 2, 4],
        manifest_file=outputs["manifest"],
        config={"attacks": ["loss"], "rounds": [2, 4]},
        outputs=out,
    )
    assert len(pd.read_parquet(out["loss"])) == 0
    empty = read_replicates(out["replicates"])
    assert len(empty) == 0 and list(empty.columns) == list(REPLICATE_COLUMNS)
    for kind in ("rounds", "roc"):  # the cell's figures say why they are empty
        figs = {"png": tmp_path / f"{kind}.png", "pdf": tmp_path / f"{kind}.pdf"}
        pipeline.report_cell_figures(
            attack_files=[out["loss"]],
            kind=kind,
            outputs=figs,
            options={"round_plot_fpr": 0.01, "width": 6, "dpi": 50, "single_round": ["last"]},
        )
        assert figs["png"].stat().st_size > 1000


def test_members_look_like_members_after_real_training(digits_files, train_cell, tmp_path):
    """On a real (tiny) FedAvg run, every client's own evaluation samples have a higher
    mean cos and a lower mean loss under its upload than the non-members do: the
    direction the attacks assume is measured, not built in."""
    part = dict(
        kind="iid",
        num_clients=3,
        samples_per_client=30,
        eval_members_per_client=30,
        eval_nonmembers=200,
    )
    train = dict(
        rounds=6, local_epochs=3, batch_size=10, lr=0.05, observe_every=3, observe_rounds=[]
    )
    out = train_cell(tmp_path, part, train, CELL)
    mdm_file = tmp_path / "mdm.parquet"
    pipeline.measure(
        data=digits_files,
        partition_file=tmp_path / "partition.parquet",
        observed_dir=out["observed"],
        rounds=[3, 6],
        device="cpu",
        threads=1,
        output=mdm_file,
    )
    mdm = pd.read_parquet(mdm_file)
    p = pd.read_parquet(tmp_path / "partition.parquet")
    owner = p.set_index("sample_id").client_id
    mdm["member"] = owner.reindex(mdm.sample_id).to_numpy() == mdm.client_id
    means = mdm.groupby(["round", "client_id", "member"])[["cos", "loss"]].mean().unstack()
    assert len(means) == 2 * 3
    assert (means[("cos", True)] > means[("cos", False)]).all(), means
    assert (means[("loss", True)] < means[("loss", False)]).all(), means


def _same_results(a, b):
    """Every output of two train runs byte for byte (safetensors are byte-stable)."""
    for name in ("history.parquet", "manifest.json", "final.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    files = sorted(p.name for p in (a / "observed").iterdir())
    assert files == sorted(p.name for p in (b / "observed").iterdir())
    for f in files:
        assert (a / "observed" / f).read_bytes() == (b / "observed" / f).read_bytes(), f


RESUME_TRAIN = {**TRAIN, "rounds": 6, "test_every": 1}


def test_killed_training_resumes_from_its_checkpoint(digits_files, train_cell, tmp_path):
    """SIGKILL a real training process after its second checkpoint; the rerun resumes
    there and its outputs equal an uninterrupted run's."""
    ref = tmp_path / "ref"
    train_cell(ref, PART, RESUME_TRAIN, CELL)
    out, ckpt = tmp_path / "run", tmp_path / "ckpt"
    script = tmp_path / "train.py"
    script.write_text(
        "import json, sys\nfrom pathlib import Path\nfrom fedmia import pipeline\n"
        "from fedmia.core.logs import setup_logging\nsetup_logging()\n"
        "kw = json.loads(sys.argv[1])\n"
        "kw['outputs'] = {k: Path(v) for k, v in kw['outputs'].items()}\n"
        "pipeline.train(**kw)\n"
    )
    # the reference run's arguments, but for the outputs' folder and the checkpoint
    kw = train_arguments(digits_files, out, RESUME_TRAIN, CELL, checkpoint_every=2)
    kw |= {"partition_file": ref / "partition.parquet", "checkpoint_dir": ckpt}
    arguments = json.dumps(kw, default=str)
    proc = subprocess.Popen(
        [sys.executable, str(script), arguments], stderr=subprocess.PIPE, text=True
    )
    log = []
    for line in proc.stderr:  # kill it as soon as round 4 is saved
        log.append(line)
        if "checkpoint: round 4 saved" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL, "".join(log)
    assert (ckpt / "state.safetensors").exists() and not (out / "manifest.json").exists()
    r = subprocess.run(
        [sys.executable, str(script), arguments], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from the checkpoint of round 4" in r.stderr
    assert "round 5/6" in r.stderr and "round 3/6" not in r.stderr  # only the lost rounds
    _same_results(ref, out)
    assert not ckpt.exists()  # removed once the outputs are written


def test_a_checkpoint_of_other_settings_is_not_resumed(train_cell, tmp_path, caplog):
    ckpt = dict(checkpoint_dir=tmp_path / "ckpt", checkpoint_every=2)
    train_cell(tmp_path / "a", PART, {**RESUME_TRAIN, "rounds": 2}, CELL, **ckpt)
    # leave a stale checkpoint behind, as a kill under other settings would
    Checkpoint(tmp_path / "ckpt", "another run").save(2, torch.zeros(3), [], {})
    with caplog.at_level("WARNING"):
        train_cell(tmp_path / "b", PART, {**RESUME_TRAIN, "rounds": 2, "lr": 0.04}, CELL, **ckpt)
    assert "belongs to other settings, inputs or code; starting afresh" in caplog.text
    assert pipeline.read_manifest(tmp_path / "b" / "manifest.json")["last_finite_round"] == 2


def _audited_cell(digits_files, train_cell, out, defense, train):
    part = dict(
        kind="iid",
        num_clients=3,
        samples_per_client=20,
        eval_members_per_client=10,
        eval_nonmembers=30,
        audit_canaries=200,
        audit_target=0,
    )
    outputs = train_cell(out, part, train, CELL, defense)
    pipeline.measure(
        data=digits_files,
        partition_file=out / "partition.parquet",
        observed_dir=outputs["observed"],
        rounds=[train["rounds"]],
        manifest_file=outputs["manifest"],
        device="cpu",
        threads=1,
        output=out / "mdm.parquet",
    )
    files = {
        "loss": out / "loss.parquet",
        "audit": out / "audit.parquet",
        "replicates": out / "replicates.parquet",
    }
    pipeline.attack(
        measures_file=out / "mdm.parquet",
        partition_file=out / "partition.parquet",
        cell=CELL,
        manifest_file=outputs["manifest"],
        config={
            "attacks": ["loss"],
            "rounds": [train["rounds"]],
            "protocol": ["aligned"],
            "bootstrap": 50,
        },
        audit={"target": 0, "delta": 1e-5},
        outputs=files,
    )
    part_df = pd.read_parquet(out / "partition.parquet")
    return pd.read_parquet(files["audit"]).iloc[0], part_df, pd.read_parquet(files["loss"])


def test_canaries_are_coin_flipped_into_the_target_and_scored(digits_files, train_cell, tmp_path):
    train = dict(
        rounds=4, local_epochs=10, batch_size=10, lr=0.03, observe_every=4, observe_rounds=[]
    )
    row, part, loss = _audited_cell(digits_files, train_cell, tmp_path, {"kind": "none"}, train)
    canary = part[part.canary]
    assert len(canary) == 200 and not (canary["eval"]).any() and canary.is_test.all()
    assert (canary.client_id[canary.canary_in] == 0).all()
    assert (canary.client_id[~canary.canary_in] == -1).all()
    assert 70 < canary.canary_in.sum() < 130  # fair coins
    # the target trains on its 20 samples and 200 slots, a filler where a canary is out
    h = pd.read_parquet(tmp_path / "history.parquet")
    assert h[h.client_id == 0].num_samples.unique().tolist() == [220]
    assert (part.filler & (part.client_id == 0)).sum() == 200 - canary.canary_in.sum()
    assert loss.n_nonmembers.iloc[0] == 30 + 10 * 2  # the attacks see the evaluation set only
    # the audit is the bound of the target's -loss on the canaries at the attacked round
    mdm = pd.read_parquet(tmp_path / "mdm.parquet")
    assert not mdm.sample_id.isin(part.sample_id[part.filler]).any()  # fillers are not scored
    mine = mdm[(mdm.client_id == 0) & mdm.sample_id.isin(canary.sample_id)].sort_values("sample_id")
    coins = canary.set_index("sample_id").canary_in.reindex(mine.sample_id).to_numpy()
    again = audit_from_scores(
        -mine.loss.to_numpy(), coins, delta=1e-5, holdout_seed=stable_seed(0, "loss")
    )
    assert row["epsilon_empirical"] == again.epsilon and row["num_correct"] == again.num_correct
    assert row["num_canaries"] == 100 and row["round"] == 4
    assert mine.loss[coins].mean() < mine.loss[~coins].mean()  # the trained-on ones fit better
    assert row["epsilon_empirical"] <= max_epsilon_lower_bound(row["num_guesses"])
    # the attack chosen on held-out canaries (here the only one) has a row of its own
    table = io.read_parquet(tmp_path / "audit.parquet", "audit")
    assert list(table.attack) == ["loss", "selected"]
    chosen = table.iloc[1]
    a, best = select_and_audit(
        -mine.loss.to_numpy()[None], coins, delta=1e-5, holdout_seed=stable_seed(0, "selected")
    )
    assert chosen["selected_attack"] == "loss" and chosen["epsilon_empirical"] == best.epsilon
    # the replicates the findings need: loss (a finding attack) per target at the attacked
    # round, B float32 values, the file contract of fedmia.stages.io
    reps = read_replicates(tmp_path / "replicates.parquet")
    assert list(reps.columns) == list(REPLICATE_COLUMNS) and len(reps) == 3
    assert set(reps["round"]) == {4} and set(reps.target) == {0, 1, 2}
    assert all(v.dtype == np.float32 and len(v) == 50 for v in reps["auc_replicates"])
    lo, hi = np.percentile(reps["auc_replicates"].iloc[0].astype(float), [2.5, 97.5])
    assert (loss.auc_ci_low.iloc[0], loss.auc_ci_high.iloc[0]) == pytest.approx((lo, hi), abs=1e-6)


def test_audit_stays_below_the_accounted_epsilon_of_dp(digits_files, train_cell, tmp_path):
    train = dict(
        rounds=4, local_epochs=10, batch_size=10, lr=0.03, observe_every=4, observe_rounds=[]
    )
    accounted = accounted_epsilon(10.0, 4, delta=1e-5)
    assert accounted.epsilon_pld <= 2
    # clip 1e-3: noise std σC = 0.01 per coordinate, small enough to keep training finite
    row, _, _ = _audited_cell(
        digits_files, train_cell, tmp_path, {"kind": "dp", "sigma": 10.0, "clip": 0.001}, train
    )
    man = pipeline.read_manifest(tmp_path / "manifest.json")
    assert man["diverged_round"] is None and row["num_canaries"] == 100
    # clients of 220, 20 and 20 samples, equal weights: the server learns no data size
    assert man["aggregation_weights"] == "equal"
    h = pd.read_parquet(tmp_path / "history.parquet")
    assert (h[h.client_id >= 0].aggregation_weight == np.float32(1 / 3)).all()
    assert row["epsilon_empirical"] <= accounted.epsilon_pld, (row, accounted)
