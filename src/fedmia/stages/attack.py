"""Stage 5, ``attack``: every attack against every target client of a cell."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from fedmia.attacker.attacks import (
    ATTACKS,
    PROTOCOLS,
    OfficialProtocol,
    finding_attacks,
    run_attacks_with_replicates,
)
from fedmia.attacker.calibrated import LiraOptions, RmiaOptions
from fedmia.core.config import AttackConfig
from fedmia.core.contracts import (
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
    cfg = config if isinstance(config, AttackConfig) else AttackConfig.from_dict(config or {})
    attacks = list(cfg.attacks) if cfg.attacks is not None else ATTACKS.registered()
    attack_rounds = cfg.rounds
    lira_options, rmia_options = LiraOptions(**cfg.lira), RmiaOptions(**cfg.rmia)
    missing = sorted(set(attacks) - set(outputs))
    if missing:
        raise ValueError(f"no output file for attack(s) {missing}")
    mdm = io.read_parquet(measures_file, "measures")
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
    if len(canaries) and audit is not None:
        audited = audit_attacks(
            attacks,
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
    measured = set(mdm["sample_id"].unique())
    foreign = sorted(measured - set(owner.index) - set(canaries["sample_id"]))
    if foreign:
        raise ValueError(
            f"{measures_file} holds {len(foreign)} sample(s) outside the "
            f"evaluation set of {partition_file}, e.g. sample_id {foreign[0]}: "
            "the measures belong to another partition; rerun the measure stage "
            "(snakemake --forcerun measure)"
        )
    mdm = mdm[mdm["sample_id"].isin(owner.index)]  # the attacks see the evaluation set
    k = int(part["client_id"].max()) + 1
    targets = list(range(k)) if cfg.targets == "all" else list(cfg.targets)
    bad = [t for t in targets if not 0 <= t < k]
    if bad:
        raise ValueError(f"attack.targets {bad} are not clients of this cell (0..{k - 1})")
    proto = OfficialProtocol(**{**cfg.official, "seed": int(cell["seed"])})
    protocol = PROTOCOLS.registered() if cfg.protocols is None else cfg.protocols
    t0 = time.perf_counter()
    results, replicates = run_attacks_with_replicates(
        attacks,
        mdm,
        owner,
        targets,
        attack_rounds=attack_rounds,
        protocols=protocol,
        official=proto,
        ddof=cfg.fedmia_ddof,
        outlier_filter=outlier_filter,
        lira=lira_options,
        rmia=rmia_options,
        fpr_rule=cfg.fpr_rule,
        roc_points=cfg.roc_points,
        n_boot=cfg.bootstrap,
        bootstrap_keys=tuple(cell[k] for k in CELL_KEYS),
        keep_replicates=finding_attacks() if "replicates" in outputs else (),
        partial=partial,
    )
    log.info(
        "%d attacks × %d targets × %s in %.1fs",
        len(attacks),
        len(targets),
        "/".join(protocol),
        time.perf_counter() - t0,
    )
    for name, res in results.items():
        for i, key in enumerate(CELL_KEYS):
            res.insert(i, key, cell[key])
        res.insert(len(CELL_KEYS), "attack", name)
        io.write_parquet(res, outputs[name], "attack")
    _write_audit(audited, cell, outputs)
    _write_replicates(replicates, cell, outputs)


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
