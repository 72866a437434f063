from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from fedmia.attacker.uncertainty import percentile_interval
from fedmia.core.contracts import CELL_KEYS
from fedmia.federation.defenses import AugmentDefense
from fedmia.report import findings, tables, utility

CELL = dict(dataset="d", model="m", defense="none", partition="iid", seed=0)


def row(attack, target, rnd, auc, tpr, *, protocol="aligned", draw=0, attacked=True):
    return dict(
        CELL,
        attack=attack,
        protocol=protocol,
        draw=draw,
        target=target,
        round=rnd,
        attacked=attacked,
        n_rounds=1 if rnd >= 0 else 2,
        auc=auc,
        **{"tpr@0.1%": tpr, "tpr@1%": tpr, "tpr@10%": tpr, "balanced_accuracy": auc},
        n_members=10,
        n_nonmembers=1000,
    )


def fake_results() -> pd.DataFrame:
    """Two targets. `loss`: round 1 observed only (not attacked, best of all); round 10 best
    AUC; round 20 best TPR (tied with round 30, which is last); `loss_series` multi-round."""
    rows = []
    for t in (0, 1):
        rows.append(row("loss", t, 1, 0.95, 0.9, attacked=False))
        rows.append(row("loss", t, 10, 0.70 + 0.02 * t, 0.01))
        rows.append(row("loss", t, 20, 0.60, 0.05))
        rows.append(row("loss", t, 30, 0.58, 0.05))
        rows.append(row("loss_series", t, -1, 0.8 + 0.1 * t, 0.2))
    df = pd.DataFrame(rows)
    df["roc_fpr"] = [np.array([0.0, 0.01, 1.0])] * len(df)
    df["roc_tpr"] = [np.array([0.0, 0.1, 1.0])] * len(df)
    return df


def picked(sel, attack="loss"):
    return set(sel[sel.attack == attack]["round"])


def test_select_rounds():
    res = fake_results()
    assert picked(tables.select_rounds(res, "best_auc")) == {10}
    # best TPR: rounds 20 and 30 tie; the earliest wins (the official's stable sort), and
    # round 1 is never a candidate because it was only observed, not attacked
    assert picked(tables.select_rounds(res, "best_tpr_mean")) == {20}
    assert picked(tables.select_rounds(res, "best_tpr_per_target")) == {20}
    assert picked(tables.select_rounds(res, "last")) == {30}
    assert picked(tables.select_rounds(res, 1)) == {1}  # a fixed round may be any observed
    assert picked(tables.select_rounds(res, "last"), "loss_series") == {-1}
    with pytest.raises(ValueError, match="choose from"):
        tables.select_rounds(res, "median")
    with pytest.raises(ValueError, match="best_tpr_per_target .* best_tpr_mean"):
        tables.select_rounds(res, "best_tpr")  # retired: the new names are given
    with pytest.raises(ValueError, match="round 5 was not observed"):
        tables.select_rounds(res, 5)


def per_draw_results() -> pd.DataFrame:
    """Official draws 0 and 1; target 0 alone prefers the other round than the mean."""
    rows = []
    for draw, best in ((0, 10), (1, 20)):
        for t in (0, 1):
            for rnd in (10, 20):
                tpr = 0.3 if rnd == best else (0.35 if t == 0 else 0.1)
                rows.append(row("cos", t, rnd, 0.6, tpr, protocol="official", draw=draw))
    return pd.DataFrame(rows)


def test_best_tpr_mean_is_chosen_per_protocol_draw_on_the_mean_over_targets():
    sel = tables.select_rounds(per_draw_results(), "best_tpr_mean")
    assert sel.groupby("draw")["round"].unique().map(list).to_dict() == {0: [10], 1: [20]}


