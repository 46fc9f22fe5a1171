"""Reductions: spec parsing, resolution (incl. "auto") and application, checked against
independent torch computations."""

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import ProbeEngineError
from engine.reduce import (
    CHANNELS_FIRST,
    TOKENS,
    Reduction,
    ReductionError,
    parse_reduction,
    resolve_reduction,
)

KW = {"key": "layer", "max_features": 8192, "seed": 0}


def _randn(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


# -- parse_reduction ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("none", ("none", ())),
        ("pool", ("pool", ())),
        ("auto", ("auto", ())),
        ("pool:4x4", ("pool", (4, 4))),
        ("pool:7x3", ("pool", (7, 3))),
        ("pool:1x1", ("pool", (1, 1))),
        ("subsample:10", ("subsample", (10,))),
        ("subsample:1", ("subsample", (1,))),
    ],
)
def test_parse_valid(spec, expected):
    assert parse_reduction(spec) == expected


@pytest.mark.parametrize(
    "spec",
    ["pool:0x3", "pool:3x0", "subsample:0", "mean", "pool:4", "pool:x4", "subsample:",
     "subsample:-3", "pool:-1x2", "POOL", " none", "none ", "", "subsample:1.5"],
)
def test_parse_invalid_strings(spec):
    with pytest.raises(ReductionError) as ei:
        parse_reduction(spec)
    assert repr(spec) in str(ei.value)


@pytest.mark.parametrize("spec", [5, None, 4.0, ("pool",), b"pool"])
def test_parse_non_string(spec):
    with pytest.raises(ReductionError) as ei:
        parse_reduction(spec)
    assert repr(spec) in str(ei.value)


def test_reduction_error_hierarchy():
    assert issubclass(ReductionError, ProbeEngineError)
    assert issubclass(ReductionError, ValueError)
    with pytest.raises(ValueError):
        parse_reduction("mean")
    with pytest.raises(ProbeEngineError):
        resolve_reduction("mean", (3, 4, 4), **KW)


def test_reduction_constructor_rejects_bad_spec():
    with pytest.raises(ReductionError):
        Reduction("pool:0x0", (3, 4, 4), 0)


# -- "none" / "pool" / "pool:HxW" against independent computations ---------------------
@pytest.mark.parametrize("shape", [(7,), (3, 5), (4, 6, 6), (2, 3, 4, 5)])
def test_none_is_flatten(shape):
    r = resolve_reduction("none", shape, **KW)
    assert (r.spec, r.kind, r.params, r.in_shape, r.dim) == ("none", "none", (), shape,
                                                               math.prod(shape))
    assert r.indices is None
    t = _randn(3, *shape)
    out = r(t)
    assert out.shape == (3, r.dim)
    assert torch.equal(out, t.reshape(3, -1))


def test_pool_4d_is_spatial_mean():
    r = resolve_reduction("pool", (8, 6, 5), **KW)
    assert (r.spec, r.dim, r.in_shape) == ("pool", 8, (8, 6, 5))
    t = _randn(4, 8, 6, 5)
    out = r(t)
    assert out.shape == (4, 8)
    torch.testing.assert_close(out, t.mean(dim=(2, 3)))
    # a per-channel value must come from that channel only
    t2 = t.clone()
    t2[:, 3] += 100.0
    diff = r(t2) - out
    torch.testing.assert_close(diff[:, 3], torch.full((4,), 100.0))
    assert torch.all(diff[:, [0, 1, 2, 4, 5, 6, 7]].abs() < 1e-4)


def test_pool_3d_is_sequence_mean():
    r = resolve_reduction("pool", (5, 11), **KW)
    assert (r.spec, r.dim) == ("pool", 5)
    t = _randn(3, 5, 11)
    torch.testing.assert_close(r(t), t.mean(dim=2))


def test_pool_5d_is_mean_over_all_trailing_axes():
    r = resolve_reduction("pool", (3, 2, 4, 5), **KW)
    assert r.dim == 3
    t = _randn(2, 3, 2, 4, 5)
    torch.testing.assert_close(r(t), t.mean(dim=(2, 3, 4)))


