from __future__ import annotations

import math
import statistics

import numpy as np
import pandas as pd
import pytest

from fedmia.attacker.attacks import (
    ATTACKS,
    MULTI_ROUND,
    AttackSpec,
    OfficialProtocol,
    aligned_slots,
    attack_scores,
    bootstrap_strata,
    families,
    fedmia_cdf,
    official_slots,
    outlier_filter_for,
    run_attack,
    run_attacks,
    run_attacks_with_replicates,
    single_round_attacks,
    validate_measures,
)
from fedmia.attacker.metrics import roc_auc
from fedmia.attacker.uncertainty import stratified_replicates
from fedmia.core.contracts import CELL_KEYS, MEASURES, REPLICATE_COLUMNS, RESULT_COLUMNS

SINGLE = ["loss", "cos", "grad_norm", "grad_diff"]
MULTI = [
    "loss_series",
    "cos_series",
    "grad_diff_series",
    "fedmia_loss",
    "fedmia_cos",
    "lira_conf",
    "lira_cos",
    "lira_conf_sum",
    "lira_cos_sum",
    "lira_conf_cos_sum",
    "rmia",
    "rmia_sum",
]
#: the aggregate view's attacks (tests/test_views.py); the others read each upload
CONTRAST = ["contrast_loss", "contrast_cos"]
UPLOADS = [a for a in ATTACKS.names() if "uploads" in ATTACKS.get(a).views]
ALIGNED = {"protocols": ["aligned"]}


