"""One-run ε audit (Steinke, Nasr & Jagielski 2023) against brute force and known mechanisms."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy.special import ndtr

from conftest import TINY_CELL, TINY_TRAIN
from fedmia import pipeline
from fedmia.attacker.uncertainty import stable_seed
from fedmia.core.config import Participation
from fedmia.core.contracts import AUDIT_COLUMNS
from fedmia.federation.fedavg import participants
from fedmia.federation.partition import draw_canaries
from fedmia.privacy.accounting import gaussian_rounds, pld_epsilon
from fedmia.privacy.audit import (
    DEFAULT_CHOICES,
    _counts,
    audit_attacks,
    audit_from_scores,
    audit_p_value,
    count_guesses,
    epsilon_lower_bound,
    max_epsilon_lower_bound,
    select_and_audit,
)
from fedmia.stages import io
from test_attacks import world


def brute_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """The theorem's bound written out term by term with exact binomial coefficients.

    P[Bin(r, q) ≥ v] + 2mδ · max over i = 1..m (not only ..v) of P[v > Bin(r, q) ≥ v − i] / i.
    """
    q = math.exp(eps) / (1 + math.exp(eps))

    def pmf(k: int) -> float:
        return math.comb(r, k) * q**k * (1 - q) ** (r - k) if 0 <= k <= r else 0.0

    tail = sum(pmf(k) for k in range(v, r + 1))
    alpha = max(sum(pmf(k) for k in range(max(v - i, 0), v)) / i for i in range(1, m + 1))
    return min(tail + 2 * m * delta * alpha, 1.0)


def test_p_value_matches_the_theorem_written_out():
    m = 8
    for r in range(0, m + 1):
        for v in range(0, r + 1):
            for eps in (0.0, 0.3, 1.0, 2.5):
                for delta in (0.0, 1e-3, 0.05):
                    assert audit_p_value(m, r, v, eps, delta) == pytest.approx(
                        brute_p_value(m, r, v, eps, delta), rel=1e-9, abs=1e-12
                    )


def test_bound_is_the_root_of_the_p_value():
    eps = epsilon_lower_bound(200, 60, 55, 1e-5, 0.05)
    assert eps > 0
    assert (
        audit_p_value(200, 60, 55, eps, 1e-5) < 0.05 <= audit_p_value(200, 60, 55, eps + 1e-6, 1e-5)
    )


def test_bound_covers_randomized_response_exactly():
    # ε-DP randomized response on each canary's coin (report the coin with probability
    # q = e^ε/(1+e^ε)) is the mechanism for which the δ = 0 bound is tight: the number of
    # correct guesses when guessing every report is Binomial(m, q). Enumerating all
    # outcomes (coins × reports) the bound exceeds the true ε with probability ≤ β.
    m, beta = 6, 0.2
    bound = [epsilon_lower_bound(m, m, v, 0.0, beta) for v in range(m + 1)]
    for eps_true in (0.2, 0.5, 1.0):
        q = math.exp(eps_true) / (1 + math.exp(eps_true))
        exceed = 0.0
        for coins in itertools.product((0, 1), repeat=m):
            for reports in itertools.product((0, 1), repeat=m):
                correct = sum(c == g for c, g in zip(coins, reports, strict=True))
                if bound[correct] > eps_true:
                    exceed += 0.5**m * q**correct * (1 - q) ** (m - correct)
        assert 0 < exceed <= beta
        # the δ = 0 p-value is that exact tail probability at the true ε
        assert audit_p_value(m, m, m, eps_true, 0.0) == pytest.approx(q**m)


def test_bound_is_monotone_in_v_and_capped_by_m():
    m, beta, delta = 1000, 0.05, 1e-5
    cap_m = max_epsilon_lower_bound(m, beta)
    assert cap_m == pytest.approx(5.8091, abs=1e-4)  # −ln(20^{1/1000} − 1)
    assert cap_m == pytest.approx(math.log(m / math.log(1 / beta)), abs=0.01)
    for r in (10, 100, 1000):
        votes = range(r // 2, r + 1, 1 + r // 50)
        bounds = [epsilon_lower_bound(m, r, v, delta, beta) for v in votes]
        assert all(b2 >= b1 - 1e-8 for b1, b2 in itertools.pairwise(bounds))
        assert bounds[0] == 0.0  # half the guesses right is chance
        perfect = epsilon_lower_bound(m, r, r, delta, beta)
        assert perfect <= max_epsilon_lower_bound(r, beta) <= cap_m
        # with δ = 0 perfect guesses reach the cap
        assert epsilon_lower_bound(m, r, r, 0.0, beta) == pytest.approx(
            max_epsilon_lower_bound(r, beta), abs=1e-7
        )
    # a larger δ never gives a larger bound
    assert epsilon_lower_bound(m, 100, 95, 1e-3) < epsilon_lower_bound(m, 100, 95, 1e-6)


def test_random_scores_give_no_bound():
    m, positive, worst = 1000, 0, 0.0
    seeds = range(30)
    for seed in seeds:
        rng = np.random.default_rng(seed)
        included = rng.random(m) < 0.5
        result = audit_from_scores(rng.normal(size=m), included, delta=1e-5, holdout_seed=seed)
        positive += result.epsilon > 0
        worst = max(worst, result.epsilon)
    # under a 0-DP mechanism P[bound > 0] ≤ β = 0.05; allow a little over β·30 = 1.5
    assert positive <= 5 and worst < 0.5


@pytest.mark.parametrize("noise", [0.5, 1.0])
def test_gaussian_mechanism_bound_stays_below_true_epsilon(noise):
    # Each canary moves its own coordinate by 1 when included, plus N(0, noise²): one
    # Gaussian mechanism per canary (add/remove, sensitivity 1), so the whole release is
    # (ε, δ)-DP with ε the Gaussian's at δ. The score is the coordinate itself, the
    # likelihood-ratio (perfect-knowledge) score.
    delta = 1e-5
    true_eps = pld_epsilon(gaussian_rounds(noise, 1), delta, 1e-4)
    for seed in range(5):
        rng = np.random.default_rng(seed)
        included = rng.random(1000) < 0.5
        scores = included + noise * rng.normal(size=1000)
        result = audit_from_scores(scores, included, delta=delta, holdout_seed=seed)
        assert 1.0 < result.epsilon < true_eps, result
        assert result.num_correct <= result.num_guesses <= result.num_canaries == 500


def test_audit_result_counts_its_guesses():
    included = np.array([True, False, True, False, True, False, True, False])
    scores = np.array([9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0])
    count = count_guesses(np.argsort(-scores), included, 2, 1)
    assert (count.num_guesses, count.correct_in, count.correct_out) == (3, 1, 1)
    result = audit_from_scores(
        np.tile(scores, 10), np.tile(included, 10), delta=0.0, choices=[(0.1, 0.1)]
    )
    row = result.to_dict()
    assert row["rule"] == "holdout" and (row["choice_in"], row["choice_out"]) == (0.1, 0.1)
    assert row["num_canaries"] + row["selection_canaries"] == 80
    assert result.guesses_in == result.guesses_out == 4


def test_ties_do_not_leak_position():
    # All scores equal: a caller that lists included canaries first must not get a bound.
    included = np.repeat([True, False], 500)
    result = audit_from_scores(np.zeros(1000), included, delta=1e-5)
    assert result.epsilon == 0.0


def test_draw_canaries_is_seeded_and_fair():
    candidates = np.arange(100, 5100)
    ids, included = draw_canaries(candidates, 2000, seed=3)
    again = draw_canaries(candidates, 2000, seed=3)
    assert np.array_equal(ids, again[0]) and np.array_equal(included, again[1])
    assert len(np.unique(ids)) == 2000 and np.isin(ids, candidates).all()
    assert np.all(np.diff(ids) > 0)
    assert abs(included.mean() - 0.5) < 0.05  # 2000 fair coins: sd 0.011
    assert not np.array_equal(draw_canaries(candidates, 2000, seed=4)[1], included)


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        epsilon_lower_bound(10, 11, 5, 1e-5)
    with pytest.raises(ValueError):
        epsilon_lower_bound(10, 5, 6, 1e-5)
    with pytest.raises(ValueError):
        epsilon_lower_bound(10, 5, 5, 1e-5, beta=1.0)
    with pytest.raises(ValueError):
        draw_canaries(np.array([1, 1, 2]), 2, seed=0)
    with pytest.raises(ValueError):
        audit_from_scores(np.array([0.0, np.nan]), np.array([True, False]), delta=0.0)
    with pytest.raises(ValueError):
        audit_from_scores(np.zeros(4), np.zeros(4, bool), delta=0.0, choices=[(0.8, 0.8)])


def test_selected_attack_audit_chooses_attack_and_guesses_on_the_held_out_half():
    rng = np.random.default_rng(5)
    included = rng.random(400) < 0.5
    scores = np.stack(
        [
            rng.normal(size=400),  # a useless attack
            included * 2.0 + rng.normal(size=400),  # a strong one
            included * 0.5 + rng.normal(size=400),
        ]
    )  # a weak one
    a, res = select_and_audit(scores, included, delta=1e-5, holdout_seed=11)
    # slow reference: the same split, every (attack, choice) on the selection half, the
    # first best one bounded on the audit half alone
    split = np.random.default_rng(11)
    perm, key = split.permutation(400), split.random(400)
    select, audit = perm[:200], perm[200:]

    def bound(s, idx, choice):
        order = sorted(range(len(idx)), key=lambda i: (-s[idx[i]], key[idx[i]]))
        count = count_guesses(np.array(order), included[idx], *_counts(len(idx), choice))
        return epsilon_lower_bound(len(idx), count.num_guesses, count.num_correct, 1e-5)

    tried = [
        (bound(scores[i], select, c), -i, -j)
        for i in range(3)
        for j, c in enumerate(DEFAULT_CHOICES)
    ]
    best, minus_i, minus_j = max(tried)
    assert a == -minus_i == 1 and res.selection_epsilon == best
    assert res.epsilon == bound(scores[1], audit, DEFAULT_CHOICES[-minus_j])
    assert res.num_canaries == 200 and res.epsilon > 0
    # the audit half of the other attacks plays no part in the choice
    spoiled = scores.copy()
    spoiled[0, audit] = included[audit] * 100.0  # perfect on the audit half only
    assert select_and_audit(spoiled, included, delta=1e-5, holdout_seed=11) == (a, res)
    # one attack: the per-attack audit
    one = select_and_audit(scores[2:], included, delta=1e-5, holdout_seed=4)
    assert one == (0, audit_from_scores(scores[2], included, delta=1e-5, holdout_seed=4))
    with pytest.raises(ValueError, match="attacks × canaries"):
        select_and_audit(scores[0], included, delta=1e-5)
    with pytest.raises(ValueError, match="aligned"):
        select_and_audit(scores[:, :10], included, delta=1e-5)


# ------------------------------------------------- the audit under partial participation

#: Who took part in which round of the synthetic sampled cell (client 4 never did). The
#: audit target 0 took part in rounds 1, 2, 3; round 3 gives it one other participant only.
PRESENT = {1: [0, 1, 2, 3], 2: [0, 2, 3], 3: [0, 1], 4: [1, 2, 3], 5: [1]}
AUDITED = ["loss", "loss_series", "fedmia_loss", "lira_conf", "rmia", "rmia_sum"]


def _canary_world():
    """A full measure table (5 clients, rounds 1..5) with 200 canaries among the held-out
    samples, the coin-in ones fitting the target 0's uploads better, and the rest of the
    held-out samples as RMIA's population: ``(mdm, canaries, population)``."""
    mdm, owner = world(separation=1.0, held_out=250, rounds=tuple(PRESENT))
    held = owner.index[owner.to_numpy() == -1].to_numpy()
    rng = np.random.default_rng(1)
    ids = np.sort(rng.choice(held, 200, replace=False))
    coins = rng.random(200) < 0.5
    fit = mdm["sample_id"].isin(ids[coins]) & (mdm["client_id"] == 0)
    mdm["loss"] = mdm["loss"] - 0.8 * fit
    return mdm, pd.Series(coins, index=ids), np.setdiff1d(held, ids)