@pytest.mark.parametrize(
    ("shape", "grid"),
    [
        ((32, 28, 28), (7, 7)),  # exact: avg_pool2d fast path
        ((32, 28, 28), (14, 14)),
        ((32, 28, 28), (5, 5)),  # not dividing: adaptive path
        ((4, 28, 21), (7, 3)),  # exact, non-square
        ((4, 13, 10), (4, 3)),  # not dividing, non-square
        ((4, 12, 10), (4, 3)),  # h divides, w does not
        ((3, 9, 9), (1, 1)),
        ((3, 9, 9), (9, 9)),
    ],
)
def test_pool_grid_matches_adaptive_avg_pool(shape, grid):
    spec = f"pool:{grid[0]}x{grid[1]}"
    r = resolve_reduction(spec, shape, **KW)
    assert (r.spec, r.kind, r.params) == (spec, "pool", grid)
    assert r.dim == shape[0] * grid[0] * grid[1]
    t = _randn(3, *shape)
    out = r(t)
    assert out.shape == (3, r.dim)
    expected = F.adaptive_avg_pool2d(t, grid).reshape(3, -1)
    torch.testing.assert_close(out, expected)


def test_pool_grid_exact_windows_by_hand():
    # 4x4 map -> 2x2 grid: every output is the mean of one 2x2 block.
    t = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    r = resolve_reduction("pool:2x2", (1, 4, 4), **KW)
    out = r(t)
    blocks = t.reshape(2, 1, 2, 2, 2, 2).mean(dim=(3, 5)).reshape(2, 4)
    torch.testing.assert_close(out, blocks)
    assert out[0].tolist() == [2.5, 4.5, 10.5, 12.5]


def test_pool_non_contiguous_input():
    r = resolve_reduction("pool:5x5", (6, 28, 28), **KW)
    base = _randn(2, 6, 28, 28)
    t = base.transpose(2, 3)  # non-contiguous view
    assert not t.is_contiguous()
    torch.testing.assert_close(r(t), F.adaptive_avg_pool2d(t.contiguous(), 5).reshape(2, -1))


# -- subsample ---------------------------------------------------------------------------
def test_subsample_indices_and_values():
    shape = (6, 7, 8)
    n = math.prod(shape)
    r = resolve_reduction("subsample:50", shape, key="blk", max_features=10, seed=3)
    assert (r.spec, r.kind, r.params, r.dim, r.in_shape) == ("subsample:50", "subsample",
                                                               (50,), 50, shape)
    idx = r.indices
    assert isinstance(idx, np.ndarray)
    assert idx.dtype == np.int64
    assert idx.shape == (50,)
    assert np.all(np.diff(idx) > 0)  # sorted and distinct
    assert idx.min() >= 0 and idx.max() < n
    t = _randn(4, *shape)
    out = r(t)
    assert out.shape == (4, 50)
    assert torch.equal(out, t.flatten(1)[:, torch.from_numpy(idx)])
    # a second call (cached device indices) gives the same result
    assert torch.equal(r(t), out)
    # non-contiguous input of the same shape
    tt = t.transpose(1, 3).contiguous().transpose(1, 3)
    assert not tt.is_contiguous()
    assert torch.equal(r(tt), out)


def test_subsample_is_deterministic_in_seed_and_key():
    shape = (1000,)

    def idx(key, seed):
        return resolve_reduction("subsample:100", shape, key=key, max_features=1,
                                 seed=seed).indices

    a = idx("fc1", 0)
    np.testing.assert_array_equal(a, idx("fc1", 0))
    assert not np.array_equal(a, idx("fc2", 0))
    assert not np.array_equal(a, idx("fc1", 1))


def test_subsample_all_features_is_permutation_free():
    r = resolve_reduction("subsample:24", (2, 3, 4), **KW)
    np.testing.assert_array_equal(r.indices, np.arange(24))
    t = _randn(2, 2, 3, 4)
    assert torch.equal(r(t), t.flatten(1))


def test_subsample_too_many_raises():
    with pytest.raises(ReductionError) as ei:
        resolve_reduction("subsample:25", (2, 3, 4), key="my.layer", max_features=8, seed=0)
    msg = str(ei.value)
    assert "'my.layer'" in msg and "24" in msg and "25" in msg


# -- "auto" ------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(8192,), (32, 16, 16), (2, 4096), (10,), (1, 1, 1)])
def test_auto_keeps_small_layers_whole(shape):
    r = resolve_reduction("auto", shape, **KW)
    assert (r.spec, r.dim) == ("none", math.prod(shape))


