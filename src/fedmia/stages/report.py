"""Stage 6, the report: tables and figures from the attack results."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from fedmia.core.contracts import CELL_KEYS
from fedmia.core.registry import import_plugins
from fedmia.federation.defenses import note_of, params_of, strength_of
from fedmia.privacy.accounting import (
    DEFAULT_DELTA,
    aggregate_epsilon,
    observer_epsilon,
    record_epsilon,
)
from fedmia.privacy.events import REPLACE_ONE
from fedmia.report import figures, findings, secagg, tables
from fedmia.report import utility as privacy_utility_tables
from fedmia.report.figures import FIGURES, TABLE_FIGURES
from fedmia.stages import io
from fedmia.stages.io import cells_frame


def report_tables(
    *,
    attack_files: Iterable[str | Path],
    manifests: Iterable[str | Path],
    selections: Sequence[str | int],
    fpr_rule: str,
    partition_kinds: Mapping[str, str] | None = None,
    table_metrics: Sequence[str] = tables.PAPER_TABLE_METRICS,
    replicate_files: Iterable[str | Path] = (),
    plugins: Sequence[str] = (),
    outputs: Mapping[str, str | Path],
) -> None:
    """Stage 6a: the tidy attack table (CSV), per-round table, Table-1 layout (MD, LaTeX).

    Args:
        attack_files: every attack Parquet of the grid.
        replicate_files: every cell's bootstrap replicates (the findings' within-run
            intervals of settings with one seed); only the rows the selections pick
            are kept in memory (:func:`fedmia.report.findings.replicate_keys`).
        manifests: every cell's train manifest (diverged cells are flagged).
        selections: how single-round attacks are reported (``report.single_round``).
        fpr_rule: the FPR rule the attack stage used (stated in the tables).
        partition_kinds: partition key → kind, for the non-iid finding.
        table_metrics: the metric rows of the Table-1 layout (``report.table_metrics``).
        plugins: the config's ``plugins``, imported first (they register attacks).
        outputs: ``csv``, ``per_round``, ``md``, ``tex``, and the findings table
            ``findings_csv``, ``findings_md``.
    """
    import_plugins(plugins)
    results = tables.with_views(
        pd.concat(
            [tables.with_views(io.read_parquet(f, "attack")) for f in attack_files],
            ignore_index=True,
        )
    )
    paper = tables.paper_rows(results)  # the findings' rows: the paper's view and level
    needed = findings.replicate_keys(paper, selections)  # the rows the findings compare
    replicates = [
        tables.paper_rows(io.read_replicates(f)).merge(needed, on=findings.REPLICATE_ROW)
        for f in replicate_files
    ]  # each file checked before any write
    summary = tables.summarize(results, selections, fpr_rule=fpr_rule, cells=cells_frame(manifests))
    per_round = results.drop(columns=["roc_fpr", "roc_tpr"])
    sections = tables.paper_tables(summary, table_metrics)
    with io.atomic_path(outputs["csv"]) as tmp:
        summary.to_csv(tmp, index=False)
    with io.atomic_path(outputs["per_round"]) as tmp:
        per_round.to_csv(tmp, index=False)
    with io.atomic_path(outputs["md"]) as tmp:
        tmp.write_text(tables.to_markdown(sections))
    with io.atomic_path(outputs["tex"]) as tmp:
        tmp.write_text(tables.to_latex(sections))
    found = findings.findings(
        paper,
        selections,
        dict(partition_kinds or {}),
        pd.concat(replicates, ignore_index=True) if replicates else None,
    )
    with io.atomic_path(outputs["findings_csv"]) as tmp:
        found.to_csv(tmp, index=False)
    with io.atomic_path(outputs["findings_md"]) as tmp:
        tmp.write_text(findings.findings_markdown(found))


def _save_figure(fig: Any, outputs: Mapping[str, str | Path], dpi: int) -> None:
    for key in ("png", "pdf"):
        # no creation date in the PDF: the same figure gives the same bytes
        meta = {"CreationDate": None} if key == "pdf" else None
        with io.atomic_path(outputs[key]) as tmp:
            fig.savefig(tmp, format=key, dpi=dpi, bbox_inches="tight", metadata=meta)
    figures.close(fig)


def report_cell_figures(
    *,
    attack_files: Iterable[str | Path],
    kind: str,
    options: Mapping[str, Any],
    plugins: Sequence[str] = (),
    outputs: Mapping[str, str | Path],
) -> None:
    """Stage 6b: one cell's figure ``kind`` (:data:`fedmia.report.figures.FIGURES`) as PNG and PDF.

    ``plugins`` (the config's) are imported first; so are they in every report stage.
    """
    import_plugins(plugins)
    cell = pd.concat([io.read_parquet(f, "attack") for f in attack_files], ignore_index=True)
    cell = tables.paper_rows(tables.with_views(cell))  # the paper's view and level
    draw = FIGURES.get(kind)
    if cell.empty:  # the cell diverged before its first observed round
        fig = figures.empty_figure(
            "no attack result: training diverged before the first observed round", options["width"]
        )
    else:
        fig = draw(cell, options)
    _save_figure(fig, outputs, options["dpi"])


def report_table_figure(
    *,
    kind: str,
    table: str | Path,
    options: Mapping[str, Any],
    args: Mapping[str, Any] | None = None,
    plugins: Sequence[str] = (),
    outputs: Mapping[str, str | Path],
) -> None:
    """Stages 6c, 6e, 6g: figure ``kind`` of a CSV table, PNG and PDF.

    ``kind``: a :data:`fedmia.report.figures.TABLE_FIGURES` name (``partitions``,
    ``privacy_utility``, ``audit``).

    ``args`` are the figure's own arguments; ``plugins`` (the config's) are imported
    first (a plugin attack adds its family).
    """
    import_plugins(plugins)
    fig = TABLE_FIGURES.get(kind)(pd.read_csv(table), width=options["width"], **(args or {}))
    _save_figure(fig, outputs, options["dpi"])


def epsilons(cells: pd.DataFrame, delta: float) -> pd.DataFrame:
    """Accounted ε per setting (dataset, model, defense, partition), RDP and PLD.

    From each cell's record of its defense's guarantee (the manifest's ``privacy``:
    the composed event of the rounds whose uploads the server saw,
    :func:`fedmia.privacy.accounting.cell_privacy`), at ``delta``; the largest over the
    setting's seeds (a seed that diverged later saw more rounds). ∞ with a note where no
    finite guarantee exists; NaN and an empty note for a defense that claims none. Under
    partial participation ``dp_rounds`` is the most rounds any client took part in (the
    server knows who took part), and ``epsilon_observer_*`` the guarantee against an
    observer of the global models only, amplified by the sampling
    (:func:`fedmia.privacy.accounting.observer_epsilon`; NaN at full participation).
    ``epsilon_aggregate_*``: against a secure-aggregation server, which sees each round's
    aggregate and who took part (:func:`fedmia.privacy.accounting.aggregate_epsilon`, the
    record's ``aggregate`` entry), the largest over seeds; NaN and ``not accounted`` where no
    seed records one.
    """
    rows = []
    for key, g in cells.groupby(tables.SETTING, sort=False):
        setting = dict(zip(tables.SETTING, key, strict=True))
        seen = int((g["diverged_round"].fillna(g["rounds"])).max())
        records = [r for r in g["privacy"] if isinstance(r, dict)]
        reports = [record_epsilon(r, delta=delta) for r in records]
        rep = max(reports, key=lambda r: r.epsilon_rdp) if reports else None
        observed = [
            (r, o) for r, o in ((r, observer_epsilon(r, delta=delta)) for r in records) if o
        ]
        obs_record, obs = (
            max(observed, key=lambda ro: ro[1].epsilon_rdp) if observed else (None, None)
        )
        obs_note = obs.note if obs else ""
        aggregated = [a for a in (aggregate_epsilon(r, delta=delta) for r in records) if a]
        agg = max(aggregated, key=lambda a: a.epsilon_rdp) if aggregated else None
        if (
            obs
            and rep
            and rep.epsilon_rdp < obs.epsilon_rdp
            and obs_record["observer"]["accountant"] == REPLACE_ONE
        ):
            # the same relation (replace one client's data): post-processing
            obs_note += (
                f"; the server's ε_RDP = {rep.epsilon_rdp:.4g} bounds an observer too "
                "(the global models are computed from the uploads): the sampled "
                "bound is looser here"
            )
        rows.append(
            {
                **setting,
                "dp_rounds": rep.rounds if rep else seen,
                "dp_delta": delta,
                "epsilon_rdp": rep.epsilon_rdp if rep else math.nan,
                "epsilon_pld": (
                    math.nan if rep is None or rep.epsilon_pld is None else rep.epsilon_pld
                ),
                "epsilon_note": rep.note if rep else "",
                "epsilon_observer_rdp": obs.epsilon_rdp if obs else math.nan,
                "epsilon_observer_pld": (
                    math.nan if obs is None or obs.epsilon_pld is None else obs.epsilon_pld
                ),
                "epsilon_observer_note": obs_note,
                "epsilon_aggregate_rdp": agg.epsilon_rdp if agg else math.nan,
                "epsilon_aggregate_pld": (
                    math.nan if agg is None or agg.epsilon_pld is None else agg.epsilon_pld
                ),
                "epsilon_aggregate_note": agg.note if agg else privacy_utility_tables.NOT_ACCOUNTED,
            }
        )
    return pd.DataFrame(
        rows,
        columns=[
            *tables.SETTING,
            *privacy_utility_tables.EPSILON_COLUMNS,
            *privacy_utility_tables.AGGREGATE_EPSILON_COLUMNS,
        ],
    )


#: Format tag of a one-shot estimate's file (``results/oneshot/{cell}.json``).
ONESHOT_FORMAT = "oneshot/1"


def read_oneshot(path: str | Path) -> dict[str, Any]:
    """One cell's one-shot estimate as a row: its keys and :data:`ONESHOT_COLUMNS`.

    The cell's keys come from the file where it states them, else from its path
    (``…/{dataset}/{model}/{defense}/{partition}/seed{seed}.json``). ``oneshot_note``
    joins the file's ``estimate`` and ``applies_to``.

    Raises:
        ValueError: a file of another format, or without the estimates.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); rerun the oneshot rule") from err
    if doc.get("format") != ONESHOT_FORMAT:
        raise ValueError(
            f"{path} has format {doc.get('format')!r}, not {ONESHOT_FORMAT!r}: it was written "
            "by another version; rerun the oneshot rule"
        )
    if all(k in doc for k in CELL_KEYS):
        keys = {k: doc[k] for k in CELL_KEYS}
    else:
        parts = path.with_suffix("").parts[-len(CELL_KEYS) :]
        if len(parts) < len(CELL_KEYS) or not parts[-1].startswith("seed"):
            raise ValueError(
                f"{path}: the cell is neither in the file nor in a path ending "
                "{dataset}/{model}/{defense}/{partition}/seed{seed}.json"
            )
        keys = dict(zip(CELL_KEYS, [*parts[:-1], int(parts[-1][len("seed") :])], strict=True))
    try:
        final, every = doc["final"]["epsilon"], doc["all_iterates"]["epsilon"]
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path} lacks final.epsilon or all_iterates.epsilon") from err
    note = "; ".join(
        t
        for t in (
            doc.get("estimate", ""),
            f"applies to {doc['applies_to']}" if doc.get("applies_to") else "",
        )
        if t
    )
    return {
        **keys,
        "epsilon_oneshot_final": float(final) if final is not None else math.nan,
        "epsilon_oneshot_all_iterates": float(every) if every is not None else math.nan,
        "test_accuracy_with_canaries": float(doc.get("test_accuracy_with_canaries", math.nan)),
        "oneshot_note": note,
    }


