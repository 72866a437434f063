"""Stage ``oneshot``: a cell trained again with canary clients, and its one-shot ε estimate.

The one-shot empirical privacy estimate of Andrew et al. (ICLR 2024,
:mod:`fedmia.privacy.oneshot`): the cell's training — the same config, seed, data and
partition — with ``privacy.one_shot.canaries`` canary clients beside the K real ones
(:class:`fedmia.federation.fedavg.Canaries`), written to ``results/oneshot/{cell}.json``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedmia.core.config import (
    DefenseConfig,
    ModelConfig,
    OneShotConfig,
    Participation,
    TrainConfig,
)
from fedmia.core.contracts import CELL_KEYS
from fedmia.core.registry import import_plugins
from fedmia.federation.defenses import build_defense, param_mask
from fedmia.federation.fedavg import Canaries, DeviceData, canary_clip, run_fedavg
from fedmia.federation.state import FlatState
from fedmia.privacy import oneshot as est
from fedmia.privacy.events import cell_privacy
from fedmia.stages import io
from fedmia.stages.compute import setup_compute
from fedmia.stages.train import load_federation

log = logging.getLogger(__name__)


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (valid JSON)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def canary_run(
    state: FlatState,
    data: DeviceData,
    client_idx: Sequence[torch.Tensor],
    test_idx: torch.Tensor,
    train_cfg: TrainConfig,
    defense: Any,
    seed: int,
    one_shot: OneShotConfig,
    delta: float,
) -> dict[str, Any]:
    """Train with canaries and estimate ε: the result's statistics (a JSON-ready dict).

    ``state`` holds the initial model (overwritten: it ends with the final one). Returns
    the keys ``canaries``, ``null_canaries``, ``dim``, ``delta``, ``final``,
    ``all_iterates`` (:func:`fedmia.privacy.oneshot.estimate_final`,
    :func:`~fedmia.privacy.oneshot.estimate_all_iterates`; ``None`` when training
    diverged), ``test_accuracy_with_canaries``, ``diverged_round``, ``canary_scale``,
    ``client_rounds`` (rounds each of the K + n clients took part in), ``rounds``.

    Raises:
        ValueError: fewer than :data:`~fedmia.privacy.oneshot.MIN_DIM` trainable parameters.
    """
    n, m = one_shot.canaries, one_shot.null_canaries
    k = len(client_idx)
    dim = int(param_mask(state.layout, state.flat.device).sum())
    if dim < est.MIN_DIM:
        raise ValueError(
            f"the one-shot estimate needs d ≥ {est.MIN_DIM} trainable parameters (the final "
            f"model's null N(0, 1/d)); this model has {dim}: use a larger model or set "
            "privacy.one_shot.canaries: 0"
        )
    directions = torch.cat(
        [
            est.canary_directions(n, dim, seed, est.INSERTED),
            est.canary_directions(m, dim, seed, est.NULL),
        ]
    )
    canaries = Canaries(directions.to(state.flat.device), inserted=n)
    clip = canary_clip(defense)
    log.info(
        "one-shot estimate: %d canaries (+%d null) beside %d clients, d = %d, canary "
        "updates of norm %s, %d rounds",
        n,
        m,
        k,
        dim,
        f"C = {clip:g} (the defense's clip)" if clip else "the round's median update norm",
        train_cfg.rounds,
    )
    per_round, total, accuracy, diverged = [], None, math.nan, None
    client_rounds = np.zeros(k + n, dtype=int)
    t0 = time.perf_counter()
    rounds = run_fedavg(
        state, data, client_idx, test_idx, train_cfg, defense, seed, canaries=canaries
    )
    for rec in rounds:
        client_rounds[rec.participants] += 1
        if rec.diverged:
            diverged = rec.round
            log.warning("round %d: training with canaries diverged; no estimate", rec.round)
            break
        per_round.append(rec.canary_round.cpu().numpy())
        total = rec.canary_total.cpu().numpy()
        if math.isfinite(rec.test_accuracy):
            accuracy = rec.test_accuracy
        log.info(
            "round %d/%d: %d canaries took part | test acc %.3f | canaries' mean cos %.4f "
            "(null %.4f) | %.1fs",
            rec.round,
            train_cfg.rounds,
            sum(c >= k for c in rec.participants),
            rec.test_accuracy,
            float(np.nanmean(total[:n])),
            float(np.nanmean(total[n:])) if m else math.nan,
            rec.seconds,
        )
    log.info("trained with canaries in %.1fs", time.perf_counter() - t0)
    final = iterates = None
    if diverged is None:
        final = est.estimate_final(total[:n], dim, delta)
        maxima = est.max_over_rounds(np.stack(per_round))
        iterates = est.estimate_all_iterates(maxima[:n], maxima[n:], delta)
        log.info(
            "one-shot ε at δ = %g (%s): final model %.3f, all iterates %.3f",
            delta,
            est.ESTIMATE,
            final["epsilon"],
            iterates["epsilon"],
        )
    return {
        "canaries": n,
        "null_canaries": m,
        "dim": dim,
        "delta": delta,
        "final": final,
        "all_iterates": iterates,
        "test_accuracy_with_canaries": accuracy,
        "diverged_round": diverged,
        "rounds": train_cfg.rounds,
        "canary_scale": "clip" if clip else "median_update_norm",
        "client_rounds": client_rounds.tolist(),
    }


def oneshot(
    *,
    data: Mapping[str, str | Path],
    partition_file: str | Path,
    manifest_file: str | Path,
    model: Mapping[str, Any],
    defense: Mapping[str, Any],
    train_cfg: Mapping[str, Any],
    cell: Mapping[str, Any],
    one_shot: Mapping[str, Any],
    delta: float,
    device: str = "auto",
    threads: int | None = None,
    deterministic: bool = False,
    plugins: Sequence[str] = (),
    output: str | Path,
) -> None:
    """Train a cell again with canary clients and write its one-shot estimate (JSON).

    Args:
        data: files of the prepared dataset (``images``, ``labels``, ``is_test``, ``meta``).
        partition_file: the cell's partition Parquet.
        manifest_file: the cell's train manifest (its own test accuracy, "without").
        model: the model's config block.
        defense: the defense's config block.
        train_cfg: the cell's resolved training config.
        cell: ``dataset, model, defense, partition, seed``.
        one_shot: ``privacy.one_shot`` (:class:`fedmia.core.config.OneShotConfig`).
        delta: δ of the estimate (``privacy.delta``).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        threads: CPU threads for torch (``None``: torch's default).
        deterministic: deterministic CUDA algorithms.
        plugins: the config's ``plugins``, imported first.
        output: the result, written atomically: ``{"format": "oneshot/1", "canaries",
            "null_canaries", "dim", "delta", "final": {"mean", "std", "null_std",
            "epsilon"}, "all_iterates": {"mean", "std", "null_mean", "null_std",
            "epsilon"}, "test_accuracy_with_canaries", "test_accuracy_without", "estimate",
            "applies_to"}`` plus the cell's keys, ``num_clients`` (K), ``participation``,
            ``rounds``, ``diverged_round``, ``canary_scale`` (``clip`` or
            ``median_update_norm``), ``privacy`` (the guarantee record of the run with
            canaries, :func:`fedmia.privacy.events.cell_privacy`, over K + n clients: the
            accountant counts them) and ``seconds``. Non-finite numbers are ``null``.
    """
    import_plugins(plugins)
    t0 = time.perf_counter()
    ocfg = OneShotConfig.from_dict(one_shot)
    if not ocfg.enabled:
        raise ValueError("privacy.one_shot.canaries is 0: there is no one-shot estimate to make")
    mcfg = ModelConfig.from_dict(model)
    tcfg = TrainConfig.from_dict(train_cfg)
    defense_obj = build_defense(DefenseConfig.from_dict(defense))
    without = io.read_manifest(manifest_file)["final_test_accuracy"]
    dev = setup_compute(device, threads, deterministic)
    seed = int(cell["seed"])
    fed = load_federation(data, partition_file, mcfg.kind, seed, dev)
    ddata, client_idx, test_idx, state = fed.data, fed.client_idx, fed.test_idx, fed.state
    k = len(client_idx)
    stats = canary_run(
        state, ddata, client_idx, test_idx, tcfg, defense_obj, seed, ocfg, float(delta)
    )
    client_rounds = stats.pop("client_rounds")
    participation: Participation = tcfg.participation
    unnoised = any(not e.is_param for e in state.layout.entries)
    privacy = cell_privacy(
        defense_obj.privacy(),
        unnoised_state=unnoised,
        rounds=stats["diverged_round"] or tcfg.rounds,
        participation={
            **participation.to_dict(),
            "num_clients": k + ocfg.canaries,
            "client_rounds": client_rounds,
        },
    )
    result = {
        "format": est.ONESHOT_FORMAT,
        **{key: cell[key] for key in CELL_KEYS},
        **stats,
        "test_accuracy_without": without,
        "num_clients": k,
        "participation": participation.to_dict(),
        "privacy": privacy,
        "estimate": est.ESTIMATE,
        "applies_to": est.APPLIES_TO,
        "seconds": time.perf_counter() - t0,
    }
    io.write_json(_finite(result), output)
