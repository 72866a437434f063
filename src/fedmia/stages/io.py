"""Reading and writing the stages' files; every write is atomic (temp file + rename).

A failed stage leaves no partial file behind: outputs appear only once complete. What
each file holds — names, columns, dtypes, format tags — is its contract in
:mod:`fedmia.core.contracts`; this module is the I/O at the edges that the stages use
(the observed-round record, :func:`save_observed`, included). Importing it imports no
torch (tensors are written through ``safetensors.numpy``, which gives the bytes
``safetensors.torch`` gives).

**Versioned and byte-stable.** Every intermediate file carries a format tag,
``fedmia_format = "<kind>/<version>"`` (:data:`FORMATS`): in the key-value metadata of a
Parquet file, the metadata of a safetensors file, a field of a JSON manifest. A reader
names the kind it expects; a file of another kind or version, or a truncated or
damaged one, stops the stage with a :class:`FormatError` naming the file and the fix
(delete it, or rerun the stage that writes it). Tensors are stored as safetensors
(the field's format: no pickled code, memory-mapped reads, and the same bytes for
the same tensors — ``torch.save`` writes a random id into every file), with their
tensors and metadata in sorted order; Parquet files are written without index or
timestamps. The same run on the CPU therefore writes the same bytes.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import safetensors
import safetensors.numpy

from fedmia.core.contracts import (
    CELL_KEYS,
    FORMAT_KEY,
    OWNERSHIP_DTYPES,
    PREPARED_ARRAYS,
    REPLICATE_COLUMNS,
    REPLICATE_METRICS,
    VIEW_FILES,
    VIEW_KEYS,
    FormatError,
    check_format,
    fix_text,
    format_tag,
)

if TYPE_CHECKING:  # types only: the file contracts depend on neither torch nor the loaders
    import torch

    from fedmia.federation.datasets import PreparedData

log = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` if the block succeeds.

    A failure removes the temporary file. A process killed mid-write (SIGKILL) cannot,
    so the temporary files a killed writer of ``path`` left behind are removed here,
    before the next write of ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
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


def write_parquet(df: pd.DataFrame, path: str | Path, kind: str) -> None:
    """Write ``df`` (without its index) to Parquet, atomically and deterministically.

    The file's key-value metadata carries the format tag of ``kind``.
    """
    table = pa.Table.from_pandas(df, preserve_index=False)
    meta = {**(table.schema.metadata or {}), FORMAT_KEY.encode(): format_tag(kind).encode()}
    with atomic_path(path) as tmp:
        pq.write_table(table.replace_schema_metadata(meta), tmp, compression="zstd")


@contextlib.contextmanager
def _reading(
    path: str | Path, kind: str, what: str, damaged: tuple[type[BaseException], ...]
) -> Iterator[None]:
    """Read a ``kind`` file in the block; a missing or damaged file stops naming the fix.

    A missing file raises ``FileNotFoundError``; one whose reading raises one of
    ``damaged`` (``what`` names its format) a :class:`FormatError`: truncated or damaged.
    """
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} does not exist; {fix_text(path, kind)}")
    try:
        yield
    except damaged as e:
        raise FormatError(
            f"{path} is not a readable {what} file ({e}): it is truncated or "
            f"damaged; {fix_text(path, kind)}"
        ) from None


def read_parquet(path: str | Path, kind: str, columns: list[str] | None = None) -> pd.DataFrame:
    """Read a Parquet file :func:`write_parquet` wrote as ``kind``.

    Raises:
        FormatError: the file is damaged or truncated, or of another kind or version.
        FileNotFoundError: it does not exist.
    """
    with _reading(path, kind, "Parquet", (pa.ArrowException, OSError)):
        pf = pq.ParquetFile(path)
        meta = pf.schema_arrow.metadata or {}
        check_format((meta.get(FORMAT_KEY.encode()) or b"").decode() or None, path, kind)
        return pf.read(columns=columns).to_pandas()


def save_tensors(
    path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any], kind: str
) -> None:
    """Save tensors and JSON-able metadata as safetensors, atomically and byte-stably.

    Tensors go to the CPU, contiguous, in sorted order; ``meta`` is stored as one
    key-sorted JSON string next to the format tag of ``kind``. They are written as
    numpy arrays (``safetensors.numpy``: the same bytes as ``safetensors.torch``, and no
    torch import here).
    """
    ordered = {k: tensors[k].detach().cpu().contiguous().numpy() for k in sorted(tensors)}
    # one metadata entry: safetensors writes several in a per-process random order
    header = {FORMAT_KEY: json.dumps({"format": format_tag(kind), "meta": meta}, sort_keys=True)}
    # serialised in memory and written through our own temporary file: save_file writes
    # through a temporary file of its own (.tmpXXXXXX) that a killed job leaves behind,
    # where atomic_path cannot clear it
    data = safetensors.numpy.save(ordered, metadata=header)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def load_tensors(path: str | Path, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load what :func:`save_tensors` wrote as ``kind``: ``(tensors, meta)`` (CPU tensors).

    Raises:
        FormatError: the file is damaged or truncated, or of another kind or version.
        FileNotFoundError: it does not exist.
    """
    with (
        _reading(
            path, kind, "safetensors", (safetensors.SafetensorError, OSError, json.JSONDecodeError)
        ),
        safetensors.safe_open(str(path), framework="pt") as f,
    ):
        header = json.loads((f.metadata() or {}).get(FORMAT_KEY, "{}"))
        check_format(header.get("format"), path, kind)
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    return tensors, header.get("meta", {})


