"""The attack tables: single-round selections, the summary, the paper's Table 1 layout.

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from fedmia.attacker import metrics, uncertainty
from fedmia.attacker.attacks import (
    ATTACKS,
    CALIBRATED_KINDS,
    PROTOCOLS,
    VIEWS,
    attack_order,
    single_round_attacks,
)
from fedmia.attacker.metrics import METRICS, tpr_metric_name
from fedmia.core.config import ConfigError
from fedmia.core.contracts import MEMBERSHIP_LEVELS
from fedmia.core.registry import Registry

SETTING = ["dataset", "model", "defense", "partition"]
#: The keys of one table row before the attack: setting and protocol.
ROW_KEYS = [*SETTING, "protocol"]
#: One set of per-target results: a cell under one protocol draw.
RUN = [*SETTING, "seed", "protocol", "draw"]
#: The threat-view columns of an attack result and of :func:`summarize` (after ``protocol``).
VIEW_KEYS = ["view", "membership"]
#: The paper's view and membership level: what every table, figure and finding but the
#: secure-aggregation table reads (:func:`paper_rows`).
PAPER_VIEW = ("uploads", "client")
#: ``single_round`` of multi-round attacks in the tables.
ALL_ROUNDS = "all attacked rounds"
HEADLINE_TPR = tpr_metric_name(0.001)
#: Columns of :func:`summarize` (``results/tables/attacks.csv``).
SUMMARY_COLUMNS = (
    *ROW_KEYS,
    *VIEW_KEYS,
    "single_round",
    "attack",
    "metric",
    "mean",
    "ci_low",
    "ci_high",
    "std",
    "n",
    "n_defined",
    "draw_std",
    "n_nonmembers",
    "fp_allowed",
    "fp_median",
    "low_count",
    "rounds",
    "selected_by",
    "fpr_rule",
    "note",
    "diverged",
    "participation",
    "target_rounds_min",
    "target_rounds_mean",
    "target_rounds_max",
)


def with_views(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with the columns ``view`` and ``membership`` right after ``protocol``.

    Attack results (and summaries) written before the threat views have neither: their
    rows are the paper's (:data:`PAPER_VIEW`: ``uploads``, ``client``), and get those
    values. A frame that has both is returned as it is.
    """
    if all(c in frame for c in VIEW_KEYS):
        return frame
    if any(c in frame for c in VIEW_KEYS):
        raise ValueError(
            f"a table has one of the columns {VIEW_KEYS} but not the other: it was written "
            "by a broken or mixed version; rerun the attack stage to rewrite it"
        )
    out = frame.copy()
    at = list(out.columns).index("protocol") + 1 if "protocol" in out else len(out.columns)
    for i, (col, value) in enumerate(zip(VIEW_KEYS, PAPER_VIEW, strict=True)):
        out.insert(at + i, col, value)
    return out


def paper_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``frame`` under the paper's view and membership level (:data:`PAPER_VIEW`).

    A frame without the view columns (written before the threat views) is all the
    paper's: returned as it is.
    """
    if not all(c in frame for c in VIEW_KEYS):
        return frame
    keep = (frame["view"] == PAPER_VIEW[0]) & (frame["membership"] == PAPER_VIEW[1])
    return frame[keep]


def view_order(values: pd.Series) -> pd.Series:
    """Sort key of a ``view`` or ``membership`` column: the registries' order."""
    order = list(VIEWS.registered()) if values.name == "view" else list(MEMBERSHIP_LEVELS)
    return values.map(lambda v: order.index(v) if v in order else len(order))


def attack_label(attack: str) -> str:
    """An attack's name in tables and legends (:attr:`AttackSpec.label`)."""
    return ATTACKS.get(attack).label


@dataclass(frozen=True)
class Selection:
    """A named single-round selection (``report.single_round``; see the module docstring).

    Attributes:
        name: its name.
        text: what it picks, for the tables' captions.
        metric: the metric whose best attacked round it picks (``tpr`` — TPR@0.1 %,
            falling back to the AUC where that is undefined — or ``auc``); ``None``: the
            last attacked round.
        per_target: whether each target gets its own round (else one round for all,
            picked on the mean over targets).
    """

    name: str
    text: str
    metric: str | None = None
    per_target: bool = False


