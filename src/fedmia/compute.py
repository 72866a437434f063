"""Where and how tensors are computed: the device and torch's CPU threads."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when present, else CPU; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device '{name}' requested but CUDA is not available; "
                           "set device: auto or cpu")
    return dev


def setup_compute(device: str = "auto", threads: int | None = None) -> torch.device:
    """Set torch's CPU threads (if given) and resolve ``device`` (see :func:`resolve_device`)."""
    if threads:
        torch.set_num_threads(threads)
    return resolve_device(device)


def device_name(dev: torch.device) -> str:
    """``cpu`` or the CUDA device's name, for logs and benchmark output."""
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
