"""Tables and figures from the attack results (pure: DataFrames in, DataFrames/figures out).

Input everywhere is the concatenation of attack-stage tables: one row per
``(dataset, model, defense, partition, seed, attack, protocol, draw, target, round)``
with the metrics of :mod:`fedmia.attacker.metrics` (``round = -1``: a multi-round score),
``attacked`` (whether a single-round attack's round is one of the attacked rounds),
``n_rounds`` and the ROC points ``roc_fpr``, ``roc_tpr``
(:data:`fedmia.core.contracts.RESULT_COLUMNS`).

**How a single-round attack is reported** (``report.single_round``, :data:`SELECTIONS`):
a single-round attack has one score per observed round, and a table shows one of them:

* ``best_tpr_per_target`` — the official code's choice (mia_attack_auto.py, which attacks
  one target, client 0): for each target on its own, the attacked round with the highest
  TPR at FPR 0.1 %, ties to the earliest round (the official's stable sort), and that
  round's other metrics;
* ``best_tpr_mean`` — the attacked round with the highest TPR at FPR 0.1 % of the *mean*
  over targets (one round for all targets: its mean TPR is never higher than
  ``best_tpr_per_target``'s);
* ``best_auc`` — the attacked round with the highest mean AUC over targets;
* ``last`` — the last attacked round (no hindsight);
* a round number — that observed round.

A best round is picked with hindsight, separately per seed and per official draw; ties go
to the earliest round. Where TPR at FPR 0.1 % is undefined (fewer than 1,000 non-members
under the ``at_most`` rule), the ``best_tpr_*`` selections fall back to the best AUC (of
the target, or of the mean) and the table says so. The name ``best_tpr`` of earlier
versions picked on the mean over targets while calling it the official choice; it is
retired: :func:`check_selection` names the two that replace it.

A run (cell × protocol draw) without an attacked round before its training diverged has
no single-round row under any selection but a fixed round it observed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from fedmia.attacker import metrics, uncertainty  # noqa: E402
from fedmia.attacker.attacks import (  # noqa: E402
    ATTACKS,
    FINDING_PAIRS,
    SELECTED,
    attack_order,
    families,
    finding_attacks,
    single_round_attacks,
)
from fedmia.attacker.metrics import METRICS, tpr_metric_name  # noqa: E402
from fedmia.core.config import SELECTIONS, check_selection  # noqa: E402, F401
from fedmia.core.contracts import CELL_KEYS, REPLICATE_KEYS, REPLICATE_METRICS  # noqa: E402
from fedmia.core.registry import FIGURES  # noqa: E402

SETTING = ["dataset", "model", "defense", "partition"]
#: The keys of one table row before the attack: setting and protocol.
ROW_KEYS = [*SETTING, "protocol"]
#: One set of per-target results: a cell under one protocol draw.
RUN = [*SETTING, "seed", "protocol", "draw"]
#: ``single_round`` of multi-round attacks in the tables.
ALL_ROUNDS = "all attacked rounds"
HEADLINE_TPR = tpr_metric_name(0.001)
#: Columns of :func:`summarize` (``results/tables/attacks.csv``).
SUMMARY_COLUMNS = (*ROW_KEYS, "single_round", "attack", "metric", "mean", "ci_low",
                   "ci_high", "std", "n", "n_defined", "draw_std", "n_nonmembers",
                   "fp_allowed", "fp_median", "low_count", "rounds", "selected_by",
                   "fpr_rule", "note", "diverged")


def _label(attack: str) -> str:
    return ATTACKS.get(attack).label


def select_rounds(results: pd.DataFrame, how: str | int = "best_tpr_per_target"
                  ) -> pd.DataFrame:
    """The rows of each run (cell × protocol draw) and attack at one round.

    Multi-round attacks keep their ``round = -1`` rows. Single-round attacks keep the
    rows of the round ``how`` picks (see the module docstring): per target for
    ``best_tpr_per_target``, on the mean over targets otherwise; a column
    ``selected_by`` says which rule picked it (``… (fallback: TPR@0.1% undefined)`` where
    a ``best_tpr_*`` selection had to fall back to the AUC). A run without an attacked
    round (training diverged before the first one) has no single-round row.

    Raises:
        ValueError: an unknown selection, or a fixed round a run did not observe.
    """
    check_selection(how)
    keys = [*RUN, "attack"]
    multi = results[results["round"] == -1].assign(selected_by=ALL_ROUNDS)
    single = results[(results["round"] >= 0)
                     & results["attack"].isin(single_round_attacks())]
    if single.empty:
        return multi.reset_index(drop=True)
    if isinstance(how, int):
        means = single.groupby([*keys, "round"], as_index=False).agg(auc=("auc", "mean"))
        pick = means[means["round"] == how]
        lacking = (means[keys].drop_duplicates().merge(pick[keys], how="left", indicator=True)
                   .query("_merge == 'left_only'"))
        if len(lacking):
            raise ValueError(f"report.single_round = {how}: round {how} was not observed in "
                             f"{len(lacking)} run(s), e.g. {lacking.iloc[0][keys].to_dict()}; "
                             "choose an observed round")
        pick = pick.assign(selected_by=f"round {how}")
    else:
        per_target = how == "best_tpr_per_target"
        by = [*keys, "target"] if per_target else keys
        cand = (single.groupby([*by, "round"], as_index=False)
                .agg(auc=("auc", "mean"), tpr=(HEADLINE_TPR, "mean"),
                     attacked=("attacked", "all")))
        cand = cand[cand["attacked"]].sort_values([*by, "round"], ignore_index=True)
        if how == "last":
            pick = cand.groupby(by, as_index=False).tail(1).assign(selected_by="last")
        elif how == "best_auc":
            pick = _best(cand, by, "auc").assign(selected_by=how)
        else:
            undefined = cand["tpr"].isna().groupby([cand[k] for k in by]).transform("all")
            undefined = undefined.astype(bool)
            cand = cand.assign(tpr=cand["tpr"].where(~undefined, cand["auc"]),
                               selected_by=np.where(undefined, _fallback_text(how), how))
            pick = _best(cand, by, "tpr")
        pick = pick[[*by, "round", "selected_by"]]
    chosen = single.merge(pick, on=[c for c in pick.columns if c != "selected_by"])
    return pd.concat([chosen, multi], ignore_index=True)


def _best(cand: pd.DataFrame, by: list[str], col: str) -> pd.DataFrame:
    """Per group ``by`` of ``cand`` (sorted by round), the row with the highest ``col``.

    ``idxmax`` takes the first maximum: rows are sorted by round, so ties go to the
    earliest round, as the official's stable sort. An empty ``cand`` gives no row.
    """
    if cand.empty:
        return cand
    return cand.loc[cand.groupby(by)[col].idxmax()]


def _fallback_text(how: str) -> str:
    target = "each target" if how == "best_tpr_per_target" else "the mean"
    return f"best AUC of {target} (fallback: TPR@0.1% undefined)"


def _alpha(metric: str) -> float | None:
    """The FPR level of a TPR metric name (``tpr@0.1%`` → 0.001); ``None`` otherwise."""
    return next((a for a in metrics.FPR_LEVELS if metrics.tpr_metric_name(a) == metric), None)


def _long(rows: pd.DataFrame, id_vars: list[str]) -> pd.DataFrame:
    """One row per (result row, metric): ``value``, its row interval and false positives.

    Result tables of before the intervals (or with ``n_boot = 0``) get NaN intervals.
    """
    parts = []
    for m in METRICS:
        part = rows[id_vars].copy()
        part["metric"] = m
        part["value"] = rows[m]
        for extra in ("ci_low", "ci_high", "fp"):
            col = f"{m}_{extra}"
            part[extra] = rows[col] if col in rows else math.nan
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def summary_interval(group: pd.DataFrame, key: tuple, n_boot: int = 1000
                     ) -> tuple[float, float]:
    """95 % interval of a summary row's mean over targets (and seeds and draws).

    The units are the (seed, target) pairs, each the mean of its rows (official draws);
    with two or more units, the percentile bootstrap of the mean over resampled units
    (:func:`fedmia.attacker.uncertainty.mean_interval`). Resampling the top level alone covers
    both sources: each unit's value carries its own evaluation-sample noise, so the
    spread of the units holds the within-target sampling too (resampling both levels
    would count it twice; Davison & Hinkley 1997, §3.8). With one unit: the bootstrap
    interval of its single row, or the spread over its draws.
    """
    units = group.groupby(["seed", "target"])["value"].mean().to_numpy()
    seed = uncertainty.stable_seed(*(str(k) for k in key))
    if len(units) >= 2:
        return uncertainty.mean_interval(units, n_boot=n_boot, seed=seed)
    if len(group) == 1:
        return float(group["ci_low"].iloc[0]), float(group["ci_high"].iloc[0])
    return uncertainty.mean_interval(group["value"].to_numpy(), n_boot=n_boot, seed=seed)


def _rounds_text(rounds: pd.Series) -> str:
    vals = sorted(set(int(r) for r in rounds))
    return ", ".join(str(r) for r in vals)


def _divergence(cells: pd.DataFrame | None) -> pd.DataFrame:
    """Per setting: the earliest round a seed diverged in (NaN if none) and a note."""
    cols = [*SETTING, "diverged_round", "diverged"]
    if cells is None or cells.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for key, g in cells.groupby(SETTING, sort=False):
        hit = g[g["diverged_round"].notna()]
        note = "; ".join(f"seed {int(r.seed)} diverged in round {int(r.diverged_round)}"
                         for r in hit.itertuples())
        rows.append(dict(zip(SETTING, key, strict=True),
                         diverged_round=hit["diverged_round"].min() if len(hit) else math.nan,
                         diverged=note))
    return pd.DataFrame(rows, columns=cols)


def summarize(results: pd.DataFrame,
              selections: Sequence[str | int] = ("best_tpr_per_target", "last"),
              *, fpr_rule: str = "at_most", cells: pd.DataFrame | None = None) -> pd.DataFrame:
    """Tidy attack table: one row per setting, protocol, selection, attack and metric.

    Values are ``mean, std, n`` over targets × seeds × draws; ``draw_std`` is the std
    over official draws of the per-draw mean (the spread of one official run; NaN for
    ``aligned``). Single-round attacks appear once per selection (``single_round``
    names it, ``rounds`` lists the round(s) it picked); multi-round attacks once, with
    ``single_round`` = :data:`ALL_ROUNDS` and ``rounds`` the number of rounds combined.
    A metric undefined for some rows (TPR at an FPR below 1/#non-members) has ``mean``
    NaN and a ``note``.

    ``cells`` (one row per cell: its keys and ``diverged_round``, NaN if training
    finished; the train stage's manifests) flags settings whose training diverged
    (``diverged``): their attacks use only the rounds observed before, and a setting
    with no attack row at all (it diverged before any observed round) still gets a row
    per attack and metric, all NaN.
    """
    out = []
    selected = []
    for i, how in enumerate(selections):
        sel = select_rounds(results, how)
        if i > 0:
            sel = sel[sel["round"] >= 0]  # multi-round rows once
        selected.append(sel.assign(single_round=np.where(sel["round"] >= 0, str(how),
                                                         ALL_ROUNDS)))
    sel = pd.concat(selected, ignore_index=True)
    keys = [*ROW_KEYS, "single_round", "attack"]
    long = _long(sel, [*keys, "seed", "draw", "target", "round", "n_rounds", "n_nonmembers",
                       "selected_by"])
    for key, g in long.groupby([*keys, "metric"], sort=False):
        per_draw = g.groupby(["seed", "draw"])["value"].mean()
        official = key[ROW_KEYS.index("protocol")] == "official"
        single = g["round"].iloc[0] >= 0
        defined = int(g["value"].count())
        row = dict(zip([*keys, "metric"], key, strict=True))
        q = int(g["n_nonmembers"].min())
        alpha = _alpha(key[-1])
        row.update(
            mean=g["value"].mean() if defined == len(g) else math.nan,
            std=g["value"].std(), n=len(g), n_defined=defined,
            **dict(zip(("ci_low", "ci_high"), summary_interval(g, key) if defined == len(g)
                       else (math.nan, math.nan), strict=True)),
            draw_std=per_draw.std() if official and len(per_draw) > 1 else math.nan,
            n_nonmembers=q,
            fp_allowed=(metrics.max_false_positives(q, alpha, fpr_rule)
                        if alpha is not None and metrics.tpr_at_fpr_defined(q, alpha, fpr_rule)
                        else math.nan),
            fp_median=g["fp"].median() if alpha is not None else math.nan,
            low_count=alpha is not None and alpha * q < 10,
            rounds=_rounds_text(g["round"]) if single else f"{int(g['n_rounds'].iloc[0])}",
            selected_by="; ".join(sorted(set(g["selected_by"]))),
            fpr_rule=fpr_rule,
            note="" if defined == len(g) else
            "undefined for some targets: fewer non-members than 1/FPR")
        out.append(row)
    table = pd.DataFrame(out, columns=[c for c in SUMMARY_COLUMNS if c != "diverged"])
    div = _divergence(cells)
    lost = div.merge(table[SETTING].drop_duplicates(), how="left", indicator=True)
    lost = lost[(lost["_merge"] == "left_only") & lost["diverged_round"].notna()]
    if len(lost):
        protocols = list(dict.fromkeys(results["protocol"])) or ["aligned"]
        attacks = list(dict.fromkeys(results["attack"])) or attack_order()
        # each attack where it would be had the cell not diverged: a single-round attack
        # once per selection, a multi-round one once
        placed = [(a, how) for a in attacks
                  for how in ([ALL_ROUNDS] if ATTACKS.get(a).multi_round
                              else [str(h) for h in selections])]
        filler = [dict(zip(SETTING, key, strict=True), protocol=p, single_round=how,
                       attack=a, metric=m, n=0, n_defined=0, fpr_rule=fpr_rule, rounds="0",
                       selected_by="", note="no attacked round before the divergence")
                  for key in lost[SETTING].itertuples(index=False) for p in protocols
                  for a, how in placed for m in METRICS]
        table = pd.concat([table, pd.DataFrame(filler)], ignore_index=True)
    table = table.merge(div[[*SETTING, "diverged"]], on=SETTING, how="left")
    table["diverged"] = table["diverged"].fillna("")
    order = {a: i for i, a in enumerate(attack_order())}
    table = table.sort_values(
        [*ROW_KEYS, "single_round", "attack", "metric"],
        key=lambda s: s.map(order) if s.name == "attack" else s, kind="stable")
    return table[list(SUMMARY_COLUMNS)].reset_index(drop=True)


PROTOCOL_TEXT = {
    "aligned": "non-members aligned: the same samples for every client and round (fedmia)",
    "official": "non-members redrawn per client and round, as the official code",
}
SELECTION_TEXT = {
    "best_tpr_per_target": "for each target its own attacked round with the highest "
                           "TPR@0.1% (the official code's choice, picked with hindsight)",
    "best_tpr_mean": "the attacked round with the highest TPR@0.1% of the mean over targets "
                     "(picked with hindsight; not the official choice)",
    "best_auc": "the attacked round with the highest mean AUC (picked with hindsight)",
    "last": "the last attacked round (no hindsight)",
}
FPR_RULE_TEXT = {"at_most": "TPR at FPR ≤ α (fedmia)", "below": "TPR at FPR < α (the official "
                 "code)"}


def _selection_text(how: str) -> str:
    return SELECTION_TEXT.get(how, f"round {how}" if how.isdigit() else how)


def caption(summary: pd.DataFrame, protocol: str, selection: str) -> str:
    """The caption line of one table section: every convention it used."""
    part = summary[summary.protocol == protocol]
    placed = part["n"] > 0  # rows of a cell that diverged before any attacked round: n/a
    single = part[(part.single_round == selection) & placed]
    multi = part[(part.single_round == ALL_ROUNDS) & placed]
    n_non = sorted(set(part["n_nonmembers"].dropna().astype(int)))
    res = ", ".join(f"1/{q:,}" for q in n_non)
    bits = [f"Protocol `{protocol}`: {PROTOCOL_TEXT.get(protocol, protocol)}"]
    if len(single):
        picked = sorted(set(single["selected_by"]))
        rounds = sorted(set(", ".join(single["rounds"]).split(", ")), key=int)
        bits.append(f"single-round attacks: `{selection}`, {_selection_text(selection)}"
                    + (f" [{'; '.join(p for p in picked if p != selection)}]"
                       if set(picked) - {selection} else "")
                    + f"; rounds picked: {', '.join(rounds)}")
    if len(multi):
        bits.append("multi-round attacks over "
                    + "/".join(sorted(set(multi["rounds"]), key=int)) + " attacked rounds")
    lost = sorted(set(part.loc[~placed, "diverged"].dropna()) - {""})
    if lost:
        bits.append("n/a where training diverged before the first attacked round ("
                    + "; ".join(lost) + ")")
    rules = sorted(set(part["fpr_rule"]))
    bits.append("; ".join(FPR_RULE_TEXT.get(r, r) for r in rules))
    unit = "targets × seeds" + (" × draws" if protocol == "official" else "")
    ns = sorted(set(part["n"].astype(int)) - {0})
    bits.append(f"mean over {unit} (n = {'/'.join(map(str, ns))}) [95 % bootstrap "
                "interval over targets and seeds]")
    bits.append(f"FPR resolution {res} (1 / non-members)")
    tpr = part[part.metric == HEADLINE_TPR]
    allowed = sorted(set(tpr["fp_allowed"].dropna().astype(int)))
    if allowed:
        bits.append(f"TPR@0.1% rests on at most {'/'.join(map(str, allowed))} false "
                    "positive(s)" + (" — α × non-members < 10: a percentile interval "
                                     "undercovers there" if tpr["low_count"].any() else ""))
    if part["low_count"].fillna(False).astype(bool).any():
        bits.append("a row marked '< 10 FP' rests on fewer than 10 false positives: read it "
                    "as a wide range, not a point")
    return " · ".join(bits) + "."


#: ``report.table_metrics`` of the paper's Table 1.
PAPER_TABLE_METRICS = (HEADLINE_TPR, "auc")


def _metric_label(metric: str) -> str:
    """A metric's row label in the Table-1 layout (TPRs in percent)."""
    if metric == "auc":
        return "AUC"
    if metric == "balanced_accuracy":
        return "balanced accuracy"
    return metric.replace("tpr", "TPR") + " (%)"


def paper_tables(summary: pd.DataFrame, table_metrics: Sequence[str] = PAPER_TABLE_METRICS
                 ) -> list[tuple[str, str, pd.DataFrame]]:
    """The paper's Table 1 layout, one section per (protocol, single-round selection).

    Args:
        summary: :func:`summarize` output.
        table_metrics: the metric rows of each setting, in order (``report.table_metrics``;
            the paper's are TPR@0.1 % and AUC).

    Returns:
        ``(title, caption, table)`` per section; a table has one row per setting × metric,
        the attacks as columns (paper names), TPR in percent, cells ``mean [95 %
        interval]`` (``n/a`` where undefined); a TPR row resting on fewer than 10 false
        positives (α × non-members < 10) says so in its label.
    """
    unknown = [m for m in table_metrics if m not in METRICS]
    if unknown or not table_metrics:
        raise ValueError(f"unknown or no table metric(s) {unknown}; choose from {list(METRICS)}")
    out = []
    selections = [s for s in dict.fromkeys(summary["single_round"]) if s != ALL_ROUNDS]
    for protocol in dict.fromkeys(summary["protocol"]):
        for selection in selections or [ALL_ROUNDS]:
            part = summary[(summary.protocol == protocol)
                           & summary.single_round.isin([selection, ALL_ROUNDS])]
            title = f"protocol {protocol}" + (
                f" · single-round attacks at {selection}" if selection != ALL_ROUNDS else "")
            out.append((title, caption(summary, protocol, selection),
                        _layout(part, table_metrics)))
    return out


def _layout(summary: pd.DataFrame, table_metrics: Sequence[str]) -> pd.DataFrame:
    rows = []
    attacks = [a for a in attack_order() if a in set(summary["attack"])]
    diverged = summary["diverged"].fillna("")
    flag = (diverged != "").any()
    for setting, g in summary.groupby(SETTING, sort=False):
        for metric in table_metrics:
            few = g.loc[g.metric == metric, "low_count"].fillna(False).astype(bool).any()
            row = dict(zip(SETTING, setting, strict=True),
                       metric=_metric_label(metric) + (" < 10 FP" if few else ""))
            if flag:
                row["diverged"] = diverged[g.index].iloc[0]
            for a in attacks:
                r = g[(g.attack == a) & (g.metric == metric)]
                if r.empty or not np.isfinite(r["mean"].iloc[0]):
                    row[_label(a)] = "n/a"
                    continue
                row[_label(a)] = _cell(r.iloc[0], metric)
            rows.append(row)
    return pd.DataFrame(rows)


def _cell(row: pd.Series, metric: str) -> str:
    """``mean [ci_low, ci_high]`` (TPR in percent), or ``mean ± std`` without an interval."""
    scale, fmt = (100, "{:.2f}") if metric != "auc" else (1, "{:.3f}")
    m = fmt.format(row["mean"] * scale)
    lo, hi = row.get("ci_low", math.nan), row.get("ci_high", math.nan)
    if np.isfinite(lo) and np.isfinite(hi):
        return f"{m} [{fmt.format(lo * scale)}, {fmt.format(hi * scale)}]"
    sd = row["std"]
    return m if math.isnan(sd) else f"{m} ± {fmt.format(sd * scale)}"


def _md_table(table: pd.DataFrame) -> str:
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(False)]
    return "\n".join(lines) + "\n"


def to_markdown(sections: list[tuple[str, str, pd.DataFrame]]) -> str:
    """GitHub-flavoured Markdown: per section a heading, its caption line and the table."""
    return "\n".join(f"### {title}\n\n{cap}\n\n{_md_table(t)}" for title, cap, t in sections)


def _tex(v: object) -> str:
    return (str(v).replace("%", r"\%").replace("_", r"\_").replace("±", r"$\pm$")
            .replace("≤", r"$\le$").replace("×", r"$\times$").replace("`", ""))


def to_latex(sections: list[tuple[str, str, pd.DataFrame]]) -> str:
    """Booktabs LaTeX tabulars, each preceded by its caption as a comment and a paragraph."""
    out = []
    for title, cap, table in sections:
        cols = list(table.columns)
        out += [f"% {title}", r"\paragraph{" + _tex(title) + "} " + _tex(cap), "",
                r"\begin{tabular}{" + "l" * len(cols) + "}", r"\toprule",
                " & ".join(_tex(c) for c in cols) + r" \\", r"\midrule"]
        out += [" & ".join(_tex(v) for v in row) + r" \\" for row in table.itertuples(False)]
        out += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------- figures


def close(fig: plt.Figure) -> None:
    """Free a figure once it is saved (pyplot keeps every figure it made open)."""
    plt.close(fig)


def empty_figure(message: str, width: float = 11) -> plt.Figure:
    """A figure that says why there is nothing to draw (e.g. a cell that diverged early)."""
    fig, axes = _figure(1, 1, width * 0.5)
    axes[0, 0].text(0.5, 0.5, message, ha="center", va="center", wrap=True, fontsize=9)
    axes[0, 0].set_axis_off()
    return fig


def _band(values: np.ndarray, key: tuple, n_boot: int = 1000) -> tuple:
    """95 % bootstrap interval of the mean over units (axis 0) of ``values`` (U or U×G).

    One resample of the units serves every column (pointwise bands of a mean curve);
    seeded from ``key``. A single unit gives a zero-width band.
    """
    v = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(uncertainty.stable_seed(*(str(k) for k in key)))
    idx = rng.integers(0, len(v), size=(n_boot, len(v)))
    means = v[idx].mean(axis=1)  # B (or B×G)
    lo, hi = np.nanpercentile(means, [2.5, 97.5], axis=0)
    return lo, hi


def _figure(rows: int, cols: int, width: float) -> tuple[plt.Figure, np.ndarray]:
    fig, axes = plt.subplots(rows, cols, figsize=(width, width / cols * 0.8 * rows),
                             squeeze=False)
    return fig, axes


def _colors() -> dict[str, str]:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {a: cycle[i % len(cycle)] for i, a in enumerate(attack_order())}


def rounds_figure(cell: pd.DataFrame, fpr: float, width: float = 11) -> plt.Figure:
    """TPR at ``fpr`` and AUC versus round for one cell, one row per protocol.

    Means over targets (and official draws), with 95 % bootstrap bands over targets
    (:func:`_band`). Single-round attacks are lines over the observed rounds, filled
    markers at attacked rounds and hollow ones at rounds observed only for the figure;
    multi-round attacks are horizontal dashed lines (the official code's main figure).
    """
    if fpr not in metrics.FPR_LEVELS:
        raise ValueError(f"round_plot_fpr must be one of {', '.join(map(str, metrics.FPR_LEVELS))}"
                         f" (got {fpr})")
    metric = tpr_metric_name(fpr)
    protocols = list(dict.fromkeys(cell["protocol"]))
    fig, axes = _figure(len(protocols), 2, width)
    colors = _colors()
    for row, protocol in enumerate(protocols):
        part = cell[cell.protocol == protocol]
        means = part.groupby(["attack", "round"], as_index=False).agg(
            **{m: (m, "mean") for m in METRICS}, attacked=("attacked", "all"))
        bands = {(a, r, m): _band(g.groupby("target")[m].mean().to_numpy(), (a, r, m))
                 for (a, r), g in part.groupby(["attack", "round"])
                 for m in (metric, "auc")}
        for ax, m, label in ((axes[row, 0], metric, f"TPR at FPR {fpr:.1%}"),
                             (axes[row, 1], "auc", "AUC")):
            for a in [a for a in attack_order() if a in set(means.attack)]:
                g = means[means.attack == a]
                per_round = g[g["round"] >= 0].sort_values("round")
                if len(per_round):
                    ax.plot(per_round["round"], per_round[m], "-", color=colors[a],
                            label=_label(a))
                    lo, hi = zip(*(bands[a, r, m] for r in per_round["round"]), strict=True)
                    ax.fill_between(per_round["round"], lo, hi, color=colors[a], alpha=0.12,
                                    lw=0)
                    hit = per_round[per_round["attacked"]]
                    miss = per_round[~per_round["attacked"]]
                    ax.plot(hit["round"], hit[m], "o", color=colors[a])
                    ax.plot(miss["round"], miss[m], "o", mfc="none", color=colors[a])
                multi = g[g["round"] == -1]
                if len(multi):
                    ax.axhline(multi[m].iloc[0], ls="--", color=colors[a], label=_label(a))
                    lo, hi = bands[a, -1, m]  # the interval as a bar at the right edge
                    x = means["round"].max() * 1.04 + 0.5 + 0.25 * attack_order().index(a)
                    ax.plot([x, x], [lo, hi], color=colors[a], lw=2.5, alpha=0.7)
            ax.axhline(0.5 if m == "auc" else fpr, color="grey", lw=0.8, ls=":")
            ax.set_xlabel("round")
            ax.set_ylabel(label)
            ax.set_title(f"protocol: {protocol}", fontsize=9)
            ax.grid(alpha=0.3)
    axes[0, 1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    return fig


def roc_figure(cell: pd.DataFrame, selection: str | int = "best_tpr_per_target",
               width: float = 11) -> plt.Figure:
    """Log-log ROC curves per attack (mean TPR over targets on a common FPR grid).

    One panel per protocol; single-round attacks at the round ``selection`` picks,
    multi-round attacks over the attacked rounds; bands: pointwise 95 % bootstrap
    intervals of the mean curve over targets (and draws).
    """
    sel = select_rounds(cell, selection)
    if sel.empty:  # only rounds observed for the figures before the training diverged
        return empty_figure("no attacked round before the training diverged: no ROC curve "
                            f"under selection {selection!r}", width)
    protocols = list(dict.fromkeys(sel["protocol"]))
    fig, axes = _figure(1, len(protocols), width * 0.5 * len(protocols))
    grid = np.logspace(-4, 0, 200)
    colors = _colors()
    for ax, protocol in zip(axes[0], protocols, strict=True):
        part = sel[sel.protocol == protocol]
        lo_all = 1.0
        for a in [a for a in attack_order() if a in set(part.attack)]:
            g = part[part.attack == a]
            tprs = np.array([np.interp(grid, np.asarray(f), np.asarray(t)) for f, t in
                             zip(g.roc_fpr, g.roc_tpr, strict=True)])  # rows × grid
            lo = max(min(np.asarray(f)[np.asarray(f) > 0].min() for f in g.roc_fpr), 1e-4)
            lo_all = min(lo_all, lo)
            keep = grid >= lo
            ax.loglog(grid[keep], tprs.mean(axis=0)[keep], color=colors[a],
                      label=f"{_label(a)} (AUC {g.auc.mean():.3f})")
            band_lo, band_hi = _band(tprs, (protocol, a, "roc"))
            ax.fill_between(grid[keep], np.maximum(band_lo[keep], 1e-4), band_hi[keep],
                            color=colors[a], alpha=0.12, lw=0)
        ax.loglog(grid, grid, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_xlim(lo_all, 1)
        ax.set_title(f"protocol: {protocol}; single-round: {selection}", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    return fig


#: A per-cell figure (``results/figures/{cell}/<name>.png``): the cell's attack tables
#: (concatenated) and the ``report`` options → the figure.
CellFigure = Callable[[pd.DataFrame, Mapping[str, Any]], plt.Figure]


@FIGURES.register("rounds")
def cell_rounds_figure(cell: pd.DataFrame, options: Mapping[str, Any]) -> plt.Figure:
    """:func:`rounds_figure` at ``report.round_plot_fpr``."""
    return rounds_figure(cell, options["round_plot_fpr"], options["width"])


@FIGURES.register("roc")
def cell_roc_figure(cell: pd.DataFrame, options: Mapping[str, Any]) -> plt.Figure:
    """:func:`roc_figure` at the first of ``report.single_round``."""
    selection = options["single_round"]
    selection = selection[0] if isinstance(selection, list | tuple) else selection
    return roc_figure(cell, selection, options["width"])


def _headline(summary: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The summary rows of the first protocol and first single-round selection."""
    protocol = summary["protocol"].iloc[0]
    selections = [s for s in dict.fromkeys(summary["single_round"]) if s != ALL_ROUNDS]
    selection = selections[0] if selections else ALL_ROUNDS
    part = summary[(summary.protocol == protocol)
                   & summary.single_round.isin([selection, ALL_ROUNDS])]
    return part, f"protocol {protocol}, single-round attacks at {selection}"


def partitions_figure(summary: pd.DataFrame, width: float = 11) -> plt.Figure:
    """Bars of AUC and TPR@1% per attack, one bar per partition (iid vs non-iid).

    Drawn for the table's first protocol and first single-round selection (the title
    says which).
    """
    summary, what = _headline(summary)
    fig, axes = _figure(1, 2, width)
    attacks = [a for a in attack_order() if a in set(summary.attack)]
    parts = list(dict.fromkeys(summary.partition))
    w = 0.8 / max(len(parts), 1)
    x = np.arange(len(attacks))
    for ax, metric in zip(axes[0], ("auc", tpr_metric_name(0.01)), strict=True):
        for i, p in enumerate(parts):
            g = summary[(summary.partition == p) & (summary.metric == metric)]
            g = g.groupby("attack")[["mean", "std"]].mean().reindex(attacks)
            ax.bar(x + i * w - 0.4 + w / 2, g["mean"], w, yerr=g["std"].fillna(0), label=p,
                   capsize=2)
        ax.set_xticks(x, [ATTACKS.get(a).paper[0] or a for a in attacks], rotation=45,
                      ha="right")
        ax.set_ylabel(metric.upper() if metric == "auc" else "TPR at FPR 1%")
        if metric == "auc":
            ax.set_ylim(0.4, 1.0)
            ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.grid(alpha=0.3, axis="y")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(what, fontsize=9)
    fig.tight_layout()
    return fig


#: Columns of :func:`privacy_utility` (``results/tables/privacy_utility.csv``).
#: The accounted-ε columns of :func:`privacy_utility`.
EPSILON_COLUMNS = ("dp_rounds", "dp_delta", "epsilon_rdp", "epsilon_pld", "epsilon_note")
PU_COLUMNS = ("dataset", "model", "partition", "defense", "kind", "strength", "params",
              "test_accuracy", "utility", "n_seeds", "last_finite_accuracy", "diverged",
              "diverged_round", *EPSILON_COLUMNS,
              "epsilon_empirical", "epsilon_empirical_selected", "selected_attack",
              "protocol", "single_round", "attack", "metric", "mean",
              "ci_low", "ci_high", "std", "rounds")


#: ``report.utility`` → (the cells' column, how the tables name it).
UTILITIES = {
    "final": ("final_test_accuracy", "final test accuracy"),
    "best": ("best_test_accuracy", "best test accuracy over rounds (hindsight, as the "
             "official code also records)"),
}


def privacy_utility(summary: pd.DataFrame, cells: pd.DataFrame,
                    strengths: pd.DataFrame, epsilons: pd.DataFrame | None = None,
                    audit: pd.DataFrame | None = None, utility: str = "final"
                    ) -> pd.DataFrame:
    """Join attack success with utility per defense.

    Args:
        summary: :func:`summarize` output.
        cells: one row per cell: its keys, ``final_test_accuracy`` (the final model's test
            accuracy; chance, 1 / classes, for a diverged cell), ``best_test_accuracy``
            (the best over the tested rounds), ``last_finite_test_accuracy`` and
            ``diverged_round`` (NaN if none) — the train stage's manifests.
        strengths: ``defense, kind, strength, params`` per defense key (``params``: the
            defense's other parameters not at their defaults, e.g. ``variant=official``,
            :func:`fedmia.federation.defenses.params_of`).
        epsilons: per setting, :data:`EPSILON_COLUMNS` (accounted ε of a ``dp`` defense,
            ∞ where none is finite; NaN where the defense claims none).
        audit: the one-run audits (:data:`fedmia.core.contracts.AUDIT_COLUMNS` with the cells'
            keys): ``epsilon_empirical`` of each attack, on the aligned protocol's rows
            only (the smallest over seeds, each a valid bound at level β for that one
            attack, chosen in advance; the largest of them over attacks is *not* a bound
            at level β); NaN without.
        utility: ``report.utility`` (:data:`UTILITIES`): the final test accuracy or the best
            over rounds.

    Returns:
        Tidy, :data:`PU_COLUMNS`: ``test_accuracy`` (the utility ``utility`` names, said in
        the ``utility`` column) and ``last_finite_accuracy`` averaged over the setting's
        ``n_seeds`` seeds, ``diverged`` (any seed diverged) and the earliest
        ``diverged_round``; setting-level, on every row of the setting:
        ``epsilon_empirical_selected``, the audit of the attack chosen with the guesses on
        held-out canaries (the audit's ``selected`` row: a bound at level β for "the best
        attack"; the smallest over seeds) and ``selected_attack``, the attack(s) chosen
        (seeds in order, distinct).
    """
    if utility not in UTILITIES:
        raise ValueError(f"unknown utility {utility!r}; choose from {list(UTILITIES)}")
    column, text = UTILITIES[utility]
    acc = cells.groupby(SETTING, as_index=False).agg(
        test_accuracy=(column, "mean"), n_seeds=("seed", "nunique"),
        last_finite_accuracy=("last_finite_test_accuracy", "mean"),
        diverged_round=("diverged_round", "min"))
    acc["utility"] = text
    acc["diverged"] = acc["diverged_round"].notna()
    pu = summary.drop(columns="diverged", errors="ignore").merge(
        acc, on=SETTING, how="left").merge(strengths, on="defense", how="left")
    if epsilons is None:
        epsilons = pd.DataFrame(columns=[*SETTING, *EPSILON_COLUMNS])
    pu = pu.merge(epsilons, on=SETTING, how="left")
    if audit is not None and len(audit):
        chosen = audit["attack"] == SELECTED
        emp = audit[~chosen].groupby([*SETTING, "attack"], as_index=False)[
            "epsilon_empirical"].min()
        emp["protocol"] = "aligned"
        pu = pu.merge(emp, on=[*SETTING, "attack", "protocol"], how="left")
        best = audit[chosen].sort_values("seed").groupby(SETTING, as_index=False).agg(
            epsilon_empirical_selected=("epsilon_empirical", "min"),
            selected_attack=("selected_attack", lambda v: ", ".join(dict.fromkeys(v))))
        pu = pu.merge(best, on=SETTING, how="left")
    else:
        pu["epsilon_empirical"] = math.nan
    for col, empty in (("epsilon_empirical_selected", math.nan), ("selected_attack", "")):
        if col not in pu:
            pu[col] = empty
    pu["selected_attack"] = pu["selected_attack"].fillna("")
    return pu[list(PU_COLUMNS)].sort_values(
        ["dataset", "model", "partition", "kind", "params", "strength", "protocol",
         "single_round", "attack", "metric"]).reset_index(drop=True)


def privacy_utility_figure(pu: pd.DataFrame, family: str, width: float = 11) -> plt.Figure:
    """Test accuracy versus attack AUC (top) and TPR@0.1% (bottom) for one attack family.

    One line per defense kind (strengths as points, labelled), the undefended model
    as a black star; one column per attack of the family; all settings of ``pu``
    overlaid; the first protocol and single-round selection (the title says which).
    """
    pu, what = _headline(pu)
    attacks = [a for a in families().get(family, []) if a in set(pu.attack)]
    if not attacks:
        raise ValueError(f"no attack of family '{family}' in the table")
    fig, axes = plt.subplots(2, len(attacks), figsize=(width, width * 0.6), squeeze=False)
    kinds = [k for k in dict.fromkeys(pu.kind) if k != "none"]
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {k: cycle[i % len(cycle)] for i, k in enumerate(kinds)}
    for col, a in enumerate(attacks):
        for row, metric in enumerate(("auc", HEADLINE_TPR)):
            ax = axes[row, col]
            g = pu[(pu.attack == a) & (pu.metric == metric)]
            for kind in kinds:
                k = g[g.kind == kind].sort_values("strength")
                ax.plot(k["mean"], k["test_accuracy"], "o-", color=colors[kind], label=kind,
                        ms=4)
                for _, r in k.iterrows():
                    ax.annotate(f"{r.strength:g}", (r["mean"], r["test_accuracy"]),
                                fontsize=6, xytext=(2, 2), textcoords="offset points")
            base = g[g.kind == "none"]
            ax.plot(base["mean"], base["test_accuracy"], "k*", ms=12, label="no defense")
            ax.set_xlabel(("AUC" if metric == "auc" else "TPR at FPR 0.1%") + f" — {_label(a)}")
            ax.set_ylabel("test accuracy")
            ax.grid(alpha=0.3)
    axes[0, -1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(what, fontsize=9)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------- hypervolume


def hypervolume(error: np.ndarray, leakage: np.ndarray) -> float:
    """Area of the union of the boxes ``[e_i, 1] × [t_i, 1]`` (reference point (1, 1)).

    The paper's Table 2 (v3 Appendix A.3, Def. 1): each point is a defense strength's
    (utility loss, leakage), both fractions in [0, 1] — test error and TPR at FPR
    0.1 %. A point dominates the region of worse utility *and* worse leakage; the
    union is a staircase, computed exactly by sweeping the points in order of error
    (at error ``x`` the union covers leakage from the smallest ``t_i`` with
    ``e_i ≤ x`` up to 1). Larger = the defense reaches lower leakage at lower error.

    Args:
        error: float M, utility losses (values are clipped to [0, 1]).
        leakage: float M, leakages (clipped to [0, 1]).

    Returns:
        The area in [0, 1] (0 for no point).
    """
    e = np.clip(np.asarray(error, dtype=np.float64), 0.0, 1.0)
    t = np.clip(np.asarray(leakage, dtype=np.float64), 0.0, 1.0)
    if e.shape != t.shape or e.ndim != 1:
        raise ValueError(f"error and leakage must be 1-D of equal length; got {e.shape}, "
                         f"{t.shape}")
    if not (np.isfinite(e).all() and np.isfinite(t).all()):
        raise ValueError("hypervolume points must be finite")
    if len(e) == 0:
        return 0.0
    order = np.argsort(e, kind="stable")
    e, t = e[order], t[order]
    lowest = np.minimum.accumulate(t)  # the union's lower edge from each e_i on
    widths = np.diff(np.r_[e, 1.0])
    return float(np.sum(widths * (1.0 - lowest)))


#: Columns of :func:`hypervolume_table` (``results/tables/hypervolume.csv``).
HV_COLUMNS = ("dataset", "model", "partition", "protocol", "single_round", "kind", "params",
              "attack", "hypervolume", "n_points", "strengths", "excluded", "front", "utility",
              "seeds")
#: ``report.hypervolume_front`` → how the tables describe it.
FRONTS = {
    "own": "each defense's own strengths (the paper's definition)",
    "with_undefended": "each defense's strengths plus the undefended model (fedmia's option, "
                       "not the paper's)",
}


def hypervolume_table(pu: pd.DataFrame, front: str = "with_undefended") -> pd.DataFrame:
    """Table 2: the hypervolume of each defense kind's privacy–utility front, per attack.

    For every (dataset, model, partition, protocol, single-round selection, defense kind
    and its other parameters, attack), the points are the kind's strengths — plus the
    undefended cell where ``front`` is ``with_undefended`` (:data:`FRONTS`); defenses of
    one kind whose ``params`` differ (e.g. ``variant=official`` and the default) are
    separate fronts (a table without a ``params`` column: one front per kind). Each point
    is at (1 − utility, mean TPR@0.1 % over targets and seeds) from
    :func:`privacy_utility`'s table (its ``utility`` column says which test accuracy); a
    diverged cell enters with its utility. Points whose TPR is undefined (too few
    non-members, or no attacked round before a divergence) are left out and counted in
    ``excluded``; a front left without a point has hypervolume NaN (n/a). ``seeds`` gives
    the seeds behind the points (e.g. ``1`` for one-seed defense cells, ``1-3`` with a
    three-seed undefended point).
    """
    if front not in FRONTS:
        raise ValueError(f"unknown hypervolume front {front!r}; choose from {list(FRONTS)}")
    rows = []
    tpr = pu[pu.metric == HEADLINE_TPR]
    # a CSV reads an empty params as NaN
    tpr = tpr.assign(params=tpr["params"].fillna("") if "params" in tpr else "")
    keys = ["dataset", "model", "partition", "protocol", "single_round", "attack"]
    for key, g in tpr.groupby(keys, sort=False):
        base = g[g.kind == "none"] if front == "with_undefended" else g.iloc[:0]
        fronts = dict.fromkeys(zip(g.kind, g.params, strict=True))
        for kind, params in [f for f in fronts if f[0] != "none"]:
            own = g[(g.kind == kind) & (g.params == params)]
            pts = pd.concat([own, base])
            ok = pts["mean"].notna() & pts["test_accuracy"].notna()
            used = pts[ok]
            seeds = sorted(set(pts["n_seeds"].dropna().astype(int))) if "n_seeds" in pts else []
            rows.append(dict(zip(keys, key, strict=True), kind=kind, params=params,
                             hypervolume=hypervolume(1.0 - used["test_accuracy"].to_numpy(),
                                                     used["mean"].to_numpy())
                             if len(used) else math.nan,  # no point: n/a, not 0
                             n_points=int(ok.sum()),
                             strengths=", ".join(f"{v:g}" for v in sorted(own["strength"])),
                             excluded=int((~ok).sum()), front=front,
                             utility="; ".join(sorted(set(pts["utility"].dropna())))
                             if "utility" in pts else "",
                             seeds="-".join(str(v) for v in (seeds[0], seeds[-1]))
                             if len(seeds) > 1 else "".join(map(str, seeds))))
    return pd.DataFrame(rows, columns=list(HV_COLUMNS))


#: What a Table 2 caption says of a defense kind whose official counterpart differs.
KIND_NOTES = {
    "augment": "`augment`: the official code's augmentation is one on/off flag (no strength), "
               "and its Dermnet loader ignores it (a no-op there); fedmia's strengths and its "
               "augmentation on Dermnet are fedmia's, not the official code's",
}


def hypervolume_markdown(hv: pd.DataFrame) -> str:
    """Table 2 layout: one row per setting and front (kind, params), the attacks as columns."""
    fronts = sorted(set(hv["front"])) if len(hv) else []
    utilities = sorted(set(hv["utility"])) if len(hv) else []
    seeds = sorted(set(hv["seeds"].astype(str))) if len(hv) else []
    cap = ("Hypervolume of each defense kind's (test error, TPR@0.1%) points, both as "
           "fractions, against the reference point (1, 1): the area of the union of the "
           "boxes the points dominate. Larger means the defense reaches lower leakage at "
           "lower utility loss (a stronger attack gives a smaller value, as the paper's "
           "caption says). Points with an undefined TPR are left out (`excluded` in "
           "hypervolume.csv).")
    if fronts:
        cap += " Front: " + "; ".join(FRONTS.get(f, f) for f in fronts) + "."
    if utilities:
        cap += " Utility: " + "; ".join(utilities) + "."
    if seeds:
        cap += (" Seeds behind the points: " + ", ".join(seeds) + " (a one-seed point "
                "carries run-to-run noise that no interval here shows).")
    notes = [KIND_NOTES[k] for k in KIND_NOTES if len(hv) and k in set(hv["kind"])]
    if notes:
        cap += " " + " ".join(n[0].upper() + n[1:] + "." for n in notes)
    if hv.empty:
        return cap + "\n\nNo defense other than `none` in this run.\n"
    keys = ["dataset", "model", "partition", "protocol", "single_round", "kind", "params"]
    hv = hv.assign(params=hv["params"].fillna(""))  # a CSV reads an empty params as NaN
    wide = hv.assign(label=hv.attack.map(_label)).pivot_table(
        index=keys, columns="label", values="hypervolume", sort=False)
    attacks = [_label(a) for a in attack_order() if _label(a) in wide.columns]
    wide = wide[attacks].reset_index()
    for a in attacks:
        wide[a] = wide[a].map(lambda v: "n/a" if pd.isna(v) else f"{v:.3f}")
    return cap + "\n\n" + _md_table(wide)


# ---------------------------------------------------------------------------- findings

NONIID_FINDING = "non-iid leaks more than iid"
FINDING_METRICS = REPLICATE_METRICS
#: Columns of :func:`findings` (``results/tables/findings.csv``).
FINDINGS_COLUMNS = ("dataset", "model", "defense", "partition", "protocol", "single_round",
                    "finding", "comparison", "metric", "difference", "ci_low", "ci_high",
                    "n_units", "n_runs", "method", "verdict")
#: The keys that match a result row to its bootstrap replicates.
REPLICATE_ROW = [*CELL_KEYS, "attack", *REPLICATE_KEYS]
#: Label of a verdict that rests on one training run.
ONE_RUN = " (1 run)"


def verdict(low: float, high: float, one_run: bool = False) -> str:
    """``holds`` if the interval lies above 0, ``fails`` below it, else ``inconclusive``.

    With ``one_run`` the label says the statement is about one training run:
    ``holds (1 run)``, ``fails (1 run)``, ``inconclusive (1 run)``; ``undefined`` where
    the interval is not finite.
    """
    if not (np.isfinite(low) and np.isfinite(high)):
        return "undefined"
    word = "holds" if low > 0 else "fails" if high < 0 else "inconclusive"
    return word + (ONE_RUN if one_run else "")


Replicates = dict[str, dict[tuple, np.ndarray]]


def replicate_lookup(replicates: pd.DataFrame | None) -> Replicates:
    """Metric → (key of a result row, :data:`REPLICATE_ROW`) → its B replicates.

    ``replicates``: the concatenated replicate tables of the attack stage
    (:data:`fedmia.core.contracts.REPLICATE_COLUMNS`); ``None`` or empty: no replicates.
    """
    out: Replicates = {m: {} for m in REPLICATE_METRICS}
    if replicates is None or replicates.empty:
        return out
    keys = _row_keys(replicates)
    for m in REPLICATE_METRICS:
        out[m] = dict(zip(keys, replicates[f"{m}_replicates"], strict=True))
    return out


def replicate_keys(results: pd.DataFrame, selections: Sequence[str | int]) -> pd.DataFrame:
    """The keys (:data:`REPLICATE_ROW`) of the rows whose replicates :func:`findings` reads.

    The rows of the finding attacks (:func:`fedmia.attacker.attacks.finding_attacks`) that a
    selection picks (:func:`select_rounds`): a reader keeps only these of the attack
    stage's replicate tables (one single-round row per target and draw per selection
    instead of one per attacked round).
    """
    sel = pd.concat([select_rounds(results, how) for how in selections], ignore_index=True)
    sel = sel[sel["attack"].isin(finding_attacks())]
    return sel[REPLICATE_ROW].drop_duplicates(ignore_index=True)


def _row_keys(rows: pd.DataFrame) -> list[tuple]:
    """The :data:`REPLICATE_ROW` key of each row, as plain Python values."""
    return list(zip(*(rows[c].astype(str if c in ("dataset", "model", "defense",
                                                   "partition", "attack", "protocol")
                                      else "int64").tolist() for c in REPLICATE_ROW),
                    strict=True))


def _run_replicates(rows: pd.DataFrame, metric: str, lookup: Replicates, targets: pd.Index,
                    minus: pd.DataFrame | None = None) -> np.ndarray | None:
    """T×B replicates of one run's per-target values: the mean over official draws.

    ``rows``: one attack's rows of one run (cell × protocol), one per (draw, target);
    with ``minus`` (another attack's rows of the same run), the paired difference
    ``rows − minus`` per (draw, target): replicate ``b`` of both comes from the same
    resample. Only ``targets`` (those with a defined value) count. ``None`` if a row
    has no replicates.
    """
    cols = ["draw", "target"]
    rows = rows[rows["target"].isin(targets)]
    pairs = rows if minus is None else rows.merge(minus, on=cols, suffixes=("", "_minus"))
    if pairs.empty:
        return None
    found = lookup[metric]
    first = [found.get(k) for k in _row_keys(pairs)]
    second: list[np.ndarray | None] = [None] * len(pairs)
    if minus is not None:
        other = pairs[[*(c for c in REPLICATE_ROW if c in cols)]].assign(
            **{c: pairs[f"{c}_minus"] for c in REPLICATE_ROW if c not in cols})
        second = [found.get(k) for k in _row_keys(other)]
    if any(v is None for v in first) or (minus is not None and any(v is None for v in second)):
        return None
    values = np.stack([np.asarray(a, np.float64) - (0.0 if b is None else
                                                    np.asarray(b, np.float64))
                       for a, b in zip(first, second, strict=True)])  # rows × B
    targets = pairs["target"].to_numpy()
    return np.stack([values[targets == t].mean(axis=0) for t in np.unique(targets)])


def _per_seed(units: pd.Series) -> pd.Series:
    """Per seed, the mean over its targets of the (seed, target) unit values."""
    return units.groupby(level="seed").mean()


def _interval(per_seed: pd.Series, run_reps: Callable[[], np.ndarray | None]
              ) -> tuple[float, float, str]:
    """The interval of a finding and how it was made, from S per-seed values.

    S ≥ 2: the t-interval over seeds (S − 1 df). S = 1: the percentile interval of the
    within-run replicates ``run_reps()`` (B values of the run's mean, from the joint
    resample), or NaN without replicates.
    """
    n = len(per_seed)
    if n >= 2:
        lo, hi = uncertainty.t_interval(per_seed.to_numpy())
        return lo, hi, f"t over {n} seeds" + (" (1 df: wide)" if n == 2 else "")
    if n == 0:
        return math.nan, math.nan, "no defined value"
    reps = run_reps()
    if reps is None:
        return math.nan, math.nan, "1 run, no bootstrap replicates"
    lo, hi = uncertainty.percentile_interval(reps)
    return lo, hi, "joint bootstrap, 1 run"


def findings(results: pd.DataFrame,
             selections: Sequence[str | int] = ("best_tpr_per_target",),
             partition_kinds: dict[str, str] | None = None,
             replicates: pd.DataFrame | None = None) -> pd.DataFrame:
    """The paper's findings as tested claims, with 95 % intervals and verdicts.

    * II vs I, III vs II, III vs I per measure family
      (:data:`fedmia.attacker.attacks.FINDING_PAIRS`):
      the *paired* difference of two attacks on the same targets, seeds, official
      draws and evaluation samples, single-round attacks at each selection (the rows
      :func:`select_rounds` returns; rows are matched by seed, draw and target, so a
      selection may pick a different round per target). Per seed, the mean over its
      targets and draws of the difference; ``difference`` is the mean over seeds.
    * Non-iid vs iid: each non-iid partition against each iid one for the same dataset,
      model, defense and attack of the findings (:func:`fedmia.attacker.attacks.finding_attacks`):
      per seed, the mean over the non-iid cell's targets minus that over the iid cell's
      (different clients: not paired by target).

    The interval (``method``):

    * S ≥ 2 seeds (``n_runs``): the t-interval over the S per-seed values, S − 1 degrees
      of freedom (:func:`fedmia.attacker.uncertainty.t_interval`; with S = 2, 1 df: valid and very
      wide). Targets of one run share the model and the non-member pool, so the seeds,
      not the targets, are the independent units; resampling (seed, target) pairs as
      independent covered far less than 95 % (``bench/bootstrap.py --coverage``).
    * S = 1: a statement about this run only (verdict ``… (1 run)``): the estimand is
      the run's mean over its targets of the expected difference over draws of the
      evaluation samples (the trained models fixed). Replicate ``b`` of the run's mean
      averages the targets' values in replicate ``b`` of the attack stage's joint
      resample (one draw of every owner group per replicate, shared by all targets and
      attacks: :func:`fedmia.attacker.uncertainty.run_replicate_means`); the percentile interval
      over ``b``. (Drawing the targets with replacement on top over-covers: measured in
      :mod:`fedmia.attacker.uncertainty`.) For non-iid vs iid the two cells' replicates are
      independent (different runs, different seeds of the resample): replicate ``b`` of
      the difference is that of the two cells' means. Without ``replicates`` the
      interval is NaN.

    The verdict is ``holds`` if the interval lies above 0, ``fails`` if below,
    ``inconclusive`` otherwise (``undefined`` where a metric is).

    Args:
        results: the concatenated attack results.
        selections: single-round selections (``report.single_round``).
        partition_kinds: partition key → kind (``iid``, ``dirichlet``), for the non-iid
            finding; ``None`` skips it.
        replicates: the concatenated replicate tables of the attack stage
            (:data:`fedmia.core.contracts.REPLICATE_COLUMNS`), needed where a setting has one seed.
    """
    lookup = replicate_lookup(replicates)
    out = []
    keys = [*SETTING, "protocol"]
    for how in selections:
        sel = select_rounds(results, how)
        for key, g in sel.groupby(keys, sort=False):
            base = dict(zip(keys, key, strict=True), single_round=str(how))
            for finding, better, worse in FINDING_PAIRS:
                a, b = g[g.attack == better], g[g.attack == worse]
                if a.empty or b.empty:
                    continue
                for metric in FINDING_METRICS:
                    out.append(_pair_row(base, finding, better, worse, metric, a, b, lookup))
        if partition_kinds:  # multi-round comparisons do not depend on the selection: once
            out += _noniid_rows(sel, how, partition_kinds, lookup,
                                with_multi=how == selections[0])
    return pd.DataFrame(out, columns=list(FINDINGS_COLUMNS))


def _pair_row(base: dict, finding: str, better: str, worse: str, metric: str,
              a: pd.DataFrame, b: pd.DataFrame, lookup: Replicates) -> dict:
    """One findings row: the paired difference ``better − worse`` of one setting."""
    on = ["seed", "draw", "target"]
    pairs = a[[*on, metric]].merge(b[[*on, metric]], on=on, suffixes=("_a", "_b"))
    pairs["diff"] = pairs[f"{metric}_a"] - pairs[f"{metric}_b"]
    units = pairs.groupby(["seed", "target"])["diff"].mean().dropna()
    per_seed = _per_seed(units)
    comparison = f"{better} − {worse}"

    def run_reps() -> np.ndarray | None:
        run = per_seed.index[0]
        reps = _run_replicates(a[a.seed == run], metric, lookup, units.loc[run].index,
                               minus=b[b.seed == run])
        return None if reps is None else uncertainty.run_replicate_means(reps)

    lo, hi, method = _interval(per_seed, run_reps)
    return {**base, "finding": finding, "comparison": comparison, "metric": metric,
            "difference": float(per_seed.mean()) if len(per_seed) else math.nan,
            "ci_low": lo, "ci_high": hi, "n_units": len(units), "n_runs": len(per_seed),
            "method": method, "verdict": verdict(lo, hi, one_run=len(per_seed) == 1)}


def _noniid_rows(sel: pd.DataFrame, how: str | int, kinds: dict[str, str],
                 lookup: Replicates, *, with_multi: bool) -> list[dict]:
    rows = []
    compared = set(finding_attacks())
    for key, g in sel.groupby(["dataset", "model", "defense", "protocol", "attack"],
                              sort=False):
        multi = ATTACKS.get(key[4]).multi_round
        if (multi and not with_multi) or key[4] not in compared:
            continue
        parts = list(dict.fromkeys(g["partition"]))
        iid = [p for p in parts if kinds.get(p) == "iid"]
        non = [p for p in parts if kinds.get(p) not in (None, "iid")]
        for p in non:
            for q in iid:
                for metric in FINDING_METRICS:
                    base = dict(dataset=key[0], model=key[1], defense=key[2],
                                partition=f"{p} vs {q}", protocol=key[3],
                                single_round=ALL_ROUNDS if multi else str(how))
                    rows.append(_two_cell_row(base, key[4], metric, g[g.partition == p],
                                              g[g.partition == q], lookup))
    return rows


def _two_cell_row(base: dict, attack: str, metric: str, first: pd.DataFrame,
                  second: pd.DataFrame, lookup: Replicates) -> dict:
    """One non-iid vs iid row: per seed, the difference of the two cells' means."""
    units = [g.groupby(["seed", "target"])[metric].mean().dropna() for g in (first, second)]
    means = [_per_seed(u) for u in units]
    per_seed = (means[0] - means[1]).dropna()  # seeds both settings have

    def run_reps() -> np.ndarray | None:
        run = per_seed.index[0]
        out = []
        for g, u in zip((first, second), units, strict=True):
            reps = _run_replicates(g[g.seed == run], metric, lookup, u.loc[run].index)
            if reps is None:
                return None
            out.append(uncertainty.run_replicate_means(reps))
        return out[0] - out[1]

    lo, hi, method = _interval(per_seed, run_reps)
    return {**base, "finding": NONIID_FINDING, "comparison": attack, "metric": metric,
            "difference": float(per_seed.mean()) if len(per_seed) else math.nan,
            "ci_low": lo, "ci_high": hi, "n_units": sum(len(u) for u in units),
            "n_runs": len(per_seed), "method": method,
            "verdict": verdict(lo, hi, one_run=len(per_seed) == 1)}


def findings_markdown(table: pd.DataFrame) -> str:
    """The findings table: one line per comparison, the difference with its interval."""
    cap = ("The paper's findings as tested claims: the difference of the better attack's "
           "metric minus the worse one's (AUC; TPR@0.1% in percentage points), paired on "
           "the same targets, draws and evaluation samples for the attack comparisons, two "
           "groups of clients for non-iid vs iid; the mean over seeds of each seed's mean "
           "over targets. The 95 % interval (`method`): with `n_runs` ≥ 2 seeds, the "
           "t-interval over the seeds' values (`t over S seeds`; the seeds are the "
           "independent units, since the targets of one run share the model and the "
           "non-member pool; with 2 seeds, 1 degree of freedom, it is very wide); with one "
           "seed, a statement about that run only (`joint bootstrap, 1 run`: the "
           "evaluation samples resampled once for all targets and attacks, so that the "
           "shared non-member pool counts once, and the mean over the run's targets taken "
           "in every replicate; under `official` the held-out pool's slots hold other "
           "samples in every round and draw, so its share of the noise is not resampled: "
           "the interval is narrower than it should be, mainly for TPR). Verdict: `holds` "
           "if the interval lies above 0, `fails` if below, `inconclusive` otherwise; "
           "`(1 run)` marks a verdict about one training run, not about training runs in "
           "general.")
    if table.empty:
        return cap + "\n\nNo comparison available in this run.\n"
    shown = table.copy()
    scale = np.where(shown.metric == "auc", 1.0, 100.0)
    for c in ("difference", "ci_low", "ci_high"):
        shown[c] = shown[c] * scale
    shown["difference"] = [f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]" if np.isfinite(d) else "n/a"
                           for d, lo, hi in zip(shown.difference, shown.ci_low, shown.ci_high,
                                                strict=True)]
    cols = ["dataset", "model", "defense", "partition", "protocol", "single_round",
            "finding", "comparison", "metric", "difference", "n_runs", "method", "verdict"]
    return cap + "\n\n" + _md_table(shown[cols])


def audit_figure(pu: pd.DataFrame, width: float = 11) -> plt.Figure:
    """Empirical (one-run audit) ε against accounted ε, per attack and defense.

    One point per (setting, attack) with an audit; x: the accounted ε (PLD, else RDP;
    drawn at the right edge, marked ∞, where none is finite or none is claimed), y: the
    empirical lower bound. Every point must lie below the diagonal if the accounting
    is right; the bound can never exceed about ln(m) for m canaries.
    """
    rows = pu[pu.protocol.eq("aligned") & pu.metric.eq("auc") & pu.epsilon_empirical.notna()]
    rows = rows.drop_duplicates([*SETTING, "attack"])
    fig, axes = _figure(1, 1, width * 0.5)
    ax = axes[0, 0]
    acc = rows["epsilon_pld"].where(rows["epsilon_pld"].notna(), rows["epsilon_rdp"])
    finite = acc[np.isfinite(acc)]
    right = max(float(finite.max()) * 1.5 if len(finite) else 10.0, 1.0)
    x = acc.where(np.isfinite(acc), right)
    for a in [a for a in attack_order() if a in set(rows.attack)]:
        sel = rows.attack == a
        ax.scatter(x[sel], rows.loc[sel, "epsilon_empirical"], color=_colors()[a], s=18,
                   label=_label(a))
    # accounted ε spans orders of magnitude (σ ≈ 0 gives 10⁷ and more), the empirical
    # bound a few units: a symlog x axis, linear below 1, and the y range of the bounds
    ymax = max(float(rows["epsilon_empirical"].max() or 0) * 1.2, 1.0)
    ax.set_xscale("symlog", linthresh=1.0)
    diag = np.linspace(0.0, ymax, 50)
    ax.plot(diag, diag, color="grey", lw=0.8, ls=":", label="empirical = accounted")
    ax.axvline(right, color="grey", lw=0.5)
    ax.text(right, 0, " ∞ / none", fontsize=7, va="bottom")
    ax.set_ylim(-0.02 * ymax, ymax)
    ax.set_xlim(left=0)
    ax.set_xlabel("accounted ε (client level, PLD; symlog scale)")
    ax.set_ylabel("empirical ε lower bound (one-run audit)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    return fig
