"""Defenses: transforms of what a client trains on or uploads.

A defense hooks into three points of a client's round (see :class:`Defense`):
which local samples it trains on, what its training inputs look like (inputs and
soft targets), and what update it uploads. The server, and so the attacker, sees
only the uploaded update. Defenses are registered by name; the ``defenses``
block of the config names a kind and its strength, e.g.
``{kind: dp, sigma: 0.1, clip: 1.0}``.

Kinds (details and parameters in each class's docstring):

- gradient perturbation (the ``upload`` hook): ``dp`` (clip + Gaussian noise),
  ``dp_param_noise`` (the official code's unclipped parameter noise),
  ``quantize`` (b-bit per-layer quantization), ``sparsify`` (drop the smallest
  fraction of each large layer);
- data replacement (the ``batch`` hook): ``mixup``, ``instahide``, ``augment``;
- data reduction (the ``local_indices`` hook): ``subsample``;
- ``compose``: an ordered list of the above (e.g. the paper's Aug+Sampling);
- ``none``.

**Only trainable parameters are perturbed.** The flat update also holds the
BatchNorm running statistics (entries with ``is_param = False``); every upload
defense passes those through unchanged, as the official code (which perturbs
``model.parameters()`` only) does.

**Images** reach the ``batch`` hook normalised (``(pixel − mean) / std`` per
channel, pixels in [0, 1]); the hook also gets a :class:`DataSpec` with the
dataset's mean and std, so a defense that is defined on pixels (``augment``:
black padding, brightness) converts exactly, while ``mixup`` and ``instahide``
work on the normalised images, as the official code.

**Randomness** comes only from the ``gen`` argument of a hook (the client's CPU
``torch.Generator`` for the round), so a run is reproducible. Tensors may live on
a CUDA device: large draws (noise, sign masks, permutations, crop offsets) are
made on the tensor's device with a generator seeded from ``gen``
(:func:`generator_on`); a handful of scalars per batch (mixup's λ, InstaHide's
coefficients) are drawn on the CPU from ``gen`` itself and moved. Same seed ⇒
same result on the same device; CPU and CUDA runs draw different numbers.

All hooks are vectorised tensor code (loops run over layers, mixing partners or
transform steps, never over samples); they never modify their inputs in place.

**A defense is defined once**: a frozen dataclass subclass of :class:`Defense`,
registered by name, whose fields are its parameters (:func:`fedmia.core.params.param`:
default, bounds, description), whose docstring says what it does and whose
``strength_param`` names the parameter of the privacy–utility tables::

    @DEFENSES.register("input_noise")
    @dataclass(frozen=True)
    class InputNoise(Defense):
        # its docstring: ``input_noise``: Gaussian noise on the normalised inputs ...
        std: float = param(0.1, minimum=0, description="noise std")
        strength_param = "std"

        def batch(self, x, y, spec, gen):
            noise = torch.randn(x.shape, generator=generator_on(gen, x.device), device=x.device)
            return x + self.std * noise, y

From it come the validation of a config block (:meth:`Defense.from_params`), its block
of the workflow's schema (:func:`fedmia.core.params.schema_block`), its strength
(:meth:`Defense.strength_value`), its other parameters in the privacy–utility tables
(:meth:`Defense.params_text`) and its row of the README (:func:`defense_table`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar

import numpy as np

from fedmia.core.config import ConfigError, DefenseConfig
from fedmia.core.lazy import F, dp_accounting, torch
from fedmia.core.params import (
    changed,
    check_names,
    describe,
    numeric_parameters,
    param,
    resolve_strength,
    validate,
)
from fedmia.core.registry import Registry
from fedmia.federation.state import Entry, StateLayout

#: The defense kinds (``defenses.<key>.kind``): each a frozen dataclass deriving from
#: :class:`Defense`, registered with ``@DEFENSES.register(name)``.
DEFENSES: Registry[type[Defense]] = Registry("defense")


@dataclass(frozen=True)
class DataSpec:
    """What a ``batch`` hook knows about the dataset: classes and normalisation.

    Attributes:
        num_classes: number of classes (width of soft targets).
        mean: float32 1×C×1×1, per-channel mean in [0, 1] pixel units.
        std: float32 1×C×1×1, per-channel std in [0, 1] pixel units.
    """

    num_classes: int
    mean: torch.Tensor
    std: torch.Tensor

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images B×C×H×W → pixels in [0, 1] units (``x · std + mean``)."""
        return x * self.std.to(x.dtype) + self.mean.to(x.dtype)

    def normalise(self, p: torch.Tensor) -> torch.Tensor:
        """Pixels B×C×H×W in [0, 1] units → normalised images (``(p − mean) / std``)."""
        return (p - self.mean.to(p.dtype)) / self.std.to(p.dtype)


#: The neighbouring relation of fedmia's client-level mechanisms (``dp``).
CLIENT_LEVEL = (
    "client level: one client's local data replaced by any other dataset, of "
    "any size; the server sees every upload"
)


@dataclass(frozen=True)
class Privacy:
    """What a defense guarantees for one round of one client's uploads.

    Attributes:
        event: its dp-accounting event (``dp_accounting.DpEvent``) in the units of the
            add-or-remove-one relation of the accountants (sensitivity one).
        relation: the neighbouring relation the event assumes, as the tables state it.
        note: why there is no finite ε (``NonPrivateDpEvent``); empty otherwise.
    """

    event: Any
    relation: str
    note: str = ""


