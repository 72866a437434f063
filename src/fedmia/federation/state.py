"""A model's floating-point state as one flat vector.

FedAvg averages, subtracts and saves whole models; doing that on one contiguous
vector (instead of dicts of tensors) makes each of those one kernel. ``FlatState``
re-points a module's parameters and floating buffers (BatchNorm statistics) at
views of a single vector, so loading a model is one ``copy_`` and reading it is
one ``clone``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedmia.core.lazy import torch

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class Entry:
    """One tensor of the state: name in ``state_dict``, shape, offset and kind."""

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int
    is_param: bool

    @property
    def slice(self) -> slice:
        """Its range in the flat vector."""
        return slice(self.offset, self.offset + self.numel)


@dataclass(frozen=True)
class StateLayout:
    """Where each floating-point tensor of a model's state lives in the flat vector."""

    entries: tuple[Entry, ...]

    @property
    def size(self) -> int:
        """Length P of the flat vector."""
        return self.entries[-1].offset + self.entries[-1].numel if self.entries else 0

    def param_mask(self) -> torch.Tensor:
        """Bool P: True where the flat vector holds trainable parameters (not BN statistics)."""
        mask = torch.zeros(self.size, dtype=torch.bool)
        for e in self.entries:
            if e.is_param:
                mask[e.slice] = True
        return mask

    def to_list(self) -> list[dict]:
        """JSON-friendly form (saved next to the weights)."""
        return [
            dict(
                name=e.name,
                shape=list(e.shape),
                offset=e.offset,
                numel=e.numel,
                is_param=e.is_param,
            )
            for e in self.entries
        ]

    @classmethod
    def from_list(cls, items: list[dict]) -> StateLayout:
        """Inverse of :meth:`to_list`."""
        return cls(
            tuple(
                Entry(i["name"], tuple(i["shape"]), i["offset"], i["numel"], i["is_param"])
                for i in items
            )
        )


class FlatState:
    """Binds ``module``'s parameters and floating buffers to views of one vector ``flat``.

    After construction, ``flat`` (float32, P) *is* the model's state: training
    updates it in place, ``load(v)`` sets the model to ``v``.
    """

    def __init__(self, module: nn.Module) -> None:
        entries: list[Entry] = []
        tensors: list[torch.Tensor] = []
        offset = 0
        params = {id(p) for p in module.parameters()}
        for name, t in module.state_dict(keep_vars=True).items():
            if not t.is_floating_point():
                continue  # e.g. BatchNorm's num_batches_tracked: not averaged, not uploaded
            entries.append(Entry(name, tuple(t.shape), offset, t.numel(), id(t) in params))
            tensors.append(t.detach().reshape(-1))
            offset += t.numel()
        self.layout = StateLayout(tuple(entries))
        self.flat = torch.cat(tensors).to(torch.float32)
        for e in entries:
            owner_name, _, attr = e.name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            view = self.flat[e.slice].view(e.shape)
            if e.is_param:
                getattr(owner, attr).data = view
            else:
                owner._buffers[attr] = view
        self.module = module

    def load(self, vector: torch.Tensor) -> None:
        """Set the model's state to ``vector`` (P)."""
        self.flat.copy_(vector)

    def snapshot(self) -> torch.Tensor:
        """A copy of the current state (P)."""
        return self.flat.detach().clone()
