"""The report under two threat views: attacks.csv's view and membership columns, the
secure-aggregation table, the per-view privacy-utility table, and the paper's outputs left
unchanged by rows of other views (issue 22)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from fedmia.attacker import metrics
from fedmia.federation.defenses import DPDefense
from fedmia.privacy.events import cell_privacy
from fedmia.report import secagg, tables, utility
from fedmia.stages import io
from fedmia.stages import report as stage

CELL = dict(dataset="d", model="m", defense="none", partition="iid", seed=0)
PARTIAL, FULL = "sampled", "full"  # the partitions of a partial and a full participation cell


def row(attack, target, rnd, auc, tpr, *, view="uploads", membership="client", ci=None, **cell):
    """One attack result; ``ci``: (auc_lo, auc_hi, tpr_lo, tpr_hi) of its own interval."""
    lo_a, hi_a, lo_t, hi_t = ci if ci else (auc - 0.05, auc + 0.05, tpr - 0.02, tpr + 0.02)
    return dict(
        {**CELL, **cell},
        attack=attack,
        protocol="aligned",
        view=view,
        membership=membership,
        draw=0,
        target=target,
        round=rnd,
        attacked=True,
        n_rounds=1 if rnd >= 0 else 2,
        auc=auc,
        **{"tpr@0.1%": tpr, "tpr@1%": tpr, "tpr@10%": tpr, "balanced_accuracy": auc},
        auc_ci_low=lo_a,
        auc_ci_high=hi_a,
        **{"tpr@0.1%_ci_low": lo_t, "tpr@0.1%_ci_high": hi_t, "tpr@0.1%_fp": 1},
        n_members=10,
        n_nonmembers=2000,
    )


FED_UP = (0.70, 0.80, 0.05, 0.15)  # loss_series, federation level, uploads: its own interval
FED_AGG = (0.60, 0.70, 0.01, 0.07)


def two_view_results() -> pd.DataFrame:
    """Two cells (partial and full participation), the paper's rows and other views'.

    Client level: ``loss_series`` and ``fedmia_loss`` under uploads; ``loss_series`` also
    under aggregate in the partial cell only (it stands for a contrast attack). Federation
    level (target −1): ``loss_series`` and ``cos_series`` under both views; the strongest
    under uploads is ``loss_series``, under aggregate ``cos_series``.
    """
    rows = []
    for part in (PARTIAL, FULL):
        c = dict(partition=part)
        for t, (auc, tpr) in enumerate(((0.8, 0.2), (0.9, 0.4))):
            rows.append(row("loss_series", t, -1, auc, tpr, **c))
            rows.append(row("fedmia_loss", t, -1, auc - 0.1, tpr - 0.1, **c))
            if part == PARTIAL:
                rows.append(row("loss_series", t, -1, auc - 0.2, tpr - 0.15, view="aggregate", **c))
        fed = dict(target=-1, rnd=-1, membership="federation", **c)
        rows.append(row("loss_series", auc=0.75, tpr=0.10, ci=FED_UP, **fed))
        rows.append(row("cos_series", auc=0.70, tpr=0.08, **fed))
        rows.append(row("loss_series", auc=0.65, tpr=0.04, ci=FED_AGG, view="aggregate", **fed))
        rows.append(row("cos_series", auc=0.66, tpr=0.05, view="aggregate", **fed))
    df = pd.DataFrame(rows)
    df["roc_fpr"] = [np.array([0.0, 0.01, 1.0])] * len(df)
    df["roc_tpr"] = [np.array([0.0, 0.1, 1.0])] * len(df)
    return df


def cells() -> pd.DataFrame:
    return pd.DataFrame(
        [
            dict(
                CELL,
                partition=p,
                participation=f,
                diverged_round=np.nan,
                final_test_accuracy=0.8,
                best_test_accuracy=0.8,
                last_finite_test_accuracy=0.8,
            )
            for p, f in ((PARTIAL, 0.5), (FULL, 1.0))
        ]
    )


def half_width(lo: float, hi: float) -> float:
    return (hi - lo) / 2  # 1.96 × se with se = (hi − lo) / (2 × 1.96)


def test_attacks_csv_has_the_view_and_membership_after_the_protocol():
    summary = tables.summarize(two_view_results(), ["last"], cells=cells())
    cols = list(summary.columns)
    assert cols[cols.index("protocol") + 1 : cols.index("protocol") + 3] == ["view", "membership"]
    assert set(map(tuple, summary[["view", "membership"]].drop_duplicates().to_numpy())) == {
        ("uploads", "client"),
        ("aggregate", "client"),
        ("uploads", "federation"),
        ("aggregate", "federation"),
    }
    # a table written before the views: its rows are the paper's
    old = two_view_results().drop(columns=["view", "membership"])
    s = tables.summarize(old, ["last"])
    assert set(s["view"]) == {"uploads"} and set(s["membership"]) == {"client"}


def test_secure_aggregation_table_against_a_hand_computation():
    summary = tables.summarize(two_view_results(), ["last"], cells=cells(), fpr_rule="at_most")
    sa = secagg.secure_aggregation_table(summary)
    assert list(sa.columns) == list(secagg.SECAGG_COLUMNS)
    fed = sa[(sa.partition == PARTIAL) & (sa.membership == "federation")]
    ls = fed[(fed.row == secagg.ATTACK_ROW) & (fed.attack == "loss_series")].iloc[0]
    # one row per view: the summary's mean and interval are the row's own
    assert ls.tpr_uploads == pytest.approx(0.10) and ls.tpr_aggregate == pytest.approx(0.04)
    assert ls.tpr_removed == pytest.approx(0.06)
    h = math.hypot(half_width(*FED_UP[2:]), half_width(*FED_AGG[2:]))
    assert (ls.tpr_removed_ci_low, ls.tpr_removed_ci_high) == pytest.approx((0.06 - h, 0.06 + h))
    assert ls.auc_removed == pytest.approx(0.10)
    h = math.hypot(half_width(*FED_UP[:2]), half_width(*FED_AGG[:2]))
    assert (ls.auc_removed_ci_low, ls.auc_removed_ci_high) == pytest.approx((0.10 - h, 0.10 + h))
    # TPR@0.1 % with its false-positive count as attacks.csv states it
    allowed = metrics.max_false_positives(2000, 0.001, "at_most")
    assert ls.fp_allowed_uploads == ls.fp_allowed_aggregate == allowed == 2
    # the strongest of each view: a different attack per view, named
    best = fed[fed.row == secagg.STRONGEST_ROW].iloc[0]
    assert best.attack == secagg.STRONGEST_LABEL
    assert best.attack_uploads == f"loss_series @ {tables.ALL_ROUNDS}"
    assert best.attack_aggregate == f"cos_series @ {tables.ALL_ROUNDS}"
    assert best.tpr_removed == pytest.approx(0.10 - 0.05)
    # client level, two targets: the summary's own means and intervals
    up = summary[
        (summary.partition == PARTIAL)
        & (summary.attack == "loss_series")
        & (summary.metric == "auc")
        & (summary.membership == "client")
    ].set_index("view")
    cl = sa[
        (sa.partition == PARTIAL)
        & (sa.membership == "client")
        & (sa.row == secagg.ATTACK_ROW)
        & (sa.attack == "loss_series")
    ].iloc[0]
    assert cl.auc_uploads == pytest.approx(0.85) and cl.auc_aggregate == pytest.approx(0.65)
    h = math.hypot(
        half_width(up.loc["uploads", "ci_low"], up.loc["uploads", "ci_high"]),
        half_width(up.loc["aggregate", "ci_low"], up.loc["aggregate", "ci_high"]),
    )
    assert cl.auc_removed == pytest.approx(0.20)
    assert cl.auc_removed_ci_high - cl.auc_removed == pytest.approx(h)


def test_secure_aggregation_table_says_n_a_where_a_view_has_no_attack_or_level():
    summary = tables.summarize(two_view_results(), ["last"], cells=cells())
    sa = secagg.secure_aggregation_table(summary)
    # full participation: no client-level row under aggregate, said on every row
    full = sa[(sa.partition == FULL) & (sa.membership == "client")]
    assert set(full.attack) == {"loss_series", "fedmia_loss", secagg.STRONGEST_LABEL}
    assert set(full.note) == {secagg.NO_CONTRAST}
    assert full.tpr_aggregate.isna().all() and full.tpr_removed.isna().all()
    assert full.tpr_uploads.notna().all()
    # an attack of one view only: its row is there, the other side n/a with a note
    fm = sa[(sa.partition == PARTIAL) & (sa.attack == "fedmia_loss")].iloc[0]
    assert fm.attack_aggregate == "" and math.isnan(fm.auc_aggregate)
    assert fm.note.startswith("n/a under aggregate")
    md = secagg.secure_aggregation_markdown(sa)
    assert secagg.NO_CONTRAST in md and "independent" in md and "per-view maximum" in md
    assert "strongest: loss_series" in md


def attack_files(tmp_path, results: pd.DataFrame, name: str) -> list[str]:
    """``results`` written as one attack Parquet per attack, under ``tmp_path/name``."""
    paths = []
    for attack, g in results.groupby("attack", sort=False):
        p = tmp_path / name / f"{attack}.parquet"
        p.parent.mkdir(parents=True, exist_ok=True)
        io.write_parquet(g.reset_index(drop=True), p, "attack")
        paths.append(str(p))
    return paths


def report(tmp_path, files: list[str], name: str) -> dict[str, bytes]:
    out = {k: tmp_path / name / f"{k}.out" for k in tables_outputs()}
    stage.report_tables(
        attack_files=files,
        manifests=[],
        selections=["best_tpr_per_target", "last"],
        fpr_rule="at_most",
        partition_kinds={PARTIAL: "iid", FULL: "dirichlet"},
        outputs=out,
    )
    fig = {k: tmp_path / name / f"rounds.{k}" for k in ("png", "pdf")}
    options = {"width": 6, "dpi": 40, "round_plot_fpr": 0.01}
    stage.report_cell_figures(attack_files=files, kind="rounds", options=options, outputs=fig)
    return {k: p.read_bytes() for k, p in {**out, **fig}.items()}


def tables_outputs() -> tuple[str, ...]:
    return ("csv", "per_round", "md", "tex", "findings_csv", "findings_md")


def test_rows_of_other_views_leave_the_papers_outputs_unchanged(tmp_path):
    both = two_view_results()
    both = both.assign(round=np.where(both["round"] < 0, 3, both["round"]))  # single-round
    both = pd.concat([both, both.assign(round=4)], ignore_index=True)
    both["attack"] = both["attack"].map(
        {"loss_series": "loss", "cos_series": "cos", "fedmia_loss": "grad_norm"}
    )
    both["n_rounds"] = 1
    paper = tables.paper_rows(both)
    old = report(tmp_path, attack_files(tmp_path, paper.drop(columns=tables.VIEW_KEYS), "a"), "a")
    new = report(tmp_path, attack_files(tmp_path, paper, "b"), "b")
    mixed = report(tmp_path, attack_files(tmp_path, both, "c"), "c")
    assert old == new  # a table without the columns is read as uploads/client
    for key in ("md", "tex", "findings_csv", "findings_md", "png", "pdf"):
        assert mixed[key] == old[key], key
    assert b"Loss-I" in old["md"] and b"non-iid" in old["findings_csv"]
    csv = pd.read_csv(tmp_path / "c" / "csv.out")
    assert set(csv["view"]) == {"uploads", "aggregate"}
    kept = tables.paper_rows(csv).to_csv(index=False).encode()
    assert kept == old["csv"]


def write_oneshot(folder, cell: dict, final: float, every: float, acc: float) -> str:
    path = folder.joinpath(
        "results", "oneshot", cell["dataset"], cell["model"], cell["defense"], cell["partition"]
    )
    path.mkdir(parents=True, exist_ok=True)
    path = path / f"seed{cell['seed']}.json"
    doc = {
        "format": "oneshot/1",
        "canaries": 100,
        "null_canaries": 100,
        "dim": 5000,
        "delta": 1e-5,
        "final": {"mean": 0.1, "std": 0.01, "null_std": 5000**-0.5, "epsilon": final},
        "all_iterates": {
            "mean": 0.2,
            "std": 0.02,
            "null_mean": 0.1,
            "null_std": 0.01,
            "epsilon": every,
        },
        "test_accuracy_with_canaries": acc,
        "test_accuracy_without": 0.8,
        "estimate": "one-shot empirical estimate, not a bound",
        "applies_to": "the observer of the aggregate / final model",
    }
    path.write_text(json.dumps(doc))
    return str(path)


def test_privacy_utility_per_view_with_a_one_shot_estimate(tmp_path):
    summary = tables.summarize(two_view_results(), ["last"], cells=cells())
    files = [
        write_oneshot(tmp_path, dict(CELL, partition=PARTIAL, seed=s), f, e, a)
        for s, f, e, a in ((0, 1.0, 2.0, 0.70), (1, 3.0, 4.0, 0.74))
    ]
    shots = pd.DataFrame([stage.read_oneshot(f) for f in files])
    assert list(shots["seed"]) == [0, 1] and set(shots["partition"]) == {PARTIAL}
    eps = pd.DataFrame(
        [
            dict(
                {k: CELL[k] for k in tables.SETTING},
                partition=p,
                dp_rounds=3,
                dp_delta=1e-5,
                epsilon_rdp=8.0,
                epsilon_pld=7.0,
                epsilon_note="",
                epsilon_observer_rdp=math.nan,
                epsilon_observer_pld=math.nan,
                epsilon_observer_note="",
                **agg,
            )
            for p, agg in (
                (
                    PARTIAL,
                    dict(
                        epsilon_aggregate_rdp=3.0,
                        epsilon_aggregate_pld=math.nan,
                        epsilon_aggregate_note="",
                    ),
                ),
                (FULL, {}),
            )
        ]
    )
    audit = pd.DataFrame(
        [
            dict(
                CELL,
                partition=PARTIAL,
                attack="loss_series",
                epsilon_empirical=0.5,
                selected_attack="",
            )
        ]
        + [
            dict(
                CELL,
                partition=PARTIAL,
                attack="selected",
                epsilon_empirical=0.4,
                selected_attack="loss_series",
            )
        ]
    )
    strengths = pd.DataFrame([{"defense": "none", "kind": "none", "strength": 0.0, "params": ""}])
    pu = utility.privacy_utility(summary, cells(), strengths, eps, audit, oneshot=shots)
    assert list(pu.columns) == list(utility.PU_COLUMNS)
    part = pu[pu.partition == PARTIAL]
    up, agg = part[part.view == "uploads"], part[part.view == "aggregate"]
    # accounted ε per view: the server's (PLD), the aggregate observer's (RDP: no PLD)
    assert set(up.epsilon_accounted) == {7.0} and set(agg.epsilon_accounted) == {3.0}
    full_agg = pu[(pu.partition == FULL) & (pu.view == "aggregate")]
    assert full_agg.epsilon_accounted.isna().all()
    assert set(full_agg.epsilon_accounted_note) == {utility.NOT_ACCOUNTED}
    # the one-run bound: the audit attacks the uploads (client level)
    paper = tables.paper_rows(part)
    assert set(paper[paper.attack == "loss_series"].epsilon_empirical) == {0.5}
    assert agg.epsilon_empirical.isna().all() and agg.epsilon_empirical_selected.isna().all()
    assert set(up.epsilon_empirical_selected) == {0.4}
    # the one-shot estimate: the mean over the setting's seeds, on every row, its note
    assert set(part.epsilon_oneshot_final) == {2.0}
    assert set(part.epsilon_oneshot_all_iterates) == {3.0}
    assert part.test_accuracy_with_canaries.to_numpy() == pytest.approx(0.72)
    assert set(part.oneshot_note) == {
        "one-shot empirical estimate, not a bound; applies to the observer of the aggregate "
        "/ final model"
    }
    assert pu[pu.partition == FULL].epsilon_oneshot_final.isna().all()
    # the strongest attack's TPR@0.1 % per view and level
    fed = part[part.membership == "federation"].set_index("view")
    assert set(fed.loc["uploads", "strongest_attack"]) == {f"loss_series @ {tables.ALL_ROUNDS}"}
    assert fed.loc["uploads", "strongest_tpr"].to_numpy() == pytest.approx(0.10)
    assert set(fed.loc["aggregate", "strongest_attack"]) == {f"cos_series @ {tables.ALL_ROUNDS}"}


def test_privacy_utility_of_uploads_only_input_keeps_its_rows():
    """Without other views the rows are those of before, with view uploads."""
    res = two_view_results()
    paper = tables.paper_rows(res).drop(columns=tables.VIEW_KEYS)
    summary = tables.summarize(paper, ["last"], cells=cells())
    strengths = pd.DataFrame([{"defense": "none", "kind": "none", "strength": 0.0, "params": ""}])
    pu = utility.privacy_utility(summary, cells(), strengths)
    assert len(pu) == len(summary) and set(pu.view) == {"uploads"}
    assert pu.epsilon_oneshot_final.isna().all() and set(pu.oneshot_note) == {""}


def test_a_one_shot_file_of_another_format_is_refused(tmp_path):
    path = write_oneshot(tmp_path, CELL, 1.0, 2.0, 0.7)
    doc = json.loads(open(path).read())
    doc["format"] = "oneshot/0"
    open(path, "w").write(json.dumps(doc))
    with pytest.raises(ValueError, match="rerun the oneshot rule"):
        stage.read_oneshot(path)


def test_the_aggregate_observers_epsilon_is_read_from_the_privacy_record():
    """A record's ``aggregate`` entry (the layout of its ``observer``) gives
    ``epsilon_aggregate_*``; without one: NaN, ``not accounted``."""
    record = cell_privacy(DPDefense(sigma=2.0, clip=1.0).privacy(), rounds=20, unnoised_state=False)
    same = {"event": record["event"], "rounds": record["rounds"], "note": "as the server's"}
    cells = pd.DataFrame(
        [
            dict(CELL, partition=p, diverged_round=math.nan, rounds=20, privacy=r)
            for p, r in (
                (PARTIAL, {**record, "aggregate": same}),
                (FULL, {k: v for k, v in record.items() if k != "aggregate"}),  # an older record
            )
        ]
    )
    eps = stage.epsilons(cells, 1e-5).set_index("partition")
    assert eps.loc[PARTIAL, "epsilon_aggregate_rdp"] == pytest.approx(
        eps.loc[PARTIAL, "epsilon_rdp"]
    )
    assert eps.loc[PARTIAL, "epsilon_aggregate_note"] == "as the server's"
    assert np.isnan(eps.loc[FULL, "epsilon_aggregate_rdp"])
    assert eps.loc[FULL, "epsilon_aggregate_note"] == utility.NOT_ACCOUNTED
