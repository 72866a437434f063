"""The workflow's stages as plain functions: read inputs, call the library, write outputs.

Each function is what one ``workflow/scripts/*.py`` calls with the rule's inputs,
outputs and params; tests call them directly without Snakemake.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

import fedmia
from fedmia import io, report
from fedmia.attacks import PROTOCOLS, RESULT_COLUMNS, OfficialProtocol, run_attacks
from fedmia.config import DatasetConfig, DefenseConfig, ModelConfig, PartitionConfig, TrainConfig
from fedmia.datasets import prepare_dataset
from fedmia.defenses import build_defense, strength_of
from fedmia.fedavg import DeviceData, RoundRecord, run_fedavg
from fedmia.measures import ROUTES, compute_round_measures
from fedmia.models import build_model, count_parameters
from fedmia.partition import HELD_OUT, make_partition
from fedmia.state import FlatState, StateLayout

log = logging.getLogger(__name__)

#: The keys of a cell, in path order; attack tables and histories carry them as columns.
CELL_KEYS = ("dataset", "model", "defense", "partition", "seed")
#: dtypes of an attack result table's scalar columns (for empty tables).
RESULT_DTYPES = {"dataset": "object", "model": "object", "defense": "object",
                 "partition": "object", "seed": "int64", "attack": "object",
                 "protocol": "object", "draw": "int64", "target": "int64", "round": "int64",
                 "attacked": "bool", "n_rounds": "int64", "n_members": "int64",
                 "n_nonmembers": "int64"}
HISTORY_COLUMNS = [*CELL_KEYS, "round", "client_id", "lr", "num_samples", "train_loss",
                   "train_accuracy", "test_loss", "test_accuracy"]


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when present, else CPU; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device '{name}' requested but CUDA is not available; "
                           "set device: auto or cpu")
    return dev


def setup_compute(device: str = "auto", threads: int | None = None) -> torch.device:
    """Set torch's CPU threads (if given) and resolve ``device`` (see :func:`resolve_device`)."""
    if threads:
        torch.set_num_threads(threads)
    return resolve_device(device)


def device_name(dev: torch.device) -> str:
    """``cpu`` or the CUDA device's name, for logs and benchmark output."""
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def prepare(dataset: Mapping[str, Any], outputs: Mapping[str, str | Path]) -> None:
    """Stage 1: build a dataset's canonical arrays and metadata.

    Args:
        dataset: the dataset's config block (``DatasetConfig`` fields).
        outputs: files for ``images``, ``labels``, ``is_test`` and ``meta``.
    """
    cfg = DatasetConfig.from_dict(dataset)
    data = prepare_dataset(cfg)
    mean, std = data.channel_stats()
    n, c, h, w = data.images.shape
    meta = {
        "kind": cfg.kind, "config": dict(dataset), "source": data.source,
        "classes": data.classes, "num_classes": len(data.classes),
        "shape": [c, h, w], "num_samples": n, "num_test": int(data.is_test.sum()),
        "mean": mean, "std": std, "sha256": data.checksum(), "fedmia_version": fedmia.__version__,
        "extra": data.extra,
    }
    io.save_prepared(data, outputs, meta)


def partition(
    data: Mapping[str, str | Path], partition_cfg: Mapping[str, Any], seed: int, output: str | Path
) -> None:
    """Stage 2: deal the training split to clients and draw the evaluation set."""
    cfg = PartitionConfig.from_dict(partition_cfg)
    labels, is_test = np.load(data["labels"]), np.load(data["is_test"])
    df = make_partition(labels, is_test, cfg, seed)
    io.write_parquet(df, output)


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


#: Columns and dtypes of the measure table.
MEASURE_DTYPES = {"round": "int32", "client_id": "int32", "sample_id": "int64",
                  "loss": "float32", "cos": "float32", "grad_diff": "float32",
                  "grad_norm": "float32", "correct": "bool", "confidence": "float32"}


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The train stage's manifest of a cell (JSON)."""
    import json

    return json.loads(Path(path).read_text())


def available_rounds(rounds: Iterable[int], manifest_file: str | Path | None) -> list[int]:
    """``rounds`` (sorted) without those a diverged run never saved.

    Raises:
        ValueError: a round is missing from a run that did not diverge (the train stage's
            outputs do not match the config: rerun it).
    """
    rounds = sorted(rounds)
    if manifest_file is None:
        return rounds
    man = read_manifest(manifest_file)
    saved = set(man["observed_rounds"])
    lacking = [r for r in rounds if r not in saved]
    if lacking and man["diverged_round"] is None:
        raise ValueError(f"{manifest_file}: round(s) {lacking} were not observed by the train "
                         "stage; rerun it (snakemake --forcerun train)")
    if lacking:
        log.warning("training diverged in round %d: round(s) %s were never observed",
                    man["diverged_round"], lacking)
    return [r for r in rounds if r in saved]


