"""config/paper_smoke.yaml: derived from config/paper.yaml by a rule, and it plans."""

from __future__ import annotations

import runpy
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedmia import pipeline
from fedmia.core import contracts
from fedmia.stages import io
from fedmia.stages.prepare import write_standin

REPO = Path(__file__).resolve().parents[1]
DERIVE = runpy.run_path(str(REPO / "config" / "derive_smoke.py"))


def test_the_smoke_config_is_what_the_rule_derives_from_the_paper_config():
    """No drift: edit config/paper.yaml, then rerun config/derive_smoke.py."""
    assert (REPO / "config" / "paper_smoke.yaml").read_text() == DERIVE["render"](), (
        "config/paper_smoke.yaml is stale: python config/derive_smoke.py > config/paper_smoke.yaml"
    )


def test_the_smoke_grid_has_every_cell_kind_of_the_paper_grid():
    paper = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    smoke = yaml.safe_load((REPO / "config" / "paper_smoke.yaml").read_text())

    def used(config, section):
        return {v for block in config["grid"] for v in block[section]}

    assert used(smoke, "defenses") == set(paper["defenses"])  # every defense and strength
    assert smoke["defenses"] == paper["defenses"]
    assert used(smoke, "partitions") == used(paper, "partitions")
    assert used(smoke, "models") == used(paper, "models") == {"alexnet", "resnet18"}
    assert {p["kind"] for p in smoke["partitions"].values()} == {"iid", "dirichlet"}
    assert smoke["datasets"]["dermnet"]["split"] == "official"
    assert smoke["datasets"]["digits"]["kind"] == "digits"
    for section in ("measure", "report"):
        assert smoke[section] == paper[section]
    # AlexNet's undefended cells keep their seeds (the findings' t-interval needs three)
    undefended = [b for b in smoke["grid"] if b["defenses"] == ["none"]]
    assert undefended and all(
        b["seeds"] == [0, 1, 2] for b in undefended if b["models"] == ["alexnet"]
    )
    assert {p for b in undefended if "resnet18" in b["models"] for p in b["partitions"]} == {
        p for b in undefended for p in b["partitions"]
    }  # ResNet18 on every partition
    # every defense and strength meets the CIFAR-100 stand-in; every kind meets Dermnet
    kinds = {paper["defenses"][d]["kind"] for d in paper["defenses"]} - {"none"}
    derm = {
        paper["defenses"][d]["kind"]
        for b in smoke["grid"]
        if b["datasets"] == ["dermnet"]
        for d in b["defenses"]
    } - {"none"}
    assert derm == kinds


def test_the_smoke_config_plans(snakemake_cmd, tmp_path):
    r = subprocess.run(
        [
            *snakemake_cmd,
            "-s",
            str(REPO / "Snakefile"),
            "-d",
            str(tmp_path),
            "--cores",
            "1",
            "-n",
            "--configfile",
            str(REPO / "config" / "paper_smoke.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "standin" in r.stdout and "figure_privacy_utility" in r.stdout


def test_a_standin_tree_is_read_by_the_official_dermnet_split(tmp_path):
    root = tmp_path / "standin"
    write_standin(
        standin={"train_per_class": 3, "test_per_class": 2, "image_size": 16}, output=root
    )
    assert sorted(p.name for p in (root / "train").iterdir()) == [f"digit_{c}" for c in range(10)]
    assert len(list((root / "train").rglob("*.jpg"))) == 30
    assert len(list((root / "test").rglob("*.jpg"))) == 20
    assert not list(tmp_path.glob(".*.tmp"))  # nothing temporary left
    files = contracts.prepared_paths(tmp_path / "prepared")
    pipeline.prepare(
        {
            "kind": "dermnet",
            "root": str(root),
            "image_size": 16,
            "split": "official",
            "pool_size": 30,
            "test_size": 15,
        },
        files,
    )
    arrays, meta = io.load_prepared(files)
    assert arrays["images"].shape == (45, 3, 16, 16)
    assert int(arrays["is_test"].sum()) == 15 and not arrays["is_test"][:30].any()
    assert meta["num_classes"] == 10 and len(np.unique(arrays["labels"])) > 1
    # the same tree, written again, has the same bytes
    again = tmp_path / "again"
    write_standin(
        standin={"train_per_class": 3, "test_per_class": 2, "image_size": 16}, output=again
    )
    assert [p.read_bytes() for p in sorted(root.rglob("*.jpg"))] == [
        p.read_bytes() for p in sorted(again.rglob("*.jpg"))
    ]


def test_a_standin_asking_for_more_digits_than_a_class_has_stops(tmp_path):
    with pytest.raises(ValueError, match="fewer than train_per_class .* lower them"):
        write_standin(
            standin={"train_per_class": 150, "test_per_class": 50}, output=tmp_path / "big"
        )
    assert not list(tmp_path.iterdir())  # no partial tree
