"""Property tests (hypothesis) of the store over shapes, storage dtypes, reductions and
block sizes: what is written reads back as the model computed it, row for row, and a build
interrupted before any block resumes to the very same store."""

from __future__ import annotations

import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import engine
from benchmarks import _faults as F
from engine import _writer
from engine.datasets import ArrayDataset

SETTINGS = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

TORCH = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


@st.composite
def cases(draw):
    """A model, its data and build options."""
    return {
        "channels": draw(st.integers(1, 3)),
        "side": draw(st.integers(2, 6)),
        "maps": draw(st.integers(1, 5)),
        "rows": draw(st.integers(1, 70)),
        "test_rows": draw(st.integers(0, 20)),
        "dtype": draw(st.sampled_from(sorted(TORCH))),
        "reduce": draw(st.sampled_from(["none", "pool", "pool:1x1", "subsample:3"])),
        "batch_size": draw(st.integers(1, 16)),
        "block_bytes": draw(st.sampled_from([1, 300, 4096, 1 << 20])),
        "compressor": draw(st.sampled_from(["lz4", "zstd"])),
        "seed": draw(st.integers(0, 2**16)),
    }


def _model(c: dict) -> nn.Module:
    torch.manual_seed(c["seed"])
    return nn.Sequential(
        nn.Conv2d(c["channels"], c["maps"], 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(c["maps"] * c["side"] ** 2, 4),
    ).eval()


def _data(c: dict) -> dict:
    rng = np.random.default_rng(c["seed"])

    def one(n):
        x = rng.random((n, c["channels"], c["side"], c["side"]), dtype=np.float32)
        return ArrayDataset(x, rng.integers(0, 4, n), ["a", "b", "c", "d"])

    data = {"train": one(c["rows"])}
    if c["test_rows"]:
        data["test"] = one(c["test_rows"])
    return data


def _build(c: dict, path: Path) -> engine.Store:
    return engine.build_store(
        _model(c), _data(c), path, layers=["0", "1", "3"], dtype=c["dtype"],
        reduce={"0": c["reduce"], "1": c["reduce"]}, batch_size=c["batch_size"],
        block_bytes=c["block_bytes"], compressor=c["compressor"], valid_size=0,
        device="cpu", progress=False)


def _expected(c: dict, store: engine.Store, split: str, layer: str, x: torch.Tensor):
    model = _model(c)
    with torch.inference_mode():
        h = model[: int(layer) + 1](x)
    spec = store.layer_info(layer)["reduction"]
    if spec.startswith("pool"):
        h = h.mean(dim=(2, 3))
    elif spec.startswith("subsample"):
        h = h.flatten(1)[:, torch.from_numpy(store.reduction_indices(layer))]
    return h.flatten(1).to(TORCH[c["dtype"]]).float().numpy()


@SETTINGS
@given(cases())
def test_written_rows_read_back_as_computed(c):
    data = _data(c)
    with tempfile.TemporaryDirectory() as tmp:
        store = _build(c, Path(tmp) / "s.zarr")
        assert store.complete and store.verify().ok
        for split, ds in data.items():
            index = store.index(split)
            assert sorted(index.tolist()) == list(range(len(ds)))
            x, y = ds.__getitems__(index.tolist())
            np.testing.assert_array_equal(store.labels(split), y.numpy())
            for layer in store.layers:
                got = store.read(split, layer).astype(np.float32)
                want = _expected(c, store, split, layer, x)
                assert got.shape == want.shape == (len(ds), store.layer_info(layer)["dim"])
                # pooled means may differ from ours by one rounding of the storage dtype
                eps = float(torch.finfo(TORCH[c["dtype"]]).eps)
                np.testing.assert_allclose(got, want, rtol=2 * eps, atol=2 * eps)


@SETTINGS
@given(cases(), st.integers(1, 1000))
def test_resuming_from_any_block_gives_the_same_store(c, stop_draw):
    with tempfile.TemporaryDirectory() as tmp:
        whole = _build(c, Path(tmp) / "whole.zarr")
        block = whole.meta.config.block_rows
        blocks = sum(-(-whole.rows(s) // block) for s in whole.splits)
        stop_at = 1 + stop_draw % blocks  # interrupted as block `stop_at` is handed over
        real = _writer.BlockWriter.put
        calls = {"n": 0}

        def put(self, b):
            calls["n"] += 1
            if calls["n"] == stop_at:
                raise KeyboardInterrupt("interrupted")
            real(self, b)

        path = Path(tmp) / "resumed.zarr"
        with mock.patch.object(_writer.BlockWriter, "put", put), \
                pytest.raises(KeyboardInterrupt):
            _build(c, path)
        partial = engine.open_store(path)
        assert sum(partial.committed(s) for s in partial.splits) <= (stop_at - 1) * block
        assert partial.verify().ok
        resumed = _build(c, path)
        assert resumed.complete and resumed.verify().ok
        assert F.compare_stores(whole.path, path) == []
