"""Transformers in capture: token-sequence layouts and reductions on torchvision's
VisionTransformer, structured outputs (tuples, dicts, ModelOutput-like) and their selectors,
and the forward pass that stops after the deepest probed site."""

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset
from torchvision.models import VisionTransformer

import engine
from engine.capture import discover_sites, layout_of
from engine.errors import LayerNotFoundError, ProbeEngineError, StoreMismatchError
from engine.reduce import CHANNELS_FIRST, TOKENS

BLOCKS = ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1"]


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return VisionTransformer(image_size=28, patch_size=7, num_layers=2, num_heads=2,
                             hidden_dim=16, mlp_dim=32, num_classes=3).eval()


@pytest.fixture(scope="module")
def images():
    gen = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(10, 3, 28, 28, generator=gen), torch.arange(10) % 3)


def _blocks_by_hand(vit, x):
    """Every encoder block's (B, 17, 16) output, computed without hooks."""
    with torch.no_grad():
        h = vit._process_input(x)
        h = torch.cat([vit.class_token.expand(len(x), -1, -1), h], dim=1)
        h = vit.encoder.dropout(h + vit.encoder.pos_embedding)
        out = []
        for block in vit.encoder.layers:
            h = block(h)
            out.append(h)
    return out


def test_vit_layouts(vit, images):
    x = images.tensors[0][:2]
    found = discover_sites(vit, ["", "conv_proj", *BLOCKS, "encoder.layers.encoder_layer_0.mlp.1",
                                 "heads.head"], ("output",), lambda: vit(x))
    layouts = {s.key: s.layout for s, _ in found}
    assert layouts == {"input": None, "conv_proj": CHANNELS_FIRST, BLOCKS[0]: TOKENS,
                       BLOCKS[1]: TOKENS, "encoder.layers.encoder_layer_0.mlp.1": TOKENS,
                       "heads.head": TOKENS}
    assert layout_of(vit, "encoder.ln") == TOKENS
    # a ReLU that follows a Conv1d takes its layout in firing order; alone it has none
    net = nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.ReLU())
    found = discover_sites(net, ["0", "1", "3"], ("output",), lambda: net(torch.randn(2, 2, 9)))
    assert [s.layout for s, _ in found] == [CHANNELS_FIRST, CHANNELS_FIRST, None]


@pytest.mark.parametrize("reduce", ["auto", "pool"])
def test_vit_blocks_are_pooled_over_tokens(vit, images, tmp_path, reduce):
    """The issue's check: a ViT block's pooled features equal a hand computation (mean over
    the 17 tokens, CLS = token 0), never a mean over the channels."""
    spec = reduce if reduce == "auto" else {BLOCKS[0]: "tokens:cls", BLOCKS[1]: "pool"}
    store = engine.build_store(vit, images, tmp_path / "s.zarr", layers=BLOCKS, reduce=spec,
                               dtype="float32", valid_size=0, batch_size=4, progress=False)
    h0, h1 = _blocks_by_hand(vit, images.tensors[0])
    want0 = h0.mean(1) if reduce == "auto" else h0[:, 0]
    np.testing.assert_allclose(store.read("train", BLOCKS[0]), want0.numpy(), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(store.read("train", BLOCKS[1]), h1.mean(1).numpy(), rtol=1e-5,
                               atol=1e-6)
    meta = {layer.name: layer for layer in store.meta.layers}
    assert meta[BLOCKS[1]].reduction == "tokens:mean" and meta[BLOCKS[1]].dim == 16
    assert meta[BLOCKS[0]].shape == (17, 16)


class _Output(OrderedDict):
    """What a transformers ModelOutput is to probe-engine: an ordered dict, also indexed
    by position through ``to_tuple``."""

    def to_tuple(self):
        return tuple(v for v in self.values() if v is not None)

    def __getitem__(self, k):
        return self.to_tuple()[k] if isinstance(k, int) else super().__getitem__(k)


class _Block(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind, self.lin = kind, nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        if self.kind == "tuple":
            return h, None, 2 * h
        if self.kind == "dict":
            return {"attn": (h > 0).long(), "hidden": h, "other": 2 * h}
        return _Output(last_hidden_state=h, pooler_output=3 * h)


@pytest.mark.parametrize("kind, select, factor", [
    ("tuple", None, 1), ("tuple", 2, 2), ("dict", None, 1), ("dict", "other", 2),
    ("output", None, 1), ("output", 1, 3), ("output", "pooler_output", 3)])
def test_structured_outputs_default_and_select(tmp_path, kind, select, factor):
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict([("blk", _Block(kind)), ("head", nn.Identity())]))
    data = TensorDataset(torch.randn(6, 4), torch.arange(6) % 2)
    store = engine.build_store(model, data, tmp_path / "s.zarr", layers=["blk"],
                               select=None if select is None else {"b*": select},
                               dtype="float32", valid_size=0, progress=False)
    with torch.no_grad():
        want = factor * model.blk.lin(data.tensors[0])
    np.testing.assert_allclose(store.read("train", "blk"), want.numpy(), rtol=1e-6)
    assert store.meta.layer("blk").select == select
    # the selector is part of what a resume must repeat
    if select is not None:
        with pytest.raises(StoreMismatchError, match="select"):
            engine.build_store(model, data, tmp_path / "s.zarr", layers=["blk"],
                               dtype="float32", valid_size=0, progress=False)


def test_select_errors_name_the_layer(tmp_path):
    model = nn.Sequential(OrderedDict([("blk", _Block("tuple"))]))
    data = TensorDataset(torch.randn(4, 4), torch.arange(4) % 2)
    kw = {"layers": ["blk"], "valid_size": 0, "progress": False}
    with pytest.raises(ProbeEngineError, match=r"select=1 names no tensor of the output of "
                                               r"layer 'blk'.*tuple\(Tensor\[2, 4\] float32, "
                                               r"None, Tensor"):
        engine.build_store(model, data, tmp_path / "a.zarr", select={"blk": 1}, **kw)
    with pytest.raises(LayerNotFoundError, match="select: key 'blok' matches no probed layer"):
        engine.build_store(model, data, tmp_path / "b.zarr", select={"blok": 0}, **kw)
    with pytest.raises(engine.InvalidArgumentError, match=r"select\['blk'\]"):
        engine.build_store(model, data, tmp_path / "c.zarr", select={"blk": 1.5}, **kw)
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b.zarr").exists()


class _Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x


def test_forward_stops_after_the_deepest_site(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), _Counter(), nn.Linear(8, 3))
    data = TensorDataset(torch.randn(40, 4), torch.arange(40) % 3)
    store = engine.build_store(model, data, tmp_path / "s.zarr", layers=["0", "1"],
                               batch_size=8, valid_size=0, dtype="float32", progress=False)
    # the site-finding pass only: neither the checking pass of the first rows nor any of the
    # 5 batches got there
    assert model[2].calls == 1
    with torch.no_grad():
        np.testing.assert_allclose(store.read("train", "1"),
                                   model[1](model[0](data.tensors[0])).numpy(), rtol=1e-6)
    # probing the last layer runs everything, every batch
    engine.build_store(model, data, tmp_path / "t.zarr", layers=["3"], batch_size=8,
                       valid_size=0, progress=False)
    assert model[2].calls == 1 + (1 + 1 + 5)
