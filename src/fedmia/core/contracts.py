"""The file contracts between the stages: names, columns, dtypes and format tags.

Every file a stage writes and another reads is described here, once: the prepared
dataset's files (:data:`PREPARED_FILES`), the measure table's columns and dtypes
(:data:`MEASURE_DTYPES`), the attack, audit and replicate tables' (:data:`ATTACK_DTYPES`,
:data:`AUDIT_COLUMNS`, :data:`REPLICATE_COLUMNS`), the keys that join histories and
manifests to cells (:data:`CELL_KEYS`), the metric names that are columns of the attack
tables (:data:`METRICS`), and the format tag of every intermediate file
(:data:`FORMATS`, :func:`check_format`). :mod:`fedmia.stages.io` reads and writes them.

This module imports nothing of fedmia and nothing but the standard library: the parse of
the Snakefile, the compute modules and the readers share it without importing each other.
"""

from __future__ import annotations

from pathlib import Path

#: FPR levels α of the "TPR at FPR α" metrics.
FPR_LEVELS = (0.001, 0.01, 0.1)


def tpr_metric_name(alpha: float) -> str:
    """Name of the TPR-at-FPR metric at level ``alpha`` (0.001 → ``"tpr@0.1%"``)."""
    return f"tpr@{alpha * 100:g}%"


#: The metrics of an attack row (:func:`fedmia.attacker.metrics.attack_metrics`), in table
#: order: columns of the attack tables.
METRICS = ("auc", *(tpr_metric_name(a) for a in FPR_LEVELS), "balanced_accuracy")