def test_auto_conv_map_prefers_exact_tiling():
    # isqrt(8192 // 32) = 16 fits, but 14 tiles 28x28 exactly and 2 * 14 > 16.
    r = resolve_reduction("auto", (32, 28, 28), **KW)
    assert r.spec == "pool:14x14"
    assert r.dim == 32 * 14 * 14 <= 8192


def test_auto_conv_map_64x14x14():
    # isqrt(8192 // 64) = 11; 7 tiles 14x14 exactly and 2 * 7 > 11.
    r = resolve_reduction("auto", (64, 14, 14), **KW)
    assert r.spec == "pool:7x7"
    assert r.dim == 64 * 49
    t = _randn(2, 64, 14, 14)
    torch.testing.assert_close(r(t), F.adaptive_avg_pool2d(t, 7).reshape(2, -1))


def test_auto_falls_back_to_non_exact_grid():
    # 17x17 (prime) map: only 1 tiles it exactly, far below isqrt(1000 // 4) = 15.
    r = resolve_reduction("auto", (4, 17, 17), key="k", max_features=1000, seed=0)
    assert r.spec == "pool:15x15"
    assert r.dim == 4 * 225 <= 1000


def test_auto_grid_clipped_to_map_for_wide_maps():
    # s = isqrt(1000) = 31 > h = 2: grid height is clipped to the map's.
    r = resolve_reduction("auto", (1, 2, 1000), key="k", max_features=1000, seed=0)
    kind, (gh, gw) = parse_reduction(r.spec)
    assert kind == "pool" and gh <= 2 and gw <= 31
    assert r.dim == gh * gw <= 1000


def test_auto_global_pool_when_only_1x1_fits():
    # 512 * 4 = 2048 > 1000 >= 512: no 2x2 grid fits, only a global average.
    r = resolve_reduction("auto", (512, 7, 7), key="k", max_features=1000, seed=0)
    assert (r.spec, r.dim) == ("pool", 512)
    t = _randn(2, 512, 7, 7)
    torch.testing.assert_close(r(t), t.mean(dim=(2, 3)))


@pytest.mark.parametrize("shape", [(300, 50), (30, 4, 5, 6)])
def test_auto_pools_other_multi_axis_layers(shape):
    layout = CHANNELS_FIRST if len(shape) == 2 else None  # (C, L): only when known
    r = resolve_reduction("auto", shape, key="k", max_features=1000, seed=0, layout=layout)
    assert (r.spec, r.dim) == ("pool", shape[0])


def test_auto_flat_layer_is_subsampled():
    r = resolve_reduction("auto", (100000,), **KW)
    assert r.spec == "subsample:8192"
    assert r.dim == 8192 and r.indices.shape == (8192,)
    t = _randn(2, 100000)
    assert torch.equal(r(t), t[:, torch.from_numpy(r.indices)])


@pytest.mark.parametrize("shape", [(9000, 2, 2), (9000, 2), (9000, 1, 1, 2)])
def test_auto_too_many_channels_is_subsampled(shape):
    r = resolve_reduction("auto", shape, **KW)
    assert r.spec == "subsample:8192"
    assert r.dim == 8192


@pytest.mark.parametrize("max_features", [0, -5])
def test_auto_bad_max_features(max_features):
    with pytest.raises(ReductionError, match="max_features"):
        resolve_reduction("auto", (3, 4, 4), key="k", max_features=max_features, seed=0)


# -- errors ------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["pool", "pool:2x2"])
def test_pool_flat_layer_strict_raises_with_key(spec):
    with pytest.raises(ReductionError) as ei:
        resolve_reduction(spec, (512,), key="fc1_postact", max_features=10, seed=0)
    assert "'fc1_postact'" in str(ei.value)


@pytest.mark.parametrize("spec", ["pool", "pool:2x2"])
def test_pool_flat_layer_lenient_keeps_whole(spec):
    r = resolve_reduction(spec, (512,), key="fc1", max_features=10, seed=0, strict=False)
    assert (r.spec, r.dim) == ("none", 512)
    t = _randn(2, 512)
    assert torch.equal(r(t), t)


