"""FedAvg exactly as the paper's official code runs it, on tensors held on the device.

By default every client takes part in every round; ``train.participation`` samples a
round's participants (:func:`participants`), and only they train, upload and are
weighted. A client starts from the global model,
trains ``local_epochs`` passes of SGD (momentum, weight decay, a fresh optimizer
every round) over its data, and uploads ``Δ_k = w_global − w_local`` after its
defense. The server applies a weighted average of the uploads,
``w_{r+1} = w_r − Σ_k a_k Δ_k`` (the same weighted average of the uploaded models),
with the weights of :func:`aggregation_weights`: the clients' data shares
``a_k = n_k / n`` by default, the official code's permutation of them
(``train.aggregation: official_permuted``), or equal weights ``1 / K`` under a defense
whose weights must not depend on the data (``dp``). Parameters and floating buffers
(BatchNorm statistics) are averaged alike.

Randomness: the data order (and any defense randomness) of client ``k`` in round
``r`` comes from its own generator seeded by ``(seed, r, k)``, so runs are
reproducible and independent of the order clients are visited; the official
weights' order of round ``r`` comes from ``(seed, r)`` on a stream of its own, and so do
the round's participants (another stream), so a client's training does not depend on
who else takes part.

Canary clients (:class:`Canaries`, an option of :func:`run_fedavg`) serve the one-shot
privacy estimate (:mod:`fedmia.privacy.oneshot`, which this module does not import: an edit
of the estimate reruns no training).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedmia.core.config import AGGREGATIONS, Participation, TrainConfig
from fedmia.federation.defenses import DataSpec, Defense, DPDefense, param_mask
from fedmia.federation.partition import (
    STREAM_AGGREGATION,
    STREAM_PARTICIPATION,
    STREAM_TRAIN,
    rng_for,
)
from fedmia.federation.state import FlatState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceData:
    """A whole dataset on the device, normalised batch by batch on the fly.

    Attributes:
        images: uint8 N×C×H×W on the device.
        labels: int64 N on the device.
        mean: float32 1×C×1×1, per-channel mean in [0, 1] units.
        std: float32 1×C×1×1, per-channel std in [0, 1] units.
        num_classes: number of classes.
    """

    images: torch.Tensor
    labels: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    num_classes: int

    @classmethod
    def from_arrays(
        cls,
        images,
        labels,
        mean: Sequence[float],
        std: Sequence[float],
        num_classes: int,
        device: torch.device,
    ) -> DeviceData:
        """Copy uint8 images (N×C×H×W numpy/tensor) and int labels to ``device`` once."""
        c = len(mean)
        return cls(
            images=torch.as_tensor(images).to(device),
            labels=torch.as_tensor(labels, dtype=torch.int64).to(device),
            mean=torch.tensor(mean, dtype=torch.float32, device=device).view(1, c, 1, 1),
            std=torch.tensor(std, dtype=torch.float32, device=device).view(1, c, 1, 1),
            num_classes=num_classes,
        )

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised float images B×C×H×W and labels B of sample indices ``idx`` (B)."""
        x = self.images[idx].to(torch.float32).div_(255.0).sub_(self.mean).div_(self.std)
        return x, self.labels[idx]


def client_generator(seed: int, rnd: int, client: int) -> torch.Generator:
    """The CPU generator of client ``client`` in round ``rnd`` of run ``seed``."""
    g = torch.Generator()
    g.manual_seed(int(rng_for(seed, STREAM_TRAIN, rnd, client).integers(2**62)))
    return g


@dataclass(frozen=True)
class LocalResult:
    """What one client's local training produced."""

    upload: torch.Tensor  # float32 P: the uploaded update Δ_k (after the defense)
    loss: float  # mean training loss over the round's mini-batches (per sample)
    accuracy: float  # training accuracy over the round's mini-batches
    samples: int  # samples processed (over all local epochs)
    update_norm: float = math.nan  # L2 norm of the parameter part of the update (before the
    # defense), when asked for (canaries without clipping: :class:`Canaries`)


