"""A Flower app that trains exactly as fedmia does (tests/test_flower.py, equivalence (a)).

The ClientApp calls fedmia's local training (``fedmia.federation.fedavg.local_train``) with
fedmia's per-(seed, round, client) generator, on one torch thread; the strategy aggregates
with fedmia's weights and step (``aggregation_weights``, ``aggregate``) over the replies in
client-id order. Recorded by :class:`fedmia.flower.ViewRecorder`, its server view must be
fedmia's own, bit for bit. The settings travel in the train ConfigRecord (file paths and
the config as JSON); a module of its own so that Ray's workers can import the ClientApp.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import lru_cache

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedmia.core.config import DefenseConfig, TrainConfig
from fedmia.federation.defenses import build_defense
from fedmia.federation.fedavg import (
    DeviceData,
    aggregate,
    aggregation_weights,
    client_generator,
    local_train,
)
from fedmia.federation.models import build_model
from fedmia.federation.state import FlatState
from fedmia.flower import flatten, partition_id, unflatten
from fedmia.stages import io

app = ClientApp()


@lru_cache(maxsize=2)
def _world(settings: str) -> tuple[FlatState, DeviceData, list[torch.Tensor], TrainConfig, int]:
    """Model, data, the clients' sample ids, train config and seed of a settings JSON."""
    s = json.loads(settings)
    arrays, meta = io.load_prepared(s["data"])
    part = io.read_parquet(s["partition"], "partition")
    client_ids = part["client_id"].to_numpy()
    k = int(client_ids.max()) + 1
    idx = [torch.from_numpy(np.flatnonzero(client_ids == c)) for c in range(k)]
    data = DeviceData.from_arrays(
        arrays["images"],
        arrays["labels"],
        meta["mean"],
        meta["std"],
        meta["num_classes"],
        torch.device("cpu"),
    )
    state = FlatState(
        build_model(s["model"], meta["num_classes"], meta["shape"][0], seed=s["seed"])
    )
    return state, data, idx, TrainConfig.from_dict(s["train"]), int(s["seed"])


@app.train()
def fit(msg: Message, context: Context) -> Message:
    """fedmia's local training of this partition from the received global model."""
    torch.set_num_threads(1)
    config = msg.content["config"]
    state, data, idx, cfg, seed = _world(str(config["fedmia"]))
    pid = int(context.node_config["partition-id"])
    rnd = int(config["server-round"])
    global_flat = flatten(msg.content["arrays"], state.layout)
    res = local_train(
        state,
        global_flat,
        data,
        idx[pid],
        cfg,
        cfg.lr_at(rnd),
        build_defense(DefenseConfig("none")),
        client_generator(seed, rnd, pid),
    )
    # the local model itself (no defense: global - local is the upload, bit for bit)
    return Message(
        RecordDict(
            {
                "arrays": unflatten(state.flat.detach(), state.layout),
                "metrics": MetricRecord(
                    {"num-examples": int(idx[pid].numel()), "train_loss": res.loss}
                ),
                "client": ConfigRecord({"partition-id": pid}),
            }
        ),
        reply_to=msg,
    )


class FedmiaAggregation(FedAvg):
    """FedAvg over every node, aggregated as fedmia does: in client-id order, fedmia's step."""

    def __init__(self, settings: dict, num_clients: int) -> None:
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=num_clients,
            min_available_nodes=num_clients,
        )
        self.settings = json.dumps(settings, sort_keys=True)
        self._sent: dict[int, ArrayRecord] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Every node, the global model and the settings."""
        self._sent[server_round] = arrays
        config["fedmia"] = self.settings
        config["server-round"] = server_round
        content = RecordDict({"arrays": arrays, "config": config})
        return [
            Message(content=content, message_type=MessageType.TRAIN, dst_node_id=n)
            for n in sorted(grid.get_node_ids())
        ]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """``w − Σ_k a_k Δ_k`` with fedmia's weights, the uploads in client-id order."""
        state, _, idx, _, seed = _world(self.settings)
        replies = sorted((r for r in replies if not r.has_error()), key=partition_id)
        sent = self._sent.pop(server_round)
        global_flat = flatten(sent, state.layout)
        uploads = torch.stack(
            [global_flat - flatten(r.content["arrays"], state.layout) for r in replies]
        )
        sizes = torch.tensor([int(r.content["metrics"]["num-examples"]) for r in replies])
        weights = aggregation_weights(sizes, "data_size", seed, server_round)
        return unflatten(aggregate(global_flat, uploads, weights), state.layout), None
