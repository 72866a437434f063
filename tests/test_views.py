"""The threat views (issue 22) in the attack stage: the aggregate view's contrast attacks,
the federation membership level, and the rows of every view and level."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from fedmia.attacker.attacks import (
    ATTACKS,
    FEDERATION_CLIENT,
    OfficialProtocol,
    contrast_lambda,
    federation_owner,
    participation_contrast,
    run_attacks_with_replicates,
    strongest_upload,
)
from fedmia.attacker.metrics import roc_auc
from fedmia.core.config import ConfigError
from fedmia.core.contracts import (
    AGGREGATE_CLIENT,
    ATTACK_COLUMNS,
    CELL_KEYS,
    FEDERATION_TARGET,
    MEASURE_DTYPES,
    MEASURES,
)
from fedmia.stages import io
from fedmia.stages.attack import attack, took_part
from fedmia.workflow import load_workflow_config
from test_attacks import world

K, M = 5, 3
#: every 3-of-5 subset once: a balanced uniform design (λ = 2/3); 2 references a round
SUBSETS = list(itertools.combinations(range(K), M))
ROUNDS = list(range(1, len(SUBSETS) + 1))
CELL = {"dataset": "digits", "model": "alexnet", "defense": "none", "partition": "iid", "seed": 0}
FAST = {"bootstrap": 0, "roc_points": 20, "official": {"draws": 2}}


def design(subsets, k):
    """Bool R×K: client k takes part in round r."""
    took = np.zeros((len(subsets), k), dtype=bool)
    for r, s in enumerate(subsets):
        took[r, list(s)] = True
    return took


# ------------------------------------------------------------------- the contrast itself


@pytest.mark.parametrize("k,m", [(4, 2), (5, 3), (6, 2)])
def test_the_contrast_of_the_aggregates_recovers_the_target_s_term_uniform(k, m):
    """Fixed planted updates u_k = a_k Δ_k, every m-of-K subset once: c_t = u_t exactly."""
    rng = np.random.default_rng(k * 10 + m)
    u = rng.normal(size=(k, 7))
    took = design(list(itertools.combinations(range(k), m)), k)
    aggregates = took.astype(float) @ u  # R×P: A_r = Σ_{k∈S_r} u_k
    lam = contrast_lambda("uniform", m)
    assert lam == (m - 1) / m
    for t in range(k):
        got = participation_contrast(aggregates, took[:, t], lam)
        np.testing.assert_allclose(got, u[t], rtol=0, atol=1e-12)
        # λ = 1 leaves the others' share: the test can fail
        assert np.abs(participation_contrast(aggregates, took[:, t], 1.0) - u[t]).max() > 1e-3


def test_the_contrast_recovers_the_target_s_term_on_a_poisson_design():
    """Every subset once (the empty one too): inclusion independent of t, λ = 1."""
    k = 5
    rng = np.random.default_rng(1)
    u = rng.normal(size=(k, 3))
    subsets = [s for n in range(k + 1) for s in itertools.combinations(range(k), n)]
    took = design(subsets, k)
    lam = contrast_lambda("poisson", 2)
    assert lam == 1.0
    for t in range(k):
        got = participation_contrast(took.astype(float) @ u, took[:, t], lam)
        np.testing.assert_allclose(got, u[t], rtol=0, atol=1e-12)


def test_the_contrast_needs_rounds_in_and_out():
    values = np.arange(6.0).reshape(3, 2)
    with pytest.raises(ValueError, match="took part in 3 of 3"):
        participation_contrast(values, np.ones(3, bool), 0.5)
    with pytest.raises(ValueError, match="took_part has shape"):
        participation_contrast(values, np.ones(2, bool), 0.5)
    with pytest.raises(ValueError, match="uniform .* and poisson"):
        contrast_lambda("recorded", 2)


# ------------------------------------------------------------- a sampled synthetic cell


@pytest.fixture(scope="module")
def cell_world():
    """K = 5 clients, rounds 1..10 = every 3-of-5 subset; the uploads' and the aggregate's
    measure tables (the aggregate's values planted apart from the uploads')."""
    full, owner = world(separation=1.0, k=K, per_client=20, held_out=40, rounds=tuple(ROUNDS))
    took = design(SUBSETS, K)
    keep = took[full["round"].to_numpy() - 1, full["client_id"].to_numpy()]
    mdm = full[keep].reset_index(drop=True)
    rng = np.random.default_rng(5)
    sample_ids = np.sort(owner.index.to_numpy())
    rr, ss = np.meshgrid(ROUNDS, sample_ids, indexing="ij")
    own = owner.reindex(ss.ravel()).to_numpy()
    # the aggregate's loss is lower and its cosine higher for the round's participants' data
    inside = took[rr.ravel() - 1, np.maximum(own, 0)] & (own >= 0)
    aggregate = pd.DataFrame(
        {
            "round": rr.ravel(),
            "client_id": AGGREGATE_CLIENT,
            "sample_id": ss.ravel(),
            "loss": 2.0 - 0.8 * inside + rng.random(rr.size),
            "logit_conf": rng.random(rr.size),
            "cos": 0.8 * inside + rng.random(rr.size),
            "grad_diff": 0.5 * inside + rng.random(rr.size),
            "grad_norm": rng.random(rr.size),
            "correct": True,
            "confidence": 0.5,
        }
    )
    return mdm, aggregate.astype(MEASURE_DTYPES), owner


def _signed_aggregate(aggregate, measure, sign, sample_ids):
    """R×N ``sign × measure`` of the aggregate table, by explicit lookup."""
    out = np.empty((len(ROUNDS), len(sample_ids)))
    for (r, s), v in aggregate.set_index(["round", "sample_id"])[measure].items():
        out[ROUNDS.index(r), int(np.searchsorted(sample_ids, s))] = sign * v
    return out


def test_contrast_attacks_score_as_a_slow_reference(cell_world):
    mdm, aggregate, owner = cell_world
    took = took_part(mdm[["round", "client_id"]], K)
    assert (took.to_numpy() == design(SUBSETS, K)).all()
    attacked = [2, 3, 7, 8, 9]  # client 0 is in rounds 1..6: In {2, 3}, Out {7, 8, 9}
    res, reps = run_attacks_with_replicates(
        ["contrast_loss", "contrast_cos"],
        aggregate,
        owner,
        attack_rounds=attacked,
        protocols=["aligned"],
        n_boot=0,
        view="aggregate",
        participants=took,
        lam=2 / 3,
    )
    assert reps.empty
    sample_ids = np.sort(owner.index.to_numpy())
    for name, (measure, sign) in (("contrast_loss", ("loss", -1)), ("contrast_cos", ("cos", 1))):
        s = _signed_aggregate(aggregate, measure, sign, sample_ids)
        table = res[name].set_index("target")
        assert (table["view"] == "aggregate").all() and (table["membership"] == "client").all()
        for t in range(K):
            in_, out = [], []
            for r in attacked:
                (in_ if t in SUBSETS[r - 1] else out).append(r)
            if not in_ or not out:  # client 1 takes part in all five: no row
                assert t == 1 and t not in table.index
                continue
            score = np.zeros(len(sample_ids))
            for i in range(len(sample_ids)):
                mean_in = sum(s[r - 1, i] for r in in_) / len(in_)
                mean_out = sum(s[r - 1, i] for r in out) / len(out)
                score[i] = mean_in - 2 / 3 * mean_out
            member = owner.reindex(sample_ids).to_numpy() == t
            assert table.loc[t, "auc"] == pytest.approx(roc_auc(score, member), abs=1e-12)
            assert table.loc[t, "n_rounds"] == len(attacked) and table.loc[t, "round"] == -1
    # a target without an Out round among the attacked rounds has no row
    only_in = run_attacks_with_replicates(
        ["contrast_loss"],
        aggregate,
        owner,
        attack_rounds=[1, 2, 3],  # clients 0 and 1 take part in all three
        protocols=["aligned", "official"],
        official=OfficialProtocol(draws=2),
        n_boot=5,
        view="aggregate",
        participants=took,
        lam=2 / 3,
    )[0]["contrast_loss"]
    assert set(only_in["target"]) == {2, 3, 4}
    assert set(only_in["protocol"]) == {"aligned", "official"}


def test_the_strongest_upload_is_the_max_over_the_round_s_participants(cell_world):
    mdm, _, owner = cell_world
    table = strongest_upload(mdm, [("loss", -1), ("cos", 1)], partial=True)
    assert set(table["client_id"]) == {FEDERATION_CLIENT}
    got = table.set_index(["round", "sample_id"])
    by_key = mdm.set_index(["round", "client_id", "sample_id"])
    for r in (1, 4):
        for s in owner.index[:15]:
            for measure, sign in (("loss", -1), ("cos", 1)):
                best = -np.inf
                for c in SUBSETS[r - 1]:
                    best = max(best, sign * by_key.loc[(r, c, s), measure])
                assert sign * got.loc[(r, s), measure] == best
    res = run_attacks_with_replicates(
        ["loss", "cos_series"],
        table,
        federation_owner(owner),
        [FEDERATION_CLIENT],
        official=OfficialProtocol(draws=2),
        n_boot=5,
        view="uploads",
        membership="federation",
    )[0]
    member = owner.reindex(np.sort(owner.index.to_numpy())).to_numpy() >= 0
    ranked = got["cos"].unstack("sample_id").to_numpy().mean(axis=0)  # the series, by hand
    series = res["cos_series"]
    assert (series["target"] == FEDERATION_TARGET).all()
    assert set(series["protocol"]) == {"aligned", "official", "heldout"}
    aligned = series[series.protocol == "aligned"].iloc[0]
    assert aligned["auc"] == pytest.approx(roc_auc(ranked, member), abs=1e-12)
    assert (aligned["n_members"], aligned["n_nonmembers"]) == (K * 20, 40)
    heldout = series[series.protocol == "heldout"].iloc[0]
    assert heldout["auc"] == aligned["auc"]  # every non-member is held out
    assert (res["loss"]["membership"] == "federation").all()


# -------------------------------------------------------------------------- the stage


def _files(tmp_path, mdm, aggregate, owner, *, fraction=0.5):
    part = pd.DataFrame(
        {
            "sample_id": owner.index.to_numpy(np.int64),
            "client_id": owner.to_numpy(np.int32),
            "eval": True,
        }
    )
    io.write_parquet(part, tmp_path / "partition.parquet", "partition")
    dtypes = {c: t for c, t in MEASURE_DTYPES.items() if c in mdm}
    io.write_parquet(mdm.astype(dtypes), tmp_path / "mdm.parquet", "measures")
    io.write_parquet(aggregate, tmp_path / "agg.parquet", "measures")
    manifest = {
        "observed_rounds": ROUNDS,
        "diverged_round": None,
        "participation": {"fraction": fraction, "sampling": "uniform"},
    }
    io.write_manifest(manifest, tmp_path / "manifest.json")


NAMES = ["loss", "cos_series", "fedmia_loss", "contrast_loss", "contrast_cos"]


def _stage(tmp_path, out, views, names=NAMES, **extra):
    """The stage under ``views`` (``None``: its default, and no aggregate file)."""
    outputs = {n: tmp_path / out / f"{n}.parquet" for n in names}
    (tmp_path / out).mkdir(exist_ok=True)
    given = {} if views is None else {"views": views, "aggregate_file": tmp_path / "agg.parquet"}
    attack(
        measures_file=tmp_path / "mdm.parquet",
        partition_file=tmp_path / "partition.parquet",
        cell=CELL,
        rounds=ROUNDS,
        manifest_file=tmp_path / "manifest.json",
        config={"attacks": names, **FAST},
        **given,
        outputs={**outputs, **extra},
    )
    return {n: pd.read_parquet(p) for n, p in outputs.items()}


def _levels(table):
    return set(zip(table["view"], table["membership"], strict=True))


def test_the_stage_writes_every_view_and_level(cell_world, tmp_path):
    mdm, aggregate, owner = cell_world
    _files(tmp_path, mdm, aggregate, owner)
    res = _stage(tmp_path, "both", ["uploads", "aggregate"])
    for table in res.values():
        assert list(table.columns) == list(ATTACK_COLUMNS)
    both = {("uploads", "client"), ("uploads", "federation"), ("aggregate", "federation")}
    assert _levels(res["loss"]) == _levels(res["cos_series"]) == both
    assert _levels(res["fedmia_loss"]) == {("uploads", "client")}
    assert _levels(res["contrast_loss"]) == {("aggregate", "client")}
    fed = res["loss"][res["loss"].membership == "federation"]
    assert (fed["target"] == FEDERATION_TARGET).all()
    contrast = res["contrast_cos"]
    assert set(contrast["target"]) == set(range(K)) and (contrast["n_rounds"] == 10).all()
    assert contrast["auc"].gt(0.5).all()  # planted: the target's rounds lower its loss
    # a contrast attack only under the uploads view: a clear error
    with pytest.raises(ValueError, match=r"\['contrast_loss', 'contrast_cos'\] apply under none"):
        _stage(tmp_path, "bad", ["uploads"])
    with pytest.raises(ValueError, match="pass aggregate_file"):
        attack(
            measures_file=tmp_path / "mdm.parquet",
            partition_file=tmp_path / "partition.parquet",
            cell=CELL,
            views=["aggregate"],
            outputs={},
        )


def test_aggregate_rows_never_read_an_upload_s_values(cell_world, tmp_path):
    """By construction: every per-client measure value replaced by garbage or NaN leaves
    every aggregate-view row as it was."""
    mdm, aggregate, owner = cell_world
    _files(tmp_path, mdm, aggregate, owner)
    want = _stage(tmp_path, "clean", ["uploads", "aggregate"])
    rng = np.random.default_rng(9)
    garbage = mdm.copy()
    for c in MEASURES:
        garbage[c] = rng.normal(size=len(mdm)) * 1e3
    _files(tmp_path, garbage, aggregate, owner)
    dirty = _stage(tmp_path, "garbage", ["uploads", "aggregate"])
    nan = mdm.copy()
    for c in MEASURES:
        nan[c] = np.nan
    _files(tmp_path, nan, aggregate, owner)
    names = ["loss", "cos_series", "contrast_loss", "contrast_cos"]
    blind = _stage(tmp_path, "nan", ["aggregate"], names)
    for name in names:
        a = want[name][want[name].view == "aggregate"].reset_index(drop=True)
        assert len(a) > 0
        pd.testing.assert_frame_equal(
            a, dirty[name][dirty[name].view == "aggregate"].reset_index(drop=True)
        )
        pd.testing.assert_frame_equal(a, blind[name])
    # the uploads rows do change: the test can fail
    u = want["loss"][want["loss"].view == "uploads"]["auc"].to_numpy()
    assert not np.array_equal(u, dirty["loss"][dirty["loss"].view == "uploads"]["auc"].to_numpy())


def test_full_participation_has_no_contrast_row(tmp_path):
    mdm, owner = world(separation=1.0, k=K, per_client=20, held_out=40, rounds=tuple(ROUNDS))
    aggregate = mdm[mdm.client_id == 0].assign(client_id=AGGREGATE_CLIENT)
    _files(tmp_path, mdm, aggregate, owner, fraction=1.0)
    res = _stage(tmp_path, "full", ["uploads", "aggregate"])
    assert res["contrast_loss"].empty and list(res["contrast_loss"].columns) == list(ATTACK_COLUMNS)
    assert len(res["loss"][res["loss"].view == "aggregate"]) > 0


def test_default_views_keep_the_paper_s_rows(cell_world, tmp_path):
    """Default views: the uploads/client rows are run_attacks' of before, the strongest
    upload's federation rows beside them; no aggregate input is read."""
    mdm, aggregate, owner = cell_world
    _files(tmp_path, mdm, aggregate, owner)
    (tmp_path / "agg.parquet").unlink()
    names = ["loss", "cos_series", "fedmia_loss"]
    res = _stage(tmp_path, "default", None, names, replicates=tmp_path / "replicates.parquet")
    want, _ = run_attacks_with_replicates(
        names,
        mdm,
        owner,
        list(range(K)),
        attack_rounds=ROUNDS,
        official=OfficialProtocol(draws=2, seed=0),
        n_boot=0,
        roc_points=20,
        bootstrap_keys=tuple(CELL[k] for k in CELL_KEYS),
        partial=True,
    )
    for n in names:
        got = res[n]
        client = got[got.membership == "client"].drop(columns=[*CELL_KEYS, "attack"])
        pd.testing.assert_frame_equal(
            client.reset_index(drop=True), want[n], check_dtype=False, check_exact=True
        )
        assert set(got["view"]) == {"uploads"}
    assert _levels(res["fedmia_loss"]) == {("uploads", "client")}
    assert "federation" in set(res["loss"]["membership"])


