"""Stage 3, ``train``: FedAvg for one cell, its history, manifest and the server's view."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

import fedmia
from fedmia.core import contracts
from fedmia.core.config import DefenseConfig, ModelConfig, TrainConfig
from fedmia.core.contracts import CELL_KEYS, HISTORY_COLUMNS
from fedmia.core.fingerprint import fingerprint
from fedmia.core.lockfile import lock_sha256
from fedmia.core.registry import import_plugins
from fedmia.federation.defenses import build_defense
from fedmia.federation.fedavg import DeviceData, RoundRecord, aggregation_rule, run_fedavg
from fedmia.federation.models import build_model, count_parameters
from fedmia.federation.partition import HELD_OUT, global_test_ids
from fedmia.federation.state import FlatState
from fedmia.privacy.events import cell_privacy
from fedmia.stages import io
from fedmia.stages.compute import setup_compute

log = logging.getLogger(__name__)


def _history_rows(rec: RoundRecord) -> list[dict[str, Any]]:
    """A row per participant of the round (the clients that trained), then the global row.

    The global row's training loss and accuracy are the participants' (weighted by data
    size; NaN in a round without participants).
    """
    rows = []
    for c, loss, acc, n, a in zip(
        rec.participants,
        rec.client_loss,
        rec.client_accuracy,
        rec.num_samples,
        rec.weights,
        strict=True,
    ):
        rows.append(
            dict(
                round=rec.round,
                client_id=c,
                lr=rec.lr,
                num_samples=n,
                aggregation_weight=float(a),
                train_loss=float(loss),
                train_accuracy=float(acc),
                test_loss=math.nan,
                test_accuracy=math.nan,
            )
        )
    w = np.asarray(rec.num_samples, dtype=np.float64)
    total = w.sum()
    rows.append(
        dict(
            round=rec.round,
            client_id=HELD_OUT,
            lr=rec.lr,
            num_samples=int(total),
            aggregation_weight=math.nan,
            train_loss=float(np.dot(w, rec.client_loss) / total) if total else math.nan,
            train_accuracy=float(np.dot(w, rec.client_accuracy) / total) if total else math.nan,
            test_loss=float(rec.test_loss),
            test_accuracy=float(rec.test_accuracy),
        )
    )
    return rows


def client_rounds(history: pd.DataFrame, num_clients: int) -> list[int]:
    """How many rounds each client (0..K-1) took part in: its rows in the history."""
    clients = history.loc[history["client_id"] != HELD_OUT, "client_id"].to_numpy()
    return np.bincount(clients, minlength=num_clients).astype(int).tolist()


def round_participants(history: pd.DataFrame, rounds: int) -> list[list[int]]:
    """The client ids that took part in each round 1..``rounds`` (their rows in the history)."""
    clients = history[history["client_id"] != HELD_OUT]
    by_round = clients.groupby("round")["client_id"].apply(lambda c: sorted(c.tolist()))
    return [by_round.get(r, []) for r in range(1, rounds + 1)]


@dataclass(frozen=True)
class Federation:
    """A cell's data on the device, its clients' sample positions and the initial model.

    Attributes:
        data: the prepared dataset on the device.
        client_idx: per client 0..K−1, int64 positions of its training samples.
        test_idx: int64 positions of the global test set.
        net: the model, initialised from the cell's seed.
        state: the flat-state wrapper of ``net``.
        meta: the prepared dataset's meta (classes, shape, normalisation).
        partition: the partition table.
    """

    data: DeviceData
    client_idx: list[torch.Tensor]
    test_idx: torch.Tensor
    net: torch.nn.Module
    state: FlatState
    meta: dict[str, Any]
    partition: pd.DataFrame


def load_federation(
    data: Mapping[str, str | Path],
    partition_file: str | Path,
    model_kind: str,
    seed: int,
    dev: torch.device,
) -> Federation:
    """The prepared data, the partition's clients and the seeded model of a cell, on ``dev``.

    What the train stage and the one-shot stage (:mod:`fedmia.stages.oneshot`) train from.

    Raises:
        ValueError: the partition does not match the dataset (rerun the partition stage).
    """
    arrays, meta, part = io.load_cell_data(data, partition_file)
    ddata = DeviceData.from_arrays(
        arrays["images"], arrays["labels"], meta["mean"], meta["std"], meta["num_classes"], dev
    )
    client_ids = part["client_id"].to_numpy()
    k = int(client_ids.max()) + 1
    client_idx = [torch.from_numpy(np.flatnonzero(client_ids == c)).to(dev) for c in range(k)]
    test_idx = torch.from_numpy(global_test_ids(part)).to(dev)
    net = build_model(model_kind, meta["num_classes"], meta["shape"][0], seed=seed).to(dev)
    return Federation(ddata, client_idx, test_idx, net, FlatState(net), meta, part)


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
    deterministic: bool = False,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 0,
    plugins: Sequence[str] = (),
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
        deterministic: deterministic CUDA algorithms (:func:`fedmia.stages.compute.setup_compute`).
        checkpoint_dir: a folder outside the rule's outputs (Snakemake deletes a failed
            job's outputs) for the resumable state; ``None``: no checkpoints.
        checkpoint_every: save the state every this many rounds (0: never). A rerun after
            the job was killed resumes from the last save, provided the inputs, the
            settings and the training code are the same (else it starts afresh); a kill
            loses at most ``checkpoint_every`` rounds of work.
        plugins: the config's ``plugins``, imported first (they register kinds).
        outputs: ``history`` (Parquet: per round, a row per participant — its data size, the
            ``aggregation_weight`` the server gave its upload, its training loss and
            accuracy — and a global row), ``final`` (final global model, ``.pt``),
            ``observed`` (folder: one ``roundNNNN.safetensors`` per observed round, the
            server's view: :func:`fedmia.stages.io.save_observed`), ``ownership`` (Parquet:
            who owns which sample, the held-out pool and the evaluation set, from the
            partition; default: ``ownership.parquet`` next to the manifest) and ``manifest``
            (JSON: the cell, the planned and the saved observed rounds, the
            ``participation`` — ``fraction``, ``sampling`` and ``client_rounds``, the rounds
            each client took part in — the server's
            ``aggregation_weights`` — ``equal``, ``data_size`` or ``official_permuted``,
            :func:`fedmia.federation.fedavg.aggregation_rule` — and the outcome —
            ``diverged_round`` (null if training finished), ``last_finite_round``,
            ``last_finite_test_accuracy``, and ``final_test_accuracy``, the utility the
            tables use: the final model's, or chance (1 / classes) for a diverged cell,
            whose final model has non-finite weights; ``best_test_accuracy``, the best over
            the tested rounds, which the official code records too); its ``view`` block
            makes the folder a recorded server view (:func:`fedmia.stages.io.make_view`:
            model, dataset, clients, rounds and the SHA-256 of every file), the input the
            import stage reads (:mod:`fedmia.stages.recording`, ``docs/flower.md``).

    A run whose loss, uploads or model become non-finite stops there and still writes
    every output (see :func:`fedmia.federation.fedavg.run_fedavg`): a diverged cell is a result.
    A resumed run gives the same files as an uninterrupted one (on the CPU, byte for
    byte for the Parquet and JSON files, tensor for tensor for the ``.pt`` files): every
    round's randomness comes from ``(seed, round, client)``, and a round starts from the
    saved global model and a fresh optimizer.
    """
    import_plugins(plugins)
    mcfg = ModelConfig.from_dict(model)
    dcfg = DefenseConfig.from_dict(defense)
    tcfg = TrainConfig.from_dict(train_cfg)
    dev = setup_compute(device, threads, deterministic)
    seed = int(cell["seed"])
    fed = load_federation(data, partition_file, mcfg.kind, seed, dev)
    ddata, client_idx, test_idx, net, state = (
        fed.data,
        fed.client_idx,
        fed.test_idx,
        fed.net,
        fed.state,
    )
    meta, part = fed.meta, fed.partition
    k = len(client_idx)
    defense_obj = build_defense(dcfg)
    observed = set(tcfg.observed())
    ckpt = None
    if checkpoint_dir is not None and checkpoint_every > 0:
        key = _checkpoint_key(model, defense, tcfg.to_dict(), cell, partition_file, meta, plugins)
        ckpt = Checkpoint(checkpoint_dir, key)
    resumed = ckpt.load() if ckpt is not None else None
    start, rows, outcome = 1, [], None
    if resumed is not None:
        state.load(resumed["global_state"].to(dev))
        start, rows, outcome = resumed["round"] + 1, resumed["rows"], resumed["outcome"]
        log.info("resuming from the checkpoint of round %d in %s", resumed["round"], checkpoint_dir)
    obs_dir = ckpt.observed if ckpt is not None else Path(outputs["observed"])
    obs_dir.mkdir(parents=True, exist_ok=True)
    weights = aggregation_rule(tcfg, defense_obj)
    log.info(
        "FedAvg: %s (%d parameters) on %s, %d clients (sizes %s), %d rounds, "
        "defense %s, %s aggregation weights, participation %s, device %s, observed "
        "rounds %s",
        mcfg.kind,
        count_parameters(net),
        meta["kind"],
        k,
        [int(i.numel()) for i in client_idx],
        tcfg.rounds,
        dcfg.kind,
        weights,
        tcfg.participation,
        dev,
        sorted(observed),
    )
    if weights != tcfg.aggregation:
        log.info(
            "defense %s needs weights independent of the clients' data: the server "
            "averages the uploads with equal weights 1/K (train.aggregation = %s does "
            "not apply)",
            dcfg.kind,
            tcfg.aggregation,
        )
    static = dict(
        layout=state.layout.to_list(),
        defense=dict(defense),
        model=dict(kind=mcfg.kind, num_classes=meta["num_classes"], in_channels=meta["shape"][0]),
        fedmia_version=fedmia.__version__,
    )

    def save_round(rec: RoundRecord) -> None:
        io.save_observed(
            io.round_file(obs_dir, rec.round),
            global_state=rec.global_flat,
            uploads=rec.uploads,
            client_ids=torch.tensor(rec.participants, dtype=torch.int64),
            num_samples=torch.tensor(rec.num_samples),
            meta=dict(static, round=rec.round, lr=rec.lr),
        )

    def after_round(rnd: int, rows: list[dict[str, Any]], outcome: dict[str, Any]) -> None:
        if ckpt is not None and rnd % checkpoint_every == 0 and rnd < tcfg.rounds:
            ckpt.save(rnd, state.flat, rows, outcome)

    try:
        rounds = run_fedavg(
            state, ddata, client_idx, test_idx, tcfg, defense_obj, seed, start_round=start
        )
        history, outcome = _log_history(
            rounds,
            tcfg.rounds,
            observed,
            save_round,
            cell,
            rows=rows,
            outcome=outcome,
            after_round=after_round,
        )
    except BaseException:
        if ckpt is None:
            shutil.rmtree(obs_dir, ignore_errors=True)  # no partial output survives a failure
        raise
    saved = sorted(
        r for r in observed if outcome["diverged_round"] is None or r < outcome["diverged_round"]
    )
    final_accuracy = (
        1.0 / meta["num_classes"]
        if outcome["diverged_round"] is not None
        else outcome["last_finite_test_accuracy"]
    )
    unnoised = sum(e.numel for e in state.layout.entries if not e.is_param)
    participation = {**tcfg.participation.to_dict(), "client_rounds": client_rounds(history, k)}
    manifest = {
        **{k: cell[k] for k in CELL_KEYS},
        "rounds": tcfg.rounds,
        "planned_observed_rounds": sorted(observed),
        "observed_rounds": saved,
        "num_classes": meta["num_classes"],
        "aggregation_weights": weights,
        # who took part: the draw (train.participation) and each client's rounds (history)
        "participation": participation,
        # floats of the uploaded state that are not parameters (BatchNorm statistics):
        # no defense perturbs them
        "unnoised_state_floats": unnoised,
        # the defense's guarantee over the rounds the server saw (the report computes ε)
        "privacy": cell_privacy(
            defense_obj.privacy(),
            unnoised_state=unnoised > 0,
            rounds=outcome["diverged_round"] or tcfg.rounds,
            participation={
                **participation,
                "num_clients": k,
                "participants": round_participants(history, tcfg.rounds),
            },
        ),
        **outcome,
        "final_test_accuracy": final_accuracy,
        # the official code also records the best test accuracy over rounds (hindsight)
        "best_test_accuracy": _best_test_accuracy(history),
        "fedmia_version": fedmia.__version__,
        "lock_sha256": lock_sha256(),  # the shipped lock installed here, else None
    }
    if ckpt is not None:
        ckpt.move_observed(saved, Path(outputs["observed"]))
    io.save_tensors(
        outputs["final"],
        {"global_state": state.flat},
        dict(static, rounds=tcfg.rounds, diverged_round=outcome["diverged_round"]),
        "final",
    )
    io.write_parquet(history, outputs["history"], "history")
    ownership_file = outputs.get("ownership") or Path(outputs["manifest"]).with_name(
        contracts.VIEW_FILES["ownership"]
    )
    io.write_ownership(part, ownership_file)
    folder = Path(outputs["manifest"]).parent
    files = {
        _relative(f, folder): io.file_sha256(f)
        for f in (
            outputs["final"],
            ownership_file,
            *(io.round_file(outputs["observed"], r) for r in saved),
        )
    }
    manifest["view"] = io.make_view(
        recorder=f"fedmia {fedmia.__version__} train stage",
        model=static["model"],
        dataset={"kind": meta["kind"], "num_samples": len(part), "sha256": meta["sha256"]},
        num_clients=k,
        rounds=outcome["diverged_round"] or tcfg.rounds,
        observed_rounds=saved,
        files=files,
    )
    io.write_manifest(manifest, outputs["manifest"])
    if ckpt is not None:
        ckpt.remove()


