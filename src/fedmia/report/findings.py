"""The paper's findings as tested claims: paired differences of two attacks, with verdicts.

See :func:`findings` for the comparisons and the intervals (a t-interval over seeds, or a
joint within-run bootstrap for one seed, labelled so).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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


def _target_replicates(
    first: Sequence[np.ndarray | None],
    second: Sequence[np.ndarray | None] | None,
    targets: np.ndarray,
) -> np.ndarray | None:
    """T×B replicates of one run's per-target values: the mean over official draws.

    ``first``: the B replicates of each of the run's rows (one per draw and target),
    ``None`` where a row has none; with ``second`` (the other attack's rows, paired row
    by row) the paired difference ``first − second``: replicate ``b`` of both comes from
    the same resample. ``targets``: int, the target of each row. Returns the B
    replicates of the run's mean over its targets
    (:func:`fedmia.attacker.uncertainty.run_replicate_means`), or ``None`` if a row has no
    replicates or there is no row.
    """
    if not len(first) or any(v is None for v in first):
        return None
    if second is not None and any(v is None for v in second):
        return None
    values = np.stack([np.asarray(a, np.float64) for a in first])  # rows × B
    if second is not None:
        values = values - np.stack([np.asarray(b, np.float64) for b in second])
    per_target = np.stack([values[targets == t].mean(axis=0) for t in np.unique(targets)])
    return uncertainty.run_replicate_means(per_target)  # T×B → B


def _run_interval(per_seed: np.ndarray, run_means: np.ndarray | None) -> tuple[float, float, str]:
    """The interval of a finding and how it was made, from S per-seed values.

    S ≥ 2: the t-interval over seeds (S − 1 df). S = 1: the percentile interval of the
    within-run replicates ``run_means`` (B values of the run's mean, from the joint
    resample), or NaN without replicates (``None``).
    """
    n = len(per_seed)
    if n >= 2:
        lo, hi = uncertainty.t_interval(per_seed)
        return lo, hi, f"t over {n} seeds" + (" (1 df: wide)" if n == 2 else "")
    if n == 0:
        return math.nan, math.nan, "no defined value"
    if run_means is None:
        return math.nan, math.nan, "1 run, no bootstrap replicates"
    lo, hi = uncertainty.percentile_interval(run_means)
    return lo, hi, "joint bootstrap, 1 run"


def _row(base: dict, per_seed: np.ndarray, n_units: int, interval: tuple) -> dict:
    """One findings row from the per-seed values of a comparison and its interval."""
    lo, hi, method = interval
    return {
        **base,
        "difference": float(per_seed.mean()) if len(per_seed) else math.nan,
        "ci_low": lo,
        "ci_high": hi,
        "n_units": n_units,
        "n_runs": len(per_seed),
        "method": method,
        "verdict": verdict(lo, hi, one_run=len(per_seed) == 1),
    }


def _units(frame: pd.DataFrame, by: list[str], value: pd.Series) -> tuple[pd.Series, pd.Series]:
    """The units and per-seed values of a comparison, both sorted by their keys.

    Per (``by``, seed, target) the mean over draws of ``value`` (undefined units left
    out), and per (``by``, seed) the mean over targets of those.
    """
    units = value.groupby([frame[c] for c in [*by, "seed", "target"]]).mean().dropna()
    return units, units.groupby(level=[*by, "seed"]).mean()


def _slices(index: pd.Index, level: str) -> dict:
    """Key of ``level`` → positional slice of a sorted MultiIndex's rows with that key."""
    codes = index.get_level_values(level).to_numpy()
    keys, starts = np.unique(codes, return_index=True)
    ends = [*starts[1:], len(codes)] if len(codes) else []
    return {k: slice(s, e) for k, s, e in zip(keys.tolist(), starts, ends, strict=True)}


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

    Every comparison of a selection is computed with one merge and one groupby over all
    settings (no per-row frame operations): the paper grid has about 12,000 rows.

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
    for how in selections:
        sel = select_rounds(results, how)
        out += _pair_rows(sel, str(how), lookup)
        if partition_kinds:  # multi-round comparisons do not depend on the selection: once
            out += _noniid_rows(sel, how, partition_kinds, lookup, with_multi=how == selections[0])
    return pd.DataFrame(out, columns=list(FINDINGS_COLUMNS))


