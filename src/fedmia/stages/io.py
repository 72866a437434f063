"""File formats of the stages; every write is atomic (temp file + rename).

A failed stage leaves no partial file behind: outputs appear only once complete.

**The contracts between stages live here**: the prepared dataset's files
(:data:`PREPARED_FILES`), the measure table's columns and dtypes
(:data:`MEASURE_DTYPES`), the attack, audit and replicate tables'
(:data:`ATTACK_DTYPES`, :data:`AUDIT_COLUMNS`, :data:`REPLICATE_COLUMNS`), the
observed-round record (:func:`save_observed`) and the keys that join histories and
manifests to cells (:data:`CELL_KEYS`). Importing the module
imports no torch (tensors are written through ``safetensors.numpy``, which gives the
bytes ``safetensors.torch`` gives), so the workflow reads these names when it parses the
Snakefile.

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
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import safetensors
import safetensors.numpy

from fedmia.attacker import metrics

if TYPE_CHECKING:  # types only: the file contracts depend on neither torch nor the loaders
    import torch

    from fedmia.federation.datasets import PreparedData

log = logging.getLogger(__name__)

#: The files of a prepared dataset (``results/data/{dataset}/``), by key: three arrays
#: (``.npy``, one entry per sample) and the metadata JSON.
PREPARED_FILES = {"images": "images.npy", "labels": "labels.npy", "is_test": "is_test.npy",
                  "meta": "meta.json"}
#: The array keys of :data:`PREPARED_FILES` (the attributes of ``PreparedData`` saved).
PREPARED_ARRAYS = ("images", "labels", "is_test")
#: The keys of a cell, in path order; attack tables, histories and manifests carry them.
CELL_KEYS = ("dataset", "model", "defense", "partition", "seed")
HISTORY_COLUMNS = [*CELL_KEYS, "round", "client_id", "lr", "num_samples",
                   "aggregation_weight", "train_loss", "train_accuracy", "test_loss",
                   "test_accuracy"]
#: The keys of a measure table row: the round, the client whose upload produced the values
#: and the evaluation sample.
MEASURE_KEYS = ("round", "client_id", "sample_id")
#: Columns and dtypes of the measure table, in order: the keys, then the measures (any
#: numeric column can be an attack's measure).
MEASURE_DTYPES = {"round": "int32", "client_id": "int32", "sample_id": "int64",
                  "loss": "float32", "cos": "float32", "grad_diff": "float32",
                  "grad_norm": "float32", "correct": "bool", "confidence": "float32"}
#: The membership disclosure measures of :data:`MEASURE_DTYPES` (the others are cheap
#: by-products of the loss pass).
MEASURES = ("loss", "cos", "grad_diff", "grad_norm")
#: Metrics with bootstrap intervals in an attack table (every metric but the balanced
#: accuracy).
CI_METRICS = ("auc", *(metrics.tpr_metric_name(a) for a in metrics.FPR_LEVELS))
#: Interval columns of an attack table row: ``<metric>_ci_low``, ``_ci_high``, ``_se`` and,
#: for TPRs, ``_fp`` (the false positives the TPR rests on).
CI_COLUMNS = tuple(f"{m}_{part}" for m in CI_METRICS for part in ("ci_low", "ci_high", "se")
                   ) + tuple(f"{m}_fp" for m in CI_METRICS if m != "auc")
#: Columns of one attack's results (:func:`fedmia.attacker.attacks.run_attacks`), in order.
RESULT_COLUMNS = ("protocol", "draw", "target", "round", "attacked", "n_rounds",
                  *metrics.METRICS, *CI_COLUMNS,
                  "n_members", "n_nonmembers", "roc_fpr", "roc_tpr")
#: Columns of an attack table (``results/attacks/{cell}/{attack}.parquet``): the cell's
#: keys, the attack's name, then :data:`RESULT_COLUMNS`.
ATTACK_COLUMNS = (*CELL_KEYS, "attack", *RESULT_COLUMNS)
#: dtypes of an attack table's integer, boolean and string columns (the metrics are
#: float64, the ROC points float64 arrays).
ATTACK_DTYPES = {"dataset": "object", "model": "object", "defense": "object",
                 "partition": "object", "seed": "int64", "attack": "object",
                 "protocol": "object", "draw": "int64", "target": "int64", "round": "int64",
                 "attacked": "bool", "n_rounds": "int64", "n_members": "int64",
                 "n_nonmembers": "int64", **{c: "int64" for c in CI_COLUMNS if c.endswith("_fp")}}
#: Columns of an attack's one-run audit (:func:`fedmia.attacker.attacks.audit_attacks`); the audit
#: table (``results/attacks/{cell}/audit.parquet``) has the cell's keys first. The row of
#: ``attack = "selected"`` audits the attack chosen on the selection half of the canaries,
#: named in ``selected_attack`` (empty in the per-attack rows).
AUDIT_COLUMNS = ("attack", "target", "round", "epsilon_empirical", "num_canaries",
                 "num_guesses", "num_correct", "delta", "beta", "rule", "choice",
                 "selected_attack")
#: The metrics whose bootstrap replicates the attack stage keeps for the findings.
REPLICATE_METRICS = ("auc", metrics.tpr_metric_name(0.001))
#: The keys of a replicate row after the cell's and the attack: the attack table row's.
REPLICATE_KEYS = ("protocol", "draw", "target", "round")
#: Columns of the replicate table (``results/attacks/{cell}/replicates.parquet``,
#: :func:`fedmia.attacker.attacks.run_attacks_with_replicates`): one row per (attack, protocol,
#: draw, target, round) of the attacks the findings compare, attacked rounds and
#: multi-round scores only; per metric of :data:`REPLICATE_METRICS` the B bootstrap
#: replicates as a float32 array (``<metric>_replicates``), replicate ``b`` of every row
#: of one protocol from the same resample of the evaluation samples (all targets and draws).
REPLICATE_COLUMNS = (*CELL_KEYS, "attack", *REPLICATE_KEYS,
                     *(f"{m}_replicates" for m in REPLICATE_METRICS))
#: dtypes of the replicate table's key columns (the replicates: float32 arrays).
REPLICATE_DTYPES = {c: ATTACK_DTYPES[c] for c in (*CELL_KEYS, "attack", *REPLICATE_KEYS)}


def prepared_paths(folder: str | Path) -> dict[str, str]:
    """The files of a prepared dataset in ``folder``, by key (:data:`PREPARED_FILES`)."""
    return {key: str(Path(folder) / name) for key, name in PREPARED_FILES.items()}



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


#: Format version of each kind of intermediate file: bump one when its contents change
#: incompatibly, so that old files are refused with a clear message instead of misread.
FORMATS = {"partition": 3, "history": 3, "manifest": 1, "observed": 1, "final": 1,
           "checkpoint": 1, "measures": 1, "attack": 1, "audit": 2, "replicates": 1}
#: The rule that writes each kind of file (for the fix in an error message).
WRITER = {"partition": "partition", "history": "train", "manifest": "train",
          "observed": "train", "final": "train", "checkpoint": "train", "measures": "measure",
          "attack": "attack", "audit": "attack", "replicates": "attack"}
FORMAT_KEY = "fedmia_format"


class FormatError(ValueError):
    """An intermediate file of another format version, kind, or a damaged one."""


def format_tag(kind: str) -> str:
    """``"<kind>/<version>"`` of the current format of ``kind`` (see :data:`FORMATS`)."""
    return f"{kind}/{FORMATS[kind]}"


def _fix(path: str | Path, kind: str) -> str:
    return (f"delete {path} and rerun, or rerun its stage with snakemake --forcerun "
            f"{WRITER[kind]}")


def check_format(found: str | None, path: str | Path, kind: str) -> None:
    """Raise :class:`FormatError` unless ``found`` is the current tag of ``kind``."""
    want = format_tag(kind)
    if found != want:
        what = "no fedmia format tag" if found is None else f"format {found!r}"
        raise FormatError(f"{path} has {what}, but this fedmia reads {want!r} (the file was "
                          f"written by another fedmia version or is not a {kind} file); "
                          f"{_fix(path, kind)}")


def write_parquet(df: pd.DataFrame, path: str | Path, kind: str) -> None:
    """Write ``df`` (without its index) to Parquet, atomically and deterministically.

    The file's key-value metadata carries the format tag of ``kind``.
    """
    table = pa.Table.from_pandas(df, preserve_index=False)
    meta = {**(table.schema.metadata or {}), FORMAT_KEY.encode(): format_tag(kind).encode()}
    with atomic_path(path) as tmp:
        pq.write_table(table.replace_schema_metadata(meta), tmp, compression="zstd")


@contextlib.contextmanager
def _reading(path: str | Path, kind: str, what: str,
             damaged: tuple[type[BaseException], ...]) -> Iterator[None]:
    """Read a ``kind`` file in the block; a missing or damaged file stops naming the fix.

    A missing file raises ``FileNotFoundError``; one whose reading raises one of
    ``damaged`` (``what`` names its format) a :class:`FormatError`: truncated or damaged.
    """
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} does not exist; {_fix(path, kind)}")
    try:
        yield
    except damaged as e:
        raise FormatError(f"{path} is not a readable {what} file ({e}): it is truncated or "
                          f"damaged; {_fix(path, kind)}") from None


def read_parquet(path: str | Path, kind: str, columns: list[str] | None = None
                 ) -> pd.DataFrame:
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


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                 kind: str) -> None:
    """Save tensors and JSON-able metadata as safetensors, atomically and byte-stably.

    Tensors go to the CPU, contiguous, in sorted order; ``meta`` is stored as one
    key-sorted JSON string next to the format tag of ``kind``. They are written as
    numpy arrays (``safetensors.numpy``: the same bytes as ``safetensors.torch``, and no
    torch import here).
    """
    ordered = {k: tensors[k].detach().cpu().contiguous().numpy() for k in sorted(tensors)}
    # one metadata entry: safetensors writes several in a per-process random order
    header = {FORMAT_KEY: json.dumps({"format": format_tag(kind), "meta": meta},
                                     sort_keys=True)}
    with atomic_path(path) as tmp:
        safetensors.numpy.save_file(ordered, str(tmp), metadata=header)


def load_tensors(path: str | Path, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load what :func:`save_tensors` wrote as ``kind``: ``(tensors, meta)`` (CPU tensors).

    Raises:
        FormatError: the file is damaged or truncated, or of another kind or version.
        FileNotFoundError: it does not exist.
    """
    with (_reading(path, kind, "safetensors",
                   (safetensors.SafetensorError, OSError, json.JSONDecodeError)),
          safetensors.safe_open(str(path), framework="pt") as f):
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


