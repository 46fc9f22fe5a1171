import pytest
import torch
from conftest import MNIST_SHAPES
from torch import nn

import engine
from engine.models import SkipMLP, mnist_convnet, train

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


def test_skip_mlp_shapes_sites_and_the_skip():
    torch.manual_seed(0)
    model = SkipMLP(depth=12, width=16, skip=(0, 6), in_features=20, num_classes=3)
    x = torch.randn(5, 4, 5)
    assert model(x).shape == (5, 3)
    names = [name for name, _ in model.named_modules()]
    assert [f"layers.{k}" for k in range(12)] + ["logits"] == [
        n for n in names if n.count(".") == 1 and n.startswith("layers") or n == "logits"]
    seen = {}
    for k in (0, 5, 6):
        model.layers[k].register_forward_hook(
            lambda mod, args, out, k=k: seen.update({k: (args[0], out)}))
    model(x)
    torch.testing.assert_close(seen[6][0], seen[0][1] + seen[5][1])  # layer 6 gets 0's output
    assert len(seen) == 3
    with pytest.raises(engine.InvalidArgumentError, match="skip"):
        SkipMLP(depth=8, skip=(4, 4))


def test_skip_mlp_init_gain():
    torch.manual_seed(0)
    model = SkipMLP(depth=4, width=512, skip=(0, 2), gain=1.3)
    w = model.layers[1][0].weight
    assert float(w.detach().std()) == pytest.approx(1.3 / 512**0.5, rel=0.02)


def test_train_with_sgd_clipping_and_a_checkpoint_per_epoch():
    from engine.datasets import ArrayDataset

    torch.manual_seed(0)
    x = torch.randn(64, 1, 4, 4)
    y = (x.flatten(1).sum(1) > 0).long()
    data = ArrayDataset(x, y, ["neg", "pos"], mean=None, std=None)
    model = SkipMLP(depth=3, width=8, skip=(0, 2), in_features=16, num_classes=2)
    seen = []
    losses = train(model, data, epochs=3, lr=0.1, optimizer="sgd", clip_grad_norm=0.5,
                   batch_size=16, progress=False,
                   on_epoch=lambda epoch, m: seen.append((epoch, m.training)))
    assert seen == [(1, False), (2, False), (3, False)]  # checkpoints in eval mode
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert not model.training
    with pytest.raises(engine.InvalidArgumentError, match="optimizer"):
        train(model, data, optimizer="lbfgs")