def write_json(obj: Any, path: str | Path) -> None:
    """Write ``obj`` as indented, key-sorted JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_prepared(data: PreparedData, paths: dict[str, str | Path], meta: dict[str, Any]) -> None:
    """Write the arrays (``.npy``) and the metadata JSON of a prepared dataset.

    ``paths`` maps the keys of :data:`PREPARED_FILES` to files.
    """
    for name in PREPARED_ARRAYS:
        with atomic_path(paths[name]) as tmp, open(tmp, "wb") as f:
            np.save(f, getattr(data, name))
    write_json(meta, paths["meta"])


def load_cell_data(
    data: Mapping[str, str | Path], partition_file: str | Path
) -> tuple[dict[str, np.ndarray], dict[str, Any], pd.DataFrame]:
    """The prepared dataset (:func:`load_prepared`) and the partition that splits it.

    Raises:
        ValueError: the partition has another number of rows than the dataset has samples
            (rerun the partition stage).
    """
    arrays, meta = load_prepared(data)
    part = read_parquet(partition_file, "partition")
    if len(part) != len(arrays["labels"]):
        raise ValueError(
            f"{partition_file} has {len(part)} rows but the dataset has "
            f"{len(arrays['labels'])} samples; rerun the partition stage"
        )
    return arrays, meta, part


def load_prepared(paths: dict[str, str | Path]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read what :func:`save_prepared` wrote: ``({images, labels, is_test}, meta)``."""
    arrays = {name: np.load(paths[name]) for name in PREPARED_ARRAYS}
    meta = json.loads(Path(paths["meta"]).read_text())
    return arrays, meta


def save_observed(
    path: str | Path,
    *,
    global_state: torch.Tensor,
    uploads: torch.Tensor,
    client_ids: torch.Tensor,
    num_samples: torch.Tensor,
    meta: dict[str, Any],
) -> str:
    """Save one observed round of the server's view (safetensors); return its SHA-256.

    The tensors of :data:`~fedmia.core.contracts.OBSERVED_TENSORS`: ``global_state`` (P),
    the participants' ``uploads`` (n×P), their ``client_ids`` (n, one per row) and
    ``num_samples`` (n); ``meta``: ``round``, ``layout``, ``model`` (and what the writer
    adds: ``lr``, ``defense``, ``recorder``).
    """
    save_tensors(
        path,
        {
            "global_state": global_state,
            "uploads": uploads,
            "client_ids": client_ids,
            "num_samples": num_samples,
        },
        meta,
        "observed",
    )
    return file_sha256(path)


def load_observed(path: str | Path) -> dict[str, Any]:
    """What :func:`save_observed` wrote, tensors and metadata in one mapping."""
    tensors, meta = load_tensors(path, "observed")
    return {**meta, **tensors}


