"""The ServerApp: Flower's FedAvg, wrapped by fedmia's recorder, over every client."""

from __future__ import annotations

from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedmia.flower import ViewRecorder

from .task import (
    LR,
    NUM_CLIENTS,
    RECORDED_ROUNDS,
    ROUNDS,
    SEED,
    held_out,
    load_data,
    net,
    partition,
    test,
)


def server_app(recording: Path) -> ServerApp:
    """The ServerApp, recording the server's view into ``recording`` (an absolute path)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.manual_seed(SEED)
        model = net()
        _, _, _, sha256 = load_data()
        strategy = ViewRecorder(
            FedAvg(
                fraction_train=1.0,
                fraction_evaluate=0.0,
                min_train_nodes=NUM_CLIENTS,
                min_available_nodes=NUM_CLIENTS,
            ),
            folder=recording,
            model=model,
            model_kind="digits_cnn",
            num_classes=10,
            in_channels=3,
            dataset={"kind": "digits", "num_samples": len(load_data()[1]), "sha256": sha256},
            # ground truth, out of band: the same deterministic partitioner as the clients
            clients=dict(enumerate(partition(NUM_CLIENTS))),
            held_out=held_out(),
            rounds=RECORDED_ROUNDS,
        )

        def evaluate(rnd: int, arrays: ArrayRecord) -> MetricRecord:
            m = net()
            m.load_state_dict(arrays.to_torch_state_dict())
            loss, acc = test(m, held_out())
            return MetricRecord({"test_loss": loss, "test_accuracy": acc})

        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=ROUNDS,
            train_config=ConfigRecord({"lr": LR}),
            evaluate_fn=evaluate,
        )

    return app
