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
``G_i = δ_i U_iᵀ`` (C×D). Four methods, chosen per layer by an estimate of
their cost per sample (weighted multiply-adds plus memory traffic, :func:`conv_costs`);
on a padded convolution ``U_i`` holds the padding's zeros, which the last two skip
(the (position, tap) pairs that meet the input, :func:`_shift_pairs`):

* ``materialise``: form ``G_i`` in blocks of output channels (``bmm``, C·D·T), each
  block contracted at once with the K updates' matching rows (one GEMM, K·C·D) while
  it is still in cache; ``‖G_i‖²`` from the T×T Gram matrices (below) where they cost
  less than forming ``G_i``, else from the block itself. Its GEMMs have a short
  dimension (T, or K outputs) and run ~4× slower per multiply-add than a large GEMM:
  chosen where T is large (AlexNet's first layer; ResNet18's 32×32 and 16×16 layers).
* ``ghost``: ``‖G_i‖² = Σ_{t,t'} (U_iᵀU_i)_{tt'} (δ_iᵀδ_i)_{tt'}`` from the two
  T×T Gram matrices (T²·(D + C); Goodfellow 2015, Li et al. 2021), and
  ``⟨G_i, Δ_k⟩ = Σ_t δ_i · (Δ_k U_i)`` — the layer input convolved with each of the K
  update kernels, one GEMM per update over the whole sub-batch (K·C·D·T, i.e. K
  forward passes of the layer). Chosen for 2-D Linear layers (T = 1), where it is
  ``δ_iᵀ Δ_k a_i`` and ``‖δ_i‖²‖a_i‖²``.
* ``shift`` (:func:`_shift_terms`): ``ghost``'s products with only the taps that meet
  the input — per output position and kernel row one GEMM of the input columns read
  there with those taps' (K·C)×C_in slices of the updates (K·C·C_in per pair: on
  AlexNet's 2×2 maps 16 of ghost's 36), and the input's T×T Gram matrix from its own
  (:func:`_gram_map`) instead of an unfold. Chosen where T is small and C_in large
  (AlexNet's 2×2 layers).
* ``taps`` (:func:`_taps_terms`): ``materialise`` kernel tap by kernel tap — each tap's
  share ``G_i[:, :, τ]`` (C×C_in) from the positions where the tap meets the input (one
  ``bmm``, C·C_in per pair), contracted with the updates' slice for that tap. Chosen on
  small padded maps (AlexNet's 4×4 layer; ResNet18's 8×8 and 4×4 layers).

``shift`` and ``taps`` read the updates tap by tap; that reordered copy is made once per
round (:class:`_TapMajor`). The backward pass stops at the layers that read the model's
input (a zero seed added to their output): the gradient w.r.t. the input is never formed.

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

import functools
import logging
import weakref
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

log = logging.getLogger(__name__)

ConvMethod = Literal["auto", "materialise", "ghost", "shift", "taps"]
CONV_METHODS: tuple[str, ...] = ("auto", "materialise", "ghost", "shift", "taps")
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
#: Input channels below which ``shift``'s GEMMs (inner dimension C_in) count as small ones
#: (:data:`SMALL_GEMM_WEIGHT`): measured on a 2-core CPU, K = 10, one thread, AlexNet's
#: conv2 (C_in 64, 4×4 maps) ran ~20 % slower by ``shift`` than by ``materialise`` (its
#: first layer has C_in 3); its 2×2 layers (C_in ≥ 192) run ~2× faster than ``ghost``.
SHIFT_MIN_CIN = 128
#: Largest (H·W·T)² for which ``shift`` takes the unfolded input's T×T Gram matrix from the
#: input's own (:func:`_gram_map`, a float map of that many entries) instead of unfolding
#: the input (2×2 maps: 256; 4×4: 65,536).
GRAM_MAP_MAX = 1 << 16
_SUPPORTED = (nn.Linear, nn.Conv2d, _BatchNorm, nn.GroupNorm)
_NORMS = (_BatchNorm, nn.GroupNorm)


@dataclass(frozen=True)
class ShiftShape:
    """What the ``shift`` method's cost depends on, for a Conv2d layer.

    Attributes:
        cin: input channels C_in (the inner dimension of its GEMMs).
        pairs: (output position, kernel tap) pairs that meet the input, not the padding
            (:func:`_shift_pairs`; T·kh·kw without padding).
        input_floats: C_in·H·W, the layer input per sample.
    """

    cin: int
    pairs: int
    input_floats: int


def conv_costs(
    c_out: int, d: int, t: int, k: int, shift: ShiftShape | None = None
) -> dict[str, float]:
    """Estimated cost per sample of the weight methods of a Linear/Conv2d layer.

    Multiply-adds plus :data:`MEMORY_WEIGHT` times the floats written to and read
    back from memory (the unfolded input; for ``ghost`` and ``shift`` also the Gram
    matrices and the K convolved outputs, for ``shift`` the reordered input and output
    gradient; ``materialise`` keeps its ``G_i`` blocks in cache). The ``materialise``
    GEMMs (inner dimension T for ``G_i``, K outputs for the dots) run
    :data:`SMALL_GEMM_WEIGHT` times slower per multiply-add than ``ghost``'s one large GEMM;
    so do ``shift``'s where C_in < :data:`SHIFT_MIN_CIN`.

    Args:
        c_out: output channels (features) C.
        d: unfolded input size D = C_in·kh·kw (``in_features`` for Linear).
        t: output positions T (1 for a 2-D Linear input).
        k: number of updates K.
        shift: a Conv2d layer's :class:`ShiftShape`; ``None`` (Linear): no ``shift`` or
            ``taps`` entry (``taps``: its C·C_in per pair, K·C·D and the norms, weighted
            like ``materialise``, plus what its gathers copy).

    Returns:
        ``{"materialise": ..., "ghost": ...}``, and ``"shift"``, ``"taps"`` where ``shift``
        is given.
    """
    unfold = d * t if t > 1 else 0
    gram = t * t * (d + c_out + 1) if t > 1 else d + c_out
    mat_macs = c_out * d * t + k * c_out * d + min(gram, c_out * d)
    ghost_macs = gram + k * c_out * d * t
    ghost_floats = unfold + 2 * t * t + 2 * k * c_out * t
    costs = {
        "materialise": SMALL_GEMM_WEIGHT * mat_macs + MEMORY_WEIGHT * unfold,
        "ghost": ghost_macs + MEMORY_WEIGHT * ghost_floats,
    }
    if shift is not None:
        weight = SMALL_GEMM_WEIGHT if shift.cin < SHIFT_MIN_CIN else 1
        shift_floats = ghost_floats + shift.input_floats + c_out * t
        costs["shift"] = (
            gram + weight * k * c_out * shift.cin * shift.pairs + MEMORY_WEIGHT * shift_floats
        )
        taps_macs = c_out * shift.cin * shift.pairs + k * c_out * d + c_out * d
        taps_floats = shift.input_floats + shift.pairs * (shift.cin + c_out)
        costs["taps"] = SMALL_GEMM_WEIGHT * taps_macs + MEMORY_WEIGHT * taps_floats
    return costs


def buffer_floats(
    method: str, c_out: int, d: int, t: int, k: int, input_floats: int = 0, cin: int = 0
) -> int:
    """Floats per sample of a weight method's work buffers (unfolded input included).

    ``materialise``'s block of ``G_i`` is bounded on its own (:data:`G_BLOCK_FLOATS`);
    its 2·T² counts the Gram matrices even where ‖G_i‖² is read from the blocks instead,
    which keeps the sub-batches of large-T layers small: ResNet18's 32×32 layers ran in
    0.32 s of CPU time so (8 samples per sub-batch) against 0.47 s with all 64 at once.
    ``shift`` also holds its reordered input (``input_floats`` = C_in·H·W) and output
    gradient, and one output row's K·C outputs (counted as all T of them); ``taps`` its
    reordered input, one tap's share of G_i (C·C_in, ``cin`` = C_in) and what it gathers.
    """
    unfold = d * t if t > 1 else 0
    if method == "materialise":
        return unfold + 2 * t * t + d  # the block holds at least one channel per sample
    if method == "shift":
        return unfold + 2 * t * t + k * c_out * t + input_floats + c_out * t
    if method == "taps":  # the reordered input, one tap's G_i share, its gathered δ and x
        return input_floats + c_out * cin + t * (cin + c_out)
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


class _Unreached(Exception):
    """A layer's output gradient lies on no path from the loss to the seeds (see ``_run``)."""


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


def _pads(module: nn.Conv2d) -> list[int]:
    """The conv's zero padding in ``F.pad`` order: (left, right, top, bottom).

    ``padding="same"`` may be asymmetric (the extra row/column goes right/bottom, as
    PyTorch pads it).
    """
    (kh, kw), (dh, dw) = module.kernel_size, module.dilation
    if module.padding == "same":
        pads: list[int] = []
        for dil, ks in ((dw, kw), (dh, kh)):
            total = dil * (ks - 1)
            pads += [total // 2, total - total // 2]
        return pads
    if module.padding == "valid":
        return [0, 0, 0, 0]
    ph, pw = module.padding
    return [pw, pw, ph, ph]


def _tap_ranges(n_in: int, n_out: int, k: int, stride: int, dil: int, pad: int) -> list:
    """Along one axis, per kernel tap j, the output positions whose tap j meets the input.

    Output position o reads input ``o·stride − pad + j·dil``; the positions where that lies
    in ``[0, n_in)`` form one range. Returns ``[(j, o0, o1, i0)]`` for the taps that meet the
    input at all: outputs ``o0 ≤ o < o1``, the first of them reading input ``i0``.
    """
    out = []
    for j in range(k):
        off = j * dil - pad  # input index of output 0
        o0 = max(0, -(off // stride)) if off < 0 else 0
        o1 = min(n_out, (n_in - 1 - off) // stride + 1) if off < n_in else 0
        if o0 < o1:
            out.append((j, o0, o1, o0 * stride + off))
    return out


def _tap_geometry(
    module: nn.Conv2d, in_hw: tuple[int, int], out_hw: tuple[int, int]
) -> tuple[tuple, tuple]:
    """A Conv2d layer's :func:`_tap_ranges` along the height and the width, as tuples."""
    (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
    left, _, top, _ = _pads(module)
    rows = tuple(_tap_ranges(in_hw[0], out_hw[0], kh, sh, dh, top))
    cols = tuple(_tap_ranges(in_hw[1], out_hw[1], kw, sw, dw, left))
    return rows, cols


def _shift_pairs(module: nn.Conv2d, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> int:
    """How many (output position, kernel tap) pairs meet the input rather than the padding."""
    rows, cols = _tap_geometry(module, in_hw, out_hw)
    return sum(o1 - o0 for _, o0, o1, _ in rows) * sum(o1 - o0 for _, o0, o1, _ in cols)


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
    pads = _pads(module)
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
    out_hw = tuple(delta.shape[2:])
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
    upd = updates[cap.params["weight"]]
    k = upd.shape[0]
    uw = upd.reshape(k, c_out, -1)  # K×C×D: a view, also of rows of a K×P uploads matrix
    d = uw.shape[2]
    is_conv = isinstance(module, nn.Conv2d)
    shape = None
    if is_conv:
        in_floats = a[0].numel()
        shape = ShiftShape(a.shape[1], _shift_pairs(module, a.shape[2:], out_hw), in_floats)
    if method == "auto":
        costs = conv_costs(c_out, d, t, k, shape)
        method = min(costs, key=costs.__getitem__)
    elif method in ("shift", "taps") and not is_conv:
        method = "ghost"  # a Linear layer has no taps: shift and taps are ghost there
    in_floats, cin = (shape.input_floats, shape.cin) if shape is not None else (0, 0)
    step = max(1, max_floats // max(1, buffer_floats(method, c_out, d, t, k, in_floats, cin)))
    if method == "materialise":
        _materialise(module, a, delta, uw, dots, sqnorm, step, max_floats)
        return
    if method == "taps":
        utaps = _TAP_MAJOR.get(upd, "taps")
        for s in range(0, b, step):
            part = slice(s, s + step)
            _taps_terms(module, a[part], delta[part], utaps, out_hw, dots[part], sqnorm[part])
        return
    taps = _TAP_MAJOR.get(upd, "shift") if method == "shift" else None
    for s in range(0, b, step):
        dl = delta[s : s + step]  # b_s×C×T
        bs = dl.shape[0]
        if taps is not None:
            part = slice(s, s + step)
            _shift_terms(module, a[part], dl, taps, out_hw, dots[part], sqnorm[part])
            continue
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


def _taps_inner(upd: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``upd`` (K×C×C_in×kh×kw) into ``out`` as (K·C)×(kh·kw)×C_in (``shift``'s layout).

    Each (k, c) row's C_in×(kh·kw) block transposed: a local copy.
    """
    k, c_out, cin, kh, kw = upd.shape
    taps = out.view(k * c_out, kh * kw, cin)
    taps.view(k, c_out, kh * kw, cin).copy_(upd.reshape(k, c_out, cin, -1).transpose(2, 3))
    return taps


def _taps_outer(upd: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``upd`` (K×C×C_in×kh×kw) into ``out`` as (kh·kw)×K×(C·C_in) (``taps``'s layout).

    Per update, a (C·C_in)×(kh·kw) transpose in blocks of rows that stay in cache (a
    whole strided transpose ran ~4× slower).
    """
    k, c_out, cin, kh, kw = upd.shape
    taps = out.view(kh * kw, k, c_out * cin)
    rows = 1 << 12
    for j in range(k):
        src = upd[j].reshape(c_out * cin, kh * kw)
        for r0 in range(0, c_out * cin, rows):
            taps[:, j, r0 : r0 + rows].copy_(src[r0 : r0 + rows].T)
    return taps


class _TapMajor:
    """Each Conv2d layer's K updates with their kernel taps apart, once per round.

    ``Δ[:, :, :, r, s]`` of a K×C×C_in×kh×kw update is a (K·C)×C_in matrix whose C_in
    entries are kh·kw floats apart, which no GEMM reads as it is. ``shift`` needs every
    tap's slice as a (K·C)×C_in matrix with unit stride (:func:`_taps_inner`), ``taps`` as a
    K×(C·C_in) one (:func:`_taps_outer`); each copy costs about a copy of the layer's
    updates. It is made once and reused by every chunk of the round: entries are keyed by
    the update tensor (the same object, unmodified: its version counter is checked) and the
    layout, and dropped when that tensor is freed; their memory is kept for the next
    round's layer of the same size (one spare per size), which spares the page faults of a
    fresh allocation each round.
    """

    LAYOUTS = {"shift": _taps_inner, "taps": _taps_outer}

    def __init__(self) -> None:
        self._entries: dict[tuple[int, str], tuple[weakref.ref, int, torch.Tensor]] = {}
        self._spare: dict[tuple, torch.Tensor] = {}

    def get(self, upd: torch.Tensor, layout: str) -> torch.Tensor:
        """``upd`` (K×C×C_in×kh×kw) in ``layout`` (a key of :attr:`LAYOUTS`), contiguous."""
        key = (id(upd), layout)
        hit = self._entries.get(key)
        if hit is not None and hit[0]() is upd and hit[1] == upd._version:
            return hit[2]
        size = (upd.numel(), upd.dtype, upd.device)
        buf = self._spare.pop(size, None)
        if buf is None:
            buf = torch.empty(upd.numel(), dtype=upd.dtype, device=upd.device)
        taps = self.LAYOUTS[layout](upd, buf)

        def drop(_: weakref.ref, key: tuple = key, size: tuple = size) -> None:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._spare[size] = entry[2].view(-1)

        self._entries[key] = (weakref.ref(upd, drop), upd._version, taps)
        return taps


_TAP_MAJOR = _TapMajor()


@functools.lru_cache(maxsize=64)
def _gram_map(
    in_hw: tuple[int, int],
    out_hw: tuple[int, int],
    stride: tuple[int, int],
    rows: tuple,
    cols: tuple,
) -> torch.Tensor:
    """The fixed map from a sample's input Gram matrix to its unfolded input's.

    ``(U_iᵀU_i)_{tt'} = Σ_{(r,s)} ⟨x_i[:, π_rs(t)], x_i[:, π_rs(t')]⟩`` over the taps (r, s)
    that meet the input at both outputs t and t' (π_rs(t): the input position tap (r, s)
    reads for output t), so with ``X_i = x_iᵀx_i`` (H·W × H·W, summed over channels),
    ``vec(U_iᵀU_i) = vec(X_i) · M``: C_in·(H·W)² multiply-adds per sample instead of
    unfolding the input.

    Args:
        in_hw: the input's (H, W).
        out_hw: the output's (Ho, Wo).
        stride: the conv's (sh, sw).
        rows: :func:`_tap_ranges` along the height, as a tuple.
        cols: the same along the width.

    Returns:
        float64 (H·W)²×T² (entries count taps), on the CPU.
    """
    (h, w), (ho, wo) = in_hw, out_hw
    hw, t = h * w, ho * wo
    m = torch.zeros(hw * hw, t * t, dtype=torch.float64)
    for _, p0, p1, i0 in rows:
        for _, q0, q1, j0 in cols:
            ps, qs = torch.meshgrid(torch.arange(p1 - p0), torch.arange(q1 - q0), indexing="ij")
            outs = ((p0 + ps) * wo + q0 + qs).reshape(-1)  # the outputs this tap reaches
            ins = ((i0 + ps * stride[0]) * w + j0 + qs * stride[1]).reshape(-1)  # what it reads
            rows_m = (ins[:, None] * hw + ins[None, :]).reshape(-1)
            cols_m = (outs[:, None] * t + outs[None, :]).reshape(-1)
            m.index_put_((rows_m, cols_m), torch.ones(len(rows_m), dtype=m.dtype), accumulate=True)
    return m


def _mapped_sqnorm(
    a: torch.Tensor,
    delta: torch.Tensor,
    out_hw: tuple[int, int],
    stride: tuple[int, int],
    rows: tuple,
    cols: tuple,
    sqnorm: torch.Tensor,
) -> bool:
    """``sqnorm += ‖G_i‖²`` of a Conv2d layer from T×T Gram matrices, where the map is small.

    The input's T×T Gram matrix is taken from its own H·W×H·W one (:func:`_gram_map`)
    where that map has at most :data:`GRAM_MAP_MAX` entries; returns whether it did.

    Args:
        a: the layer input, b×C_in×H×W.
        delta: its output gradient, b×C×T.
        out_hw: (Ho, Wo).
        stride: the conv's (sh, sw).
        rows: :func:`_tap_ranges` along the height, as a tuple.
        cols: the same along the width.
        sqnorm: b, accumulated in place.
    """
    b, cin, h, w = a.shape
    t = delta.shape[2]
    if (h * w * t) ** 2 > GRAM_MAP_MAX:
        return False
    xf = a.reshape(b, cin, h * w)
    gram_x = torch.bmm(xf.transpose(1, 2), xf).reshape(b, -1)  # b×(H·W)²
    m = _gram_map((h, w), out_hw, stride, rows, cols).to(a.dtype).to(a.device)
    gram_u = (gram_x @ m).view(b, t, t)
    sqnorm += (gram_u * torch.bmm(delta.transpose(1, 2), delta)).sum((1, 2))
    return True


def _shift_terms(
    module: nn.Conv2d,
    a: torch.Tensor,
    delta: torch.Tensor,
    taps: torch.Tensor,
    out_hw: tuple[int, int],
    dots: torch.Tensor,
    sqnorm: torch.Tensor,
) -> None:
    """The ``shift`` weight method of a Conv2d layer: its padding's zeros never multiplied.

    ``⟨G_i, Δ_k⟩ = Σ_t δ_{i,t} · (Δ_k ∗ x_i)_t``: per output position t and kernel row r,
    one GEMM of the input columns that row's taps read there (only those inside the
    input) with those taps' slice of the K updates, accumulated into the position's K·C
    outputs (b×K·C, in cache) and contracted with ``δ_{·,t}``. Multiply-adds K·C·C_in per
    (position, tap) pair that meets the input: on AlexNet's 2×2 maps with 3×3 kernels, 16
    of ``ghost``'s 36. ``‖G_i‖²`` from the T×T Gram matrices, the input's taken from its own
    H·W×H·W Gram matrix (:func:`_gram_map`) where that map is small
    (:data:`GRAM_MAP_MAX`), else from the unfolded input.

    Args:
        module: the Conv2d layer.
        a: its input, b×C_in×H×W.
        delta: its output gradient, b×C×T (T = Ho·Wo, row-major).
        taps: the K updates of its weight, (K·C)×(kh·kw)×C_in (:class:`_TapMajor`).
        out_hw: (Ho, Wo).
        dots: b×K, accumulated in place.
        sqnorm: b, accumulated in place.
    """
    b, cin, h, w = a.shape
    c_out, t = delta.shape[1:]
    ho, wo = out_hw
    kc = taps.shape[0]
    k = kc // c_out
    (_, kw), (sh, sw), dw = module.kernel_size, module.stride, module.dilation[1]
    rows, cols = _tap_geometry(module, (h, w), out_hw)
    if not _mapped_sqnorm(a, delta, out_hw, (sh, sw), rows, cols, sqnorm):
        u = _unfold(module, a, "bdt")  # b×D×T
        gram_u = torch.bmm(u.transpose(1, 2), u)
        sqnorm += (gram_u * torch.bmm(delta.transpose(1, 2), delta)).sum((1, 2))
    x = a.permute(2, 0, 3, 1).contiguous()  # H×b×W×C_in: a kernel row's inputs, side by side
    dl = delta.permute(2, 0, 1).contiguous()  # T×b×C
    flat = taps.view(kc, -1)  # (K·C)×(kh·kw·C_in): taps (r, s0..s1) are adjacent columns
    out = torch.empty(b, kc, dtype=a.dtype, device=a.device)
    for p in range(ho):
        kernel_rows = [(r, i0 + (p - p0) * sh) for r, p0, p1, i0 in rows if p0 <= p < p1]
        for q in range(wo):
            col_taps = [(s, j0 + (q - q0) * sw) for s, q0, q1, j0 in cols if q0 <= q < q1]
            if not kernel_rows or not col_taps:
                continue  # every tap of this output reads padding: G_i has no share of it
            s0, s1, j, ns = col_taps[0][0], col_taps[-1][0] + 1, col_taps[0][1], len(col_taps)
            for n, (r, i) in enumerate(kernel_rows):
                xs = x[i, :, j : j + (ns - 1) * dw + 1 : dw].reshape(b, ns * cin)
                wt = flat[:, (r * kw + s0) * cin : (r * kw + s1) * cin].T
                if n == 0:
                    torch.mm(xs, wt, out=out)
                else:
                    out.addmm_(xs, wt)
            tt = p * wo + q
            dots += torch.bmm(out.view(b, k, c_out), dl[tt].view(b, c_out, 1)).view(b, k)


def _taps_terms(
    module: nn.Conv2d,
    a: torch.Tensor,
    delta: torch.Tensor,
    utaps: torch.Tensor,
    out_hw: tuple[int, int],
    dots: torch.Tensor,
    sqnorm: torch.Tensor,
) -> None:
    """The ``taps`` weight method of a Conv2d layer: per-sample gradients tap by tap.

    For each kernel tap τ = (r, s), the per-sample gradient's share
    ``G_i[:, :, τ] = Σ_t δ_{i,t} x_i[:, π_τ(t)]ᵀ`` (C×C_in) over the outputs t where the tap
    meets the input (one ``bmm`` over the sub-batch: the padding's zeros never
    multiplied), contracted at once with the K updates' slice for that tap (one GEMM)
    and with itself (``‖G_i‖² = Σ_τ ‖G_i[:, :, τ]‖²``; from the Gram matrices where
    :func:`_mapped_sqnorm` applies). Multiply-adds C·C_in per (position,
    tap) pair plus K·C·D, like ``materialise`` but with no unfolded input and an inner
    dimension of C_in for the dots.

    Args:
        module: the Conv2d layer.
        a: its input, b×C_in×H×W.
        delta: its output gradient, b×C×T (T = Ho·Wo, row-major).
        utaps: the K updates of its weight, (kh·kw)×K×(C·C_in) (:class:`_TapMajor`).
        out_hw: (Ho, Wo).
        dots: b×K, accumulated in place.
        sqnorm: b, accumulated in place.
    """
    b, cin, h, w = a.shape
    c_out = delta.shape[1]
    ho, wo = out_hw
    (_, kw), (sh, sw) = module.kernel_size, module.stride
    rows, cols = _tap_geometry(module, (h, w), out_hw)
    per_tap_norm = not _mapped_sqnorm(a, delta, out_hw, (sh, sw), rows, cols, sqnorm)
    # channels last: a tap's positions gather whole rows of C_in (C) floats
    x = a.permute(0, 2, 3, 1).contiguous()  # b×H×W×C_in
    dl = delta.reshape(b, c_out, ho, wo).permute(0, 2, 3, 1).contiguous()  # b×Ho×Wo×C
    g = torch.empty(b, c_out, cin, dtype=a.dtype, device=a.device)
    gf = g.view(b, -1)
    for r, p0, p1, i0 in rows:
        for s, q0, q1, j0 in cols:
            xs = x[:, i0 : i0 + (p1 - p0 - 1) * sh + 1 : sh, j0 : j0 + (q1 - q0 - 1) * sw + 1 : sw]
            ds = dl[:, p0:p1, q0:q1].reshape(b, -1, c_out)  # b×n×C
            torch.bmm(ds.transpose(1, 2), xs.reshape(b, -1, cin), out=g)
            dots.addmm_(gf, utaps[r * kw + s].T)
            if per_tap_norm:  # ‖G_i‖² = Σ_τ ‖G_i[:, :, τ]‖²
                sqnorm += torch.linalg.vecdot(gf, gf)


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
            seeds=True,
        )
    except (_InputModified, _Unreached) as err:
        log.debug("%s; recomputing with copied layer inputs, back to the input", err)
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
            seeds=False,
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
    seeds: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward and backward pass with the capture hooks (see :func:`layerwise_products`).

    With ``seeds``, a layer that reads the model's input itself gets a zero scalar leaf
    added to its output, and the backward pass runs to those leaves only: the gradient
    w.r.t. the input (AlexNet's first layer: a strided transposed convolution, ~25 % of
    the pass) is never computed. Raises :class:`_Unreached` where a layer's output
    gradient was then not reached (a layer reading the input through other operations);
    the caller runs again without seeds, back to the input.
    """
    b = x.shape[0]
    k = next(iter(updates.values())).shape[0]
    dots = torch.zeros(b, k, dtype=x.dtype, device=x.device)
    sqnorm = torch.zeros(b, dtype=x.dtype, device=x.device)
    leaves: list[torch.Tensor] = []
    pending: set[str] = set()  # layers whose output gradient is still to come

    def on_grad(cap: _Capture, delta: torch.Tensor) -> None:
        pending.discard(cap.name)
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
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
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
            if not output.requires_grad:  # not downstream of the input: cannot be captured
                cap.blind = True
                return None
            if seeds and a is xr:
                leaf = torch.zeros((), dtype=output.dtype, device=output.device)
                leaves.append(leaf.requires_grad_(True))
                output = output + leaf  # replaces the layer's output
            output.register_hook(lambda g: on_grad(cap, g))
            pending.add(cap.name)
            return output

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
            torch.autograd.grad(loss, leaves or xr, allow_unused=True)
        if leaves and pending:
            raise _Unreached(f"no output gradient reached layer(s) {sorted(pending)}")
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
