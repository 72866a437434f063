"""Partial participation (``train.participation``): the draw, training, the recorded view."""

from __future__ import annotations

import json
import math
from pathlib import Path

import dp_accounting
import mpmath as mp
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from dp_accounting.rdp import rdp_privacy_accountant as rdp_accountant
from scipy.special import ndtr

from conftest import TINY_CELL as CELL
from conftest import TINY_TRAIN as TRAIN
from fedmia import pipeline
from fedmia.attacker.attacks import MeasureCube, OfficialProtocol, attack_scores, run_attacks
from fedmia.core.config import ConfigError, Participation, TrainConfig
from fedmia.federation.defenses import Defense, DPDefense
from fedmia.federation.fedavg import participants, run_fedavg
from fedmia.federation.partition import STREAM_PARTICIPATION, rng_for
from fedmia.federation.state import FlatState
from fedmia.privacy.accounting import (
    accounted_epsilon,
    client_epsilons,
    observer_epsilon,
    record_epsilon,
)
from fedmia.privacy.events import cell_privacy, event_from_dict
from fedmia.report.tables import caption, summarize
from fedmia.stages import io
from fedmia.stages.report import epsilons
from fedmia.stages.train import _history_rows, round_participants
from fedmia.workflow import load_workflow_config
from test_attacks import world
from test_fedavg import hand_round, tiny_data, tiny_model


def test_participation_is_typed_with_defaults_and_checked():
    assert TrainConfig().participation == Participation(fraction=1.0, sampling="uniform")
    cfg = TrainConfig.from_dict({"participation": {"fraction": 0.5}})
    assert cfg.participation == Participation(fraction=0.5, sampling="uniform")
    assert cfg.to_dict()["participation"] == {"fraction": 0.5, "sampling": "uniform"}
    with pytest.raises(ConfigError, match=r"at 'train.participation.fraction': 0 is less"):
        TrainConfig.from_dict({"participation": {"fraction": 0}})
    with pytest.raises(ConfigError, match=r"at 'train.participation.sampling': 'bernoulli'"):
        TrainConfig.from_dict({"participation": {"sampling": "bernoulli"}})


def test_partial_participation_observes_and_attacks_every_round():
    full = TrainConfig(rounds=30)
    assert full.every_rounds() == [10, 20, 30] and full.observed() == [1, 10, 20, 30]
    for sampling in ("uniform", "poisson"):
        part = TrainConfig(rounds=30, participation={"fraction": 0.1, "sampling": sampling})
        assert part.every_rounds() == part.observed() == list(range(1, 31))
    # poisson at q = 1 is every client every round
    assert TrainConfig(
        rounds=30, participation={"fraction": 1.0, "sampling": "poisson"}
    ).every_rounds() == [10, 20, 30]


@pytest.mark.parametrize(
    "fraction, k, m",
    [(0.1, 50, 5), (0.5, 10, 5), (0.25, 10, 3), (0.01, 10, 1), (0.99, 10, 10), (1.0, 7, 7)],
)
def test_uniform_draws_round_fk_clients_half_up_at_least_one(fraction, k, m):
    p = Participation(fraction=fraction, sampling="uniform")
    assert p.size(k) == m
    got = participants(p, seed=4, rnd=3, k=k)
    assert len(got) == m == len(set(got.tolist())) and (np.diff(got) > 0).all()
    assert 0 <= got.min() and got.max() < k


def test_draws_are_seeded_per_round_and_match_a_reference():
    p = Participation(fraction=0.3, sampling="poisson")
    k = 40
    # the reference: one coin per client from (seed, round) on the participation stream
    coins = rng_for(9, STREAM_PARTICIPATION, 2).random(k)
    assert participants(p, 9, 2, k).tolist() == [c for c in range(k) if coins[c] < 0.3]
    u = Participation(fraction=0.3, sampling="uniform")
    want = sorted(rng_for(9, STREAM_PARTICIPATION, 2).choice(k, 12, replace=False).tolist())
    assert participants(u, 9, 2, k).tolist() == want
    for q in (p, u):
        assert participants(q, 9, 2, k).tolist() == participants(q, 9, 2, k).tolist()
        draws = {tuple(participants(q, s, r, k)) for s in (0, 1) for r in (1, 2, 3)}
        assert len(draws) == 6  # another seed or round, another draw
    # poisson: each client in about a fraction q of the rounds
    rate = np.mean([len(participants(p, 0, r, k)) for r in range(1, 501)]) / k
    assert rate == pytest.approx(0.3, abs=0.01)
    assert participants(Participation(fraction=1.0, sampling="poisson"), 0, 1, 5).tolist() == [
        0,
        1,
        2,
        3,
        4,
    ]