def test_best_tpr_per_target_is_each_targets_own_round():
    """The official choice (mia_attack_auto.py): each target its own best TPR@0.1 %."""
    sel = tables.select_rounds(per_draw_results(), "best_tpr_per_target")
    rounds = sel.set_index(["draw", "target"])["round"].to_dict()
    assert rounds == {(0, 0): 20, (0, 1): 10, (1, 0): 10, (1, 1): 20}
    assert set(sel.selected_by) == {"best_tpr_per_target"}
    # never a lower mean TPR than one round for all targets
    mean = tables.select_rounds(per_draw_results(), "best_tpr_mean")
    assert (sel.groupby("draw")["tpr@0.1%"].mean() >= mean.groupby("draw")["tpr@0.1%"].mean()).all()


def test_best_tpr_per_target_ties_go_to_the_earliest_round():
    rows = [row("loss", 0, rnd, 0.6, tpr) for rnd, tpr in ((10, 0.1), (20, 0.3), (30, 0.3))]
    sel = tables.select_rounds(pd.DataFrame(rows), "best_tpr_per_target")
    assert picked(sel) == {20}


@pytest.mark.parametrize(
    "how,who", [("best_tpr_mean", "the mean"), ("best_tpr_per_target", "each target")]
)
def test_best_tpr_falls_back_where_tpr_is_undefined(how, who):
    res = fake_results()
    res["tpr@0.1%"] = np.nan
    sel = tables.select_rounds(res, how)
    assert picked(sel) == {10}
    assert set(sel[sel.attack == "loss"].selected_by) == {
        f"best AUC of {who} (fallback: TPR@0.1% undefined)"
    }


@pytest.mark.parametrize("how", ["best_tpr_per_target", "best_tpr_mean", "best_auc", "last"])
def test_a_run_without_an_attacked_round_has_no_single_round_row(how):
    """Training diverged after round 1, observed for the figures only: nothing to pick."""
    res = fake_results()
    res = res[(res["round"] == 1)]
    sel = tables.select_rounds(res, how)
    assert sel.empty
    assert picked(tables.select_rounds(res, 1)) == {1}


def test_summarize_is_tidy_and_aggregates_over_targets():
    res = fake_results()
    res.loc[res.target == 1, "tpr@0.1%"] = np.nan  # undefined for one target
    s = tables.summarize(res, ["best_auc", "last"])
    assert list(s.columns) == list(tables.SUMMARY_COLUMNS)
    assert not s.duplicated(
        ["dataset", "model", "defense", "partition", "protocol", "single_round", "attack", "metric"]
    ).any()
    auc = s[(s.attack == "loss") & (s.metric == "auc")].set_index("single_round")
    assert auc.loc["best_auc", "mean"] == pytest.approx(0.71) and auc.loc["best_auc", "n"] == 2
    assert auc.loc["best_auc", "std"] == pytest.approx(np.std([0.70, 0.72], ddof=1))
    assert auc.loc["last", "mean"] == pytest.approx(0.58)
    assert auc.loc["last", "rounds"] == "30" and auc.loc["best_auc", "rounds"] == "10"
    multi = s[s.attack == "loss_series"]
    assert set(multi.single_round) == {tables.ALL_ROUNDS} and set(multi.rounds) == {"2"}
    tpr = s[(s.attack == "loss") & (s.metric == "tpr@0.1%")].iloc[0]
    assert np.isnan(tpr["mean"]) and "fewer non-members" in tpr["note"]


def test_official_draw_spread():
    rows = [
        row("cos_series", t, -1, auc, 0.1, protocol="official", draw=d)
        for d, auc in ((0, 0.6), (1, 0.7), (2, 0.8))
        for t in (0, 1)
    ]
    s = tables.summarize(pd.DataFrame(rows), ["last"])
    auc = s[s.metric == "auc"].iloc[0]
    assert auc["n"] == 6 and auc["mean"] == pytest.approx(0.7)
    assert auc["draw_std"] == pytest.approx(0.1)  # std of the per-draw means


