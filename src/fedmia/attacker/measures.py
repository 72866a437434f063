"""Membership disclosure measures of the evaluation samples at one observed round.

For evaluation sample ``x_i`` (label ``y_i``), client ``k`` and round ``r`` with
global model ``w`` (the one the server sent) and upload ``Δ_k = w − w^k``:

* ``loss[k, i]``      = CE(f(x_i; w − Δ_k), y_i), on the client's uploaded model, float64;
* ``logit_conf[k, i]`` = φ = z_y − logsumexp_{j≠y} z_j, LiRA's logit-scaled confidence
  log p_y − log(1 − p_y) from the logits z of the same pass, float64;
* ``g_i``             = ∇_θ CE(f(x_i; w), y_i) over the trainable parameters θ;
* ``cos[k, i]``       = cos(g_i, Δ_k);
* ``grad_diff[k, i]`` = ‖Δ_k‖² − ‖Δ_k − g_i‖² = 2⟨g_i, Δ_k⟩ − ‖g_i‖²;
* ``grad_norm[i]``    = ‖g_i‖² (independent of k);
* ``correct[k, i]``, ``confidence[k, i]``: argmax hit and softmax probability of
  ``y_i`` under the client's model (cheap by-products of the loss pass).

**Precision** (:func:`logit_statistics`). The logits come from the float32 forward pass;
φ and the loss are computed from them in float64: φ first (a log-sum-exp over the other
classes), then ``loss = softplus(−φ) = log(1 + e^{−φ})``, which is −log p_y exactly and keeps
its small values — a float32 cross-entropy is exactly 0 once p_y rounds to 1 (margin ≳ 17),
and even a float64 log-softmax ``z_y − logsumexp(z)`` is 0 from a margin of ≈ 37 on, while
``softplus(−φ)`` stays positive up to φ ≈ 745. Neither is ever derived from the other
after rounding.

BatchNorm is in eval mode throughout. Only ⟨g_i, Δ_k⟩ for all k and ‖g_i‖² are
needed: ``g_i`` is handled once per sample and round, whatever K is. Two routes
compute them for a chunk of samples (the ``measure.route`` of the config, registered in
:data:`fedmia.attacker.routes.MEASURE_ROUTES`):

* ``layerwise`` (default, :mod:`fedmia.attacker.layerwise`): from one batched forward and
  backward pass, layer by layer, never forming per-sample gradients — near the
  cost of the plain batched passes;
* ``func`` (:func:`per_sample_grad_products`): per-sample gradients of the chunk
  with ``torch.func`` (vmap of grad), contracted with the K stacked updates —
  simple and general, the reference the tests and benchmarks compare against.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from fedmia.attacker.layerwise import layerwise_grad_products
from fedmia.attacker.routes import GradProducts
from fedmia.federation.state import FlatState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundMeasures:
    """Measures of N samples under K clients at one round (CPU tensors).

    Attributes:
        loss, logit_conf: float64 K×N (:func:`logit_statistics`).
        cos, grad_diff, confidence: float32 K×N.
        correct: bool K×N.
        grad_norm: float32 N (squared norm ‖g_i‖²).
    """

    loss: torch.Tensor
    logit_conf: torch.Tensor
    cos: torch.Tensor
    grad_diff: torch.Tensor
    grad_norm: torch.Tensor
    correct: torch.Tensor
    confidence: torch.Tensor


def logit_statistics(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss and LiRA's logit-scaled confidence from logits, in float64.

    φ = z_y − logsumexp_{j≠y} z_j = log p_y − log(1 − p_y) and loss = −log p_y =
    softplus(−φ) = log(1 + e^{−φ}) (the two are the same identity: log Σ_j e^{z_j} − z_y =
    log(1 + e^{logsumexp_{j≠y} z_j − z_y})). Both in float64 from the logits, so a confident
    sample keeps a positive loss (≈ e^{−φ}) down to 1e-323 instead of rounding to 0.

    Args:
        logits: float B×C (any float dtype; cast to float64), C ≥ 2.
        y: int64 B, labels.

    Returns:
        ``(loss, phi)``, float64 B each.
    """
    z = logits.double()
    zy = z.gather(1, y[:, None])[:, 0]
    others = z.scatter(1, y[:, None], float("-inf"))
    phi = zy - torch.logsumexp(others, dim=1)
    return F.softplus(-phi), phi


