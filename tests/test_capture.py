"""Capture: module selection, site discovery and the hooked() context manager."""

from collections import OrderedDict

import pytest
import torch
from conftest import MNIST_SHAPES
from torch import nn
from torchvision.models import resnet18

from engine.capture import Site, discover_sites, hooked, is_auto_type, select_modules
from engine.errors import InvalidArgumentError, LayerNotFoundError, ProbeEngineError
from engine.models import mnist_convnet

AUTO = [
    "",
    "conv1_preact",
    "conv1_postact",
    "conv1_postpool",
    "conv2_preact",
    "conv2_postact",
    "conv2_postpool",
    "fc1_preact",
    "fc1_postact",
    "logits",
]
SHAPES = MNIST_SHAPES


@pytest.fixture(scope="module")
def convnet():
    torch.manual_seed(0)
    return mnist_convnet()


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return resnet18(weights=None)


def _hook_counts(model):
    attrs = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
             "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
             "_backward_hooks")
    return {(n, a): len(getattr(m, a)) for n, m in model.named_modules() for a in attrs}


def _training(model):
    return {n: m.training for n, m in model.named_modules()}


# -- select_modules ----------------------------------------------------------------------
def test_select_auto(convnet):
    assert select_modules(convnet, "auto") == AUTO
    assert select_modules(convnet, ["auto"]) == AUTO


def test_select_exact_names_in_registration_order(convnet):
    assert select_modules(convnet, "logits") == ["logits"]
    assert select_modules(convnet, ["logits", "conv1_preact", "flatten"]) == [
        "conv1_preact", "flatten", "logits"]
    # duplicates collapse
    assert select_modules(convnet, ["logits", "logits", "input", "input"]) == ["", "logits"]


def test_select_globs(convnet):
    assert select_modules(convnet, "conv1_*") == [
        "conv1_preact", "conv1_postact", "conv1_postpool"]
    assert select_modules(convnet, ["*_postpool", "conv?_preact"]) == [
        "conv1_preact", "conv1_postpool", "conv2_preact", "conv2_postpool"]
    assert select_modules(convnet, "fc1_[p]ostact") == ["fc1_postact"]
    # case-sensitive
    with pytest.raises(LayerNotFoundError):
        select_modules(convnet, "CONV*")


def test_select_types(convnet):
    assert select_modules(convnet, nn.ReLU) == ["conv1_postact", "conv2_postact", "fc1_postact"]
    assert select_modules(convnet, [nn.Linear, "input", nn.Flatten]) == [
        "", "flatten", "fc1_preact", "logits"]
    # subclasses match a base class
    assert select_modules(convnet, nn.modules.conv._ConvNd) == ["conv1_preact", "conv2_preact"]
    with pytest.raises(LayerNotFoundError, match="BatchNorm2d"):
        select_modules(convnet, nn.BatchNorm2d)


def test_select_input(convnet):
    assert select_modules(convnet, "input") == [""]


def test_select_unknown_name_suggests_closest(convnet):
    with pytest.raises(LayerNotFoundError) as ei:
        select_modules(convnet, "conv1_preakt")
    msg = str(ei.value)
    assert "'conv1_preakt'" in msg
    assert "closest: 'conv1_preact'" in msg
    assert isinstance(ei.value, KeyError) and isinstance(ei.value, ProbeEngineError)
    # the message is not repr-quoted as a plain KeyError's would be
    assert not msg.startswith('"')


def test_select_unknown_late_name_suggests_it(convnet):
    # fc1_postact is not among the first modules, so only a real suggestion names it
    with pytest.raises(LayerNotFoundError, match="closest: .*'fc1_postact'"):
        select_modules(convnet, "fc1_postakt")


def test_select_unknown_name_without_close_match_lists_modules(convnet):
    with pytest.raises(KeyError) as ei:
        select_modules(convnet, "zzzzzzzzzzzz")
    msg = str(ei.value)
    assert "closest" not in msg
    assert "10 modules" in msg and "'conv1_preact'" in msg