def test_paper_tables_layout_and_captions():
    sections = tables.paper_tables(
        tables.summarize(fake_results(), ["best_tpr_per_target", "last"], fpr_rule="below")
    )
    assert [t for t, _, _ in sections] == [
        "protocol aligned · single-round attacks at best_tpr_per_target",
        "protocol aligned · single-round attacks at last",
    ]
    title, cap, t = sections[0]
    assert list(t.columns) == [
        "dataset",
        "model",
        "defense",
        "partition",
        "metric",
        "Loss-I (Blackbox-Loss)",
        "Loss-II (Loss-Series)",
    ]
    assert t.metric.tolist() == ["TPR@0.1% (%) < 10 FP", "AUC"]  # 1,000 non-members
    # two targets, AUC 0.8 and 0.9: the bootstrap interval of their mean spans them
    assert t.iloc[1]["Loss-II (Loss-Series)"] == "0.850 [0.800, 0.900]"
    assert t.iloc[0]["Loss-I (Blackbox-Loss)"] == "5.00 [5.00, 5.00]"
    for phrase in (
        "Protocol `aligned`",
        "picked with hindsight",
        "rounds picked: 20",
        "FPR < α (the official code)",
        "FPR resolution 1/1,000",
        "TPR@0.1% rests on at most 0 false positive(s) — α × non-members < 10",
    ):
        assert phrase in cap, cap
    md = tables.to_markdown(sections)
    assert md.count("### protocol aligned") == 2 and "Loss-II" in md
    tex = tables.to_latex(sections)
    assert r"\toprule" in tex and "[0.800, 0.900]" in tex


def test_hypervolume_against_a_hand_computed_front():
    # points (error, leakage): A (0.1, 0.5), B (0.3, 0.2), C (0.6, 0.1), D (0.4, 0.6)
    # D is dominated by B. Staircase: [0.1, 0.3) height 0.5, [0.3, 0.6) height 0.8,
    # [0.6, 1] height 0.9 -> 0.2·0.5 + 0.3·0.8 + 0.4·0.9 = 0.70
    e, t = np.array([0.1, 0.3, 0.6, 0.4]), np.array([0.5, 0.2, 0.1, 0.6])
    assert utility.hypervolume(e, t) == pytest.approx(0.70)
    assert utility.hypervolume(e[:3], t[:3]) == pytest.approx(0.70)  # D adds nothing
    assert utility.hypervolume(np.array([0.0]), np.array([0.0])) == 1.0
    assert utility.hypervolume(np.array([1.0]), np.array([0.0])) == 0.0
    assert utility.hypervolume(np.array([]), np.array([])) == 0.0
    # a trapezoid between A and B would be larger: the staircase is not a trapezoid
    assert utility.hypervolume(e[:2], t[:2]) == pytest.approx(0.2 * 0.5 + 0.7 * 0.8)


def front_table(points, **columns) -> pd.DataFrame:
    """A privacy-utility table of Cos-II's TPR at 0.1 % FPR (aligned, all attacked rounds),
    a row a point ``(defense, kind, strength, test accuracy, TPR)``; ``columns`` are added
    as :meth:`pandas.DataFrame.assign` adds them (a value, one a point, or a function of
    the table)."""
    rows = [
        dict(
            dataset="d",
            model="m",
            partition="iid",
            defense=defense,
            kind=kind,
            strength=strength,
            test_accuracy=acc,
            protocol="aligned",
            single_round="all attacked rounds",
            attack="cos_series",
            metric="tpr@0.1%",
            mean=tpr,
            std=0.0,
        )
        for defense, kind, strength, acc, tpr in points
    ]
    return pd.DataFrame(rows).assign(**columns)


