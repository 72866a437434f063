"""The figures: per cell (rounds, ROC) and from the tables (partitions, privacy–utility, audit).

matplotlib is imported on first use (:mod:`fedmia.core.lazy`, the Agg backend), so the
parse of the Snakefile reads the figure kinds without it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from fedmia.attacker import metrics, uncertainty
from fedmia.attacker.attacks import (
    ATTACKS,
    CALIBRATED_KINDS,
    UTILITY_ATTACK,
    attack_order,
    families,
)
from fedmia.attacker.metrics import METRICS, tpr_metric_name
from fedmia.core.lazy import plt
from fedmia.core.registry import Registry
from fedmia.report.tables import (
    HEADLINE_TPR,
    SETTING,
    attack_label,
    headline,
    paper_rows,
    select_rounds,
)


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
    fig, axes = plt.subplots(rows, cols, figsize=(width, width / cols * 0.8 * rows), squeeze=False)
    return fig, axes


def _colors() -> dict[str, Any]:
    """A colour per registered attack: the default cycle, or tab20 for more than it holds."""
    order = attack_order()
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if len(order) > len(cycle):
        cycle = list(plt.get_cmap("tab20").colors)
    return {a: cycle[i % len(cycle)] for i, a in enumerate(order)}


def _style(attack: str) -> str:
    """Line style of a multi-round attack: dashed, dash-dotted for fedmia's LiRA and RMIA."""
    return "-." if ATTACKS.get(attack).kind in CALIBRATED_KINDS else "--"


def rounds_figure(cell: pd.DataFrame, fpr: float, width: float = 11) -> plt.Figure:
    """TPR at ``fpr`` and AUC versus round for one cell, one row per protocol.

    Means over targets (and official draws), with 95 % bootstrap bands over targets
    (:func:`_band`). Single-round attacks are lines over the observed rounds, filled
    markers at attacked rounds and hollow ones at rounds observed only for the figure;
    multi-round attacks are horizontal dashed lines (the official code's main figure;
    dash-dotted for LiRA and RMIA).
    """
    if fpr not in metrics.FPR_LEVELS:
        raise ValueError(
            f"round_plot_fpr must be one of {', '.join(map(str, metrics.FPR_LEVELS))} (got {fpr})"
        )
    metric = tpr_metric_name(fpr)
    protocols = list(dict.fromkeys(cell["protocol"]))
    fig, axes = _figure(len(protocols), 2, width)
    colors = _colors()
    for row, protocol in enumerate(protocols):
        part = cell[cell.protocol == protocol]
        means = part.groupby(["attack", "round"], as_index=False).agg(
            **{m: (m, "mean") for m in METRICS}, attacked=("attacked", "all")
        )
        bands = {
            (a, r, m): _band(g.groupby("target")[m].mean().to_numpy(), (a, r, m))
            for (a, r), g in part.groupby(["attack", "round"])
            for m in (metric, "auc")
        }
        for ax, m, label in (
            (axes[row, 0], metric, f"TPR at FPR {fpr:.1%}"),
            (axes[row, 1], "auc", "AUC"),
        ):
            for a in [a for a in attack_order() if a in set(means.attack)]:
                g = means[means.attack == a]
                per_round = g[g["round"] >= 0].sort_values("round")
                if len(per_round):
                    ax.plot(
                        per_round["round"],
                        per_round[m],
                        "-",
                        color=colors[a],
                        label=attack_label(a),
                    )
                    lo, hi = zip(*(bands[a, r, m] for r in per_round["round"]), strict=True)
                    ax.fill_between(per_round["round"], lo, hi, color=colors[a], alpha=0.12, lw=0)
                    hit = per_round[per_round["attacked"]]
                    miss = per_round[~per_round["attacked"]]
                    ax.plot(hit["round"], hit[m], "o", color=colors[a])
                    ax.plot(miss["round"], miss[m], "o", mfc="none", color=colors[a])
                multi = g[g["round"] == -1]
                if len(multi):
                    ax.axhline(
                        multi[m].iloc[0], ls=_style(a), color=colors[a], label=attack_label(a)
                    )
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


