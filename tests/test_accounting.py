"""Accounted ε of clipped ``dp``: dp-accounting's RDP and PLD against independent references.

References written here without dp-accounting:
* RDP: the Gaussian's Rényi divergence ``T·α / (2z²)`` at each order of the same order
  list, converted with ε(α) = r + ln(1 − 1/α) − ln(δα)/(α − 1) (Canonne, Kamath &
  Steinke 2020, Prop. 12 — the conversion dp-accounting's ``compute_epsilon`` uses),
  minimised over α;
* PLD: the exact privacy profile of T composed Gaussians (sensitivity 1, std z), one
  Gaussian with μ = √T / z: δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2) (Balle & Wang
  2018, Thm 8), inverted for ε by bisection.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import dp_accounting
import numpy as np
import pytest
from scipy.stats import norm

from fedmia.federation.defenses import (
    CLIENT_LEVEL,
    DEFENSES,
    Defense,
    Privacy,
    defense_from_config,
)
from fedmia.privacy import accounting
from fedmia.privacy.accounting import (
    EpsilonReport,
    accounted_epsilon,
    aggregate_epsilon,
    noise_multiplier,
    record_epsilon,
)
from fedmia.privacy.events import (
    UNNOISED_STATISTICS,
    cell_privacy,
    event_from_dict,
    event_to_dict,
    observer_record,
)

# The RDP orders dp-accounting uses by default (copied; the reference must minimise over
# the same set to be comparable).
ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]


def reference_rdp_epsilon(z: float, rounds: int, delta: float) -> float:
    """min over α of the RDP → (ε, δ) conversion of T Gaussians with noise multiplier z."""
    best = math.inf
    for a in ORDERS:
        r = rounds * a / (2 * z**2)
        if a > 1.01:
            best = min(best, r + math.log1p(-1 / a) - math.log(delta * a) / (a - 1))
    return max(best, 0.0)


def gaussian_delta(eps: float, mu: float) -> float:
    """Exact δ(ε) of a Gaussian mechanism with sensitivity / std = μ (Balle & Wang 2018)."""
    return float(norm.cdf(-eps / mu + mu / 2) - math.exp(eps + norm.logcdf(-eps / mu - mu / 2)))


def reference_pld_epsilon(z: float, rounds: int, delta: float) -> float:
    """Exact ε at δ of T composed Gaussians (μ = √T / z), by bisection on δ(ε)."""
    mu = math.sqrt(rounds) / z
    lo, hi = 0.0, 1.0
    while gaussian_delta(hi, mu) > delta:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if gaussian_delta(mid, mu) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def consistent(report: EpsilonReport) -> bool:
    """RDP ≥ PLD up to PLD's step, and RDP within 1.5× PLD (same relation in both)."""
    return (
        report.epsilon_rdp >= report.epsilon_pld - report.pld_interval
        and report.epsilon_rdp <= 1.5 * report.epsilon_pld
    )


def test_noise_multiplier_is_half_sigma():
    # sensitivity 2C, noise std σC → std per unit of sensitivity σ/2
    assert noise_multiplier(3.0) == 1.5


@pytest.mark.parametrize(("sigma", "rounds"), [(4.0, 30), (1.0, 300), (10.0, 1)])
def test_rdp_matches_the_gaussian_rdp_formula(sigma, rounds):
    report = accounted_epsilon(sigma, rounds, delta=1e-5)
    expected = reference_rdp_epsilon(sigma / 2, rounds, 1e-5)
    assert report.epsilon_rdp == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("sigma", "rounds", "delta"), [(4.0, 30, 1e-5), (1.0, 10, 1e-6), (10.0, 1, 1e-5)]
)
def test_pld_matches_the_exact_gaussian_profile(sigma, rounds, delta):
    report = accounted_epsilon(sigma, rounds, delta=delta)
    exact = reference_pld_epsilon(sigma / 2, rounds, delta)
    # PLD is pessimistic: never below the exact ε, above it by at most its step
    assert exact - 1e-9 <= report.epsilon_pld <= exact + report.pld_interval