def test_hypervolume_table_includes_the_undefended_cell_in_every_front():
    rows = front_table(
        (
            ("none", "none", np.nan, 0.9, 0.5),
            ("dp1", "dp", 1.0, 0.7, 0.2),
            ("dp2", "dp", 2.0, 0.4, 0.1),
            ("mx", "mixup", 0.5, 0.8, np.nan),
        )
    )
    hv = utility.hypervolume_table(rows).set_index("kind")
    # dp front: (0.1, 0.5), (0.3, 0.2), (0.6, 0.1) -> 0.70 as above
    assert hv.loc["dp", "hypervolume"] == pytest.approx(0.70)
    assert hv.loc["dp", "n_points"] == 3 and hv.loc["dp", "strengths"] == "1, 2"
    # mixup's only point has an undefined TPR: its front is the undefended point alone
    assert hv.loc["mixup", "hypervolume"] == pytest.approx(0.9 * 0.5)
    assert hv.loc["mixup", "excluded"] == 1
    assert "Cos-II (Avg-Cosine)" in utility.hypervolume_markdown(hv.reset_index())
    # a front without any defined point (the undefended TPR undefined too) is n/a, not 0
    none_undefined = rows.assign(mean=np.nan)
    hv = utility.hypervolume_table(none_undefined).set_index("kind")
    assert hv["hypervolume"].isna().all() and (hv["n_points"] == 0).all()


def test_hypervolume_of_a_defenses_own_points_as_the_paper():
    """``own`` (the paper's Def. 1): no undefended point in the front; said in the caption,
    with the utility and the seeds behind the points."""
    rows = front_table(
        (
            ("none", "none", np.nan, 0.9, 0.5),
            ("dp1", "dp", 1.0, 0.7, 0.2),
            ("dp2", "dp", 2.0, 0.4, 0.1),
            ("au", "augment", 4.0, 0.5, 0.3),
        ),
        n_seeds=[3, 1, 1, 1],
        utility="final test accuracy",
        defense_note=lambda t: t.kind.map({"augment": AugmentDefense.table_note}).fillna(""),
    )
    own = utility.hypervolume_table(rows, "own").set_index("kind")
    # dp alone: (0.3, 0.2), (0.6, 0.1) -> 0.3·0.8 + 0.4·0.9 = 0.60 (with none: 0.70)
    assert own.loc["dp", "hypervolume"] == pytest.approx(0.60)
    assert own.loc["dp", "n_points"] == 2 and own.loc["dp", "seeds"] == "1"
    both = utility.hypervolume_table(rows).set_index("kind")
    assert both.loc["dp", "hypervolume"] == pytest.approx(0.70)
    assert both.loc["dp", "seeds"] == "1-3"
    cap = utility.hypervolume_markdown(own.reset_index()).split("\n")[0]
    for phrase in (
        "each defense's own strengths (the paper's definition)",
        "Utility: final test accuracy",
        "Seeds behind the points: 1",
        "one on/off flag",
        "no-op there",
    ):
        assert phrase in cap, cap
    with pytest.raises(ValueError, match="choose from"):
        utility.hypervolume_table(rows, "paper")


def test_privacy_utility_uses_the_utility_it_names():
    summary = tables.summarize(fake_results(), ["last"])
    cells = pd.DataFrame(
        [
            dict(
                CELL,
                final_test_accuracy=0.6,
                best_test_accuracy=0.8,
                last_finite_test_accuracy=0.6,
                diverged_round=np.nan,
            )
        ]
    )
    strengths = pd.DataFrame(
        [{"defense": "none", "kind": "none", "strength": np.nan, "params": ""}]
    )
    for which, acc, text in (
        ("final", 0.6, "final test accuracy"),
        ("best", 0.8, "best test accuracy over rounds"),
    ):
        pu = utility.privacy_utility(summary, cells, strengths, utility=which)
        assert list(pu.columns) == list(utility.PU_COLUMNS)
        assert (pu.test_accuracy == acc).all() and pu.utility.str.startswith(text).all()
        assert (pu.n_seeds == 1).all()
    with pytest.raises(ValueError, match="choose from"):
        utility.privacy_utility(summary, cells, strengths, utility="max")


