"""Stage 3 of an imported run, ``import_recording``: a recorded server view as a cell.

A *recording* is a folder holding what a federated server saw (the format:
:data:`fedmia.core.contracts.VIEW_FILES`, ``docs/flower.md``): ``manifest.json`` (its
``view`` block names the model, the dataset, the clients, the rounds and the SHA-256 of
every other file), ``observed/roundNNNN.safetensors`` (per recorded round the global
model sent and each participant's upload, with its client id), ``final.safetensors``
(the last global model) and ``ownership.parquet`` (which samples each client owns, the
held-out pool). fedmia's train stage writes one for every cell it trains
(``results/train/{cell}/``); :mod:`fedmia.flower` records one while Flower trains.

This stage checks a recording whole — every file's hash, every recorded round, the
architecture of every upload against the configured model, every sample id against the
dataset — and only then writes the cell's files, the same the train stage writes for
the measure and attack stages: the observed rounds (copied), the manifest, the ownership
and final model (copied), and the cell's partition (the recording's clients, the
evaluation set it names or one drawn by the cell's partition config). A bad recording
stops with the file and the fix, and nothing of the cell is written.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

import fedmia
from fedmia.core.config import ModelConfig, PartitionConfig
from fedmia.core.contracts import CELL_KEYS, VIEW_FILES, FormatError
from fedmia.core.lockfile import lock_sha256
from fedmia.core.registry import import_plugins
from fedmia.federation.fedavg import DeviceData, evaluate
from fedmia.federation.models import build_model
from fedmia.federation.partition import HELD_OUT, evaluation_set
from fedmia.federation.state import FlatState, StateLayout
from fedmia.stages import io
from fedmia.stages.compute import setup_compute

log = logging.getLogger(__name__)

#: The fix of a recording whose files are damaged, missing or changed after recording.
RERECORD = (
    "restore the recording's files as they were recorded, or record the run again (docs/flower.md)"
)


class RecordingError(ValueError):
    """A recorded server view that cannot be audited; the message names the file and the fix."""


@contextlib.contextmanager
def _recorded_file() -> Iterator[None]:
    """Read a recording's file in the block: a damaged one names the recording's fix."""
    try:
        yield
    except FormatError as e:  # its fix (rerun a stage) is not a recording's
        raise RecordingError(f"{str(e).split('; ')[0]}; {RERECORD}") from None


def verify_files(folder: Path, view: Mapping[str, Any]) -> None:
    """Every file of the view exists, is listed, and has the SHA-256 the manifest states.

    Raises:
        RecordingError: a recorded round, the ownership table or the final model is not
            listed or missing (naming the file), or a file's bytes differ from the
            manifest's hash (changed or truncated after recording).
    """
    files = view["files"]
    needed = [
        VIEW_FILES["ownership"],
        VIEW_FILES["final"],
        *(io.view_file(r) for r in view["observed_rounds"]),
    ]
    for name in needed:
        path = folder / name
        if name not in files or not path.exists():
            what = "is not listed in its manifest" if name not in files else "is missing"
            rnd = next((r for r in view["observed_rounds"] if io.view_file(r) == name), None)
            which = f"recorded round {rnd}: " if rnd is not None else ""
            raise RecordingError(
                f"{which}{path} {what} (the manifest lists the rounds "
                f"{view['observed_rounds']}); {RERECORD}"
            )
    for name, digest in files.items():
        path = folder / name
        if not path.exists():
            raise RecordingError(f"{path} is missing (the manifest lists it); {RERECORD}")
        found = io.file_sha256(path)
        if found != digest:
            raise RecordingError(
                f"{path}: SHA-256 {found[:16]}… does not match the manifest's {digest[:16]}… "
                f"(the file was changed or truncated after recording); {RERECORD}"
            )


def check_ownership(
    own: pd.DataFrame, view: Mapping[str, Any], num_samples: int, path: Path
) -> None:
    """The ownership table names samples of the dataset and every client of the view.

    Raises:
        RecordingError: a sample id outside ``0..num_samples-1``, a client id outside
            ``-1..K-1``, or a client that owns no sample.
    """
    ids = own["sample_id"].to_numpy()
    outside = np.sort(ids[(ids < 0) | (ids >= num_samples)])
    if len(outside):
        raise RecordingError(
            f"{path} names {len(outside)} sample id(s) not in the dataset, e.g. "
            f"{outside[:3].tolist()}; the dataset has {num_samples} samples (ids 0.."
            f"{num_samples - 1}): the run trained on another dataset; set the recording's "
            "dataset to the one it trained on (the manifest's view.dataset names its kind)"
        )
    k = view["num_clients"]
    owners = own["client_id"].to_numpy()
    bad = sorted(set(owners[(owners < HELD_OUT) | (owners >= k)].tolist()))
    if bad:
        raise RecordingError(
            f"{path} names client id(s) {bad}, outside 0..{k - 1} (and -1, "
            f"the held-out pool) of the view's {k} clients; {RERECORD}"
        )
    empty = sorted(set(range(k)) - set(owners.tolist()))
    if empty:
        raise RecordingError(
            f"{path}: client(s) {empty} own no sample (every client of the "
            "view trains on its own samples); record their samples too"
        )


def check_round(
    obs: Mapping[str, Any], path: Path, layout: StateLayout, model_name: str, num_clients: int
) -> list[int]:
    """One observed round: the configured model's architecture, each participant once.

    A round may lack clients (sampled per round, or an error reply): the attacks use
    each client in the rounds it took part in (``docs/participation.md``).

    Returns:
        The round's participants (sorted client ids).

    Raises:
        RecordingError: the uploads or the global model are of another architecture
            (layout or length), a client id outside the view or twice.
    """
    theirs = StateLayout.from_list(obs["layout"])
    uploads = obs["uploads"]
    p = layout.size
    if (
        theirs != layout
        or obs["global_state"].shape != (p,)
        or uploads.ndim != 2
        or uploads.shape[1] != p
    ):
        diff = next(
            (
                f"'{a.name}' {list(a.shape)} vs {list(b.shape)}"
                for a, b in zip(theirs.entries, layout.entries, strict=False)
                if (a.name, a.shape) != (b.name, b.shape)
            ),
            f"{theirs.size} vs {p} floats",
        )
        raise RecordingError(
            f"{path}: an upload of another architecture than model '{model_name}' (first "
            f"difference: {diff}); set the recording's model to the architecture the run "
            "trained (a registered kind or a plugin's)"
        )
    ids = obs["client_ids"].tolist()
    if len(ids) != uploads.shape[0] or len(obs["num_samples"]) != len(ids):
        raise RecordingError(
            f"{path}: {uploads.shape[0]} uploads but {len(ids)} client ids "
            f"and {len(obs['num_samples'])} data sizes; {RERECORD}"
        )
    twice = sorted({c for c in ids if ids.count(c) > 1})
    outside = sorted(c for c in ids if not 0 <= c < num_clients)
    if twice or outside:
        raise RecordingError(
            f"{path}: client id(s) {twice or outside} appear twice or lie "
            f"outside 0..{num_clients - 1}; {RERECORD}"
        )
    if not (torch.isfinite(uploads).all() and torch.isfinite(obs["global_state"]).all()):
        raise RecordingError(
            f"{path}: non-finite values in round {obs['round']} (the run "
            "diverged); attack the rounds before it"
        )
    return sorted(ids)


def recorded_participation(
    participants: Mapping[int, list[int]], num_clients: int
) -> dict[str, Any] | None:
    """The manifest's ``participation`` of a recording whose rounds lack clients.

    ``fraction`` is the mean share of the clients that took part in a recorded round,
    ``sampling`` ``recorded`` (how the run drew them is not in the view) and
    ``client_rounds`` the recorded rounds each client took part in. ``None`` where every
    client took part in every recorded round (the manifest of before).
    """
    if all(len(ids) == num_clients for ids in participants.values()):
        return None
    counts = np.zeros(num_clients, dtype=int)
    for ids in participants.values():
        counts[ids] += 1
    share = float(np.mean([len(ids) for ids in participants.values()])) / num_clients
    return {"fraction": share, "sampling": "recorded", "client_rounds": counts.tolist()}


def import_recording(
    *,
    recording: str | Path,
    data: Mapping[str, str | Path],
    model: Mapping[str, Any],
    partition: Mapping[str, Any],
    cell: Mapping[str, Any],
    device: str = "cpu",
    threads: int | None = None,
    plugins: Sequence[str] = (),
    outputs: Mapping[str, str | Path],
) -> None:
    """Check a recorded server view and write it as the files of one cell.

    Args:
        recording: the recording's folder (``manifest.json`` and the files it lists).
        data: files of the prepared dataset the run trained on.
        model: the model's config block (a registered kind, a plugin's included).
        partition: the cell's partition config block: its ``num_clients`` must be the
            view's; its ``eval_members_per_client`` and ``eval_nonmembers`` draw the
            evaluation set when the recording names none.
        cell: ``dataset, model, defense, partition, seed`` (the seed draws the evaluation
            set; every key is written into the manifest).
        device: where the final model's test accuracy is computed.
        threads: CPU threads for torch.
        plugins: the config's ``plugins``, imported first (they register kinds).
        outputs: ``manifest``, ``observed`` (folder), ``ownership``, ``final`` (the view's
            files, copied: the cell's folder is itself a recording) and ``partition``
            (the cell's partition Parquet for the measure and attack stages).

    Raises:
        RecordingError: a bad recording (one that records no round included), naming the
            file and the fix (also ``FormatError``, and ``FileNotFoundError`` for a folder
            that is empty or has no manifest); no output is written.
    """
    import_plugins(plugins)
    folder = Path(recording)
    manifest_file = folder / VIEW_FILES["manifest"]
    view = io.read_view(manifest_file)
    if not view["observed_rounds"]:
        raise RecordingError(io.no_round(manifest_file))
    mcfg = ModelConfig.from_dict(model)
    pcfg = PartitionConfig.from_dict(partition)
    dev = setup_compute(device, threads, False)
    arrays, meta = io.load_prepared(data)
    n = len(arrays["labels"])
    want = view["dataset"]
    if want.get("sha256") not in (None, meta["sha256"]) or want.get("num_samples") != n:
        raise RecordingError(
            f"{manifest_file}: the run trained on dataset {want} but the configured dataset "
            f"'{cell['dataset']}' is kind {meta['kind']!r} with {n} samples (SHA-256 "
            f"{meta['sha256'][:16]}…); set the recording's dataset to the one it trained on "
            "(same kind and options, e.g. image_size)"
        )
    if view["num_clients"] != pcfg.num_clients:
        raise RecordingError(
            f"{manifest_file}: the view has {view['num_clients']} clients "
            f"but partition '{cell['partition']}' says num_clients "
            f"{pcfg.num_clients}; set it to {view['num_clients']}"
        )
    verify_files(folder, view)
    with _recorded_file():
        own = io.read_ownership(folder / VIEW_FILES["ownership"])
    check_ownership(own, view, n, folder / VIEW_FILES["ownership"])
    net = build_model(mcfg.kind, meta["num_classes"], meta["shape"][0], seed=0).to(dev)
    state = FlatState(net)
    participants = {}
    for r in view["observed_rounds"]:
        path = folder / io.view_file(r)
        with _recorded_file():
            obs = io.load_observed(path)
        participants[r] = check_round(obs, path, state.layout, mcfg.kind, pcfg.num_clients)
    participation = recorded_participation(participants, pcfg.num_clients)
    with _recorded_file():
        final, _ = io.load_tensors(folder / VIEW_FILES["final"], "final")
    if final["global_state"].shape != (state.layout.size,):
        raise RecordingError(
            f"{folder / VIEW_FILES['final']}: a model of another "
            f"architecture than '{mcfg.kind}'; {RERECORD}"
        )

    owner = np.full(n, HELD_OUT - 1, dtype=np.int32)  # -2: a sample the view does not name
    owner[own["sample_id"].to_numpy()] = own["client_id"].to_numpy()
    named_eval = np.zeros(n, dtype=bool)
    named_eval[own["sample_id"].to_numpy()] = own["eval"].to_numpy()
    if named_eval.any():
        in_eval = named_eval
        log.info("the recording names its evaluation set (%d samples)", int(in_eval.sum()))
    else:
        in_eval = evaluation_set(
            owner, pcfg, int(cell["seed"]), where=f"partitions.{cell['partition']}"
        )
    held_out = owner == HELD_OUT
    part = pd.DataFrame(
        {
            "sample_id": np.arange(n, dtype=np.int64),
            "client_id": np.where(owner >= 0, owner, HELD_OUT).astype(np.int32),
            "is_test": arrays["is_test"].astype(bool),
            "eval": in_eval,
            "canary": False,
            "canary_in": False,
            "filler": False,
        }
    )
    test = (
        np.flatnonzero(held_out & part["is_test"].to_numpy())
        if (held_out & part["is_test"].to_numpy()).any()
        else np.flatnonzero(held_out)
    )
    ddata = DeviceData.from_arrays(
        arrays["images"], arrays["labels"], meta["mean"], meta["std"], meta["num_classes"], dev
    )
    state.load(final["global_state"].to(dev))
    _, accuracy = evaluate(state.module, ddata, torch.from_numpy(test).to(dev), 500)
    unnoised = sum(e.numel for e in state.layout.entries if not e.is_param)
    manifest = {
        **{k: cell[k] for k in CELL_KEYS},
        "rounds": view["rounds"],
        "planned_observed_rounds": view["observed_rounds"],
        "observed_rounds": view["observed_rounds"],
        "num_classes": meta["num_classes"],
        "aggregation_weights": "recorded",
        "unnoised_state_floats": unnoised,
        # what the clients did is not in the view: no guarantee is claimed
        "privacy": None,
        "diverged_round": None,
        "last_finite_round": view["rounds"],
        "last_finite_test_accuracy": accuracy,
        "final_test_accuracy": accuracy,
        "best_test_accuracy": None,
        "fedmia_version": fedmia.__version__,
        "lock_sha256": lock_sha256(),
        "recording": {
            "folder": str(folder.resolve()),
            "manifest_sha256": io.file_sha256(manifest_file),
        },
        "view": view,
    }
    if participation is not None:  # rounds lacking clients: attacked as sampled
        manifest["participation"] = participation
        log.info(
            "recorded rounds lack clients: each client is attacked in the %s rounds it "
            "took part in (mean share %.2f)",
            participation["client_rounds"],
            participation["fraction"],
        )
    _write_cell(folder, view, part, manifest, outputs)
    log.info(
        "imported %s: %d clients, rounds %s of %d, %d evaluation samples, final model's "
        "test accuracy %.3f on %d held-out samples",
        folder,
        view["num_clients"],
        view["observed_rounds"],
        view["rounds"],
        int(in_eval.sum()),
        accuracy,
        len(test),
    )


def _write_cell(
    folder: Path,
    view: Mapping[str, Any],
    part: pd.DataFrame,
    manifest: Mapping[str, Any],
    outputs: Mapping[str, str | Path],
) -> None:
    """Copy the view's files and write the partition and manifest; all or nothing."""
    observed = Path(outputs["observed"])
    observed.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=observed.parent, prefix=f".{observed.name}.", suffix=".tmp"))
    try:
        for r in view["observed_rounds"]:
            shutil.copyfile(folder / io.view_file(r), io.round_file(tmp, r))
        for key in ("ownership", "final"):
            with io.atomic_path(outputs[key]) as dst:
                shutil.copyfile(folder / VIEW_FILES[key], dst)
        io.write_parquet(part, outputs["partition"], "partition")
        shutil.rmtree(observed, ignore_errors=True)
        tmp.replace(observed)
        io.write_manifest(dict(manifest), outputs["manifest"])
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for key in ("ownership", "final", "partition", "manifest"):
            Path(outputs[key]).unlink(missing_ok=True)
        shutil.rmtree(observed, ignore_errors=True)
        raise