def _relative(path: str | Path, folder: Path) -> str:
    """``path`` relative to ``folder`` (POSIX), as a view's manifest lists its files."""
    return Path(os.path.relpath(path, folder)).as_posix()


def _best_test_accuracy(history: pd.DataFrame) -> float | None:
    """The best test accuracy of the global model over the tested rounds (``None``: none)."""
    tested = history.loc[history["client_id"] == HELD_OUT, "test_accuracy"].dropna()
    return float(tested.max()) if len(tested) else None


def _checkpoint_key(
    model: Mapping[str, Any],
    defense: Mapping[str, Any],
    train_cfg: Mapping[str, Any],
    cell: Mapping[str, Any],
    partition_file: str | Path,
    meta: Mapping[str, Any],
    plugins: Sequence[str] = (),
) -> str:
    """What a checkpoint must match to be resumed: settings, inputs and training code."""
    spec = {
        "model": dict(model),
        "defense": dict(defense),
        "train": dict(train_cfg),
        "cell": {k: cell[k] for k in CELL_KEYS},
        "data": meta["sha256"],
        "partition": hashlib.sha256(Path(partition_file).read_bytes()).hexdigest(),
        "code": fingerprint("fedmia.stages.train", plugins=plugins),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


class Checkpoint:
    """A cell's resumable training state in its own folder (outside the rule's outputs).

    ``state.safetensors`` holds the round, the global model, the history rows and the outcome so
    far, and the key of the run it belongs to; ``observed/`` the observed rounds written
    so far (moved into the rule's output folder when training ends). Every write is
    atomic, so a kill leaves the previous save intact.
    """

    def __init__(self, folder: str | Path, key: str) -> None:
        self.folder = Path(folder)
        self.key = key
        self.observed = self.folder / "observed"

    def load(self) -> dict[str, Any] | None:
        """The saved state of this run, or ``None`` (none, or of other settings/code)."""
        f = self.folder / "state.safetensors"
        if not f.exists():
            if self.folder.exists():
                shutil.rmtree(self.folder)  # observed rounds of a run that never saved
            return None
        try:
            tensors, saved = io.load_tensors(f, "checkpoint")
        except contracts.FormatError as e:
            raise contracts.FormatError(
                f"{e} (a training checkpoint: delete {self.folder} to start the cell afresh)"
            ) from None
        if saved.get("key") != self.key:
            log.warning("%s belongs to other settings, inputs or code; starting afresh", f)
            shutil.rmtree(self.folder)
            return None
        return {**saved, **tensors}

    def save(
        self,
        rnd: int,
        global_state: torch.Tensor,
        rows: list[dict[str, Any]],
        outcome: dict[str, Any],
    ) -> None:
        """Save the state after round ``rnd`` (atomically)."""
        io.save_tensors(
            self.folder / "state.safetensors",
            {"global_state": global_state},
            {"key": self.key, "round": rnd, "rows": rows, "outcome": outcome},
            "checkpoint",
        )
        log.info("checkpoint: round %d saved in %s", rnd, self.folder)

    def move_observed(self, rounds: Iterable[int], target: Path) -> None:
        """Move the observed rounds into the rule's output folder ``target``."""
        target.mkdir(parents=True, exist_ok=True)
        for r in rounds:
            os.replace(io.round_file(self.observed, r), io.round_file(target, r))

    def remove(self) -> None:
        """Delete the checkpoint (training finished and its outputs are written)."""
        shutil.rmtree(self.folder, ignore_errors=True)


def _log_history(
    rounds: Iterable[RoundRecord],
    total: int,
    observed: set[int],
    save_round: Callable[[RoundRecord], None],
    cell: Mapping[str, Any],
    *,
    rows: list[dict[str, Any]] | None = None,
    outcome: dict[str, Any] | None = None,
    after_round: Callable[[int, list[dict[str, Any]], dict[str, Any]], None] | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Consume the rounds: save observed ones, log progress, return the history table.

    Also returns the outcome: ``diverged_round`` (``None`` if training finished),
    ``last_finite_round`` and ``last_finite_test_accuracy`` (of the last finite global
    model; for a finished run, the final model's last test). ``rows`` and ``outcome``
    continue a resumed run; ``after_round(round, rows, outcome)`` runs after each
    finished round (checkpoints).
    """
    rows = list(rows or [])
    t_start = time.perf_counter()
    keys = {k: cell[k] for k in CELL_KEYS}
    outcome = dict(
        outcome
        or {
            "diverged_round": None,
            "last_finite_round": total,
            "last_finite_test_accuracy": math.nan,
        }
    )
    for rec in rounds:
        rows.extend({**keys, **row} for row in _history_rows(rec))
        if rec.diverged:
            outcome = {
                "diverged_round": rec.round,
                "last_finite_round": rec.round - 1,
                "last_finite_test_accuracy": rec.last_finite_test[1],
            }
            log.warning(
                "round %d/%d: training diverged (non-finite loss, upload or model): "
                "the cell is kept as a result, flagged diverged; observed rounds "
                "before round %d are saved, utility is chance; the last finite "
                "global model had test accuracy %.3f",
                rec.round,
                total,
                rec.round,
                rec.last_finite_test[1],
            )
            break
        if rec.round in observed:
            save_round(rec)
        if math.isfinite(rec.test_accuracy):
            outcome["last_finite_test_accuracy"] = rec.test_accuracy
        glob = rows[-1]
        log.info(
            "round %d/%d lr %.4f train loss %.4f acc %.3f | test loss %.4f acc %.3f | "
            "%.1fs, %.0f samples/s%s",
            rec.round,
            total,
            rec.lr,
            glob["train_loss"],
            glob["train_accuracy"],
            rec.test_loss,
            rec.test_accuracy,
            rec.seconds,
            rec.samples_per_s,
            " [observed]" if rec.round in observed else "",
        )
        if after_round is not None:
            after_round(rec.round, rows, outcome)
    log.info(
        "trained up to round %d in %.1fs",
        outcome["last_finite_round"],
        time.perf_counter() - t_start,
    )
    history = pd.DataFrame(rows, columns=HISTORY_COLUMNS).astype(
        {"seed": "int64", "round": "int32", "client_id": "int32", "num_samples": "int64"}
    )
    return history, outcome