def test_hypervolume_fronts_are_split_by_the_defense_parameters():
    pu = front_table(
        (
            ("none", "none", np.nan, 0.9, 0.5),
            ("q1", "quantize", 1.0, 0.7, 0.2),
            ("q2", "quantize", 2.0, 0.4, 0.1),
            ("q1o", "quantize", 1.0, 0.6, 0.3),
            ("q2o", "quantize", 2.0, 0.8, 0.4),
        ),
        params=["", "", "", "variant=official", "variant=official"],
    )
    csv = io.StringIO()
    pu.to_csv(csv, index=False)
    csv.seek(0)
    read = pd.read_csv(csv)  # the stage reads the table back: an empty params is NaN there
    assert read["params"].isna().sum() == 3
    for table in (pu, read):
        hv = utility.hypervolume_table(table).set_index("params")
        assert set(hv.kind) == {"quantize"} and len(hv) == 2
        # the default variant: (0.1, 0.5), (0.3, 0.2), (0.6, 0.1) -> 0.70 as above
        assert hv.loc["", "hypervolume"] == pytest.approx(0.70)
        assert hv.loc["", "n_points"] == 3 and hv.loc["", "strengths"] == "1, 2"
        # official: (0.1, 0.5), (0.4, 0.3), (0.2, 0.4) -> 0.1·0.5 + 0.2·0.6 + 0.6·0.7
        assert hv.loc["variant=official", "hypervolume"] == pytest.approx(0.59)
        assert hv.loc["variant=official", "strengths"] == "1, 2"
        md = utility.hypervolume_markdown(hv.reset_index())
        assert "variant=official" in md and md.count("| quantize") == 2
    assert list(utility.hypervolume_table(pu).columns) == list(utility.HV_COLUMNS)


def test_summary_intervals_and_false_positives():
    rows = [row("cos_series", t, -1, auc, 0.02) for t, auc in enumerate((0.6, 0.7, 0.8, 0.9))]
    one = row("cos", 0, 10, 0.66, 0.03)
    res = pd.DataFrame(rows + [one])
    res["auc_ci_low"], res["auc_ci_high"] = res["auc"] - 0.05, res["auc"] + 0.05
    res["tpr@0.1%_fp"] = 1
    for t in (1, 2, 3):  # the single-round attack on four targets too
        res = pd.concat([res, pd.DataFrame([{**one, "target": t, "auc": 0.66 + 0.01 * t}])])
    s = tables.summarize(res.reset_index(drop=True), ["last"], fpr_rule="at_most")
    multi = s[(s.attack == "cos_series") & (s.metric == "auc")].iloc[0]
    assert multi["ci_low"] < 0.75 < multi["ci_high"]
    assert 0.6 <= multi["ci_low"] and multi["ci_high"] <= 0.9
    tpr = s[(s.attack == "cos_series") & (s.metric == "tpr@0.1%")].iloc[0]
    assert tpr["fp_allowed"] == 1 and tpr["fp_median"] == 1 and tpr["low_count"]
    # one unit: the interval is the row's own bootstrap interval
    single = tables.summarize(res[res.target == 0], ["last"])
    cos = single[(single.attack == "cos") & (single.metric == "auc")].iloc[0]
    assert (cos["ci_low"], cos["ci_high"]) == pytest.approx((0.61, 0.71))


