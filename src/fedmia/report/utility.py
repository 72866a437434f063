"""Privacy next to utility: the privacy–utility table and the paper's Table 2 (hypervolume)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from fedmia.attacker.attacks import SELECTED, attack_order
from fedmia.core.contracts import CELL_KEYS
from fedmia.report.secagg import strongest, wide_metrics
from fedmia.report.tables import (
    HEADLINE_TPR,
    PAPER_VIEW,
    SETTING,
    VIEW_KEYS,
    attack_label,
    md_table,
    paper_rows,
    view_order,
    with_views,
)

#: Columns of :func:`privacy_utility` (``results/tables/privacy_utility.csv``).
#: The accounted-ε columns of :func:`privacy_utility`.
EPSILON_COLUMNS = (
    "dp_rounds",
    "dp_delta",
    "epsilon_rdp",
    "epsilon_pld",
    "epsilon_note",
    "epsilon_observer_rdp",
    "epsilon_observer_pld",
    "epsilon_observer_note",
)
#: The accounted-ε columns of an observer of the aggregate (secure aggregation): from the
#: ``aggregate`` record of a cell's ``privacy`` block, NaN (note ``not accounted``) without.
AGGREGATE_EPSILON_COLUMNS = (
    "epsilon_aggregate_rdp",
    "epsilon_aggregate_pld",
    "epsilon_aggregate_note",
)
#: The one-shot estimate's columns (``results/oneshot/{cell}.json``, Andrew et al. 2024),
#: per cell; in :func:`privacy_utility` the mean over the setting's seeds.
ONESHOT_COLUMNS = (
    "epsilon_oneshot_final",
    "epsilon_oneshot_all_iterates",
    "test_accuracy_with_canaries",
    "oneshot_note",
)
#: Note of a view whose accounted ε no cell records.
NOT_ACCOUNTED = "not accounted"
PU_COLUMNS = (
    "dataset",
    "model",
    "partition",
    "defense",
    "kind",
    "strength",
    "params",
    "defense_note",
    "test_accuracy",
    "utility",
    "n_seeds",
    "last_finite_accuracy",
    "diverged",
    "diverged_round",
    *EPSILON_COLUMNS,
    "epsilon_empirical",
    "epsilon_empirical_selected",
    "selected_attack",
    "protocol",
    *VIEW_KEYS,
    "single_round",
    "attack",
    "metric",
    "mean",
    "ci_low",
    "ci_high",
    "std",
    "rounds",
    "epsilon_accounted",
    "epsilon_accounted_note",
    *ONESHOT_COLUMNS,
    "strongest_attack",
    "strongest_tpr",
)


#: ``report.utility`` → (the cells' column, how the tables name it).
UTILITIES = {
    "final": ("final_test_accuracy", "final test accuracy"),
    "best": (
        "best_test_accuracy",
        "best test accuracy over rounds (hindsight, as the official code also records)",
    ),
}


def privacy_utility(
    summary: pd.DataFrame,
    cells: pd.DataFrame,
    strengths: pd.DataFrame,
    epsilons: pd.DataFrame | None = None,
    audit: pd.DataFrame | None = None,
    utility: str = "final",
    oneshot: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Join attack success with utility per defense, per threat view.

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
        oneshot: per cell (its keys), :data:`ONESHOT_COLUMNS` (the one-shot files); the
            setting's rows get the mean over its seeds; NaN without.

    Returns:
        Tidy, :data:`PU_COLUMNS`: ``test_accuracy`` (the utility ``utility`` names, said in
        the ``utility`` column) and ``last_finite_accuracy`` averaged over the setting's
        ``n_seeds`` seeds, ``diverged`` (any seed diverged) and the earliest
        ``diverged_round``; setting-level, on every row of the setting:
        ``epsilon_empirical_selected``, the audit of the attack chosen with the guesses on
        held-out canaries (the audit's ``selected`` row: a bound at level β for "the best
        attack"; the smallest over seeds) and ``selected_attack``, the attack(s) chosen
        (seeds in order, distinct).

        Every summary row keeps its ``view`` and ``membership`` (a summary written before
        the threat views: ``uploads``, ``client``); the rows of the paper's view and level
        are those of before. Per row's view: ``epsilon_accounted`` (PLD, else RDP) with
        its note — ``uploads``: the server's (``epsilon_pld``, ``epsilon_rdp``);
        ``aggregate``: an observer of the aggregate's (``epsilon_aggregate_*``, NaN and
        ``not accounted`` where no cell records one). The one-run audit attacks the
        uploads: ``epsilon_empirical`` is on the ``uploads``/``client`` rows only and
        ``epsilon_empirical_selected`` on the ``uploads`` rows only. The one-shot
        estimate (:data:`ONESHOT_COLUMNS`) is per setting, on every row; its note says
        whom it applies to. ``strongest_attack`` (``attack @ selection``) and
        ``strongest_tpr``: per setting, protocol, view and level, the highest mean
        TPR@0.1 % over attacks and selections (:func:`fedmia.report.secagg.strongest`: a
        per-view maximum, picked with hindsight).
    """
    if utility not in UTILITIES:
        raise ValueError(f"unknown utility {utility!r}; choose from {list(UTILITIES)}")
    column, text = UTILITIES[utility]
    acc = cells.groupby(SETTING, as_index=False).agg(
        test_accuracy=(column, "mean"),
        n_seeds=("seed", "nunique"),
        last_finite_accuracy=("last_finite_test_accuracy", "mean"),
        diverged_round=("diverged_round", "min"),
    )
    acc["utility"] = text
    acc["diverged"] = acc["diverged_round"].notna()
    strengths = strengths.assign(
        **{c: "" for c in ("params", "defense_note") if c not in strengths}
    )
    summary = with_views(summary)
    pu = (
        summary.drop(columns="diverged", errors="ignore")
        .merge(acc, on=SETTING, how="left")
        .merge(strengths, on="defense", how="left")
    )
    if epsilons is None:
        epsilons = pd.DataFrame(columns=[*SETTING, *EPSILON_COLUMNS])
    pu = pu.merge(epsilons, on=SETTING, how="left")
    if audit is not None and len(audit):
        chosen = audit["attack"] == SELECTED
        emp = (
            audit[~chosen].groupby([*SETTING, "attack"], as_index=False)["epsilon_empirical"].min()
        )
        emp["protocol"] = "aligned"
        emp[VIEW_KEYS] = list(PAPER_VIEW)  # the audit attacks the uploads, client level
        pu = pu.merge(emp, on=[*SETTING, "attack", "protocol", *VIEW_KEYS], how="left")
        best = (
            audit[chosen]
            .sort_values("seed")
            .groupby(SETTING, as_index=False)
            .agg(
                epsilon_empirical_selected=("epsilon_empirical", "min"),
                selected_attack=("selected_attack", lambda v: ", ".join(dict.fromkeys(v))),
            )
        )
        pu = pu.merge(best, on=SETTING, how="left")
    else:
        pu["epsilon_empirical"] = math.nan
    for col, empty in (("epsilon_empirical_selected", math.nan), ("selected_attack", "")):
        if col not in pu:
            pu[col] = empty
    pu["selected_attack"] = pu["selected_attack"].fillna("")
    uploads = pu["view"] == PAPER_VIEW[0]
    pu["epsilon_empirical_selected"] = pu["epsilon_empirical_selected"].where(uploads)
    pu["selected_attack"] = pu["selected_attack"].where(uploads, "")
    pu = _view_epsilon(pu)
    pu = pu.merge(_oneshot_by_setting(oneshot), on=SETTING, how="left")
    pu["oneshot_note"] = pu["oneshot_note"].fillna("")
    pu = pu.merge(_strongest_by_view(summary), on=[*SETTING, "protocol", *VIEW_KEYS], how="left")
    pu["strongest_attack"] = pu["strongest_attack"].fillna("")
    return (
        pu[list(PU_COLUMNS)]
        .sort_values(
            [
                "dataset",
                "model",
                "partition",
                "kind",
                "params",
                "strength",
                "protocol",
                *VIEW_KEYS,
                "single_round",
                "attack",
                "metric",
            ],
            key=lambda s: view_order(s) if s.name in VIEW_KEYS else s,
        )
        .reset_index(drop=True)
    )


