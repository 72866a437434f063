"""Stage 5, ``attack``: every attack against every target client of a cell."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedmia.attacker.attacks import (
    ATTACKS,
    FEDERATION_CLIENT,
    PROTOCOLS,
    VIEWS,
    OfficialProtocol,
    aggregate_as_client,
    attacks_for_views,
    contrast_lambda,
    federation_owner,
    finding_attacks,
    run_attacks_with_replicates,
    strongest_upload,
)
from fedmia.attacker.calibrated import LiraOptions, RmiaOptions
from fedmia.core.config import AttackConfig, Participation
from fedmia.core.contracts import (
    AGGREGATE_CLIENT,
    ATTACK_COLUMNS,
    ATTACK_DTYPES,
    AUDIT_COLUMNS,
    CELL_KEYS,
    REPLICATE_COLUMNS,
    REPLICATE_DTYPES,
)
from fedmia.core.registry import import_plugins
from fedmia.privacy.audit import audit_attacks
from fedmia.stages import io
from fedmia.stages.io import available_rounds

log = logging.getLogger(__name__)


def attack(
    *,
    measures_file: str | Path,
    partition_file: str | Path,
    cell: Mapping[str, Any],
    rounds: Iterable[int] | None = None,
    manifest_file: str | Path | None = None,
    config: AttackConfig | Mapping[str, Any] | None = None,
    outlier_filter: Mapping[str, bool] | None = None,
    audit: Mapping[str, Any] | None = None,
    plugins: Sequence[str] = (),
    views: Sequence[str] = ("uploads",),
    aggregate_file: str | Path | None = None,
    outputs: Mapping[str, str | Path],
) -> None:
    """Stage 5: every attack against every target client of one cell, under each protocol.

    Under each threat view of ``views`` and membership level, the rows of every attack
    that applies there (:attr:`fedmia.attacker.attacks.AttackSpec.views`; the ``view``
    and ``membership`` columns), each level by
    :func:`fedmia.attacker.attacks.run_attacks_with_replicates` on a prepared table:

    * ``uploads``, ``client``: the paper's attacks on the uploads' measure table.
    * ``uploads``, ``federation``: the ``single`` and ``series`` attacks on the strongest
      upload's evidence per round (:func:`fedmia.attacker.attacks.strongest_upload`),
      any client's sample a member, target −1.
    * ``aggregate``, ``federation``: the same attacks on the aggregate's measures
      (``aggregate_file``), target −1.
    * ``aggregate``, ``client``: the ``contrast`` attacks on the aggregate's measures,
      who took part derived from the *keys* (round, client_id) of the uploads' measure
      table alone (:func:`took_part`), λ from the manifest's participation
      (:func:`participation_lambda`); none at full participation (no round without the
      target).

    The federation level runs the configured protocols: ``aligned`` and ``heldout``
    coincide there (every non-member is held out), ``official`` redraws the held-out
    slots per round for the one pseudo-client. The audit and the replicates are the
    uploads view's client level (without ``uploads`` in ``views``: empty tables).

    Args:
        measures_file: the cell's measure Parquet.
        partition_file: the partition Parquet (who owns each evaluation sample).
        cell: ``dataset, model, defense, partition, seed`` — written into every row.
        rounds: the observed rounds the measure table must hold (``None``: whatever it has).
        manifest_file: the train stage's manifest: after a divergence, only the rounds
            saved before it are attacked (multi-round attacks report the fewer rounds in
            ``n_rounds``; with no attacked round left they have no rows, and with no
            observed round at all every table is empty). Its ``participation`` below
            fraction 1: each target is attacked in the rounds it took part in
            (:func:`fedmia.attacker.attacks.run_attacks_with_replicates`, ``partial``).
        config: the cell's resolved ``attack`` section (:class:`fedmia.core.config.
            AttackConfig`, or a mapping validated into one; ``None``: the defaults): the
            attacks (``None``: every registered one), targets, protocols, the rounds
            multi-round attacks combine and best rounds are picked from (``rounds``;
            ``None``: every round of the table), the official protocol's options (its
            ``seed`` is the cell's), the FPR rule, FedMIA's ddof, LiRA's and RMIA's options,
            the ROC points and the bootstrap replicates per row.
        outlier_filter: attack name → whether FedMIA's outlier filter applies (the
            workflow resolves ``fedmia_outlier_filter`` by the partition's kind).
        audit: ``{target, delta}`` of the one-run audit of a partition with canaries.
        plugins: the config's ``plugins``, imported first (they register kinds).
        views: the threat views attacked (``threat.view``,
            :data:`fedmia.attacker.attacks.VIEWS`).
        aggregate_file: the aggregate view's measure table (the measure stage's
            ``.aggregate.parquet``); required with ``aggregate`` in ``views``.
        outputs: attack name → its Parquet: one row per (protocol, draw, target, round)
            (:data:`fedmia.core.contracts.ATTACK_COLUMNS`); ``audit``: the one-run ε audit, one
            row per
            attack and one for the attack selected on held-out canaries (empty without
            canaries; :data:`fedmia.core.contracts.AUDIT_COLUMNS` after the cell's keys);
            ``replicates``: the bootstrap replicates the findings need
            (:data:`fedmia.core.contracts.REPLICATE_COLUMNS`, the attacks of
            :func:`fedmia.attacker.attacks.finding_attacks` that run). Without the ``audit`` or
            ``replicates`` key that file is not written.
    """
    import_plugins(plugins)
    views = _checked_views(views, aggregate_file)
    cfg = config if isinstance(config, AttackConfig) else AttackConfig.from_dict(config or {})
    attacks = attacks_for_views(cfg.attacks, views)
    applies = {a: set(ATTACKS.get(a).views) & set(views) for a in attacks}
    attack_rounds = cfg.rounds
    lira_options, rmia_options = LiraOptions(**cfg.lira), RmiaOptions(**cfg.rmia)
    missing = sorted(set(attacks) - set(outputs))
    if missing:
        raise ValueError(f"no output file for attack(s) {missing}")
    mdm = io.read_parquet(measures_file, "measures")
    aggregate = io.read_parquet(aggregate_file, "measures") if "aggregate" in views else None
    partial = sampled_participation(manifest_file)
    if manifest_file is not None:
        rounds = available_rounds(rounds or [], manifest_file) if rounds is not None else None
        attack_rounds = (
            available_rounds(attack_rounds, manifest_file) if attack_rounds is not None else None
        )
    part = io.read_parquet(partition_file, "partition")
    lacking = [c for c in ("sample_id", "client_id", "eval") if c not in part]
    if lacking:
        raise ValueError(
            f"{partition_file} lacks column(s) {lacking}; rerun the partition "
            "stage (snakemake --forcerun partition)"
        )
    if len(mdm) == 0 and manifest_file is not None:
        log.warning(
            "no observed round before the run diverged: no attack can run; writing "
            "empty result tables"
        )
        for name in attacks:
            empty = pd.DataFrame(columns=list(ATTACK_COLUMNS))
            io.write_parquet(empty.astype(ATTACK_DTYPES), outputs[name], "attack")
        _write_audit(pd.DataFrame(columns=list(AUDIT_COLUMNS)), cell, outputs)
        _write_replicates(pd.DataFrame(columns=list(REPLICATE_COLUMNS)), cell, outputs)
        return
    if rounds is not None:
        lacking = sorted(set(rounds) - set(mdm["round"].unique().tolist()))
        if lacking:
            raise ValueError(
                f"{measures_file} lacks observed round(s) {lacking}; rerun the measure stage"
            )
    ev = part[part["eval"]]
    owner = pd.Series(ev["client_id"].to_numpy(), index=ev["sample_id"].to_numpy())
    canaries = part[part["canary"]] if "canary" in part else part.iloc[:0]
    audited = pd.DataFrame(columns=list(AUDIT_COLUMNS))
    uploads = [a for a in attacks if "uploads" in applies[a]]
    if "uploads" not in views and audit is not None and len(canaries):
        log.info("no uploads view: no one-run audit (it reads each upload)")
    if len(canaries) and audit is not None and "uploads" in views:
        audited = audit_attacks(
            uploads,
            mdm,
            pd.Series(canaries["canary_in"].to_numpy(), index=canaries["sample_id"]),
            int(audit["target"]),
            attack_rounds=attack_rounds,
            ddof=cfg.fedmia_ddof,
            outlier_filter=outlier_filter,
            lira=lira_options,
            rmia=rmia_options,
            population=owner.index[owner.to_numpy() == -1].to_numpy(),
            delta=float(audit["delta"]),
            seed=int(cell["seed"]),
            partial=partial,
        )
        log.info(
            "audit on %d canaries: ε ≥ %s",
            len(canaries),
            dict(zip(audited.attack, audited.epsilon_empirical.round(3), strict=True)),
        )
    mdm = _evaluation_set(mdm, owner, canaries, measures_file, partition_file)
    if aggregate is not None:
        aggregate = _evaluation_set(aggregate, owner, canaries, aggregate_file, partition_file)
        _check_aggregate(aggregate, mdm, aggregate_file, measures_file)
    k = int(part["client_id"].max()) + 1
    targets = list(range(k)) if cfg.targets == "all" else list(cfg.targets)
    bad = [t for t in targets if not 0 <= t < k]
    if bad:
        raise ValueError(f"attack.targets {bad} are not clients of this cell (0..{k - 1})")
    proto = OfficialProtocol(**{**cfg.official, "seed": int(cell["seed"])})
    protocol = PROTOCOLS.registered() if cfg.protocols is None else cfg.protocols
    common: dict[str, Any] = {
        "attack_rounds": attack_rounds,
        "protocols": protocol,
        "official": proto,
        "fpr_rule": cfg.fpr_rule,
        "roc_points": cfg.roc_points,
        "n_boot": cfg.bootstrap,
        "bootstrap_keys": tuple(cell[k] for k in CELL_KEYS),
    }
    t0 = time.perf_counter()
    tables: dict[str, list[pd.DataFrame]] = {a: [] for a in attacks}
    replicates = pd.DataFrame(columns=list(REPLICATE_COLUMNS))
    one_upload = [a for a in attacks if ATTACKS.get(a).kind in ("single", "series")]
    for view in views:
        if view == "uploads":  # the paper's rows, then the strongest upload's
            results, replicates = run_attacks_with_replicates(
                uploads,
                mdm,
                owner,
                targets,
                ddof=cfg.fedmia_ddof,
                outlier_filter=outlier_filter,
                lira=lira_options,
                rmia=rmia_options,
                keep_replicates=finding_attacks() if "replicates" in outputs else (),
                partial=partial,
                **common,
            )
            _collect(tables, results)
            for group in _sign_groups(one_upload):
                signals = [ATTACKS.get(a).signals[0] for a in group]
                strongest = strongest_upload(mdm, signals, partial=partial)
                _collect(tables, _federation(group, strongest, owner, view, common))
            continue
        assert aggregate is not None  # _checked_views
        contrast = [a for a in attacks if ATTACKS.get(a).kind == "contrast"]
        if contrast:
            took = took_part(mdm[["round", "client_id"]], k)
            lam = participation_lambda(manifest_file, took)
            if not (~took.to_numpy()).any():
                log.info("every client in every round: no contrast row (no round without one)")
            results, _ = run_attacks_with_replicates(
                contrast,
                aggregate,
                owner,
                targets,
                view=view,
                participants=took,
                lam=lam,
                **common,
            )
            _collect(tables, results)
        if one_upload:
            _collect(
                tables,
                _federation(one_upload, aggregate_as_client(aggregate), owner, view, common),
            )
    log.info(
        "%d attacks × %d targets × %s in %.1fs (views: %s)",
        len(attacks),
        len(targets),
        "/".join(protocol),
        time.perf_counter() - t0,
        "/".join(views),
    )
    for name, parts in tables.items():
        res = pd.concat(parts, ignore_index=True)
        for i, key in enumerate(CELL_KEYS):
            res.insert(i, key, cell[key])
        res.insert(len(CELL_KEYS), "attack", name)
        io.write_parquet(res.astype(ATTACK_DTYPES), outputs[name], "attack")
    _write_audit(audited, cell, outputs)
    _write_replicates(replicates, cell, outputs)


def _checked_views(views: Sequence[str], aggregate_file: str | Path | None) -> tuple[str, ...]:
    """``views``, checked: known, not empty, and the aggregate's measures given with it."""
    views = tuple(views)
    bad = [v for v in views if v not in VIEWS]
    if bad or not views or len(set(views)) != len(views):
        raise ValueError(
            f"views must be distinct threat views of {VIEWS.registered()} (threat.view); "
            f"got {list(views)}"
        )
    if "aggregate" in views and aggregate_file is None:
        raise ValueError(
            "the aggregate view needs the aggregate's measure table: pass aggregate_file "
            "(results/mdm/{cell}.aggregate.parquet, written by the measure stage with "
            "aggregate in threat.view)"
        )
    return views


def _evaluation_set(
    table: pd.DataFrame,
    owner: pd.Series,
    canaries: pd.DataFrame,
    measures_file: str | Path | None,
    partition_file: str | Path,
) -> pd.DataFrame:
    """The rows of ``table`` on the evaluation set; ValueError for a sample outside it."""
    measured = set(table["sample_id"].unique())
    foreign = sorted(measured - set(owner.index) - set(canaries["sample_id"]))
    if foreign:
        raise ValueError(
            f"{measures_file} holds {len(foreign)} sample(s) outside the "
            f"evaluation set of {partition_file}, e.g. sample_id {foreign[0]}: "
            "the measures belong to another partition; rerun the measure stage "
            "(snakemake --forcerun measure)"
        )
    return table[table["sample_id"].isin(owner.index)]  # the attacks see the evaluation set


def _check_aggregate(
    aggregate: pd.DataFrame,
    mdm: pd.DataFrame,
    aggregate_file: str | Path | None,
    measures_file: str | Path,
) -> None:
    """The aggregate's table is the uploads': the aggregate client, the same rounds and samples."""
    clients = sorted(set(aggregate["client_id"].unique().tolist()) - {AGGREGATE_CLIENT})
    if clients:
        raise ValueError(
            f"{aggregate_file} has rows of client(s) {clients}, not the aggregate's "
            f"client_id {AGGREGATE_CLIENT}: it is not an aggregate measure table; rerun the "
            "measure stage (snakemake --forcerun measure)"
        )
    for key, what in (("round", "rounds"), ("sample_id", "samples")):
        theirs, ours = set(mdm[key].unique().tolist()), set(aggregate[key].unique().tolist())
        if theirs != ours:
            diff = sorted(theirs ^ ours)
            raise ValueError(
                f"{aggregate_file} and {measures_file} differ in their {what} ({len(diff)}, "
                f"e.g. {key} {diff[0]}; the aggregate's measures cover the uploads' rounds "
                "with a participant and their samples): they come from different runs; rerun "
                "the measure stage (snakemake --forcerun measure)"
            )


def took_part(keys: pd.DataFrame, num_clients: int) -> pd.DataFrame:
    """Who took part in which round, from the keys of the uploads' measure table alone.

    Args:
        keys: the ``round`` and ``client_id`` columns of the uploads' measure table (a row
            per participant's measured sample: its values are never read).
        num_clients: K.

    Returns:
        bool DataFrame R×K: index the table's rounds (sorted), a column per client id
        0..K−1.
    """
    rounds = np.unique(keys["round"].to_numpy(np.int64))
    took = np.zeros((len(rounds), num_clients), dtype=bool)
    pairs = keys.drop_duplicates()
    took[np.searchsorted(rounds, pairs["round"].to_numpy()), pairs["client_id"].to_numpy()] = True
    return pd.DataFrame(took, index=rounds, columns=np.arange(num_clients))


def participation_lambda(manifest_file: str | Path | None, took: pd.DataFrame) -> float:
    """λ of the contrast attacks (:func:`fedmia.attacker.attacks.contrast_lambda`).

    From the manifest's ``participation`` (``fraction``, ``sampling``): ``uniform`` with
    m = :meth:`fedmia.core.config.Participation.size` of K, or ``poisson``. Another sampling
    (a recording's, ``recorded``): the uniform λ if every round of ``took`` has the same
    number of participants, else 1 (independent inclusion), logged. Full participation
    (no such block): 1 (no contrast row there).
    """
    block = (io.read_manifest(manifest_file).get("participation") if manifest_file else None) or {}
    fraction, sampling = float(block.get("fraction", 1.0)), block.get("sampling", "uniform")
    k = took.shape[1]
    if fraction >= 1.0:
        return 1.0
    if sampling in ("uniform", "poisson"):
        return contrast_lambda(sampling, Participation(fraction, sampling).size(k))
    sizes = np.unique(took.to_numpy().sum(axis=1))
    lam = contrast_lambda("uniform", int(sizes[0])) if len(sizes) == 1 else 1.0
    log.info(
        "participation %r: the contrast's λ = %.4g (%s participants per round)",
        sampling,
        lam,
        int(sizes[0]) if len(sizes) == 1 else "varying",
    )
    return lam


def _sign_groups(attacks: Sequence[str]) -> list[list[str]]:
    """``attacks`` in groups whose signals give each measure one sign (one table each)."""
    groups: list[tuple[dict[str, int], list[str]]] = []
    for a in attacks:
        measure, sign = ATTACKS.get(a).signals[0]
        for signs, members in groups:
            if signs.get(measure, sign) == sign:
                signs[measure] = sign
                members.append(a)
                break
        else:
            groups.append(({measure: sign}, [a]))
    return [members for _, members in groups]


def _federation(
    attacks: Sequence[str],
    table: pd.DataFrame,
    owner: pd.Series,
    view: str,
    common: Mapping[str, Any],
) -> dict[str, pd.DataFrame]:
    """The federation level's rows of ``attacks`` on a pseudo-client's ``table``."""
    results, _ = run_attacks_with_replicates(
        attacks,
        table,
        federation_owner(owner),
        [FEDERATION_CLIENT],
        view=view,
        membership="federation",
        **common,
    )
    return results


def _collect(tables: dict[str, list[pd.DataFrame]], results: Mapping[str, pd.DataFrame]) -> None:
    for name, res in results.items():
        tables[name].append(res)


def _with_cell(table: pd.DataFrame, cell: Mapping[str, Any]) -> pd.DataFrame:
    """``table`` with the cell's keys as its first columns."""
    table = table.copy()
    for i, key in enumerate(CELL_KEYS):
        table.insert(i, key, cell[key])
    return table


def _write_replicates(
    replicates: pd.DataFrame, cell: Mapping[str, Any], outputs: Mapping[str, str | Path]
) -> None:
    if "replicates" not in outputs:
        return
    if set(CELL_KEYS) - set(replicates.columns):
        replicates = _with_cell(replicates, cell)
    io.write_parquet(
        replicates[list(REPLICATE_COLUMNS)].astype(REPLICATE_DTYPES),
        outputs["replicates"],
        "replicates",
    )


def _write_audit(
    audited: pd.DataFrame, cell: Mapping[str, Any], outputs: Mapping[str, str | Path]
) -> None:
    if "audit" not in outputs:
        return
    io.write_parquet(_with_cell(audited, cell).astype({"seed": "int64"}), outputs["audit"], "audit")


def sampled_participation(manifest_file: str | Path | None) -> bool:
    """Whether the cell's manifest records sampled participants (fraction below 1).

    No manifest, or one without a ``participation`` block (an imported recording): every
    client in every round.
    """
    if manifest_file is None:
        return False
    block = io.read_manifest(manifest_file).get("participation") or {}
    return float(block.get("fraction", 1.0)) < 1.0