#: The named single-round selections, in the order the schema lists them.
SELECTIONS: Registry[Selection] = Registry(
    "single-round selection", build=Selection, decorates=False
)
SELECTIONS.register(
    "best_tpr_per_target",
    metric="tpr",
    per_target=True,
    text="for each target its own attacked round with the highest TPR@0.1% "
    "(the official code's choice, picked with hindsight)",
)
SELECTIONS.register(
    "best_tpr_mean",
    metric="tpr",
    text="the attacked round with the highest TPR@0.1% of the mean over "
    "targets (picked with hindsight; not the official choice)",
)
SELECTIONS.register(
    "best_auc",
    metric="auc",
    text="the attacked round with the highest mean AUC (picked with hindsight)",
)
SELECTIONS.register("last", text="the last attacked round (no hindsight)")
#: Selection names no longer accepted → the message that names their replacements.
RETIRED_SELECTIONS = {
    "best_tpr": "'best_tpr' is retired: it picked the round of the best TPR@0.1% of the mean "
    "over targets, which is not the official choice; write best_tpr_per_target "
    "(the official code's: each target's own best round) or best_tpr_mean (one "
    "round, best on the mean over targets)",
}


def check_selection(how: str | int) -> str | int:
    """``how`` if it names a single-round selection (:data:`SELECTIONS` or a round ≥ 1).

    Raises:
        ConfigError: a retired name (naming its replacements) or an unknown one.
    """
    if isinstance(how, str) and how in RETIRED_SELECTIONS:
        raise ConfigError(RETIRED_SELECTIONS[how])
    if isinstance(how, bool) or not (how in SELECTIONS or (isinstance(how, int) and how >= 1)):
        raise ConfigError(
            f"unknown single-round selection {how!r}; choose from "
            f"{SELECTIONS.registered()} or a round number"
        )
    return how


def select_rounds(results: pd.DataFrame, how: str | int = "best_tpr_per_target") -> pd.DataFrame:
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
    single = results[(results["round"] >= 0) & results["attack"].isin(single_round_attacks())]
    if single.empty:
        return multi.reset_index(drop=True)
    if isinstance(how, int):
        means = single.groupby([*keys, "round"], as_index=False).agg(auc=("auc", "mean"))
        pick = means[means["round"] == how]
        lacking = (
            means[keys]
            .drop_duplicates()
            .merge(pick[keys], how="left", indicator=True)
            .query("_merge == 'left_only'")
        )
        if len(lacking):
            raise ValueError(
                f"report.single_round = {how}: round {how} was not observed in "
                f"{len(lacking)} run(s), e.g. {lacking.iloc[0][keys].to_dict()}; "
                "choose an observed round"
            )
        pick = pick.assign(selected_by=f"round {how}")
    else:
        spec = SELECTIONS.get(how)
        by = [*keys, "target"] if spec.per_target else keys
        cand = single.groupby([*by, "round"], as_index=False).agg(
            auc=("auc", "mean"), tpr=(HEADLINE_TPR, "mean"), attacked=("attacked", "all")
        )
        cand = cand[cand["attacked"]].sort_values([*by, "round"], ignore_index=True)
        if spec.metric is None:
            pick = cand.groupby(by, as_index=False).tail(1).assign(selected_by=how)
        elif spec.metric == "auc":
            pick = _best(cand, by, "auc").assign(selected_by=how)
        else:
            undefined = cand["tpr"].isna().groupby([cand[k] for k in by]).transform("all")
            undefined = undefined.astype(bool)
            cand = cand.assign(
                tpr=cand["tpr"].where(~undefined, cand["auc"]),
                selected_by=np.where(undefined, _fallback_text(spec), how),
            )
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


def _fallback_text(spec: Selection) -> str:
    target = "each target" if spec.per_target else "the mean"
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


