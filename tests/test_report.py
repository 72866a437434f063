from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedmia import report

CELL = dict(dataset="d", model="m", defense="none", partition="iid", seed=0)


def fake_results() -> pd.DataFrame:
    """Two targets; `loss` best at round 10, last round 20; `loss_series` multi-round."""
    rows = []
    for t in (0, 1):
        for rnd, auc in ((1, 0.55), (10, 0.70 + 0.02 * t), (20, 0.60)):
            rows.append(dict(CELL, attack="loss", target=t, round=rnd, auc=auc))
        rows.append(dict(CELL, attack="loss_series", target=t, round=-1, auc=0.8 + 0.1 * t))
    df = pd.DataFrame(rows)
    for m in ("tpr@0.1%", "tpr@1%", "tpr@10%", "balanced_accuracy"):
        df[m] = df["auc"] / 10
    df.loc[df.target == 1, "tpr@0.1%"] = np.nan  # undefined for one target
    df["roc_fpr"] = [np.array([0.0, 0.01, 1.0])] * len(df)
    df["roc_tpr"] = [np.array([0.0, 0.1, 1.0])] * len(df)
    return df


def test_select_rounds_best_and_last():
    res = fake_results()
    best = report.select_rounds(res, "best")
    assert set(best[best.attack == "loss"]["round"]) == {10}
    assert set(best[best.attack == "loss_series"]["round"]) == {-1}
    last = report.select_rounds(res, "last")
    assert set(last[last.attack == "loss"]["round"]) == {20}
    with pytest.raises(ValueError, match="choose from"):
        report.select_rounds(res, "median")


def test_summarize_is_tidy_and_aggregates_over_targets():
    s = report.summarize(fake_results())
    assert not s.duplicated(["dataset", "model", "defense", "partition", "attack",
                             "metric"]).any()
    auc = s[(s.attack == "loss") & (s.metric == "auc")].iloc[0]
    assert auc["mean"] == pytest.approx(0.71) and auc["n"] == 2
    assert auc["std"] == pytest.approx(np.std([0.70, 0.72], ddof=1))
    assert auc["last_round_mean"] == pytest.approx(0.60) and auc["selection"] == "best round"
    tpr = s[(s.attack == "loss") & (s.metric == "tpr@0.1%")].iloc[0]
    assert np.isnan(tpr["mean"]) and "fewer non-members" in tpr["note"]


def test_paper_table_layout():
    t = report.paper_table(report.summarize(fake_results()))
    assert list(t.columns) == ["dataset", "model", "defense", "partition", "metric",
                               "Loss-I (Blackbox-Loss)", "Loss-II (Loss-Series)"]
    assert t.metric.tolist() == ["TPR@0.1% (%)", "AUC"]
    assert t.iloc[1]["Loss-II (Loss-Series)"] == "0.850 ± 0.071"
    assert t.iloc[0]["Loss-I (Blackbox-Loss)"] == "n/a"
    assert "Loss-II" in report.to_markdown(t) and r"\pm" in report.to_latex(t)