def measure(
    *,
    data: Mapping[str, str | Path],
    partition_file: str | Path,
    observed_dir: str | Path,
    rounds: Iterable[int],
    manifest_file: str | Path | None = None,
    device: str = "auto",
    threads: int | None = None,
    chunk_size: int = 64,
    batch_size: int = 500,
    route: str = "layerwise",
    output: str | Path,
) -> None:
    """Stage 4: membership disclosure measures of the evaluation samples at observed rounds.

    Args:
        data: files of the prepared dataset.
        partition_file: the partition Parquet (its ``eval`` samples are measured).
        observed_dir: the train stage's ``observed/`` folder.
        rounds: the observed rounds to measure (each must have its file).
        manifest_file: the train stage's manifest: a cell that diverged saved only the
            rounds before divergence, and only those are measured (none: an empty table).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        threads: CPU threads for torch.
        chunk_size: samples per per-sample-gradient chunk (bounds memory).
        batch_size: samples per forward pass.
        route: ``layerwise`` (default) or ``func`` (:data:`fedmia.measures.ROUTES`).
        output: the measure Parquet: ``round, client_id, sample_id, loss, cos, grad_diff,
            grad_norm, correct, confidence``, one row per (round, client, evaluation sample).
    """
    if route not in ROUTES:
        raise ValueError(f"unknown measure route '{route}'; choose from {sorted(ROUTES)}")
    dev = setup_compute(device, threads)
    rounds = available_rounds(rounds, manifest_file)
    if not rounds:
        log.warning("no observed round to measure (training diverged before the first); "
                    "writing an empty measure table")
        io.write_parquet(pd.DataFrame({c: pd.Series(dtype=t) for c, t in MEASURE_DTYPES.items()}),
                         output)
        return
    files = [io.round_file(observed_dir, r) for r in rounds]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(f"observed round file(s) missing: {missing}; rerun the train "
                                "stage with these rounds observed")
    arrays, meta = io.load_prepared(data)
    part = pd.read_parquet(partition_file)
    eval_ids = np.sort(part.loc[part["eval"], "sample_id"].to_numpy())
    ddata = DeviceData.from_arrays(arrays["images"], arrays["labels"], meta["mean"], meta["std"],
                                   meta["num_classes"], dev)
    x, y = ddata.batch(torch.from_numpy(eval_ids).to(dev))
    frames = []
    state = None
    for rnd, f in zip(rounds, files, strict=True):
        t0 = time.perf_counter()
        obs = io.load_torch(f)
        if state is None:
            m = obs["model"]
            state = FlatState(build_model(m["kind"], m["num_classes"], m["in_channels"],
                                          seed=0).to(dev))
        if StateLayout.from_list(obs["layout"]) != state.layout:
            raise ValueError(f"{f}: its model layout differs from the first round's")
        res = compute_round_measures(state, obs["global_state"].to(dev), obs["uploads"].to(dev),
                                     x, y, chunk_size=chunk_size, batch_size=batch_size,
                                     grad_products=ROUTES[route])
        k, n = res.loss.shape
        frames.append(pd.DataFrame({
            "round": np.full(k * n, rnd, dtype=np.int32),
            "client_id": np.repeat(np.arange(k, dtype=np.int32), n),
            "sample_id": np.tile(eval_ids, k),
            "loss": res.loss.reshape(-1).numpy(),
            "cos": res.cos.reshape(-1).numpy(),
            "grad_diff": res.grad_diff.reshape(-1).numpy(),
            "grad_norm": np.tile(res.grad_norm.numpy(), k),
            "correct": res.correct.reshape(-1).numpy(),
            "confidence": res.confidence.reshape(-1).numpy(),
        }))
        dt = time.perf_counter() - t0
        log.info("round %d: measures of %d samples × %d clients in %.1fs (%.0f samples/s)",
                 rnd, n, k, dt, n / dt)
    io.write_parquet(pd.concat(frames, ignore_index=True), output)