#: The files of a prepared dataset (``results/data/{dataset}/``), by key: three arrays
#: (``.npy``, one entry per sample) and the metadata JSON.
PREPARED_FILES = {
    "images": "images.npy",
    "labels": "labels.npy",
    "is_test": "is_test.npy",
    "meta": "meta.json",
}
#: The array keys of :data:`PREPARED_FILES` (the attributes of ``PreparedData`` saved).
PREPARED_ARRAYS = ("images", "labels", "is_test")
#: The keys of a cell, in path order; attack tables, histories and manifests carry them.
CELL_KEYS = ("dataset", "model", "defense", "partition", "seed")
HISTORY_COLUMNS = [
    *CELL_KEYS,
    "round",
    "client_id",
    "lr",
    "num_samples",
    "aggregation_weight",
    "train_loss",
    "train_accuracy",
    "test_loss",
    "test_accuracy",
]
#: The keys of a measure table row: the round, the client whose upload produced the values
#: and the evaluation sample.
MEASURE_KEYS = ("round", "client_id", "sample_id")
#: ``client_id`` of every row of the aggregate view's measure table
#: (``results/mdm/{cell}.aggregate.parquet``, the ``measures`` format): the measures under
#: each round's aggregate of the participants' updates (``threat.view: aggregate``).
AGGREGATE_CLIENT = -1
#: The membership levels of an attack result (its ``membership`` column): ``client``, is the
#: sample in the target client's data (the paper's); ``federation``, is it in any client's
#: data (``target`` is :data:`FEDERATION_TARGET` then).
MEMBERSHIP_LEVELS = ("client", "federation")
#: ``target`` of a federation-level result.
FEDERATION_TARGET = -1
#: Columns and dtypes of the measure table, in order: the keys, then the measures (any
#: numeric column can be an attack's measure). ``loss`` and ``logit_conf`` (LiRA's φ =
#: z_y − logsumexp_{j≠y} z_j) are float64, both computed in float64 from the logits
#: (:func:`fedmia.attacker.measures.logit_statistics`): a confident sample's loss is
#: e^{−φ} > 0, never a float32 0 (ties at 0 break TPR at low FPR).
MEASURE_DTYPES = {
    "round": "int32",
    "client_id": "int32",
    "sample_id": "int64",
    "loss": "float64",
    "logit_conf": "float64",
    "cos": "float32",
    "grad_diff": "float32",
    "grad_norm": "float32",
    "correct": "bool",
    "confidence": "float32",
}
#: The membership disclosure measures of :data:`MEASURE_DTYPES` (the others are cheap
#: by-products of the loss pass).
MEASURES = ("loss", "logit_conf", "cos", "grad_diff", "grad_norm")
#: Metrics with bootstrap intervals in an attack table (every metric but the balanced
#: accuracy).
CI_METRICS = ("auc", *(tpr_metric_name(a) for a in FPR_LEVELS))
#: Interval columns of an attack table row: ``<metric>_ci_low``, ``_ci_high``, ``_se`` and,
#: for TPRs, ``_fp`` (the false positives the TPR rests on).
CI_COLUMNS = tuple(
    f"{m}_{part}" for m in CI_METRICS for part in ("ci_low", "ci_high", "se")
) + tuple(f"{m}_fp" for m in CI_METRICS if m != "auc")
#: Columns of one attack's results (:func:`fedmia.attacker.attacks.run_attacks`), in order:
#: ``view`` is the threat view attacked (``threat.view``) and ``membership`` the membership
#: level (:data:`MEMBERSHIP_LEVELS`).
RESULT_COLUMNS = (
    "protocol",
    "view",
    "membership",
    "draw",
    "target",
    "round",
    "attacked",
    "n_rounds",
    *METRICS,
    *CI_COLUMNS,
    "n_members",
    "n_nonmembers",
    "roc_fpr",
    "roc_tpr",
)
#: Columns of an attack table (``results/attacks/{cell}/{attack}.parquet``): the cell's
#: keys, the attack's name, then :data:`RESULT_COLUMNS`.
ATTACK_COLUMNS = (*CELL_KEYS, "attack", *RESULT_COLUMNS)
#: dtypes of an attack table's integer, boolean and string columns (the metrics are
#: float64, the ROC points float64 arrays).
ATTACK_DTYPES = {
    "dataset": "object",
    "model": "object",
    "defense": "object",
    "partition": "object",
    "seed": "int64",
    "attack": "object",
    "protocol": "object",
    "view": "object",
    "membership": "object",
    "draw": "int64",
    "target": "int64",
    "round": "int64",
    "attacked": "bool",
    "n_rounds": "int64",
    "n_members": "int64",
    "n_nonmembers": "int64",
    **{c: "int64" for c in CI_COLUMNS if c.endswith("_fp")},
}
#: Columns of an attack's one-run audit (:func:`fedmia.privacy.audit.audit_attacks`); the audit
#: table (``results/attacks/{cell}/audit.parquet``) has the cell's keys first. The row of
#: ``attack = "selected"`` audits the attack chosen on the selection half of the canaries,
#: named in ``selected_attack`` (empty in the per-attack rows).
AUDIT_COLUMNS = (
    "attack",
    "target",
    "round",
    "epsilon_empirical",
    "num_canaries",
    "num_guesses",
    "num_correct",
    "delta",
    "beta",
    "rule",
    "choice",
    "selected_attack",
)
#: The metrics whose bootstrap replicates the attack stage keeps for the findings: the AUC,
#: the paper's TPR@0.1 % and TPR@1 % (the lowest FPR a ~1,000-sample pool resolves with
#: more than one false positive).
REPLICATE_METRICS = ("auc", tpr_metric_name(0.001), tpr_metric_name(0.01))
#: The keys of a replicate row after the cell's and the attack: the attack table row's.
REPLICATE_KEYS = ("protocol", "draw", "target", "round")
#: Columns of the replicate table (``results/attacks/{cell}/replicates.parquet``,
#: :func:`fedmia.attacker.attacks.run_attacks_with_replicates`): one row per (attack, protocol,
#: draw, target, round) of the attacks the findings compare, attacked rounds and
#: multi-round scores only; per metric of :data:`REPLICATE_METRICS` the B bootstrap
#: replicates as a float32 array (``<metric>_replicates``), replicate ``b`` of every row
#: of one protocol from the same resample of the evaluation samples (all targets and draws).
REPLICATE_COLUMNS = (
    *CELL_KEYS,
    "attack",
    *REPLICATE_KEYS,
    *(f"{m}_replicates" for m in REPLICATE_METRICS),
)
#: dtypes of the replicate table's key columns (the replicates: float32 arrays).
REPLICATE_DTYPES = {c: ATTACK_DTYPES[c] for c in (*CELL_KEYS, "attack", *REPLICATE_KEYS)}


def prepared_paths(folder: str | Path) -> dict[str, str]:
    """The files of a prepared dataset in ``folder``, by key (:data:`PREPARED_FILES`)."""
    return {key: str(Path(folder) / name) for key, name in PREPARED_FILES.items()}


