"""The ClientApp: trains its shard and replies its model, its data size and its partition id."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .task import net, partition, train

app = ClientApp()


@app.train()
def fit(msg: Message, context: Context) -> Message:
    """Train the received model one epoch on this partition's samples."""
    torch.set_num_threads(1)
    pid = int(context.node_config["partition-id"])
    rnd = int(msg.content["config"]["server-round"])
    model = net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    ids = partition(int(context.node_config["num-partitions"]))[pid]
    g = torch.Generator().manual_seed(1000 * rnd + pid)
    loss = train(model, ids, float(msg.content["config"]["lr"]), g)
    return Message(
        RecordDict(
            {
                "arrays": ArrayRecord(model.state_dict()),
                "metrics": MetricRecord({"train_loss": loss, "num-examples": len(ids)}),
                # the only fact of the client the audit needs: its stable id (node ids change)
                "client": ConfigRecord({"partition-id": pid}),
            }
        ),
        reply_to=msg,
    )