def attack(
    *,
    measures_file: str | Path,
    partition_file: str | Path,
    cell: Mapping[str, Any],
    rounds: Iterable[int] | None = None,
    manifest_file: str | Path | None = None,
    attacks: Sequence[str],
    attack_rounds: Iterable[int] | None = None,
    targets: str | list[int] = "all",
    protocol: Sequence[str] = PROTOCOLS,
    official: Mapping[str, Any] | None = None,
    fpr_rule: str = "at_most",
    fedmia_ddof: int = 0,
    outlier_filter: Mapping[str, bool] | None = None,
    roc_points: int = 200,
    outputs: Mapping[str, str | Path],
) -> None:
    """Stage 5: every attack against every target client of one cell, under each protocol.

    Args:
        measures_file: the cell's measure Parquet.
        partition_file: the partition Parquet (who owns each evaluation sample).
        cell: ``dataset, model, defense, partition, seed`` — written into every row.
        rounds: the observed rounds the measure table must hold (``None``: whatever it has).
        manifest_file: the train stage's manifest: after a divergence, only the rounds
            saved before it are attacked (multi-round attacks report the fewer rounds in
            ``n_rounds``; with no attacked round left they have no rows, and with no
            observed round at all every table is empty).
        attacks: attack code names (:data:`fedmia.attacks.ATTACKS`).
        attack_rounds: the rounds multi-round attacks combine and best rounds are picked
            from (``None``: every round of the table).
        targets: ``"all"`` or a list of client ids.
        protocol: non-member protocols (:data:`fedmia.attacks.PROTOCOLS`).
        official: :class:`fedmia.attacks.OfficialProtocol` fields but ``seed`` (the cell's).
        fpr_rule: ``at_most`` or ``below`` (:data:`fedmia.metrics.FPR_RULES`).
        fedmia_ddof: ddof of FedMIA's reference variance.
        outlier_filter: attack name → whether FedMIA's outlier filter applies.
        roc_points: points of the stored ROC curve per row.
        outputs: attack name → its Parquet: one row per (protocol, draw, target, round)
            (:data:`fedmia.attacks.RESULT_COLUMNS` after the cell's keys and ``attack``).
    """
    missing = sorted(set(attacks) - set(outputs))
    if missing:
        raise ValueError(f"no output file for attack(s) {missing}")
    mdm = pd.read_parquet(measures_file)
    if manifest_file is not None:
        rounds = available_rounds(rounds or [], manifest_file) if rounds is not None else None
        attack_rounds = (available_rounds(attack_rounds, manifest_file)
                         if attack_rounds is not None else None)
    if len(mdm) == 0 and manifest_file is not None and rounds == []:
        log.warning("no observed round before the run diverged: no attack can run; writing "
                    "empty result tables")
        for name in attacks:
            empty = pd.DataFrame(columns=[*CELL_KEYS, "attack", *RESULT_COLUMNS])
            io.write_parquet(empty.astype(RESULT_DTYPES), outputs[name])
        return
    if rounds is not None:
        lacking = sorted(set(rounds) - set(mdm["round"].unique().tolist()))
        if lacking:
            raise ValueError(f"{measures_file} lacks observed round(s) {lacking}; rerun the "
                             "measure stage")
    part = pd.read_parquet(partition_file)
    ev = part[part["eval"]]
    owner = pd.Series(ev["client_id"].to_numpy(), index=ev["sample_id"].to_numpy())
    k = int(part["client_id"].max()) + 1
    if targets == "all":
        targets = list(range(k))
    bad = [t for t in targets if not 0 <= t < k]
    if bad:
        raise ValueError(f"attack.targets {bad} are not clients of this cell (0..{k - 1})")
    proto = OfficialProtocol(**{**dict(official or {}), "seed": int(cell["seed"])})
    t0 = time.perf_counter()
    results = run_attacks(attacks, mdm, owner, targets, attack_rounds=attack_rounds,
                          protocols=list(protocol), official=proto, ddof=fedmia_ddof,
                          outlier_filter=outlier_filter, fpr_rule=fpr_rule,
                          roc_points=roc_points)
    log.info("%d attacks × %d targets × %s in %.1fs", len(attacks), len(targets),
             "/".join(protocol), time.perf_counter() - t0)
    for name, res in results.items():
        for i, key in enumerate(CELL_KEYS):
            res.insert(i, key, cell[key])
        res.insert(len(CELL_KEYS), "attack", name)
        io.write_parquet(res, outputs[name])


def cells_frame(manifests: Iterable[str | Path]) -> pd.DataFrame:
    """One row per cell from the train stage's manifests: keys and outcome."""
    cols = [*CELL_KEYS, "diverged_round", "last_finite_test_accuracy", "final_test_accuracy"]
    rows = [{k: m[k] for k in cols} for m in map(read_manifest, manifests)]
    return pd.DataFrame(rows, columns=cols).astype({"diverged_round": "float64"})


