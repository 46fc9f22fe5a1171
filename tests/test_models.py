import pytest
import torch
from conftest import MNIST_SHAPES
from torch import nn

from engine.models import mnist_convnet

NAMES = [
    "conv1_preact",
    "conv1_postact",
    "conv1_postpool",
    "conv2_preact",
    "conv2_postact",
    "conv2_postpool",
    "flatten",
    "fc1_preact",
    "fc1_postact",
    "logits",
]
TYPES = [nn.Conv2d, nn.ReLU, nn.MaxPool2d] * 2 + [nn.Flatten, nn.Linear, nn.ReLU, nn.Linear]


def test_child_names_and_types():
    model = mnist_convnet()
    assert isinstance(model, nn.Sequential)
    assert [name for name, _ in model.named_children()] == NAMES
    assert [type(m) for m in model.children()] == TYPES
    assert not any(getattr(m, "inplace", False) for m in model.modules())


@pytest.mark.parametrize("batch", [1, 3])
def test_shapes(batch):
    torch.manual_seed(0)
    model = mnist_convnet().eval()
    expected = MNIST_SHAPES
    x = torch.randn(batch, 1, 28, 28)
    out = model(x)
    assert out.shape == (batch, 10)
    h = x
    for name, module in model.named_children():
        h = module(h)
        assert h.shape == (batch, *expected[name]), name
    torch.testing.assert_close(h, out)


def test_parameter_count():
    expected = (5 * 5 * 1 * 32 + 32) + (5 * 5 * 32 * 64 + 64) + (3136 * 512 + 512) + (512 * 10 + 10)
    assert sum(p.numel() for p in mnist_convnet().parameters()) == expected == 1_663_370


def test_options_and_seeding():
    model = mnist_convnet(num_classes=7, in_channels=3)
    assert model(torch.zeros(2, 3, 28, 28)).shape == (2, 7)
    torch.manual_seed(1)
    a = mnist_convnet().state_dict()
    torch.manual_seed(1)
    b = mnist_convnet().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