def test_findings_over_seeds_are_t_intervals_of_the_per_seed_means():
    rows = []
    for seed, shift, wiggle in ((0, 0.08, 0.01), (1, 0.10, -0.01), (2, 0.12, 0.004)):
        for t in range(6):
            # II beats I by `shift` on every target of the seed (paired); III − II is
            # ±0.02 alternating plus a small per-seed wiggle
            rows.append(row("cos", t, 10, 0.6 + 0.02 * t, 0.01) | {"seed": seed})
            rows.append(row("cos_series", t, -1, 0.6 + 0.02 * t + shift, 0.02) | {"seed": seed})
            rows.append(
                row(
                    "fedmia_cos",
                    t,
                    -1,
                    0.6 + 0.02 * t + shift + wiggle + (0.02 if t % 2 else -0.02),
                    0.02,
                )
                | {"seed": seed}
            )
    f = findings.findings(pd.DataFrame(rows), ["last"]).set_index(["comparison", "metric"])
    ii = f.loc[("cos_series − cos", "auc")]
    half = stats.t.ppf(0.975, 2) * np.std([0.08, 0.10, 0.12], ddof=1) / np.sqrt(3)
    assert ii["difference"] == pytest.approx(0.1)
    assert (ii["ci_low"], ii["ci_high"]) == pytest.approx((0.1 - half, 0.1 + half))
    assert ii["verdict"] == "holds" and ii["n_runs"] == 3 and ii["n_units"] == 18
    assert ii["method"] == "t over 3 seeds"
    assert f.loc[("fedmia_cos − cos_series", "auc"), "verdict"] == "inconclusive"
    assert f.loc[("fedmia_cos − cos", "auc"), "verdict"] == "holds"
    assert list(findings.findings(pd.DataFrame(rows), ["last"]).columns) == list(
        findings.FINDINGS_COLUMNS
    )
    two = findings.findings(pd.DataFrame([r for r in rows if r["seed"] < 2]), ["last"])
    assert set(two["method"]) == {"t over 2 seeds (1 df: wide)"}  # t_{1} = 12.7: wide
    assert findings.verdict(-0.2, -0.1) == "fails" and findings.verdict(np.nan, 1) == "undefined"
    assert findings.verdict(0.1, 0.2, one_run=True) == "holds (1 run)"
    assert findings.verdict(-0.1, 0.2, one_run=True) == "inconclusive (1 run)"
    assert findings.verdict(-0.3, -0.2, one_run=True) == "fails (1 run)"


def test_findings_of_a_metric_undefined_everywhere_say_so():
    """A metric undefined on every row (e.g. TPR below 1/#non-members) gives rows with no
    value and the reason, beside the defined metrics of the same comparison."""
    rows = []
    for t in range(3):
        rows.append(row("cos", t, 10, 0.6, 0.01))
        rows.append(row("cos_series", t, -1, 0.7, 0.02))
    frame = pd.DataFrame(rows).assign(**{"tpr@0.1%": np.nan})
    f = findings.findings(frame, ["last"]).set_index(["comparison", "metric"])
    none = f.loc[("cos_series − cos", "tpr@0.1%")]
    assert none["method"] == "no defined value" and none["n_runs"] == 0
    assert np.isnan(none["difference"]) and none["verdict"] == "undefined"
    assert f.loc[("cos_series − cos", "auc"), "difference"] == pytest.approx(0.1)


def replicates_of(rows: list[dict], draw_reps) -> pd.DataFrame:
    """A replicate table for ``rows``: ``draw_reps(row)`` gives the B AUC replicates."""
    keys = [*CELL_KEYS, "attack", "protocol", "draw", "target", "round"]
    return pd.DataFrame(
        [
            {
                **{k: r[k] for k in keys},
                "auc_replicates": draw_reps(r).astype(np.float32),
                "tpr@0.1%_replicates": np.full(50, r["tpr@0.1%"], np.float32),
                "tpr@1%_replicates": np.full(50, r["tpr@1%"], np.float32),
            }
            for r in rows
        ]
    )