def summary_interval(
    units: np.ndarray, values: np.ndarray, row_ci: np.ndarray, key: tuple, n_boot: int = 1000
) -> tuple[float, float]:
    """95 % interval of a summary row's mean over targets (and seeds and draws).

    The units are the (seed, target) pairs, each the mean of its rows (official draws);
    with two or more units, the percentile bootstrap of the mean over resampled units
    (:func:`fedmia.attacker.uncertainty.mean_interval`). Resampling the top level alone covers
    both sources: each unit's value carries its own evaluation-sample noise, so the
    spread of the units holds the within-target sampling too (resampling both levels
    would count it twice; Davison & Hinkley 1997, §3.8). With one unit: the bootstrap
    interval of its single row, or the spread over its draws.

    Args:
        units: float U, the unit means, sorted by seed and target.
        values: float R, the row's group of result rows (their metric values).
        row_ci: float R×2, those rows' own intervals.
        key: the summary row's key (seeds the bootstrap).
        n_boot: bootstrap replicates.
    """
    seed = uncertainty.stable_seed(*(str(k) for k in key))
    if len(units) >= 2:
        return uncertainty.mean_interval(units, n_boot=n_boot, seed=seed)
    if len(values) == 1:
        return float(row_ci[0, 0]), float(row_ci[0, 1])
    return uncertainty.mean_interval(values, n_boot=n_boot, seed=seed)


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
        note = "; ".join(
            f"seed {int(r.seed)} diverged in round {int(r.diverged_round)}"
            for r in hit.itertuples()
        )
        rows.append(
            dict(
                zip(SETTING, key, strict=True),
                diverged_round=hit["diverged_round"].min() if len(hit) else math.nan,
                diverged=note,
            )
        )
    return pd.DataFrame(rows, columns=cols)


def _participation(cells: pd.DataFrame | None) -> pd.DataFrame:
    """Per setting: its participation fraction (the cells' manifests; 1.0 where unrecorded)."""
    cols = [*SETTING, "participation"]
    if cells is None or cells.empty or "participation" not in cells:
        return pd.DataFrame(columns=cols).astype({"participation": "float64"})
    frac = cells.assign(participation=cells["participation"].astype("float64").fillna(1.0))
    return frac.groupby(SETTING, sort=False, as_index=False)["participation"].first()[cols]


def _count_text(n_rounds: pd.Series | np.ndarray) -> str:
    """The rounds combined: one number, or ``min–max`` where targets differ."""
    lo, hi = int(n_rounds.min()), int(n_rounds.max())
    return f"{lo}" if lo == hi else f"{lo}–{hi}"


def _summary_rows(long: pd.DataFrame, by: list[str], fpr_rule: str, salt: tuple = ()) -> list[dict]:
    """One :func:`summarize` row per group ``by`` of the long table (first-appearance order).

    The statistics of every group come from one groupby each over the whole table; only
    the bootstrap interval of each group's mean (:func:`summary_interval`, seeded
    by the group's key and ``salt``) and the text columns are computed per group, on
    NumPy arrays.
    """
    if long.empty:
        return []
    long = long.assign(_group=long.groupby(by, sort=False).ngroup().to_numpy())
    grp = long.groupby("_group", sort=True)
    first = grp[[*by, "round"]].first()
    n, defined = grp.size().to_numpy(), grp["value"].count().to_numpy()
    per_draw = long.groupby(["_group", "seed", "draw"])["value"].mean()  # sorted by group
    draw_at = np.searchsorted(per_draw.index.get_level_values("_group"), np.arange(len(n) + 1))
    draw_means = per_draw.to_numpy()
    q = grp["n_nonmembers"].min().to_numpy()
    fp_median = grp["fp"].median().to_numpy()
    n_rounds = grp["n_rounds"].agg(["min", "mean", "max"]).to_numpy()  # G×3
    rounds = grp["round"].unique().to_numpy()
    selected_by = grp["selected_by"].unique().to_numpy()
    single_round = first["round"].to_numpy() >= 0
    units = long.groupby(["_group", "seed", "target"])["value"].mean()
    unit_at = units.index.get_level_values("_group").to_numpy()
    unit_values = units.to_numpy()
    unit_start = np.searchsorted(unit_at, np.arange(len(first) + 1))
    rows_at = grp.indices
    values = long["value"].to_numpy()
    ci = long[["ci_low", "ci_high"]].to_numpy()
    out = []
    for i, key in enumerate(first[by].itertuples(index=False, name=None)):
        single = single_round[i]
        official = key[ROW_KEYS.index("protocol")] == "official"
        complete = defined[i] == n[i]
        qi = int(q[i])
        alpha = _alpha(key[-1])
        rows = rows_at[i]
        group = pd.Series(values[rows])  # pandas' mean and std, as the tables always had
        draws = pd.Series(draw_means[draw_at[i] : draw_at[i + 1]])
        if not complete:
            interval = (math.nan, math.nan)
        else:
            u = unit_values[unit_start[i] : unit_start[i + 1]]
            interval = summary_interval(u, values[rows], ci[rows], (*key, *salt))
        out.append(
            dict(
                zip(by, key, strict=True),
                mean=group.mean() if complete else math.nan,
                std=group.std(),
                n=int(n[i]),
                n_defined=int(defined[i]),
                ci_low=interval[0],
                ci_high=interval[1],
                draw_std=draws.std() if official and len(draws) > 1 else math.nan,
                n_nonmembers=qi,
                fp_allowed=(
                    metrics.max_false_positives(qi, alpha, fpr_rule)
                    if alpha is not None and metrics.tpr_at_fpr_defined(qi, alpha, fpr_rule)
                    else math.nan
                ),
                fp_median=fp_median[i] if alpha is not None else math.nan,
                low_count=alpha is not None and alpha * qi < 10,
                rounds=(_rounds_text(rounds[i]) if single else _count_text(n_rounds[i, [0, 2]])),
                **{
                    f"target_rounds_{f}": math.nan if single else float(n_rounds[i, j])
                    for j, f in enumerate(("min", "mean", "max"))
                },
                selected_by="; ".join(sorted(set(selected_by[i]))),
                fpr_rule=fpr_rule,
                note="" if complete else "undefined for some targets: fewer non-members than 1/FPR",
            )
        )
    return out


