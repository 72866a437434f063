"""The paper's findings as tested claims: paired differences of two attacks, with verdicts.

See :func:`findings` for the comparisons and the intervals (a t-interval over seeds, or a
joint within-run bootstrap for one seed, labelled so).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from fedmia.attacker import uncertainty
from fedmia.attacker.attacks import ATTACKS, finding_attacks, finding_pairs
from fedmia.core.contracts import CELL_KEYS, REPLICATE_KEYS, REPLICATE_METRICS
from fedmia.report.tables import (
    ALL_ROUNDS,
    SETTING,
    md_table,
    select_rounds,
)

NONIID_FINDING = "non-iid leaks more than iid"
FINDING_METRICS = REPLICATE_METRICS
#: Columns of :func:`findings` (``results/tables/findings.csv``).
FINDINGS_COLUMNS = (
    "dataset",
    "model",
    "defense",
    "partition",
    "protocol",
    "single_round",
    "finding",
    "comparison",
    "metric",
    "difference",
    "ci_low",
    "ci_high",
    "n_units",
    "n_runs",
    "method",
    "verdict",
)
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
    return list(
        zip(
            *(
                rows[c]
                .astype(
                    str
                    if c in ("dataset", "model", "defense", "partition", "attack", "protocol")
                    else "int64"
                )
                .tolist()
                for c in REPLICATE_ROW
            ),
            strict=True,
        )
    )


def _run_replicates(
    rows: pd.DataFrame,
    metric: str,
    lookup: Replicates,
    targets: pd.Index,
    minus: pd.DataFrame | None = None,
) -> np.ndarray | None:
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
            **{c: pairs[f"{c}_minus"] for c in REPLICATE_ROW if c not in cols}
        )
        second = [found.get(k) for k in _row_keys(other)]
    if any(v is None for v in first) or (minus is not None and any(v is None for v in second)):
        return None
    values = np.stack(
        [
            np.asarray(a, np.float64) - (0.0 if b is None else np.asarray(b, np.float64))
            for a, b in zip(first, second, strict=True)
        ]
    )  # rows × B
    targets = pairs["target"].to_numpy()
    return np.stack([values[targets == t].mean(axis=0) for t in np.unique(targets)])


def _per_seed(units: pd.Series) -> pd.Series:
    """Per seed, the mean over its targets of the (seed, target) unit values."""
    return units.groupby(level="seed").mean()


def _interval(
    per_seed: pd.Series, run_reps: Callable[[], np.ndarray | None]
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


def findings(
    results: pd.DataFrame,
    selections: Sequence[str | int] = ("best_tpr_per_target",),
    partition_kinds: dict[str, str] | None = None,
    replicates: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """The paper's findings as tested claims, with 95 % intervals and verdicts.

    * II vs I, III vs II, III vs I per measure family
      (:data:`fedmia.attacker.attacks.finding_pairs()`):
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
            for finding, better, worse in finding_pairs():
                a, b = g[g.attack == better], g[g.attack == worse]
                if a.empty or b.empty:
                    continue
                for metric in FINDING_METRICS:
                    out.append(_pair_row(base, finding, better, worse, metric, a, b, lookup))
        if partition_kinds:  # multi-round comparisons do not depend on the selection: once
            out += _noniid_rows(sel, how, partition_kinds, lookup, with_multi=how == selections[0])
    return pd.DataFrame(out, columns=list(FINDINGS_COLUMNS))


