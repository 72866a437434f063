"""Tables and figures from the attack results (pure: DataFrames in, DataFrames/figures out).

Input everywhere is the concatenation of attack-stage tables: one row per
``(dataset, model, defense, partition, seed, attack, target, round)`` with the
metrics of :mod:`fedmia.metrics` (``round = -1``: a multi-round score) and the
ROC points ``roc_fpr``, ``roc_tpr``.
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from fedmia.attacks import ATTACKS, PAPER_ORDER  # noqa: E402

SETTING = ["dataset", "model", "defense", "partition"]
METRICS = ["auc", "tpr@0.1%", "tpr@1%", "tpr@10%", "balanced_accuracy"]
#: code name → (paper v1 name, paper v3 name), in the paper's column order.
PAPER_NAMES = {a: ATTACKS.get(a).paper for a in PAPER_ORDER}
SINGLE_ROUND = ("loss", "cos", "grad_norm", "grad_diff")


def _per_round_means(results: pd.DataFrame) -> pd.DataFrame:
    keys = [*SETTING, "seed", "attack", "round"]
    return results.groupby(keys, as_index=False)[METRICS].mean()


def select_rounds(results: pd.DataFrame, how: str = "best") -> pd.DataFrame:
    """The rows of each (cell, attack) at one round.

    Multi-round attacks use their ``round = -1`` score. Single-round attacks use
    ``how = "best"``: the round with the highest mean AUC over targets (as the
    paper reports), or ``"last"``: the last observed round. ``grad_diff`` is
    reported as its multi-round mean, as in the paper's table.
    """
    keys = [*SETTING, "seed", "attack"]
    multi = results[results["round"] == -1]
    single = results[(results["round"] >= 0)
                     & results["attack"].isin([a for a in SINGLE_ROUND if a != "grad_diff"])]
    means = _per_round_means(single)
    if how == "best":
        pick = means.loc[means.groupby(keys)["auc"].idxmax(), [*keys, "round"]]
    elif how == "last":
        pick = means.loc[means.groupby(keys)["round"].idxmax(), [*keys, "round"]]
    else:
        raise ValueError(f"unknown round selection '{how}'; choose from ['best', 'last']")
    chosen = single.merge(pick, on=[*keys, "round"])
    return pd.concat([chosen, multi], ignore_index=True)


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Tidy attack table: one row per ``dataset, model, defense, partition, attack, metric``.

    Values are ``mean, std, n`` over targets and seeds, single-round attacks at their
    best round (``selection`` says which was used; ``last_round_mean`` gives the
    value at the last round for comparison). A metric that is undefined (TPR at
    an FPR below 1/#non-members) has ``mean`` NaN and ``note`` saying why.
    """
    out = []
    for how in ("best", "last"):
        sel = select_rounds(results, how)
        long = sel.melt(id_vars=[*SETTING, "seed", "attack", "target", "round"],
                        value_vars=METRICS, var_name="metric")
        agg = long.groupby([*SETTING, "attack", "metric"], as_index=False, sort=False).agg(
            mean=("value", "mean"), std=("value", "std"), n=("value", "size"),
            n_defined=("value", "count"))
        out.append(agg.assign(how=how))
    best, last = out
    table = best.merge(last[[*SETTING, "attack", "metric", "mean"]].rename(
        columns={"mean": "last_round_mean"}), on=[*SETTING, "attack", "metric"])
    table["selection"] = np.where(table["attack"].isin(["loss", "cos", "grad_norm"]),
                                  "best round", "all rounds")
    table["note"] = np.where(table["n_defined"] < table["n"],
                             "undefined for some targets: fewer non-members than 1/FPR", "")
    table.loc[table["n_defined"] < table["n"], "mean"] = np.nan
    order = {a: i for i, a in enumerate(PAPER_NAMES)}
    table = table.sort_values([*SETTING, "attack", "metric"],
                              key=lambda s: s.map(order) if s.name == "attack" else s)
    return table[[*SETTING, "attack", "metric", "mean", "std", "n", "selection",
                  "last_round_mean", "note"]].reset_index(drop=True)


