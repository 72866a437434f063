"""The paper's CIFAR model variants, by name.

=========  ============================================  =========================
name       architecture                                  parameters (3×32×32 input)
=========  ============================================  =========================
alexnet    5 convs (11×11/4, 5×5, 3×3 ×3), ReLU, max-    2,495,396 (100 classes)
           pools, global max pool, one linear layer      2,472,266 (10 classes)
resnet18   3×3 stem, no max pool, 4×2 BasicBlocks with   11,220,132 (100 classes)
           BatchNorm, global average pool, linear        11,173,962 (10 classes)
=========  ============================================  =========================

Both end in a global pool, so they accept any input size (Dermnet's 64×64 too)
with the same parameter count.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fedmia.registry import Registry

ModelFactory = Callable[[int, int], nn.Module]
MODELS: Registry[ModelFactory] = Registry("model")


class AlexNetCifar(nn.Module):
    """AlexNet for 32×32 inputs as the official FedMIA code uses it (no dropout, no FC stack).

    Shapes for a 3×32×32 input: conv1 (11×11, stride 4) → 64×8×8, pool → 4×4,
    conv2 → 192×4×4, pool → 2×2, conv3..5 → 256×2×2, global max pool → 256, linear.
    """

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, kernel_size=11, stride=4, padding=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.AdaptiveMaxPool2d(1),
        )
        self.classifier = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits B×num_classes of images B×C×H×W."""
        return self.classifier(torch.flatten(self.features(x), 1))


class BasicBlock(nn.Module):
    """Two 3×3 conv–BN layers with an identity (or 1×1 conv–BN) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B×c_in×H×W → B×c_out×H/stride×W/stride."""
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18Cifar(nn.Module):
    """ResNet18 for 32×32 inputs: 3×3 stem, no max pool, stages of 64/128/256/512 channels."""

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers: list[nn.Module] = []
        c_in = 64
        for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(BasicBlock(c_in, c_out, stride),
                                        BasicBlock(c_out, c_out, 1)))
            c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits B×num_classes of images B×C×H×W."""
        out = self.layers(torch.relu(self.bn1(self.conv1(x))))
        return self.linear(torch.flatten(self.pool(out), 1))


MODELS.register("alexnet")(AlexNetCifar)
MODELS.register("resnet18")(ResNet18Cifar)


def build_model(kind: str, num_classes: int, in_channels: int = 3, *, seed: int) -> nn.Module:
    """Instantiate model ``kind`` with weights initialised from ``seed`` (on the CPU)."""
    factory = MODELS.get(kind)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory(num_classes, in_channels)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