def _pair_row(
    base: dict,
    finding: str,
    better: str,
    worse: str,
    metric: str,
    a: pd.DataFrame,
    b: pd.DataFrame,
    lookup: Replicates,
) -> dict:
    """One findings row: the paired difference ``better − worse`` of one setting."""
    on = ["seed", "draw", "target"]
    pairs = a[[*on, metric]].merge(b[[*on, metric]], on=on, suffixes=("_a", "_b"))
    pairs["diff"] = pairs[f"{metric}_a"] - pairs[f"{metric}_b"]
    units = pairs.groupby(["seed", "target"])["diff"].mean().dropna()
    per_seed = _per_seed(units)
    comparison = f"{better} − {worse}"

    def run_reps() -> np.ndarray | None:
        run = per_seed.index[0]
        reps = _run_replicates(
            a[a.seed == run], metric, lookup, units.loc[run].index, minus=b[b.seed == run]
        )
        return None if reps is None else uncertainty.run_replicate_means(reps)

    lo, hi, method = _interval(per_seed, run_reps)
    return {
        **base,
        "finding": finding,
        "comparison": comparison,
        "metric": metric,
        "difference": float(per_seed.mean()) if len(per_seed) else math.nan,
        "ci_low": lo,
        "ci_high": hi,
        "n_units": len(units),
        "n_runs": len(per_seed),
        "method": method,
        "verdict": verdict(lo, hi, one_run=len(per_seed) == 1),
    }


def _noniid_rows(
    sel: pd.DataFrame,
    how: str | int,
    kinds: dict[str, str],
    lookup: Replicates,
    *,
    with_multi: bool,
) -> list[dict]:
    rows = []
    compared = set(finding_attacks())
    for key, g in sel.groupby(["dataset", "model", "defense", "protocol", "attack"], sort=False):
        multi = ATTACKS.get(key[4]).multi_round
        if (multi and not with_multi) or key[4] not in compared:
            continue
        parts = list(dict.fromkeys(g["partition"]))
        iid = [p for p in parts if kinds.get(p) == "iid"]
        non = [p for p in parts if kinds.get(p) not in (None, "iid")]
        for p in non:
            for q in iid:
                for metric in FINDING_METRICS:
                    base = dict(
                        dataset=key[0],
                        model=key[1],
                        defense=key[2],
                        partition=f"{p} vs {q}",
                        protocol=key[3],
                        single_round=ALL_ROUNDS if multi else str(how),
                    )
                    rows.append(
                        _two_cell_row(
                            base, key[4], metric, g[g.partition == p], g[g.partition == q], lookup
                        )
                    )
    return rows


def _two_cell_row(
    base: dict,
    attack: str,
    metric: str,
    first: pd.DataFrame,
    second: pd.DataFrame,
    lookup: Replicates,
) -> dict:
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
    return {
        **base,
        "finding": NONIID_FINDING,
        "comparison": attack,
        "metric": metric,
        "difference": float(per_seed.mean()) if len(per_seed) else math.nan,
        "ci_low": lo,
        "ci_high": hi,
        "n_units": sum(len(u) for u in units),
        "n_runs": len(per_seed),
        "method": method,
        "verdict": verdict(lo, hi, one_run=len(per_seed) == 1),
    }


def findings_markdown(table: pd.DataFrame) -> str:
    """The findings table: one line per comparison, the difference with its interval."""
    cap = (
        "The paper's findings, and fedmia's pre-specified ones for its LiRA and RMIA "
        "attacks, as tested claims: the difference of the better attack's "
        "metric minus the worse one's (AUC; TPRs in percentage points), paired on "
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
        "general."
    )
    if table.empty:
        return cap + "\n\nNo comparison available in this run.\n"
    shown = table.copy()
    scale = np.where(shown.metric == "auc", 1.0, 100.0)
    for c in ("difference", "ci_low", "ci_high"):
        shown[c] = shown[c] * scale
    shown["difference"] = [
        f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]" if np.isfinite(d) else "n/a"
        for d, lo, hi in zip(shown.difference, shown.ci_low, shown.ci_high, strict=True)
    ]
    cols = [
        "dataset",
        "model",
        "defense",
        "partition",
        "protocol",
        "single_round",
        "finding",
        "comparison",
        "metric",
        "difference",
        "n_runs",
        "method",
        "verdict",
    ]
    return cap + "\n\n" + md_table(shown[cols])