def test_select_unknown_among_valid_raises(convnet):
    with pytest.raises(LayerNotFoundError, match="nope"):
        select_modules(convnet, ["logits", "nope"])


def test_select_glob_matching_nothing(convnet):
    with pytest.raises(LayerNotFoundError, match=r"'layer\*'"):
        select_modules(convnet, "layer*")


@pytest.mark.parametrize("layers", [[], ()])
def test_select_empty(convnet, layers):
    with pytest.raises(LayerNotFoundError):
        select_modules(convnet, layers)


@pytest.mark.parametrize("layers", [int, [nn.ReLU, str]])
def test_select_non_module_type(convnet, layers):
    with pytest.raises(TypeError):
        select_modules(convnet, layers)


def test_select_non_string_item(convnet):
    with pytest.raises(TypeError):
        select_modules(convnet, ["logits", 3])


def test_select_nested_names(resnet):
    assert select_modules(resnet, "layer1.0.relu") == ["layer1.0.relu"]
    assert select_modules(resnet, "layer*.0.conv1") == [
        f"layer{i}.0.conv1" for i in range(1, 5)]
    auto = select_modules(resnet, "auto")
    assert auto[0] == ""
    assert "layer1.0.bn1" not in auto and "layer1" not in auto and "layer1.0" not in auto
    assert {"conv1", "relu", "maxpool", "layer1.0.conv1", "layer1.0.relu", "avgpool", "fc"} <= (
        set(auto))
    names = [n for n, _ in resnet.named_modules()]
    assert [names.index(n) for n in auto[1:]] == sorted(names.index(n) for n in auto[1:])


def test_is_auto_type():
    assert is_auto_type(nn.Conv1d(1, 1, 1)) and is_auto_type(nn.Linear(1, 1))
    assert is_auto_type(nn.GELU()) and is_auto_type(nn.AdaptiveAvgPool2d(1))
    assert is_auto_type(nn.MaxPool1d(2)) and is_auto_type(nn.Softmax(dim=1))
    assert not is_auto_type(nn.Flatten()) and not is_auto_type(nn.BatchNorm2d(2))
    assert not is_auto_type(nn.MultiheadAttention(4, 2)) and not is_auto_type(nn.Sequential())


# -- discover_sites ----------------------------------------------------------------------
def test_discover_convnet(convnet):
    x = torch.randn(2, 1, 28, 28)
    found = discover_sites(convnet, AUTO, ("output",), lambda: convnet(x))
    keys = [s.key for s, _ in found]
    assert keys == ["input", *AUTO[1:]]
    for site, shape in found:
        assert shape == SHAPES[site.key], site.key
        assert site.side == ("input" if site.key == "input" else "output")
        assert site.module == ("" if site.key == "input" else site.key)
        assert site.call == 0


def test_discover_convnet_both_sides(convnet):
    x = torch.randn(3, 1, 28, 28)
    found = discover_sites(convnet, ["", "conv2_preact", "flatten"], ("input", "output"),
                           lambda: convnet(x))
    assert [(s.key, s.module, s.side, shape) for s, shape in found] == [
        ("input", "", "input", (1, 28, 28)),
        ("conv2_preact:input", "conv2_preact", "input", (32, 14, 14)),
        ("conv2_preact", "conv2_preact", "output", (64, 14, 14)),
        ("flatten:input", "flatten", "input", (64, 7, 7)),
        ("flatten", "flatten", "output", (3136,)),
    ]


def test_discover_rejects_bad_sides(convnet):
    x = torch.randn(1, 1, 28, 28)
    for sides in ("outputs", (), ("input", "both")):
        with pytest.raises(InvalidArgumentError, match="sites"):
            discover_sites(convnet, ["logits"], sides, lambda: convnet(x))