def report_privacy_utility(
    *,
    table: str | Path,
    manifests: Iterable[str | Path],
    defenses: Mapping[str, Mapping[str, Any]],
    output: str | Path,
    audits: Iterable[str | Path] = (),
    delta: float = DEFAULT_DELTA,
    utility: str = "final",
    oneshot: Iterable[str | Path] = (),
    plugins: Sequence[str] = (),
) -> None:
    """Stage 6d: the privacy–utility table (attack success next to test accuracy).

    ``oneshot``: the cells' one-shot estimates (:func:`read_oneshot`), where the config
    enables them (``privacy.one_shot.canaries`` > 0).

    Each cell's manifest names the cell in its keys and gives its utility (``utility``:
    the final model's test accuracy, chance for a diverged cell, or the best over the
    tested rounds, :data:`fedmia.report.utility.UTILITIES`); they are joined to the attack
    table
    on those keys, and each defense's kind, strength and other parameters
    (:func:`fedmia.federation.defenses.params_of`, e.g. ``variant=official``) on its key.
    ``plugins`` (the config's) are imported first: a defense's strength is its
    registered kind's.
    """
    import_plugins(plugins)
    strengths = pd.DataFrame(
        [
            {
                "defense": key,
                "kind": d["kind"],
                "strength": strength_of(d),
                "params": params_of(d),
                "defense_note": note_of(d),
            }
            for key, d in defenses.items()
        ]
    )
    cells = cells_frame(manifests)
    audit = pd.concat(
        [io.read_parquet(f, "audit") for f in audits] or [pd.DataFrame()], ignore_index=True
    )
    shots = [read_oneshot(f) for f in oneshot]
    pu = privacy_utility_tables.privacy_utility(
        pd.read_csv(table),
        cells,
        strengths,
        epsilons(cells, delta),
        audit,
        utility=utility,
        oneshot=pd.DataFrame(shots) if shots else None,
    )
    with io.atomic_path(output) as tmp:
        pu.to_csv(tmp, index=False)