@torch.no_grad()
def client_losses(
    state: FlatState,
    global_state: torch.Tensor,
    uploads: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample loss, logit-scaled confidence, correctness and p_y under each upload.

    One batched forward pass per (client, batch); everything from its logits
    (:func:`logit_statistics`).

    Args:
        state: flat-state wrapper of the model (overwritten).
        global_state: float32 P, the model the server sent.
        uploads: float32 K×P, the uploaded updates.
        x: float32 N×C×H×W (normalised).
        y: int64 N, labels.
        batch_size: samples per forward pass.

    Returns:
        ``(loss, logit_conf, correct, confidence)``, each K×N: float64, float64, bool,
        float32 (p_y = e^{−loss}).
    """
    model = state.module.eval()
    k, n = uploads.shape[0], x.shape[0]
    loss = torch.empty(k, n, dtype=torch.float64, device=x.device)
    phi = torch.empty(k, n, dtype=torch.float64, device=x.device)
    correct = torch.empty(k, n, dtype=torch.bool, device=x.device)
    for c in range(k):
        state.load(global_state - uploads[c])
        for s in range(0, n, batch_size):
            logits = model(x[s : s + batch_size])
            yy = y[s : s + batch_size]
            loss[c, s : s + batch_size], phi[c, s : s + batch_size] = logit_statistics(logits, yy)
            correct[c, s : s + batch_size] = logits.argmax(1) == yy
    return loss, phi, correct, torch.exp(-loss).float()


def per_sample_grad_products(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    updates: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """⟨g_i, Δ_k⟩ and ‖g_i‖² for one chunk, by ``torch.func`` per-sample gradients.

    Args:
        model: the network (eval mode).
        params: the global model's parameters by name.
        buffers: its buffers (BatchNorm statistics) by name.
        x: float32 B×C×H×W.
        y: int64 B, labels.
        updates: per parameter name, the K stacked updates, K×(parameter shape).

    Returns:
        ``(dots, sqnorm)``: B×K and B.
    """

    def sample_loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor):
        out = functional_call(model, (p, buffers), (xi[None],))
        return F.cross_entropy(out, yi[None])

    grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)  # name → B×shape
    b = x.shape[0]
    dots = torch.zeros(b, next(iter(updates.values())).shape[0], device=x.device)
    sqnorm = torch.zeros(b, device=x.device)
    for name, g in grads.items():
        g = g.reshape(b, -1)
        dots += g @ updates[name].reshape(updates[name].shape[0], -1).T
        sqnorm += (g * g).sum(1)
    return dots, sqnorm


def auto_grad_products(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    updates: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer-wise route, or the ``torch.func`` route for models it does not cover.

    Args and returns as :func:`per_sample_grad_products`.
    """
    try:
        return layerwise_grad_products(model, params, buffers, x, y, updates)
    except NotImplementedError as e:
        log.warning("layer-wise route unavailable (%s); using the torch.func route", e)
        return per_sample_grad_products(model, params, buffers, x, y, updates)


def compute_round_measures(
    state: FlatState,
    global_state: torch.Tensor,
    uploads: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    chunk_size: int = 128,
    batch_size: int = 500,
    grad_products: GradProducts = auto_grad_products,
) -> RoundMeasures:
    """All measures of N samples for the K clients of one observed round.

    Args:
        state: flat-state wrapper of a model of the right architecture (overwritten).
        global_state: float32 P, the model the server sent.
        uploads: float32 K×P, the uploaded updates.
        x: float32 N×C×H×W (normalised), the evaluation samples.
        y: int64 N, their labels.
        chunk_size: samples per chunk (bounds memory: the ``func`` route holds
            chunk_size × #parameters floats, the layer-wise one activations and a
            bounded per-layer buffer).
        batch_size: samples per forward pass of the loss.
        grad_products: the route computing ⟨g_i, Δ_k⟩ and ‖g_i‖² of a chunk
            (:data:`fedmia.attacker.routes.MEASURE_ROUTES`; default: layer-wise).
    """
    loss, phi, correct, conf = client_losses(state, global_state, uploads, x, y, batch_size)
    state.load(global_state)
    model = state.module.eval()
    layout = state.layout
    params = {e.name: state.flat[e.slice].view(e.shape) for e in layout.entries if e.is_param}
    buffers = {e.name: state.flat[e.slice].view(e.shape) for e in layout.entries if not e.is_param}
    buffers.update({n: b for n, b in model.named_buffers() if n not in buffers})
    k = uploads.shape[0]
    upd = {e.name: uploads[:, e.slice].view(k, *e.shape) for e in layout.entries if e.is_param}
    n = x.shape[0]
    dots = torch.empty(n, k, device=x.device)
    sqnorm = torch.empty(n, device=x.device)
    for s in range(0, n, chunk_size):
        d, q = grad_products(
            model, params, buffers, x[s : s + chunk_size], y[s : s + chunk_size], upd
        )
        dots[s : s + chunk_size], sqnorm[s : s + chunk_size] = d, q
    # ‖Δ_k‖ from BLAS dot products over blocks of 65,536 entries, summed in float64: a
    # float32 ``norm`` over ResNet18's 11M parameters accumulates ~4e-4 relative error; a
    # ``dot`` reads each block once, without a temporary (measured on AlexNet's 2.5M × 10:
    # 8.6 ms against 29 ms for square-then-sum; 3.6e-8 relative error). K
    upd_norm = torch.stack(
        [
            torch.stack(
                [torch.dot(c, c) for u in upd.values() for c in u[j].flatten().split(1 << 16)]
            )
            .double()
            .sum()
            for j in range(k)
        ]
    )
    upd_norm = upd_norm.sqrt().to(dots.dtype)
    g_norm = sqnorm.clamp_min(0).sqrt()
    cos = dots / (g_norm[:, None] * upd_norm[None, :]).clamp_min(1e-30)
    return RoundMeasures(
        loss=loss.cpu(),
        logit_conf=phi.cpu(),
        cos=cos.T.contiguous().cpu(),
        grad_diff=(2 * dots - sqnorm[:, None]).T.contiguous().cpu(),
        grad_norm=sqnorm.cpu(),
        correct=correct.cpu(),
        confidence=conf.cpu(),
    )