def summarize(
    results: pd.DataFrame,
    selections: Sequence[str | int] = ("best_tpr_per_target", "last"),
    *,
    fpr_rule: str = "at_most",
    cells: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Tidy attack table: one row per setting, protocol, selection, attack and metric.

    Values are ``mean, std, n`` over targets × seeds × draws; ``draw_std`` is the std
    over official draws of the per-draw mean (the spread of one official run; NaN for
    ``aligned``). Single-round attacks appear once per selection (``single_round``
    names it, ``rounds`` lists the round(s) it picked); multi-round attacks once, with
    ``single_round`` = :data:`ALL_ROUNDS` and ``rounds`` the number of rounds combined
    (``min–max`` where the targets differ: partial participation), and
    ``target_rounds_min``, ``_mean``, ``_max`` the rounds a target's score combines over
    the rows (NaN for single-round rows). ``participation`` is the setting's
    ``train.participation.fraction`` (from ``cells``; NaN without). A metric undefined
    for some rows (TPR at an FPR below 1/#non-members) has ``mean`` NaN and a ``note``.

    ``cells`` (one row per cell: its keys and ``diverged_round``, NaN if training
    finished; the train stage's manifests) flags settings whose training diverged
    (``diverged``): their attacks use only the rounds observed before, and a setting
    with no attack row at all (it diverged before any observed round) still gets a row
    per attack and metric, all NaN.
    """
    results = with_views(results)
    parts = [
        _summarize_view(part, selections, fpr_rule, cells, view)
        for view, part in results.groupby(VIEW_KEYS, sort=False)
    ] or [_summarize_view(results, selections, fpr_rule, cells, PAPER_VIEW)]
    table = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
    div = _divergence(cells)
    table = table.merge(div[[*SETTING, "diverged"]], on=SETTING, how="left")
    table["diverged"] = table["diverged"].fillna("")
    table = table.merge(_participation(cells), on=SETTING, how="left")
    order = {a: i for i, a in enumerate(attack_order())}
    table = table.sort_values(
        [*ROW_KEYS, *VIEW_KEYS, "single_round", "attack", "metric"],
        key=lambda s: (
            s.map(order) if s.name == "attack" else view_order(s) if s.name in VIEW_KEYS else s
        ),
        kind="stable",
    )
    return table[list(SUMMARY_COLUMNS)].reset_index(drop=True)


def _summarize_view(
    results: pd.DataFrame,
    selections: Sequence[str | int],
    fpr_rule: str,
    cells: pd.DataFrame | None,
    view: tuple[str, str],
) -> pd.DataFrame:
    """:func:`summarize`'s rows of one (view, membership level): ``results`` holds its rows.

    The paper's (:data:`PAPER_VIEW`) seed their bootstrap intervals by their keys alone,
    as before the threat views (the same rows give the same bytes); the others add the
    view and the level to the seed.
    """
    selected = []
    for i, how in enumerate(selections):
        sel = select_rounds(results, how)
        if i > 0:
            sel = sel[sel["round"] >= 0]  # multi-round rows once
        selected.append(sel.assign(single_round=np.where(sel["round"] >= 0, str(how), ALL_ROUNDS)))
    sel = pd.concat(selected, ignore_index=True)
    keys = [*ROW_KEYS, "single_round", "attack"]
    long = _long(
        sel, [*keys, "seed", "draw", "target", "round", "n_rounds", "n_nonmembers", "selected_by"]
    )
    salt = () if tuple(view) == PAPER_VIEW else tuple(view)
    out = _summary_rows(long, [*keys, "metric"], fpr_rule, salt)
    table = pd.DataFrame(
        out, columns=[c for c in SUMMARY_COLUMNS if c not in ("diverged", "participation")]
    )
    div = _divergence(cells)
    lost = div.merge(table[SETTING].drop_duplicates(), how="left", indicator=True)
    lost = lost[(lost["_merge"] == "left_only") & lost["diverged_round"].notna()]
    if len(lost):
        protocols = list(dict.fromkeys(results["protocol"])) or ["aligned"]
        attacks = list(dict.fromkeys(results["attack"])) or attack_order()
        # each attack where it would be had the cell not diverged: a single-round attack
        # once per selection, a multi-round one once
        placed = [
            (a, how)
            for a in attacks
            for how in (
                [ALL_ROUNDS] if ATTACKS.get(a).multi_round else [str(h) for h in selections]
            )
        ]
        filler = [
            dict(
                zip(SETTING, key, strict=True),
                protocol=p,
                single_round=how,
                attack=a,
                metric=m,
                n=0,
                n_defined=0,
                fpr_rule=fpr_rule,
                rounds="0",
                selected_by="",
                note="no attacked round before the divergence",
            )
            for key in lost[SETTING].itertuples(index=False)
            for p in protocols
            for a, how in placed
            for m in METRICS
        ]
        table = pd.concat([table, pd.DataFrame(filler)], ignore_index=True)
    return table.assign(**dict(zip(VIEW_KEYS, view, strict=True)))


def _selection_text(how: str) -> str:
    if how in SELECTIONS:
        return SELECTIONS.get(how).text
    return f"round {how}" if how.isdigit() else how


def caption(summary: pd.DataFrame, protocol: str, selection: str) -> str:
    """The caption line of one table section: every convention it used."""
    part = summary[summary.protocol == protocol]
    placed = part["n"] > 0  # rows of a cell that diverged before any attacked round: n/a
    single = part[(part.single_round == selection) & placed]
    multi = part[(part.single_round == ALL_ROUNDS) & placed]
    n_non = sorted(set(part["n_nonmembers"].dropna().astype(int)))
    res = ", ".join(f"1/{q:,}" for q in n_non)
    bits = [
        f"Protocol `{protocol}`: "
        f"{PROTOCOLS.get(protocol).text if protocol in PROTOCOLS else protocol}"
    ]
    if len(single):
        picked = sorted(set(single["selected_by"]))
        rounds = sorted(set(", ".join(single["rounds"]).split(", ")), key=int)
        bits.append(
            f"single-round attacks: `{selection}`, {_selection_text(selection)}"
            + (
                f" [{'; '.join(p for p in picked if p != selection)}]"
                if set(picked) - {selection}
                else ""
            )
            + f"; rounds picked: {', '.join(rounds)}"
        )
    if len(multi):
        counts = sorted(set(multi["rounds"]), key=lambda c: [int(n) for n in c.split("–")])
        bits.append(
            "multi-round attacks over "
            + "/".join(counts)
            + " attacked rounds"
            + (" (a target's own: partial participation)" if any("–" in c for c in counts) else "")
        )
        bits += _calibrated_text(set(multi["attack"]))
    lost = sorted(set(part.loc[~placed, "diverged"].dropna()) - {""})
    if lost:
        bits.append(
            "n/a where training diverged before the first attacked round (" + "; ".join(lost) + ")"
        )
    rules = sorted(set(part["fpr_rule"]))
    bits.append("; ".join(metrics.FPR_RULES.get(r, r) for r in rules))
    unit = "targets × seeds" + (" × draws" if protocol == "official" else "")
    ns = sorted(set(part["n"].astype(int)) - {0})
    bits.append(
        f"mean over {unit} (n = {'/'.join(map(str, ns))}) [95 % bootstrap "
        "interval over targets and seeds]"
    )
    bits.append(f"FPR resolution {res} (1 / non-members)")
    tpr = part[part.metric == HEADLINE_TPR]
    allowed = sorted(set(tpr["fp_allowed"].dropna().astype(int)))
    if allowed:
        bits.append(
            f"TPR@0.1% rests on at most {'/'.join(map(str, allowed))} false "
            "positive(s)"
            + (
                " — α × non-members < 10: a percentile interval undercovers there"
                if tpr["low_count"].any()
                else ""
            )
        )
    if part["low_count"].fillna(False).astype(bool).any():
        bits.append(
            "a row marked '< 10 FP' rests on fewer than 10 false positives: read it "
            "as a wide range, not a point"
        )
    return " · ".join(bits) + "."


def _calibrated_text(attacks: set[str]) -> list[str]:
    """Caption bits for the LiRA and RMIA attacks among ``attacks`` (none: empty)."""
    specs = [ATTACKS.get(a) for a in attack_order() if a in attacks]
    specs = [s for s in specs if s.kind in CALIBRATED_KINDS]
    bits = []
    if any(s.kind == "lira" for s in specs):
        bits.append(
            "LiRA (lira_*): offline, the K − 1 other clients' uploads of the round as "
            "OUT references, score Φ((s − μ)/σ) (attack.lira: variance rule and μ)"
        )
    if any(s.kind == "rmia" for s in specs):
        bits.append(
            "RMIA (rmia*): offline with a fixed a and γ (attack.rmia), p_y under the "
            "other clients' uploads, held-out samples of the other cross-fitting half "
            "as population"
        )
    summed = [s.name for s in specs if s.combine == "sum"]
    if summed:
        bits.append(
            f"{', '.join(summed)} sum the per-round z (LiRA; lira_conf_cos_sum also "
            "over φ and the cosine) or log LR (RMIA) as if independent: rounds and "
            "measures are correlated, so a sum is a working combination, not the "
            "likelihood ratio; the others average per-round scores as the paper"
        )
    return bits


#: ``report.table_metrics`` of the paper's Table 1.
PAPER_TABLE_METRICS = (HEADLINE_TPR, "auc")


def _metric_label(metric: str) -> str:
    """A metric's row label in the Table-1 layout (TPRs in percent)."""
    if metric == "auc":
        return "AUC"
    if metric == "balanced_accuracy":
        return "balanced accuracy"
    return metric.replace("tpr", "TPR") + " (%)"


def paper_tables(
    summary: pd.DataFrame, table_metrics: Sequence[str] = PAPER_TABLE_METRICS
) -> list[tuple[str, str, pd.DataFrame]]:
    """The paper's Table 1 layout, one section per (protocol, single-round selection).

    Of the paper's view and membership level only (:func:`paper_rows`); the others are in
    the secure-aggregation table (:mod:`fedmia.report.secagg`).

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
    summary = paper_rows(summary)
    unknown = [m for m in table_metrics if m not in METRICS]
    if unknown or not table_metrics:
        raise ValueError(f"unknown or no table metric(s) {unknown}; choose from {list(METRICS)}")
    out = []
    selections = [s for s in dict.fromkeys(summary["single_round"]) if s != ALL_ROUNDS]
    for protocol in dict.fromkeys(summary["protocol"]):
        for selection in selections or [ALL_ROUNDS]:
            part = summary[
                (summary.protocol == protocol) & summary.single_round.isin([selection, ALL_ROUNDS])
            ]
            title = f"protocol {protocol}" + (
                f" · single-round attacks at {selection}" if selection != ALL_ROUNDS else ""
            )
            out.append((title, caption(summary, protocol, selection), _layout(part, table_metrics)))
    return out


def _layout(summary: pd.DataFrame, table_metrics: Sequence[str]) -> pd.DataFrame:
    """One row per setting × metric of ``table_metrics``, the attacks as columns."""
    rows = []
    attacks = [a for a in attack_order() if a in set(summary["attack"])]
    diverged = summary["diverged"].fillna("").tolist()
    flag = any(d != "" for d in diverged)
    records = summary.to_dict("records")
    low = summary["low_count"].fillna(False).astype(bool).tolist()
    settings = [tuple(r[k] for k in SETTING) for r in records]
    first: dict[tuple, int] = {}  # (setting, attack, metric) → its first row
    few: set[tuple] = set()  # (setting, metric) of a TPR resting on fewer than 10 FP
    for i, (setting, r) in enumerate(zip(settings, records, strict=True)):
        first.setdefault((setting, r["attack"], r["metric"]), i)
        if low[i]:
            few.add((setting, r["metric"]))
    for setting, i0 in {s: settings.index(s) for s in dict.fromkeys(settings)}.items():
        for metric in table_metrics:
            row = dict(
                zip(SETTING, setting, strict=True),
                metric=_metric_label(metric) + (" < 10 FP" if (setting, metric) in few else ""),
            )
            if flag:
                row["diverged"] = diverged[i0]
            for a in attacks:
                i = first.get((setting, a, metric))
                if i is None or not np.isfinite(records[i]["mean"]):
                    row[attack_label(a)] = "n/a"
                    continue
                row[attack_label(a)] = _cell(records[i], metric)
            rows.append(row)
    return pd.DataFrame(rows)


def _cell(row: Mapping[str, Any], metric: str) -> str:
    """``mean [ci_low, ci_high]`` (TPR in percent), or ``mean ± std`` without an interval."""
    scale, fmt = (100, "{:.2f}") if metric != "auc" else (1, "{:.3f}")
    m = fmt.format(row["mean"] * scale)
    lo, hi = row.get("ci_low", math.nan), row.get("ci_high", math.nan)
    if np.isfinite(lo) and np.isfinite(hi):
        return f"{m} [{fmt.format(lo * scale)}, {fmt.format(hi * scale)}]"
    sd = row["std"]
    return m if math.isnan(sd) else f"{m} ± {fmt.format(sd * scale)}"


def md_table(table: pd.DataFrame) -> str:
    """``table`` as a GitHub-flavoured Markdown table (every value as ``str``)."""
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(False)]
    return "\n".join(lines) + "\n"


def to_markdown(sections: list[tuple[str, str, pd.DataFrame]]) -> str:
    """GitHub-flavoured Markdown: per section a heading, its caption line and the table."""
    return "\n".join(f"### {title}\n\n{cap}\n\n{md_table(t)}" for title, cap, t in sections)


def _tex(v: object) -> str:
    return (
        str(v)
        .replace("%", r"\%")
        .replace("_", r"\_")
        .replace("±", r"$\pm$")
        .replace("≤", r"$\le$")
        .replace("×", r"$\times$")
        .replace("`", "")
    )


def to_latex(sections: list[tuple[str, str, pd.DataFrame]]) -> str:
    """Booktabs LaTeX tabulars, each preceded by its caption as a comment and a paragraph."""
    out = []
    for title, cap, table in sections:
        cols = list(table.columns)
        out += [
            f"% {title}",
            r"\paragraph{" + _tex(title) + "} " + _tex(cap),
            "",
            r"\begin{tabular}{" + "l" * len(cols) + "}",
            r"\toprule",
            " & ".join(_tex(c) for c in cols) + r" \\",
            r"\midrule",
        ]
        out += [" & ".join(_tex(v) for v in row) + r" \\" for row in table.itertuples(False)]
        out += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(out)


def headline(summary: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The paper's rows (:func:`paper_rows`) of the first protocol and single-round selection."""
    summary = paper_rows(summary)
    protocol = summary["protocol"].iloc[0]
    selections = [s for s in dict.fromkeys(summary["single_round"]) if s != ALL_ROUNDS]
    selection = selections[0] if selections else ALL_ROUNDS
    part = summary[
        (summary.protocol == protocol) & summary.single_round.isin([selection, ALL_ROUNDS])
    ]
    return part, f"protocol {protocol}, single-round attacks at {selection}"
