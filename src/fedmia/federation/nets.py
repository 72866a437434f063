"""The networks of the model kinds (:mod:`fedmia.federation.models` registers them).

This module subclasses ``torch.nn.Module`` at import, so the parse of the Snakefile never
imports it: each model kind's registration names its factory here by a dotted path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

ModelFactory = Callable[[int, int], nn.Module]
NormFactory = Callable[[int], nn.Module]  # channels → norm layer


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


def alexnet(num_classes: int, in_channels: int = 3) -> nn.Module:
    """The official code's AlexNet for 32×32 inputs (:class:`AlexNetCifar`)."""
    return AlexNetCifar(num_classes, in_channels)


def group_norm_32(channels: int) -> nn.Module:
    """``GroupNorm(32, channels)``: the official ResNet18's norm layer (per sample, no buffers)."""
    return nn.GroupNorm(32, channels)


class BasicBlock(nn.Module):
    """Two 3×3 conv–norm layers with an identity (or 1×1 conv–norm) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: NormFactory) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = norm(c_out)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), norm(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B×c_in×H×W → B×c_out×H/stride×W/stride."""
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18Cifar(nn.Module):
    """ResNet18 for 32×32 inputs: 3×3 stem, no max pool, stages of 64/128/256/512 channels.

    The official ``models/resnet_cifar.py`` ``ResNet18`` with ``norm=group_norm_32``
    (the default), module names included, so its state dicts load as they are.
    Shapes for a 3×32×32 input: stem → 64×32×32, layer1 → 64×32×32, layer2 →
    128×16×16, layer3 → 256×8×8, layer4 → 512×4×4, average pool → 512, linear.
    The official pools with ``avg_pool2d(out, out.shape[-1])``: the same global
    average on the square maps it is meant for.
    """

    def __init__(
        self, num_classes: int, in_channels: int = 3, norm: NormFactory = group_norm_32
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = norm(64)
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            nn.Sequential(BasicBlock(c_in, c_out, stride, norm), BasicBlock(c_out, c_out, 1, norm))
            for c_in, c_out, stride in ((64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2))
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits B×num_classes of images B×C×H×W."""
        out = torch.relu(self.bn1(self.conv1(x)))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            out = stage(out)
        return self.linear(torch.flatten(self.pool(out), 1))


def resnet18(num_classes: int, in_channels: int = 3) -> nn.Module:
    """The paper's ResNet18: GroupNorm(32) after every convolution, as the official code."""
    return ResNet18Cifar(num_classes, in_channels, norm=group_norm_32)


def resnet18_bn(num_classes: int, in_channels: int = 3) -> nn.Module:
    """ResNet18 with BatchNorm after every convolution (not the paper's model)."""
    return ResNet18Cifar(num_classes, in_channels, norm=nn.BatchNorm2d)