def test_a_finding_from_one_run_is_a_joint_bootstrap_labelled_one_run():
    rng = np.random.default_rng(0)
    pool = rng.normal(0, 0.03, size=50)  # the shared pool's effect, replicate by replicate
    rows = []
    for draw in (0, 1):
        for t in range(5):
            rows.append(row("loss", t, 10, 0.60 + 0.01 * t, 0.01, protocol="official", draw=draw))
            rows.append(
                row(
                    "loss_series",
                    t,
                    -1,
                    0.65 + 0.01 * t + 0.01 * draw,
                    0.02,
                    protocol="official",
                    draw=draw,
                )
            )
    noise = {(r["attack"], r["draw"], r["target"]): rng.normal(0, 0.01, 50) for r in rows}
    reps = replicates_of(
        rows, lambda r: r["auc"] + pool + noise[r["attack"], r["draw"], r["target"]]
    )
    f = findings.findings(pd.DataFrame(rows), ["last"], replicates=reps)
    auc = f[(f.comparison == "loss_series − loss") & (f.metric == "auc")].iloc[0]
    # a reader keeps the replicates of the selected rows only: here all 20 (one round each)
    extra = pd.DataFrame([r | {"round": 20, "auc": 0.5} for r in rows if r["round"] == 10])
    keys = findings.replicate_keys(pd.concat([pd.DataFrame(rows), extra]), ["last"])
    assert len(keys) == 20 and set(keys["round"]) == {-1, 20}
    assert auc["difference"] == pytest.approx(0.055) and auc["n_runs"] == 1
    assert auc["method"] == "joint bootstrap, 1 run" and auc["verdict"] == "holds (1 run)"
    # by hand: per target, the mean over draws of the paired replicate differences (the
    # pool's effect cancels in the pair); per replicate, the mean over the targets
    d = np.stack(
        [
            np.mean(
                [
                    np.float32(
                        rows[2 * (5 * dr + t) + 1]["auc"] + pool + noise["loss_series", dr, t]
                    ).astype(np.float64)
                    - np.float32(
                        rows[2 * (5 * dr + t)]["auc"] + pool + noise["loss", dr, t]
                    ).astype(np.float64)
                    for dr in (0, 1)
                ],
                axis=0,
            )
            for t in range(5)
        ]
    )
    want = percentile_interval(d.mean(axis=0))
    assert (auc["ci_low"], auc["ci_high"]) == pytest.approx(want)
    # without replicates, one run has no interval
    bare = findings.findings(pd.DataFrame(rows), ["last"])
    assert set(bare["verdict"]) == {"undefined"}
    assert set(bare["method"]) == {"1 run, no bootstrap replicates"}
    assert "(1 run)" in findings.findings_markdown(f) and "n_runs" in findings.findings_markdown(f)


def test_noniid_finding_compares_independent_groups():
    rows = []
    for seed, gap in ((0, 0.17), (1, 0.19), (2, 0.195)):
        rows += [
            row("cos_series", t, -1, 0.6 + gap, 0.1) | {"partition": "dir", "seed": seed}
            for t in range(4)
        ]
        rows += [row("cos_series", t, -1, 0.6 + 0.01 * t, 0.1) | {"seed": seed} for t in range(4)]
    f = findings.findings(pd.DataFrame(rows), ["last"], {"iid": "iid", "dir": "dirichlet"})
    auc = f[(f.finding == findings.NONIID_FINDING) & (f.metric == "auc")].iloc[0]
    assert auc["partition"] == "dir vs iid" and auc["difference"] == pytest.approx(0.17)
    assert auc["verdict"] == "holds" and auc["n_units"] == 24 and auc["n_runs"] == 3
    assert auc["method"] == "t over 3 seeds"
    assert "+0.170" in findings.findings_markdown(f)
    # one seed: each cell's own replicates, its targets drawn on their own
    one = [r for r in rows if r["seed"] == 0]
    reps = replicates_of(one, lambda r: r["auc"] + np.linspace(-0.02, 0.02, 50))
    f1 = findings.findings(
        pd.DataFrame(one), ["last"], {"iid": "iid", "dir": "dirichlet"}, replicates=reps
    )
    auc1 = f1[(f1.finding == findings.NONIID_FINDING) & (f1.metric == "auc")].iloc[0]
    assert auc1["verdict"] == "holds (1 run)" and auc1["n_runs"] == 1
    assert auc1["difference"] == pytest.approx(0.155)
    means = [
        np.stack(
            [
                np.float32(r["auc"] + np.linspace(-0.02, 0.02, 50)).astype(float)
                for r in one
                if r["partition"] == p
            ]
        ).mean(axis=0)
        for p in ("dir", "iid")
    ]
    assert (auc1["ci_low"], auc1["ci_high"]) == pytest.approx(
        percentile_interval(means[0] - means[1])
    )