def test_the_config_keeps_the_attacks_of_its_views():
    cfg = yaml.safe_load((Path(__file__).parents[1] / "config" / "config.yaml").read_text())
    spec = load_workflow_config(cfg)
    contrast = [a for a in ATTACKS.registered() if ATTACKS.get(a).kind == "contrast"]
    assert contrast and not set(contrast) & set(spec.attack.attacks)  # uploads only
    cfg = yaml.safe_load((Path(__file__).parents[1] / "config" / "config.yaml").read_text())
    cfg["threat"] = {"view": ["uploads", "aggregate"]}
    assert set(contrast) <= set(load_workflow_config(cfg).attack.attacks)
    cfg = yaml.safe_load((Path(__file__).parents[1] / "config" / "config.yaml").read_text())
    cfg["attack"] = {"attacks": ["loss", "contrast_cos"]}
    with pytest.raises(ConfigError, match=r"'attack.attacks': \['contrast_cos'\] apply under"):
        load_workflow_config(cfg)


def test_a_client_that_never_took_part_has_no_row_under_either_view(cell_world, tmp_path):
    """The earliest form of a sampled target: client 4 in no round (no upload, no In round)."""
    mdm, aggregate, owner = cell_world
    _files(tmp_path, mdm[mdm.client_id != 4], aggregate, owner)
    res = _stage(tmp_path, "never", ["uploads", "aggregate"])
    for name in ("loss", "fedmia_loss", "contrast_loss", "contrast_cos"):
        client = res[name][res[name].membership == "client"]
        assert len(client) > 0 and 4 not in set(client["target"])
    assert set(res["contrast_cos"]["target"]) == set(range(4))


def test_a_cell_diverged_before_its_first_observed_round_writes_empty_tables(tmp_path):
    """Both views of a cell that diverged in round 1: every table empty, with its columns."""
    _, owner = world(separation=1.0, k=K, per_client=20, held_out=40, rounds=tuple(ROUNDS))
    empty = pd.DataFrame({c: pd.Series(dtype=t) for c, t in MEASURE_DTYPES.items()})
    _files(tmp_path, empty, empty, owner)
    manifest = io.read_manifest(tmp_path / "manifest.json")
    io.write_manifest({**manifest, "diverged_round": 1}, tmp_path / "manifest.json")
    res = _stage(tmp_path, "diverged", ["uploads", "aggregate"])
    for table in res.values():
        assert table.empty and list(table.columns) == list(ATTACK_COLUMNS)
