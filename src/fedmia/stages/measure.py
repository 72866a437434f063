"""Stage 4, ``measure``: membership disclosure measures of a cell's evaluation samples.

Under the ``aggregate`` threat view (``threat.view``) it also measures, per observed round
with a participant, the aggregate ``A_r = Σ_k a_k Δ_k`` of the participants' uploads the
server applied (:class:`ServerWeights`: the weights ``a_k`` the cell's manifest names),
as one more "upload" beside the round's K: ``g_i`` is computed once for all K + 1.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from fedmia.attacker.measures import RoundMeasures, compute_round_measures
from fedmia.attacker.routes import MEASURE_ROUTES
from fedmia.core import contracts
from fedmia.core.config import MeasureConfig, Participation
from fedmia.core.contracts import AGGREGATE_CLIENT, MEASURE_DTYPES
from fedmia.core.registry import import_plugins
from fedmia.federation.fedavg import (
    AGGREGATION_WEIGHTS,
    DeviceData,
    aggregation_weights,
    equal_denominator,
)
from fedmia.federation.models import build_model
from fedmia.federation.state import FlatState, StateLayout
from fedmia.stages import io
from fedmia.stages.compute import setup_compute
from fedmia.stages.io import available_rounds

log = logging.getLogger(__name__)

#: The weights of an imported recording's server, whose manifest names them ``recorded``
#: (a recorded view holds the participants' data sizes, not the weights the server used):
#: their data shares ``n_k / n``, the weights of Flower's ``FedAvg`` (its replies'
#: ``num-examples``, :class:`fedmia.flower.ViewRecorder`).
RECORDED_WEIGHTS = "data_size"


@dataclass(frozen=True)
class ServerWeights:
    """The weights the server of a cell gave a round's uploads: ``w_{r+1} = w_r − Σ_k a_k Δ_k``.

    Attributes:
        rule: one of :data:`~fedmia.federation.fedavg.AGGREGATION_WEIGHTS` (``equal``,
            ``data_size``, ``official_permuted``).
        seed: the cell's seed (the order of ``official_permuted``).
        participation: how the participants were drawn (the denominator of ``equal``
            weights under ``poisson`` sampling,
            :func:`~fedmia.federation.fedavg.equal_denominator`).
        num_clients: K, the clients of the federation.
    """

    rule: str
    seed: int
    participation: Participation
    num_clients: int

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any], where: str | Path) -> ServerWeights:
        """The weights the manifest of a cell names (the train stage's or the import's).

        The train stage records its rule (``aggregation_weights``,
        :func:`~fedmia.federation.fedavg.aggregation_rule`) and the draw of the
        participants (``participation``; none in a manifest of before: every client); an
        imported recording's manifest says ``recorded``: :data:`RECORDED_WEIGHTS`.

        Raises:
            contracts.FormatError: the manifest names no known rule.
        """
        rule = manifest.get("aggregation_weights")
        if rule == "recorded":
            rule = RECORDED_WEIGHTS
        if rule not in AGGREGATION_WEIGHTS:
            raise contracts.FormatError(
                f"{where}: its aggregation_weights is {rule!r}, not one of "
                f"{[*AGGREGATION_WEIGHTS, 'recorded']}: the aggregate view needs the weights "
                "the server used; rerun the train stage (snakemake --forcerun train)"
            )
        drawn = manifest.get("participation") or {"fraction": 1.0, "sampling": "uniform"}
        return cls(
            rule=rule,
            seed=int(manifest["seed"]),
            participation=Participation(
                fraction=float(drawn["fraction"]), sampling=str(drawn["sampling"])
            ),
            num_clients=int(manifest["view"]["num_clients"]),
        )

    def weights(self, rnd: int, num_samples: torch.Tensor) -> torch.Tensor:
        """The weights ``a_k`` (float32 m) of round ``rnd``'s m participants.

        ``num_samples``: int64 m, their data sizes in client-id order, as an observed round
        holds them. :func:`~fedmia.federation.fedavg.aggregation_weights` as the training
        ran it: the same floats.
        """
        m = num_samples.numel()
        d = equal_denominator(self.participation, self.num_clients, m)
        return aggregation_weights(num_samples, self.rule, self.seed, rnd, d)


def aggregate_update(
    uploads: torch.Tensor, weights: torch.Tensor, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The aggregate ``A_r = Σ_k a_k Δ_k`` (float32 P) of the uploads (K×P), weights ``a_k`` (K).

    Formed as the server's step forms it (:func:`fedmia.federation.fedavg.aggregate`:
    ``w_{r+1} = w_r − A_r``, the same floats); ``out``: float32 P, where to write it.
    """
    weights = weights.to(device=uploads.device, dtype=uploads.dtype)
    if out is None:
        return (weights[None] @ uploads)[0]
    torch.mm(weights[None], uploads, out=out[None])
    return out


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
    aggregate_output: str | Path | None = None,
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
        aggregate_output: the aggregate view's measure Parquet (same columns and format),
            one row per (round with a participant, evaluation sample), ``client_id``
            :data:`~fedmia.core.contracts.AGGREGATE_CLIENT`: the measures of the round's
            aggregate ``A_r`` (:func:`aggregate_update`, with the weights of
            :meth:`ServerWeights.from_manifest`: it needs ``manifest_file``) as if it were
            one upload. ``None``: not written, and ``output`` is the table of a run without
            it, byte for byte; with it, ``output`` holds the same rows, their values equal
            up to float32 rounding (the norms of K + 1 rows instead of K: a cosine may move
            by an ulp). Both tables are computed before either is written.
    """
    import_plugins(plugins)
    cfg = MeasureConfig.from_dict(config or {}, where="measure")
    grad_products = MEASURE_ROUTES.get(cfg.route)
    dev = setup_compute(device, threads, deterministic)
    server = None
    if aggregate_output is not None:
        if manifest_file is None:
            raise ValueError(
                "the aggregate's measures need the cell's manifest (the weights its server "
                "used): pass manifest_file, the train or import stage's manifest.json"
            )
        server = ServerWeights.from_manifest(io.read_manifest(manifest_file), manifest_file)
        log.info(
            "aggregate view: each round's aggregate with %s weights is measured too", server.rule
        )
    rounds = available_rounds(rounds, manifest_file)
    if not rounds:
        log.warning(
            "no observed round to measure (training diverged before the first); "
            "writing an empty measure table"
        )
        _write_tables([], [], output, aggregate_output)
        return
    files = [io.round_file(observed_dir, r) for r in rounds]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(
            f"observed round file(s) missing: {missing}; rerun the train "
            "stage with these rounds observed"
        )
    arrays, meta, part = io.load_cell_data(data, partition_file)
    # the evaluation set, plus an audit's canaries
    measured = part["eval"] | part["canary"] if "canary" in part else part["eval"]
    eval_ids = np.sort(part.loc[measured, "sample_id"].to_numpy())
    ddata = DeviceData.from_arrays(
        arrays["images"], arrays["labels"], meta["mean"], meta["std"], meta["num_classes"], dev
    )
    x, y = ddata.batch(torch.from_numpy(eval_ids).to(dev))
    frames, aggregates = [], []
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
        clients = obs["client_ids"].numpy()
        if server is None:
            uploads = obs["uploads"].to(dev)
        else:  # the K uploads, then their aggregate: one more row of the same pass
            k = len(clients)
            uploads = torch.empty(k + 1, obs["uploads"].shape[1], device=dev)
            uploads[:k].copy_(obs["uploads"])
            weights = server.weights(rnd, obs["num_samples"]).to(dev)
            aggregate_update(uploads[:k], weights, out=uploads[k])
            clients = np.append(clients, AGGREGATE_CLIENT)
        res = compute_round_measures(
            state,
            obs["global_state"].to(dev),
            uploads,
            x,
            y,
            chunk_size=cfg.chunk_size,
            batch_size=cfg.batch_size,
            grad_products=grad_products,
        )
        table = _measure_table(rnd, clients, eval_ids, res)
        if server is not None:  # the aggregate's rows are the last n
            n = len(eval_ids)
            aggregates.append(table.iloc[-n:].reset_index(drop=True))
            table = table.iloc[:-n]
        frames.append(table)
        dt = time.perf_counter() - t0
        log.info(
            "round %d: measures of %d samples × %d clients%s in %.1fs (%.0f samples/s)",
            rnd,
            len(eval_ids),
            len(obs["client_ids"]),
            "" if server is None else " and their aggregate",
            dt,
            len(eval_ids) / dt,
        )
    _write_tables(frames, aggregates, output, aggregate_output)


def _measure_table(
    rnd: int, clients: np.ndarray, eval_ids: np.ndarray, res: RoundMeasures
) -> pd.DataFrame:
    """The measure table (:data:`MEASURE_DTYPES`) of one round.

    A row per (row of the round's uploads, evaluation sample), upload-major; ``clients``
    (K) names each upload's row.
    """
    k, n = res.loss.shape
    columns = {
        "round": np.full(k * n, rnd),
        "client_id": np.repeat(clients, n),
        "sample_id": np.tile(eval_ids, k),
        "loss": res.loss.reshape(-1).numpy(),
        "logit_conf": res.logit_conf.reshape(-1).numpy(),
        "cos": res.cos.reshape(-1).numpy(),
        "grad_diff": res.grad_diff.reshape(-1).numpy(),
        "grad_norm": np.tile(res.grad_norm.numpy(), k),
        "correct": res.correct.reshape(-1).numpy(),
        "confidence": res.confidence.reshape(-1).numpy(),
    }
    return pd.DataFrame({c: columns[c] for c in MEASURE_DTYPES}).astype(MEASURE_DTYPES)


def _write_tables(
    frames: list[pd.DataFrame],
    aggregates: list[pd.DataFrame],
    output: str | Path,
    aggregate_output: str | Path | None,
) -> None:
    """Write the measure table, and the aggregate's if asked for.

    Each is written atomically, and no aggregate table survives a failure to write the
    measure table.
    """
    if aggregate_output is None:
        io.write_parquet(_concat(frames), output, "measures")
        return
    io.write_parquet(_concat(aggregates), aggregate_output, "measures")
    try:
        io.write_parquet(_concat(frames), output, "measures")
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            Path(aggregate_output).unlink()
        raise


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """The rounds' tables as one (a table without rows: no round, or none with a participant)."""
    if frames:
        return pd.concat(frames, ignore_index=True)
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in MEASURE_DTYPES.items()})