@DEFENSES.register("none")
@dataclass(frozen=True)
class Defense:
    """``none``: no defense; the client uploads its update as is.

    The base class, whose hooks each defense overrides as needed.

    Every hook is a pure function of its inputs and ``gen``, and :meth:`batch`
    accepts int64 labels *or* probabilities as targets (see :func:`as_probs`),
    so defenses chain hook by hook (:class:`ComposeDefense`).
    """

    #: True if :meth:`batch` may return soft targets (B×num_classes) instead of labels.
    soft_targets: ClassVar[bool] = False
    #: True if :meth:`batch` is to be called once per local epoch on the client's whole
    #: (shuffled) local data rather than on each mini-batch; the client then trains on
    #: consecutive mini-batches of what it returns (InstaHide's mixed set, as the official
    #: trainer builds it).
    whole_local_set: ClassVar[bool] = False
    #: The parameter that is the kind's strength in privacy–utility tables (None: no
    #: strength, NaN).
    strength_param: ClassVar[str | None] = None
    #: Named sets of parameter values, the first the default (:mod:`fedmia.core.params`).
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    #: Whether the kind may be a step of a ``compose``.
    composable: ClassVar[bool] = True
    #: True if the server must weight this defense's uploads without looking at the
    #: clients' data (equal weights ``1 / K`` instead of ``n_k / n``, whatever
    #: ``train.aggregation`` says): a privacy mechanism whose guarantee covers a change
    #: of a client's data *size* (``dp``). :func:`fedmia.federation.fedavg.run_fedavg` reads it.
    data_independent_weights: ClassVar[bool] = False
    #: What the tables say of the kind where the official code differs from it (Table 2's
    #: caption); empty if nothing.
    table_note: ClassVar[str] = ""
    #: Where the step acts, for privacy accounting (:meth:`privacy`): ``training`` (which
    #: samples it trains on, what a batch looks like: before any upload is formed),
    #: ``upload`` (transforms the update it is given and reads nothing else), ``mechanism``
    #: (a privacy mechanism on the update: :meth:`privacy` says which); ``None``: fedmia
    #: cannot vouch for it (it might read the client's data after the upload is formed).
    privacy_step: ClassVar[str | None] = "upload"

    @classmethod
    def from_params(cls, params: Mapping[str, Any], *, kind: str) -> Defense:
        """The defense of a config block's parameters (``params``: the block without ``kind``).

        Checked against the fields (:func:`fedmia.core.params.validate`).

        Raises:
            ConfigError: naming the kind, the parameter, its value and what is allowed.
        """
        return cls(**validate(cls, params, kind=kind, what="defense"))

    def strength_value(self) -> float:
        """The value of the strength parameter (NaN for a kind without one)."""
        if self.strength_param is None:
            return float("nan")
        return float(getattr(self, self.strength_param))

    def params_text(self) -> str:
        """Its parameters other than the strength that are not at their defaults.

        ``name=value, ...`` (:func:`fedmia.core.params.changed`; a required parameter always
        counts), e.g. ``variant=official`` or ``clip=5``; ``""`` when there is none.
        """
        return changed(self, skip=self.strength_param)

    def privacy(self) -> Privacy | None:
        """The privacy guarantee of one round of this defense's uploads, or ``None``.

        ``None``: the defense claims no formal guarantee (anything but a mechanism). A
        mechanism returns its dp-accounting event for one round of one client's upload,
        the neighbouring relation it assumes, and a note where the event is
        :class:`~dp_accounting.NonPrivateDpEvent` (no finite ε) saying why. The train
        stage composes the rounds it ran and records the result in the cell's manifest;
        the report computes ε at ``privacy.delta`` from it (:mod:`fedmia.privacy`).
        """
        return None

    def local_indices(self, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Indices (n) of the client's samples it trains on this round."""
        return idx

    def batch(
        self, x: torch.Tensor, y: torch.Tensor, spec: DataSpec, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Transform training inputs: normalised images B×C×H×W, labels B (int64).

        ``B`` is a mini-batch, or the whole local data when :attr:`whole_local_set`.
        Labels may also be probabilities B×num_classes (from an earlier step of a
        composition). Returns the inputs fed to the model and the targets of the loss:
        int64 labels B, or probabilities B×num_classes.
        """
        return x, y

    def upload(
        self, update: torch.Tensor, layout: StateLayout, gen: torch.Generator
    ) -> torch.Tensor:
        """The update the client uploads, from its true update ``w_global − w_local`` (P)."""
        return update


# ----------------------------------------------------------------------------- helpers


def generator_on(gen: torch.Generator, device: torch.device) -> torch.Generator:
    """A generator that draws on ``device``, driven by the CPU generator ``gen``.

    On the CPU this is ``gen`` itself; on another device, a fresh generator of
    that device seeded with one 62-bit draw from ``gen``.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return gen
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    dev_gen = torch.Generator(device=device)
    dev_gen.manual_seed(seed)
    return dev_gen


@lru_cache(maxsize=16)
def _param_mask(layout: StateLayout, device: torch.device) -> torch.Tensor:
    return layout.param_mask().to(device)


def param_mask(layout: StateLayout, device: torch.device | str) -> torch.Tensor:
    """Bool P on ``device``: True on trainable parameters, False on BN statistics (cached)."""
    return _param_mask(layout, torch.device(device))


def _param_entries(layout: StateLayout) -> list[Entry]:
    return [e for e in layout.entries if e.is_param]


def as_probs(y: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """Targets as probabilities B×num_classes: one-hot of int labels B, or ``y`` itself."""
    if y.is_floating_point():
        return y.to(dtype)
    return F.one_hot(y, num_classes).to(dtype)


def clip_update(update: torch.Tensor, mask: torch.Tensor, clip: float) -> torch.Tensor:
    """Scale the masked part of ``update`` (P) to L2 norm at most ``clip``.

    ``mask`` (bool P) selects the coordinates that are clipped (the trainable
    parameters); the others are returned unchanged. An update already inside
    the ball is returned unchanged: the factor is ``min(1, clip / ‖u_mask‖)``.
    """
    norm = torch.linalg.vector_norm(torch.where(mask, update, 0.0))
    factor = (clip / norm.clamp_min(torch.finfo(update.dtype).tiny)).clamp(max=1.0)
    return torch.where(mask, update * factor, update)


def _beta(alpha: float, gen: torch.Generator) -> float:
    """One draw of Beta(α, α) from ``gen`` (numpy's sampler: stable for tiny α)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


# --------------------------------------------------------------- gradient perturbation


@DEFENSES.register("dp")
@dataclass(frozen=True)
class DPDefense(Defense):
    """``dp``: client-level DP (Geyer et al. 2017): clip the update to L2 norm C, add N(0, (σC)²).

    The trainable-parameter part ``u`` of the update is clipped to L2 norm
    ``clip`` (``u ← u · min(1, C/‖u‖)``, see :func:`clip_update`), then every
    parameter coordinate gets independent Gaussian noise ``N(0, (σ·C)²)``.
    Geyer et al. add the noise once to the server's sum; here each client adds
    it to its own upload (local noise, what the attacker sees), so σ is the
    noise multiplier per client. As in DP-FedAvg the server averages the uploads with
    equal weights (:attr:`data_independent_weights`): weights ``n_k / n`` would tell it
    every client's data size un-noised. The accounting is :mod:`fedmia.privacy.accounting`'s.

    Attributes:
        sigma: noise multiplier σ ≥ 0 (required); σ = 0 clips only.
        clip: clipping norm C > 0 (required), in the units of the update
            ``w_global − w_local``.
    """

    sigma: float = param(minimum=0, description="noise multiplier: noise std = sigma × clip")
    clip: float = param(exclusive_minimum=0, description="L2 norm bound C of the update")
    strength_param = "sigma"
    data_independent_weights = True
    privacy_step = "mechanism"

    def privacy(self) -> Privacy:
        """A Gaussian mechanism with noise multiplier σ/2 (sensitivity 2C, std σC).

        Any change of a client's data moves its clipped update by at most 2C; in the
        accountants' units (sensitivity one, add-or-remove-one) that is noise multiplier
        ``σ / 2`` (:func:`fedmia.privacy.accounting.noise_multiplier`). σ = 0: no noise,
        no finite ε.
        """
        if self.sigma == 0:
            return Privacy(
                dp_accounting.NonPrivateDpEvent(),
                CLIENT_LEVEL,
                "σ = 0: the clipped update is uploaded without noise, so ε = ∞",
            )
        return Privacy(dp_accounting.GaussianDpEvent(self.sigma / 2.0), CLIENT_LEVEL)

    def clipped(self, update: torch.Tensor, layout: StateLayout) -> torch.Tensor:
        """The clipping step alone: ``update`` (P) with its parameter part clipped to C."""
        return clip_update(update, param_mask(layout, update.device), self.clip)

    def upload(
        self, update: torch.Tensor, layout: StateLayout, gen: torch.Generator
    ) -> torch.Tensor:
        """Clip the parameter part to norm C, then add N(0, (σC)²) to each parameter."""
        mask = param_mask(layout, update.device)
        clipped = clip_update(update, mask, self.clip)
        if self.sigma == 0:
            return clipped
        noise = torch.randn(
            update.shape,
            generator=generator_on(gen, update.device),
            device=update.device,
            dtype=update.dtype,
        )
        return torch.where(mask, clipped + noise * (self.sigma * self.clip), clipped)


@DEFENSES.register("dp_param_noise")
@dataclass(frozen=True)
class ParamNoiseDefense(Defense):
    """``dp_param_noise``: the official code's "DP": N(0, σ²) on every parameter, no clipping.

    Every trainable parameter of the uploaded model gets independent Gaussian
    noise of standard deviation ``sigma``; since the uploaded update is
    ``w_global − w_local``, this adds ``N(0, σ²)`` to each parameter coordinate
    of the update (the sign of symmetric noise does not matter). Nothing is
    clipped, so the sensitivity is unbounded and this carries **no formal
    differential-privacy guarantee**; it is kept to reproduce the paper's
    numbers.

    Attributes:
        sigma: noise standard deviation σ ≥ 0 (required), in parameter units.
    """

    sigma: float = param(
        minimum=0,
        description="std of the noise added to every parameter (no clipping, no guarantee)",
    )
    strength_param = "sigma"
    privacy_step = "mechanism"

    def privacy(self) -> Privacy:
        """No finite ε: the noise is added to an unclipped update (unbounded sensitivity)."""
        return Privacy(
            dp_accounting.NonPrivateDpEvent(),
            CLIENT_LEVEL,
            "dp_param_noise adds noise to an unclipped update: its sensitivity to "
            "a client's data is unbounded, so no noise scale gives a finite ε",
        )

    def upload(
        self, update: torch.Tensor, layout: StateLayout, gen: torch.Generator
    ) -> torch.Tensor:
        """Add N(0, σ²) to each parameter coordinate of ``update`` (P)."""
        if self.sigma == 0:
            return update
        noise = torch.randn(
            update.shape,
            generator=generator_on(gen, update.device),
            device=update.device,
            dtype=update.dtype,
        )
        return torch.where(param_mask(layout, update.device), update + self.sigma * noise, update)


@DEFENSES.register("quantize")
@dataclass(frozen=True)
class QuantizeDefense(Defense):
    """``quantize``: per-layer min/max b-bit quantization of the update (``official``: floored).

    ``variant: fedmia`` (the default, fedmia's own, unbiased): for
    each parameter entry (layer tensor) ``v`` of the update, with ``lo = min v``,
    ``hi = max v`` and ``step = (hi − lo) / (2**b − 1)``, every element becomes
    ``lo + round((v − lo) / step) · step`` (round to nearest, deterministic). So each
    layer takes at most ``2**b`` distinct values, including its min and max, and each
    element moves by at most ``step / 2``, without bias.

    ``variant: official``, the released code's ``quant`` (experiments/utils.py),
    applied in main.py to each trainable parameter tensor of the *model change*
    ``d = w_local − w_global`` (the negated update ``v`` this hook gets): with
    ``lo = min d`` and ``step = (max d − lo) / 2**b``, every element becomes
    ``lo + ⌊(d − lo) / step⌋ · step``, and the upload is its negation. The levels are
    ``0 … 2**b``, so a layer takes at most ``2**b + 1`` values (the max of ``d`` lands
    on level ``2**b``, itself); every element of ``d`` is rounded *down*, by
    ``[0, step)``, on average ``step / 2`` (a bias: the uploaded model change is
    smaller by about ``step / 2`` per coordinate; in the update's sign, ``v`` is
    rounded up). The official code computes in float32 and truncates with an int32
    cast, which overflows from ``b = 31``; fedmia computes the same formula in float64.

    Both variants: computed in float64 and stored in the update's dtype; a layer of
    zero range (``hi = lo``, a constant layer) is returned unchanged (the official
    code divides 0 by 0 there, a NaN; unchanged is the limit of its formula, every
    element on level 0, ``lo`` itself); ``bits = 32`` returns the update unchanged.

    Attributes:
        bits: b, an integer in 1..32 (required).
        variant: ``fedmia`` (default) or ``official``.
    """

    bits: int = param(
        minimum=1, maximum=32, description="bits per value (per-layer min/max uniform)"
    )
    variant: str = param(
        "fedmia",
        choices=("fedmia", "official"),
        description="fedmia: 2**bits levels, round to nearest; official: "
        "the released code's 2**bits + 1 levels, rounded down",
    )
    strength_param = "bits"
    privacy_step = "upload"

    def upload(
        self, update: torch.Tensor, layout: StateLayout, gen: torch.Generator
    ) -> torch.Tensor:
        """Quantize each parameter entry of ``update`` (P); BN statistics pass through."""
        if self.bits >= 32:
            return update
        official = self.variant == "official"
        levels = 2**self.bits if official else 2**self.bits - 1
        sign = -1.0 if official else 1.0  # official: quantize d = w_local − w_global = −v
        out = update.clone()
        for e in _param_entries(layout):
            if e.numel == 0:
                continue
            v = sign * update[e.slice].to(torch.float64)
            lo, hi = torch.aminmax(v)
            step = (hi - lo) / levels
            z = (v - lo) / step.clamp_min(torch.finfo(torch.float64).tiny)
            q = (torch.floor(z) if official else torch.round(z)).clamp_(0, levels)
            out[e.slice] = (sign * torch.where(step > 0, lo + q * step, v)).to(out.dtype)
        return out


@DEFENSES.register("sparsify")
@dataclass(frozen=True)
class SparsifyDefense(Defense):
    """``sparsify``: zero the smallest-magnitude fraction of each large layer of the update.

    For each parameter entry with ``n ≥ min_size`` elements, exactly
    ``k = ⌊fraction · n⌋`` elements are set to 0 (evaluated with a 1e-9
    tolerance, so 0.29 · 100 gives 29): those smallest in absolute value, ties
    broken by position (a stable sort: the earlier element is dropped first).
    The other elements keep their values. Entries with fewer than ``min_size``
    elements (biases, small layers) are left untouched, as in the official
    code.

    Attributes:
        fraction: p in [0, 1) (required), the fraction of each layer dropped.
        min_size: integer ≥ 0 (default 1000); smaller layers are not sparsified.
    """

    fraction: float = param(
        minimum=0,
        exclusive_maximum=1,
        description="fraction of each layer's update zeroed (smallest magnitudes)",
    )
    min_size: int = param(
        1000, minimum=0, description="layers with fewer elements are left untouched"
    )
    strength_param = "fraction"
    privacy_step = "upload"

    def num_zeroed(self, n: int) -> int:
        """How many of a layer's ``n`` elements are zeroed (0 if ``n < min_size``)."""
        if n < self.min_size:
            return 0
        return min(n, math.floor(self.fraction * n + 1e-9))

    def upload(
        self, update: torch.Tensor, layout: StateLayout, gen: torch.Generator
    ) -> torch.Tensor:
        """Zero the smallest ``⌊p·n⌋`` elements of each large parameter entry of ``update``."""
        out = update.clone()
        for e in _param_entries(layout):
            k = self.num_zeroed(e.numel)
            if k == 0:
                continue
            v = out[e.slice]  # a view: written in place below
            order = torch.sort(v.abs(), stable=True).indices
            v[order[:k]] = 0
        return out


# ------------------------------------------------------------------- data replacement


@DEFENSES.register("mixup")
@dataclass(frozen=True)
class MixupDefense(Defense):
    """``mixup`` (Zhang et al. 2018): train on mixed inputs and labels (``official``: labels only).

    Per mini-batch, one ``λ ~ Beta(α, α)`` and one random permutation ``π`` of
    the batch are drawn (in that order); the soft targets are
    ``λ·onehot(y) + (1 − λ)·onehot(y[π])`` (cross-entropy against probabilities).

    ``variant: paper`` (the default; what the paper and Zhang et al. describe): the
    model is trained on the mixed inputs ``x' = λ·x + (1 − λ)·x[π]``, mixed in
    normalised space (the mix is affine, so this equals mixing raw pixels).

    ``variant: official``: as the released code (``TrainerPrivate`` in
    experiments/trainer_private.py), the model sees the *unmixed* inputs ``x``: its
    ``mixup_data`` draws ``λ = np.random.beta(α, α)`` and ``π = torch.randperm(B)``
    per mini-batch and builds the mixed inputs, but the trainer then computes
    ``pred = model(x)`` and the loss ``λ·CE(pred, y) + (1 − λ)·CE(pred, y[π])``
    (``F.cross_entropy``, batch mean). Cross-entropy is linear in its target, so
    that loss equals the batch-mean cross-entropy against the mixed soft targets
    above, which is what this variant returns with ``x`` unchanged: training on
    label noise only. The draws are the same as the paper variant's.

    Attributes:
        alpha: α > 0 (required); small α puts λ near 0 or 1 (weak mixing),
            α = 1 draws λ uniformly. The official code's default is 0.01.
        variant: ``paper`` (default) or ``official``.
    """

    alpha: float = param(exclusive_minimum=0, description="Beta(alpha, alpha) mixing")
    variant: str = param(
        "paper",
        choices=("paper", "official"),
        description="paper: mix inputs and labels; official: as the "
        "released code, unmixed inputs with the mixed labels",
    )
    soft_targets = True
    strength_param = "alpha"
    privacy_step = "training"

    def draw(
        self, batch_size: int, device: torch.device | str, gen: torch.Generator
    ) -> tuple[float, torch.Tensor]:
        """The batch's mixing weight λ (float) and permutation π (int64 B, on ``device``)."""
        lam = _beta(self.alpha, gen)
        perm = torch.randperm(
            batch_size, generator=generator_on(gen, torch.device(device)), device=device
        )
        return lam, perm

    def batch(
        self, x: torch.Tensor, y: torch.Tensor, spec: DataSpec, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixed inputs B×C×H×W (``official``: ``x`` itself) and mixed soft targets B×classes."""
        lam, perm = self.draw(x.shape[0], x.device, gen)
        t = as_probs(y, spec.num_classes, x.dtype)
        mixed_t = lam * t + (1 - lam) * t[perm]
        if self.variant == "official":
            return x, mixed_t
        return lam * x + (1 - lam) * x[perm], mixed_t


@DEFENSES.register("instahide")
@dataclass(frozen=True)
class InstaHideDefense(Defense):
    """``instahide`` (Huang et al. 2020) as the official code: mix k samples, a sign per pixel.

    The inside-dataset version.

    Once per local epoch the client's whole local data set (n samples) is
    encoded, and the client trains on mini-batches of the encoded set
    (:attr:`whole_local_set`; the official trainer loads the whole local set as
    one batch, mixes it, then trains on chunks of ``batch_size``). Sample ``i``
    is mixed with ``k − 1`` partners: partner ``j`` of every sample comes from
    an independent random permutation ``π_j`` of the local set (``π_0`` is the
    identity). With coefficients ``λ_i`` (k per sample)::

        m_0 = λ_i0 · x_i
        m_j = s_j ⊙ (m_{j−1} + λ_ij · x[π_j(i)])      j = 1 … k−1
        x'_i = m_{k−1}      t_i = Σ_j λ_ij · onehot(y[π_j(i)])

    where each ``s_j`` is a fresh uniform ±1 sign per element (pixel and
    channel) of the normalised images: the official code multiplies by a new
    sign mask inside its partner loop, after adding each partner, so partners
    0 and 1 carry the sign ``s_1⋯s_{k−1}`` and partner ``j ≥ 2`` the sign
    ``s_j⋯s_{k−1}`` (for k = 2 this is the original InstaHide's single mask).
    With ``k = 1`` nothing is drawn and the data pass through unchanged (the
    official code's k = 1 mixes with weight 1 and applies no sign), so training
    is exactly that without a defense.

    Coefficients, as the official code: ``λ_i = |g_i| / Σ|g_i|`` with
    ``g_i ~ N(0, I_k)``, redrawn until the largest lies in
    ``[0.5, upper_bound]`` (exact rejection sampling, vectorised over rows).

    Attributes:
        k: number of images per mix, integer ≥ 1 (required); the official default is 3.
        upper_bound: largest allowed coefficient, in (0.5, 1] (default 0.65, the
            official default); unused when k = 1.
    """

    k: int = param(minimum=1, description="images mixed per sample (1 = no defense)")
    upper_bound: float = param(
        0.65,
        exclusive_minimum=0.5,
        maximum=1,
        description="largest mixing coefficient (default 0.65); coefficients are redrawn "
        "until the largest is in [0.5, upper_bound]",
        note="(the largest coefficient must lie in [0.5, upper_bound], as the official code)",
    )
    soft_targets = True
    whole_local_set = True
    strength_param = "k"
    privacy_step = "training"
    #: Rejection passes before giving up (each pass draws up to twice as many
    #: candidates per pending row as the last, so this is never reached in practice).
    max_passes = 64

    def coefficients(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """Float64 n×k mixing coefficients on the CPU: rows ≥ 0, sum 1, max in [0.5, bound].

        Each row is the first accepted candidate of an i.i.d. sequence of
        ``|g| / Σ|g|``, ``g ~ N(0, I_k)`` (accepted: largest entry in
        ``[0.5, upper_bound]``), i.e. an exact draw from the official conditional
        distribution. For k = 1 every row is ``[1]`` and nothing is drawn.
        """
        k = self.k
        out = torch.ones(n, k, dtype=torch.float64)
        if k == 1 or n == 0:
            return out
        pending = torch.arange(n)
        tries = 1
        for _ in range(self.max_passes):
            g = torch.randn(pending.numel(), tries, k, generator=gen, dtype=torch.float64).abs_()
            lam = g / g.sum(2, keepdim=True)
            top = lam.amax(2)
            ok = (top >= 0.5) & (top <= self.upper_bound)  # pending × tries
            hit = ok.any(1)
            first = ok.to(torch.int8).argmax(1)  # first accepted candidate of each row
            rows = torch.arange(pending.numel())
            out[pending[hit]] = lam[rows[hit], first[hit]]
            pending = pending[~hit]
            if pending.numel() == 0:
                return out
            tries = min(2 * tries, 4096)
        raise RuntimeError(
            f"instahide: could not draw coefficients with k = {k} and "
            f"upper_bound = {self.upper_bound}: the largest of k coefficients "
            "almost never reaches 0.5 when k is large; lower k (the official "
            "default is 3)"
        )

    def draw(
        self,
        shape: torch.Size | tuple[int, ...],
        device: torch.device | str,
        dtype: torch.dtype,
        gen: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Everything random about encoding a set of ``shape`` (n×C×H×W).

        Returns:
            coefficients n×k (``dtype``), partners k×n (int64; row 0 is
            ``arange(n)``, row j the permutation π_j) and sign masks
            (k−1)×n×C×H×W (int8, ±1; mask j−1 is ``s_j``), all on ``device``.
        """
        device = torch.device(device)
        n = shape[0]
        coeffs = self.coefficients(n, gen).to(device=device, dtype=dtype)
        g = generator_on(gen, device)
        rows = [torch.arange(n, device=device)]
        signs = []
        for _ in range(1, self.k):  # the official order: a permutation, then its sign mask
            rows.append(torch.randperm(n, generator=g, device=device))
            s = torch.randint(0, 2, tuple(shape), generator=g, device=device, dtype=torch.int8)
            signs.append(s.mul_(2).sub_(1))
        sign = (
            torch.stack(signs)
            if signs
            else torch.empty((0, *shape), dtype=torch.int8, device=device)
        )
        return coeffs, torch.stack(rows), sign

    def batch(
        self, x: torch.Tensor, y: torch.Tensor, spec: DataSpec, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoded inputs n×C×H×W and mixed soft targets n×num_classes (k = 1: unchanged)."""
        if self.k == 1:
            return x, y
        coeffs, partners, signs = self.draw(x.shape, x.device, x.dtype, gen)
        t = as_probs(y, spec.num_classes, x.dtype)
        mixed = coeffs[:, 0, None, None, None] * x
        target = coeffs[:, 0, None] * t
        for j in range(1, self.k):  # over mixing partners, not samples
            mixed = (mixed + coeffs[:, j, None, None, None] * x[partners[j]]) * signs[j - 1]
            target = target + coeffs[:, j, None] * t[partners[j]]
        return mixed, target


#: The image size the official transforms were written for (CIFAR, 32×32): ``augment``'s
#: padding is given at this size and scaled to the dataset's.
REFERENCE_SIZE = 32

#: Jitter operations by index, the order of torchvision's ColorJitter.
JITTER_OPS = ("brightness", "contrast", "saturation")


def gray(p: torch.Tensor) -> torch.Tensor:
    """Luma B×1×H×W of pixels B×C×H×W: ITU-R 601 ``0.299 R + 0.587 G + 0.114 B`` (C = 3).

    The weights of PIL's ``convert("L")``, which the official (PIL) path uses;
    a 1-channel image is its own luma.
    """
    c = p.shape[1]
    if c == 1:
        return p
    if c != 3:
        raise ValueError(f"colour jitter needs 1- or 3-channel images (got {c} channels)")
    return 0.299 * p[:, 0:1] + 0.587 * p[:, 1:2] + 0.114 * p[:, 2:3]


def crop(
    p: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, pad_h: int, pad_w: int
) -> torch.Tensor:
    """Random-crop step: zero-pad B×C×H×W by (pad_h, pad_w) and cut H×W windows.

    ``dy``, ``dx`` (int64 B, in ``0..2·pad``) are each sample's window offsets in
    the padded image (torchvision ``RandomCrop(size, padding, fill=0)``).
    """
    b, c, h, w = p.shape
    dev = p.device
    padded = F.pad(p, (pad_w, pad_w, pad_h, pad_h))
    rows = (dy[:, None] + torch.arange(h, device=dev))[:, None, :, None]  # B×1×H×1
    cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, None, :]  # B×1×1×W
    return padded[
        torch.arange(b, device=dev)[:, None, None, None],
        torch.arange(c, device=dev)[None, :, None, None],
        rows,
        cols,
    ]


def rotate(p: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each image B×C×H×W about its centre, nearest neighbour, black fill.

    PIL's ``Image.rotate(angle, NEAREST, expand=False, fillcolor=0)``, which
    torchvision's ``RandomRotation`` calls on the official PIL images: a
    positive angle turns the picture counter-clockwise. Output pixel (r, c) takes
    input pixel (⌊y⌋, ⌊x⌋) with, about the centre (W/2, H/2) and at pixel centres::

        x = cos θ · (c + ½ − W/2) − sin θ · (r + ½ − H/2) + W/2
        y = sin θ · (c + ½ − W/2) + cos θ · (r + ½ − H/2) + H/2

    and 0 where that falls outside the image. (PIL evaluates x, y in 16.16
    fixed point, so a pixel whose x or y lies within ~1e-4 of an integer may
    round the other way.)

    Args:
        p: images B×C×H×W (any float dtype).
        degrees: B angles in degrees (counter-clockwise).
    """
    b, c, h, w = p.shape
    dev = p.device
    theta = torch.deg2rad(degrees.to(device=dev, dtype=torch.float64))[:, None, None]
    cos, sin = torch.cos(theta), torch.sin(theta)
    u = (torch.arange(w, device=dev, dtype=torch.float64) + 0.5 - w / 2)[None, None, :]
    v = (torch.arange(h, device=dev, dtype=torch.float64) + 0.5 - h / 2)[None, :, None]
    col = torch.floor(cos * u - sin * v + w / 2).long()  # B×H×W
    row = torch.floor(sin * u + cos * v + h / 2).long()
    inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    src = torch.where(inside, row * w + col, 0).view(b, 1, h * w).expand(b, c, h * w)
    out = p.reshape(b, c, h * w).gather(2, src).view(b, c, h, w)
    return torch.where(inside[:, None], out, torch.zeros((), dtype=p.dtype, device=dev))


def adjust_brightness(p: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``clamp(f · p, 0, 1)``: blend with black (PIL ``ImageEnhance.Brightness``); f is B."""
    return (f.to(p.dtype).view(-1, 1, 1, 1) * p).clamp(0, 1)


def adjust_contrast(p: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``clamp(f · p + (1 − f) · m, 0, 1)`` with m each image's mean luma (PIL ``Contrast``)."""
    f = f.to(p.dtype).view(-1, 1, 1, 1)
    m = gray(p).mean(dim=(1, 2, 3), keepdim=True)
    return (f * p + (1 - f) * m).clamp(0, 1)


def adjust_saturation(p: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``clamp(f · p + (1 − f) · gray(p), 0, 1)`` (PIL ``ImageEnhance.Color``); 1 channel: p."""
    if p.shape[1] == 1:
        return p
    f = f.to(p.dtype).view(-1, 1, 1, 1)
    return (f * p + (1 - f) * gray(p)).clamp(0, 1)


_JITTER_FNS = (adjust_brightness, adjust_contrast, adjust_saturation)


def jitter(p: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Colour jitter with a per-sample order of its operations (torchvision ``ColorJitter``).

    Args:
        p: pixels B×C×H×W in [0, 1].
        factors: B×3 factors of brightness, contrast, saturation (see :data:`JITTER_OPS`).
        order: int64 B×m, each sample's operations (indices into :data:`JITTER_OPS`) in
            the order they are applied; an operation not listed is not applied.
    """
    out = p
    for slot in range(order.shape[1]):  # over positions in the order, not samples
        new = out
        for op, fn in enumerate(_JITTER_FNS):
            here = order[:, slot] == op
            if bool(here.any()):
                new = torch.where(here[:, None, None, None], fn(out, factors[:, op]), new)
        out = new
    return out


@dataclass(frozen=True)
class AugmentDraw:
    """The random parameters of one augmented batch (all on the batch's device).

    Attributes:
        dy, dx: int64 B, crop window offsets in the padded image (0 when no crop).
        hflip, vflip: bool B, which samples are mirrored left–right / top–bottom.
        degrees: float64 B, rotation angles (0 when no rotation).
        factors: float64 B×3, jitter factors (brightness, contrast, saturation).
        order: int64 B×m, the enabled jitter operations in each sample's order.
    """

    dy: torch.Tensor
    dx: torch.Tensor
    hflip: torch.Tensor
    vflip: torch.Tensor
    degrees: torch.Tensor
    factors: torch.Tensor
    order: torch.Tensor


@DEFENSES.register("augment")
@dataclass(frozen=True)
class AugmentDefense(Defense):
    """``augment``: the official augmentation (crop, flips, rotation, jitter), in pixel space.

    Applied per sample, each with its own random parameters, in the official
    order (torchvision on PIL images), each step skipped when disabled:

    1. crop: zero-pad by ``padding`` pixels (of a 32-pixel image; scaled to the
       dataset's size, ``⌊padding · H/32 + ½⌋`` rows and the same for columns)
       and cut an H×W window at offsets uniform in ``0..2·pad`` — ``RandomCrop``;
    2. horizontal flip, then vertical flip, each with probability ½;
    3. rotation by an angle uniform in ``[−rotation, rotation]`` degrees about the
       centre, nearest neighbour, black fill (:func:`rotate`) — ``RandomRotation``;
    4. colour jitter — ``ColorJitter``: factors ``f ~ U[max(0, 1 − v), 1 + v]``
       per enabled operation (brightness, contrast, saturation), applied in a
       random order per sample, each clamped to [0, 1] (:func:`jitter`).

    The hook un-normalises its input (:meth:`DataSpec.to_pixels`), so padding and
    rotation fill with black and brightness scales pixels, exactly as the
    official's pixel-space transforms, and normalises the result again. PIL
    rounds to 8 bits after each jitter operation and rounds the contrast mean to
    an integer grey level; fedmia stays in floating point (a difference of at
    most ~1/255 per operation). Labels are unchanged.

    The defaults are the ``official`` preset: utils/datasets.py of the official code
    with ``data_augment`` on (CIFAR-100): RandomCrop(32, padding=4),
    RandomHorizontalFlip, RandomVerticalFlip, RandomRotation(45),
    ColorJitter(brightness=0.25, contrast=0.8). The ``mild`` preset is fedmia's earlier
    augment (crop, horizontal flip, mild jitter).

    Attributes:
        padding: integer ≥ 0, crop padding at 32×32 (0: no crop).
        hflip, vflip: random horizontal / vertical flips.
        rotation: largest rotation in degrees, in [0, 180] (0: none).
        brightness, contrast, saturation: jitter strengths v ≥ 0 (0: off;
            saturation acts on 3-channel images only).
    """

    padding: int = param(
        4,
        minimum=0,
        description="crop padding in pixels of a 32-pixel image (scaled to the image size)",
    )
    hflip: bool = param(True, description="random horizontal flips")
    vflip: bool = param(True, description="random vertical flips")
    rotation: float = param(
        45.0,
        minimum=0,
        maximum=180,
        note="(degrees)",
        description="largest rotation angle in degrees",
    )
    brightness: float = param(0.25, minimum=0, description="brightness jitter")
    contrast: float = param(0.8, minimum=0, description="contrast jitter")
    saturation: float = param(0.0, minimum=0, description="saturation jitter")
    strength_param = "padding"
    privacy_step = "training"
    table_note = (
        "`augment`: the official code's augmentation is one on/off flag (no "
        "strength), and its Dermnet loader ignores it (a no-op there); fedmia's "
        "strengths and its augmentation on Dermnet are fedmia's, not the official "
        "code's"
    )
    presets = {
        "official": {},
        "mild": dict(vflip=False, rotation=0.0, brightness=0.2, contrast=0.2, saturation=0.2),
    }

    def pad_for(self, h: int, w: int) -> tuple[int, int]:
        """Crop padding (rows, columns) of an H×W image: ``padding`` scaled from 32 pixels."""
        return (
            math.floor(self.padding * h / REFERENCE_SIZE + 0.5),
            math.floor(self.padding * w / REFERENCE_SIZE + 0.5),
        )

    def jitter_ranges(self) -> list[tuple[int, float, float]]:
        """Enabled jitter operations: ``(index into JITTER_OPS, low, high)`` of their factor."""
        strengths = (self.brightness, self.contrast, self.saturation)
        return [(i, max(0.0, 1.0 - v), 1.0 + v) for i, v in enumerate(strengths) if v > 0]

    def draw(
        self, shape: torch.Size | tuple[int, ...], device: torch.device | str, gen: torch.Generator
    ) -> AugmentDraw:
        """Draw every sample's parameters for images of ``shape`` (B×C×H×W)."""
        device = torch.device(device)
        b, _, h, w = shape
        g = generator_on(gen, device)
        zeros = torch.zeros(b, dtype=torch.int64, device=device)
        no = torch.zeros(b, dtype=torch.bool, device=device)
        pad_h, pad_w = self.pad_for(h, w)
        dy = torch.randint(0, 2 * pad_h + 1, (b,), generator=g, device=device) if pad_h else zeros
        dx = torch.randint(0, 2 * pad_w + 1, (b,), generator=g, device=device) if pad_w else zeros
        hflip = torch.rand(b, generator=g, device=device) < 0.5 if self.hflip else no
        vflip = torch.rand(b, generator=g, device=device) < 0.5 if self.vflip else no
        degrees = torch.zeros(b, dtype=torch.float64, device=device)
        if self.rotation > 0:
            u = torch.rand(b, generator=g, device=device, dtype=torch.float64)
            degrees = self.rotation * (2 * u - 1)
        factors = torch.ones(b, 3, dtype=torch.float64, device=device)
        ranges = self.jitter_ranges()
        for i, lo, hi in ranges:
            u = torch.rand(b, generator=g, device=device, dtype=torch.float64)
            factors[:, i] = lo + (hi - lo) * u
        enabled = torch.tensor([i for i, _, _ in ranges], dtype=torch.int64, device=device)
        keys = torch.rand(b, len(ranges), generator=g, device=device)
        order = enabled[keys.argsort(1)]  # a uniformly random order per sample
        return AugmentDraw(dy, dx, hflip, vflip, degrees, factors, order)

    def apply(self, p: torch.Tensor, d: AugmentDraw) -> torch.Tensor:
        """Augment pixels B×C×H×W in [0, 1] with the drawn parameters ``d``."""
        pad_h, pad_w = self.pad_for(p.shape[2], p.shape[3])
        if pad_h or pad_w:
            p = crop(p, d.dy, d.dx, pad_h, pad_w)
        if self.hflip:
            p = torch.where(d.hflip[:, None, None, None], p.flip(3), p)
        if self.vflip:
            p = torch.where(d.vflip[:, None, None, None], p.flip(2), p)
        if self.rotation > 0:
            p = rotate(p, d.degrees)
        if d.order.shape[1]:
            p = jitter(p, d.factors, d.order)
        return p

    def batch(
        self, x: torch.Tensor, y: torch.Tensor, spec: DataSpec, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augmented normalised inputs B×C×H×W (same dtype) and the unchanged targets."""
        d = self.draw(x.shape, x.device, gen)
        return spec.normalise(self.apply(spec.to_pixels(x), d)), y


# --------------------------------------------------------------------- data reduction


@DEFENSES.register("subsample")
@dataclass(frozen=True)
class SubsampleDefense(Defense):
    """``subsample``: train each round on a random subset of the local data.

    Each round the client keeps ``m = max(1, ⌊fraction · n + ½⌋)`` of its
    ``n`` samples (rounded half up), drawn uniformly without replacement; the
    same subset serves all local epochs of that round. With ``m = n`` the
    indices are returned unchanged (no randomness is drawn). The official code
    instead stops each local epoch after ``int(fraction · batches)`` batches of
    a reshuffled loader, i.e. a fresh subset per epoch; with one local epoch
    (the paper's setting) the two coincide up to rounding.

    Attributes:
        fraction: in (0, 1] (required).
    """

    fraction: float = param(
        exclusive_minimum=0,
        maximum=1,
        description="fraction of the local data trained on each round",
    )
    strength_param = "fraction"
    privacy_step = "training"

    def size(self, n: int) -> int:
        """The number of samples kept out of ``n``."""
        return 0 if n == 0 else max(1, math.floor(self.fraction * n + 0.5))

    def local_indices(self, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """A uniformly random subset (m, without repetition) of ``idx`` (n)."""
        n = idx.numel()
        m = self.size(n)
        if m >= n:
            return idx
        sel = torch.randperm(n, generator=generator_on(gen, idx.device), device=idx.device)
        return idx[sel[:m]]


# ---------------------------------------------------------------------------- compose


@DEFENSES.register("compose")
@dataclass(frozen=True)
class ComposeDefense(Defense):
    """``compose``: an ordered list of defenses, applied hook by hook (e.g. Aug+Sampling).

    Each hook runs the steps' hooks in order, each on the previous one's output:
    ``local_indices`` (e.g. ``subsample``), ``batch`` (e.g. ``augment`` then
    ``mixup``; labels become soft targets as soon as one step makes them so) and
    ``upload`` (e.g. ``sparsify`` then ``dp``). The paper's Aug+Sampling is
    ``[augment, subsample]``. If any step encodes the whole local set
    (``instahide``), the ``batch`` hooks of all steps see the whole local set
    once per epoch instead of each mini-batch (per-sample steps such as
    ``augment`` are unaffected; ``mixup`` then draws one λ per epoch).

    Attributes:
        steps: the defenses, in order (at least one; a step is never a compose).
        step_kinds: their kinds, in the same order.
        strength: ``(step index, parameter)`` of the strength axis reported in
            privacy–utility tables, or ``None`` (strength NaN).
    """

    steps: tuple[Defense, ...]
    step_kinds: tuple[str, ...]
    strength: tuple[int, str] | None = None
    composable = False

    @classmethod
    def from_params(cls, params: Mapping[str, Any], *, kind: str = "compose") -> Defense:
        """The composition of ``{steps: [<defense block>, ...], strength: <path>}``.

        Each step is built as a standalone defense; ``strength`` names one step's numeric
        parameter (:func:`fedmia.core.params.resolve_strength`).

        Raises:
            ConfigError: naming the step or the parameter at fault and what is allowed.
        """
        owner = f"defense '{kind}'"
        check_names(owner, params, ["steps", "strength"], ["steps"])
        blocks = params["steps"]
        if not isinstance(blocks, list | tuple) or not blocks:
            raise ConfigError(
                f"{owner}: parameter 'steps' = {blocks!r} is invalid; "
                f"allowed: a non-empty list of defenses, e.g. "
                f"[{{kind: augment}}, {{kind: subsample, fraction: 0.5}}]"
            )
        steps, kinds = [], []
        for i, block in enumerate(blocks):
            if not isinstance(block, Mapping) or "kind" not in block:
                raise ConfigError(
                    f"{owner}: steps[{i}] = {block!r} is invalid; each step "
                    f"is a defense block with a 'kind', e.g. {{kind: subsample, "
                    f"fraction: 0.5}}"
                )
            if block["kind"] in DEFENSES and not DEFENSES.get(block["kind"]).composable:
                raise ConfigError(
                    f"{owner}: steps[{i}] is itself a {block['kind']}; nesting "
                    f"is not supported: list its steps in the outer {kind} instead"
                )
            steps.append(defense_from_config(block, where=f"{owner}: steps[{i}]"))
            kinds.append(block["kind"])
        strength = None
        if params.get("strength") is not None:
            strength = resolve_strength(
                params["strength"], kinds, [numeric_parameters(type(d)) for d in steps], owner
            )
        return cls(steps=tuple(steps), step_kinds=tuple(kinds), strength=strength)

    @property
    def soft_targets(self) -> bool:  # type: ignore[override]
        """True if any step may return soft targets."""
        return any(s.soft_targets for s in self.steps)

    @property
    def whole_local_set(self) -> bool:  # type: ignore[override]
        """True if any step encodes the whole local set."""
        return any(s.whole_local_set for s in self.steps)

    @property
    def table_note(self) -> str:  # type: ignore[override]
        """Its steps' notes."""
        return "; ".join(dict.fromkeys(n for s in self.steps if (n := s.table_note)))

    @property
    def data_independent_weights(self) -> bool:  # type: ignore[override]
        """True if any step needs weights that do not depend on the data (``dp``)."""
        return any(s.data_independent_weights for s in self.steps)

    @property
    def privacy_step(self) -> str | None:  # type: ignore[override]
        """``mechanism`` if a step is one; else ``None`` when a step cannot be vouched for."""
        steps = [s.privacy_step for s in self.steps]
        if "mechanism" in steps:
            return "mechanism"
        return None if None in steps else ("upload" if "upload" in steps else "training")

    def privacy(self) -> Privacy | None:
        """Its steps' events composed, one per step (``None`` without a mechanism).

        A ``training`` step acts before any upload is formed (fedmia runs a compose hook
        by hook: all training hooks, then the upload hooks in list order), so whatever
        its place its effect on the upload is bounded by a later mechanism's clipping:
        ``NoOpDpEvent``. An ``upload`` step before a mechanism is clipped by it too; after
        it, it is post-processing of the noised update: ``NoOpDpEvent`` either way. A step
        fedmia cannot vouch for (``privacy_step`` ``None``, e.g. a plugin's) after a
        mechanism might read the data after the noise: ``NonPrivateDpEvent``; before it,
        the mechanism clips its output: ``NoOpDpEvent``.
        """
        found = [
            (i, p)
            for i, s in enumerate(self.steps)
            if s.privacy_step == "mechanism" and (p := s.privacy()) is not None
        ]
        if not found:
            return None
        first = found[0][0]
        events, notes = [], [p.note for _, p in found if p.note]
        mechanisms = dict(found)
        for i, step in enumerate(self.steps):
            if i in mechanisms:
                events.append(mechanisms[i].event)
            elif step.privacy_step is None and i > first:
                events.append(dp_accounting.NonPrivateDpEvent())
                notes.append(
                    f"in this compose step {i} ({self.step_kinds[i]}) follows a "
                    "privacy mechanism and may read the client's data after the "
                    "noise: it is not post-processing, so the mechanism's ε does not "
                    "bound it (ε = ∞)"
                )
            else:
                events.append(dp_accounting.NoOpDpEvent())
        relations = sorted({p.relation for _, p in found})
        return Privacy(
            dp_accounting.ComposedDpEvent(events), "; ".join(relations), "; ".join(notes)
        )

    def local_indices(self, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Each step's ``local_indices`` in turn."""
        for step in self.steps:
            idx = step.local_indices(idx, gen)
        return idx

    def batch(
        self, x: torch.Tensor, y: torch.Tensor, spec: DataSpec, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each step's ``batch`` in turn (targets may turn into probabilities on the way)."""
        for step in self.steps:
            x, y = step.batch(x, y, spec, gen)
        return x, y

    def upload(
        self, update: torch.Tensor, layout: StateLayout, gen: torch.Generator
    ) -> torch.Tensor:
        """Each step's ``upload`` in turn."""
        for step in self.steps:
            update = step.upload(update, layout, gen)
        return update

    def strength_value(self) -> float:
        """The value of the strength parameter (NaN when none was chosen)."""
        if self.strength is None:
            return float("nan")
        i, name = self.strength
        return float(getattr(self.steps[i], name))

    def params_text(self) -> str:
        """Its steps, each with its parameters not at their defaults but the strength.

        E.g. ``augment + subsample`` (strength ``subsample.fraction``) or
        ``augment + mixup(alpha=0.5, variant=official)`` (no strength).
        """
        parts = []
        for i, (kind, step) in enumerate(zip(self.step_kinds, self.steps, strict=True)):
            skip = self.strength[1] if self.strength and self.strength[0] == i else None
            text = changed(step, skip=skip)
            parts.append(f"{kind}({text})" if text else kind)
        return " + ".join(parts)


# ------------------------------------------------------------------------------ build


def build_defense(cfg: DefenseConfig, where: str = "defense") -> Defense:
    """Instantiate ``cfg``; unknown kinds and bad parameters raise ``ConfigError``.

    The message starts with ``where`` (e.g. the config key ``defenses.dp_s1``).
    """
    try:
        cls = DEFENSES.get(cfg.kind)
    except ValueError as e:
        raise ConfigError(f"{where}.kind: {e}") from None
    try:
        return cls.from_params(cfg.params, kind=cfg.kind)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def defense_from_config(block: Mapping[str, Any], where: str = "defense") -> Defense:
    """The defense of a config block ``{kind: ..., <parameter>: ...}`` (see :func:`build_defense`).

    Raises:
        ConfigError: no ``kind``, an unknown kind or a bad parameter.
    """
    if not isinstance(block, Mapping) or "kind" not in block:
        raise ConfigError(f"{where}: missing key 'kind'; add kind: one of {DEFENSES.names()}")
    return build_defense(DefenseConfig.from_dict(block, where=where), where=where)


def strength_of(defense: Mapping[str, Any]) -> float:
    """The strength value of a defense config block (NaN for ``none``).

    The value the defense runs with, defaults included: its kind's ``strength_param``,
    or for ``compose`` the step parameter its ``strength`` names (NaN when it names none).
    """
    return defense_from_config(defense).strength_value()


def params_of(defense: Mapping[str, Any]) -> str:
    """What else than its strength a defense config block sets (the ``params`` column).

    Its parameters, defaults included, that are not the strength and not at their
    defaults, as ``name=value, ...`` (:meth:`Defense.params_text`): e.g. ``variant=official``
    for ``{kind: quantize, bits: 4, variant: official}``, ``clip=5`` for a ``dp`` (a
    required parameter always counts), ``""`` for ``{kind: mixup, alpha: 1}``; a
    ``compose`` lists its steps. Builds no tensor.
    """
    return defense_from_config(defense).params_text()


def note_of(defense: Mapping[str, Any]) -> str:
    """What the tables say of a defense config block where the official code differs.

    Its kind's :attr:`Defense.table_note` (a ``compose``: its steps'); ``""`` if none.
    """
    return defense_from_config(defense).table_note


def defense_table() -> str:
    """The README's table of defenses (Markdown), one row per registered kind.

    Columns: the kind, its parameters with bounds and defaults
    (:func:`fedmia.core.params.describe`), its strength parameter, and the first paragraph of
    its docstring.
    """
    rows = ["| kind | parameters | strength | what the client does |", "|---|---|---|---|"]
    for kind in DEFENSES.registered():
        cls = DEFENSES.get(kind)
        doc = " ".join((cls.__doc__ or "").split("\n\n")[0].split())
        doc = doc.removeprefix(f"``{kind}``: ").replace("``", "`").replace("|", "\\|")
        params = (
            "`steps` (defenses), `strength` (`<step>.<parameter>`)"
            if cls is ComposeDefense
            else describe(cls)
        )
        strength = (
            f"`{cls.strength_param}`"
            if cls.strength_param
            else "`strength`"
            if cls is ComposeDefense
            else "—"
        )
        rows.append(f"| `{kind}` | {params} | {strength} | {doc} |")
    return "\n".join(rows) + "\n"