def _run(cfg, client_idx, defense=None, seed=3):
    st = FlatState(tiny_model())
    recs = []
    for rec in run_fedavg(
        st, tiny_data(), client_idx, torch.arange(35, 40), cfg, defense or Defense(), seed=seed
    ):
        recs.append((rec, rec.global_flat.clone(), rec.uploads.clone()))
    return st, recs


CLIENTS = [torch.arange(0, 6), torch.arange(6, 16), torch.arange(16, 25), torch.arange(25, 35)]


def test_only_participants_train_and_their_data_weighted_average_is_applied():
    cfg = TrainConfig(
        rounds=1, batch_size=4, lr=0.1, participation={"fraction": 0.5, "sampling": "uniform"}
    )
    part = participants(cfg.participation, 3, 1, 4).tolist()
    model0 = tiny_model()
    st, [(rec, sent, ups)] = _run(cfg, CLIENTS)
    assert rec.participants == part and len(part) == 2 and ups.shape[0] == 2
    sizes = [len(CLIENTS[c]) for c in part]
    assert rec.num_samples == sizes
    assert rec.weights == pytest.approx([n / sum(sizes) for n in sizes])
    hands = [
        hand_round(model0, tiny_data(), CLIENTS[c], cfg, seed=3, rnd=1, client=c) for c in part
    ]
    final = st.module.state_dict()
    for e in st.layout.entries:
        want = sum(n * h[e.name] for n, h in zip(sizes, hands, strict=True)) / sum(sizes)
        torch.testing.assert_close(final[e.name], want, rtol=1e-5, atol=1e-6)
    # a client's upload does not depend on who else takes part
    full_cfg = TrainConfig(rounds=1, batch_size=4, lr=0.1)
    _, [(full, _, full_ups)] = _run(full_cfg, CLIENTS)
    torch.testing.assert_close(ups, full_ups[part], rtol=0, atol=0)


def test_a_round_with_one_participant_applies_its_update_whole():
    cfg = TrainConfig(
        rounds=2, batch_size=4, lr=0.1, participation={"fraction": 0.1, "sampling": "uniform"}
    )
    st, recs = _run(cfg, CLIENTS)
    ends = [g for _, g, _ in recs[1:]] + [st.flat]
    for (rec, sent, ups), end in zip(recs, ends, strict=True):
        assert len(rec.participants) == 1 and rec.weights == [1.0]
        torch.testing.assert_close(end, sent - ups[0])


def test_dp_with_poisson_divides_by_the_fixed_expected_count():
    q = 0.5
    cfg = TrainConfig(
        rounds=6, batch_size=4, lr=0.1, participation={"fraction": q, "sampling": "poisson"}
    )
    st, recs = _run(cfg, CLIENTS, DPDefense(sigma=0.01, clip=0.5), seed=1)
    ends = [g for _, g, _ in recs[1:]] + [st.flat]
    sizes = {len(r.participants) for r, _, _ in recs}
    assert len(sizes) > 1  # the number of participants varies
    for (rec, sent, ups), end in zip(recs, ends, strict=True):
        assert rec.weights == [pytest.approx(1 / (q * 4))] * len(rec.participants)
        torch.testing.assert_close(end, sent - ups.sum(0) / (q * 4))
    # dp with uniform sampling: 1/m
    cfg = TrainConfig(
        rounds=1, batch_size=4, lr=0.1, participation={"fraction": 0.75, "sampling": "uniform"}
    )
    _, [(rec, _, _)] = _run(cfg, CLIENTS, DPDefense(sigma=0.01, clip=0.5))
    assert rec.weights == [pytest.approx(1 / 3)] * 3


def test_a_round_without_participants_keeps_the_model():
    cfg = TrainConfig(
        rounds=12, batch_size=4, lr=0.1, participation={"fraction": 0.1, "sampling": "poisson"}
    )
    draws = [participants(cfg.participation, 0, r, 4).tolist() for r in range(1, 13)]
    assert [] in draws and any(draws)  # this seed has rounds with and without participants
    st, recs = _run(cfg, CLIENTS, seed=0)
    ends = [g for _, g, _ in recs[1:]] + [st.flat]
    for (rec, sent, ups), end, want in zip(recs, ends, draws, strict=True):
        assert rec.participants == want and ups.shape[0] == len(want)
        if not want:
            assert rec.weights == [] and torch.equal(end, sent)
        else:
            assert not torch.equal(end, sent)