def load_prepared(paths: dict[str, str | Path]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read what :func:`save_prepared` wrote: ``({images, labels, is_test}, meta)``."""
    arrays = {name: np.load(paths[name]) for name in PREPARED_ARRAYS}
    meta = json.loads(Path(paths["meta"]).read_text())
    return arrays, meta


def save_observed(path: str | Path, *, global_state: torch.Tensor, uploads: torch.Tensor,
                  num_samples: torch.Tensor, meta: dict[str, Any]) -> None:
    """Save one observed round (safetensors).

    The server's view — ``global_state`` (P), ``uploads`` (K×P), the clients'
    ``num_samples`` (K) — and ``meta`` (round, lr, layout, model, defense).
    """
    save_tensors(path, {"global_state": global_state, "uploads": uploads,
                        "num_samples": num_samples}, meta, "observed")


def load_observed(path: str | Path) -> dict[str, Any]:
    """What :func:`save_observed` wrote, tensors and metadata in one mapping."""
    tensors, meta = load_tensors(path, "observed")
    return {**meta, **tensors}


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
        raise FormatError(f"{path} is not valid JSON ({e}): it is truncated or damaged; "
                          f"{_fix(path, 'manifest')}") from None
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
        raise ValueError(f"{manifest_file}: round(s) {lacking} were not observed by the train "
                         "stage; rerun it (snakemake --forcerun train)")
    if lacking:
        log.warning("training diverged in round %d: round(s) %s were never observed",
                    man["diverged_round"], lacking)
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
        raise FormatError(f"{path} lacks column(s) {lacking}; {_fix(path, 'replicates')}")
    lengths = set()
    for m in REPLICATE_METRICS:
        for v in df[f"{m}_replicates"]:
            if not isinstance(v, np.ndarray) or v.dtype != np.float32 or v.ndim != 1:
                raise FormatError(f"{path}: column '{m}_replicates' must hold float32 "
                                  f"arrays, found {type(v).__name__} "
                                  f"{getattr(v, 'dtype', '')}; {_fix(path, 'replicates')}")
            lengths.add(len(v))
    if len(lengths) > 1:
        raise FormatError(f"{path}: replicate arrays of unequal lengths {sorted(lengths)} "
                          f"(one resample has one length); {_fix(path, 'replicates')}")
    return df


def cells_frame(manifests: Iterable[str | Path]) -> pd.DataFrame:
    """One row per cell from the train stage's manifests: keys and outcome."""
    cols = [*CELL_KEYS, "diverged_round", "last_finite_test_accuracy", "final_test_accuracy",
            "best_test_accuracy", "rounds", "unnoised_state_floats"]
    rows = [{k: m.get(k, 0 if k == "unnoised_state_floats" else None) for k in cols}
            for m in map(read_manifest, manifests)]
    return pd.DataFrame(rows, columns=cols).astype({"diverged_round": "float64",
                                                    "best_test_accuracy": "float64"})