#: Format version of each kind of intermediate file: bump one when its contents change
#: incompatibly, so that old files are refused with a clear message instead of misread.
#: ``view`` is the version of the recorded server view as a whole (:data:`VIEW_FILES`),
#: stated inside the manifest's ``view`` block.
FORMATS = {
    "partition": 3,
    "history": 3,
    "manifest": 2,
    "observed": 2,
    "final": 1,
    "ownership": 1,
    "view": 1,
    "checkpoint": 1,
    "measures": 2,
    "attack": 1,
    "audit": 2,
    "replicates": 2,
}
#: The rule that writes each kind of file (for the fix in an error message).
WRITER = {
    "partition": "partition",
    "history": "train",
    "manifest": "train",
    "observed": "train",
    "final": "train",
    "ownership": "train",
    "view": "train",
    "checkpoint": "train",
    "measures": "measure",
    "attack": "attack",
    "audit": "attack",
    "replicates": "attack",
}

# ------------------------------------------------------------- the recorded server view

#: The files of a recorded server view ("what the server saw"), by key, relative to the
#: recording's folder: the manifest (JSON; its ``view`` block: :data:`VIEW_KEYS`), the
#: observed rounds (``observed/roundNNNN.safetensors``: :data:`OBSERVED_TENSORS`), the
#: final global model (``final``) and who owns which sample (:data:`OWNERSHIP_DTYPES`).
#: fedmia's train stage writes them under ``results/train/{cell}/``, the Flower recorder
#: (``fedmia.flower``) into a folder of the user's; the import stage reads either.
VIEW_FILES = {
    "manifest": "manifest.json",
    "observed": "observed",
    "final": "final.safetensors",
    "ownership": "ownership.parquet",
}
#: The keys of a manifest's ``view`` block: its format (``view/1``), who recorded it, the
#: model (``kind``, ``num_classes``, ``in_channels``), the dataset (``kind``,
#: ``num_samples``, ``sha256`` of the prepared arrays or null), the number of clients, the
#: rounds trained, the observed (recorded) rounds, and the SHA-256 of every file of the
#: view but the manifest, by its path relative to the recording's folder.
VIEW_KEYS = (
    "format",
    "recorder",
    "model",
    "dataset",
    "num_clients",
    "rounds",
    "observed_rounds",
    "files",
)
#: The tensors of an observed round: the global model sent (float32 P), the participants'
#: uploads Δ = global − local (float32 n×P, fedmia's sign), the participants' client ids
#: (int64 n, one per row of ``uploads``) and their data sizes (int64 n).
OBSERVED_TENSORS = ("global_state", "uploads", "client_ids", "num_samples")
#: Columns of a view's ownership table (``ownership.parquet``): one row per sample the
#: recording names — ``client_id`` ≥ 0, the client that trains on it; -1, the held-out
#: pool no client trains on (the non-members are drawn from it); ``eval``: the evaluation
#: set the recorder chose (all False: the auditor's partition draws one).
OWNERSHIP_DTYPES = {"sample_id": "int64", "client_id": "int32", "eval": "bool"}
FORMAT_KEY = "fedmia_format"


class FormatError(ValueError):
    """An intermediate file of another format version, kind, or a damaged one."""


def format_tag(kind: str) -> str:
    """``"<kind>/<version>"`` of the current format of ``kind`` (see :data:`FORMATS`)."""
    return f"{kind}/{FORMATS[kind]}"


def fix_text(path: str | Path, kind: str) -> str:
    """The fix of a missing, damaged or other-version file of ``kind``: rerun its writer."""
    return f"delete {path} and rerun, or rerun its stage with snakemake --forcerun {WRITER[kind]}"


def check_format(found: str | None, path: str | Path, kind: str) -> None:
    """Raise :class:`FormatError` unless ``found`` is the current tag of ``kind``."""
    want = format_tag(kind)
    if found != want:
        what = "no fedmia format tag" if found is None else f"format {found!r}"
        raise FormatError(
            f"{path} has {what}, but this fedmia reads {want!r} (the file was "
            f"written by another fedmia version or is not a {kind} file); "
            f"{fix_text(path, kind)}"
        )