def test_discover_reused_module(resnet):
    x = torch.randn(2, 3, 64, 64)
    found = discover_sites(resnet, ["layer1.0.relu"], ("output",), lambda: resnet(x))
    assert [(s.key, s.call, shape) for s, shape in found] == [
        ("layer1.0.relu", 0, (64, 16, 16)), ("layer1.0.relu:1", 1, (64, 16, 16))]
    found = discover_sites(resnet, ["layer1.0.relu"], "input", lambda: resnet(x))
    assert [(s.key, s.side, s.call) for s, _ in found] == [
        ("layer1.0.relu:input", "input", 0), ("layer1.0.relu:input:1", "input", 1)]


def test_discover_call_counter_resets_per_forward(resnet):
    x = torch.randn(2, 3, 64, 64)
    seen = []

    def two_forwards():
        resnet(x)
        resnet(x)

    with hooked(resnet, ["layer1.0.relu"], ("output",), lambda s, t: seen.append(s.key)):
        two_forwards()
    assert seen == ["layer1.0.relu", "layer1.0.relu:1"] * 2
    found = discover_sites(resnet, ["layer1.0.relu"], ("output",), two_forwards)
    assert [s.key for s, _ in found] == ["layer1.0.relu", "layer1.0.relu:1"]


class _Skip(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)

    def forward(self, x):
        return self.used(x)


def test_discover_module_that_never_runs():
    model = _Skip()
    x = torch.randn(2, 4)
    with pytest.raises(LayerNotFoundError) as ei:
        discover_sites(model, ["used", "unused"], ("output",), lambda: model(x))
    msg = str(ei.value)
    assert "'unused'" in msg and "'used'" not in msg
    assert _hook_counts(model) == _hook_counts(_Skip())


class _Tuple(nn.Module):
    def forward(self, x):
        return x, x * 2


def test_tuple_output_gives_its_first_tensor():
    model = nn.Sequential(OrderedDict([("lin", nn.Linear(3, 3)), ("pair", _Tuple())]))
    x = torch.randn(2, 3)
    seen = []
    with hooked(model, ["pair"], ("output",), lambda s, t: seen.append(t.clone())):
        model(x)
    torch.testing.assert_close(seen[0], model.lin(x), rtol=0, atol=0)
    # select picks another element; its input side is a tensor and fine
    seen.clear()
    with hooked(model, ["pair"], ("output",), lambda s, t: seen.append(t.clone()), {"pair": 1}):
        model(x)
    torch.testing.assert_close(seen[0], 2 * model.lin(x), rtol=0, atol=0)
    found = discover_sites(model, ["pair"], ("input",), lambda: model(x))
    assert [(s.key, shape) for s, shape in found] == [("pair:input", (3,))]


def test_output_without_a_tensor_names_the_layer_and_structure():
    class Nothing(nn.Module):
        def forward(self, x):
            return None, "x"

    model = nn.Sequential(OrderedDict([("lin", nn.Linear(3, 3)), ("none", Nothing())]))
    before = _hook_counts(model)
    with pytest.raises(ProbeEngineError, match=r"layer 'none' is tuple\(None, str\)"):
        discover_sites(model, ["none"], ("output",), lambda: model(torch.randn(2, 3)))
    assert _hook_counts(model) == before


def test_dict_model_input():
    class DictIn(nn.Module):
        def forward(self, batch):
            return batch["x"] * 2

    model = DictIn()
    found = discover_sites(model, [""], ("output",), lambda: model({"x": torch.ones(2, 3)}))
    assert [(s.key, shape) for s, shape in found] == [("input", (3,))]
    ids = {"input_ids": torch.ones(2, 3, dtype=torch.long)}
    with pytest.raises(ProbeEngineError, match="model input is dict.*no floating-point"):
        discover_sites(model, [""], ("output",), lambda: model(ids))


def test_keyword_model_input():
    class KwIn(nn.Module):
        def forward(self, x):
            return x + 1

    model = KwIn()
    found = discover_sites(model, [""], ("output",), lambda: model(x=torch.ones(2, 5)))
    assert [(s.key, shape) for s, shape in found] == [("input", (5,))]


