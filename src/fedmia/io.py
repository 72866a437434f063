"""File formats of the stages; every write is atomic (temp file + rename).

A failed stage leaves no partial file behind: outputs appear only once complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

if TYPE_CHECKING:  # a type only: the file contracts do not depend on the loaders
    from fedmia.datasets import PreparedData

log = logging.getLogger(__name__)

ARRAY_FILES = ("images", "labels", "is_test")
#: The keys of a cell, in path order; attack tables, histories and manifests carry them.
CELL_KEYS = ("dataset", "model", "defense", "partition", "seed")
HISTORY_COLUMNS = [*CELL_KEYS, "round", "client_id", "lr", "num_samples", "train_loss",
                   "train_accuracy", "test_loss", "test_accuracy"]
#: Columns and dtypes of the measure table.
MEASURE_DTYPES = {"round": "int32", "client_id": "int32", "sample_id": "int64",
                  "loss": "float32", "cos": "float32", "grad_diff": "float32",
                  "grad_norm": "float32", "correct": "bool", "confidence": "float32"}



@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make results unreadable to others
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_parquet(df: pd.DataFrame, path: str | Path) -> None:
    """Write ``df`` (without its index) to Parquet, atomically and deterministically."""
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False, engine="pyarrow", compression="zstd")


def write_json(obj: Any, path: str | Path) -> None:
    """Write ``obj`` as indented, key-sorted JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_prepared(data: PreparedData, paths: dict[str, str | Path], meta: dict[str, Any]) -> None:
    """Write the arrays (``.npy``) and the metadata JSON of a prepared dataset.

    ``paths`` maps ``images``, ``labels``, ``is_test`` and ``meta`` to files.
    """
    for name in ARRAY_FILES:
        with atomic_path(paths[name]) as tmp, open(tmp, "wb") as f:
            np.save(f, getattr(data, name))
    write_json(meta, paths["meta"])


def load_prepared(paths: dict[str, str | Path]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read what :func:`save_prepared` wrote: ``({images, labels, is_test}, meta)``."""
    arrays = {name: np.load(paths[name]) for name in ARRAY_FILES}
    meta = json.loads(Path(paths["meta"]).read_text())
    return arrays, meta


def save_torch(obj: Any, path: str | Path) -> None:
    """``torch.save`` atomically (tensors are moved to the CPU first)."""
    obj = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in obj.items()}
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_torch(path: str | Path, *, mmap: bool = True) -> dict[str, Any]:
    """Load what :func:`save_torch` wrote, memory-mapped so unused tensors are not read."""
    return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)


def round_file(observed_dir: str | Path, rnd: int) -> Path:
    """Path of observed round ``rnd`` inside a train stage's ``observed/`` folder."""
    return Path(observed_dir) / f"round{rnd:04d}.pt"


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The train stage's manifest of a cell (JSON)."""
    return json.loads(Path(path).read_text())


def available_rounds(rounds: Iterable[int], manifest_file: str | Path | None) -> list[int]:
    """``rounds`` (sorted) without those a diverged run never saved.

    Raises:
        ValueError: a round is missing from a run that did not diverge (the train stage's
            outputs do not match the config: rerun it).
    """
    rounds = sorted(rounds)
    if manifest_file is None:
        return rounds
    man = read_manifest(manifest_file)
    saved = set(man["observed_rounds"])
    lacking = [r for r in rounds if r not in saved]
    if lacking and man["diverged_round"] is None:
        raise ValueError(f"{manifest_file}: round(s) {lacking} were not observed by the train "
                         "stage; rerun it (snakemake --forcerun train)")
    if lacking:
        log.warning("training diverged in round %d: round(s) %s were never observed",
                    man["diverged_round"], lacking)
    return [r for r in rounds if r in saved]


def cells_frame(manifests: Iterable[str | Path]) -> pd.DataFrame:
    """One row per cell from the train stage's manifests: keys and outcome."""
    cols = [*CELL_KEYS, "diverged_round", "last_finite_test_accuracy", "final_test_accuracy",
            "rounds", "unnoised_state_floats"]
    rows = [{k: m.get(k, 0 if k == "unnoised_state_floats" else None) for k in cols}
            for m in map(read_manifest, manifests)]
    return pd.DataFrame(rows, columns=cols).astype({"diverged_round": "float64"})
