"""The recorded server view: fedmia's train stage writes it, the import stage reads it back.

A trained cell's folder is a recording (``docs/flower.md``): imported as a cell of its own,
it gives the same observed rounds, the same owners and evaluation set, and so the same
measures, as the cell it was trained as. The bad recordings are in
``tests/test_bad_inputs.py``.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from fedmia import pipeline
from fedmia.core.config import PartitionConfig
from fedmia.core.contracts import format_tag
from fedmia.federation.partition import HELD_OUT, evaluation_set
from fedmia.stages import io

PART = dict(
    kind="iid", num_clients=3, samples_per_client=20, eval_members_per_client=10, eval_nonmembers=30
)
TRAIN = dict(rounds=2, local_epochs=1, batch_size=10, lr=0.05, observe_every=2, observe_rounds=[1])
CELL = dict(dataset="digits", model="alexnet", defense="none", partition="iid", seed=0)


@pytest.fixture(scope="module")
def cell(train_cell, tmp_path_factory):
    return train_cell(tmp_path_factory.mktemp("trained"), PART, TRAIN, CELL)


def test_the_train_stage_writes_a_recorded_view(cell, digits_files):
    view = io.read_view(cell["manifest"])
    assert view["format"] == format_tag("view") == "view/1"
    assert view["model"] == {"kind": "alexnet", "num_classes": 10, "in_channels": 3}
    _, meta = io.load_prepared(digits_files)
    assert view["dataset"] == {"kind": "digits", "num_samples": 1797, "sha256": meta["sha256"]}
    assert (view["num_clients"], view["rounds"], view["observed_rounds"]) == (3, 2, [1, 2])
    assert sorted(view["files"]) == [
        "final.safetensors",
        "observed/round0001.safetensors",
        "observed/round0002.safetensors",
        "ownership.parquet",
    ]
    folder = cell["manifest"].parent
    assert all(io.file_sha256(folder / f) == h for f, h in view["files"].items())
    obs = io.load_observed(io.round_file(cell["observed"], 2))
    assert obs["client_ids"].tolist() == [0, 1, 2] and obs["uploads"].shape[0] == 3
    own = io.read_ownership(cell["ownership"])
    part = pd.read_parquet(folder / "partition.parquet")
    assert (own["client_id"].to_numpy() == part["client_id"].to_numpy()).all()
    assert (own["eval"].to_numpy() == part["eval"].to_numpy()).all()


def test_a_trained_cell_read_back_through_the_import_path_is_the_same_cell(
    cell, digits_files, import_cell, tmp_path
):
    folder = cell["manifest"].parent
    out = import_cell(folder, tmp_path / "imported", PART, CELL)
    for r in (1, 2):
        assert (
            io.round_file(out["observed"], r).read_bytes()
            == io.round_file(cell["observed"], r).read_bytes()
        )
    a = pd.read_parquet(folder / "partition.parquet")
    b = pd.read_parquet(out["partition"])
    for column in ("sample_id", "client_id", "is_test", "eval"):
        assert (a[column].to_numpy() == b[column].to_numpy()).all(), column
    trained_man = pipeline.read_manifest(cell["manifest"])
    man = pipeline.read_manifest(out["manifest"])
    assert {k: man[k] for k in CELL} == CELL and man["observed_rounds"] == [1, 2]
    assert man["final_test_accuracy"] == pytest.approx(trained_man["final_test_accuracy"])
    assert man["recording"]["manifest_sha256"] == io.file_sha256(cell["manifest"])
    # the imported cell's folder is itself a recording, and its measures are the same
    assert io.read_view(out["manifest"])["files"] == trained_man["view"]["files"]
    measures = []
    for part_file, obs in (
        (folder / "partition.parquet", cell["observed"]),
        (out["partition"], out["observed"]),
    ):
        mdm = tmp_path / f"mdm{len(measures)}.parquet"
        pipeline.measure(
            data=digits_files,
            partition_file=part_file,
            observed_dir=obs,
            rounds=[1, 2],
            device="cpu",
            threads=1,
            output=mdm,
        )
        measures.append(pd.read_parquet(mdm))
    pd.testing.assert_frame_equal(*measures)


def test_an_evaluation_set_is_drawn_where_the_recording_names_none():
    owner = np.array([0] * 30 + [1] * 30 + [HELD_OUT] * 50 + [-2] * 20, dtype=np.int32)
    cfg = PartitionConfig.from_dict(
        {"kind": "iid", "num_clients": 2, "eval_members_per_client": 5, "eval_nonmembers": 40}
    )
    drawn = evaluation_set(owner, cfg, seed=3)
    assert [int((drawn & (owner == c)).sum()) for c in (0, 1, HELD_OUT, -2)] == [5, 5, 40, 0]
    assert (drawn == evaluation_set(owner, cfg, seed=3)).all()
    assert not (drawn == evaluation_set(owner, cfg, seed=4)).all()


def test_a_view_without_an_evaluation_set_is_imported_with_a_drawn_one(cell, import_cell, tmp_path):
    rec = tmp_path / "rec"
    shutil.copytree(cell["manifest"].parent, rec)
    own = io.read_ownership(rec / "ownership.parquet").assign(eval=False)
    man = json.loads((rec / "manifest.json").read_text())
    man["view"]["files"]["ownership.parquet"] = io.write_ownership(own, rec / "ownership.parquet")
    (rec / "manifest.json").write_text(json.dumps(man))
    part = {**PART, "eval_members_per_client": 4, "eval_nonmembers": 25}
    out = import_cell(rec, tmp_path / "imported", part, CELL)
    p = pd.read_parquet(out["partition"])
    ev = p[p["eval"]]
    assert ev.groupby("client_id").size().to_dict() == {HELD_OUT: 25, 0: 4, 1: 4, 2: 4}