def test_rdp_bounds_pld_over_a_grid():
    for sigma in (0.5, 1.0, 2.0, 4.0, 10.0):
        for rounds in (1, 10, 100):
            report = accounted_epsilon(sigma, rounds)
            assert consistent(report), report
            # more rounds or less noise never lowers ε
            assert report.epsilon_rdp >= accounted_epsilon(2 * sigma, rounds).epsilon_rdp


def test_a_relation_mismatch_is_caught(monkeypatch):
    # The PLD accountant under REPLACE_ONE doubles the sensitivity: ≈ 3× the RDP value at
    # the same σ, which the consistency check rejects.
    monkeypatch.setattr(
        accounting, "neighboring_relation", lambda: dp_accounting.NeighboringRelation.REPLACE_ONE
    )
    report = accounted_epsilon(4.0, 30)
    assert not consistent(report)
    assert report.epsilon_pld == pytest.approx(reference_pld_epsilon(1.0, 30, 1e-5), abs=0.01)


def test_sanity_values():
    report = accounted_epsilon(4.0, 30, delta=1e-5)
    print(f"σ=4, T=30, δ=1e-5: ε_RDP={report.epsilon_rdp:.3f}, ε_PLD={report.epsilon_pld:.3f}")
    assert 14 < report.epsilon_pld < report.epsilon_rdp < 17  # z = 2, μ = √30 / 2 ≈ 2.74
    assert accounted_epsilon(8.0, 30).epsilon_rdp < 10  # single digit at z = 4
    # The classical Gaussian mechanism (Dwork & Roth, Thm A.1): z ≥ √(2 ln(1.25/δ)) / ε
    # gives (ε, δ)-DP for ε < 1; both accountants must do at least as well.
    eps, delta = 0.5, 1e-5
    z = math.sqrt(2 * math.log(1.25 / delta)) / eps
    report = accounted_epsilon(2 * z, 1, delta=delta)
    assert report.epsilon_pld <= report.epsilon_rdp <= eps


def test_astronomical_epsilon_skips_pld():
    report = accounted_epsilon(0.01, 300)
    assert report.epsilon_pld is None and report.pld_interval is None
    assert "PLD skipped" in report.note
    assert report.epsilon_rdp == pytest.approx(reference_rdp_epsilon(0.005, 300, 1e-5))
    assert report.epsilon_rdp > 1e6
    # the threshold is an argument and is decided on the RDP value
    assert accounted_epsilon(1.0, 30, pld_skip_above=50).epsilon_pld is None
    assert accounted_epsilon(1.0, 30, pld_skip_above=200).epsilon_pld is not None


def test_zero_noise_is_infinite():
    report = accounted_epsilon(0.0, 10)
    assert report.epsilon_rdp == math.inf and report.epsilon_pld == math.inf
    assert not report.finite and "σ = 0" in report.note


def test_bad_inputs_raise():
    for args in ((-1.0, 1), (math.nan, 1), (1.0, 0), (1.0, 2.5), (1.0, True)):
        with pytest.raises(ValueError):
            accounted_epsilon(*args)
    with pytest.raises(ValueError):
        accounted_epsilon(1.0, 1, delta=0.0)
    with pytest.raises(ValueError, match="not a dp-accounting event"):
        event_from_dict({"noise_multiplier": 1.0})
    with pytest.raises(ValueError, match="only dp_accounting's events"):
        event_from_dict({"module_name": "os", "class_name": "system"})


def test_report_is_flat():
    row = accounted_epsilon(4.0, 30).to_dict()
    assert row["rounds"] == 30 and row["delta"] == 1e-5
    assert all(np.isscalar(v) or v is None for v in row.values())


def cell_epsilon(block, rounds=30, unnoised=False):
    """ε of a defense block as the train stage records it and the report reads it."""
    record = cell_privacy(
        defense_from_config(block).privacy(), rounds=rounds, unnoised_state=unnoised
    )
    return None if record is None else record_epsilon(record, delta=1e-5)