def paper_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The paper's Table 1 layout: one row per setting × {TPR@0.1%, AUC}, attacks as columns.

    TPR is in percent; cells read ``mean ± std`` (``n/a`` where undefined).
    """
    rows = []
    attacks = [a for a in PAPER_NAMES if a in set(summary["attack"])]
    for setting, g in summary.groupby(SETTING, sort=False):
        for metric, label in (("tpr@0.1%", "TPR@0.1% (%)"), ("auc", "AUC")):
            row = dict(zip(SETTING, setting, strict=True), metric=label)
            for a in attacks:
                r = g[(g.attack == a) & (g.metric == metric)]
                if r.empty or not np.isfinite(r["mean"].iloc[0]):
                    row[_paper_name(a)] = "n/a"
                    continue
                scale, fmt = (100, "{:.2f}") if metric != "auc" else (1, "{:.3f}")
                m, s = r["mean"].iloc[0] * scale, r["std"].iloc[0] * scale
                row[_paper_name(a)] = fmt.format(m) + ("" if math.isnan(s) else
                                                       " ± " + fmt.format(s))
            rows.append(row)
    return pd.DataFrame(rows)


def _paper_name(attack: str) -> str:
    v1, v3 = PAPER_NAMES[attack]
    return v1 if v1 == v3 else f"{v1} ({v3})"


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table."""
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(False)]
    return "\n".join(lines) + "\n"


def to_latex(table: pd.DataFrame) -> str:
    """A booktabs LaTeX tabular."""
    def esc(v: object) -> str:
        return str(v).replace("%", r"\%").replace("_", r"\_").replace("±", r"$\pm$")

    cols = list(table.columns)
    lines = [r"\begin{tabular}{" + "l" * len(cols) + "}", r"\toprule",
             " & ".join(esc(c) for c in cols) + r" \\", r"\midrule"]
    lines += [" & ".join(esc(v) for v in row) + r" \\" for row in table.itertuples(False)]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def _figure(n: int, width: float) -> tuple[plt.Figure, np.ndarray]:
    fig, axes = plt.subplots(1, n, figsize=(width, width / n * 0.8), squeeze=False)
    return fig, axes[0]


