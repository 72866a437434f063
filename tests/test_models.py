from __future__ import annotations

import pytest
import torch

from fedmia.models import MODELS, build_model, count_parameters


@pytest.mark.parametrize("kind, classes, params", [
    ("alexnet", 100, 2_495_396), ("alexnet", 10, 2_472_266),
    ("resnet18", 100, 11_220_132), ("resnet18", 10, 11_173_962),
])
def test_parameter_counts(kind, classes, params):
    assert count_parameters(build_model(kind, classes, seed=0)) == params


@pytest.mark.parametrize("kind", ["alexnet", "resnet18"])
@pytest.mark.parametrize("size", [32, 64])
def test_output_shapes_any_input_size(kind, size):
    model = build_model(kind, 23, seed=0).eval()
    assert model(torch.zeros(2, 3, size, size)).shape == (2, 23)


def test_alexnet_layers_match_the_cifar_variant():
    convs = [m for m in build_model("alexnet", 10, seed=0).modules()
             if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 5
    assert convs[0].kernel_size == (11, 11) and convs[0].stride == (4, 4)
    assert not any(isinstance(m, torch.nn.BatchNorm2d)
                   for m in build_model("alexnet", 10, seed=0).modules())


def test_resnet18_has_3x3_stem_and_batchnorm():
    m = build_model("resnet18", 10, seed=0)
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert not any(isinstance(x, torch.nn.MaxPool2d) for x in m.modules())
    assert sum(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules()) == 20


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
    with pytest.raises(ValueError,
                       match=r"unknown model 'vgg'; choose from \['alexnet', 'resnet18'\]"):
        MODELS.get("vgg")
