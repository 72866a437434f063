"""Stage 3, ``train``: FedAvg for one cell, its history, manifest and the server's view."""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

import fedmia
from fedmia import io
from fedmia.compute import setup_compute
from fedmia.config import DefenseConfig, ModelConfig, TrainConfig
from fedmia.defenses import build_defense
from fedmia.fedavg import DeviceData, RoundRecord, run_fedavg
from fedmia.io import CELL_KEYS, HISTORY_COLUMNS
from fedmia.models import build_model, count_parameters
from fedmia.partition import HELD_OUT
from fedmia.state import FlatState

log = logging.getLogger(__name__)


def _history_rows(rec: RoundRecord) -> list[dict[str, Any]]:
    rows = []
    for c, (loss, acc, n) in enumerate(zip(rec.client_loss, rec.client_accuracy,
                                           rec.num_samples, strict=True)):
        rows.append(dict(round=rec.round, client_id=c, lr=rec.lr, num_samples=n, train_loss=loss,
                         train_accuracy=acc, test_loss=np.nan, test_accuracy=np.nan))
    w = np.asarray(rec.num_samples, dtype=np.float64)
    rows.append(dict(
        round=rec.round, client_id=HELD_OUT, lr=rec.lr, num_samples=int(w.sum()),
        train_loss=float(np.dot(w, rec.client_loss) / w.sum()),
        train_accuracy=float(np.dot(w, rec.client_accuracy) / w.sum()),
        test_loss=rec.test_loss, test_accuracy=rec.test_accuracy,
    ))
    return rows


def train(
    *,
    data: Mapping[str, str | Path],
    partition_file: str | Path,
    model: Mapping[str, Any],
    defense: Mapping[str, Any],
    train_cfg: Mapping[str, Any],
    cell: Mapping[str, Any],
    device: str = "auto",
    threads: int | None = None,
    outputs: Mapping[str, str | Path],
) -> None:
    """Stage 3: run FedAvg for one cell and save its history and the server's view.

    Args:
        data: files of the prepared dataset (``images``, ``labels``, ``is_test``, ``meta``).
        partition_file: the partition Parquet.
        model: the model's config block.
        defense: the defense's config block.
        train_cfg: the cell's resolved training config.
        cell: ``dataset, model, defense, partition, seed`` (keys written into the history;
            the seed drives model initialisation, data order and defense noise).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        threads: CPU threads for torch (``None``: torch's default).
        outputs: ``history`` (Parquet), ``final`` (final global model, ``.pt``),
            ``observed`` (folder: one ``roundNNNN.pt`` per observed round) and ``manifest``
            (JSON: the cell, the planned and the saved observed rounds, and the outcome —
            ``diverged_round`` (null if training finished), ``last_finite_round``,
            ``last_finite_test_accuracy``, and ``final_test_accuracy``, the utility the
            tables use: the final model's, or chance (1 / classes) for a diverged cell,
            whose final model has non-finite weights).

    A run whose loss, uploads or model become non-finite stops there and still writes
    every output (see :func:`fedmia.fedavg.run_fedavg`): a diverged cell is a result.
    """
    mcfg = ModelConfig.from_dict(model)
    dcfg = DefenseConfig.from_dict(defense)
    tcfg = TrainConfig.from_dict(train_cfg)
    dev = setup_compute(device, threads)
    seed = int(cell["seed"])
    arrays, meta = io.load_prepared(data)
    part = pd.read_parquet(partition_file)
    if len(part) != len(arrays["labels"]):
        raise ValueError(f"{partition_file} has {len(part)} rows but the dataset has "
                         f"{len(arrays['labels'])} samples; rerun the partition stage")
    ddata = DeviceData.from_arrays(arrays["images"], arrays["labels"], meta["mean"], meta["std"],
                                   meta["num_classes"], dev)
    client_ids = part["client_id"].to_numpy()
    k = int(client_ids.max()) + 1
    client_idx = [torch.from_numpy(np.flatnonzero(client_ids == c)).to(dev) for c in range(k)]
    test_idx = torch.from_numpy(np.flatnonzero(part["is_test"].to_numpy())).to(dev)

    net = build_model(mcfg.kind, meta["num_classes"], meta["shape"][0], seed=seed).to(dev)
    state = FlatState(net)
    defense_obj = build_defense(dcfg)
    observed = set(tcfg.observed())
    obs_dir = Path(outputs["observed"])
    obs_dir.mkdir(parents=True, exist_ok=True)
    log.info("FedAvg: %s (%d parameters) on %s, %d clients (sizes %s), %d rounds, "
             "defense %s, device %s, observed rounds %s", mcfg.kind, count_parameters(net),
             meta["kind"], k, [int(i.numel()) for i in client_idx], tcfg.rounds, dcfg.kind,
             dev, sorted(observed))
    static = dict(layout=state.layout.to_list(), defense=dict(defense),
                  model=dict(kind=mcfg.kind, num_classes=meta["num_classes"],
                             in_channels=meta["shape"][0]),
                  fedmia_version=fedmia.__version__)

    def save_round(rec: RoundRecord) -> None:
        io.save_torch(dict(static, round=rec.round, lr=rec.lr, global_state=rec.global_flat,
                           uploads=rec.uploads, num_samples=torch.tensor(rec.num_samples)),
                      io.round_file(obs_dir, rec.round))

    try:
        rounds = run_fedavg(state, ddata, client_idx, test_idx, tcfg, defense_obj, seed)
        history, outcome = _log_history(rounds, tcfg.rounds, observed, save_round, cell)
    except BaseException:
        shutil.rmtree(obs_dir, ignore_errors=True)  # no partial output survives a failure
        raise
    saved = sorted(r for r in observed if outcome["diverged_round"] is None
                   or r < outcome["diverged_round"])
    final_accuracy = (1.0 / meta["num_classes"] if outcome["diverged_round"] is not None
                      else outcome["last_finite_test_accuracy"])
    manifest = {
        **{k: cell[k] for k in CELL_KEYS},
        "rounds": tcfg.rounds, "planned_observed_rounds": sorted(observed),
        "observed_rounds": saved, "num_classes": meta["num_classes"],
        **outcome, "final_test_accuracy": final_accuracy,
        "fedmia_version": fedmia.__version__,
    }
    io.save_torch(dict(static, global_state=state.flat, rounds=tcfg.rounds,
                       diverged_round=outcome["diverged_round"]), outputs["final"])
    io.write_parquet(history, outputs["history"])
    io.write_json(manifest, outputs["manifest"])