def file_sha256(path: str | Path) -> str:
    """The SHA-256 (hex) of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_ownership(ownership: pd.DataFrame, path: str | Path) -> str:
    """Write a view's ownership table (:data:`OWNERSHIP_DTYPES`); return its SHA-256."""
    table = ownership[list(OWNERSHIP_DTYPES)].astype(OWNERSHIP_DTYPES)
    write_parquet(table.sort_values("sample_id", ignore_index=True), path, "ownership")
    return file_sha256(path)


def read_ownership(path: str | Path) -> pd.DataFrame:
    """A view's ownership table, checked: its columns and dtypes, no sample twice.

    Raises:
        FormatError: damaged, of another format, lacking a column or naming a sample twice.
        FileNotFoundError: it does not exist.
    """
    df = read_parquet(path, "ownership")
    lacking = [c for c in OWNERSHIP_DTYPES if c not in df.columns]
    if lacking:
        raise FormatError(f"{path} lacks column(s) {lacking}; {fix_text(path, 'ownership')}")
    df = df[list(OWNERSHIP_DTYPES)].astype(OWNERSHIP_DTYPES)
    twice = df["sample_id"][df["sample_id"].duplicated()].unique()
    if len(twice):
        raise FormatError(
            f"{path} names sample id(s) {twice[:5].tolist()} more than once (a "
            "sample is owned by one client or held out); record the view again"
        )
    return df


def make_view(
    *,
    recorder: str,
    model: dict[str, Any],
    dataset: dict[str, Any],
    num_clients: int,
    rounds: int,
    observed_rounds: Iterable[int],
    files: dict[str, str],
) -> dict[str, Any]:
    """The ``view`` block of a manifest (:data:`~fedmia.core.contracts.VIEW_KEYS`).

    Args:
        recorder: who recorded it (``fedmia <version> train stage``, ``fedmia.flower ...``).
        model: ``kind`` (a registered model kind), ``num_classes``, ``in_channels``.
        dataset: ``kind``, ``num_samples`` and ``sha256`` (of the prepared arrays,
            :meth:`fedmia.federation.datasets.PreparedData.checksum`; ``None``: unknown).
        num_clients: K, the clients that own samples (ids 0..K-1).
        rounds: the rounds trained.
        observed_rounds: the rounds recorded (each has its ``observed/roundNNNN`` file).
        files: path relative to the recording's folder → SHA-256, for every file of the
            view but the manifest.
    """
    return {
        "format": format_tag("view"),
        "recorder": recorder,
        "model": dict(model),
        "dataset": dict(dataset),
        "num_clients": int(num_clients),
        "rounds": int(rounds),
        "observed_rounds": sorted(int(r) for r in observed_rounds),
        "files": dict(sorted(files.items())),
    }


def view_file(observed_round: int) -> str:
    """The path of observed round ``observed_round`` relative to a recording's folder."""
    return round_file(VIEW_FILES["observed"], observed_round).as_posix()


def read_view(manifest_file: str | Path) -> dict[str, Any]:
    """The ``view`` block of a recording's (or a train stage's) manifest, checked.

    Raises:
        FormatError: the manifest is damaged, of another format, has no ``view`` block,
            one of another view format, or lacks a key of
            :data:`~fedmia.core.contracts.VIEW_KEYS`.
        FileNotFoundError: there is no manifest (its folder empty, or without it).
    """
    folder = Path(manifest_file).parent
    if folder.is_dir() and not any(folder.iterdir()):
        raise FileNotFoundError(
            f"{folder} is empty: no recorded view there (no {Path(manifest_file).name}, no "
            "observed rounds); record the run into it first (fedmia's train stage or "
            "fedmia.flower, docs/flower.md) or set the recording's folder to the one the run "
            "was recorded in"
        )
    if not Path(manifest_file).exists():
        raise FileNotFoundError(
            f"{manifest_file} does not exist: no recorded view there; "
            "record the run first (fedmia's train stage or "
            "fedmia.flower) or fix the recording's folder"
        )
    view = read_manifest(manifest_file).get("view")
    if not isinstance(view, dict):
        raise FormatError(
            f"{manifest_file} has no 'view' block (a manifest of an older "
            "fedmia); record the run again with this fedmia"
        )
    check_format(view.get("format"), manifest_file, "view")
    lacking = [k for k in VIEW_KEYS if k not in view]
    if lacking:
        raise FormatError(f"{manifest_file}: its view lacks key(s) {lacking}; record the run again")
    return view