def test_the_manifest_records_each_rounds_participants_from_the_history():
    """round_participants (the secure-aggregation ε's m per round) reads the history's rows."""
    cfg = TrainConfig(
        rounds=12, batch_size=4, lr=0.1, participation={"fraction": 0.5, "sampling": "poisson"}
    )
    draws = [participants(cfg.participation, 0, r, 4).tolist() for r in range(1, 13)]
    _, recs = _run(cfg, CLIENTS, seed=0)
    history = pd.DataFrame([row for rec, _, _ in recs for row in _history_rows(rec)])
    assert round_participants(history, 12) == draws
    assert round_participants(history, 14)[-2:] == [[], []]  # rounds never run: nobody


PART = dict(
    kind="iid", num_clients=4, samples_per_client=15, eval_members_per_client=5, eval_nonmembers=20
)


def _cell(train_cell, out, participation):
    """The tiny cell of 4 clients with ``train.participation``."""
    return train_cell(out, PART, {**TRAIN, "participation": participation}, CELL)


@pytest.fixture(scope="module")
def sampled_cell(train_cell, tmp_path_factory):
    return _cell(
        train_cell, tmp_path_factory.mktemp("sampled"), {"fraction": 0.25, "sampling": "uniform"}
    )


def test_the_participants_are_recorded_in_history_view_and_manifest(sampled_cell):
    part = Participation(fraction=0.25, sampling="uniform")
    want = {r: participants(part, 0, r, 4).tolist() for r in range(1, 5)}
    hist = pd.read_parquet(sampled_cell["history"])
    clients = hist[hist.client_id >= 0]
    assert {r: g.client_id.tolist() for r, g in clients.groupby("round")} == want
    observed = sorted(p.name for p in sampled_cell["observed"].iterdir())
    assert observed == [f"round{r:04d}.safetensors" for r in range(1, 5)]  # every round
    for r in range(1, 5):
        obs = io.load_observed(io.round_file(sampled_cell["observed"], r))
        assert obs["client_ids"].tolist() == want[r] and obs["uploads"].shape[0] == 1
        assert obs["num_samples"].tolist() == [15]
    manifest = io.read_manifest(sampled_cell["manifest"])
    counts = np.bincount(sum(want.values(), []), minlength=4).tolist()
    assert 0 in counts  # a client that never took part: 4 rounds of 1 of 4 clients
    assert manifest["participation"] == {
        "fraction": 0.25,
        "sampling": "uniform",
        "client_rounds": counts,
    }
    assert manifest["observed_rounds"] == [1, 2, 3, 4]


def test_measures_hold_the_participants_only(sampled_cell, digits_files, tmp_path):
    out = tmp_path / "mdm.parquet"
    pipeline.measure(
        data=digits_files,
        partition_file=sampled_cell["history"].parent / "partition.parquet",
        observed_dir=sampled_cell["observed"],
        rounds=[1, 2, 3, 4],
        device="cpu",
        threads=1,
        output=out,
    )
    mdm = pd.read_parquet(out)
    part = Participation(fraction=0.25, sampling="uniform")
    for r in range(1, 5):
        assert sorted(set(mdm[mdm["round"] == r].client_id)) == participants(part, 0, r, 4).tolist()


def test_full_participation_is_the_run_of_before(train_cell, tmp_path):
    """fraction 1.0 (either sampling) gives the files of a run without the key."""
    runs = {}
    for name, participation in (
        ("uniform", {"fraction": 1.0}),
        ("poisson", {"fraction": 1.0, "sampling": "poisson"}),
    ):
        runs[name] = _cell(train_cell, tmp_path / name, participation)
    base = train_cell(tmp_path / "default", PART, TRAIN, CELL)
    for run in runs.values():
        for key in ("final", "history"):
            assert run[key].read_bytes() == base[key].read_bytes()
        for r in (1, 2, 4):
            assert (
                io.round_file(run["observed"], r).read_bytes()
                == io.round_file(base["observed"], r).read_bytes()
            )
    assert io.read_manifest(base["manifest"])["participation"] == {
        "fraction": 1.0,
        "sampling": "uniform",
        "client_rounds": [4, 4, 4, 4],
    }


# ------------------------------------------------------------------ attacks (step 2)

#: who took part in which of rounds 1..5 (K = 5); client 4 never does; in round 3 the
#: target 0 has only one other participant; round 5 has client 1 alone
PRESENT = {1: [0, 1, 2, 3], 2: [0, 2, 3], 3: [0, 1], 4: [1, 2, 3], 5: [1]}