def _log_history(rounds: Iterable[RoundRecord], total: int, observed: set[int],
                 save_round: Callable[[RoundRecord], None], cell: Mapping[str, Any]
                 ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Consume the rounds: save observed ones, log progress, return the history table.

    Also returns the outcome: ``diverged_round`` (``None`` if training finished),
    ``last_finite_round`` and ``last_finite_test_accuracy`` (of the last finite global
    model; for a finished run, the final model's last test).
    """
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    keys = {k: cell[k] for k in CELL_KEYS}
    outcome: dict[str, Any] = {"diverged_round": None, "last_finite_round": total,
                               "last_finite_test_accuracy": math.nan}
    for rec in rounds:
        rows.extend({**keys, **row} for row in _history_rows(rec))
        if rec.diverged:
            outcome = {"diverged_round": rec.round, "last_finite_round": rec.round - 1,
                       "last_finite_test_accuracy": rec.last_finite_test[1]}
            log.warning("round %d/%d: training diverged (non-finite loss, upload or model): "
                        "the cell is kept as a result, flagged diverged; observed rounds "
                        "before round %d are saved, utility is chance; the last finite "
                        "global model had test accuracy %.3f", rec.round, total, rec.round,
                        rec.last_finite_test[1])
            break
        if rec.round in observed:
            save_round(rec)
        if math.isfinite(rec.test_accuracy):
            outcome["last_finite_test_accuracy"] = rec.test_accuracy
        glob = rows[-1]
        log.info("round %d/%d lr %.4f train loss %.4f acc %.3f | test loss %.4f acc %.3f | "
                 "%.1fs, %.0f samples/s%s", rec.round, total, rec.lr, glob["train_loss"],
                 glob["train_accuracy"], rec.test_loss, rec.test_accuracy, rec.seconds,
                 rec.samples_per_s, " [observed]" if rec.round in observed else "")
    log.info("trained %d rounds in %.1fs", outcome["last_finite_round"],
             time.perf_counter() - t_start)
    history = pd.DataFrame(rows, columns=HISTORY_COLUMNS).astype(
        {"seed": "int64", "round": "int32", "client_id": "int32", "num_samples": "int64"})
    return history, outcome