def report_tables(*, attack_files: Iterable[str | Path], manifests: Iterable[str | Path],
                  selections: Sequence[str | int], fpr_rule: str,
                  outputs: Mapping[str, str | Path]) -> None:
    """Stage 6a: the tidy attack table (CSV), per-round table, Table-1 layout (MD, LaTeX).

    Args:
        attack_files: every attack Parquet of the grid.
        manifests: every cell's train manifest (diverged cells are flagged).
        selections: how single-round attacks are reported (``report.single_round``).
        fpr_rule: the FPR rule the attack stage used (stated in the tables).
        outputs: ``csv``, ``per_round``, ``md``, ``tex``.
    """
    results = pd.concat([pd.read_parquet(f) for f in attack_files], ignore_index=True)
    summary = report.summarize(results, selections, fpr_rule=fpr_rule,
                               cells=cells_frame(manifests))
    per_round = results.drop(columns=["roc_fpr", "roc_tpr"])
    sections = report.paper_tables(summary)
    with io.atomic_path(outputs["csv"]) as tmp:
        summary.to_csv(tmp, index=False)
    with io.atomic_path(outputs["per_round"]) as tmp:
        per_round.to_csv(tmp, index=False)
    with io.atomic_path(outputs["md"]) as tmp:
        tmp.write_text(report.to_markdown(sections))
    with io.atomic_path(outputs["tex"]) as tmp:
        tmp.write_text(report.to_latex(sections))


def _save_figure(fig: Any, outputs: Mapping[str, str | Path], dpi: int) -> None:
    import matplotlib.pyplot as plt

    for key in ("png", "pdf"):
        with io.atomic_path(outputs[key]) as tmp:
            fig.savefig(tmp, format=key, dpi=dpi, bbox_inches="tight")
    plt.close(fig)


def report_cell_figures(*, attack_files: Iterable[str | Path], kind: str,
                        options: Mapping[str, Any], outputs: Mapping[str, str | Path]) -> None:
    """Stage 6b: one cell's figure ``kind`` (``rounds`` or ``roc``) as PNG and PDF."""
    cell = pd.concat([pd.read_parquet(f) for f in attack_files], ignore_index=True)
    if kind == "rounds":
        fig = report.rounds_figure(cell, options["round_plot_fpr"], options["width"])
    elif kind == "roc":
        selection = options["single_round"]
        selection = selection[0] if isinstance(selection, list | tuple) else selection
        fig = report.roc_figure(cell, selection, options["width"])
    else:
        raise ValueError(f"unknown figure '{kind}'; choose from ['rounds', 'roc']")
    _save_figure(fig, outputs, options["dpi"])


def report_partitions_figure(*, table: str | Path, options: Mapping[str, Any],
                             outputs: Mapping[str, str | Path]) -> None:
    """Stage 6c: iid vs non-iid bars from the tidy attack table."""
    fig = report.partitions_figure(pd.read_csv(table), options["width"])
    _save_figure(fig, outputs, options["dpi"])


def report_privacy_utility(*, table: str | Path, manifests: Iterable[str | Path],
                           defenses: Mapping[str, Mapping[str, Any]], output: str | Path
                           ) -> None:
    """Stage 6d: the privacy–utility table (attack success next to final test accuracy).

    Each cell's manifest names the cell in its keys and gives its utility (the final
    model's test accuracy; chance for a diverged cell); they are joined to the attack
    table on those keys.
    """
    strengths = pd.DataFrame([{"defense": key, "kind": d["kind"], "strength": strength_of(d)}
                              for key, d in defenses.items()])
    pu = report.privacy_utility(pd.read_csv(table), cells_frame(manifests), strengths)
    with io.atomic_path(output) as tmp:
        pu.to_csv(tmp, index=False)


def report_privacy_utility_figure(*, table: str | Path, family: str,
                                  options: Mapping[str, Any],
                                  outputs: Mapping[str, str | Path]) -> None:
    """Stage 6e: one attack family's privacy–utility figure (PNG and PDF)."""
    fig = report.privacy_utility_figure(pd.read_csv(table), family, options["width"])
    _save_figure(fig, outputs, options["dpi"])


def report_hypervolume(*, table: str | Path, outputs: Mapping[str, str | Path]) -> None:
    """Stage 6f: Table 2, the hypervolume of every defense kind's front (CSV, Markdown)."""
    hv = report.hypervolume_table(pd.read_csv(table))
    with io.atomic_path(outputs["csv"]) as tmp:
        hv.to_csv(tmp, index=False)
    with io.atomic_path(outputs["md"]) as tmp:
        tmp.write_text(report.hypervolume_markdown(hv))
