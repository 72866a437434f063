"""The aggregate view's measures (issue 22): the measure stage's aggregate table.

Under ``threat.view: [.., aggregate]`` the measure stage also measures, per observed round
with a participant, the aggregate ``A_r = Σ_k a_k Δ_k`` the server applied, as one more
upload. Checked here against slow references: the weights the training recorded in its
history, the models it sent (``w_r − A_r = w_{r+1}``), and the stage run on ``A_r`` alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import TINY_CELL, TINY_TRAIN
from fedmia import pipeline
from fedmia.core import contracts
from fedmia.federation.partition import HELD_OUT
from fedmia.stages import io
from fedmia.stages.measure import ServerWeights, aggregate_update
from test_workflow import smk

#: Unequal client sizes (label-Dirichlet), so data_size, official_permuted and equal
#: weights all differ.
PART = dict(
    kind="dirichlet",
    beta=1.0,
    num_clients=3,
    samples_per_client=20,
    eval_members_per_client=4,
    eval_nonmembers=12,
)
#: Every round observed, so each round's next model is known (the last: the final model).
TRAIN = dict(TINY_TRAIN, rounds=3, observe_every=1, observe_rounds=[], test_every=3)
ROUNDS = [1, 2, 3]
#: name → (train settings, defense, the weights the server must use)
CELLS = {
    "full": (TRAIN, None, "data_size"),
    "partial": (
        dict(
            TRAIN,
            aggregation="official_permuted",
            participation={"fraction": 0.67, "sampling": "uniform"},
        ),
        None,
        "official_permuted",
    ),
    "dp_poisson": (
        dict(TRAIN, participation={"fraction": 0.67, "sampling": "poisson"}),
        {"kind": "dp", "sigma": 0.001, "clip": 1.0},
        "equal",
    ),
}


@pytest.fixture(scope="module", params=list(CELLS))
def cell(request, train_cell, tmp_path_factory):
    """A trained tiny cell (its train outputs, plus ``name``)."""
    train, defense, _ = CELLS[request.param]
    out = tmp_path_factory.mktemp(f"agg_{request.param}")
    outputs = train_cell(out, PART, train, TINY_CELL, defense)
    return {**outputs, "name": request.param}


def measure(cell, data, out: Path, *, aggregate: bool = True, observed=None, rounds=ROUNDS):
    """Run the measure stage on the cell; return (measure table path, aggregate path)."""
    agg = out / "mdm.aggregate.parquet" if aggregate else None
    pipeline.measure(
        data=data,
        partition_file=cell["history"].parent / "partition.parquet",
        observed_dir=observed or cell["observed"],
        rounds=rounds,
        manifest_file=cell["manifest"],
        device="cpu",
        threads=1,
        output=out / "mdm.parquet",
        aggregate_output=agg,
    )
    return out / "mdm.parquet", agg


@pytest.fixture(scope="module")
def measured(cell, digits_files, tmp_path_factory):
    """The cell measured with and without the aggregate: (with, aggregate, without)."""
    with_agg, agg = measure(cell, digits_files, tmp_path_factory.mktemp("with"))
    without_dir = tmp_path_factory.mktemp("without")
    without, _ = measure(cell, digits_files, without_dir, aggregate=False)
    assert sorted(p.name for p in without_dir.iterdir()) == ["mdm.parquet"]
    return with_agg, agg, without


def reference_aggregate(cell, rnd: int) -> torch.Tensor:
    """A_r summed in float64 with the weights the training recorded in its history."""
    obs = io.load_observed(io.round_file(cell["observed"], rnd))
    hist = pd.read_parquet(cell["history"])
    rows = hist[(hist["round"] == rnd) & (hist["client_id"] != HELD_OUT)]
    assert rows["client_id"].tolist() == obs["client_ids"].tolist()
    total = torch.zeros(obs["uploads"].shape[1], dtype=torch.float64)
    for a, upload in zip(rows["aggregation_weight"], obs["uploads"], strict=True):
        total += float(a) * upload.double()
    return total.float()


def next_model(cell, rnd: int) -> torch.Tensor:
    """w_{r+1}: the next round's model sent, or the final model after the last round."""
    if rnd < max(ROUNDS):
        return io.load_observed(io.round_file(cell["observed"], rnd + 1))["global_state"]
    tensors, _ = io.load_tensors(cell["final"], "final")
    return tensors["global_state"]