def test_pool_grid_on_2d_layer():
    with pytest.raises(ReductionError, match="'seq'"):
        resolve_reduction("pool:2x2", (8, 10), key="seq", max_features=10, seed=0)
    r = resolve_reduction("pool:2x2", (8, 10), key="seq", max_features=10, seed=0,
                          strict=False, layout=CHANNELS_FIRST)
    assert (r.spec, r.dim) == ("pool", 8)  # a global spec falls back to a global pool
    # a pool given for this very layer takes its channels first, as a conv map's
    assert resolve_reduction("pool", (8, 10), key="seq", max_features=10, seed=0).dim == 8


def test_pool_grid_on_4d_layer_raises():
    with pytest.raises(ReductionError, match=re.escape("'vol'")):
        resolve_reduction("pool:2x2", (3, 4, 4, 4), key="vol", max_features=10, seed=0)


@pytest.mark.parametrize("shape", [(0,), (3, 0, 4), (0, 5)])
@pytest.mark.parametrize("spec", ["none", "auto", "pool"])
def test_zero_size_shape_raises(shape, spec):
    with pytest.raises(ReductionError, match="'empty'"):
        resolve_reduction(spec, shape, key="empty", max_features=10, seed=0)


def test_to_json():
    r = resolve_reduction("pool:2x2", torch.Size([3, 4, 4]), **KW)
    assert r.in_shape == (3, 4, 4) and all(type(s) is int for s in r.in_shape)
    assert r.to_json() == {"spec": "pool:2x2", "in_shape": [3, 4, 4], "dim": 12}


# -- property: "auto" always fits and applies ------------------------------------------
def _admissible_grids(c, h, w, max_features):
    """Grids the docstring allows: the finest square g that fits, or an exact-tiling g
    within a factor of two of it; each side clipped to the map."""
    s = max(g for g in range(1, max_features + 1) if c * g * g <= max_features) if (
        c <= max_features) else 0
    out = {(min(s, h), min(s, w))}
    for g in range(1, s + 1):
        if h % g == 0 and w % g == 0 and 2 * g > s:
            out.add((min(g, h), min(g, w)))
    return out, s


@settings(max_examples=150, deadline=None, database=None)
@given(
    c=st.integers(1, 40),
    h=st.integers(1, 20),
    w=st.integers(1, 20),
    max_features=st.integers(1, 3000),
    batch=st.integers(1, 3),
)
def test_auto_property(c, h, w, max_features, batch):
    shape = (c, h, w)
    n = c * h * w
    r = resolve_reduction("auto", shape, key="p", max_features=max_features, seed=1)
    if n <= max_features:
        assert r.spec == "none" and r.dim == n
    else:
        assert r.spec != "none"
        assert r.dim <= max_features
        if c > max_features:
            assert r.spec == f"subsample:{max_features}"
        else:
            kind, params = parse_reduction(r.spec)
            assert kind == "pool"
            grids, _ = _admissible_grids(c, h, w, max_features)
            grid = params or (1, 1)
            assert grid in grids, (r.spec, grids)
            assert r.dim == c * grid[0] * grid[1]
    t = _randn(batch, *shape, seed=c + h + w)
    out = r(t)
    assert out.shape == (batch, r.dim)
    if r.kind == "pool":
        grid = r.params or (1, 1)
        torch.testing.assert_close(out, F.adaptive_avg_pool2d(t, grid).reshape(batch, -1))


@pytest.mark.parametrize("spec", ["pool:4x4\n", "subsample:10\n", "pool:\u0664x4"])
def test_specs_must_match_whole_and_in_ascii(spec):
    with pytest.raises(ReductionError):
        parse_reduction(spec)


def test_grid_finer_than_the_map_is_refused():
    with pytest.raises(ReductionError, match="finer than its 4x4 map"):
        resolve_reduction("pool:8x8", (3, 4, 4), key="tiny", max_features=10**6, seed=0)


def test_global_grid_spec_falls_back_to_global_pool_off_2d_maps():
    r = resolve_reduction("pool:2x2", (8, 5, 4, 4), key="vol", max_features=10**6, seed=0,
                          strict=False)
    assert r.spec == "pool" and r.dim == 8


@pytest.mark.parametrize(
    ("shape", "tile"),
    [((3, 5, 28, 28), (2, 2)), ((2, 3, 12, 12), (3, 4)), ((2, 3, 12, 12), (1, 3)),
     ((2, 3, 8, 8), (1, 1)), ((2, 4, 112, 112), (16, 16))],
)
def test_cputile_mean_equals_avg_pool2d(shape, tile):
    from engine.reduce import tile_mean

    x = torch.randn(shape)
    torch.testing.assert_close(tile_mean(x, *tile), F.avg_pool2d(x, tile), rtol=1e-6,
                               atol=1e-6)