def report_hypervolume(
    *,
    table: str | Path,
    front: str = "with_undefended",
    plugins: Sequence[str] = (),
    outputs: Mapping[str, str | Path],
) -> None:
    """Stage 6f: Table 2, the hypervolume of every defense kind's front (CSV, Markdown).

    ``front``: ``report.hypervolume_front`` (:data:`fedmia.report.utility.FRONTS`).
    """
    import_plugins(plugins)
    hv = privacy_utility_tables.hypervolume_table(pd.read_csv(table), front)
    with io.atomic_path(outputs["csv"]) as tmp:
        hv.to_csv(tmp, index=False)
    with io.atomic_path(outputs["md"]) as tmp:
        tmp.write_text(privacy_utility_tables.hypervolume_markdown(hv))


def report_secure_aggregation(
    *,
    table: str | Path,
    plugins: Sequence[str] = (),
    outputs: Mapping[str, str | Path],
) -> None:
    """Stage 6h: the secure-aggregation table (uploads vs aggregate), CSV and Markdown.

    ``table``: the attack table (``attacks.csv``), as
    :func:`fedmia.report.secagg.secure_aggregation_table` reads it.
    """
    import_plugins(plugins)
    sa = secagg.secure_aggregation_table(pd.read_csv(table))
    with io.atomic_path(outputs["csv"]) as tmp:
        sa.to_csv(tmp, index=False)
    with io.atomic_path(outputs["md"]) as tmp:
        tmp.write_text(secagg.secure_aggregation_markdown(sa))
