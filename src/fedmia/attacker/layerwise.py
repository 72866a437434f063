"""⟨g_i, Δ_k⟩ and ‖g_i‖² layer by layer from one batched forward and backward pass.

The *near-the-floor* route of :mod:`fedmia.attacker.measures`. For a chunk of B samples at
the global model (eval mode: BatchNorm uses its running statistics, GroupNorm
normalises each sample by its own statistics, so samples do not interact),
``g_i = ∇_θ CE(f(x_i), y_i)``. One batched forward pass of the
summed loss records every parameterised layer's input ``a`` and, during one
backward pass, its output gradient ``δ`` (``δ_i`` is sample i's own, because the
loss is summed). Per-sample gradients are then never formed for the whole model:
each layer adds its share of ``dots[i, k] = ⟨g_i, Δ_k⟩`` and ``sqnorm[i] = ‖g_i‖²``.

Linear and Conv2d layers are handled alike through the unfolded input
``U_i`` (D×T: D = C_in·kh·kw, T output positions; a 2-D Linear input has T = 1)
and the output gradient ``δ_i`` (C×T); the weight's per-sample gradient is
``G_i = δ_i U_iᵀ`` (C×D). Two methods, chosen per layer by an estimate of
their cost per sample (weighted multiply-adds plus memory traffic, :func:`conv_costs`):

* ``materialise``: form ``G_i`` in blocks of output channels (``bmm``, C·D·T), each
  block contracted at once with the K updates' matching rows (one GEMM, K·C·D) while
  it is still in cache; ``‖G_i‖²`` from the T×T Gram matrices (below) where they cost
  less than forming ``G_i``, else from the block itself. Fewest multiply-adds, but its
  GEMMs have a short dimension (T, or K outputs) and run ~4× slower per multiply-add
  than ``ghost``'s: chosen where T is not small (AlexNet's 8×8 and 4×4 layers; all
  of ResNet18's convolutions).
* ``ghost``: ``‖G_i‖² = Σ_{t,t'} (U_iᵀU_i)_{tt'} (δ_iᵀδ_i)_{tt'}`` from the two
  T×T Gram matrices (T²·(D + C); Goodfellow 2015, Li et al. 2021), and
  ``⟨G_i, Δ_k⟩ = Σ_t δ_i · (Δ_k U_i)`` — the layer input convolved with each of the K
  update kernels, one GEMM per update over the whole sub-batch (K·C·D·T, i.e. K
  forward passes of the layer). Chosen where T is small (AlexNet's 2×2 layers) and
  for 2-D Linear layers (T = 1), where it is ``δ_iᵀ Δ_k a_i`` and ``‖δ_i‖²‖a_i‖²``.

Biases add ``Σ_t δ_i`` per sample. A norm layer's affine terms add
``dγ_i = Σ_pos δ_i ⊙ x̂_i`` and ``dβ_i = Σ_pos δ_i``, exactly, with ``δ_i`` the
gradient w.r.t. its output and ``x̂_i`` the sample's normalised input,
recomputed from the recorded input: with the running statistics for BatchNorm
(eval mode), with the sample's own per-group mean and (biased) variance for
GroupNorm. GroupNorm's backward mixes positions and channels of one sample
only, so the layers below it still receive per-sample ``δ_i``. Any other module
type owning parameters raises ``NotImplementedError``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

log = logging.getLogger(__name__)

ConvMethod = Literal["auto", "materialise", "ghost"]
CONV_METHODS: tuple[str, ...] = ("auto", "materialise", "ghost")
#: Default bound on the floats of one layer's per-sub-batch work buffers (64 MB in float32).
MAX_BUFFER_FLOATS = 1 << 24
#: Multiply-adds that moving one float through memory costs, roughly: measured on a 2-core
#: CPU (materialising whole per-sample gradients ran at ~1/100 of the GEMM rate per float);
#: a GPU's ratio is of the same order. Used only to choose a method per layer.
MEMORY_WEIGHT = 100
#: Cost of one multiply-add of ``materialise``'s small-dimension GEMMs relative to
#: ``ghost``'s large one: measured ~3.4 (AlexNet's 2×2 layers, T = 4) to ~4.8 (its 4×4
#: layer, T = 16) on a 2-core CPU, K = 10, CPU time. Used only to choose a method per layer.
SMALL_GEMM_WEIGHT = 4
#: Floats of one block of per-sample gradients ``G_i`` in the ``materialise`` method
#: (4 MB in float32): small enough to be read back from cache.
G_BLOCK_FLOATS = 1 << 20
_SUPPORTED = (nn.Linear, nn.Conv2d, _BatchNorm, nn.GroupNorm)
_NORMS = (_BatchNorm, nn.GroupNorm)


def conv_costs(c_out: int, d: int, t: int, k: int) -> dict[str, float]:
    """Estimated cost per sample of the two weight methods of a Linear/Conv2d layer.

    Multiply-adds plus :data:`MEMORY_WEIGHT` times the floats written to and read
    back from memory (the unfolded input; for ``ghost`` also the Gram matrices and the
    K convolved outputs; ``materialise`` keeps its ``G_i`` blocks in cache). The
    ``materialise`` GEMMs (inner dimension T for ``G_i``, K outputs for the dots) run
    :data:`SMALL_GEMM_WEIGHT` times slower per multiply-add than ``ghost``'s one large GEMM.

    Args:
        c_out: output channels (features) C.
        d: unfolded input size D = C_in·kh·kw (``in_features`` for Linear).
        t: output positions T (1 for a 2-D Linear input).
        k: number of updates K.

    Returns:
        ``{"materialise": ..., "ghost": ...}``.
    """
    unfold = d * t if t > 1 else 0
    gram = t * t * (d + c_out + 1) if t > 1 else d + c_out
    mat_macs = c_out * d * t + k * c_out * d + min(gram, c_out * d)
    ghost_macs = gram + k * c_out * d * t
    ghost_floats = unfold + 2 * t * t + 2 * k * c_out * t
    return {
        "materialise": SMALL_GEMM_WEIGHT * mat_macs + MEMORY_WEIGHT * unfold,
        "ghost": ghost_macs + MEMORY_WEIGHT * ghost_floats,
    }


def buffer_floats(method: str, c_out: int, d: int, t: int, k: int) -> int:
    """Floats per sample of a weight method's work buffers (unfolded input included).

    ``materialise``'s block of ``G_i`` is bounded on its own (:data:`G_BLOCK_FLOATS`);
    its 2·T² counts the Gram matrices even where ‖G_i‖² is read from the blocks instead,
    which keeps the sub-batches of large-T layers small: ResNet18's 32×32 layers ran in
    0.32 s of CPU time so (8 samples per sub-batch) against 0.47 s with all 64 at once.
    """
    unfold = d * t if t > 1 else 0
    if method == "materialise":
        return unfold + 2 * t * t + d  # the block holds at least one channel per sample
    return unfold + 2 * t * t + k * c_out * t


@dataclass
class _Capture:
    """What the forward pass recorded for one module (inputs are detached references)."""

    name: str  # the module's prefix in ``named_modules``
    module: nn.Module
    params: dict[str, str] = field(default_factory=dict)  # attribute → full parameter name
    calls: int = 0
    a: torch.Tensor | None = None
    a_version: int = 0
    stats: tuple[torch.Tensor, torch.Tensor, float] | None = None  # BN mean, var, eps
    blind: bool = False  # ran on an input that does not depend on x


class _InputModified(Exception):
    """A recorded layer input was changed in place after the layer read it."""


def _check_module(module: nn.Module, name: str) -> None:
    kind = type(module).__name__
    if not isinstance(module, _SUPPORTED):
        raise NotImplementedError(
            f"layer-wise grad products do not support module '{name}' of type {kind} "
            "(supported: Linear, Conv2d, BatchNorm, GroupNorm); use the torch.func route "
            "fedmia.attacker.measures.per_sample_grad_products for this model"
        )
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise NotImplementedError(
                f"layer-wise grad products need groups=1 convolutions; '{name}' ({kind}) has "
                f"groups={module.groups}; use fedmia.attacker.measures.per_sample_grad_products"
            )
        if module.padding_mode != "zeros":
            raise NotImplementedError(
                f"layer-wise grad products need zero padding; '{name}' ({kind}) has "
                f"padding_mode={module.padding_mode!r}; use "
                "fedmia.attacker.measures.per_sample_grad_products"
            )
    if isinstance(module, _BatchNorm) and module.running_mean is None:
        raise NotImplementedError(
            f"'{name}' ({kind}) keeps no running statistics, so its eval-mode output mixes "
            "the samples of a batch; use fedmia.attacker.measures.per_sample_grad_products"
        )


def _unfold(module: nn.Module, a: torch.Tensor, layout: str) -> torch.Tensor:
    """The layer input as columns: ``layout`` "bdt" (B×D×T) or "dn" (D×(B·T)).

    D = C_in·kh·kw in the weight's order and T = output positions row-major, as
    ``F.unfold``; a 2-D Linear input has T = 1 and D = in_features. Built from
    strided views plus at most one copy (on a busy CPU ``F.unfold``'s parallel
    loop can cost far more than that copy).
    """
    if isinstance(module, nn.Linear):
        rows = a.reshape(-1, a.shape[-1])  # (B·T)×D, a view
        if layout == "bdt":
            return rows.view(a.shape[0], -1, a.shape[-1]).transpose(1, 2)
        return rows.T
    (kh, kw), (dh, dw), (sh, sw) = module.kernel_size, module.dilation, module.stride
    if module.padding == "same":  # possibly asymmetric: F.pad order is (left, right, top, bottom)
        pads: list[int] = []
        for dil, ks in ((dw, kw), (dh, kh)):
            total = dil * (ks - 1)
            pads += [total // 2, total - total // 2]
    elif module.padding == "valid":
        pads = [0, 0, 0, 0]
    else:
        ph, pw = module.padding
        pads = [pw, pw, ph, ph]
    if any(pads):
        a = F.pad(a, pads)
    p = a.unfold(2, dh * (kh - 1) + 1, sh)[..., ::dh]  # B×C×Ho×W×kh
    p = p.unfold(3, dw * (kw - 1) + 1, sw)[..., ::dw]  # B×C×Ho×Wo×kh×kw
    b, c, ho, wo = p.shape[:4]
    # positions (Ho, Wo) innermost in both layouts: the copy reads along rows of the input
    if layout == "bdt":
        return p.permute(0, 1, 4, 5, 2, 3).reshape(b, c * kh * kw, ho * wo)
    return p.permute(1, 4, 5, 0, 2, 3).reshape(c * kh * kw, b * ho * wo)


def _weight_terms(
    cap: _Capture,
    a: torch.Tensor,
    delta: torch.Tensor,
    updates: dict[str, torch.Tensor],
    dots: torch.Tensor,
    sqnorm: torch.Tensor,
    method: str,
    max_floats: int,
) -> None:
    """Add a Linear/Conv2d layer's weight (and bias) terms to ``dots`` and ``sqnorm``."""
    module = cap.module
    b = a.shape[0]
    if isinstance(module, nn.Conv2d):
        delta = delta.reshape(b, delta.shape[1], -1)  # B×C×T, a view
    else:
        delta = delta.reshape(b, -1, delta.shape[-1]).transpose(1, 2)  # B×C×T, a view
    c_out, t = delta.shape[1:]
    if "bias" in cap.params:
        gb = delta.sum(2)  # B×C
        ub = updates[cap.params["bias"]]
        dots += gb @ ub.reshape(ub.shape[0], -1).T
        sqnorm += (gb * gb).sum(1)
    if "weight" not in cap.params:
        return
    uw = updates[cap.params["weight"]]
    k = uw.shape[0]
    uw = uw.reshape(k, c_out, -1)  # K×C×D: a view, also of rows of a K×P uploads matrix
    d = uw.shape[2]
    if method == "auto":
        costs = conv_costs(c_out, d, t, k)
        method = min(costs, key=costs.__getitem__)
    step = max(1, max_floats // max(1, buffer_floats(method, c_out, d, t, k)))
    if method == "materialise":
        _materialise(module, a, delta, uw, dots, sqnorm, step, max_floats)
        return
    for s in range(0, b, step):
        dl = delta[s : s + step]  # b_s×C×T
        bs = dl.shape[0]
        u = _unfold(module, a[s : s + step], "dn")  # D×(b_s·T)
        if t == 1:
            sqnorm[s : s + step] += (u * u).sum(0) * (dl * dl).sum((1, 2))
        else:
            ub = u.view(d, bs, t).permute(1, 2, 0)  # b_s×T×D, a view
            gram_u = torch.bmm(ub, ub.transpose(1, 2))  # b_s×T×T
            gram_d = torch.bmm(dl.transpose(1, 2), dl)
            sqnorm[s : s + step] += (gram_u * gram_d).sum((1, 2))
        # Δ_k U_i for all k and i: the input convolved with the K update kernels, one GEMM
        # per update (uw[j] is a C×D view: no K×C×D copy of the updates)
        conv = torch.empty(k, c_out, bs * t, dtype=u.dtype, device=u.device)
        for j in range(k):
            torch.mm(uw[j], u, out=conv[j])
        dots[s : s + step] += torch.einsum("kcbt,bct->bk", conv.view(k, c_out, bs, t), dl)


def _materialise(
    module: nn.Module,
    a: torch.Tensor,
    delta: torch.Tensor,
    uw: torch.Tensor,
    dots: torch.Tensor,
    sqnorm: torch.Tensor,
    step: int,
    max_floats: int,
) -> None:
    """The ``materialise`` weight method: per-sample ``G_i`` in blocks of output channels.

    For each sub-batch of ``step`` samples and block of output channels, the block of
    ``G_i = δ_i U_iᵀ`` (b_s×C_b×D, one ``bmm`` into a buffer reused across blocks, small
    enough to stay in cache) is contracted at once with the K updates' matching rows
    (one GEMM: ``dots``) and with itself (``sqnorm``); where T is small, ``‖G_i‖²`` comes
    from the T×T Gram matrices instead (fewer multiply-adds than reading ``G_i`` again).

    Args:
        module: the Linear/Conv2d layer.
        a: its input, B×….
        delta: its output gradient, B×C×T.
        uw: the K updates of its weight, K×C×D (a view is fine: no copy is made).
        dots: B×K, accumulated in place.
        sqnorm: B, accumulated in place.
        step: samples per sub-batch.
        max_floats: bound on the block buffer's floats.
    """
    b, c_out, t = delta.shape
    k, _, d = uw.shape
    use_gram = t * (d + c_out) < c_out * d  # the Gram matrices cost less than forming G_i
    for s in range(0, b, step):
        dl = delta[s : s + step]  # b_s×C×T
        bs = dl.shape[0]
        u = _unfold(module, a[s : s + step], "bdt").transpose(1, 2)  # b_s×T×D
        if use_gram:
            gram_u = torch.bmm(u, u.transpose(1, 2))  # b_s×T×T
            gram_d = torch.bmm(dl.transpose(1, 2), dl)
            sqnorm[s : s + step] += (gram_u * gram_d).sum((1, 2))
        cb = max(1, min(c_out, min(max_floats, G_BLOCK_FLOATS) // (bs * d)))
        buf = torch.empty(bs * cb * d, dtype=dl.dtype, device=dl.device)
        out = dots[s : s + step]
        for c0 in range(0, c_out, cb):
            cc = min(cb, c_out - c0)
            g = torch.bmm(dl[:, c0 : c0 + cc], u, out=buf[: bs * cc * d].view(bs, cc, d))
            g = g.view(bs, cc * d)  # per-sample G_i, rows c0..c0+cc
            out.addmm_(g, uw[:, c0 : c0 + cc].reshape(k, cc * d).T)
            if not use_gram:
                sqnorm[s : s + step] += torch.linalg.vecdot(g, g)


def _normalised(cap: _Capture, a: torch.Tensor) -> torch.Tensor:
    """x̂, the norm layer's input ``a`` (B×C×…) normalised as the layer did it: B×C×L.

    BatchNorm (eval): per channel, with the running statistics recorded in the
    forward pass. GroupNorm: per sample and group of C/G channels, with that
    group's own mean and biased variance over its channels and positions.
    """
    b, c = a.shape[:2]
    module = cap.module
    if isinstance(module, nn.GroupNorm):
        groups = a.reshape(b, module.num_groups, -1)  # B×G×(C/G·L): channels are contiguous
        var, mean = torch.var_mean(groups, dim=2, correction=0, keepdim=True)
        return ((groups - mean) * torch.rsqrt(var + module.eps)).reshape(b, c, -1)
    mean, var, eps = cap.stats
    return (a.reshape(b, c, -1) - mean[:, None]) * torch.rsqrt(var[:, None] + eps)


def _norm_terms(
    cap: _Capture,
    a: torch.Tensor,
    delta: torch.Tensor,
    updates: dict[str, torch.Tensor],
    dots: torch.Tensor,
    sqnorm: torch.Tensor,
) -> None:
    """Add a norm layer's γ and β terms (eval BatchNorm, GroupNorm) to ``dots`` and ``sqnorm``."""
    b, c = delta.shape[:2]
    delta = delta.reshape(b, c, -1)
    for attr, full in cap.params.items():
        if attr == "bias":
            g = delta.sum(2)  # dβ_i, B×C
        else:
            g = (delta * _normalised(cap, a)).sum(2)  # dγ_i, B×C
        upd = updates[full]
        dots += g @ upd.reshape(upd.shape[0], -1).T
        sqnorm += (g * g).sum(1)


def layerwise_products(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    updates: dict[str, torch.Tensor],
    *,
    conv_method: ConvMethod = "auto",
    max_buffer_floats: int = MAX_BUFFER_FLOATS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """⟨g_i, Δ_k⟩ and ‖g_i‖² of one chunk from one batched forward/backward pass.

    Args:
        model: the network; run in eval mode (its mode is restored afterwards).
        params: the global model's parameters by name (the gradient is over these).
        buffers: its buffers (BatchNorm statistics; GroupNorm has none) by name.
        x: float B×C×H×W.
        y: int64 B, labels.
        updates: per parameter name, the K stacked updates, K×(parameter shape).
        conv_method: ``auto`` (cheapest per layer), or force ``materialise`` / ``ghost``
            for every Linear/Conv2d layer (for tests and benchmarks).
        max_buffer_floats: bound on one layer's work buffers; larger layers are
            processed in sub-batches of samples.

    Returns:
        ``(dots, sqnorm)``: B×K and B, in ``x``'s dtype.

    Raises:
        NotImplementedError: a module owning parameters is not a Linear, a
            ``groups=1`` zero-padded Conv2d, a BatchNorm with running statistics
            or a GroupNorm, or a parameterised module runs more than once per
            forward pass.
    """
    if conv_method not in CONV_METHODS:
        raise ValueError(f"unknown conv_method '{conv_method}'; choose from {list(CONV_METHODS)}")
    caps: list[_Capture] = []
    for mod_name, module in model.named_modules():
        own = {
            attr: f"{mod_name}.{attr}" if mod_name else attr
            for attr, _ in module.named_parameters(recurse=False)
        }
        own = {attr: full for attr, full in own.items() if full in params}
        if own:
            _check_module(module, mod_name or type(model).__name__)
            caps.append(_Capture(mod_name, module, own))
    try:
        return _run(
            model,
            params,
            buffers,
            x,
            y,
            updates,
            caps,
            conv_method,
            max_buffer_floats,
            clone_inputs=False,
        )
    except _InputModified as err:
        log.debug("%s; recomputing with copied layer inputs", err)
        for cap in caps:
            cap.calls, cap.a, cap.stats, cap.blind = 0, None, None, False
        return _run(
            model,
            params,
            buffers,
            x,
            y,
            updates,
            caps,
            conv_method,
            max_buffer_floats,
            clone_inputs=True,
        )


def _run(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    updates: dict[str, torch.Tensor],
    caps: list[_Capture],
    conv_method: str,
    max_floats: int,
    *,
    clone_inputs: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    b = x.shape[0]
    k = next(iter(updates.values())).shape[0]
    dots = torch.zeros(b, k, dtype=x.dtype, device=x.device)
    sqnorm = torch.zeros(b, dtype=x.dtype, device=x.device)

    def on_grad(cap: _Capture, delta: torch.Tensor) -> None:
        a = cap.a
        if a._version != cap.a_version:
            raise _InputModified(f"the input of '{cap.name}' was modified in place")
        with torch.no_grad():
            if isinstance(cap.module, _NORMS):
                _norm_terms(cap, a, delta, updates, dots, sqnorm)
            else:
                _weight_terms(cap, a, delta, updates, dots, sqnorm, conv_method, max_floats)
        cap.a, cap.stats = None, None

    def forward_hook(cap: _Capture):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            cap.calls += 1
            if cap.calls > 1:
                raise NotImplementedError(
                    f"module '{cap.name}' ({type(module).__name__}) runs more than once per "
                    "forward pass (shared weights); use "
                    "fedmia.attacker.measures.per_sample_grad_products"
                )
            a = inputs[0]
            cap.a = a.detach().clone() if clone_inputs else a.detach()
            cap.a_version = cap.a._version
            if isinstance(module, _BatchNorm):
                cap.stats = (module.running_mean.detach(), module.running_var.detach(), module.eps)
            # registered before any in-place op on the output (e.g. ReLU(inplace=True)):
            # receives the gradient w.r.t. the layer's own output
            if output.requires_grad:
                output.register_hook(lambda g: on_grad(cap, g))
            else:  # not downstream of the input: its gradient cannot be captured
                cap.blind = True

        return hook

    training = {m: m.training for m in model.modules()}
    handles = []
    try:
        model.eval()
        for cap in caps:
            handles.append(cap.module.register_forward_hook(forward_hook(cap)))
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            out = functional_call(model, (params, buffers), (xr,))
            loss = F.cross_entropy(out, y, reduction="sum")  # δ_i is sample i's own gradient
            torch.autograd.grad(loss, xr)
    finally:
        for h in handles:
            h.remove()
        for m, was in training.items():
            m.train(was)
        for cap in caps:
            cap.a = cap.stats = None
    # layers never run, or whose output does not reach the loss, have zero gradients
    blind = [cap.name for cap in caps if cap.blind]
    if blind:
        raise NotImplementedError(
            f"layer(s) {blind} run on tensors that do not depend on the input, so their "
            "output gradients cannot be captured; use "
            "fedmia.attacker.measures.per_sample_grad_products"
        )
    return dots, sqnorm


def layerwise_grad_products(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    updates: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """⟨g_i, Δ_k⟩ and ‖g_i‖² for one chunk, layer by layer (drop-in ``grad_products``).

    Same contract as :func:`fedmia.attacker.measures.per_sample_grad_products`; see
    :func:`layerwise_products` for the method and its options.

    Args:
        model: the network (evaluated in eval mode).
        params: the global model's parameters by name.
        buffers: its buffers (BatchNorm statistics) by name.
        x: float B×C×H×W.
        y: int64 B, labels.
        updates: per parameter name, the K stacked updates, K×(parameter shape).

    Returns:
        ``(dots, sqnorm)``: B×K and B, in ``x``'s dtype.
    """
    return layerwise_products(model, params, buffers, x, y, updates)