def _sampled(mdm: pd.DataFrame) -> pd.DataFrame:
    """The rows of the rounds' participants (:data:`PRESENT`)."""
    keep = np.zeros(len(mdm), dtype=bool)
    for r, clients in PRESENT.items():
        keep |= (mdm["round"] == r).to_numpy() & mdm["client_id"].isin(clients).to_numpy()
    return mdm[keep].reset_index(drop=True)


def _audit(mdm, canaries, population, *, partial=True, target=0, rounds=None):
    return audit_attacks(
        AUDITED,
        mdm,
        canaries,
        target,
        attack_rounds=rounds,
        population=population,
        delta=1e-5,
        seed=3,
        partial=partial,
    )


def test_a_sampled_target_is_audited_in_its_own_rounds_against_a_slow_reference():
    full, canaries, population = _canary_world()
    mdm = _sampled(full)
    rows = _audit(mdm, canaries, population).set_index("attack")
    assert list(rows.index) == [*AUDITED, "selected"]
    ids = canaries.index.to_numpy()
    coins = canaries.to_numpy()

    def signed(r, c):  # −loss of client c's upload at round r on the canaries
        g = mdm[(mdm["round"] == r) & (mdm["client_id"] == c)].set_index("sample_id")
        return -g["loss"].reindex(ids).to_numpy()

    # the slow reference: the target's own rounds only, FedMIA over those with two or
    # more other participants (1, 2), the round's other participants its references
    fedmia = []
    for r in (1, 2):
        ref = np.stack([signed(r, c) for c in PRESENT[r] if c != 0])
        fedmia.append(ndtr((signed(r, 0) - ref.mean(0)) / np.sqrt(ref.var(0) + 1e-8)))
    want = {
        "loss": (3, signed(3, 0)),  # the last attacked round it took part in
        "loss_series": (-1, np.mean([signed(r, 0) for r in (1, 2, 3)], axis=0)),
        "fedmia_loss": (-1, np.mean(fedmia, axis=0)),
    }
    for name, (rnd, scores) in want.items():
        res = audit_from_scores(scores, coins, delta=1e-5, holdout_seed=stable_seed(3, name))
        row = rows.loc[name]
        assert row["round"] == rnd and row["target"] == 0, name
        assert (row["epsilon_empirical"], row["num_correct"], row["num_guesses"]) == (
            res.epsilon,
            res.num_correct,
            res.num_guesses,
        ), name
    assert rows.loc["loss", "epsilon_empirical"] > 0  # the canaries fit the target better
    # nothing the target did not take part in, nor a round without references, counts:
    # every value outside its rounds (and round 3's other participant) scrambled
    scrambled = mdm.copy()
    other = (scrambled["round"] >= 4) | ((scrambled["round"] == 3) & (scrambled["client_id"] != 0))
    noise = np.random.default_rng(9).normal(size=(int(other.sum()), 2)) * 50
    scrambled.loc[other, ["loss", "logit_conf"]] = noise
    pd.testing.assert_frame_equal(
        _audit(scrambled, canaries, population), rows.reset_index()[list(AUDIT_COLUMNS)]
    )