def test_the_weights_and_aggregate_are_the_trainings(cell):
    """The rule found from the manifest gives the history's weights bit for bit, and the
    aggregate is the server's step: w_r − A_r = w_{r+1} (none and dp, full, uniform and
    poisson participation; dp's equal weights with the poisson denominator qK)."""
    manifest = io.read_manifest(cell["manifest"])
    server = ServerWeights.from_manifest(manifest, cell["manifest"])
    assert server.rule == CELLS[cell["name"]][2]
    hist = pd.read_parquet(cell["history"])
    seen = 0
    for rnd in ROUNDS:
        obs = io.load_observed(io.round_file(cell["observed"], rnd))
        w, w_next = obs["global_state"], next_model(cell, rnd)
        if obs["uploads"].shape[0] == 0:  # nobody took part: the model stays
            assert torch.equal(w, w_next)
            continue
        seen += 1
        weights = server.weights(rnd, obs["num_samples"])
        recorded = hist[(hist["round"] == rnd) & (hist["client_id"] != HELD_OUT)]
        assert weights.tolist() == recorded["aggregation_weight"].tolist()
        a_r = aggregate_update(obs["uploads"], weights)
        torch.testing.assert_close(a_r, reference_aggregate(cell, rnd), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(w - a_r, w_next, rtol=0, atol=0)
        if server.rule == "equal":  # poisson: 1 / (qK), whoever took part
            assert weights.tolist() == pytest.approx([1 / (0.67 * 3)] * len(weights))
    assert seen >= 2


def test_the_aggregate_row_is_the_measures_of_A_r_alone(cell, measured, digits_files, tmp_path):
    """Each round's aggregate rows equal the stage's measures of a round whose only upload
    is A_r (summed independently, from the history's weights)."""
    _, agg_file, _ = measured
    agg = io.read_parquet(agg_file, "measures")
    assert list(agg.dtypes.astype(str).items()) == list(contracts.MEASURE_DTYPES.items())
    assert (agg["client_id"] == contracts.AGGREGATE_CLIENT).all()
    alone = tmp_path / "observed"
    rounds = []
    for rnd in ROUNDS:
        f = io.round_file(cell["observed"], rnd)
        obs = io.load_observed(f)
        if obs["uploads"].shape[0] == 0:
            continue
        rounds.append(rnd)
        meta = {k: obs[k] for k in ("round", "layout", "model")}
        io.save_observed(
            io.round_file(alone, rnd),
            global_state=obs["global_state"],
            uploads=reference_aggregate(cell, rnd)[None],
            client_ids=torch.tensor([contracts.AGGREGATE_CLIENT]),
            num_samples=obs["num_samples"].sum()[None],
            meta=meta,
        )
    part = pd.read_parquet(cell["history"].parent / "partition.parquet")
    n_eval = int(part["eval"].sum())
    assert sorted(set(agg["round"])) == rounds and len(agg) == len(rounds) * n_eval
    ref_file, _ = measure(
        cell, digits_files, tmp_path, aggregate=False, observed=alone, rounds=rounds
    )
    ref = io.read_parquet(ref_file, "measures")
    keys = ["round", "client_id", "sample_id"]
    pd.testing.assert_frame_equal(agg[keys], ref[keys])
    assert (agg["correct"] == ref["correct"]).mean() >= 0.99
    for col in contracts.MEASURES + ("confidence",):
        np.testing.assert_allclose(agg[col], ref[col], rtol=1e-5, atol=1e-6, err_msg=col)


def test_the_uploads_table_is_unchanged_by_the_aggregate(cell, measured):
    """Without the aggregate no other file is written (``measured``); the measure table of a
    run with it holds the rows of the run without it (the same keys, the same values)."""
    with_agg, _, without = measured
    a = io.read_parquet(with_agg, "measures")
    b = io.read_parquet(without, "measures")
    assert (b["client_id"] >= 0).all()
    keys = ["round", "client_id", "sample_id"]
    pd.testing.assert_frame_equal(a[keys], b[keys])
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-5, atol=1e-6)


def test_aggregate_needs_the_manifest(cell, digits_files, tmp_path):
    with pytest.raises(ValueError, match="pass manifest_file"):
        pipeline.measure(
            data=digits_files,
            partition_file=cell["history"].parent / "partition.parquet",
            observed_dir=cell["observed"],
            rounds=ROUNDS,
            device="cpu",
            output=tmp_path / "mdm.parquet",
            aggregate_output=tmp_path / "agg.parquet",
        )
    assert not list(tmp_path.iterdir())


def test_a_cell_diverged_before_any_observed_round_has_empty_tables(
    train_cell, digits_files, tmp_path
):
    out = train_cell(
        tmp_path / "cell", PART, TRAIN, TINY_CELL, {"kind": "dp_param_noise", "sigma": 1e30}
    )
    assert io.read_manifest(out["manifest"])["observed_rounds"] == []
    mdm, agg = measure(out, digits_files, tmp_path)
    for f in (mdm, agg):
        table = io.read_parquet(f, "measures")
        assert len(table) == 0
        assert list(table.dtypes.astype(str).items()) == list(contracts.MEASURE_DTYPES.items())


def test_recorded_weights_are_data_shares():
    """An imported recording's manifest says ``recorded``: the data shares (Flower's FedAvg)."""
    man = {"aggregation_weights": "recorded", "seed": 0, "view": {"num_clients": 4}}
    server = ServerWeights.from_manifest(man, "manifest.json")
    assert server.rule == "data_size"
    got = server.weights(5, torch.tensor([10, 30]))
    assert got.tolist() == [0.25, 0.75]
    with pytest.raises(contracts.FormatError, match="aggregation_weights is 'median'"):
        ServerWeights.from_manifest({**man, "aggregation_weights": "median"}, "m.json")


@pytest.mark.workflow
def test_dry_run_plans_the_aggregate_measures(snakemake_cmd, repo, tmp_path):
    """threat.view [uploads, aggregate]: the measure job writes the aggregate's table;
    without the view no rule makes it."""
    cfg = yaml.safe_load((repo / ".test" / "config" / "config.yaml").read_text())
    target = "results/mdm/digits/alexnet/none/iid/seed0.aggregate.parquet"
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(cfg))
    r = smk(snakemake_cmd, repo, tmp_path, plain, "-n", target)
    assert r.returncode != 0 and "MissingRuleException" in r.stdout + r.stderr
    cfg["threat"] = {"view": ["uploads", "aggregate"]}
    both = tmp_path / "both.yaml"
    both.write_text(yaml.safe_dump(cfg))
    r = smk(snakemake_cmd, repo, tmp_path, both, "-n", target)
    assert r.returncode == 0, r.stderr
    out = r.stdout + r.stderr
    assert target in out and "results/mdm/digits/alexnet/none/iid/seed0.parquet" in out
