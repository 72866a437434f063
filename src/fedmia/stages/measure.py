"""Stage 4, ``measure``: membership disclosure measures of a cell's evaluation samples."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from fedmia.attacker.measures import compute_round_measures
from fedmia.attacker.routes import MEASURE_ROUTES
from fedmia.core import contracts
from fedmia.core.config import MeasureConfig
from fedmia.core.contracts import MEASURE_DTYPES
from fedmia.core.registry import import_plugins
from fedmia.federation.fedavg import DeviceData
from fedmia.federation.models import build_model
from fedmia.federation.state import FlatState, StateLayout
from fedmia.stages import io
from fedmia.stages.compute import setup_compute
from fedmia.stages.io import available_rounds

log = logging.getLogger(__name__)


def measure(
    *,
    data: Mapping[str, str | Path],
    partition_file: str | Path,
    observed_dir: str | Path,
    rounds: Iterable[int],
    manifest_file: str | Path | None = None,
    device: str = "auto",
    threads: int | None = None,
    deterministic: bool = False,
    config: Mapping[str, Any] | None = None,
    plugins: Sequence[str] = (),
    output: str | Path,
) -> None:
    """Stage 4: membership disclosure measures of the evaluation samples at observed rounds.

    Args:
        data: files of the prepared dataset.
        partition_file: the partition Parquet (its ``eval`` samples are measured).
        observed_dir: the ``observed/`` folder of a recorded server view (the train
            stage's, or an imported recording's): each round's uploads carry their
            clients' ids.
        rounds: the observed rounds to measure (each must have its file).
        manifest_file: the train stage's manifest: a cell that diverged saved only the
            rounds before divergence, and only those are measured (none: an empty table).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        threads: CPU threads for torch.
        deterministic: deterministic CUDA algorithms (:func:`fedmia.stages.compute.setup_compute`).
        config: the ``measure`` section (:class:`fedmia.core.config.MeasureConfig`: the
            route, the chunk size bounding memory, the forward batch size); ``None``: its
            defaults.
        plugins: the config's ``plugins``, imported first (they register kinds).
        output: the measure Parquet (:data:`fedmia.core.contracts.MEASURE_DTYPES`:
            ``round, client_id, sample_id, loss, logit_conf, cos, grad_diff, grad_norm,
            correct, confidence``), one row per (round, participant, evaluation sample):
            a client is measured in the rounds it took part in only.
    """
    import_plugins(plugins)
    cfg = MeasureConfig.from_dict(config or {}, where="measure")
    grad_products = MEASURE_ROUTES.get(cfg.route)
    dev = setup_compute(device, threads, deterministic)
    rounds = available_rounds(rounds, manifest_file)
    if not rounds:
        log.warning(
            "no observed round to measure (training diverged before the first); "
            "writing an empty measure table"
        )
        io.write_parquet(_empty_measures(), output, "measures")
        return
    files = [io.round_file(observed_dir, r) for r in rounds]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(
            f"observed round file(s) missing: {missing}; rerun the train "
            "stage with these rounds observed"
        )
    arrays, meta = io.load_prepared(data)
    part = io.read_parquet(partition_file, "partition")
    if len(part) != len(arrays["labels"]):
        raise ValueError(
            f"{partition_file} has {len(part)} rows but the dataset has "
            f"{len(arrays['labels'])} samples; rerun the partition stage"
        )
    # the evaluation set, plus an audit's canaries
    measured = part["eval"] | part["canary"] if "canary" in part else part["eval"]
    eval_ids = np.sort(part.loc[measured, "sample_id"].to_numpy())
    ddata = DeviceData.from_arrays(
        arrays["images"], arrays["labels"], meta["mean"], meta["std"], meta["num_classes"], dev
    )
    x, y = ddata.batch(torch.from_numpy(eval_ids).to(dev))
    frames = []
    state = None
    for rnd, f in zip(rounds, files, strict=True):
        t0 = time.perf_counter()
        obs = io.load_observed(f)
        if obs["uploads"].shape[0] == 0:  # partial participation: nobody took part
            log.info("round %d: no participant, nothing to measure", rnd)
            continue
        if state is None:
            m = obs["model"]
            state = FlatState(
                build_model(m["kind"], m["num_classes"], m["in_channels"], seed=0).to(dev)
            )
        if StateLayout.from_list(obs["layout"]) != state.layout:
            raise contracts.FormatError(
                f"{f}: its model layout differs from the first observed round's (files of "
                "another architecture mixed in one cell); delete the cell's observed rounds "
                "and rerun training (snakemake --forcerun train)"
            )
        res = compute_round_measures(
            state,
            obs["global_state"].to(dev),
            obs["uploads"].to(dev),
            x,
            y,
            chunk_size=cfg.chunk_size,
            batch_size=cfg.batch_size,
            grad_products=grad_products,
        )
        k, n = res.loss.shape
        columns = {
            "round": np.full(k * n, rnd),
            "client_id": np.repeat(obs["client_ids"].numpy(), n),  # the uploads' rows
            "sample_id": np.tile(eval_ids, k),
            "loss": res.loss.reshape(-1).numpy(),
            "logit_conf": res.logit_conf.reshape(-1).numpy(),
            "cos": res.cos.reshape(-1).numpy(),
            "grad_diff": res.grad_diff.reshape(-1).numpy(),
            "grad_norm": np.tile(res.grad_norm.numpy(), k),
            "correct": res.correct.reshape(-1).numpy(),
            "confidence": res.confidence.reshape(-1).numpy(),
        }
        frames.append(pd.DataFrame({c: columns[c] for c in MEASURE_DTYPES}).astype(MEASURE_DTYPES))
        dt = time.perf_counter() - t0
        log.info(
            "round %d: measures of %d samples × %d clients in %.1fs (%.0f samples/s)",
            rnd,
            n,
            k,
            dt,
            n / dt,
        )
    io.write_parquet(
        pd.concat(frames, ignore_index=True) if frames else _empty_measures(), output, "measures"
    )


def _empty_measures() -> pd.DataFrame:
    """A measure table without rows (no round to measure, or none with a participant)."""
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in MEASURE_DTYPES.items()})