def _pair_rows(sel: pd.DataFrame, how: str, lookup: Replicates) -> list[dict]:
    """The rows of every attack pair and setting of one selection, in setting order.

    One row per (setting × protocol in order of first appearance, finding pair, metric)
    where both attacks have rows in the setting: the paired difference ``better − worse``.
    """
    keys = [*SETTING, "protocol"]
    if sel.empty:
        return []
    sel = sel.assign(_setting=sel.groupby(keys, sort=False).ngroup().to_numpy())
    settings = sel.drop_duplicates("_setting").set_index("_setting")[keys]
    on = ["_setting", "seed", "draw", "target"]
    rows: dict[tuple[int, int, int], dict] = {}
    for p, (finding, better, worse) in enumerate(finding_pairs()):
        a, b = sel[sel.attack == better], sel[sel.attack == worse]
        both = np.intersect1d(a["_setting"].unique(), b["_setting"].unique())
        if not len(both):
            continue
        pairs = a[[*on, *keys, "attack", "round", *FINDING_METRICS]].merge(
            b[[*on, "attack", "round", *FINDING_METRICS]], on=on, suffixes=("", "_minus")
        )
        at = pairs.groupby(["_setting", "seed"]).indices  # (setting, seed) → row positions
        first_keys = _row_keys(pairs)
        second_keys = _row_keys(
            pairs.assign(attack=pairs["attack_minus"], round=pairs["round_minus"])
        )
        targets_all = pairs["target"].to_numpy()
        for m, metric in enumerate(FINDING_METRICS):
            units, per_seed = _units(pairs, ["_setting"], pairs[metric] - pairs[f"{metric}_minus"])
            unit_at, seed_at = _slices(units.index, "_setting"), _slices(per_seed.index, "_setting")
            for s in both.tolist():
                ps = per_seed.iloc[seed_at[s]] if s in seed_at else per_seed.iloc[:0]
                u = units.iloc[unit_at[s]] if s in unit_at else units.iloc[:0]

                base = dict(
                    settings.loc[s],
                    single_round=how,
                    finding=finding,
                    comparison=f"{better} − {worse}",
                    metric=metric,
                )
                values, run_means = ps.to_numpy(), None
                if len(values) == 1:  # one run: its within-run replicates
                    run = u.index.get_level_values("seed")[0]
                    idx = at[(s, run)]
                    idx = idx[np.isin(targets_all[idx], u.index.get_level_values("target"))]
                    found = lookup[metric]
                    run_means = _target_replicates(
                        [found.get(first_keys[i]) for i in idx],
                        [found.get(second_keys[i]) for i in idx],
                        targets_all[idx],
                    )
                interval = _run_interval(values, run_means)
                rows[(s, p, m)] = _row(base, values, len(u), interval)
    return [rows[k] for k in sorted(rows)]


def _noniid_rows(
    sel: pd.DataFrame,
    how: str | int,
    kinds: dict[str, str],
    lookup: Replicates,
    *,
    with_multi: bool,
) -> list[dict]:
    """Non-iid vs iid rows of one selection: per seed, the difference of two cells' means."""
    group = ["dataset", "model", "defense", "protocol", "attack"]
    compared = set(finding_attacks())
    multi = {a: ATTACKS.get(a).multi_round for a in compared}
    sel = sel[sel["attack"].isin([a for a in compared if with_multi or not multi[a]])]
    if sel.empty:
        return []
    cell = [*group, "partition"]
    empty = pd.Series([], dtype="float64")
    parts_of = {}  # metric → cell key → (units by (seed, target), per-seed means by seed)
    for metric in FINDING_METRICS:
        units, per_seed = _units(sel, cell, sel[metric])
        seeds = {k: v.droplevel(cell) for k, v in per_seed.groupby(level=cell)}
        parts_of[metric] = {
            k: (v.droplevel(cell), seeds.get(k, empty)) for k, v in units.groupby(level=cell)
        }
    at = sel.groupby([*cell, "seed"]).indices  # (cell, seed) → row positions
    keys_all, targets_all = _row_keys(sel), sel["target"].to_numpy()
    reps_cache: dict[tuple, np.ndarray | None] = {}

    def cell_reps(key: tuple, metric: str, run: int, targets: pd.Index) -> np.ndarray | None:
        if (key, metric) not in reps_cache:
            idx = at[(*key, run)]
            idx = idx[np.isin(targets_all[idx], targets)]
            found = lookup[metric]
            reps_cache[key, metric] = _target_replicates(
                [found.get(keys_all[i]) for i in idx], None, targets_all[idx]
            )
        return reps_cache[key, metric]

    def part(metric: str, key: tuple) -> tuple[pd.Series, pd.Series]:
        return parts_of[metric].get(key, (empty, empty))

    rows = []
    for key, g in sel.groupby(group, sort=False):
        parts = list(dict.fromkeys(g["partition"]))
        iid = [p for p in parts if kinds.get(p) == "iid"]
        non = [p for p in parts if kinds.get(p) not in (None, "iid")]
        for p in non:
            for q in iid:
                for metric in FINDING_METRICS:
                    (u1, m1), (u2, m2) = part(metric, (*key, p)), part(metric, (*key, q))
                    per_seed = (m1 - m2).dropna()  # seeds both settings have

                    base = dict(
                        dataset=key[0],
                        model=key[1],
                        defense=key[2],
                        partition=f"{p} vs {q}",
                        protocol=key[3],
                        single_round=ALL_ROUNDS if multi[key[4]] else str(how),
                        finding=NONIID_FINDING,
                        comparison=key[4],
                        metric=metric,
                    )
                    values, run_means = per_seed.to_numpy(), None
                    if len(values) == 1:  # one run: the two cells' independent replicates
                        run = per_seed.index[0]
                        first = cell_reps((*key, p), metric, run, u1.loc[run].index)
                        second = cell_reps((*key, q), metric, run, u2.loc[run].index)
                        if first is not None and second is not None:
                            run_means = first - second
                    interval = _run_interval(values, run_means)
                    rows.append(_row(base, values, len(u1) + len(u2), interval))
    return rows


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
