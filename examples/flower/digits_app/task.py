"""The ML of the app: the model, the data, the partitioner, training and testing.

Plain PyTorch, as a Flower app's ``task.py``. The data are fedmia's prepared digits
(scikit-learn's 1,797 images, 3×32×32, the same arrays and sample ids the auditor's
``prepare`` stage builds, so a sample id means the same image on both sides), normalised
with the training split's channel statistics as fedmia's measures normalise them.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedmia.core.config import DatasetConfig
from fedmia.federation.datasets import load_digits

NUM_CLIENTS = 10
ROUNDS = 30
RECORDED_ROUNDS = (5, 10, 15, 20, 25, 30)
LR = 0.05
MOMENTUM = 0.9
BATCH_SIZE = 32
SEED = 0


class Net(nn.Module):
    """A small CNN for 3×32×32 images: two conv–pool blocks and two linear layers."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 5)  # 16×28×28 → pool 16×14×14
        self.conv2 = nn.Conv2d(16, 32, 5)  # 32×10×10 → pool 32×5×5
        self.fc1 = nn.Linear(32 * 5 * 5, 64)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits B×classes of images B×3×32×32."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


def net(num_classes: int = 10, in_channels: int = 3) -> Net:
    """The model, seeded (the factory fedmia's plugin registers)."""
    return Net(num_classes, in_channels)


@lru_cache(maxsize=1)
def load_data() -> tuple[torch.Tensor, torch.Tensor, np.ndarray, str]:
    """Normalised images (N×3×32×32), labels (N), the test flags (N) and the data's SHA-256."""
    data = load_digits(DatasetConfig.from_dict({"kind": "digits"}))
    mean, std = data.channel_stats()
    x = torch.from_numpy(data.images).float().div_(255.0)
    x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    return x, torch.from_numpy(data.labels), data.is_test, data.checksum()


def partition(num_clients: int = NUM_CLIENTS, seed: int = SEED) -> list[np.ndarray]:
    """Each client's sample ids: the training split in equal random shards (deterministic).

    The ClientApps and the ServerApp both rebuild it; no sample id travels in a message.
    """
    _, _, is_test, _ = load_data()
    train_ids = np.flatnonzero(~is_test)
    shards = np.array_split(np.random.default_rng(seed).permutation(train_ids), num_clients)
    return [np.sort(s) for s in shards]


def held_out() -> np.ndarray:
    """Sample ids no client trains on: the test split."""
    return np.flatnonzero(load_data()[2])


def train(model: nn.Module, ids: np.ndarray, lr: float, generator: torch.Generator) -> float:
    """One epoch of SGD over samples ``ids``; returns the mean training loss."""
    x, y, _, _ = load_data()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM)
    order = torch.from_numpy(ids)[torch.randperm(len(ids), generator=generator)]
    total = 0.0
    for start in range(0, len(order), BATCH_SIZE):
        batch = order[start : start + BATCH_SIZE]
        loss = F.cross_entropy(model(x[batch]), y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(batch)
    return total / len(order)


@torch.no_grad()
def test(model: nn.Module, ids: np.ndarray) -> tuple[float, float]:
    """Loss and accuracy on samples ``ids``."""
    x, y, _, _ = load_data()
    model.eval()
    logits = model(x[ids])
    accuracy = (logits.argmax(1) == y[ids]).float().mean()
    return float(F.cross_entropy(logits, y[ids])), float(accuracy)
