from __future__ import annotations

import copy
import math
from decimal import Decimal, localcontext

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedmia.attacker.measures import (
    compute_round_measures,
    logit_statistics,
    per_sample_grad_products,
)
from fedmia.federation.state import FlatState


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 5, 2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 3),
    )


def setup(k: int, n: int = 13):
    torch.manual_seed(1)
    model = small_model()
    model.train()(torch.randn(16, 3, 8, 8))  # non-trivial BatchNorm statistics
    state = FlatState(model)
    w = state.snapshot()
    uploads = 0.05 * torch.randn(k, w.numel())
    return state, w, uploads, torch.randn(n, 3, 8, 8), torch.randint(0, 3, (n,))


def reference(state: FlatState, w, uploads, x, y):
    """The obvious way: a backward pass per sample, explicit cosine and norms."""
    model = state.module.eval()
    mask = state.layout.param_mask()
    k, n = uploads.shape[0], len(y)
    loss = torch.empty(k, n)
    cos = torch.empty(k, n)
    diff = torch.empty(k, n)
    norm = torch.empty(n)
    for c in range(k):
        state.load(w - uploads[c])
        with torch.no_grad():
            loss[c] = F.cross_entropy(model(x), y, reduction="none")
    state.load(w)
    for i in range(n):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        norm[i] = g @ g
        for c in range(k):
            d = uploads[c][mask]
            cos[c, i] = torch.dot(g, d) / (g.norm() * d.norm())
            diff[c, i] = d @ d - (d - g) @ (d - g)
    return loss, cos, diff, norm


def test_measures_match_per_sample_backward_loop():
    state, w, uploads, x, y = setup(k=3)
    got = compute_round_measures(state, w, uploads, x, y, chunk_size=4, batch_size=5)
    loss, cos, diff, norm = reference(state, w, uploads, x, y)
    for name, want in (
        ("loss", loss.double()),
        ("cos", cos),
        ("grad_diff", diff),
        ("grad_norm", norm),
    ):
        torch.testing.assert_close(getattr(got, name), want, rtol=1e-5, atol=1e-6, msg=name)
    assert got.confidence.allclose(torch.exp(-loss), rtol=1e-5)
    assert got.loss.shape == (3, 13) and got.grad_norm.shape == (13,)
    assert got.loss.dtype == got.logit_conf.dtype == torch.float64
    p = torch.exp(-got.loss)  # φ = log p − log(1 − p), from the same logits
    torch.testing.assert_close(got.logit_conf, torch.log(p) - torch.log1p(-p), rtol=1e-9, atol=1e-9)


def slow_logit_statistics(logits: list[float], y: int) -> tuple[Decimal, Decimal]:
    """The definitions at 400 digits.

    loss = log Σ_j e^{z_j} − z_y and φ = z_y − log Σ_{j≠y} e^{z_j}.
    """
    with localcontext() as ctx:
        ctx.prec = 400  # e^{−300} ≈ 1e-130 must survive 1 + e^{−300}
        z = [Decimal(repr(float(v))) for v in logits]
        every = sum(v.exp() for v in z).ln()
        others = sum(v.exp() for j, v in enumerate(z) if j != y).ln()
        return every - z[y], z[y] - others


@pytest.mark.parametrize("margin", [0.0, 3.0, 17.0, 40.0, 90.0, 300.0])
def test_loss_and_logit_conf_keep_their_precision(margin):
    """float64 from the logits: a confident sample's loss ≈ e^{−φ} > 0, never a float32 0."""
    g = torch.Generator().manual_seed(int(margin))
    logits = torch.randn(6, 5, generator=g).float()
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    logits[torch.arange(6), y] += margin
    loss, phi = logit_statistics(logits, y)
    assert loss.dtype == phi.dtype == torch.float64
    for i in range(6):
        want_loss, want_phi = slow_logit_statistics(logits[i].tolist(), int(y[i]))
        assert float(loss[i]) == pytest.approx(float(want_loss), rel=1e-12, abs=0)
        assert float(phi[i]) == pytest.approx(float(want_phi), rel=1e-12, abs=1e-12)
        assert loss[i] > 0
    float32_ce = F.cross_entropy(logits, y, reduction="none")
    if margin >= 40:  # the defect this fixes: float32 rounds p_y to 1, the loss to 0
        assert (float32_ce == 0).all()


def test_measures_leave_batchnorm_statistics_alone():
    state, w, uploads, x, y = setup(k=2)
    compute_round_measures(state, w, uploads, x, y)
    assert torch.equal(state.flat, w)  # eval mode: running stats untouched, model = global


@pytest.mark.parametrize("k", [2, 7])
def test_per_sample_gradients_once_per_sample_whatever_k(k):
    state, w, uploads, x, y = setup(k=k, n=13)
    seen = []

    def counting(model, params, buffers, xc, yc, updates):
        seen.append(len(yc))
        return per_sample_grad_products(model, params, buffers, xc, yc, updates)

    compute_round_measures(state, w, uploads, x, y, chunk_size=5, grad_products=counting)
    assert seen == [5, 5, 3]  # every sample exactly once, independent of K
    assert sum(seen) == len(y) and math.ceil(13 / 5) == len(seen)


def test_cos_keeps_float32_accuracy_over_millions_of_parameters():
    """‖Δ_k‖ over 9M parameters (ResNet18 has 11M): a float32 ``norm`` is off by ~3e-4 there."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3000, 3000), nn.ReLU(), nn.Linear(3000, 3))
    state = FlatState(model)
    w = state.snapshot()
    uploads = 0.01 * torch.randn(2, w.numel())
    x, y = torch.randn(2, 3, 10, 100), torch.tensor([0, 2])
    got = compute_round_measures(state, w, uploads, x, y)
    model64 = copy.deepcopy(model).double()
    for i in range(2):
        model64.zero_grad()
        F.cross_entropy(model64(x[i : i + 1].double()), y[i : i + 1]).backward()
        g = torch.cat([p.grad.reshape(-1) for p in model64.parameters()])
        for c in range(2):
            d = uploads[c].double()
            want = (g @ d) / (g.norm() * d.norm())
            torch.testing.assert_close(got.cos[c, i].double(), want, rtol=1e-5, atol=0)
