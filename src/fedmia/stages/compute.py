"""Where and how tensors are computed: the device and torch's CPU threads."""

from __future__ import annotations

import os

import torch


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when present, else CPU; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device '{name}' requested but CUDA is not available; set device: auto or cpu"
        )
    return dev


def setup_compute(
    device: str = "auto", threads: int | None = None, deterministic: bool = False
) -> torch.device:
    """Set torch's CPU threads (if given) and resolve ``device`` (see :func:`resolve_device`).

    ``deterministic`` makes CUDA runs repeatable: PyTorch's deterministic algorithms
    (``torch.use_deterministic_algorithms``; an operation without a deterministic
    version then raises instead of running) and cuBLAS's fixed workspace
    (``CUBLAS_WORKSPACE_CONFIG=:4096:8``, set before CUDA starts), and cuDNN's
    autotuner off. On the CPU every operation fedmia uses is deterministic already.
    """
    if threads:
        torch.set_num_threads(threads)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    return resolve_device(device)


def device_name(dev: torch.device) -> str:
    """``cpu`` or the CUDA device's name, for logs and benchmark output."""
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
