"""The paper's CIFAR model variants, by name.

===========  ==========================================  ==========================
name         architecture                                trainable parameters
                                                         (10 / 100 classes)
===========  ==========================================  ==========================
alexnet      5 convs (11×11/4, 5×5, 3×3 ×3), ReLU, max-  2,472,266 / 2,495,396
             pools, global max pool, one linear layer
resnet18     3×3 stem, no max pool, 4×2 BasicBlocks,     11,173,962 / 11,220,132
             GroupNorm(32) after every convolution
             (stem, blocks, shortcuts), global average
             pool, linear: the official ``ResNet18``
resnet18_bn  the same with BatchNorm (eval-mode running  11,173,962 / 11,220,132
             statistics: 9,600 more floats of state,     (+ 9,600 buffer floats)
             not trainable)
===========  ==========================================  ==========================

GroupNorm and BatchNorm both carry a scale and a shift per channel, hence the
equal counts. All end in a global pool, so they accept any input size
(Dermnet's 64×64 too) with the same parameter count (checked at 3×32×32 and
3×64×64).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from fedmia.core.lazy import torch
from fedmia.core.registry import Registry

if TYPE_CHECKING:
    from torch import nn

ModelFactory = Callable[[int, int], "nn.Module"]
#: The model kinds (``models.<key>.kind``): each registered with the dotted path of its
#: factory ``(num_classes, in_channels) → nn.Module`` (``impl``; the parse never imports
#: torch) and its cost: ``samples_per_s``, a deliberately low estimate of training samples
#: per second per job (``gpu``: an older data-centre card; ``cpu``: one busy core, measured
#: here), and ``parameters``, its trainable parameters at 100 classes — the cluster's
#: resource estimates (:func:`fedmia.workflow.estimate_resources`).
MODELS: Registry[ModelFactory] = Registry("model")

MODELS.register(
    "alexnet",
    impl="fedmia.federation.nets:alexnet",
    samples_per_s={"gpu": 10_000, "cpu": 500},
    parameters=2_495_396,
)
MODELS.register(
    "resnet18",
    impl="fedmia.federation.nets:resnet18",
    samples_per_s={"gpu": 2_000, "cpu": 60},
    parameters=11_220_132,
)
MODELS.register(
    "resnet18_bn",
    impl="fedmia.federation.nets:resnet18_bn",
    samples_per_s={"gpu": 2_000, "cpu": 60},
    parameters=11_220_132,
)


def build_model(kind: str, num_classes: int, in_channels: int = 3, *, seed: int) -> nn.Module:
    """Instantiate model ``kind`` with weights initialised from ``seed`` (on the CPU)."""
    factory = MODELS.get(kind)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory(num_classes, in_channels)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