def no_round(manifest_file: str | Path) -> str:
    """What a recording whose view records no round says: the problem and the fix.

    A run that stopped, or diverged, before its first recorded round has nothing to
    attack: such a recording is refused (by the config's check and the import stage).
    """
    return (
        f"{manifest_file} records no round (its view's observed_rounds is empty: nothing to "
        "attack); record at least one round of the run"
    )


def round_file(observed_dir: str | Path, rnd: int) -> Path:
    """Path of observed round ``rnd`` inside a train stage's ``observed/`` folder."""
    return Path(observed_dir) / f"round{rnd:04d}.safetensors"


def write_manifest(manifest: dict[str, Any], path: str | Path) -> None:
    """Write a cell's train manifest (JSON, with its format tag)."""
    write_json({**manifest, FORMAT_KEY: format_tag("manifest")}, path)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The train stage's manifest of a cell (JSON), checked.

    Raises:
        FormatError: damaged, or of another format version.
    """
    try:
        man = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise FormatError(
            f"{path} is not valid JSON ({e}): it is truncated or damaged; "
            f"{fix_text(path, 'manifest')}"
        ) from None
    check_format(man.get(FORMAT_KEY), path, "manifest")
    return man


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
        raise ValueError(
            f"{manifest_file}: round(s) {lacking} were not observed by the train "
            "stage; rerun it (snakemake --forcerun train)"
        )
    if lacking:
        log.warning(
            "training diverged in round %d: round(s) %s were never observed",
            man["diverged_round"],
            lacking,
        )
    return [r for r in rounds if r in saved]


def read_replicates(path: str | Path) -> pd.DataFrame:
    """A replicate table (:data:`REPLICATE_COLUMNS`), checked.

    Raises:
        FormatError: damaged, of another format version, lacking a column, or with
            replicate arrays of unequal lengths or not float32.
        FileNotFoundError: it does not exist.
    """
    df = read_parquet(path, "replicates")
    lacking = [c for c in REPLICATE_COLUMNS if c not in df.columns]
    if lacking:
        raise FormatError(f"{path} lacks column(s) {lacking}; {fix_text(path, 'replicates')}")
    lengths = set()
    for m in REPLICATE_METRICS:
        for v in df[f"{m}_replicates"]:
            if not isinstance(v, np.ndarray) or v.dtype != np.float32 or v.ndim != 1:
                raise FormatError(
                    f"{path}: column '{m}_replicates' must hold float32 "
                    f"arrays, found {type(v).__name__} "
                    f"{getattr(v, 'dtype', '')}; {fix_text(path, 'replicates')}"
                )
            lengths.add(len(v))
    if len(lengths) > 1:
        raise FormatError(
            f"{path}: replicate arrays of unequal lengths {sorted(lengths)} "
            f"(one resample has one length); {fix_text(path, 'replicates')}"
        )
    return df


def cells_frame(manifests: Iterable[str | Path]) -> pd.DataFrame:
    """One row per cell from the train stage's manifests: keys and outcome.

    ``participation`` is the fraction of ``train.participation`` (an imported recording
    whose rounds lack clients: the mean share per round; 1.0 for a manifest without the
    block: every client every round).
    """
    cols = [
        *CELL_KEYS,
        "diverged_round",
        "last_finite_test_accuracy",
        "final_test_accuracy",
        "best_test_accuracy",
        "rounds",
        "unnoised_state_floats",
        "privacy",
    ]
    rows = [
        {
            **{k: m.get(k, 0 if k == "unnoised_state_floats" else None) for k in cols},
            "participation": float((m.get("participation") or {}).get("fraction", 1.0)),
        }
        for m in map(read_manifest, manifests)
    ]
    return pd.DataFrame(rows, columns=[*cols, "participation"]).astype(
        {"diverged_round": "float64", "best_test_accuracy": "float64"}
    )
