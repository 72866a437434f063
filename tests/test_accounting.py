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
    noise_multiplier,
    record_epsilon,
)
from fedmia.privacy.events import (
    UNNOISED_STATISTICS,
    cell_privacy,
    event_from_dict,
    event_to_dict,
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