@pytest.fixture(scope="module")
def sampled_world():
    mdm, owner = world(separation=1.0, rounds=tuple(PRESENT))
    keep = np.zeros(len(mdm), dtype=bool)
    for r, clients in PRESENT.items():
        keep |= (mdm["round"] == r).to_numpy() & mdm["client_id"].isin(clients).to_numpy()
    return mdm[keep].reset_index(drop=True), owner, mdm


def _signed(mdm, measure, sign, rnd, client, sample_ids):
    g = mdm[(mdm["round"] == rnd) & (mdm["client_id"] == client)].set_index("sample_id")
    return sign * g[measure].reindex(sample_ids).to_numpy()


def test_a_target_is_scored_in_the_rounds_it_took_part_in(sampled_world):
    mdm, owner, _ = sampled_world
    names = ["loss", "loss_series", "fedmia_loss", "fedmia_cos", "lira_conf", "rmia"]
    everything = run_attacks(
        names, mdm, owner, n_boot=10, official=OfficialProtocol(draws=1), partial=True
    )
    took = {c: [r for r, cl in PRESENT.items() if c in cl] for c in range(5)}
    # with references: the rounds with >= 2 other participants
    refs = {c: [r for r in took[c] if len(PRESENT[r]) - 1 >= 2] for c in range(4)}
    assert refs == {0: [1, 2], 1: [1, 4], 2: [1, 2, 4], 3: [1, 2, 4]}
    for protocol in ("aligned", "official", "heldout"):
        res = {n: t[t.protocol == protocol] for n, t in everything.items()}
        # single-round: a row per round the target took part in; client 4 is no target
        assert {t: sorted(g["round"]) for t, g in res["loss"].groupby("target")} == {
            c: took[c] for c in range(4)
        }
        series = res["loss_series"].set_index("target")["n_rounds"].to_dict()
        assert series == {c: len(took[c]) for c in range(4)}
        for name in ("fedmia_loss", "fedmia_cos", "lira_conf", "rmia"):
            assert res[name].set_index("target")["n_rounds"].to_dict() == {
                c: len(refs[c]) for c in range(4)
            }
            assert res[name]["auc"].notna().all()


def test_fedmia_references_are_the_round_s_other_participants(sampled_world):
    """FedMIA-I of target 0 by hand: Φ((s_t − μ)/σ) against the round's other participants."""
    mdm, owner, _ = sampled_world
    sample_ids = np.sort(mdm["sample_id"].unique())
    per_round = []
    for r in (1, 2):  # round 3 has one other participant only: skipped
        t = _signed(mdm, "loss", -1, r, 0, sample_ids)
        ref = np.stack([_signed(mdm, "loss", -1, r, c, sample_ids) for c in PRESENT[r] if c != 0])
        per_round.append(ndtr((t - ref.mean(0)) / np.sqrt(ref.var(0) + 1e-8)))
    want = np.mean(per_round, axis=0)
    got = attack_scores("fedmia_loss", mdm_cube(mdm), 0)
    np.testing.assert_allclose(got["score"].to_numpy(), want, rtol=1e-12)
    series = attack_scores("loss_series", mdm_cube(mdm), 0)
    np.testing.assert_allclose(
        series["score"].to_numpy(),
        np.mean([_signed(mdm, "loss", -1, r, 0, sample_ids) for r in (1, 2, 3)], axis=0),
        rtol=1e-12,
    )
    # rounds 3 and 5 give client 1 at most one other participant: no FedMIA score
    few = mdm_cube(mdm[mdm["round"].isin([3, 5])])
    assert len(attack_scores("fedmia_loss", few, 1)) == 0
    assert len(attack_scores("loss_series", few, 1)) == len(sample_ids)


def mdm_cube(mdm):
    return MeasureCube.from_frame(mdm, ["loss", "cos"], partial=True)


def test_a_full_table_read_as_partial_gives_the_same_results(sampled_world):
    _, owner, full = sampled_world
    names = ["loss", "cos_series", "fedmia_cos", "lira_conf_cos_sum", "rmia_sum"]
    a = run_attacks(names, full, owner, n_boot=20, official=OfficialProtocol(draws=2))
    b = run_attacks(names, full, owner, n_boot=20, official=OfficialProtocol(draws=2), partial=True)
    for name in names:
        pd.testing.assert_frame_equal(a[name], b[name])