def rounds_figure(cell: pd.DataFrame, fpr: float, width: float = 11) -> plt.Figure:
    """TPR at ``fpr`` and AUC versus round for one cell (mean over targets).

    Single-round attacks are lines over the observed rounds; multi-round attacks
    are horizontal dashed lines (the official code's main figure).
    """
    metric = {0.001: "tpr@0.1%", 0.01: "tpr@1%", 0.1: "tpr@10%"}.get(fpr)
    if metric is None:
        raise ValueError(f"round_plot_fpr must be one of 0.001, 0.01, 0.1 (got {fpr})")
    means = cell.groupby(["attack", "round"], as_index=False)[METRICS].mean()
    fig, axes = _figure(2, width)
    colors = dict(zip(PAPER_NAMES, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 2,
                      strict=False))
    for ax, m, label in ((axes[0], metric, f"TPR at FPR {fpr:.1%}"), (axes[1], "auc", "AUC")):
        for a in [a for a in PAPER_NAMES if a in set(means.attack)]:
            g = means[means.attack == a]
            per_round = g[g["round"] >= 0].sort_values("round")
            if len(per_round):
                ax.plot(per_round["round"], per_round[m], "o-", color=colors[a],
                        label=_paper_name(a))
            multi = g[g["round"] == -1]
            if len(multi):
                ax.axhline(multi[m].iloc[0], ls="--", color=colors[a],
                           label=_paper_name(a) + " (all rounds)" if len(per_round) else
                           _paper_name(a))
        if m == "auc":
            ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        else:
            ax.axhline(fpr, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    return fig


def roc_figure(cell: pd.DataFrame, width: float = 11) -> plt.Figure:
    """Log-log ROC curves, one per attack (mean TPR over targets on a common FPR grid).

    Single-round attacks at their best round, multi-round attacks over all rounds.
    """
    sel = select_rounds(cell, "best")
    fig, axes = _figure(1, width * 0.55)
    ax = axes[0]
    grid = np.logspace(-4, 0, 200)
    for a in [a for a in PAPER_NAMES if a in set(sel.attack)]:
        g = sel[sel.attack == a]
        tprs = [np.interp(grid, np.asarray(f), np.asarray(t)) for f, t in
                zip(g.roc_fpr, g.roc_tpr, strict=True)]
        lo = max(min(np.asarray(f)[np.asarray(f) > 0].min() for f in g.roc_fpr), 1e-4)
        keep = grid >= lo
        ax.loglog(grid[keep], np.mean(tprs, axis=0)[keep],
                  label=f"{_paper_name(a)} (AUC {g.auc.mean():.3f})")
    ax.loglog(grid, grid, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_xlim(max(ax.get_xlim()[0], 1e-3), 1)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def partitions_figure(summary: pd.DataFrame, width: float = 11) -> plt.Figure:
    """Bars of AUC and TPR@1% per attack, one bar per partition (iid vs non-iid)."""
    fig, axes = _figure(2, width)
    attacks = [a for a in PAPER_NAMES if a in set(summary.attack)]
    parts = list(dict.fromkeys(summary.partition))
    w = 0.8 / max(len(parts), 1)
    x = np.arange(len(attacks))
    for ax, metric in zip(axes, ("auc", "tpr@1%"), strict=True):
        for i, p in enumerate(parts):
            g = summary[(summary.partition == p) & (summary.metric == metric)]
            g = g.groupby("attack")[["mean", "std"]].mean().reindex(attacks)
            ax.bar(x + i * w - 0.4 + w / 2, g["mean"], w, yerr=g["std"].fillna(0), label=p,
                   capsize=2)
        ax.set_xticks(x, [PAPER_NAMES[a][0] for a in attacks], rotation=45, ha="right")
        ax.set_ylabel(metric.upper() if metric == "auc" else "TPR at FPR 1%")
        if metric == "auc":
            ax.set_ylim(0.4, 1.0)
            ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


#: Attack families of the privacy–utility figures.
FAMILIES = {
    "loss": ("loss", "loss_series", "fedmia_loss"),
    "cos": ("cos", "cos_series", "fedmia_cos"),
    "grad": ("grad_norm", "grad_diff"),
}


def privacy_utility(summary: pd.DataFrame, accuracy: pd.DataFrame,
                    defenses: dict[str, dict]) -> pd.DataFrame:
    """Join attack success with utility per defense.

    Args:
        summary: :func:`summarize` output.
        accuracy: ``dataset, model, defense, partition, seed, test_accuracy`` (final round).
        defenses: the config's ``defenses`` block (key → ``{kind, params...}``).

    Returns:
        Tidy: ``dataset, model, partition, defense, kind, strength, test_accuracy, attack,
        metric, mean, std`` (test accuracy averaged over seeds).
    """
    from fedmia.defenses import strength_of

    acc = accuracy.groupby(SETTING, as_index=False)["test_accuracy"].mean()
    pu = summary.merge(acc, on=SETTING, how="left")
    pu["kind"] = pu["defense"].map(lambda d: defenses[d]["kind"])
    pu["strength"] = pu["defense"].map(lambda d: strength_of(defenses[d]))
    cols = ["dataset", "model", "partition", "defense", "kind", "strength", "test_accuracy",
            "attack", "metric", "mean", "std"]
    return pu[cols].sort_values(["dataset", "model", "partition", "kind", "strength",
                                 "attack", "metric"]).reset_index(drop=True)


def privacy_utility_figure(pu: pd.DataFrame, family: str, width: float = 11) -> plt.Figure:
    """Test accuracy versus attack AUC (top) and TPR@0.1% (bottom) for one attack family.

    One line per defense kind (strengths as points, labelled), the undefended model
    as a black star; one column per attack of the family, one figure per setting
    mix (all settings of ``pu`` overlaid).
    """
    attacks = [a for a in FAMILIES[family] if a in set(pu.attack)]
    if not attacks:
        raise ValueError(f"no attack of family '{family}' in the table")
    fig, axes = plt.subplots(2, len(attacks), figsize=(width, width * 0.6), squeeze=False)
    kinds = [k for k in dict.fromkeys(pu.kind) if k != "none"]
    colors = dict(zip(kinds, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 2,
                      strict=False))
    for col, a in enumerate(attacks):
        for row, metric in enumerate(("auc", "tpr@0.1%")):
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
            ax.set_xlabel(("AUC" if metric == "auc" else "TPR at FPR 0.1%")
                          + f" — {_paper_name(a)}")
            ax.set_ylabel("test accuracy")
            ax.grid(alpha=0.3)
    axes[0, -1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    return fig
