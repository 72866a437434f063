"""Record what a Flower server sees, in fedmia's recorded-view format, while Flower trains.

:class:`ViewRecorder` wraps a message-based Flower strategy
(``flwr.serverapp.strategy.FedAvg`` and the others of Flower ≥ 1.21) and writes the
recorded server view (``docs/flower.md``; :data:`fedmia.core.contracts.VIEW_FILES`) into
a folder: per recorded round the global model of ``configure_train``'s arrays and each
training reply's arrays as an upload ``Δ = global − local`` (fedmia's sign), with the
reply's stable partition id as its client id; the final global model; who owns which
sample; and the manifest with the SHA-256 of every file. ``fedmia.stages.recording``
imports it as a cell, and fedmia's measures, attacks and report run on it.

The recorder wraps *outermost*: it records what the server receives, before any other
wrapper (a server-side DP wrapper adds its noise after that). It materialises the
replies before handing them on, logs every error reply (its client is then missing from
that round), and delegates everything else to the strategy it wraps.

**Ground truth travels out of band.** Which samples a client owns never goes into a
Flower message — sending membership to the server is the very leak being audited. The
ServerApp passes it to the recorder (``clients``, ``held_out``), rebuilt from the same
deterministic partitioner the ClientApps use; a reply carries only its stable partition
id (``partition-id``, in a ConfigRecord or MetricRecord of its content; Flower's node
ids change from run to run).

This module imports Flower (the ``fedmia[flower]`` extra); nothing else of fedmia does.
"""

from __future__ import annotations

import copy
import logging
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import flwr
import numpy as np
import pandas as pd
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import nn

import fedmia
from fedmia.core.contracts import VIEW_FILES
from fedmia.federation.partition import HELD_OUT
from fedmia.federation.state import FlatState, StateLayout
from fedmia.stages import io

log = logging.getLogger(__name__)

#: Where a reply names its client: this key in a ConfigRecord or MetricRecord of its content.
PARTITION_KEY = "partition-id"


def state_layout(model: nn.Module) -> StateLayout:
    """The layout of ``model``'s floating state (fedmia's flat vector), from a copy of it."""
    return FlatState(copy.deepcopy(model)).layout


def flatten(arrays: ArrayRecord, layout: StateLayout) -> torch.Tensor:
    """The flat float32 state (P) of a Flower ``ArrayRecord`` laid out as ``layout``.

    Raises:
        ValueError: a tensor of the layout is missing or of another shape, or the record
            holds a floating tensor the layout has not (another architecture).
    """
    flat = torch.empty(layout.size, dtype=torch.float32)
    for e in layout.entries:
        if e.name not in arrays:
            raise ValueError(
                f"the arrays lack '{e.name}' of the recorded model: another "
                "architecture than the recorder's model"
            )
        a = arrays[e.name].numpy()
        if tuple(a.shape) != e.shape:
            raise ValueError(
                f"'{e.name}' has shape {list(a.shape)} but the recorder's model "
                f"has {list(e.shape)}: another architecture"
            )
        flat[e.slice] = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).reshape(-1)
    names = {e.name for e in layout.entries}
    extra = [
        k
        for k, v in arrays.items()
        if k not in names and np.issubdtype(np.dtype(v.dtype), np.floating)
    ]
    if extra:
        raise ValueError(
            f"the arrays hold {extra}, which the recorder's model has not: another architecture"
        )
    return flat


def unflatten(
    flat: torch.Tensor, layout: StateLayout, template: ArrayRecord | None = None
) -> ArrayRecord:
    """A Flower ``ArrayRecord`` of a flat state (P), in the layout's order.

    ``template``'s arrays that the layout has not (integer buffers such as BatchNorm's
    ``num_batches_tracked``) are carried over unchanged.
    """
    out = ArrayRecord()
    for e in layout.entries:
        out[e.name] = Array(flat[e.slice].reshape(e.shape).numpy().copy())
    for k, v in (template or {}).items():
        if k not in out:
            out[k] = v
    return out