def test_each_defense_declares_its_own_event():
    dp = {"kind": "dp", "sigma": 8.0, "clip": 5.0}
    rep = cell_epsilon(dp)
    assert rep.epsilon_rdp == pytest.approx(accounted_epsilon(8.0, 30).epsilon_rdp)
    assert rep.epsilon_pld == pytest.approx(accounted_epsilon(8.0, 30).epsilon_pld)
    assert rep.relation == CLIENT_LEVEL
    assert cell_epsilon({"kind": "mixup", "alpha": 1.0}) is None  # no claim
    assert cell_epsilon({"kind": "none"}) is None
    noise = cell_epsilon({"kind": "dp_param_noise", "sigma": 0.1})
    assert math.isinf(noise.epsilon_rdp) and "unclipped" in noise.note
    bn = cell_epsilon(dp, unnoised=True)
    assert math.isinf(bn.epsilon_pld) and bn.note == UNNOISED_STATISTICS
    zero = cell_epsilon({"kind": "dp", "sigma": 0.0, "clip": 1.0})
    assert math.isinf(zero.epsilon_rdp) and "σ = 0" in zero.note
    # training-time steps act before the upload, upload-only ones after dp are
    # post-processing: dp's ε holds whatever their place
    aug = {"kind": "compose", "steps": [{"kind": "augment"}, dp, {"kind": "quantize", "bits": 8}]}
    assert cell_epsilon(aug).epsilon_rdp == pytest.approx(rep.epsilon_rdp)
    assert math.isinf(
        cell_epsilon(
            {
                "kind": "compose",
                "steps": [{"kind": "augment"}, {"kind": "dp_param_noise", "sigma": 0.01}],
            }
        ).epsilon_rdp
    )
    assert (
        cell_epsilon(
            {
                "kind": "compose",
                "steps": [{"kind": "augment"}, {"kind": "subsample", "fraction": 0.5}],
            }
        )
        is None
    )


def test_a_plugin_defense_declares_a_mechanism_and_a_step_it_cannot_vouch_for(monkeypatch):
    """A plugin's Laplace mechanism is accounted like fedmia's; an unvouched plugin step
    after dp voids dp's ε (it may read the data after the noise)."""
    monkeypatch.setattr(DEFENSES, "_items", dict(DEFENSES._items))

    @DEFENSES.register("laplace_toy")
    @dataclass(frozen=True)
    class LaplaceToy(Defense):
        privacy_step = "mechanism"

        def privacy(self):
            return Privacy(dp_accounting.LaplaceDpEvent(2.0), "a toy relation")

    @DEFENSES.register("reads_data_toy")
    @dataclass(frozen=True)
    class ReadsData(Defense):
        privacy_step = None

    rep = cell_epsilon({"kind": "laplace_toy"}, rounds=3)
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.LaplaceDpEvent(2.0), 3)
    assert rep.epsilon_rdp == pytest.approx(acc.get_epsilon(1e-5))
    assert rep.relation == "a toy relation"
    dp = {"kind": "dp", "sigma": 8.0, "clip": 5.0}
    after = cell_epsilon({"kind": "compose", "steps": [dp, {"kind": "reads_data_toy"}]})
    assert math.isinf(after.epsilon_rdp) and "follows a privacy mechanism" in after.note
    before = cell_epsilon({"kind": "compose", "steps": [{"kind": "reads_data_toy"}, dp]})
    assert before.epsilon_rdp == pytest.approx(accounted_epsilon(8.0, 30).epsilon_rdp)


def test_an_event_survives_the_manifest():
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.ComposedDpEvent(
            [
                dp_accounting.GaussianDpEvent(0.5),
                dp_accounting.NoOpDpEvent(),
                dp_accounting.NonPrivateDpEvent(),
            ]
        ),
        7,
    )
    assert event_from_dict(json.loads(json.dumps(event_to_dict(event)))) == event


# ------------------------------------------------------- the secure-aggregation view


def _dp_record(sigma, rounds, participation, unnoised=False, block=None):
    block = block or {"kind": "dp", "sigma": sigma, "clip": 1.0}
    return cell_privacy(
        defense_from_config(block).privacy(),
        rounds=rounds,
        unnoised_state=unnoised,
        participation=participation,
    )