def phi(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def make_table(values: dict[str, np.ndarray], rounds, clients, sample_ids) -> pd.DataFrame:
    """Long measure table from R×K×N arrays (missing measures are zeros)."""
    shape = (len(rounds), len(clients), len(sample_ids))
    rr, cc, ss = np.meshgrid(rounds, clients, sample_ids, indexing="ij")
    cols = {m: np.broadcast_to(values.get(m, 0.0), shape).ravel() for m in MEASURES}
    return pd.DataFrame(
        {"round": rr.ravel(), "client_id": cc.ravel(), "sample_id": ss.ravel(), **cols}
    )


def world(
    separation: float,
    *,
    k: int = 5,
    per_client: int = 30,
    held_out: int = 50,
    rounds=(1, 10, 20),
    seed: int = 0,
):
    """A cell whose members differ from non-members by ``separation`` noise units.

    Sample ids are scattered, not positions. Under its owner's upload a sample has
    lower loss, higher logit_conf, cos and grad_diff; grad_norm is lower for client 0's
    samples.
    """
    rng = np.random.default_rng(seed)
    n = k * per_client + held_out
    sample_ids = rng.permutation(np.arange(n) * 7 + 1000)
    own = np.r_[np.repeat(np.arange(k), per_client), np.full(held_out, -1)]
    owner = pd.Series(own, index=sample_ids)
    on_own = (own[None, :] == np.arange(k)[:, None]).astype(float)  # K×N
    shape = (len(rounds), k, n)
    noise = lambda: rng.random(shape)  # noqa: E731
    values = {
        "loss": 2.0 - separation * on_own + noise(),
        "cos": separation * on_own + noise(),
        "grad_diff": separation * on_own + noise(),
        "grad_norm": np.broadcast_to(
            1.0 - separation * (own == 0) + rng.random((len(rounds), 1, n)), shape
        ),
        "logit_conf": separation * on_own + noise(),
    }
    return make_table(values, rounds, np.arange(k), sample_ids), owner


@pytest.mark.parametrize("name", UPLOADS)
def test_perfect_separation(name):
    mdm, owner = world(separation=100.0)
    res = run_attack(name, mdm, owner, targets=[0] if name == "grad_norm" else None)
    mixed, held = res[res.protocol != "heldout"], res[res.protocol == "heldout"]
    if ATTACKS.get(name).kind == "rmia":
        # RMIA's score is a fraction of the population: every member beats all of it and
        # scores 1, and so does a held-out sample above the other half's population (a
        # tie at the top); the tie holds few non-members
        assert (res["tpr@10%"] == 1.0).all() and (res["auc"] > 0.9).all()
        return
    assert (res["auc"] == 1.0).all()
    assert (mixed["tpr@1%"] == 1.0).all() and (held["tpr@10%"] == 1.0).all()
    assert res["tpr@0.1%"].isna().all()  # 170 non-members cannot resolve FPR 0.1%
    assert held["tpr@1%"].isna().all()  # nor 50 held-out ones FPR 1%
    assert (res["n_members"] == 30).all() and (mixed["n_nonmembers"] == 170).all()
    assert (held["n_nonmembers"] == 50).all()


@pytest.mark.parametrize("name", UPLOADS)
def test_identical_distributions(name):
    mdm, owner = world(separation=0.0, per_client=700, held_out=500)
    res = run_attack(name, mdm, owner)
    mixed, held = res[res.protocol != "heldout"], res[res.protocol == "heldout"]
    assert mixed["auc"].sub(0.5).abs().max() < 0.05
    assert abs(held["auc"].mean() - 0.5) < 0.02  # 500 non-members: single rows are noisier


def test_attack_kinds():
    assert sorted(SINGLE + MULTI + CONTRAST) == ATTACKS.names()
    assert all(not ATTACKS.get(a).multi_round for a in SINGLE)
    assert all(ATTACKS.get(a).multi_round for a in MULTI + CONTRAST)
    assert sorted(UPLOADS) == sorted(SINGLE + MULTI)
    assert ATTACKS.get("grad_diff").label == "Grad-Diff"
    assert ATTACKS.get("fedmia_cos").label == "Cos-III (FedMIA-II)"
    assert ATTACKS.get("grad_diff_series").label == "grad_diff_series"


def test_output_columns_and_rounds():
    mdm, owner = world(separation=0.5)
    for name in UPLOADS:
        res = run_attack(
            name, mdm, owner, targets=[1, 3], roc_points=20, official=OfficialProtocol(draws=3)
        )
        assert list(res.columns) == list(RESULT_COLUMNS)
        assert (res.roc_fpr.map(len) <= 20).all()
        rounds = {-1} if name in MULTI else {1, 10, 20}
        assert set(res["round"]) == rounds
        assert set(res["n_rounds"]) == ({3} if name in MULTI else {1})
        assert len(res) == 2 * len(rounds) * (1 + 3 + 1)  # aligned + 3 official + heldout
        assert res.groupby("protocol")["draw"].unique().map(list).to_dict() == {
            "aligned": [0],
            "heldout": [0],
            "official": [0, 1, 2],
        }
        scores = attack_scores(name, mdm, 1, owner=owner)
        assert set(scores["round"]) == rounds
        assert len(scores) == len(rounds) * len(owner)


def test_scores_match_pandas_reference():
    mdm, _ = world(separation=0.5)
    t = mdm[mdm.client_id == 2]
    loss = attack_scores("loss", mdm, 2).merge(t, on=["round", "sample_id"])
    np.testing.assert_allclose(loss.score, -loss.loss)
    grad_norm = attack_scores("grad_norm", mdm, 2).merge(t, on=["round", "sample_id"])
    np.testing.assert_allclose(grad_norm.score, -grad_norm.grad_norm)
    grad_diff = attack_scores("grad_diff", mdm, 2).merge(t, on=["round", "sample_id"])
    np.testing.assert_allclose(grad_diff.score, grad_diff.grad_diff)
    for name, col, sign in (
        ("loss_series", "loss", -1),
        ("cos_series", "cos", 1),
        ("grad_diff_series", "grad_diff", 1),
    ):
        s = attack_scores(name, mdm, 2)
        s = s[s["round"] == MULTI_ROUND].set_index("sample_id").score
        ref = sign * t.groupby("sample_id")[col].mean()
        np.testing.assert_allclose(s.sort_index(), ref.sort_index())


def tiny_table() -> pd.DataFrame:
    # 3 clients, 2 samples (ids 7 and 3), 1 round.
    loss = np.array([[[0.2, 1.5], [1.0, 0.5], [2.0, 0.7]]])  # 1×3×2: client × sample
    cos = np.array([[[0.1, 0.0], [0.3, 0.2], [0.6, 0.1]]])
    return make_table({"loss": loss, "cos": cos}, [5], [0, 1, 2], [7, 3])


def test_fedmia_hand_computed():
    # Paper Eq. 10 / the official code: Φ((s_t − μ) / sqrt(σ² + 1e-8)), μ and σ² over the
    # non-target clients with ddof 0 (np.var's default).
    mdm = tiny_table()
    # fedmia_loss, target 0: s = -loss.
    # Sample 7: s_t = -0.2, refs -1.0, -2.0 -> μ = -1.5, σ² = (0.5² + 0.5²) / 2 = 0.25.
    # Sample 3: s_t = -1.5, refs -0.5, -0.7 -> μ = -0.6, σ² = (0.1² + 0.1²) / 2 = 0.01.
    s = attack_scores("fedmia_loss", mdm, 0).set_index("sample_id").score
    assert s[7] == pytest.approx(phi(1.3 / math.sqrt(0.25 + 1e-8)), rel=1e-12)
    assert s[3] == pytest.approx(phi(-0.9 / math.sqrt(0.01 + 1e-8)), rel=1e-9)
    # ddof 1 as an option: σ² = 0.5 and 0.02
    s1 = attack_scores("fedmia_loss", mdm, 0, ddof=1).set_index("sample_id").score
    assert s1[7] == pytest.approx(phi(1.3 / math.sqrt(0.5 + 1e-8)), rel=1e-12)
    assert s1[3] == pytest.approx(phi(-0.9 / math.sqrt(0.02 + 1e-8)), rel=1e-9)
    # fedmia_cos, target 2: sample 7: s_t = 0.6, refs 0.1, 0.3; sample 3: s_t = 0.1, refs 0, 0.2.
    c = attack_scores("fedmia_cos", mdm, 2).set_index("sample_id").score
    assert c[7] == pytest.approx(phi(0.4 / math.sqrt(0.01 + 1e-8)), rel=1e-12)
    assert c[3] == pytest.approx(0.5, rel=1e-12)
    assert set(c.index) == {3, 7}


def test_fedmia_variance_floor():
    # identical references: σ² = 0, so the floor alone sets the scale, as the official
    target = np.array([[0.0, 1e-4, -1e-4]])
    ref = np.zeros((1, 3, 3))
    np.testing.assert_allclose(
        fedmia_cdf(target, ref)[0], [0.5, phi(1e-4 / 1e-4), phi(-1.0)], rtol=1e-12
    )


def test_fedmia_outlier_filter():
    # 14 clients, target 0; sample 1 has one reference (client 13) far above the others.
    refs = [0.01 * i for i in range(12)]
    cos = np.zeros((1, 14, 2))
    cos[0, 0] = [0.2, 0.05]
    cos[0, 1:, 0] = [*refs, 1.0]
    cos[0, 1:, 1] = [*refs, 0.12]
    mdm = make_table({"cos": cos}, [1], np.arange(14), [1, 2])
    mu, var = statistics.mean([*refs, 1.0]), statistics.pvariance([*refs, 1.0])
    assert 1.0 > mu + 3 * math.sqrt(var)  # the case is built so the filter drops it
    plain = attack_scores("fedmia_cos", mdm, 0).set_index("sample_id").score
    filt = attack_scores("fedmia_cos", mdm, 0, outlier_filter=True).set_index("sample_id").score
    assert plain[1] == pytest.approx(phi((0.2 - mu) / math.sqrt(var + 1e-8)), rel=1e-12)
    assert filt[1] == pytest.approx(
        phi((0.2 - statistics.mean(refs)) / math.sqrt(statistics.pvariance(refs) + 1e-8)), rel=1e-12
    )
    assert filt[1] > plain[1] + 0.3
    assert filt[2] == plain[2]  # nothing to drop for sample 2


def slow_fedmia(target, reference, outlier_filter, ddof=0):
    """Loop over rounds and samples: the official code's mean, np.var + 1e-8 and filter."""
    out = np.empty(target.shape)
    var_of = statistics.pvariance if ddof == 0 else statistics.variance
    for r in range(target.shape[0]):
        for i in range(target.shape[1]):
            ref = list(reference[r, :, i])
            mu, var = statistics.mean(ref), var_of(ref)
            if outlier_filter:
                kept = [v for v in ref if v < mu + 3 * math.sqrt(var)] or [min(ref)]
                mu = statistics.mean(kept)
                var = var_of(kept) if len(kept) > ddof else 0.0
            out[r, i] = phi((target[r, i] - mu) / math.sqrt(var + 1e-8))
    return out


@pytest.mark.parametrize("ddof", [0, 1])
@pytest.mark.parametrize("outlier_filter", [False, True])
def test_fedmia_cdf_against_slow_reference(outlier_filter, ddof):
    rng = np.random.default_rng(3)
    target = rng.normal(size=(3, 40))
    reference = rng.normal(size=(3, 15, 40))
    reference[:, 0, ::2] += 8.0  # outliers in half the samples
    reference[:, :, 1] = 0.25  # all references equal: the filter keeps none, then the minimum
    fast = fedmia_cdf(target, reference, outlier_filter=outlier_filter, ddof=ddof)
    np.testing.assert_allclose(
        fast, slow_fedmia(target, reference, outlier_filter, ddof), atol=1e-12
    )
    if outlier_filter:
        assert not np.allclose(fast, fedmia_cdf(target, reference, ddof=ddof))


def test_fedmia_weights_leave_references_out():
    rng = np.random.default_rng(4)
    target, reference = rng.normal(size=(2, 6)), rng.normal(size=(2, 4, 6))
    w = np.ones(reference.shape, dtype=bool)
    w[:, 1, :3] = False  # reference 1 does not count for the first three slots
    fast = fedmia_cdf(target, reference, weights=w)
    np.testing.assert_allclose(
        fast[:, :3], slow_fedmia(target[:, :3], np.delete(reference, 1, 1)[:, :, :3], False)
    )
    np.testing.assert_allclose(fast[:, 3:], slow_fedmia(target[:, 3:], reference[:, :, 3:], False))


def test_outlier_filter_policy():
    assert outlier_filter_for("auto", "fedmia_cos", "dirichlet")
    assert not outlier_filter_for("auto", "fedmia_cos", "iid")
    assert not outlier_filter_for("auto", "fedmia_loss", "dirichlet")
    assert outlier_filter_for("always", "fedmia_loss", "iid")
    assert not outlier_filter_for("never", "fedmia_cos", "dirichlet")


def test_row_order_does_not_matter():
    mdm, owner = world(separation=0.3, seed=1)
    shuffled = mdm.sample(frac=1.0, random_state=0).reset_index(drop=True)
    owner_shuffled = owner.sample(frac=1.0, random_state=1)
    for name in UPLOADS:
        a = run_attack(name, mdm, owner, outlier_filter=True)
        b = run_attack(name, shuffled, owner_shuffled, outlier_filter=True)
        cols = [c for c in a.columns if not c.startswith("roc_")]
        pd.testing.assert_frame_equal(a[cols], b[cols])
        for c in ("roc_fpr", "roc_tpr"):
            assert all(np.array_equal(x, y) for x, y in zip(a[c], b[c], strict=True))
        pd.testing.assert_frame_equal(
            attack_scores(name, mdm, 2, owner=owner),
            attack_scores(name, shuffled, 2, owner=owner_shuffled),
        )


def test_validate_accepts_good_table():
    mdm, owner = world(separation=0.3)
    validate_measures(mdm, owner)
    validate_measures(mdm, owner, targets=[0, 4])


def test_run_attack_checks_only_its_measure():
    mdm, owner = world(separation=0.3)
    mdm.loc[[1, 2], "cos"] = np.nan
    assert len(run_attack("loss", mdm.drop(columns="grad_diff"), owner, **ALIGNED)) == 15


def test_series_attacks_run_with_two_clients():
    mdm, owner = world(separation=0.3, k=2)
    assert len(run_attack("loss_series", mdm, owner, **ALIGNED)) == 2


# ------------------------------------------------------------------ rounds and protocols


def test_multi_round_attacks_use_only_the_attacked_rounds():
    mdm, owner = world(separation=0.5)  # rounds 1, 10, 20
    t = mdm[mdm.client_id == 1]
    s = attack_scores("cos_series", mdm, 1, attack_rounds=[10, 20]).set_index("sample_id").score
    ref = t[t["round"].isin([10, 20])].groupby("sample_id")["cos"].mean()
    np.testing.assert_allclose(s.sort_index(), ref.sort_index())
    res = run_attacks(["loss", "fedmia_cos"], mdm, owner, attack_rounds=[10, 20], **ALIGNED)
    assert set(res["loss"]["round"]) == {1, 10, 20}  # single-round: every observed round
    assert res["loss"].set_index("round")["attacked"].to_dict() == {1: False, 10: True, 20: True}
    assert set(res["fedmia_cos"]["n_rounds"]) == {2}


def test_official_slots_redraw_nonmembers_per_client_and_round():
    own = np.r_[np.repeat([0, 1, 2], 6), np.full(10, -1)]  # 3 clients × 6, 10 held out
    clients = np.arange(3)
    proto = OfficialProtocol(draws=2, test_slots=4, client_slots=3, seed=7)
    sl = official_slots(own, 1, 5, clients, proto, draw=0)
    r, k, s = sl.index.shape
    assert (r, k, s) == (5, 3, 6 + 4 + 3 + 3)
    assert sl.is_member.tolist() == [True] * 6 + [False] * 10
    members = np.flatnonzero(own == 1)
    assert (sl.index[..., :6] == members).all()  # members stay aligned
    groups = [own[sl.index[..., 6:10]], own[sl.index[..., 10:13]], own[sl.index[..., 13:]]]
    assert (groups[0] == -1).all() and (groups[1] == 0).all() and (groups[2] == 2).all()
    for rr in range(r):  # no repeats within a (round, client) draw
        for kk in range(k):
            assert len(set(sl.index[rr, kk, 6:].tolist())) == 10
    # independent draws: clients and rounds see different samples in the same slot
    assert (sl.index[0, 0, 6:] != sl.index[0, 2, 6:]).any()
    assert (sl.index[0, 0, 6:] != sl.index[3, 0, 6:]).any()
    again = official_slots(own, 1, 5, clients, proto, draw=0)
    assert (again.index == sl.index).all()  # seeded
    assert (official_slots(own, 1, 5, clients, proto, draw=1).index != sl.index).any()
    assert sl.ref_weights is None
    quirk_off = official_slots(own, 1, 5, clients, OfficialProtocol(self_mix=False), 0)
    w = quirk_off.ref_weights
    block_owner = own[quirk_off.index[0, 0]]  # the slot's group (same in every draw)
    for kk in clients:
        assert (w[:, kk] == (block_owner != kk)).all()


def test_official_protocol_scores_against_a_slow_reference():
    mdm, owner = world(separation=0.3, k=4, per_client=8, held_out=12, seed=5)
    proto = OfficialProtocol(draws=1, seed=3)
    res = run_attacks(
        ["cos", "cos_series", "fedmia_cos"],
        mdm,
        owner,
        targets=[2],
        protocols=["official"],
        official=proto,
    )
    piv = mdm.pivot_table(index=["round", "client_id"], columns="sample_id", values="cos")
    sample_ids = np.array(sorted(owner.index))
    own = owner.reindex(sample_ids).to_numpy()
    rounds = sorted(mdm["round"].unique())
    sl = official_slots(own, 2, len(rounds), np.arange(4), proto, draw=0)
    # the slow way: look every slot's sample up by sample_id
    val = np.empty(sl.index.shape)
    for ri, rnd in enumerate(rounds):
        for k in range(4):
            for j, pos in enumerate(sl.index[ri, k]):
                val[ri, k, j] = piv.loc[(rnd, k), sample_ids[pos]]
    single = res["cos"].set_index("round")["auc"]
    for ri, rnd in enumerate(rounds):
        assert single[rnd] == pytest.approx(roc_auc(val[ri, 2], sl.is_member))
    series = val[:, 2].mean(axis=0)
    assert res["cos_series"]["auc"].iloc[0] == pytest.approx(roc_auc(series, sl.is_member))
    cdf = [
        [
            phi(
                (val[ri, 2, j] - np.mean(val[ri, [0, 1, 3], j]))
                / math.sqrt(np.var(val[ri, [0, 1, 3], j]) + 1e-8)
            )
            for j in range(val.shape[2])
        ]
        for ri in range(len(rounds))
    ]
    fed = np.mean(cdf, axis=0)
    assert res["fedmia_cos"]["auc"].iloc[0] == pytest.approx(roc_auc(fed, sl.is_member))


def test_official_protocol_equals_aligned_for_single_rounds_over_whole_pools():
    mdm, owner = world(separation=0.4, seed=2)
    res = run_attacks(["loss", "cos"], mdm, owner, official=OfficialProtocol(draws=2))
    for name in ("loss", "cos"):
        r = res[name]
        a = r[r.protocol == "aligned"].set_index(["target", "round"])["auc"]
        for d in (0, 1):
            o = r[(r.protocol == "official") & (r.draw == d)].set_index(["target", "round"])
            pd.testing.assert_series_equal(o["auc"], a)  # a permutation changes no metric


def test_official_redraws_inflate_low_fpr_tpr_of_series_attacks():
    # Samples differ a lot in difficulty (a per-sample offset shared by all clients and
    # rounds); members get a small shift under their owner's upload. Aligned averaging
    # keeps each non-member's own offset; the official redraws average the offsets of
    # 30 different samples per slot, so the non-member scores concentrate and a few
    # members clear them: TPR at low FPR rises, as the issue reports on real data.
    rng = np.random.default_rng(0)
    k, per_client, held_out, rounds = 5, 200, 1000, list(range(10, 310, 10))
    n = k * per_client + held_out
    own = np.r_[np.repeat(np.arange(k), per_client), np.full(held_out, -1)]
    offset = rng.normal(scale=1.0, size=n)
    shift = 0.6 * (own[None, :] == np.arange(k)[:, None])
    cos = offset + shift + rng.normal(scale=0.3, size=(len(rounds), k, n))
    mdm = make_table({"cos": cos}, rounds, np.arange(k), np.arange(n))
    owner = pd.Series(own, index=np.arange(n))
    res = run_attacks(["cos_series"], mdm, owner, targets=[0], official=OfficialProtocol(draws=2))[
        "cos_series"
    ]
    tpr = res.groupby("protocol")["tpr@1%"].mean()
    auc = res.groupby("protocol")["auc"].mean()
    assert tpr["official"] > 3 * tpr["aligned"]
    assert abs(auc["official"] - auc["aligned"]) < tpr["official"] - tpr["aligned"]


def test_attack_specs_name_a_measure_column_a_sign_and_a_kind():
    with pytest.raises(
        ValueError,
        match=r"measure 'acc' is not a column of the measure "
        r"table; choose from \['loss', 'logit_conf', 'cos', "
        r".*'confidence'\]",
    ):
        AttackSpec("acc_series", "acc", 1, "series", "acc")
    with pytest.raises(ValueError, match=r"sign must be \+1 or -1 and kind one of"):
        AttackSpec("x", "loss", 2, "single", "loss")


def test_report_sets_come_from_the_attack_specs():
    assert single_round_attacks() == ["loss", "cos", "grad_norm", "grad_diff"]
    assert families() == {
        "loss": ["loss", "loss_series", "fedmia_loss"],
        "cos": ["cos", "cos_series", "fedmia_cos"],
        "grad": ["grad_norm", "grad_diff", "grad_diff_series"],
    }


# ----------------------------------------------- one resample shared by every target


def test_rows_of_all_targets_share_one_resample_per_owner_group():
    """Replicate b resamples each owner group once for every target and attack: a row's
    replicates are the stratified replicates of its own scores on the groups' strata,
    whose seeds name the cell, protocol, draw and group, never the target."""
    mdm, owner = world(1.0, k=4, per_client=20, held_out=60)
    keys = ("d", "m", "none", "iid", 0)
    tables, reps = run_attacks_with_replicates(
        ["loss", "cos", "loss_series", "grad_norm"],
        mdm,
        owner,
        attack_rounds=[10, 20],
        n_boot=40,
        bootstrap_keys=keys,
        keep_replicates=["loss", "loss_series"],
        **ALIGNED,
    )
    own = owner.sort_index().to_numpy()
    # kept: the asked attacks, attacked rounds and multi-round rows only, float32 arrays
    assert set(reps.attack) == {"loss", "loss_series"}
    assert set(reps[reps.attack == "loss"]["round"]) == {10, 20}
    assert set(reps[reps.attack == "loss_series"]["round"]) == {MULTI_ROUND}
    assert len(reps) == 4 * 3 and list(reps.columns) == [
        c for c in REPLICATE_COLUMNS if c not in CELL_KEYS
    ]
    assert all(v.dtype == np.float32 and v.shape == (40,) for v in reps["auc_replicates"])
    sl = [bootstrap_strata(aligned_slots(own, t), (*keys, "aligned")) for t in range(4)]
    assert [s.seed for s in sl[0]] == [s.seed for s in sl[3]]  # the same draw per group
    assert [len(s.slots) for s in sl[0]] == [60, 20, 20, 20, 20]
    for t in range(4):
        scores = attack_scores("loss", mdm, t, attack_rounds=[10, 20])
        x = scores[scores["round"] == 20]["score"].to_numpy()
        want = stratified_replicates(x, own == t, sl[t], n_boot=40)
        row = reps[(reps.attack == "loss") & (reps.target == t) & (reps["round"] == 20)]
        np.testing.assert_array_equal(row["auc_replicates"].iloc[0], want["auc"].astype(np.float32))
        table = tables["loss"]
        r = table[(table.target == t) & (table["round"] == 20)].iloc[0]
        assert (r["auc_ci_low"], r["auc_ci_high"]) == pytest.approx(
            np.percentile(want["auc"], [2.5, 97.5])
        )
    # plain run_attacks: the same tables
    again = run_attacks(
        ["loss"], mdm, owner, attack_rounds=[10, 20], n_boot=40, bootstrap_keys=keys, **ALIGNED
    )["loss"]
    pd.testing.assert_frame_equal(again, tables["loss"])


def test_official_slots_name_their_owner_group():
    own = np.r_[np.repeat([0, 1, 2], 6), np.full(10, -1)]
    sl = official_slots(
        own, 1, 3, np.arange(3), OfficialProtocol(test_slots=4, client_slots=3), draw=0
    )
    assert sl.group.tolist() == [1] * 6 + [-1] * 4 + [0] * 3 + [2] * 3
    strata = bootstrap_strata(sl, ("k", "official"))
    assert [(len(s.slots), bool(sl.is_member[s.slots[0]])) for s in strata] == [
        (4, False),
        (3, False),
        (6, True),
        (3, False),
    ]
