r"""Regenerate the results pages from finished runs: docs/results.md and docs/reproduction.md.

Nothing in the pages is written by hand: each number is read from a documented run's
tables. A run is a working directory of ``snakemake`` with its own config; run them from
the repository's root (``-d`` puts the results elsewhere, ``--configfile`` names the
config: with ``-d`` the Snakefile's default ``config/config.yaml`` is not found, so name
it too), timing each::

    /usr/bin/time -f %e -o runs/default/TIME snakemake --cores all \
        --configfile config/config.yaml -d runs/default
    /usr/bin/time -f %e -o runs/fashion_mnist/TIME snakemake --cores all \
        --configfile config/fashion_mnist.yaml -d runs/fashion_mnist
    /usr/bin/time -f %e -o runs/smoke/TIME snakemake --cores all \
        --configfile config/paper_smoke.yaml -d runs/smoke

(and likewise ``config/defenses.yaml``, ``config/fashion_mnist_defenses.yaml``,
``config/audit.yaml``; the Flower example runs in the repository itself:
``python examples/flower/run.py`` then ``/usr/bin/time -f %e -o TIME snakemake --cores all
--configfile examples/flower/audit.yaml``, named ``flower=.``), then::

    python docs/update.py default=runs/default fashion_mnist=runs/fashion_mnist smoke=runs/smoke

Step 1 copies what the pages need of each named run into ``docs/data/<run>/`` (the
tables, the regime of every cell from its manifest and history, the wall time, the
config, the commit, and a ``NOTE`` file of the run's folder if there is one: say there
under what load it was timed); step 2 renders the pages from ``docs/data/`` — every run recorded
there, named now or before — and copies the figures they show. ``python docs/update.py``
alone re-renders from ``docs/data/``.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd

DOCS = Path(__file__).resolve().parent
DATA = DOCS / "data"
REPO = DOCS.parent
#: Documented runs: name → (config, what it is).
RUNS = {
    "default": ("config/config.yaml", "the embedded default: digits, AlexNet, K = 10"),
    "fashion_mnist": ("config/fashion_mnist.yaml", "Fashion-MNIST, AlexNet, K = 10"),
    "smoke": ("config/paper_smoke.yaml", "the paper's grid shape, tiny (a smoke test)"),
    "defenses": ("config/defenses.yaml", "digits, every defense kind"),
    "fashion_mnist_defenses": (
        "config/fashion_mnist_defenses.yaml",
        "Fashion-MNIST, six defense kinds",
    ),
    "audit": ("config/audit.yaml", "the one-run ε audit"),
    "participation": (
        "config/participation.yaml",
        "Fashion-MNIST, AlexNet, partial participation × dp (docs/participation.md)",
    ),
    "secagg": (
        "config/secagg.yaml",
        "the participation run under secure aggregation (docs/secure_aggregation.md)",
    ),
    "flower": (
        "examples/flower/audit.yaml",
        "a real Flower training (examples/flower), recorded and audited",
    ),
}
TABLES = (
    "attacks.csv",
    "findings.csv",
    "privacy_utility.csv",
    "hypervolume.csv",
    "secure_aggregation.csv",
)
#: The attacks the summary tables show (code names), in order.
SHOWN = ("loss", "loss_series", "fedmia_loss", "cos", "cos_series", "fedmia_cos")


def _paper_view(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of the paper's threat view and membership level (uploads, client).

    Tables of runs before the threat views have neither column: all their rows are.
    (fedmia.report.tables.paper_rows; this script does not import fedmia.)
    """
    if "view" not in table or "membership" not in table:
        return table
    return table[(table["view"] == "uploads") & (table["membership"] == "client")]


