"""What must hold on a CUDA device: the same measures as on the CPU, repeatable training.

Every test is marked ``cuda``: it skips without a CUDA device, and fails instead where
``FEDMIA_REQUIRE_CUDA=1`` (``bench/gpu_check.py`` runs them so on a GPU machine).
"""

from __future__ import annotations

import copy

import pytest
import torch

from fedmia.attacker.measures import compute_round_measures, per_sample_grad_products
from fedmia.core.config import TrainConfig
from fedmia.federation.defenses import Defense
from fedmia.federation.fedavg import DeviceData, run_fedavg
from fedmia.federation.models import build_model
from fedmia.federation.state import FlatState
from fedmia.stages.compute import setup_compute

pytestmark = pytest.mark.cuda

MEASURES = ("loss", "cos", "grad_diff", "grad_norm", "confidence")


def close(got: torch.Tensor, want: torch.Tensor, what: str, rtol: float = 1e-4) -> None:
    """Equal up to float32 rounding of the scale of the largest value (as the CPU tests)."""
    torch.testing.assert_close(
        got.double(), want.double(), rtol=rtol, atol=rtol * want.abs().max().item(), msg=what
    )


@pytest.mark.parametrize("kind", ["alexnet", "resnet18"])
def test_measures_on_cuda_equal_the_cpu_ones(kind):
    """The layer-wise route on the GPU gives the CPU's measures (and torch.func's)."""
    g = torch.Generator().manual_seed(0)
    model = build_model(kind, 10, seed=0)
    x, y = torch.randn(12, 3, 32, 32, generator=g), torch.randint(0, 10, (12,), generator=g)
    results = {}
    for device in ("cpu", "cuda"):
        state = FlatState(copy.deepcopy(model).to(device))
        w = state.snapshot()
        uploads = 1e-2 * torch.randn(3, w.numel(), generator=g.manual_seed(1)).to(device)
        results[device] = compute_round_measures(
            state, w, uploads, x.to(device), y.to(device), chunk_size=5, batch_size=7
        )
        assert results[device].cos.device.type == "cpu"
    reference = None
    for name in MEASURES:
        close(getattr(results["cuda"], name), getattr(results["cpu"], name), name)
    assert torch.equal(results["cuda"].correct, results["cpu"].correct) or reference is None
    state = FlatState(copy.deepcopy(model).to("cuda"))
    w = state.snapshot()
    uploads = 1e-2 * torch.randn(3, w.numel(), generator=g.manual_seed(1)).to("cuda")
    func = compute_round_measures(
        state,
        w,
        uploads,
        x.cuda(),
        y.cuda(),
        chunk_size=5,
        batch_size=7,
        grad_products=per_sample_grad_products,
    )
    for name in ("cos", "grad_diff", "grad_norm"):
        close(getattr(results["cuda"], name), getattr(func, name), f"{name} vs torch.func")


def fedavg_round_on_cuda(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rounds of FedAvg on the GPU: the final model and the last uploads."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (80, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (80,), generator=g)
    data = DeviceData.from_arrays(
        images, labels, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 10, torch.device("cuda")
    )
    client_idx = [torch.arange(0, 30, device="cuda"), torch.arange(30, 60, device="cuda")]
    cfg = TrainConfig(rounds=2, batch_size=10, test_every=1, observe_every=1, observe_rounds=())
    state = FlatState(build_model("alexnet", 10, seed=seed).to("cuda"))
    uploads = None
    for rec in run_fedavg(
        state, data, client_idx, torch.arange(60, 80, device="cuda"), cfg, Defense(), seed
    ):
        assert not rec.diverged
        uploads = rec.uploads.clone()
    return state.snapshot().cpu(), uploads.cpu()


def test_deterministic_fedavg_on_cuda_repeats_bit_for_bit():
    setup_compute("cuda", deterministic=True)
    try:
        first, second = fedavg_round_on_cuda(3), fedavg_round_on_cuda(3)
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], fedavg_round_on_cuda(4)[0])  # the seed matters
