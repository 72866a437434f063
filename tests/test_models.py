from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedmia.core.config import TrainConfig
from fedmia.federation.defenses import Defense
from fedmia.federation.fedavg import run_fedavg
from fedmia.federation.models import MODELS, build_model, count_parameters
from fedmia.federation.state import FlatState
from test_fedavg import hand_round, tiny_data

STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))  # official ResNet18: channels, first stride


@pytest.mark.parametrize(
    "kind, classes, params",
    [
        ("alexnet", 100, 2_495_396),
        ("alexnet", 10, 2_472_266),
        ("resnet18", 100, 11_220_132),
        ("resnet18", 10, 11_173_962),
        ("resnet18_bn", 100, 11_220_132),
        ("resnet18_bn", 10, 11_173_962),
    ],
)
def test_parameter_counts(kind, classes, params):
    assert count_parameters(build_model(kind, classes, seed=0)) == params


@pytest.mark.parametrize("kind", ["alexnet", "resnet18", "resnet18_bn"])
@pytest.mark.parametrize("size", [32, 64])
def test_output_shapes_any_input_size(kind, size):
    model = build_model(kind, 23, seed=0).eval()
    assert model(torch.zeros(2, 3, size, size)).shape == (2, 23)


def test_alexnet_layers_match_the_cifar_variant():
    convs = [
        m for m in build_model("alexnet", 10, seed=0).modules() if isinstance(m, torch.nn.Conv2d)
    ]
    assert len(convs) == 5
    assert convs[0].kernel_size == (11, 11) and convs[0].stride == (4, 4)
    assert not any(
        isinstance(m, torch.nn.BatchNorm2d) for m in build_model("alexnet", 10, seed=0).modules()
    )


def official_resnet18_shapes(num_classes: int) -> list[tuple[str, tuple[int, ...]]]:
    """State-dict names and shapes of the official ``resnet_cifar.ResNet18``, in order."""

    def norm(name: str, c: int) -> list[tuple[str, tuple[int, ...]]]:
        return [(f"{name}.weight", (c,)), (f"{name}.bias", (c,))]

    out = [("conv1.weight", (64, 3, 3, 3)), *norm("bn1", 64)]
    c_in = 64
    for stage, (c, stride) in enumerate(STAGES, 1):
        for block in (0, 1):
            p = f"layer{stage}.{block}"
            out += [
                (f"{p}.conv1.weight", (c, c_in, 3, 3)),
                *norm(f"{p}.bn1", c),
                (f"{p}.conv2.weight", (c, c, 3, 3)),
                *norm(f"{p}.bn2", c),
            ]
            if block == 0 and (stride != 1 or c_in != c):
                out += [(f"{p}.shortcut.0.weight", (c, c_in, 1, 1)), *norm(f"{p}.shortcut.1", c)]
            c_in = c
    return out + [("linear.weight", (num_classes, 512)), ("linear.bias", (num_classes,))]


def official_resnet18_forward(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The official ResNet18's forward pass written out with ``F`` ops from a state dict.

    conv → GroupNorm(32, eps 1e-5) → ReLU stem; per block relu(gn(conv1)), gn(conv2),
    plus the identity or the 1×1-conv → GroupNorm shortcut, then ReLU;
    ``avg_pool2d(out, out.shape[-1])``, flatten, linear.
    """

    def gn(h: torch.Tensor, name: str) -> torch.Tensor:
        return F.group_norm(h, 32, sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-5)

    out = F.relu(gn(F.conv2d(x, sd["conv1.weight"], padding=1), "bn1"))
    for stage, (_, stride) in enumerate(STAGES, 1):
        for block, s in ((0, stride), (1, 1)):
            p = f"layer{stage}.{block}"
            h = F.relu(gn(F.conv2d(out, sd[f"{p}.conv1.weight"], stride=s, padding=1), f"{p}.bn1"))
            h = gn(F.conv2d(h, sd[f"{p}.conv2.weight"], padding=1), f"{p}.bn2")
            short = out
            if f"{p}.shortcut.0.weight" in sd:
                short = gn(F.conv2d(out, sd[f"{p}.shortcut.0.weight"], stride=s), f"{p}.shortcut.1")
            out = F.relu(h + short)
    out = F.avg_pool2d(out, out.shape[-1]).flatten(1)
    return F.linear(out, sd["linear.weight"], sd["linear.bias"])


def test_resnet18_is_the_official_groupnorm_resnet18():
    model = build_model("resnet18", 10, seed=0).eval()
    assert [(n, tuple(t.shape)) for n, t in model.state_dict().items()] == official_resnet18_shapes(
        10
    )  # no buffers: GroupNorm keeps no statistics
    norms = [m for m in model.modules() if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d))]
    assert len(norms) == 20  # stem, 2 per block × 8, 3 shortcuts
    assert all(
        isinstance(m, nn.GroupNorm) and m.num_groups == 32 and m.eps == 1e-5 and m.affine
        for m in norms
    )
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-trivial GroupNorm scales and shifts
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    sd = model.state_dict()
    for size in (32, 64):
        x = torch.randn(2, 3, size, size, generator=g)
        with torch.no_grad():
            torch.testing.assert_close(model(x), official_resnet18_forward(sd, x))


def test_resnet18_bn_is_the_same_network_with_batchnorm():
    model = build_model("resnet18_bn", 10, seed=0)
    params = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert params == official_resnet18_shapes(10)
    norms = [m for m in model.modules() if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d))]
    assert len(norms) == 20 and all(isinstance(m, nn.BatchNorm2d) for m in norms)
    assert sum(b.numel() for b in model.buffers() if b.is_floating_point()) == 9_600


def test_fedavg_round_with_the_groupnorm_resnet18_matches_hand_computed():
    model0 = build_model("resnet18", 3, seed=0)
    st = FlatState(copy.deepcopy(model0))
    assert all(e.is_param for e in st.layout.entries)  # GroupNorm: no buffers in the state
    assert st.layout.size == count_parameters(model0)
    data = tiny_data(12)  # 3×6×6 images, 3 classes
    client_idx = [torch.arange(0, 4), torch.arange(4, 10)]
    cfg = TrainConfig(rounds=1, local_epochs=1, batch_size=2, lr=0.05)
    expected = [
        hand_round(model0, data, idx, cfg, seed=1, rnd=1, client=c)
        for c, idx in enumerate(client_idx)
    ]
    (rec,) = run_fedavg(st, data, client_idx, torch.arange(10, 12), cfg, Defense(), seed=1)
    sent = model0.state_dict()
    final = st.module.state_dict()
    for e in st.layout.entries:
        for c in range(2):
            torch.testing.assert_close(
                rec.uploads[c, e.slice].view(e.shape),
                sent[e.name] - expected[c][e.name],
                rtol=1e-5,
                atol=1e-6,
            )
        want = (4 * expected[0][e.name] + 6 * expected[1][e.name]) / 10
        torch.testing.assert_close(final[e.name], want, rtol=1e-5, atol=1e-6)
    assert rec.uploads.abs().sum(1).min() > 0


def test_init_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_model("alexnet", 10, seed=5)
    after = torch.rand(1)
    b = build_model("alexnet", 10, seed=5)
    c = build_model("alexnet", 10, seed=6)
    assert torch.equal(before, after)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.classifier.weight, c.classifier.weight)


def test_unknown_model_names_the_choices():
    with pytest.raises(
        ValueError,
        match=r"unknown model 'vgg'; choose from "
        r"\['alexnet', 'resnet18', 'resnet18_bn'\]",
    ):
        MODELS.get("vgg")