def partition_id(reply: Message, key: str = PARTITION_KEY) -> int:
    """The stable partition id a training reply carries (``key`` in a Config/MetricRecord).

    Raises:
        ValueError: the reply names none.
    """
    content = reply.content
    for records in (content.config_records, content.metric_records):
        for record in records.values():
            if key in record:
                return int(record[key])
    raise ValueError(
        f"a training reply (node {reply.metadata.src_node_id}) carries no "
        f"'{key}': the ClientApp must put its partition id (context.node_config"
        f"['partition-id']) in its reply, e.g. ConfigRecord({{'{key}': pid}}) "
        "(docs/flower.md)"
    )


class ViewRecorder(Strategy):
    """A Flower strategy that records the server's view and delegates to ``strategy``.

    Args:
        strategy: the message-based strategy that trains (Flower's ``FedAvg``, …).
        folder: the recording's folder (created; a recording already there is replaced).
        model: the model the clients train (its architecture; the recorder reads only
            its state's names and shapes).
        model_kind: the name a fedmia plugin registers the model under
            (``MODELS.register(model_kind, impl=...)``): the auditor's config names it.
        num_classes: the model's classes.
        in_channels: the model's input channels.
        dataset: ``kind`` (the fedmia dataset kind whose prepared arrays the run trained
            on), ``num_samples`` and ``sha256`` (``PreparedData.checksum()``; ``None``:
            unknown, then only the size is checked).
        clients: partition id → the sample ids that client trains on (ids 0..K-1).
        held_out: sample ids no client trains on (the pool the non-members come from).
        evaluation: sample ids of an evaluation set the auditor measures (``None``: the
            auditor's partition config draws one).
        rounds: the rounds to record (``None``: every round).
        key: where a reply names its client (:data:`PARTITION_KEY`).
        weight_key: the reply's metric of its data size (``num-examples``, Flower's).
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        folder: str | Path,
        model: nn.Module,
        model_kind: str,
        num_classes: int,
        in_channels: int,
        dataset: Mapping[str, Any],
        clients: Mapping[int, Sequence[int]],
        held_out: Sequence[int],
        evaluation: Sequence[int] | None = None,
        rounds: Iterable[int] | None = None,
        key: str = PARTITION_KEY,
        weight_key: str = "num-examples",
    ) -> None:
        self.strategy = strategy
        self.folder = Path(folder)
        self.layout = state_layout(model)
        self.model = {
            "kind": model_kind,
            "num_classes": int(num_classes),
            "in_channels": int(in_channels),
        }
        self.dataset = {
            "kind": dataset["kind"],
            "num_samples": int(dataset["num_samples"]),
            "sha256": dataset.get("sha256"),
        }
        self.num_clients = len(clients)
        if sorted(clients) != list(range(self.num_clients)):
            raise ValueError(
                f"clients must be keyed by the partition ids 0..K-1, got {sorted(clients)[:10]}"
            )
        self.rounds = None if rounds is None else set(rounds)
        self.key = key
        self.weight_key = weight_key
        self.recorder = f"fedmia.flower (fedmia {fedmia.__version__}, flwr {flwr.__version__})"
        self._sent: dict[int, torch.Tensor] = {}
        self._files: dict[str, str] = {}
        self._observed: list[int] = []
        self._start(clients, held_out, evaluation)

    # ------------------------------------------------------------------ the recording

    def _start(
        self,
        clients: Mapping[int, Sequence[int]],
        held_out: Sequence[int],
        evaluation: Sequence[int] | None,
    ) -> None:
        """Empty the folder of an older recording and write the ownership table."""
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / VIEW_FILES["manifest"]).unlink(missing_ok=True)  # first: no stale view
        shutil.rmtree(self.folder / VIEW_FILES["observed"], ignore_errors=True)
        (self.folder / VIEW_FILES["final"]).unlink(missing_ok=True)
        ids = [np.asarray(clients[c], dtype=np.int64) for c in range(self.num_clients)]
        pool = np.asarray(held_out, dtype=np.int64)
        sample_id = np.concatenate([*ids, pool])
        client_id = np.concatenate(
            [np.full(len(i), c, dtype=np.int32) for c, i in enumerate(ids)]
            + [np.full(len(pool), HELD_OUT, dtype=np.int32)]
        )
        chosen = set() if evaluation is None else {int(i) for i in evaluation}
        own = pd.DataFrame(
            {
                "sample_id": sample_id,
                "client_id": client_id,
                "eval": [int(i) in chosen for i in sample_id],
            }
        )
        if own["sample_id"].duplicated().any():
            raise ValueError(
                "a sample is owned twice (by two clients, or by a client and the "
                "held-out pool): the clients' shards must be disjoint"
            )
        self._files[VIEW_FILES["ownership"]] = io.write_ownership(
            own, self.folder / VIEW_FILES["ownership"]
        )

    def _recorded(self, server_round: int) -> bool:
        return self.rounds is None or server_round in self.rounds

    def _write_manifest(self, server_round: int) -> None:
        view = io.make_view(
            recorder=self.recorder,
            model=self.model,
            dataset=self.dataset,
            num_clients=self.num_clients,
            rounds=server_round,
            observed_rounds=self._observed,
            files=self._files,
        )
        io.write_manifest({"view": view}, self.folder / VIEW_FILES["manifest"])

    # ------------------------------------------------------------ the strategy's hooks

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Record the global model sent (a recorded round), then delegate."""
        if self._recorded(server_round):
            self._sent[server_round] = flatten(arrays, self.layout)
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Record the replies' uploads, delegate the aggregation, record its result."""
        replies = list(replies)  # materialised: the wrapped strategy reads them again
        for r in replies:
            if r.has_error():
                log.warning(
                    "round %d: node %s replied with an error (%s): its upload is not recorded",
                    server_round,
                    r.metadata.src_node_id,
                    r.error.reason,
                )
        sent = self._sent.pop(server_round, None)
        if sent is not None:
            self._save_round(server_round, sent, [r for r in replies if not r.has_error()])
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is not None:
            f = self.folder / VIEW_FILES["final"]
            io.save_tensors(
                f,
                {"global_state": flatten(arrays, self.layout)},
                {
                    "round": server_round,
                    "layout": self.layout.to_list(),
                    "model": self.model,
                    "recorder": self.recorder,
                },
                "final",
            )
            self._files[VIEW_FILES["final"]] = io.file_sha256(f)
            self._write_manifest(server_round)
        return arrays, metrics

    def _save_round(self, server_round: int, sent: torch.Tensor, replies: list[Message]) -> None:
        rows = []
        for r in replies:
            if len(r.content.array_records) != 1:
                raise ValueError(
                    f"round {server_round}: a reply (node "
                    f"{r.metadata.src_node_id}) holds "
                    f"{len(r.content.array_records)} ArrayRecords; the recorder "
                    "reads the one holding the trained model"
                )
            local = flatten(next(iter(r.content.array_records.values())), self.layout)
            weight = next(
                (
                    rec[self.weight_key]
                    for rec in r.content.metric_records.values()
                    if self.weight_key in rec
                ),
                0,
            )
            rows.append(
                (partition_id(r, self.key), sent - local, int(weight), int(r.metadata.src_node_id))
            )
        rows.sort(key=lambda row: row[0])  # client-id order, whatever the reply order
        ids = [row[0] for row in rows]
        if len(set(ids)) != len(ids) or not all(0 <= c < self.num_clients for c in ids):
            raise ValueError(
                f"round {server_round}: replies name partition ids {ids}; each "
                f"of 0..{self.num_clients - 1} at most once"
            )
        uploads = (
            torch.stack([row[1] for row in rows]) if rows else torch.empty(0, self.layout.size)
        )
        name = io.view_file(server_round)
        self._files[name] = io.save_observed(
            self.folder / name,
            global_state=sent,
            uploads=uploads,
            client_ids=torch.tensor(ids, dtype=torch.int64),
            num_samples=torch.tensor([row[2] for row in rows], dtype=torch.int64),
            meta={
                "round": server_round,
                "layout": self.layout.to_list(),
                "model": self.model,
                "recorder": self.recorder,
                "node_ids": [row[3] for row in rows],
            },
        )
        self._observed.append(server_round)
        log.info(
            "round %d recorded: %d uploads (clients %s) in %s",
            server_round,
            len(ids),
            ids,
            self.folder / name,
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegated."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Delegated."""
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        """The wrapped strategy's summary, and where the view is recorded."""
        log.info(
            "recording the server's view in %s (rounds: %s)",
            self.folder,
            "all" if self.rounds is None else sorted(self.rounds),
        )
        self.strategy.summary()