def _git_commit(run: Path) -> str:
    """The commit the run's folder is checked out at (a run inside a clone: the clone's)."""
    r = subprocess.run(
        ["git", "-C", str(run), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return r.stdout.strip() or "unknown"


REGIME_COLUMNS = [
    "dataset",
    "model",
    "defense",
    "partition",
    "seed",
    "rounds",
    "diverged_round",
    "test_accuracy",
    "best_test_accuracy",
    "client_train_accuracy",
    "participation",
    "num_clients",
    "clients_seen",
    "client_rounds_mean",
]


def _regime(run: Path) -> pd.DataFrame:
    """One row per cell: final and best test accuracy, the clients' last train accuracy."""
    rows = []
    manifests = [
        *(run / "results" / "train").rglob("manifest.json"),
        *(run / "results" / "imported").rglob("manifest.json"),
    ]
    for man in sorted(manifests):
        m = json.loads(man.read_text())
        train_acc = float("nan")  # an imported recording has no clients' history
        if (man.parent / "history.parquet").is_file():
            h = pd.read_parquet(man.parent / "history.parquet")
            clients = h[h["client_id"] >= 0]
            last = clients[clients["round"] == clients["round"].max()]
            train_acc = float(last["train_accuracy"].mean())
        part = m.get("participation") or {}
        taken = part.get("client_rounds") or []
        rows.append(
            {k: m[k] for k in ("dataset", "model", "defense", "partition", "seed")}
            | {
                "rounds": m["rounds"],
                "diverged_round": m.get("diverged_round"),
                "test_accuracy": m["final_test_accuracy"],
                "best_test_accuracy": m.get("best_test_accuracy"),
                "client_train_accuracy": train_acc,
                "participation": float(part.get("fraction", 1.0)),
                "num_clients": len(taken) or None,
                "clients_seen": sum(1 for t in taken if t > 0) if taken else None,
                "client_rounds_mean": sum(taken) / len(taken) if taken else None,
            }
        )
    return pd.DataFrame(rows, columns=REGIME_COLUMNS)


def collect(name: str, run: Path) -> None:
    """Copy what the pages need of run ``name`` (working directory ``run``) to docs/data."""
    tables = run / "results" / "tables"
    if not (tables / "attacks.csv").is_file():
        raise SystemExit(
            f"{tables / 'attacks.csv'} does not exist: finish the '{name}' run in {run} first"
        )
    out = DATA / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for t in TABLES:
        if (tables / t).is_file():
            shutil.copyfile(tables / t, out / t)
    _regime(run).to_csv(out / "regime.csv", index=False)
    seconds = float((run / "TIME").read_text().split()[-1]) if (run / "TIME").is_file() else None
    figures = sorted(
        (run / "results" / "figures").rglob("rounds.png"),
        key=lambda f: ("/none/" not in str(f), "/iid/" not in str(f), str(f)),
    )
    figure = figures[0] if figures else None
    if figure is not None:
        shutil.copyfile(figure, out / "rounds.png")
    for extra in ("privacy_utility_cos.png", "privacy_audit.png"):
        if (run / "results" / "figures" / extra).is_file():
            shutil.copyfile(run / "results" / "figures" / extra, out / extra)
    (out / "run.json").write_text(
        json.dumps(
            {
                "config": RUNS[name][0],
                "commit": _git_commit(run),
                "seconds": seconds,
                "figure": str(figure.relative_to(run)) if figure else None,
                "note": (run / "NOTE").read_text().strip() if (run / "NOTE").is_file() else None,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"docs/data/{name} <- {run}")


# ----------------------------------------------------------------------------- rendering


def _fmt(mean: float, lo: float, hi: float, scale: float = 1.0, digits: int = 3) -> str:
    if not math.isfinite(mean):
        return "n/a"
    if math.isfinite(lo) and math.isfinite(hi):
        return f"{mean * scale:.{digits}f} [{lo * scale:.{digits}f}, {hi * scale:.{digits}f}]"
    return f"{mean * scale:.{digits}f}"


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return "not timed"
    return f"{int(seconds // 60)} min {int(round(seconds % 60))} s"


def _md(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in r) + " |" for r in df.itertuples(False)]
    return "\n".join(lines) + "\n"


def _labels() -> dict[str, str]:
    from fedmia.attacker.attacks import ATTACKS  # noqa: PLC0415 (a script: fedmia installed)

    return {a: ATTACKS.get(a).label for a in ATTACKS.registered()}


def _headline(attacks: pd.DataFrame, protocol: str, selection: str) -> pd.DataFrame:
    """Per setting: TPR@1 %, TPR@0.1 % and AUC of the paper's attacks, with intervals."""
    labels = _labels()
    part = attacks[
        (attacks.protocol == protocol)
        & attacks.single_round.isin([selection, "all attacked rounds"])
        & attacks.attack.isin(SHOWN)
    ]
    rows = []
    for (ds, model, defense, partition), g in part.groupby(
        ["dataset", "model", "defense", "partition"], sort=False
    ):
        for metric, label, scale in (
            ("tpr@1%", "TPR@1% (%)", 100),
            ("auc", "AUC", 1),
            ("tpr@0.1%", "TPR@0.1% (%)", 100),
        ):
            m = g[g.metric == metric].set_index("attack")
            few = bool(m["low_count"].astype(bool).any()) if len(m) else False
            row = {
                "setting": f"{ds} / {model} / {defense} / {partition}",
                "metric": label + (" < 10 FP" if few else ""),
            }
            for a in SHOWN:
                r = m.loc[a] if a in m.index else None
                row[labels.get(a, a)] = (
                    "n/a"
                    if r is None
                    else _fmt(r["mean"], r["ci_low"], r["ci_high"], scale, 2 if scale == 100 else 3)
                )
            rows.append(row)
    return pd.DataFrame(rows)


def _strongest(attacks: pd.DataFrame, protocol: str, selection: str, k: int = 5) -> pd.DataFrame:
    """The k strongest attacks by TPR@1 % per setting (every registered attack)."""
    labels = _labels()
    part = attacks[
        (attacks.protocol == protocol)
        & (attacks.metric == "tpr@1%")
        & attacks.single_round.isin([selection, "all attacked rounds"])
    ]
    rows = []
    part = part[part.defense == "none"] if (part.defense == "none").any() else part
    for (ds, model, partition), g in part.groupby(["dataset", "model", "partition"], sort=False):
        for r in g.sort_values("mean", ascending=False).head(k).itertuples():
            rows.append(
                {
                    "setting": f"{ds} / {model} / {partition}",
                    "attack": labels.get(r.attack, r.attack),
                    "TPR@1% (%)": _fmt(r.mean, r.ci_low, r.ci_high, 100, 2),
                }
            )
    return pd.DataFrame(rows)


#: The paper's attacks the calibrated ones (fedmia's LiRA and RMIA) are compared with.
BEYOND_PAPER = ("fedmia_loss", "fedmia_cos", "cos_series")


def _beyond_attacks() -> tuple[str, ...]:
    """:data:`BEYOND_PAPER`, then every registered LiRA and RMIA attack (table order)."""
    from fedmia.attacker.attacks import ATTACKS, CALIBRATED_KINDS, attack_order  # noqa: PLC0415

    calibrated = (a for a in attack_order() if ATTACKS.get(a).kind in CALIBRATED_KINDS)
    return (*BEYOND_PAPER, *calibrated)


def _beyond(attacks: pd.DataFrame, selection: str) -> tuple[pd.DataFrame, list[str]]:
    """LiRA and RMIA beside FedMIA-I/II and Cos-II, per setting and protocol.

    The table (TPR@1 % and AUC with intervals, the undefended model) and, per setting and
    protocol, a sentence naming the strongest attack by each metric.
    """
    labels, beyond = _labels(), _beyond_attacks()
    part = attacks[
        attacks.attack.isin(beyond)
        & attacks.metric.isin(["tpr@1%", "auc"])
        & attacks.single_round.isin([selection, "all attacked rounds"])
    ]
    part = part[part.defense == "none"] if (part.defense == "none").any() else part
    rows, strongest = [], []
    keys = ["dataset", "model", "partition", "protocol"]
    for (ds, model, partition, protocol), g in part.groupby(keys, sort=False):
        setting = f"{ds} / {model} / {partition}"
        for metric, scale, digits in (("tpr@1%", 100, 1), ("auc", 1, 3)):
            m = g[g.metric == metric].set_index("attack")
            row = {"setting": setting, "protocol": protocol, "metric": metric}
            for a in beyond:
                if a in m.index:
                    r = m.loc[a]
                    row[labels.get(a, a)] = _fmt(r["mean"], r.ci_low, r.ci_high, scale, digits)
            rows.append(row)
            if len(m):
                best = m["mean"].idxmax()
                b = m.loc[best]
                value = _fmt(b["mean"], b.ci_low, b.ci_high, scale, digits)
                name = labels.get(best, best)
                strongest.append(f"{setting}, `{protocol}`, {metric}: **{name}** ({value})")
    return pd.DataFrame(rows), strongest


def _eps(v: float) -> str:
    return "—" if not math.isfinite(v) else f"{v:.3g}"


def _sampled(attacks: pd.DataFrame) -> bool:
    """Whether a run has cells whose clients were sampled per round (fraction below 1)."""
    return "participation" in attacks and bool((attacks["participation"] < 1).any())


def _participation(
    attacks: pd.DataFrame, privacy: pd.DataFrame, regime: pd.DataFrame, selection: str
) -> list[str]:
    """A sampled run's cells (participation, ε, accuracy) and its attacks with ε beside them.

    One table of the cells — K, the fraction and participants per round, how many clients
    took part at all, the rounds a target's series combines, the accounted ε against the
    server (over the rounds of the client that took part most) and against an observer of
    the global models, the clients' training and the global test accuracy — then, per
    protocol, the paper's attacks (single-round at ``selection``) and the strongest of all
    with 95 % intervals, each row with its cell's participation and ε.
    """
    keys = ["dataset", "model", "defense", "partition"]
    eps_cols = ["dp_rounds", "epsilon_rdp", "epsilon_observer_rdp", "strength"]
    priv = privacy.drop_duplicates(keys)[[*keys, *eps_cols]]
    cells = regime.merge(priv, on=keys, how="left")
    cells = cells.assign(_s=cells["strength"].fillna(-1.0)).sort_values(
        ["participation", "num_clients", "_s"], ascending=[False, True, True]
    )
    series = attacks[(attacks.attack == "loss_series") & (attacks.metric == "auc")]
    series = series.drop_duplicates(keys).set_index(keys)
    rows = []
    for c in cells.itertuples():
        k, f = int(c.num_clients), float(c.participation)
        key = (c.dataset, c.model, c.defense, c.partition)
        tr = series.loc[key] if key in series.index else None
        rows.append(
            {
                "K": k,
                "participation": f"{f:g}",
                "participants a round": int(math.floor(f * k + 0.5)) or 1,
                "clients seen": f"{int(c.clients_seen)} of {k}",
                "rounds per target (series)": "n/a"
                if tr is None
                else f"{tr.target_rounds_mean:.1f} ({tr.target_rounds_min:.0f}–"
                f"{tr.target_rounds_max:.0f})",
                "defense": c.defense,
                "ε server (RDP; rounds)": _eps(c.epsilon_rdp)
                + ("" if not math.isfinite(c.epsilon_rdp) else f" ({c.dp_rounds:.0f})"),
                "ε observer (RDP)": _eps(c.epsilon_observer_rdp),
                "train acc": f"{c.client_train_accuracy:.3f}",
                "test acc": f"{c.test_accuracy:.3f}"
                + ("" if pd.isna(c.diverged_round) else f" (div. r{c.diverged_round:.0f})"),
            }
        )
    out = [
        "The cells (ε at δ = privacy.delta, client level, from `privacy_utility.csv`: "
        "against the server over the rounds of the client that took part most, and "
        "against an observer of the global models over all rounds — uniform sampling: "
        "RDP under replace-one, docs/participation.md; — for no guarantee; train acc: "
        "the last round's participants on their own data; test acc: the final global "
        "model):",
        "",
        _md(pd.DataFrame(rows)),
    ]
    labels = _labels()
    part = attacks[attacks.single_round.isin([selection, "all attacked rounds"])]
    for protocol in dict.fromkeys(part.protocol):
        rows = []
        for c in cells.itertuples():
            g = part[
                (part.protocol == protocol)
                & (part.defense == c.defense)
                & (part.partition == c.partition)
                & (part.dataset == c.dataset)
                & (part.model == c.model)
            ]
            for metric, label, scale, digits in (
                ("auc", "AUC", 1, 3),
                ("tpr@1%", "TPR@1% (%)", 100, 1),
                ("tpr@0.1%", "TPR@0.1% (%)", 100, 1),
            ):
                m = g[g.metric == metric].set_index("attack")
                few = bool(m["low_count"].astype(bool).any()) if len(m) else False
                row = {
                    "participation": f"{c.participation:g} (K = {int(c.num_clients)})",
                    "defense": c.defense,
                    "ε server": _eps(c.epsilon_rdp),
                    "metric": label + (" < 10 FP" if few else ""),
                }
                for a in SHOWN:
                    r = m.loc[a] if a in m.index else None
                    row[labels.get(a, a)] = (
                        "n/a" if r is None else _fmt(r["mean"], r.ci_low, r.ci_high, scale, digits)
                    )
                if len(m) and m["mean"].notna().any():
                    best = m["mean"].idxmax()
                    b = m.loc[best]
                    row["strongest of all"] = (
                        f"{labels.get(best, best)}: "
                        f"{_fmt(b['mean'], b.ci_low, b.ci_high, scale, digits)}"
                    )
                rows.append(row)
        out += [
            f"**Protocol `{protocol}`**, single-round attacks (Loss-I, Cos-I) at "
            f"`{selection}`, multi-round ones over each target's own rounds; the last "
            "column names the strongest of every registered attack by that metric (a mean: "
            "overlapping intervals do not rank):",
            "",
            _md(pd.DataFrame(rows)),
        ]
    return out


#: The protocol the secure-aggregation section reads: held-out non-members, the same at both
#: membership levels (at the federation level every non-member is held out anyway).
SECAGG_PROTOCOL = "heldout"
#: The federation-level attacks the section names (single-round at each target's best
#: round, as the participation section), beside each view's strongest.
SECAGG_NAMED = (("cos", "best_tpr_per_target"), ("loss", "best_tpr_per_target"))


def _setting(row: Any) -> str:
    """``K = 10, 0.5, dp σ=0.01``-style label of a setting row (participation and defense)."""
    k = row.partition.split("_")[0].lstrip("k")
    return f"K = {k} at {row.participation:g}, {row.defense}"


def _secure_aggregation(sa: pd.DataFrame, privacy: pd.DataFrame, labels: dict) -> list[str]:
    """The secure-aggregation run: what the aggregate view removes, and the ε columns.

    Per setting and membership level (held-out protocol): each view's strongest attack
    (a per-view maximum, a selection) and the named federation-level attacks, TPR@0.1 %
    and AUC under the uploads and the aggregate with the difference and its 95 % interval
    (the table's caption: the two views treated as independent). Then per setting the
    accounted ε per view, the one-run bound, the one-shot estimate and the accuracy with
    and without the canaries.
    """
    sa = sa[sa.protocol == SECAGG_PROTOCOL].copy()
    sa["_order"] = sa.participation.rank(ascending=False, method="dense")
    picked = sa[
        (sa.row == "strongest")
        | (sa.membership == "federation")
        & sa.apply(lambda r: (r.attack, r.single_round) in SECAGG_NAMED, axis=1)
    ]

    def tpr(r: Any, v: str) -> str:
        return _fmt(r[f"tpr_{v}"], r[f"tpr_{v}_ci_low"], r[f"tpr_{v}_ci_high"], 100, 2)

    def auc(r: Any, v: str) -> str:
        return _fmt(r[f"auc_{v}"], r[f"auc_{v}_ci_low"], r[f"auc_{v}_ci_high"])

    def name(r: Any, v: str) -> str:
        a = r[f"attack_{v}"]
        return "n/a" if not isinstance(a, str) else labels.get(a, a)

    rows = []
    for r in picked.sort_values(["membership", "_order", "defense", "row"]).itertuples(False):
        r = r._asdict()
        rows.append(
            {
                "level": r["membership"],
                "setting": _setting(pd.Series(r)),
                "row": "strongest" if r["row"] == "strongest" else labels.get(r["attack"]),
                "uploads: attack": name(r, "uploads"),
                "TPR@0.1 % uploads": tpr(r, "uploads"),
                "aggregate: attack": name(r, "aggregate"),
                "TPR@0.1 % aggregate": tpr(r, "aggregate"),
                "TPR removed": _fmt(
                    r["tpr_removed"], r["tpr_removed_ci_low"], r["tpr_removed_ci_high"], 100, 2
                ),
                "AUC uploads": auc(r, "uploads"),
                "AUC aggregate": auc(r, "aggregate"),
                "AUC removed": _fmt(
                    r["auc_removed"], r["auc_removed_ci_low"], r["auc_removed_ci_high"]
                ),
                "note": r["note"] if isinstance(r["note"], str) else "",
            }
        )
    out = [
        "**What secure aggregation removes** (protocol `heldout`: the 10,000 test images as "
        "non-members, so TPR@0.1 % rests on 10 false positives; single-round attacks at each "
        "target's best round; TPR in %, mean [95 % interval] over targets; *removed* = "
        "uploads − aggregate, its interval treating the two views as independent; "
        "`strongest`: each view's strongest attack of the level by TPR@0.1 %, picked with "
        "hindsight — a selection; every attack: `results/tables/secure_aggregation.md` of "
        "the run):",
        "",
        _md(pd.DataFrame(rows)),
    ]
    pv = privacy[(privacy.protocol == SECAGG_PROTOCOL)].drop_duplicates(
        ["partition", "defense", "view", "membership"]
    )
    fraction = dict(zip(sa.partition, sa.participation, strict=True))
    cells = []
    for _, g in pv.groupby(["partition", "defense"], sort=False):
        first = g.iloc[0].copy()
        first["participation"] = fraction[first.partition]
        by = {(v, m): x for (v, m), x in g.set_index(["view", "membership"]).iterrows()}

        def strongest(v: str, m: str, by: dict = by) -> str:
            x = by.get((v, m))
            return (
                "n/a"
                if x is None or not math.isfinite(x.strongest_tpr)
                else (f"{100 * x.strongest_tpr:.2f}")
            )

        up, ag = by.get(("uploads", "client")), by.get(("aggregate", "federation"))
        cells.append(
            {
                "setting": _setting(first),
                "ε server (uploads)": _eps(up.epsilon_accounted) if up is not None else "—",
                "ε secure aggregation": _eps(ag.epsilon_accounted) if ag is not None else "—",
                "ε one-shot, final model": _eps(first.epsilon_oneshot_final),
                "ε one-shot, all iterates": _eps(first.epsilon_oneshot_all_iterates),
                "test acc. (with canaries)": (
                    f"{first.test_accuracy:.3f} ({first.test_accuracy_with_canaries:.3f})"
                ),
                "strongest TPR@0.1 %: uploads client / federation": (
                    f"{strongest('uploads', 'client')} / {strongest('uploads', 'federation')}"
                ),
                "aggregate client / federation": (
                    f"{strongest('aggregate', 'client')} / {strongest('aggregate', 'federation')}"
                ),
                "_o": -first.participation,
            }
        )
    table = pd.DataFrame(cells).sort_values("_o", kind="stable").drop(columns="_o")
    out += [
        "**Privacy, counted three ways** (δ = 1e-5; ε accounted against the server that sees "
        "every upload and against a secure-aggregation server that sees each round's sum and "
        "who took part, both over the rounds of the most exposed client; the one-shot "
        "estimate (Andrew et al. 2024) from a second training with 10 canary clients — an "
        "*estimate*, not a bound, for an observer of the final model / of every aggregate; "
        "test accuracy without and with the canaries; — for no guarantee):",
        "",
        _md(table),
    ]
    return out


def _findings(findings: pd.DataFrame, protocol: str) -> pd.DataFrame:
    f = findings[(findings.protocol == protocol) & findings.metric.isin(["auc", "tpr@1%"])]
    rows = []
    for r in f.itertuples():
        scale = 1 if r.metric == "auc" else 100
        rows.append(
            {
                "setting": f"{r.dataset} / {r.defense} / {r.partition}",
                "single-round at": r.single_round,
                "claim": r.finding,
                "comparison": r.comparison,
                "metric": r.metric,
                "difference": _fmt(r.difference, r.ci_low, r.ci_high, scale, 3),
                "verdict": r.verdict,
                "runs": getattr(r, "n_runs", ""),
            }
        )
    return pd.DataFrame(rows)


def _run_header(name: str, info: dict, regime: pd.DataFrame) -> list[str]:
    lines = [
        f"## {name}: {RUNS[name][1]}",
        "",
        f"`snakemake --cores all --configfile {info['config']}` — "
        f"{_minutes(info['seconds'])} on the 2-core CPU development machine, at commit "
        f"`{info['commit']}`{'; ' + info['note'] if info.get('note') else ''}.",
        "",
    ]
    if len(regime):
        reg = (
            regime.groupby(["dataset", "model", "defense", "partition"], sort=False)
            .agg(
                seeds=("seed", "nunique"),
                rounds=("rounds", "max"),
                test_accuracy=("test_accuracy", "mean"),
                client_train_accuracy=("client_train_accuracy", "mean"),
                diverged=("diverged_round", lambda v: int(v.notna().sum())),
            )
            .reset_index()
        )
        if len(reg) <= 12:
            reg["test_accuracy"] = reg["test_accuracy"].map("{:.3f}".format)
            reg["client_train_accuracy"] = reg["client_train_accuracy"].map(
                lambda v: "n/a (imported)" if math.isnan(v) else f"{v:.3f}"
            )
            lines += [
                "The regime (final global model's test accuracy; the clients' training "
                "accuracy in the last round, averaged):",
                "",
                _md(reg),
            ]
        else:
            lines += [
                f"{len(regime)} cells; {int(regime['diverged_round'].notna().sum())} "
                "diverged (flagged results, chance utility).",
                "",
            ]
    return lines


def render_results() -> str:
    """docs/results.md from every run in docs/data."""
    out = [
        "# Results",
        "",
        "GENERATED by `python docs/update.py` from the documented runs (their commands "
        "and the commit each ran at are in each section). Intervals are 95 % bootstrap "
        'intervals (over targets and seeds; "Honest numbers" in '
        "[conventions.md](conventions.md)); a TPR row marked `< 10 FP` rests on fewer "
        "than 10 false positives: read it as a wide range. Results of earlier versions: "
        "[results_history.md](results_history.md).",
        "",
    ]
    for name in RUNS:
        folder = DATA / name
        if not (folder / "run.json").is_file():
            continue
        info = json.loads((folder / "run.json").read_text())
        attacks = _paper_view(pd.read_csv(folder / "attacks.csv"))
        regime = (
            pd.read_csv(folder / "regime.csv")
            if (folder / "regime.csv").is_file()
            else pd.DataFrame()
        )
        sampled = _sampled(attacks) and (folder / "privacy_utility.csv").is_file()
        # a sampled run's cell table below has the regime, with participation and ε
        out += _run_header(name, info, regime if not sampled else pd.DataFrame())
        selections = [s for s in dict.fromkeys(attacks.single_round) if s != "all attacked rounds"]
        selection = "last" if "last" in selections else (selections or ["last"])[0]
        if sampled:
            # a sampled round's last attacked round holds only its own participants: each
            # target's own best round keeps every target
            if "best_tpr_per_target" in selections:
                selection = "best_tpr_per_target"
            privacy = _paper_view(pd.read_csv(folder / "privacy_utility.csv"))
            out += _participation(attacks, privacy, regime, selection)
        if (folder / "secure_aggregation.csv").is_file():
            out += _secure_aggregation(
                pd.read_csv(folder / "secure_aggregation.csv"),
                pd.read_csv(folder / "privacy_utility.csv"),
                _labels(),
            )
        for protocol in dict.fromkeys(attacks.protocol) if not sampled else ():
            table = _headline(attacks, protocol, selection)
            if len(table) and len(table) <= 60:
                out += [
                    f"**Protocol `{protocol}`**, single-round attacks at `{selection}` "
                    "(the paper's attacks; every attack and section: "
                    f"`results/tables/attacks.md` of the run):",
                    "",
                    _md(table),
                ]
        strong = _strongest(attacks, "aligned", selection)
        if len(strong):
            out += [
                "The strongest attacks by TPR@1 % (aligned protocol; every registered "
                "attack, the undefended model):",
                "",
                _md(strong),
            ]
        beyond, best = _beyond(attacks, selection)
        if len(beyond) and len(beyond) <= 40:
            out += [
                "Beyond the paper: LiRA and RMIA (the other clients' uploads as reference "
                "models) beside FedMIA-I/II and Cos-II, the undefended model, every protocol "
                "(TPR@1 % in %, AUC):",
                "",
                _md(beyond),
                "The strongest attack in each setting (a mean; overlapping intervals do not "
                "rank — the paired comparisons are in the findings below):",
                "",
                *[f"- {b}" for b in best],
                "",
            ]
        if (folder / "findings.csv").is_file():
            f = _findings(pd.read_csv(folder / "findings.csv"), "aligned")
            if len(f) and len(f) <= 80:
                out += [
                    "The findings as tested claims (aligned protocol; AUC, TPR@1 % in points):",
                    "",
                    _md(f),
                ]
        if (folder / "rounds.png").is_file():
            shutil.copyfile(folder / "rounds.png", DOCS / f"{name}_rounds.png")
            out += [
                f"![attack success per round, {name}]({name}_rounds.png)",
                "",
                f"*`{info['figure']}` of the run.*",
                "",
            ]
    return "\n".join(out)


#: The runs whose findings are evidence about the paper's claims (the smoke run's tiny
#: cells test the pipeline, not the claims).
EVIDENCE = ("default", "fashion_mnist", "defenses", "fashion_mnist_defenses")
#: The paper's claims (2025 version), in order, for docs/reproduction.md.
CLAIMS = (
    (
        "multi-round beats single-round (II vs I)",
        "Finding 1: combining rounds (Loss-II, Cos-II) beats a single round (Loss-I, Cos-I).",
    ),
    (
        "other clients' models help (III vs II)",
        "Finding 2: the other clients' models (FedMIA, III) beat the series alone (II).",
    ),
    (
        "other clients' models help (III vs I)",
        "Finding 2': FedMIA (III) beats the single-round attack (I).",
    ),
    ("non-iid leaks more than iid", "Finding 3: non-iid data leaks more than iid."),
)


def render_reproduction() -> str:
    """docs/reproduction.md: the paper's claims one by one, with fedmia's verdicts."""
    out = [
        "# The paper's claims, checked",
        "",
        "GENERATED by `python docs/update.py` from the documented runs "
        "([results.md](results.md) has their settings). For each claim of Zhu et al. "
        "(arXiv 2402.06289, 2025 version), fedmia's measured verdict in every setting run "
        "here, under both non-member protocols: `holds` — the 95 % interval of the paired "
        "difference lies above 0; `fails` — below; `inconclusive` — it contains 0; "
        "`(1 run)` — one seed, a statement about that training run only. The paper "
        "measured CIFAR-100 and Dermnet at 300 rounds on a GPU; the runs here are CPU-scale "
        "(digits, Fashion-MNIST), so a verdict here is evidence about the claim, not a "
        "replication of the paper's numbers ([conventions.md](conventions.md) lists "
        "where the official code's conventions differ and what they do to the numbers).",
        "",
    ]
    frames = []
    for name in EVIDENCE:
        f = DATA / name / "findings.csv"
        if f.is_file():
            frames.append(pd.read_csv(f).assign(run=name))
    if not frames:
        return "\n".join(out + ["No documented run yet.", ""])
    findings = pd.concat(frames, ignore_index=True)
    for claim, text in CLAIMS:
        rows = findings[(findings.finding == claim) & (findings.metric == "auc")]
        out += [f"## {text}", ""]
        if rows.empty:
            out += ["Not measured in the documented runs.", ""]
            continue
        counts = rows.verdict.str.replace(r" \(1 run\)", "", regex=True).value_counts()
        out += [
            "Verdicts on the AUC over all runs, settings, protocols and selections: "
            + ", ".join(f"{v} {n}" for v, n in counts.items())
            + ".",
            "",
        ]
        table = rows.assign(
            difference=[
                _fmt(d, lo, hi)
                for d, lo, hi in zip(rows.difference, rows.ci_low, rows.ci_high, strict=True)
            ]
        )
        table = table[
            [
                "run",
                "dataset",
                "defense",
                "partition",
                "protocol",
                "single_round",
                "comparison",
                "difference",
                "verdict",
            ]
        ]
        out += [_md(table)]
    pu_frames = []
    for name in EVIDENCE:
        hv = DATA / name / "hypervolume.csv"
        if hv.is_file():
            pu_frames.append(pd.read_csv(hv).assign(run=name))
    out += [
        "## The paper's recommendation: data replacement (MixUp, InstaHide, augmentation, "
        "sampling) gives a better privacy–utility balance than gradient perturbation",
        "",
    ]
    if pu_frames:
        hv = pd.concat(pu_frames, ignore_index=True)
        replacement = {"mixup", "instahide", "augment", "subsample", "compose"}
        hv = hv[hv.protocol.eq("aligned") & hv.single_round.eq("all attacked rounds")]
        rows = []
        for (run, ds, attack), g in hv.groupby(["run", "dataset", "attack"], sort=False):
            rep = g[g.kind.isin(replacement)]["hypervolume"].max()
            grad = g[~g.kind.isin(replacement)]["hypervolume"].max()
            rows.append(
                {
                    "run": run,
                    "dataset": ds,
                    "attack": attack,
                    "best data replacement": f"{rep:.3f}",
                    "best gradient perturbation": f"{grad:.3f}",
                    "larger": "data replacement"
                    if rep > grad
                    else "gradient perturbation"
                    if grad > rep
                    else "tie",
                }
            )
        out += [
            "Table 2's hypervolume (larger: lower leakage at lower utility loss), the "
            "best kind of each family, aligned protocol, multi-round attacks (one seed: "
            "no interval; see the runs' caption notes):",
            "",
            _md(pd.DataFrame(rows)),
        ]
    else:
        out += [
            "No documented run with defenses in docs/data yet; the last measured "
            "verdict (fedmia 0.1.0, digits and Fashion-MNIST): not supported beyond noise "
            "— [results_history.md](results_history.md).",
            "",
        ]
    return "\n".join(out)


def main(argv: list[str]) -> int:
    """Collect the named runs, then render both pages from docs/data."""
    for arg in argv:
        name, sep, folder = arg.partition("=")
        if not sep or name not in RUNS:
            print(__doc__, file=sys.stderr)
            print(
                f"usage: python docs/update.py [NAME=DIR ...] (NAME in {list(RUNS)})",
                file=sys.stderr,
            )
            return 2
        collect(name, Path(folder))
    (DOCS / "results.md").write_text(render_results())
    (DOCS / "reproduction.md").write_text(render_reproduction())
    print("docs/results.md, docs/reproduction.md rendered from docs/data")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
