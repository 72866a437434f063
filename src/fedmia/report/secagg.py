"""The secure-aggregation table: attack success under ``uploads`` vs ``aggregate``.

Under ``uploads`` (the paper's server) the attacker sees each participant's upload;
under ``aggregate`` (secure aggregation) only the global model, the weighted sum of the
participants' updates and who took part (:data:`fedmia.attacker.attacks.VIEWS`). The
table puts the two side by side for the same training runs, per setting, protocol and
membership level (``client``: is x in target client t's data; ``federation``: is x in
any client's data, :data:`fedmia.core.contracts.MEMBERSHIP_LEVELS`), and gives the
difference uploads − aggregate: what secure aggregation removes.

Its input is :func:`fedmia.report.tables.summarize`'s table (``attacks.csv``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from fedmia.attacker.attacks import ATTACKS, attack_order
from fedmia.core.contracts import MEMBERSHIP_LEVELS
from fedmia.report.tables import (
    HEADLINE_TPR,
    SETTING,
    VIEW_KEYS,
    attack_label,
    md_table,
    with_views,
)

#: The two views the table compares, in its column order.
COMPARED = ("uploads", "aggregate")
#: z of a two-sided 95 % normal interval.
Z95 = 1.959963984540054
#: The metric columns of one view's side (``<name>_<view>``), from a summary row.
SIDE = (
    "tpr",
    "tpr_ci_low",
    "tpr_ci_high",
    "fp_allowed",
    "low_count",
    "auc",
    "auc_ci_low",
    "auc_ci_high",
)


def side_column(column: str, view: str) -> str:
    """The name of :data:`SIDE` column ``column`` under ``view``.

    ``tpr`` → ``tpr_uploads``, ``tpr_ci_low`` → ``tpr_uploads_ci_low``, ``fp_allowed`` →
    ``fp_allowed_uploads``.
    """
    metric, sep, rest = column.partition("_")
    if metric in ("tpr", "auc"):
        return f"{metric}_{view}{sep}{rest}"
    return f"{column}_{view}"


#: Columns of :func:`secure_aggregation_table` (``results/tables/secure_aggregation.csv``);
#: ``participation`` only where the summary has it.
SECAGG_COLUMNS = (
    *SETTING,
    "participation",
    "protocol",
    "membership",
    "row",
    "single_round",
    "attack",
    "attack_uploads",
    "attack_aggregate",
    *(side_column(c, v) for v in COMPARED for c in SIDE),
    *(f"{m}_removed{p}" for m in ("tpr", "auc") for p in ("", "_ci_low", "_ci_high")),
    "note",
)
#: ``row`` of the rows comparing one attack, and of those comparing each view's strongest.
ATTACK_ROW, STRONGEST_ROW = "attack", "strongest"
#: ``attack`` of a strongest row.
STRONGEST_LABEL = "strongest (per-view maximum, a selection)"
NO_CONTRAST = "n/a: the target takes part in every round, nothing to contrast"


def wide_metrics(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per (setting, protocol, view, level, selection, attack): TPR@0.1 % and AUC.

    Columns :data:`SIDE` plus ``tpr_se`` and ``auc_se`` (:func:`standard_error`).
    """
    keys = [*SETTING, "protocol", *VIEW_KEYS, "single_round", "attack"]
    parts = []
    for metric, name in ((HEADLINE_TPR, "tpr"), ("auc", "auc")):
        rows = summary[summary["metric"] == metric]
        part = rows[keys].copy()
        part[name] = rows["mean"].to_numpy()
        part[f"{name}_ci_low"] = rows["ci_low"].to_numpy()
        part[f"{name}_ci_high"] = rows["ci_high"].to_numpy()
        part[f"{name}_se"] = standard_error(
            rows["ci_low"].to_numpy(),
            rows["ci_high"].to_numpy(),
            rows["std"].to_numpy(),
            rows["n_defined"].to_numpy(),
        )
        if name == "tpr":
            part["fp_allowed"] = rows["fp_allowed"].to_numpy()
            part["low_count"] = rows["low_count"].fillna(False).astype(bool).to_numpy()
        parts.append(part.set_index(keys))
    return parts[0].join(parts[1], how="outer").reset_index()


