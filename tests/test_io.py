"""File contracts: atomic, versioned, byte-stable intermediate files."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from fedmia.core import contracts
from fedmia.stages import io


def test_parquet_and_tensors_round_trip(tmp_path):
    df = pd.DataFrame({"round": [1, 2], "loss": [0.5, 1.5]})
    io.write_parquet(df, tmp_path / "m.parquet", "measures")
    pd.testing.assert_frame_equal(io.read_parquet(tmp_path / "m.parquet", "measures"), df)
    t = {"uploads": torch.randn(2, 3), "global_state": torch.arange(3.0)}
    io.save_tensors(tmp_path / "r.safetensors", t, {"round": 3, "layout": [{"a": 1}]}, "observed")
    back, meta = io.load_tensors(tmp_path / "r.safetensors", "observed")
    assert meta == {"round": 3, "layout": [{"a": 1}]}
    assert all(torch.equal(back[k], t[k]) for k in t)


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            "truncate",
            r"is not a readable Parquet file .* truncated or damaged; delete .* and "
            r"rerun, or rerun its stage with snakemake --forcerun measure",
        ),
        ("other_kind", r"has format 'attack/1', but this fedmia reads 'measures/2'"),
        (
            "untagged",
            r"has no fedmia format tag, but this fedmia reads 'measures/2' .*--forcerun "
            r"measure",
        ),
        ("missing", r"does not exist; delete .* or rerun its stage"),
    ],
)
def test_bad_parquet_files_name_the_file_and_the_fix(tmp_path, damage, message):
    f = tmp_path / "m.parquet"
    df = pd.DataFrame({"round": [1, 2]})
    if damage == "truncate":
        io.write_parquet(df, f, "measures")
        f.write_bytes(f.read_bytes()[:40])
    elif damage == "other_kind":
        io.write_parquet(df, f, "attack")
    elif damage == "untagged":
        df.to_parquet(f)
    with pytest.raises((contracts.FormatError, FileNotFoundError), match=message):
        io.read_parquet(f, "measures")


def test_old_format_versions_are_refused(tmp_path, monkeypatch):
    f = tmp_path / "r.safetensors"
    monkeypatch.setitem(contracts.FORMATS, "observed", 0)  # a file of an older fedmia
    io.save_tensors(f, {"x": torch.zeros(2)}, {}, "observed")
    monkeypatch.setitem(contracts.FORMATS, "observed", 1)
    with pytest.raises(
        contracts.FormatError,
        match=r"has format 'observed/0', but this fedmia reads "
        r"'observed/1' .*--forcerun train",
    ):
        io.load_tensors(f, "observed")
    f.write_bytes(f.read_bytes()[:30])
    with pytest.raises(contracts.FormatError, match="not a readable safetensors file"):
        io.load_tensors(f, "observed")


def test_manifests_are_versioned(tmp_path):
    f = tmp_path / "manifest.json"
    io.write_manifest({"dataset": "d"}, f)
    assert io.read_manifest(f)["dataset"] == "d"
    f.write_text(json.dumps({"dataset": "d"}))
    with pytest.raises(contracts.FormatError, match="no fedmia format tag.*--forcerun train"):
        io.read_manifest(f)
    f.write_text('{"dataset": ')
    with pytest.raises(contracts.FormatError, match="not valid JSON"):
        io.read_manifest(f)


def test_tensors_are_written_byte_for_byte_as_safetensors_torch_writes_them(tmp_path):
    """io writes through safetensors.numpy (so that it imports no torch): the same bytes."""
    t = {
        "uploads": torch.randn(3, 5),
        "num_samples": torch.tensor([20, 21, 19]),
        "mask": torch.tensor([True, False]),
        "global_state": torch.arange(5.0),
    }
    meta = {"round": 10, "layout": [{"name": "w", "shape": [5]}]}
    io.save_tensors(tmp_path / "io.safetensors", t, meta, "observed")
    header = json.dumps({"format": contracts.format_tag("observed"), "meta": meta}, sort_keys=True)
    save_file(
        {k: t[k] for k in sorted(t)},
        str(tmp_path / "torch.safetensors"),
        metadata={contracts.FORMAT_KEY: header},
    )
    assert (tmp_path / "io.safetensors").read_bytes() == (
        tmp_path / "torch.safetensors"
    ).read_bytes()


def test_prepared_file_names_come_from_one_constant(tmp_path):
    paths = contracts.prepared_paths(tmp_path)
    assert list(paths) == list(contracts.PREPARED_FILES)
    assert set(contracts.PREPARED_ARRAYS) < set(contracts.PREPARED_FILES)
    assert paths["meta"] == str(tmp_path / "meta.json")


def test_same_tensors_same_bytes_across_processes(tmp_path):
    code = (
        "import sys, torch; from fedmia.stages import io; io.save_tensors(sys.argv[1], "
        "{'b': torch.ones(2, 3), 'a': torch.arange(3.0)}, {'z': 1, 'a': [2, 3]}, 'final')"
    )
    for i in (0, 1):  # separate interpreters: hash seeds and allocation differ
        subprocess.run([sys.executable, "-c", code, str(tmp_path / f"{i}.st")], check=True)
    assert (tmp_path / "0.st").read_bytes() == (tmp_path / "1.st").read_bytes()


def test_a_killed_writers_temporary_files_are_removed_by_the_next_write(tmp_path):
    f = tmp_path / "m.parquet"
    stale = tmp_path / ".m.parquet.abc123.tmp"  # what a SIGKILLed writer leaves
    stale.write_bytes(b"half")
    other = tmp_path / ".n.parquet.abc123.tmp"  # another file's: not ours to remove
    other.write_bytes(b"half")
    io.write_parquet(pd.DataFrame({"round": [1]}), f, "measures")
    assert f.exists() and not stale.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".n.parquet.abc123.tmp", "m.parquet"]


def replicate_table(n: int = 3, n_boot: int = 8) -> pd.DataFrame:
    """A replicate table of ``n`` rows as the attack stage writes it."""
    rng = np.random.default_rng(0)
    keys = {
        "dataset": "digits",
        "model": "alexnet",
        "defense": "none",
        "partition": "iid",
        "seed": 0,
        "attack": "loss",
        "protocol": "aligned",
        "draw": 0,
    }
    return pd.DataFrame(
        [
            {
                **keys,
                "target": t,
                "round": 10,
                "auc_replicates": rng.random(n_boot).astype(np.float32),
                "tpr@0.1%_replicates": np.zeros(n_boot, np.float32),
                "tpr@1%_replicates": np.zeros(n_boot, np.float32),
            }
            for t in range(n)
        ]
    ).astype(contracts.REPLICATE_DTYPES)


def test_replicate_file_contract(tmp_path):
    assert contracts.REPLICATE_COLUMNS == (
        *contracts.CELL_KEYS,
        "attack",
        "protocol",
        "draw",
        "target",
        "round",
        "auc_replicates",
        "tpr@0.1%_replicates",
        "tpr@1%_replicates",
    )
    f = tmp_path / "replicates.parquet"
    df = replicate_table()
    io.write_parquet(df, f, "replicates")
    back = io.read_replicates(f)
    assert list(back.columns) == list(contracts.REPLICATE_COLUMNS)
    for c, t in contracts.REPLICATE_DTYPES.items():
        assert (
            pd.api.types.is_string_dtype(back[c]) if t == "object" else str(back[c].dtype) == t
        ), c
    for c in ("auc_replicates", "tpr@0.1%_replicates", "tpr@1%_replicates"):
        assert all(v.dtype == np.float32 and v.shape == (8,) for v in back[c])
        np.testing.assert_array_equal(np.stack(back[c]), np.stack(df[c]))
    io.write_parquet(df, tmp_path / "again.parquet", "replicates")
    assert (tmp_path / "again.parquet").read_bytes() == f.read_bytes()  # byte-stable