def _full(k, rounds):
    return {"fraction": 1.0, "sampling": "uniform", "num_clients": k, "client_rounds": [rounds] * k}


def test_aggregate_epsilon_of_a_full_cell_matches_a_hand_computation():
    """σ = 1, K = 10 every round, T = 30: the sum of 10 uploads, noise σC√10 on 2C."""
    sigma, k, rounds, delta = 1.0, 10, 30, 1e-5
    record = _dp_record(sigma, rounds, _full(k, rounds))
    report = aggregate_epsilon(record, delta=delta)
    z = sigma * math.sqrt(k) / 2
    # by hand with dp-accounting: T Gaussians of noise multiplier σ√m/2, add-or-remove
    rdp_acc = dp_accounting.rdp.RdpAccountant()
    rdp_acc.compose(dp_accounting.GaussianDpEvent(z), rounds)
    assert report.epsilon_rdp == pytest.approx(rdp_acc.get_epsilon(delta), rel=1e-12)
    pld_acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=report.pld_interval)
    pld_acc.compose(dp_accounting.GaussianDpEvent(z), rounds)
    assert report.epsilon_pld == pytest.approx(pld_acc.get_epsilon(delta), rel=1e-9)
    # and without it
    assert report.epsilon_rdp == pytest.approx(reference_rdp_epsilon(z, rounds, delta), rel=1e-12)
    exact = reference_pld_epsilon(z, rounds, delta)
    assert exact - 1e-9 <= report.epsilon_pld <= exact + report.pld_interval
    assert report.rounds == rounds and "m = 10" in report.note and "no amplification" in report.note
    # the same as dp with σ√K against the server of the uploads, far below σ's
    assert report.epsilon_rdp == pytest.approx(
        accounted_epsilon(sigma * math.sqrt(k), rounds).epsilon_rdp, rel=1e-12
    )
    assert report.epsilon_rdp < record_epsilon(record, delta=delta).epsilon_rdp / 4
    print(
        f"dp σ={sigma}, K={k}, T={rounds}: server ε_RDP "
        f"{record_epsilon(record, delta=delta).epsilon_rdp:.2f}, aggregate ε_RDP "
        f"{report.epsilon_rdp:.2f}, ε_PLD {report.epsilon_pld:.2f}"
    )


def test_aggregate_epsilon_composes_the_most_exposed_client_s_rounds():
    """Poisson, recorded participants: client 1 took part in fewer rounds but in smaller
    ones (Σ 1/m = 1/1 + 1/2 + 1/2 = 2 against client 0's 4 · 1/4 + 1/2 = 1.5)."""
    sigma, rounds, delta = 2.0, 6, 1e-5
    participants = [[0, 1, 2, 3], [0, 1], [0, 2, 3, 4], [1], [0, 2, 3, 4], [0, 1, 2, 3], []]
    participation = {
        "fraction": 0.6,
        "sampling": "poisson",
        "num_clients": 5,
        "client_rounds": [5, 3, 4, 4, 2],
        "participants": participants,  # round 7 lies past the rounds the server saw
    }
    record = _dp_record(sigma, rounds, participation)
    report = aggregate_epsilon(record, delta=delta)
    assert report.rounds == 4  # client 1: rounds 1, 2, 4, 6 with m = 4, 2, 1, 4
    # one Gaussian: 1/z_eff² = Σ_r 1/(z² m_r), z = σ/2
    z_eff = (sigma / 2) / math.sqrt(1 / 4 + 1 / 2 + 1 + 1 / 4)
    assert report.epsilon_rdp == pytest.approx(reference_rdp_epsilon(z_eff, 1, delta), rel=1e-9)
    exact = reference_pld_epsilon(z_eff, 1, delta)
    assert exact - 1e-6 <= report.epsilon_pld <= exact + 2 * report.pld_interval
    assert "actual participants" in report.note and "1 with m = 1, 1 with m = 2" in report.note
    # no amplification: client 1's own 4 rounds against the server bound it from above
    assert report.epsilon_rdp < accounted_epsilon(sigma, 4).epsilon_rdp
    # without the rounds' participants Poisson's m is unknown: the server's ε
    unknown = {k: v for k, v in participation.items() if k != "participants"}
    fallback = aggregate_epsilon(_dp_record(sigma, rounds, unknown), delta=delta)
    assert fallback.epsilon_rdp == pytest.approx(accounted_epsilon(sigma, 5).epsilon_rdp)
    assert "not recorded" in fallback.note
    # uniform sampling: m = 3 of 5 in each of the busiest client's rounds
    uniform = {**unknown, "sampling": "uniform"}
    got = aggregate_epsilon(_dp_record(sigma, rounds, uniform), delta=delta)
    assert got.rounds == 5 and got.epsilon_rdp == pytest.approx(
        accounted_epsilon(sigma * math.sqrt(3), 5).epsilon_rdp, rel=1e-12
    )