def local_train(
    state: FlatState,
    global_flat: torch.Tensor,
    data: DeviceData,
    idx: torch.Tensor,
    cfg: TrainConfig,
    lr: float,
    defense: Defense,
    gen: torch.Generator,
    *,
    out: torch.Tensor | None = None,
    update_norm: bool = False,
) -> LocalResult:
    """Train a client from ``global_flat`` on samples ``idx`` and return its upload.

    Args:
        state: the flat-state wrapper of the (shared) model, overwritten here.
        global_flat: float32 P, the global model the server sent.
        data: the dataset on the device.
        idx: int64 n_k (device), the client's sample ids.
        cfg: local epochs, batch size, momentum, weight decay.
        lr: this round's learning rate.
        defense: hooks for local data, batches and the upload. Its ``batch`` hook gets
            each mini-batch (normalised) with the dataset's :class:`DataSpec`, or, when
            ``defense.whole_local_set``, the whole shuffled local data once per epoch,
            whose output is then cut into mini-batches.
        gen: the client's generator for this round.
        out: float32 P, where to write the upload (e.g. the client's row of the server's
            K×P uploads): the update is formed there and the defense's upload, if it is
            another tensor, copied there; the result's ``upload`` is then ``out``.
        update_norm: also return the L2 norm of the parameter part of the update before
            the defense (``LocalResult.update_norm``; one reduction and a sync).
    """
    model = state.module
    state.load(global_flat)
    model.train()
    opt = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    spec = DataSpec(num_classes=data.num_classes, mean=data.mean, std=data.std)
    idx = defense.local_indices(idx, gen)
    n = idx.numel()
    loss_sum = torch.zeros((), device=global_flat.device)
    correct = torch.zeros((), device=global_flat.device)
    for _ in range(cfg.local_epochs):
        order = idx[torch.randperm(n, generator=gen).to(idx.device)]
        if defense.whole_local_set:  # encoded once per epoch, then cut into mini-batches
            x_all, y_all = data.batch(order)
            x_all, t_all = defense.batch(x_all, y_all, spec, gen)
        for start in range(0, n, cfg.batch_size):
            if defense.whole_local_set:
                x = x_all[start : start + cfg.batch_size]
                y = y_all[start : start + cfg.batch_size]
                target = t_all[start : start + cfg.batch_size]
            else:
                x, y = data.batch(order[start : start + cfg.batch_size])
                x, target = defense.batch(x, y, spec, gen)
            logits = model(x)
            loss = F.cross_entropy(logits, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
    samples = n * cfg.local_epochs
    update = torch.sub(global_flat, state.flat.detach(), out=out)
    norm = math.nan
    if update_norm:
        mask = param_mask(state.layout, update.device)
        norm = float(torch.linalg.vector_norm(torch.where(mask, update, 0.0)))
    upload = defense.upload(update, state.layout, gen)
    if out is not None and upload is not out:
        upload = out.copy_(upload)
    return LocalResult(
        upload=upload,
        loss=float(loss_sum) / samples,
        accuracy=float(correct) / samples,
        samples=samples,
        update_norm=norm,
    )


#: The server's weights as the manifest names them: ``equal`` (``1 / K``, a defense with
#: :attr:`~fedmia.federation.defenses.Defense.data_independent_weights`) or a ``train.aggregation``.
AGGREGATION_WEIGHTS = ("equal", *AGGREGATIONS)


def aggregation_rule(cfg: TrainConfig, defense: Defense) -> str:
    """The weights the server uses (one of :data:`AGGREGATION_WEIGHTS`).

    ``equal`` when the defense's weights must not depend on the clients' data
    (``dp``: the server would otherwise learn every ``n_k``), else ``cfg.aggregation``.
    """
    return "equal" if defense.data_independent_weights else cfg.aggregation


def official_order(seed: int, rnd: int, k: int) -> np.ndarray:
    """The official code's listing of the K uploads in round ``rnd`` (a permutation of 0..K-1).

    ``main.py`` draws ``np.random.choice(range(K), K, replace=False)`` every round; here
    the permutation comes from ``(seed, rnd)`` on a stream of its own, so it is
    reproducible and independent of every other draw.
    """
    return rng_for(seed, STREAM_AGGREGATION, rnd).permutation(k)


def participants(participation: Participation, seed: int, rnd: int, k: int) -> np.ndarray:
    """The clients that take part in round ``rnd`` (sorted int64 ids, possibly none).

    ``fraction`` 1: every client, nothing drawn. ``uniform``: ``m =``
    :meth:`~fedmia.core.config.Participation.size` clients without replacement;
    ``poisson``: each client independently with probability ``q = fraction`` (a round may
    have none). The draw comes from ``(seed, round)`` on a stream of its own, so it is
    reproducible and independent of the clients' training.
    """
    if participation.full:
        return np.arange(k, dtype=np.int64)
    rng = rng_for(seed, STREAM_PARTICIPATION, rnd)
    if participation.sampling == "poisson":
        return np.flatnonzero(rng.random(k) < participation.fraction).astype(np.int64)
    return np.sort(rng.choice(k, size=participation.size(k), replace=False)).astype(np.int64)


def equal_denominator(participation: Participation, k: int, m: int) -> float:
    """The denominator of ``equal`` weights ``1 / d`` with ``m`` of ``k`` clients taking part.

    ``m`` itself, except under ``poisson`` sampling below fraction 1: the fixed expected
    number ``qK`` (DP-FedAvg, McMahan et al. 2018), so the weights — and with them the
    sensitivity of the aggregate — do not depend on who happened to take part.
    """
    if participation.sampling == "poisson" and not participation.full:
        return participation.fraction * k
    return float(m)


def aggregation_weights(
    num_samples: torch.Tensor, rule: str, seed: int, rnd: int, denominator: float | None = None
) -> torch.Tensor:
    """The weight ``a_k`` of each participant's upload in round ``rnd`` (float32 m).

    Args:
        num_samples: int64 m, the participants' data sizes ``n_k`` (in client-id order;
            every client when all take part).
        rule: ``data_size``: ``a_k = n_k / n`` (n: the participants' total).
            ``official_permuted``: the official code's, which lists the uploads in the
            order :func:`official_order` and multiplies the i-th listed upload by ``n_i /
            n``: participant ``order[i]`` gets ``n_i / n``. ``equal``: ``a_k = 1 / d``.
        seed: the run's seed.
        rnd: the round (1-based).
        denominator: ``d`` of ``equal`` weights (:func:`equal_denominator`; ``None``: m,
            the weights sum to 1). The other rules' weights sum to 1.
    """
    if rule not in AGGREGATION_WEIGHTS:
        raise ValueError(f"unknown aggregation '{rule}'; choose from {list(AGGREGATION_WEIGHTS)}")
    k = num_samples.numel()
    if k == 0:
        return torch.zeros(0, dtype=torch.float32, device=num_samples.device)
    if rule == "equal":
        d = k if denominator is None else denominator
        return torch.full((k,), 1.0 / d, dtype=torch.float32, device=num_samples.device)
    shares = num_samples.to(torch.float32) / num_samples.sum()
    if rule == "data_size":
        return shares
    order = torch.from_numpy(official_order(seed, rnd, k)).to(num_samples.device)
    weights = torch.empty_like(shares)
    weights[order] = shares  # the i-th listed upload, client order[i], gets n_i / n
    return weights


def aggregate(
    global_flat: torch.Tensor,
    uploads: torch.Tensor,
    weights: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """FedAvg step: ``w − Σ_k a_k Δ_k``.

    Args:
        global_flat: float32 P, the model the round started from.
        uploads: float32 K×P, the uploaded updates.
        weights: float32 K, the weights ``a_k`` (:func:`aggregation_weights`).
        out: float32 P (not ``global_flat``), where to write the result: the step
            ``Σ_k a_k Δ_k`` is formed there first, so no temporary is allocated. The
            same floats either way (the product ``weights @ uploads`` is this ``mm``).
    """
    weights = weights.to(uploads.dtype)
    if out is None:
        return global_flat - weights @ uploads
    torch.mm(weights[None], uploads, out=out[None])
    return torch.sub(global_flat, out, out=out)


@torch.no_grad()
def evaluate(
    model: nn.Module, data: DeviceData, idx: torch.Tensor, batch_size: int
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` (eval mode) on samples ``idx``."""
    model.eval()
    loss = torch.zeros((), device=data.labels.device)
    correct = torch.zeros((), device=data.labels.device)
    for start in range(0, idx.numel(), batch_size):
        x, y = data.batch(idx[start : start + batch_size])
        logits = model(x)
        loss += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    return float(loss) / idx.numel(), float(correct) / idx.numel()


#: Test samples the models are run on to check that their outputs are finite.
PROBE_SAMPLES = 16


@torch.no_grad()
def outputs_finite(
    state: FlatState,
    data: DeviceData,
    idx: torch.Tensor,
    model_flat: torch.Tensor,
    sent: torch.Tensor | None = None,
    uploads: torch.Tensor | None = None,
) -> bool:
    """Whether ``model_flat`` (P) and each uploaded model give finite logits on ``idx``.

    A model with finite but huge weights (e.g. after strong unclipped parameter noise)
    can overflow in its forward pass; its measures would then be NaN. With ``uploads``
    (K×P) and the model ``sent`` (P) they were computed from, each uploaded model
    ``sent − uploads[k]`` is formed in place in ``state`` (no K×P temporary) and run
    too, before ``model_flat``. ``state`` is overwritten; it holds ``model_flat`` when
    the answer is True.
    """
    model = state.module
    was = model.training
    model.eval()
    x, _ = data.batch(idx)
    try:
        for upload in () if uploads is None else uploads:
            state.load(sent)
            state.flat.sub_(upload)
            if not bool(torch.isfinite(model(x)).all()):
                return False
        state.load(model_flat)
        return bool(torch.isfinite(model(x)).all())
    finally:
        model.train(was)


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` is finite (two reductions, no temporary of its size).

    NaN propagates through ``amin``/``amax``, and an infinity is the minimum or maximum.
    An empty tensor (a round without participants) is finite.
    """
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


@dataclass(frozen=True)
class RoundRecord:
    """Everything one round produced.

    ``global_flat`` and ``uploads`` (the server's view, what an observed round
    saves) are the model sent at the start of the round (P) and the m participants'
    uploads (m×P, in the order of ``participants``: every client, K×P, by default);
    both are buffers reused by the next round, so copy or save them before
    advancing the iterator. Test metrics are those of the aggregated model at the end of the round
    (NaN in rounds without a test).

    ``diverged`` marks the round in which a client's training loss, an upload or the
    aggregated model became non-finite, or the aggregated or an uploaded model gives
    non-finite logits on :data:`PROBE_SAMPLES` test samples: it is the last record
    :func:`run_fedavg` yields; its test metrics are NaN and ``last_finite_test`` holds the
    test loss and accuracy of the model the round started from (the last finite global
    model).

    ``participants`` are the clients that took part (sorted ids, possibly none: then the
    model stays as it was); ``client_loss``, ``client_accuracy``, ``num_samples`` and
    ``weights`` (the weights the server gave the uploads, :func:`aggregation_weights`,
    float32 values) are theirs, in that order: ``w_{r+1} = w_r − Σ_i weights[i] ·
    uploads[i]``.

    ``canary_round`` and ``canary_total`` (float32 n + m, only in a run with
    :class:`Canaries`): each canary's cosine with the round's model delta and with the total
    delta since the run's start (see :func:`run_fedavg`).
    """

    round: int
    participants: list[int]
    lr: float
    client_loss: list[float]
    client_accuracy: list[float]
    num_samples: list[int]
    weights: list[float]
    test_loss: float
    test_accuracy: float
    seconds: float
    samples_per_s: float
    global_flat: torch.Tensor
    uploads: torch.Tensor
    diverged: bool = False
    last_finite_test: tuple[float, float] = (float("nan"), float("nan"))
    canary_round: torch.Tensor | None = None
    canary_total: torch.Tensor | None = None


@dataclass(frozen=True)
class Canaries:
    """Canary clients of the one-shot privacy estimate (:mod:`fedmia.privacy.oneshot`).

    The ``n`` inserted canaries are clients ``K .. K+n−1`` beside the K real ones: the
    round's participants are drawn over all ``K + n`` clients (:func:`participants`, so a
    canary is sampled exactly like a client and the population, as the accountant counts
    it, is ``K + n``); the server weights a canary as its rule weights a client, with the
    data size of the (lower) median real client under ``data_size`` weights. A canary's
    update, before its defense, is its direction ``u_c`` on the trainable parameters (zero
    on the BatchNorm statistics) scaled to

    * the clip norm C of the defense when it clips (``dp``, or a ``compose`` with a ``dp``
      step: :func:`canary_clip`), so clipping leaves it as it is, or
    * without clipping, the median L2 norm of the round's real participants' updates
      before their defense (in a round without a real participant, that of the latest
      round with one; 0 before the first);

    then it goes through the defense's ``upload`` hook with the generator of client ``K +
    j`` (``dp``: clipped and noised exactly as any upload). The null canaries are never
    inserted.

    Attributes:
        directions: float32 (n + m)×d on the device: the n inserted canaries' unit
            directions, then the m null canaries', on the d trainable-parameter
            coordinates (the layout's order, :func:`fedmia.federation.defenses.param_mask`).
        inserted: n.
    """

    directions: torch.Tensor
    inserted: int


def canary_cosines(directions: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The cosine of each unit direction with ``delta`` (float32 n; NaN if ``delta`` is 0).

    Args:
        directions: float32 n×d, unit rows (:func:`fedmia.privacy.oneshot.canary_directions`).
        delta: float d, a model delta in the uploads' sign (e.g. ``w_r − w_{r+1}``) on the
            same coordinates: an inserted canary's cosine is positive in expectation.
    """
    norm = torch.linalg.vector_norm(delta)
    if float(norm) == 0.0:
        return torch.full((directions.shape[0],), math.nan, device=directions.device)
    return (directions @ delta.to(directions.dtype)) / norm.to(directions.dtype)


def canary_clip(defense: Defense) -> float | None:
    """The clip norm C a canary is scaled to: the smallest of the defense's ``dp`` steps'.

    ``None``: the defense does not clip (canaries take the round's median update norm).
    """
    steps = getattr(defense, "steps", (defense,))
    clips = [s.clip for s in steps if isinstance(s, DPDefense)]
    return min(clips) if clips else None


def canary_uploads(
    uploads: torch.Tensor,
    ids: Sequence[int],
    canaries: Canaries,
    scale: float,
    mask: torch.Tensor,
    state: FlatState,
    defense: Defense,
    seed: int,
    rnd: int,
    num_clients: int,
) -> None:
    """Write the uploads of canary clients ``ids`` (≥ K) into the rows of ``uploads``.

    Args:
        uploads: float32 len(ids)×P, overwritten.
        ids: the canaries' client ids (``K + j`` for inserted canary j).
        canaries: their directions.
        scale: the L2 norm of a canary's update before the defense.
        mask: bool P, the trainable parameters (d of them).
        state: the model's flat state (its layout).
        defense: applied to each canary's update as to a client's.
        seed: the run's seed.
        rnd: the round.
        num_clients: K, the number of real clients.
    """
    for row, c in zip(uploads, ids, strict=True):
        row.zero_()
        row.masked_scatter_(mask, canaries.directions[c - num_clients] * scale)
        up = defense.upload(row, state.layout, client_generator(seed, rnd, c))
        if up is not row:
            row.copy_(up)


def run_fedavg(
    state: FlatState,
    data: DeviceData,
    client_idx: Sequence[torch.Tensor],
    test_idx: torch.Tensor,
    cfg: TrainConfig,
    defense: Defense,
    seed: int,
    start_round: int = 1,
    canaries: Canaries | None = None,
) -> Iterator[RoundRecord]:
    """Run ``cfg.rounds`` FedAvg rounds, yielding one :class:`RoundRecord` per round.

    ``state`` holds the global model round ``start_round`` starts from (the initial
    model, or a checkpoint's for a resumed run: a round depends only on it and on
    ``(seed, round, client)``) and, when the iterator is exhausted, the final one.
    Training stops early at the first round whose client losses, uploads or aggregated
    model are not all finite, or whose aggregated model — or, in an observed round (the
    rounds the measures read), an uploaded model — gives non-finite logits on
    :data:`PROBE_SAMPLES` test samples; that round's record has ``diverged`` set (and
    ``state`` holds the non-finite model).

    Only the round's participants (:func:`participants`, ``cfg.participation``) train
    and upload. The server weights their uploads as :func:`aggregation_rule` says:
    ``cfg.aggregation``, or equal weights under a defense with
    ``data_independent_weights`` (``dp``; with the fixed denominator ``qK`` under
    Poisson sampling, :func:`equal_denominator`).

    ``canaries`` (default ``None``: none, the run is the same to the byte) adds canary
    clients (:class:`Canaries`): the participants are then drawn over ``K + n`` clients
    (ids ``≥ K`` are canaries, with NaN training loss and accuracy and 0 samples in the
    record), and each record carries ``canary_round`` and ``canary_total``: float32 (n +
    m), the cosine of every canary (inserted, then null) with the round's model delta
    ``w_r − w_{r+1}`` and with the total delta ``w_{start} − w_{r+1}``
    (:func:`canary_cosines`; the uploads' sign, positive for an
    inserted canary) on the trainable parameters.
    """
    device = state.flat.device
    k = len(client_idx)
    probe = test_idx[:PROBE_SAMPLES]
    num_samples = torch.tensor([i.numel() for i in client_idx], dtype=torch.int64)
    rule = aggregation_rule(cfg, defense)
    observed = set(cfg.observed())
    global_flat = state.snapshot()
    spare = torch.empty_like(global_flat)  # the next global model (the two swap each round)
    n_can = 0 if canaries is None else canaries.inserted
    clip: float | None = None
    if canaries is not None:
        mask = param_mask(state.layout, device)
        if canaries.directions.shape[1] != int(mask.sum()):
            raise ValueError(
                f"the canaries have {canaries.directions.shape[1]} coordinates but the model "
                f"has {int(mask.sum())} trainable parameters; draw them for this model"
            )
        clip = canary_clip(defense)
        median_size = int(num_samples.median())  # the lower median
        num_samples = torch.cat([num_samples, torch.full((n_can,), median_size)])
        start_params = global_flat[mask]  # d (a copy)
        median_norm = 0.0
    buffer = torch.empty(k + n_can, global_flat.numel(), dtype=torch.float32, device=device)
    for rnd in range(start_round, cfg.rounds + 1):
        t0 = time.perf_counter()
        lr = cfg.lr_at(rnd)
        part = participants(cfg.participation, seed, rnd, k + n_can)
        uploads = buffer[: len(part)]
        real = part[part < k]
        results = []
        for i, c in enumerate(real.tolist()):
            results.append(
                local_train(
                    state,
                    global_flat,
                    data,
                    client_idx[c],
                    cfg,
                    lr,
                    defense,
                    client_generator(seed, rnd, c),
                    out=uploads[i],
                    update_norm=canaries is not None and clip is None,
                )
            )
        if canaries is not None and clip is None and results:
            median_norm = float(np.median([r.update_norm for r in results]))
        if canaries is not None and len(real) < len(part):
            scale = median_norm if clip is None else clip
            ids = part[len(real) :].tolist()
            canary_uploads(
                uploads[len(real) :], ids, canaries, scale, mask, state, defense, seed, rnd, k
            )
        sizes = num_samples[torch.from_numpy(part)]
        weights = aggregation_weights(
            sizes.to(device),
            rule,
            seed,
            rnd,
            equal_denominator(cfg.participation, k + n_can, len(part)),
        )
        sent, global_flat = global_flat, aggregate(global_flat, uploads, weights, out=spare)
        spare = sent  # yielded below; the next round's aggregate overwrites it
        cos_round = cos_total = None
        if canaries is not None:
            cos_round = canary_cosines(canaries.directions, (sent - global_flat)[mask])
            cos_total = canary_cosines(canaries.directions, start_params - global_flat[mask])
        # the uploads' forward passes only where they are measured (observed rounds); the
        # aggregate every round (an overflowing global model is caught where it appears).
        # Finite: ``state`` holds the aggregate.
        finite = (
            all(math.isfinite(r.loss) for r in results)
            and all_finite(uploads)
            and all_finite(global_flat)
            and outputs_finite(
                state, data, probe, global_flat, sent, uploads if rnd in observed else None
            )
        )
        test_loss = test_acc = float("nan")
        last_finite = (float("nan"), float("nan"))
        if not finite:
            state.load(sent)
            last_finite = evaluate(state.module, data, test_idx, cfg.eval_batch_size)
            state.load(global_flat)
        if finite and (rnd % cfg.test_every == 0 or rnd == cfg.rounds):
            test_loss, test_acc = evaluate(state.module, data, test_idx, cfg.eval_batch_size)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        samples = sum(r.samples for r in results)
        no_training = [math.nan] * (len(part) - len(real))  # the canaries'
        yield RoundRecord(
            round=rnd,
            participants=part.tolist(),
            lr=lr,
            client_loss=[r.loss for r in results] + no_training,
            client_accuracy=[r.accuracy for r in results] + no_training,
            num_samples=sizes.tolist(),
            weights=weights.tolist(),
            test_loss=test_loss,
            test_accuracy=test_acc,
            seconds=seconds,
            samples_per_s=samples / seconds,
            global_flat=sent,
            uploads=uploads,
            diverged=not finite,
            last_finite_test=last_finite,
            canary_round=cos_round,
            canary_total=cos_total,
        )
        if not finite:
            return
