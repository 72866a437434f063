"""Defenses: transforms of what a client trains on or uploads.

A defense hooks into three points of a client's round (see :class:`Defense`):
which local samples it trains on, what each mini-batch looks like (inputs and
soft targets), and what update it uploads. The server, and so the attacker, sees
only the uploaded update. Defenses are registered by name; the ``defenses``
block of the config names a kind and its strength.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from fedmia.config import ConfigError, DefenseConfig
from fedmia.registry import Registry
from fedmia.state import StateLayout


class Defense:
    """No defense; base class whose hooks each defense overrides as needed."""

    #: True if :meth:`batch` may return soft targets (B×num_classes) instead of labels.
    soft_targets: bool = False

    def local_indices(self, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Indices (n) of the client's samples it trains on this round."""
        return idx

    def batch(
        self, x: torch.Tensor, y: torch.Tensor, num_classes: int, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Transform a batch: images B×C×H×W (normalised float), labels B (int64).

        Returns the inputs fed to the model and the targets of the loss: int64
        labels B, or probabilities B×num_classes when ``soft_targets``.
        """
        return x, y

    def upload(
        self, update: torch.Tensor, layout: StateLayout, gen: torch.Generator
    ) -> torch.Tensor:
        """The update the client uploads, from its true update ``w_global − w_local`` (P)."""
        return update


DefenseFactory = Callable[[Mapping[str, Any]], Defense]
DEFENSES: Registry[DefenseFactory] = Registry("defense")


@DEFENSES.register("none")
def _none(params: Mapping[str, Any]) -> Defense:
    if params:
        raise ConfigError(f"defense 'none' takes no parameters (got {sorted(params)})")
    return Defense()


def build_defense(cfg: DefenseConfig, where: str = "defense") -> Defense:
    """Instantiate ``cfg``; unknown kinds and bad parameters raise ``ConfigError``."""
    try:
        factory = DEFENSES.get(cfg.kind)
    except ValueError as e:
        raise ConfigError(f"{where}.kind: {e}") from None
    try:
        return factory(cfg.params)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