def test_a_partial_table_is_refused_unless_participation_is_sampled(sampled_world):
    mdm, owner, _ = sampled_world
    with pytest.raises(ValueError, match=r"round 2 lacks client\(s\) \[1\]"):
        run_attacks(["loss"], mdm, owner, n_boot=0)
    lacking = mdm.drop(index=mdm.index[(mdm["round"] == 1) & (mdm["client_id"] == 2)][:3])
    with pytest.raises(ValueError, match="every participant needs every sample in its rounds"):
        run_attacks(["loss"], lacking, owner, n_boot=0, partial=True)


def test_the_attack_stage_and_attacks_csv_on_a_sampled_cell(digits_files, train_cell, tmp_path):
    """3 of 4 clients per round: each target's rounds, the table's participation column."""
    out = _cell(train_cell, tmp_path, {"fraction": 0.75, "sampling": "uniform"})
    mdm_file = tmp_path / "mdm.parquet"
    pipeline.measure(
        data=digits_files,
        partition_file=tmp_path / "partition.parquet",
        observed_dir=out["observed"],
        rounds=[1, 2, 3, 4],
        device="cpu",
        threads=1,
        output=mdm_file,
    )
    names = ["loss", "loss_series", "fedmia_loss"]
    files = {n: tmp_path / f"{n}.parquet" for n in names}
    pipeline.attack(
        measures_file=mdm_file,
        partition_file=tmp_path / "partition.parquet",
        cell=CELL,
        rounds=[1, 2, 3, 4],
        manifest_file=out["manifest"],
        config={"attacks": names, "protocol": "aligned", "rounds": [1, 2, 3, 4], "bootstrap": 0},
        outputs=files,
    )
    counts = io.read_manifest(out["manifest"])["participation"]["client_rounds"]
    read = lambda n: pd.read_parquet(files[n]).query("membership == 'client'")  # noqa: E731
    series = read("loss_series").set_index("target")["n_rounds"]
    assert series.to_dict() == {c: n for c, n in enumerate(counts) if n}
    fedmia = read("fedmia_loss").set_index("target")["n_rounds"]
    assert fedmia.to_dict() == series.to_dict()  # 2 others in every round
    single = read("loss")
    assert single.groupby("target").size().to_dict() == series.to_dict()
    results = pd.concat([read(n) for n in files], ignore_index=True)
    table = summarize(results, ["last"], cells=io.cells_frame([out["manifest"]]))
    assert (table["participation"] == 0.75).all()
    multi = table[table["attack"] == "loss_series"].iloc[0]
    assert (
        multi["target_rounds_min"] == min(series)
        and multi["target_rounds_max"] == max(series)
        and multi["target_rounds_mean"] == pytest.approx(series.mean())
    )
    assert table[table["attack"] == "loss"]["target_rounds_mean"].isna().all()


# --------------------------------------------------------------- accounting (step 3)

DELTA = 1e-5
INTEGER_ORDERS = list(range(2, 64))


def independent_epsilon(rdp_at, rounds: int, delta: float = DELTA) -> float:
    """ε at δ from per-round RDP at the integer orders (Canonne, Kamath & Steinke 2020,
    Prop. 12: ε = min_α r(α) + log(1 − 1/α) − log(δα)/(α − 1))."""
    return min(
        rounds * rdp_at(a) + math.log1p(-1 / a) - math.log(delta * a) / (a - 1)
        for a in INTEGER_ORDERS
    )


def poisson_gaussian_rdp(q: float, z: float, alpha: int) -> float:
    """RDP of the Poisson-subsampled Gaussian at integer α (Mironov, Talwar & Zhang 2019,
    add-or-remove): log Σ_k C(α,k) (1−q)^(α−k) q^k e^((k²−k)/(2z²)) / (α − 1)."""
    mp.mp.dps = 60
    a = sum(
        mp.binomial(alpha, k)
        * (1 - mp.mpf(q)) ** (alpha - k)
        * mp.mpf(q) ** k
        * mp.e ** (mp.mpf(k * k - k) / (2 * z * z))
        for k in range(alpha + 1)
    )
    return float(mp.log(a) / (alpha - 1))