def roc_figure(
    cell: pd.DataFrame, selection: str | int = "best_tpr_per_target", width: float = 11
) -> plt.Figure:
    """Log-log ROC curves per attack (mean TPR over targets on a common FPR grid).

    One panel per protocol; single-round attacks at the round ``selection`` picks,
    multi-round attacks over the attacked rounds; bands: pointwise 95 % bootstrap
    intervals of the mean curve over targets (and draws).
    """
    sel = select_rounds(cell, selection)
    if sel.empty:  # only rounds observed for the figures before the training diverged
        return empty_figure(
            "no attacked round before the training diverged: no ROC curve "
            f"under selection {selection!r}",
            width,
        )
    protocols = list(dict.fromkeys(sel["protocol"]))
    fig, axes = _figure(1, len(protocols), width * 0.5 * len(protocols))
    grid = np.logspace(-4, 0, 200)
    colors = _colors()
    for ax, protocol in zip(axes[0], protocols, strict=True):
        part = sel[sel.protocol == protocol]
        lo_all = 1.0
        for a in [a for a in attack_order() if a in set(part.attack)]:
            g = part[part.attack == a]
            tprs = np.array(
                [
                    np.interp(grid, np.asarray(f), np.asarray(t))
                    for f, t in zip(g.roc_fpr, g.roc_tpr, strict=True)
                ]
            )  # rows × grid
            lo = max(min(np.asarray(f)[np.asarray(f) > 0].min() for f in g.roc_fpr), 1e-4)
            lo_all = min(lo_all, lo)
            keep = grid >= lo
            ax.loglog(
                grid[keep],
                tprs.mean(axis=0)[keep],
                color=colors[a],
                ls="-" if _style(a) == "--" else _style(a),
                label=f"{attack_label(a)} (AUC {g.auc.mean():.3f})",
            )
            band_lo, band_hi = _band(tprs, (protocol, a, "roc"))
            ax.fill_between(
                grid[keep],
                np.maximum(band_lo[keep], 1e-4),
                band_hi[keep],
                color=colors[a],
                alpha=0.12,
                lw=0,
            )
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
CellFigure = Callable[[pd.DataFrame, Mapping[str, Any]], Any]
#: The per-cell figures, by name (a rule each: ``results/figures/{cell}/<name>.png``).
FIGURES: Registry[CellFigure] = Registry("cell figure")
#: The figures drawn from one table: ``(table, width=…, **args)`` → the figure; the fact
#: ``table`` names the table (``attacks``: attacks.csv; ``privacy_utility``).
TABLE_FIGURES: Registry[Callable[..., Any]] = Registry("table figure")


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


@TABLE_FIGURES.register("partitions", table="attacks")
def partitions_figure(summary: pd.DataFrame, width: float = 11) -> plt.Figure:
    """Bars of AUC and TPR@1% per attack, one bar per partition (iid vs non-iid).

    Drawn for the table's first protocol and first single-round selection (the title
    says which).
    """
    summary, what = headline(summary)
    fig, axes = _figure(1, 2, width)
    attacks = [a for a in attack_order() if a in set(summary.attack)]
    parts = list(dict.fromkeys(summary.partition))
    w = 0.8 / max(len(parts), 1)
    x = np.arange(len(attacks))
    for ax, metric in zip(axes[0], ("auc", tpr_metric_name(0.01)), strict=True):
        for i, p in enumerate(parts):
            g = summary[(summary.partition == p) & (summary.metric == metric)]
            g = g.groupby("attack")[["mean", "std"]].mean().reindex(attacks)
            ax.bar(
                x + i * w - 0.4 + w / 2, g["mean"], w, yerr=g["std"].fillna(0), label=p, capsize=2
            )
        ax.set_xticks(x, [ATTACKS.get(a).paper[0] or a for a in attacks], rotation=45, ha="right")
        ax.set_ylabel(metric.upper() if metric == "auc" else "TPR at FPR 1%")
        if metric == "auc":
            ax.set_ylim(0.4, 1.0)
            ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.grid(alpha=0.3, axis="y")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(what, fontsize=9)
    fig.tight_layout()
    return fig


@TABLE_FIGURES.register("privacy_utility", table="privacy_utility")
def privacy_utility_figure(pu: pd.DataFrame, family: str, width: float = 11) -> plt.Figure:
    """Test accuracy versus attack AUC (top) and TPR@0.1% (bottom) for one attack family.

    One line per defense kind (strengths as points, labelled), the undefended model
    as a black star; one column per attack of the family, then one for
    :data:`fedmia.attacker.attacks.UTILITY_ATTACK` (named before the runs, the same in
    every figure and cell: not a per-cell maximum) where the table has it; all settings
    of ``pu`` overlaid; the first protocol and single-round selection (the title says
    which).
    """
    pu, what = headline(pu)
    attacks = [a for a in families().get(family, []) if a in set(pu.attack)]
    if not attacks:
        raise ValueError(f"no attack of family '{family}' in the table")
    if UTILITY_ATTACK in set(pu.attack):
        attacks.append(UTILITY_ATTACK)
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
                ax.plot(k["mean"], k["test_accuracy"], "o-", color=colors[kind], label=kind, ms=4)
                for _, r in k.iterrows():
                    ax.annotate(
                        f"{r.strength:g}",
                        (r["mean"], r["test_accuracy"]),
                        fontsize=6,
                        xytext=(2, 2),
                        textcoords="offset points",
                    )
            base = g[g.kind == "none"]
            ax.plot(base["mean"], base["test_accuracy"], "k*", ms=12, label="no defense")
            ax.set_xlabel(
                ("AUC" if metric == "auc" else "TPR at FPR 0.1%") + f" — {attack_label(a)}"
            )
            ax.set_ylabel("test accuracy")
            ax.grid(alpha=0.3)
    axes[0, -1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(what, fontsize=9)
    fig.tight_layout()
    return fig


@TABLE_FIGURES.register("audit", table="privacy_utility")
def audit_figure(pu: pd.DataFrame, width: float = 11) -> plt.Figure:
    """Empirical (one-run audit) ε against accounted ε, per attack and defense.

    One point per (setting, attack) with an audit; x: the accounted ε (PLD, else RDP;
    drawn at the right edge, marked ∞, where none is finite or none is claimed), y: the
    empirical lower bound. Every point must lie below the diagonal if the accounting
    is right; the bound can never exceed about ln(m) for m canaries.
    """
    pu = paper_rows(pu)  # the audit attacks the uploads, client level
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
        ax.scatter(
            x[sel],
            rows.loc[sel, "epsilon_empirical"],
            color=_colors()[a],
            s=18,
            label=attack_label(a),
        )
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