# -- token sequences (B, T, D) -----------------------------------------------------------
def _masked(b=3, t=5, d=4):
    x = _randn(b, t, d)
    mask = torch.tensor([[1, 1, 1, 0, 0],    # right padding
                         [0, 0, 1, 1, 1],    # left padding
                         [1, 1, 1, 1, 1]])[:b, :t]
    return x, mask


@pytest.mark.parametrize("mode", ["mean", "max", "cls", "first", "last"])
def test_token_reductions_equal_a_hand_computation(mode):
    x, mask = _masked()
    r = resolve_reduction(f"tokens:{mode}", (5, 4), layout=TOKENS, **KW)
    assert (r.kind, r.dim) == ("tokens", 4)
    rows = []
    for i in range(3):
        real = x[i][mask[i].bool()]  # the non-padding tokens, in order
        rows.append({"mean": real.mean(0), "max": real.amax(0), "cls": x[i, 0],
                     "first": real[0], "last": real[-1]}[mode])
    torch.testing.assert_close(r(x, mask), torch.stack(rows))
    # without a mask every token counts
    whole = {"mean": x.mean(1), "max": x.amax(1), "cls": x[:, 0], "first": x[:, 0],
             "last": x[:, -1]}[mode]
    torch.testing.assert_close(r(x), whole)
    # another sequence length in a later batch is fine
    assert r(_randn(2, 9, 4)).shape == (2, 4)


def test_token_reduction_errors_name_the_layer():
    r = resolve_reduction("tokens:mean", (5, 4), layout=TOKENS, **KW)
    x, mask = _masked()
    with pytest.raises(ReductionError, match=r"layer 'layer'.*attention mask is \(3, 4\)"):
        r(x, mask[:, :4])
    with pytest.raises(ReductionError, match=r"layer 'layer'.*\(batch, tokens, 4\)"):
        r(_randn(3, 5, 6))
    with pytest.raises(ReductionError, match="tokens:mean, tokens:max"):
        parse_reduction("tokens:median")
    for shape, layout in [((4, 5), CHANNELS_FIRST), ((3, 4, 5), None), ((7,), TOKENS)]:
        with pytest.raises(ReductionError, match=r"layer 'layer'.*needs \(tokens, channels\)"):
            resolve_reduction("tokens:cls", shape, layout=layout, **KW)


def test_layout_decides_pool_and_auto_of_a_sequence():
    kw = {"key": "blk", "max_features": 16, "seed": 0}
    for spec in ("pool", "auto"):  # a (T, D) sequence: averaged over its tokens
        r = resolve_reduction(spec, (50, 8), layout=TOKENS, **kw)
        assert (r.spec, r.dim) == ("tokens:mean", 8)
        x = _randn(2, 50, 8)
        torch.testing.assert_close(r(x), x.mean(1))
    # a (C, L) map: over its length
    r = resolve_reduction("pool", (8, 50), layout=CHANNELS_FIRST, **kw)
    assert (r.spec, r.dim) == ("pool", 8)
    # unknown: never guessed, and the message says what to write
    for spec in ("pool", "auto"):
        with pytest.raises(ReductionError, match=r"layer 'blk'.*\{'blk': 'tokens:mean'\}"):
            resolve_reduction(spec, (50, 8), strict=False, key="blk", max_features=100, seed=0)
    # channels last with more axes (a (H, W, C) map): never pooled over H
    assert resolve_reduction("auto", (4, 4, 8), layout=TOKENS, **kw).spec == "subsample:16"
    with pytest.raises(ReductionError, match="channels last"):
        resolve_reduction("pool", (4, 4, 8), layout=TOKENS, **kw)
    # one token spec for every layer adapts to the others
    assert resolve_reduction("tokens:last", (7,), strict=False, **kw).spec == "none"
    assert resolve_reduction("tokens:last", (3, 4, 4), strict=False, **kw).spec == "pool"


def test_fixed_shape_reduction_refuses_another_length():
    r = resolve_reduction("none", (5, 4), layout=TOKENS, **KW)
    with pytest.raises(ReductionError, match=r"layer 'layer'.*\(7, 4\) in this batch.*tokens:"):
        r(_randn(2, 7, 4))