def _view_epsilon(pu: pd.DataFrame) -> pd.DataFrame:
    """``epsilon_accounted`` and its note per row's view (PLD where finite, else RDP)."""
    for col, empty in zip(
        AGGREGATE_EPSILON_COLUMNS, (math.nan, math.nan, NOT_ACCOUNTED), strict=True
    ):
        pu[col] = pu[col].fillna(empty) if col in pu else empty

    def tighter(pld: pd.Series, rdp: pd.Series) -> pd.Series:
        return pld.where(pld.notna(), rdp)

    aggregate = pu["view"] == "aggregate"
    pu["epsilon_accounted"] = tighter(pu["epsilon_pld"], pu["epsilon_rdp"]).where(
        ~aggregate, tighter(pu["epsilon_aggregate_pld"], pu["epsilon_aggregate_rdp"])
    )
    pu["epsilon_accounted_note"] = pu["epsilon_note"].where(
        ~aggregate, pu["epsilon_aggregate_note"]
    )
    return pu


def _oneshot_by_setting(oneshot: pd.DataFrame | None) -> pd.DataFrame:
    """Per setting, the mean of the one-shot estimates over its seeds and their notes."""
    numbers = [c for c in ONESHOT_COLUMNS if c != "oneshot_note"]
    if oneshot is None or oneshot.empty:
        return pd.DataFrame(columns=[*SETTING, *ONESHOT_COLUMNS]).astype(
            {c: "float64" for c in numbers}
        )
    missing = [c for c in (*CELL_KEYS, *ONESHOT_COLUMNS) if c not in oneshot]
    if missing:
        raise ValueError(f"the one-shot table lacks the column(s) {missing}")
    return oneshot.groupby(SETTING, as_index=False, sort=False).agg(
        **{c: (c, "mean") for c in numbers},
        oneshot_note=("oneshot_note", lambda v: "; ".join(dict.fromkeys(v))),
    )