@pytest.mark.parametrize("name", ["a/b", "__hidden", "/abs", "a\x00b", "a\nb", "a\\b"])
@pytest.mark.parametrize("sides", [("output",), ("input",)])
def test_keys_that_cannot_name_zarr_arrays(name, sides):
    model = nn.Sequential()
    model.add_module(name, nn.ReLU())
    assert select_modules(model, name) == [name]
    x = torch.randn(2, 3)
    with pytest.raises(ProbeEngineError, match="cannot name an array inside the store") as ei:
        discover_sites(model, [name], sides, lambda: model(x))
    assert repr(name)[1:-1] in str(ei.value)  # named as Python writes it (NUL as \x00)


def test_colliding_keys():
    # a module literally named "a:input" collides with the input side of "a"
    model = nn.Sequential()
    model.add_module("a", nn.ReLU())
    model.add_module("a:input", nn.ReLU())
    x = torch.randn(2, 3)
    with pytest.raises(ProbeEngineError, match="a:input"):
        discover_sites(model, ["a", "a:input"], ("input", "output"), lambda: model(x))
    # output side only: keys "a" and "a:input" are distinct
    found = discover_sites(model, ["a", "a:input"], ("output",), lambda: model(x))
    assert [s.key for s, _ in found] == ["a", "a:input"]


def test_module_named_input_collides_with_model_input():
    model = nn.Sequential(OrderedDict([("input", nn.Linear(3, 3))]))
    x = torch.randn(2, 3)
    assert select_modules(model, "input") == [""]
    with pytest.raises(ProbeEngineError, match="'input'"):
        discover_sites(model, ["", *select_modules(model, nn.Linear)], ("output",),
                       lambda: model(x))


# -- hooked ------------------------------------------------------------------------------
def _mixed_modes(model):
    model.train()
    for i, (_, m) in enumerate(model.named_modules()):
        m.training = i % 3 != 0
    return _training(model)


def test_hooked_outputs_unchanged_and_state_restored(resnet):
    x = torch.randn(2, 3, 64, 64)
    before_hooks = _hook_counts(resnet)
    modes = _mixed_modes(resnet)
    assert len(set(modes.values())) == 2
    resnet.eval()
    with torch.no_grad():
        ref = resnet(x)
    modes = _mixed_modes(resnet)
    modules = select_modules(resnet, ["auto", "bn1", "layer*.*.bn*"])
    records = []

    def sink(site, t):
        records.append((site, t.detach().clone()))

    with torch.no_grad(), hooked(resnet, modules, ("input", "output"), sink):
        assert not any(m.training for m in resnet.modules())  # put in eval mode
        assert _hook_counts(resnet) != before_hooks
        out = resnet(x)
    assert torch.equal(out, ref)
    assert _training(resnet) == modes
    assert _hook_counts(resnet) == before_hooks
    keys = [s.key for s, _ in records]
    assert len(keys) == len(set(keys))
    assert keys[0] == "input" and keys[-1] == "fc"
    got = dict((s.key, t) for s, t in records)
    assert torch.equal(got["input"], x)
    assert torch.equal(got["fc"], ref)
    # in-place ReLU after bn1: the captured bn1 output is the pre-ReLU value
    resnet.eval()
    with torch.no_grad():
        bn1 = resnet.bn1(resnet.conv1(x))
    assert (got["bn1"] < 0).any()
    torch.testing.assert_close(got["bn1"], bn1)
    torch.testing.assert_close(got["relu"], bn1.clamp_min(0))
    torch.testing.assert_close(got["relu:input"], bn1)
    # with no hooks left, a forward records nothing more
    n = len(records)
    with torch.no_grad():
        resnet(x)
    assert len(records) == n