def test_aggregate_epsilon_without_a_gaussian_is_the_server_s_or_none():
    full = _full(4, 30)
    compose = {
        "kind": "compose",
        "steps": [{"kind": "augment"}, {"kind": "dp", "sigma": 2.0, "clip": 1.0}],
    }
    record = _dp_record(None, 30, full, block=compose)
    got, server = aggregate_epsilon(record), record_epsilon(record)
    assert got.epsilon_rdp == server.epsilon_rdp and "Gaussian mechanism only" in got.note
    for record in (
        _dp_record(0.0, 30, full),  # σ = 0
        _dp_record(2.0, 30, full, unnoised=True),  # un-noised BatchNorm statistics
        _dp_record(None, 30, full, block={"kind": "dp_param_noise", "sigma": 0.1}),
    ):
        assert math.isinf(aggregate_epsilon(record).epsilon_rdp)
    assert _dp_record(None, 30, full, block={"kind": "none"}) is None  # no claim, no ε
    # a record without the number of clients: the server's ε, said
    bare = cell_privacy(
        defense_from_config({"kind": "dp", "sigma": 2.0, "clip": 1.0}).privacy(),
        rounds=30,
        unnoised_state=False,
    )
    assert aggregate_epsilon(bare).epsilon_rdp == record_epsilon(bare).epsilon_rdp
    assert "number of participants is not recorded" in aggregate_epsilon(bare).note
    assert aggregate_epsilon({k: v for k, v in bare.items() if k != "aggregate"}) is None


def test_the_aggregate_view_adds_one_key_and_changes_nothing_else():
    privacy = defense_from_config({"kind": "dp", "sigma": 2.0, "clip": 1.0}).privacy()
    full = cell_privacy(privacy, rounds=30, unnoised_state=False, participation=_full(4, 30))
    assert full.pop("aggregate")["accountant"] == "add_or_remove"
    assert full == {
        "event": event_to_dict(dp_accounting.SelfComposedDpEvent(privacy.event, 30)),
        "rounds": 30,
        "relation": CLIENT_LEVEL,
        "note": "",
    }
    sampled = {
        "fraction": 0.5,
        "sampling": "uniform",
        "num_clients": 4,
        "client_rounds": [15, 14, 16, 15],
    }
    partial = cell_privacy(privacy, rounds=30, unnoised_state=False, participation=sampled)
    partial.pop("aggregate")
    assert partial == {
        "event": event_to_dict(dp_accounting.SelfComposedDpEvent(privacy.event, 16)),
        "rounds": 16,
        "relation": CLIENT_LEVEL,
        "note": (
            "against the server, which knows who took part: the rounds a client took part "
            "in, at most 16 of 30"
        ),
        "client_rounds": [15, 14, 16, 15],
        "observer": observer_record(
            privacy.event, rounds=30, unnoised_state=False, participation=sampled
        ),
    }
    # the recorded participants change the aggregate alone
    with_lists = cell_privacy(
        privacy,
        rounds=30,
        unnoised_state=False,
        participation={**sampled, "participants": [[0, 1]] * 30},
    )
    with_lists.pop("aggregate")
    assert with_lists == partial
    # and the record survives the manifest
    record = cell_privacy(privacy, rounds=30, unnoised_state=False, participation=sampled)
    assert json.loads(json.dumps(record)) == record