def test_privacy_utility_names_the_selected_attack_audit():
    summary = tables.summarize(fake_results(), ["last"])
    cells = pd.DataFrame(
        [dict(CELL, final_test_accuracy=0.9, last_finite_test_accuracy=0.9, diverged_round=np.nan)]
    )
    audit = pd.DataFrame(
        [
            dict(CELL, attack=a, epsilon_empirical=e, selected_attack=s)
            for a, e, s in (
                ("loss", 0.3, ""),
                ("loss_series", 0.5, ""),
                ("selected", 0.4, "loss_series"),
            )
        ]
    )
    audit = pd.concat(
        [
            audit,
            audit.assign(
                seed=1,
                epsilon_empirical=audit["epsilon_empirical"] + 0.1,
                selected_attack=["", "", "loss"],
            ),
        ]
    )
    pu = utility.privacy_utility(
        summary,
        cells,
        pd.DataFrame([{"defense": "none", "kind": "none", "strength": 0.0, "params": ""}]),
        audit=audit,
    )
    assert list(pu.columns) == list(utility.PU_COLUMNS)
    assert set(pu["epsilon_empirical_selected"]) == {0.4}  # every row of the setting
    assert set(pu["selected_attack"]) == {"loss_series, loss"}
    aligned = pu[pu.attack == "loss"]
    assert set(aligned["epsilon_empirical"]) == {0.3}  # per attack: smallest over seeds
    assert "selected" not in set(pu.attack)


def test_a_cell_diverged_before_any_observed_round_has_rows_where_its_attacks_belong():
    """Its single-round attacks get a row per selection, its multi-round attacks one row
    (all NaN), as an undiverged cell's would; nothing lands in the wrong section."""
    res = fake_results()
    cells = pd.DataFrame(
        [dict(CELL, diverged_round=np.nan), dict(CELL, defense="noisy", diverged_round=2.0)]
    )
    s = tables.summarize(res, ["best_tpr_per_target", "last"], cells=cells)
    lost = s[s.defense == "noisy"]
    assert set(lost[lost.attack == "loss"].single_round) == {"best_tpr_per_target", "last"}
    assert set(lost[lost.attack == "loss_series"].single_round) == {tables.ALL_ROUNDS}
    assert lost["mean"].isna().all() and (lost["n"] == 0).all()
    assert set(lost.diverged) == {"seed 0 diverged in round 2"}
    placed = s[["single_round", "attack"]].drop_duplicates()
    assert set(map(tuple, placed.to_numpy())) == {
        ("best_tpr_per_target", "loss"),
        ("last", "loss"),
        (tables.ALL_ROUNDS, "loss_series"),
    }


def test_table_metrics_choose_the_rows_and_flag_few_false_positives():
    s = tables.summarize(fake_results(), ["last"], fpr_rule="at_most")
    ((_, cap, t),) = tables.paper_tables(s, ["tpr@1%", "auc", "tpr@0.1%"])
    # 1,000 non-members: TPR@1 % rests on 10 false positives, TPR@0.1 % on 1
    assert list(t.metric) == ["TPR@1% (%)", "AUC", "TPR@0.1% (%) < 10 FP"]
    assert "marked '< 10 FP' rests on fewer than 10 false positives" in cap
    with pytest.raises(ValueError, match="choose from"):
        tables.paper_tables(s, ["tpr@5%"])