def wor_gaussian_rdp(q: float, z: float, alpha: int) -> float:
    """RDP of the Gaussian under sampling without replacement, replace-one, at integer α
    (Wang, Balle & Kasiviswanathan 2019, Theorem 27 with the Gaussian's ε(j) = j/(2z²))."""
    mp.mp.dps = 60
    q = mp.mpf(q)

    def cgf(x):  # x · ε(x + 1)
        return mp.mpf(x) * (x + 1) / (2 * z * z)

    def forward_difference(j):  # of exp(cgf) at 0
        return sum((-1) ** (j - k) * mp.binomial(j, k) * mp.e ** cgf(k) for k in range(j + 1))

    e2 = mp.mpf(2) / (2 * z * z)
    a = 1 + q**2 * mp.binomial(alpha, 2) * min(4 * (mp.e**e2 - 1), 2 * mp.e**e2)
    for j in range(3, alpha + 1):
        lo, hi = forward_difference(2 * (j // 2)), forward_difference(2 * ((j + 1) // 2))
        a += q**j * mp.binomial(alpha, j) * min(4 * mp.sqrt(lo * hi), 2 * mp.e ** cgf(j - 1))
    return float(mp.log(a) / (alpha - 1))


def _record(sigma, sampling, fraction, client_rounds, rounds, k):
    return cell_privacy(
        DPDefense(sigma=sigma, clip=1.0).privacy(),
        rounds=rounds,
        unnoised_state=False,
        participation={
            "fraction": fraction,
            "sampling": sampling,
            "num_clients": k,
            "client_rounds": client_rounds,
        },
    )


def _rdp_at_integers(event, relation):
    acc = rdp_accountant.RdpAccountant(orders=INTEGER_ORDERS, neighboring_relation=relation)
    acc.compose(event)
    return acc.get_epsilon(DELTA)


def test_poisson_observer_epsilon_matches_an_independent_computation():
    sigma, q, rounds = 1.0, 0.1, 50  # dp's σ = 1: the target's own noise σ per unit C
    record = _record(sigma, "poisson", q, [5, 3, 0, 7], rounds, k=4)
    obs = event_from_dict(record["observer"]["event"])
    want = independent_epsilon(lambda a: poisson_gaussian_rdp(q, sigma, a), rounds)
    got = _rdp_at_integers(obs, dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    assert got == pytest.approx(want, rel=1e-6)
    report = observer_epsilon(record, delta=DELTA)
    # fedmia's report: the default orders hold these integers and more
    assert report.epsilon_rdp <= want * (1 + 1e-9) and report.epsilon_rdp > 0.9 * want
    assert report.epsilon_pld is not None and report.epsilon_pld <= report.epsilon_rdp * 1.01
    # amplification: far below the server's ε over all the rounds
    assert report.epsilon_rdp < accounted_epsilon(sigma, rounds).epsilon_rdp / 3
    print(
        f"poisson q={q}, σ={sigma}, T={rounds}: observer ε_RDP={report.epsilon_rdp:.3f} "
        f"ε_PLD={report.epsilon_pld:.3f}; independent (integer orders) {want:.3f}"
    )


def test_uniform_observer_epsilon_matches_an_independent_computation():
    sigma, k, fraction, rounds = 2.0, 10, 0.5, 20  # m = 5 of 10, z = σ/2 = 1
    record = _record(sigma, "uniform", fraction, [10] * k, rounds, k=k)
    assert record["observer"]["accountant"] == "replace_one"
    obs = event_from_dict(record["observer"]["event"])
    want = independent_epsilon(lambda a: wor_gaussian_rdp(5 / 10, sigma / 2, a), rounds)
    got = _rdp_at_integers(obs, dp_accounting.NeighboringRelation.REPLACE_ONE)
    assert got == pytest.approx(want, rel=1e-6)
    report = observer_epsilon(record, delta=DELTA)
    assert report.epsilon_rdp <= want * (1 + 1e-9) and report.epsilon_rdp > 0.9 * want
    assert report.epsilon_pld is None and "PLD accountant does not support" in report.note
    assert "replace-one" in report.note
    print(
        f"uniform m=5 of 10, σ={sigma}, T={rounds}: observer ε_RDP={report.epsilon_rdp:.3f};"
        f" independent (integer orders) {want:.3f}"
    )


def test_against_the_server_a_client_composes_the_rounds_it_took_part_in():
    sigma, rounds = 4.0, 30
    counts = [12, 0, 30, 7]
    record = _record(sigma, "poisson", 0.4, counts, rounds, k=4)
    assert record["rounds"] == 30 and record["client_rounds"] == counts
    report = record_epsilon(record, delta=DELTA)
    assert report.epsilon_rdp == pytest.approx(accounted_epsilon(sigma, 30).epsilon_rdp)
    eps = client_epsilons(record, delta=DELTA)
    assert eps[1] == 0.0
    for n, e in zip(counts, eps, strict=True):
        if n:
            assert e == pytest.approx(accounted_epsilon(sigma, n).epsilon_rdp)
    assert eps[3] < eps[0] < eps[2]


def test_full_participation_keeps_the_record_of_before():
    privacy = DPDefense(sigma=1.0, clip=1.0).privacy()
    before = cell_privacy(privacy, rounds=30, unnoised_state=False)
    before.pop("aggregate")  # needs the number of clients (tests/test_accounting.py)
    for sampling in ("uniform", "poisson"):
        record = cell_privacy(
            privacy,
            rounds=30,
            unnoised_state=False,
            participation={
                "fraction": 1.0,
                "sampling": sampling,
                "num_clients": 4,
                "client_rounds": [30] * 4,
            },
        )
        record.pop("aggregate")
        assert record == before
    # un-noised statistics: no finite ε against anyone
    record = cell_privacy(
        privacy,
        rounds=30,
        unnoised_state=True,
        participation={
            "fraction": 0.5,
            "sampling": "poisson",
            "num_clients": 4,
            "client_rounds": [15] * 4,
        },
    )
    assert math.isinf(observer_epsilon(record).epsilon_rdp)
    assert math.isinf(record_epsilon(record).epsilon_rdp)


def test_the_report_states_both_epsilons_of_a_sampled_cell():
    def row(defense, privacy):
        return {
            **CELL,
            "defense": defense,
            "diverged_round": math.nan,
            "rounds": 20,
            "privacy": privacy,
        }

    cells = pd.DataFrame(
        [
            row("uniform", _record(2.0, "uniform", 0.5, [10] * 10, 20, k=10)),
            row("poisson", _record(2.0, "poisson", 0.1, [2] * 50, 20, k=50)),
            row(
                "full",
                cell_privacy(
                    DPDefense(sigma=2.0, clip=1.0).privacy(), rounds=20, unnoised_state=False
                ),
            ),
        ]
    )
    eps = epsilons(cells, DELTA).set_index("defense")
    assert eps.loc["uniform", "dp_rounds"] == 10  # the most rounds a client took part in
    assert eps.loc["uniform", "epsilon_rdp"] == pytest.approx(
        accounted_epsilon(2.0, 10).epsilon_rdp
    )
    # m = 5 of 10: the sampled bound (all 20 rounds, replace-one RDP) is looser than the
    # server's over a client's 10 rounds, which bounds an observer too: the note says so
    assert eps.loc["uniform", "epsilon_observer_rdp"] > eps.loc["uniform", "epsilon_rdp"]
    assert np.isnan(eps.loc["uniform", "epsilon_observer_pld"])
    note = eps.loc["uniform", "epsilon_observer_note"]
    assert "replace-one" in note and "bounds an observer too" in note
    # q = 0.1 of 50: amplification
    assert 0 < eps.loc["poisson", "epsilon_observer_rdp"] < eps.loc["poisson", "epsilon_rdp"]
    assert eps.loc["poisson", "epsilon_observer_pld"] > 0
    assert "bounds an observer too" not in eps.loc["poisson", "epsilon_observer_note"]
    assert np.isnan(eps.loc["full", "epsilon_observer_rdp"])
    assert eps.loc["full", "epsilon_observer_note"] == ""


def test_a_grid_block_samples_its_cells_which_observe_and_attack_every_round():
    cfg = yaml.safe_load((Path(__file__).parents[1] / "config" / "config.yaml").read_text())
    cfg["partitions"]["iid_sampled"] = dict(cfg["partitions"]["iid"])
    cfg["grid"] = [
        {
            "datasets": ["digits"],
            "models": ["alexnet"],
            "defenses": ["none"],
            "partitions": ["iid"],
            "seeds": [0],
        },
        {
            "datasets": ["digits"],
            "models": ["alexnet"],
            "defenses": ["none"],
            "partitions": ["iid_sampled"],
            "seeds": [0],
            "train": {"participation": {"fraction": 0.5, "sampling": "poisson"}},
        },
    ]
    spec = load_workflow_config(cfg)
    full, sampled = spec.cells
    assert spec.train_for(full)["participation"] == {"fraction": 1.0, "sampling": "uniform"}
    assert spec.train_for(sampled)["participation"] == {"fraction": 0.5, "sampling": "poisson"}
    rounds = spec.trains[sampled].rounds
    assert spec.observed_rounds(full) == [1, 10, 20, 30]
    assert spec.attack_rounds(full) == [10, 20, 30]
    assert (
        spec.observed_rounds(sampled) == spec.attack_rounds(sampled) == list(range(1, rounds + 1))
    )


def test_the_tables_say_how_many_rounds_each_target_had(sampled_world):
    mdm, owner, _ = sampled_world
    names = ["loss", "loss_series", "fedmia_loss"]
    res = run_attacks(names, mdm, owner, protocols=["aligned"], n_boot=0, partial=True)
    results = pd.concat([t.assign(attack=n, **CELL) for n, t in res.items()], ignore_index=True)
    summary = summarize(results, ["last"])
    series = summary[summary["attack"] == "loss_series"].iloc[0]
    assert series["rounds"] == "3–4"  # targets 0..3 took part in 3, 4, 3, 3 rounds
    assert (series["target_rounds_min"], series["target_rounds_max"]) == (3, 4)
    assert series["target_rounds_mean"] == pytest.approx(13 / 4)
    # FedMIA: the rounds with 2 other participants, 2, 2, 3, 3
    assert "2–3/3–4 attacked rounds (a target's own: partial participation)" in caption(
        summary, "aligned", "last"
    )
    # without the cells' manifests the participation is unknown
    assert summary["participation"].isna().all()


def test_uniform_sampling_too_small_for_the_reference_attacks_is_refused():
    cfg = yaml.safe_load((Path(__file__).parents[1] / "config" / "config.yaml").read_text())
    cfg["train"] = {"participation": {"fraction": 0.2}}  # m = 2 of 10
    with pytest.raises(
        ConfigError,
        match=r"at 'train.participation.fraction' \(cell digits/"
        r"alexnet/none/iid/seed0\): uniform sampling takes m = 2 of 10 clients "
        r"per round, but \['fedmia_loss', .* need at least 2 other participants",
    ):
        load_workflow_config(cfg)
    cfg["attack"] = {"attacks": ["loss", "cos_series"]}
    load_workflow_config(cfg)  # no reference attack: fine
    cfg["attack"] = {}
    cfg["train"] = {"participation": {"fraction": 0.2, "sampling": "poisson"}}
    load_workflow_config(cfg)  # Poisson: rounds with too few are skipped where they occur


def test_a_recording_whose_rounds_lack_clients_is_imported_and_attacked_as_sampled(
    digits_files, train_cell, import_cell, tmp_path
):
    """A Flower-style view: round 2 lacks client 3 (sampled, or an error reply)."""
    rec = tmp_path / "rec"
    cell = _cell(train_cell, rec, {"fraction": 1.0})
    f = io.round_file(cell["observed"], 2)
    obs = io.load_observed(f)
    io.save_observed(
        f,
        global_state=obs["global_state"],
        uploads=obs["uploads"][:3],
        client_ids=obs["client_ids"][:3],
        num_samples=obs["num_samples"][:3],
        meta={k: obs[k] for k in ("round", "layout", "model")},
    )
    man = json.loads(cell["manifest"].read_text())
    man["view"]["files"]["observed/round0002.safetensors"] = io.file_sha256(f)
    cell["manifest"].write_text(json.dumps(man))
    outputs = import_cell(rec, tmp_path / "imported", PART, CELL)
    imported = io.read_manifest(outputs["manifest"])
    # rounds 1, 2, 4 recorded (observe_every 2, observe_rounds [1]); client 3 lacks round 2
    assert imported["participation"] == {
        "fraction": pytest.approx(11 / 12),
        "sampling": "recorded",
        "client_rounds": [3, 3, 3, 2],
    }
    mdm_file = tmp_path / "mdm.parquet"
    pipeline.measure(
        data=digits_files,
        partition_file=outputs["partition"],
        observed_dir=outputs["observed"],
        rounds=[1, 2, 4],
        device="cpu",
        threads=1,
        output=mdm_file,
    )
    files = {n: tmp_path / f"{n}.parquet" for n in ("loss_series", "fedmia_loss")}
    pipeline.attack(
        measures_file=mdm_file,
        partition_file=outputs["partition"],
        cell=CELL,
        rounds=[1, 2, 4],
        manifest_file=outputs["manifest"],
        config={"attacks": list(files), "protocol": "aligned", "rounds": [1, 2, 4], "bootstrap": 0},
        outputs=files,
    )
    for name in files:
        n = pd.read_parquet(files[name]).query("membership == 'client'")
        n = n.set_index("target")["n_rounds"].to_dict()
        assert n == {0: 3, 1: 3, 2: 3, 3: 2}
    # a recording in which every client took part keeps the manifest of before
    full = _cell(train_cell, tmp_path / "full", {"fraction": 1.0})
    again = import_cell(full["manifest"].parent, tmp_path / "again", PART, CELL)
    assert "participation" not in io.read_manifest(again["manifest"])