def _strongest_by_view(summary: pd.DataFrame) -> pd.DataFrame:
    """Per setting, protocol, view and level: the strongest attack's name and TPR@0.1 %."""
    by = [*SETTING, "protocol", *VIEW_KEYS]
    top = strongest(wide_metrics(summary[summary["n"] > 0]), by)
    return pd.DataFrame(
        {
            **{k: top[k] for k in by},
            "strongest_attack": top["attack"]
            + " @ "
            + top["single_round"].astype(str)
            + top["picked_by"].map({"tpr": "", "auc": " (by AUC: TPR@0.1% undefined)"}),
            "strongest_tpr": top["tpr"].where(top["picked_by"] == "tpr"),
        },
        columns=[*by, "strongest_attack", "strongest_tpr"],
    )


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
        raise ValueError(f"error and leakage must be 1-D of equal length; got {e.shape}, {t.shape}")
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
HV_COLUMNS = (
    "dataset",
    "model",
    "partition",
    "protocol",
    "single_round",
    "kind",
    "params",
    "attack",
    "hypervolume",
    "n_points",
    "strengths",
    "excluded",
    "front",
    "utility",
    "seeds",
    "defense_note",
)
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
    three-seed undefended point); ``defense_note`` what the defense's kind says where the
    official code differs (:attr:`fedmia.federation.defenses.Defense.table_note`).
    """
    if front not in FRONTS:
        raise ValueError(f"unknown hypervolume front {front!r}; choose from {list(FRONTS)}")
    rows = []
    pu = paper_rows(pu)  # the paper's view and level
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
            rows.append(
                dict(
                    zip(keys, key, strict=True),
                    kind=kind,
                    params=params,
                    hypervolume=hypervolume(
                        1.0 - used["test_accuracy"].to_numpy(), used["mean"].to_numpy()
                    )
                    if len(used)
                    else math.nan,  # no point: n/a, not 0
                    n_points=int(ok.sum()),
                    strengths=", ".join(f"{v:g}" for v in sorted(own["strength"])),
                    excluded=int((~ok).sum()),
                    front=front,
                    utility="; ".join(sorted(set(pts["utility"].dropna())))
                    if "utility" in pts
                    else "",
                    seeds="-".join(str(v) for v in (seeds[0], seeds[-1]))
                    if len(seeds) > 1
                    else "".join(map(str, seeds)),
                    defense_note="; ".join(sorted(set(own["defense_note"].fillna("")) - {""}))
                    if "defense_note" in own
                    else "",
                )
            )
    return pd.DataFrame(rows, columns=list(HV_COLUMNS))


def hypervolume_markdown(hv: pd.DataFrame) -> str:
    """Table 2 layout: one row per setting and front (kind, params), the attacks as columns."""
    fronts = sorted(set(hv["front"])) if len(hv) else []
    utilities = sorted(set(hv["utility"])) if len(hv) else []
    seeds = sorted(set(hv["seeds"].astype(str))) if len(hv) else []
    cap = (
        "Hypervolume of each defense kind's (test error, TPR@0.1%) points, both as "
        "fractions, against the reference point (1, 1): the area of the union of the "
        "boxes the points dominate. Larger means the defense reaches lower leakage at "
        "lower utility loss (a stronger attack gives a smaller value, as the paper's "
        "caption says). Points with an undefined TPR are left out (`excluded` in "
        "hypervolume.csv)."
    )
    if fronts:
        cap += " Front: " + "; ".join(FRONTS.get(f, f) for f in fronts) + "."
    if utilities:
        cap += " Utility: " + "; ".join(utilities) + "."
    if seeds:
        cap += (
            " Seeds behind the points: " + ", ".join(seeds) + " (a one-seed point "
            "carries run-to-run noise that no interval here shows)."
        )
    notes = sorted(set(hv["defense_note"].fillna("")) - {""}) if "defense_note" in hv else []
    if notes:
        cap += " " + " ".join(n[0].upper() + n[1:] + "." for n in notes)
    if hv.empty:
        return cap + "\n\nNo defense other than `none` in this run.\n"
    keys = ["dataset", "model", "partition", "protocol", "single_round", "kind", "params"]
    hv = hv.assign(params=hv["params"].fillna(""))  # a CSV reads an empty params as NaN
    wide = hv.assign(label=hv.attack.map(attack_label)).pivot_table(
        index=keys, columns="label", values="hypervolume", sort=False
    )
    attacks = [attack_label(a) for a in attack_order() if attack_label(a) in wide.columns]
    wide = wide[attacks].reset_index()
    for a in attacks:
        wide[a] = wide[a].map(lambda v: "n/a" if pd.isna(v) else f"{v:.3f}")
    return cap + "\n\n" + md_table(wide)