def test_a_sampled_target_without_an_attacked_round_gives_no_audit_row(caplog):
    full, canaries, population = _canary_world()
    mdm = _sampled(full)
    with caplog.at_level("WARNING"):
        none = _audit(mdm, canaries, population, rounds=[4, 5])  # target 0 took part in neither
    assert none.empty and list(none.columns) == list(AUDIT_COLUMNS)
    assert "target client 0 took part in no attacked round: no audit row" in caplog.text
    with caplog.at_level("WARNING"):
        never = _audit(mdm, canaries, population, target=4)
    assert never.empty and "target client 4 took part in no observed round" in caplog.text
    # target 1 took part in rounds 1, 3, 4, 5: references in rounds 1 and 4 only
    rows = _audit(mdm, canaries, population, target=1).set_index("attack")
    assert rows.loc["loss", "round"] == 5 and list(rows.index) == [*AUDITED, "selected"]


def test_full_participation_audit_is_unchanged_by_the_partial_reading():
    mdm, canaries, population = _canary_world()
    pd.testing.assert_frame_equal(
        _audit(mdm, canaries, population, partial=True),
        _audit(mdm, canaries, population, partial=False),
    )


def test_a_tiny_sampled_cell_with_canaries_is_audited_in_the_target_s_rounds(
    digits_files, train_cell, tmp_path
):
    """Train, measure and attack a 4-client cell sampling 2 clients a round, with canaries."""
    part = dict(
        kind="iid",
        num_clients=4,
        samples_per_client=15,
        eval_members_per_client=5,
        eval_nonmembers=20,
        audit_canaries=100,
        audit_target=0,
    )
    train = {**TINY_TRAIN, "participation": {"fraction": 0.5, "sampling": "uniform"}}
    outputs = train_cell(tmp_path, part, train, TINY_CELL)
    rounds = [1, 2, 3, 4]  # a sampled cell observes and attacks every round
    pipeline.measure(
        data=digits_files,
        partition_file=tmp_path / "partition.parquet",
        observed_dir=outputs["observed"],
        rounds=rounds,
        manifest_file=outputs["manifest"],
        device="cpu",
        threads=1,
        output=tmp_path / "mdm.parquet",
    )
    files = {n: tmp_path / f"{n}.parquet" for n in ("loss", "loss_series", "audit")}
    pipeline.attack(
        measures_file=tmp_path / "mdm.parquet",
        partition_file=tmp_path / "partition.parquet",
        cell=TINY_CELL,
        manifest_file=outputs["manifest"],
        config={"attacks": ["loss", "loss_series"], "protocol": ["aligned"], "bootstrap": 0},
        audit={"target": 0, "delta": 1e-5},
        outputs=files,
    )
    table = io.read_parquet(files["audit"], "audit").set_index("attack")
    assert list(table.index) == ["loss", "loss_series", "selected"]
    took = [r for r in rounds if 0 in participants(Participation(0.5, "uniform"), 0, r, 4)]
    assert took and len(took) < len(rounds)  # the target sat some rounds out
    mdm = pd.read_parquet(tmp_path / "mdm.parquet")
    assert sorted(mdm.loc[mdm.client_id == 0, "round"].unique()) == took
    canary = pd.read_parquet(tmp_path / "partition.parquet").query("canary")
    coins = canary.set_index("sample_id")["canary_in"]
    mine = mdm[(mdm.client_id == 0) & mdm.sample_id.isin(coins.index)]
    by_round = mine.pivot(index="sample_id", columns="round", values="loss")  # canaries × took
    for name, rnd, scores in (
        ("loss", took[-1], -by_round[took[-1]]),
        ("loss_series", -1, -by_round[took].mean(axis=1)),
    ):
        res = audit_from_scores(
            scores.to_numpy(),
            coins.reindex(scores.index).to_numpy(),
            delta=1e-5,
            holdout_seed=stable_seed(0, name),
        )
        assert table.loc[name, "round"] == rnd
        assert table.loc[name, "epsilon_empirical"] == res.epsilon
        assert table.loc[name, "num_correct"] == res.num_correct