def standard_error(
    ci_low: np.ndarray, ci_high: np.ndarray, std: np.ndarray, n: np.ndarray
) -> np.ndarray:
    """The standard error of summary rows' means, from their own 95 % intervals.

    ``(ci_high − ci_low) / (2 · 1.96)`` where the interval is finite; else ``std / √n``
    (the spread over the rows' units, ``n ≥ 2``); NaN otherwise. Arrays of one shape.
    """
    lo, hi = np.asarray(ci_low, float), np.asarray(ci_high, float)
    sd, n = np.asarray(std, float), np.asarray(n, float)
    from_ci = (hi - lo) / (2 * Z95)
    with np.errstate(divide="ignore", invalid="ignore"):
        from_sd = np.where(n >= 2, sd / np.sqrt(n), math.nan)
    return np.where(np.isfinite(from_ci), from_ci, from_sd)


def difference(a: float, se_a: float, b: float, se_b: float) -> tuple[float, float, float]:
    """``a − b`` and its 95 % normal interval, the two estimates taken as independent."""
    d = a - b
    half = Z95 * math.sqrt(se_a**2 + se_b**2)
    if not (np.isfinite(d) and np.isfinite(half)):
        return d, math.nan, math.nan
    return d, d - half, d + half


def strongest(wide: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Per group ``by`` of :func:`wide_metrics`'s rows, the row of the highest mean TPR@0.1 %.

    Over the group's attacks and single-round selections: a per-view maximum picked
    with hindsight (a selection). Ties go to the first row (attack order); where no
    TPR@0.1 % of the group is defined, the highest AUC (``picked_by`` says which).
    """
    rows = []
    for _, g in wide.groupby(by, sort=False):
        col = "tpr" if g["tpr"].notna().any() else "auc"
        if g[col].isna().all():
            continue
        rows.append(g.loc[[g[col].idxmax()]].assign(picked_by=col))
    if not rows:
        return wide.iloc[:0].assign(picked_by=pd.Series(dtype=object))
    return pd.concat(rows, ignore_index=True)


def _ordered(wide: pd.DataFrame) -> pd.DataFrame:
    order = {a: i for i, a in enumerate(attack_order())}
    return wide.sort_values(
        ["attack", "single_round"],
        key=lambda s: s.map(lambda a: order.get(a, len(order))) if s.name == "attack" else s,
        kind="stable",
    )


def _missing_note(attack: str, view: str) -> str:
    """Why ``attack`` has no row under ``view``: its kind's views, where it states them."""
    views = getattr(ATTACKS.get(attack), "views", None) if attack in ATTACKS else None
    if views is not None and view not in views:
        why = "needs per-client uploads" if view == "aggregate" else "exists under aggregate only"
        return f"n/a under {view}: {why}"
    return f"n/a under {view}: no result"


def _level_note(membership: str, view: str, participation: float) -> str:
    """Why a whole membership level has no row under ``view`` in a setting."""
    if membership == "client" and view == "aggregate":
        if not np.isfinite(participation) or participation >= 1.0:
            return NO_CONTRAST
        return "n/a: no client-level (contrast) attack result under aggregate"
    return f"n/a: no {membership}-level result under {view}"


def _side(row: Mapping[str, Any] | None, view: str) -> dict[str, Any]:
    if row is None:
        return {side_column(c, view): (False if c == "low_count" else math.nan) for c in SIDE}
    return {side_column(c, view): row[c] for c in SIDE}


def _compare(up: Mapping[str, Any] | None, agg: Mapping[str, Any] | None) -> dict[str, float]:
    out = {}
    for m in ("tpr", "auc"):
        if up is None or agg is None:
            d = lo = hi = math.nan
        else:
            d, lo, hi = difference(up[m], up[f"{m}_se"], agg[m], agg[f"{m}_se"])
        out |= {f"{m}_removed": d, f"{m}_removed_ci_low": lo, f"{m}_removed_ci_high": hi}
    return out


def secure_aggregation_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Attack success under ``uploads`` vs ``aggregate`` and the difference, per setting.

    Per setting (dataset, model, defense, partition; its ``participation`` where the
    summary has it), protocol and membership level: one ``attack`` row per (attack,
    single-round selection) that either view has at that level, and one ``strongest``
    row comparing each view's strongest (:func:`strongest`, over the level's attacks and
    selections, named in ``attack_uploads`` / ``attack_aggregate`` as ``attack @
    selection``). Each side: TPR@0.1 % (the mean over targets), its interval and
    ``fp_allowed`` (the false positives it rests on at most, as ``attacks.csv`` states
    it) and ``low_count``, the AUC and its interval. ``*_removed`` = uploads − aggregate
    with a 95 % normal interval from the rows' own intervals (:func:`standard_error`),
    the two views' estimates taken as independent (:func:`difference`). A side that does
    not exist is NaN and ``note`` says why (the attack needs per-client uploads; the
    level has no row under the view, e.g. the client level under ``aggregate`` at full
    participation: nothing to contrast).

    Returns:
        :data:`SECAGG_COLUMNS` (``participation`` only where ``summary`` has it).
    """
    summary = with_views(summary)
    has_part = "participation" in summary
    summary = summary[summary["view"].isin(COMPARED) & (summary["n"] > 0)]
    wide = wide_metrics(summary)
    part = (
        summary.groupby(SETTING, sort=False)["participation"].first()
        if has_part
        else pd.Series(dtype=float)
    )
    level_rank = {m: i for i, m in enumerate(MEMBERSHIP_LEVELS)}
    groups = wide.groupby([*SETTING, "protocol", "membership"], sort=False)
    keys = sorted(groups.groups, key=lambda k: (*k[:-1], level_rank.get(k[-1], 99)))
    rows = []
    for key in keys:
        g = groups.get_group(key)
        setting = dict(zip([*SETTING, "protocol", "membership"], key, strict=True))
        frac = float(part.get(key[: len(SETTING)], math.nan)) if has_part else math.nan
        base = {**setting, **({"participation": frac} if has_part else {})}
        by_view = {v: g[g["view"] == v] for v in COMPARED}
        level = {
            v: _level_note(key[-1], v, frac if has_part else 1.0)
            for v in COMPARED
            if by_view[v].empty
        }
        pairs = _ordered(g)[["single_round", "attack"]].drop_duplicates()
        for sr, a in pairs.itertuples(index=False):
            side = {}
            for v in COMPARED:
                hit = by_view[v][(by_view[v]["attack"] == a) & (by_view[v]["single_round"] == sr)]
                side[v] = hit.iloc[0].to_dict() if len(hit) else None
            notes = [level.get(v) or _missing_note(a, v) for v in COMPARED if side[v] is None]
            rows.append(
                {
                    **base,
                    "row": ATTACK_ROW,
                    "single_round": sr,
                    "attack": a,
                    **{f"attack_{v}": a if side[v] is not None else "" for v in COMPARED},
                    **_side(side["uploads"], "uploads"),
                    **_side(side["aggregate"], "aggregate"),
                    **_compare(side["uploads"], side["aggregate"]),
                    "note": "; ".join(notes),
                }
            )
        best = {}
        for v in COMPARED:
            top = strongest(by_view[v], ["view"]) if len(by_view[v]) else by_view[v]
            best[v] = top.iloc[0].to_dict() if len(top) else None
        notes = [
            level.get(v) or f"n/a under {v}: no defined metric" for v in COMPARED if best[v] is None
        ]
        notes += [
            f"{v}: picked by AUC (TPR@0.1% undefined)"
            for v in COMPARED
            if best[v] is not None and best[v]["picked_by"] == "auc"
        ]
        rows.append(
            {
                **base,
                "row": STRONGEST_ROW,
                "single_round": "",
                "attack": STRONGEST_LABEL,
                **{
                    f"attack_{v}": f"{best[v]['attack']} @ {best[v]['single_round']}"
                    if best[v] is not None
                    else ""
                    for v in COMPARED
                },
                **_side(best["uploads"], "uploads"),
                **_side(best["aggregate"], "aggregate"),
                **_compare(best["uploads"], best["aggregate"]),
                "note": "; ".join(notes),
            }
        )
    cols = [c for c in SECAGG_COLUMNS if has_part or c != "participation"]
    return pd.DataFrame(rows, columns=cols)


CAPTION = (
    "What secure aggregation removes. Per setting, protocol and membership level "
    "(`client`: is x in target client t's data, the paper's; `federation`: is x in any "
    "client's data, held-out samples as non-members), TPR@0.1% (mean over targets, in %; "
    "`≤ k FP`: the false positives it rests on at most, attacks.csv's `fp_allowed`) and "
    "AUC under `uploads` (the server sees each participant's upload) and `aggregate` "
    "(only the global model, the weighted sum of the participants' updates and who took "
    "part), on the same training runs. removed = uploads − aggregate, with a 95 % "
    "interval d ± 1.96·√(se_u² + se_a²), each se from the row's own 95 % bootstrap "
    "interval (its width / 3.92; std/√n without one), treating the two views' estimates "
    "as independent: they share the training run and the evaluation samples, so where "
    "they are positively correlated this interval is conservative. `strongest` rows "
    "compare each view's strongest attack (highest mean TPR@0.1% over the level's "
    "attacks and single-round selections, picked with hindsight: a per-view maximum, a "
    "selection; its interval ignores the selection). n/a: an attack or a membership "
    "level that does not exist under a view, the reason in the note."
)


def _fmt(v: float, lo: float, hi: float, scale: float, digits: int) -> str:
    if not np.isfinite(v):
        return "n/a"
    s = f"{scale * v:.{digits}f}"
    if np.isfinite(lo) and np.isfinite(hi):
        s += f" [{scale * lo:.{digits}f}, {scale * hi:.{digits}f}]"
    return s


def _tpr_cell(r: Mapping[str, Any], view: str) -> str:
    s = _fmt(r[f"tpr_{view}"], r[f"tpr_{view}_ci_low"], r[f"tpr_{view}_ci_high"], 100, 2)
    fp = r[f"fp_allowed_{view}"]
    if s != "n/a" and np.isfinite(fp):
        s += f" (≤ {int(fp)} FP" + (", < 10" if r[f"low_count_{view}"] else "") + ")"
    return s


def secure_aggregation_markdown(table: pd.DataFrame) -> str:
    """The table as Markdown: the caption, then per row the two views and the difference.

    Rows comparing an attack that exists under one view only are listed once per
    setting, level and note (the CSV keeps one row each).
    """
    if table.empty:
        return CAPTION + "\n\nNo attack result under either view.\n"
    keys = [c for c in (*SETTING, "participation", "protocol", "membership") if c in table]
    both = (table["row"] == STRONGEST_ROW) | (
        (table["attack_uploads"] != "") & (table["attack_aggregate"] != "")
    )
    out = []
    for r in table[both].to_dict("records"):
        name = (
            f"strongest: {r['attack_uploads'] or 'n/a'} vs {r['attack_aggregate'] or 'n/a'}"
            if r["row"] == STRONGEST_ROW
            else f"{attack_label(r['attack'])} @ {r['single_round']}"
        )
        out.append(
            {
                **{k: r[k] for k in keys},
                "attack": name,
                "TPR@0.1% uploads": _tpr_cell(r, "uploads"),
                "TPR@0.1% aggregate": _tpr_cell(r, "aggregate"),
                "TPR@0.1% removed": _fmt(
                    r["tpr_removed"], r["tpr_removed_ci_low"], r["tpr_removed_ci_high"], 100, 2
                ),
                "AUC uploads": _fmt(
                    r["auc_uploads"], r["auc_uploads_ci_low"], r["auc_uploads_ci_high"], 1, 3
                ),
                "AUC aggregate": _fmt(
                    r["auc_aggregate"], r["auc_aggregate_ci_low"], r["auc_aggregate_ci_high"], 1, 3
                ),
                "AUC removed": _fmt(
                    r["auc_removed"], r["auc_removed_ci_low"], r["auc_removed_ci_high"], 1, 3
                ),
                "note": r["note"],
            }
        )
    one_side = table[~both]
    for key, g in one_side.groupby([*keys, "note"], sort=False):
        names = ", ".join(dict.fromkeys(g["attack"].map(attack_label)))
        out.append(
            {
                **dict(zip(keys, key[:-1], strict=True)),
                "attack": names,
                **{
                    c: "n/a"
                    for c in (
                        "TPR@0.1% uploads",
                        "TPR@0.1% aggregate",
                        "TPR@0.1% removed",
                        "AUC uploads",
                        "AUC aggregate",
                        "AUC removed",
                    )
                },
                "note": key[-1] + " (results under the other view: attacks.csv)",
            }
        )
    frame = pd.DataFrame(out)
    rank = {m: i for i, m in enumerate(MEMBERSHIP_LEVELS)}
    frame = frame.sort_values(
        [k for k in keys if k != "participation"],
        key=lambda s: s.map(lambda m: rank.get(m, 99)) if s.name == "membership" else s,
        kind="stable",
    )
    return CAPTION + "\n\n" + md_table(frame)