def test_hooked_keeps_user_hooks(convnet):
    fired = []
    h1 = convnet.conv1_postact.register_forward_hook(lambda m, a, o: fired.append("post"))
    h2 = convnet.register_forward_pre_hook(lambda m, a: fired.append("pre"))
    try:
        before = _hook_counts(convnet)
        with hooked(convnet, AUTO, ("output",), lambda s, t: None):
            convnet(torch.randn(1, 1, 28, 28))
        assert fired == ["pre", "post"]
        assert _hook_counts(convnet) == before
        convnet(torch.randn(1, 1, 28, 28))
        assert fired == ["pre", "post"] * 2
    finally:
        h1.remove()
        h2.remove()


class _Boom(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom in forward")


def _boom_model():
    return nn.Sequential(OrderedDict([
        ("conv", nn.Conv2d(1, 2, 3)),
        ("act", nn.ReLU()),
        ("block", nn.Sequential(OrderedDict([("bn", nn.BatchNorm2d(2)), ("boom", _Boom())]))),
        ("fc", nn.Linear(2, 2)),
    ]))


@pytest.mark.parametrize("sides", [("output",), ("input", "output")])
def test_hooked_restores_when_forward_raises(sides):
    model = _boom_model()
    before = _hook_counts(model)
    modes = _mixed_modes(model)
    seen = []
    with pytest.raises(RuntimeError, match="boom in forward"):
        with hooked(model, ["", "conv", "act", "block.boom", "fc"], sides,
                    lambda s, t: seen.append(s.key)):
            model(torch.randn(2, 1, 5, 5))
    expected = ["input", "conv", "act"]
    if "input" in sides:
        expected = ["input", "conv:input", "conv", "act:input", "act", "block.boom:input"]
    assert seen == expected
    assert _training(model) == modes
    assert _hook_counts(model) == before


def test_hooked_restores_when_sink_raises():
    model = _boom_model()
    before = _hook_counts(model)
    modes = _mixed_modes(model)

    def sink(site, t):
        if site.key == "act":
            raise ValueError("sink failed")

    with pytest.raises(ValueError, match="sink failed"):
        with hooked(model, ["conv", "act"], ("output",), sink):
            model(torch.randn(2, 1, 5, 5))
    assert _training(model) == modes
    assert _hook_counts(model) == before


def test_hooked_restores_when_body_raises_outside_forward(convnet):
    before = _hook_counts(convnet)
    modes = _mixed_modes(convnet)
    with pytest.raises(KeyboardInterrupt):
        with hooked(convnet, AUTO, ("input", "output"), lambda s, t: None):
            raise KeyboardInterrupt
    assert _training(convnet) == modes
    assert _hook_counts(convnet) == before


def test_hooked_unknown_module_cleans_up(convnet):
    before = _hook_counts(convnet)
    modes = _mixed_modes(convnet)
    with pytest.raises(KeyError):
        with hooked(convnet, ["conv1_preact", "nope"], ("output",), lambda s, t: None):
            pass  # pragma: no cover
    assert _hook_counts(convnet) == before
    assert _training(convnet) == modes


def test_hooked_model_input_hooked_regardless_of_sides(convnet):
    sites = []
    x = torch.randn(2, 1, 28, 28)
    with hooked(convnet, ["", "logits"], ("output",), lambda s, t: sites.append(s)):
        convnet(x)
    assert sites == [Site("input", "", "input", 0), Site("logits", "logits", "output", 0)]
    sites.clear()
    with hooked(convnet, ["", "logits"], ("input",), lambda s, t: sites.append(s)):
        convnet(x)
    assert sites == [Site("input", "", "input", 0),
                     Site("logits:input", "logits", "input", 0)]


def test_hooked_rejects_bad_sides(convnet):
    before = _hook_counts(convnet)
    with pytest.raises(InvalidArgumentError):
        with hooked(convnet, ["logits"], ("middle",), lambda s, t: None):
            pass  # pragma: no cover
    assert _hook_counts(convnet) == before
