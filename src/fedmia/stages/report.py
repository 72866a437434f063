"""Stage 6, the report: tables and figures from the attack results."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from fedmia.core.registry import import_plugins
from fedmia.federation.defenses import note_of, params_of, strength_of
from fedmia.privacy.accounting import DEFAULT_DELTA, observer_epsilon, record_epsilon
from fedmia.privacy.events import REPLACE_ONE
from fedmia.report import figures, findings, tables
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
    results = pd.concat([io.read_parquet(f, "attack") for f in attack_files], ignore_index=True)
    needed = findings.replicate_keys(results, selections)  # the rows the findings compare
    replicates = [
        io.read_replicates(f).merge(needed, on=findings.REPLICATE_ROW) for f in replicate_files
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
        results,
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
            }
        )
    return pd.DataFrame(rows, columns=[*tables.SETTING, *privacy_utility_tables.EPSILON_COLUMNS])


def report_privacy_utility(
    *,
    table: str | Path,
    manifests: Iterable[str | Path],
    defenses: Mapping[str, Mapping[str, Any]],
    output: str | Path,
    audits: Iterable[str | Path] = (),
    delta: float = DEFAULT_DELTA,
    utility: str = "final",
    plugins: Sequence[str] = (),
) -> None:
    """Stage 6d: the privacy–utility table (attack success next to test accuracy).

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
    pu = privacy_utility_tables.privacy_utility(
        pd.read_csv(table), cells, strengths, epsilons(cells, delta), audit, utility=utility
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
