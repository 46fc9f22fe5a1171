"""Store: the read API, its errors, chunk sizing and format checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

import engine
from engine.format import MAX_CHUNK_BYTES, bf16_bits_to_float32, chunk_rows


@pytest.fixture
def store(tmp_path, fashion, convnet):
    return engine.build_store(convnet, fashion, tmp_path / "s.zarr", layers=["fc1_postact",
                              "logits"], progress=False)


def test_metadata_and_reads(store):
    assert store.layers == ["fc1_postact", "logits"]
    assert store.splits == ["train", "valid", "test"]
    assert store.complete and store.dtype == "float16"
    info = store.layer_info("logits")
    assert info == {"name": "logits", "module": "logits", "site": "output", "call": 0,
                    "shape": [10], "dim": 10, "reduction": "none"}
    part = store.read("test", "logits", 10, 20)
    np.testing.assert_array_equal(part, store.read("test", "logits")[10:20])
    assert part.dtype == np.float16 and part.shape == (10, 10)
    assert "fc1_postact" in store.summary() and "complete" in store.summary()
    assert "Store(" in repr(store)


def test_unknown_names_list_what_exists(store):
    with pytest.raises(engine.LayerNotFoundError, match="'logits'") as e:
        store.features("train", "logit")
    assert isinstance(e.value, KeyError)
    with pytest.raises(engine.SplitNotFoundError, match=r"\['train', 'valid', 'test'\]"):
        store.read("validation", "logits")
    with pytest.raises(engine.LabelNotFoundError, match=r"\['y'\]"):
        store.labels("train", "coarse")


def test_reads_stay_inside_committed_rows(store):
    rows = store.rows("test")
    with pytest.raises(engine.InvalidArgumentError, match="out of the committed range"):
        store.read("test", "logits", 0, rows + 1)
    group = zarr.open_group(store.path, mode="r+")
    meta = dict(group.attrs["probe_engine"])
    meta["splits"]["test"]["rows_committed"] = 64
    group.attrs["probe_engine"] = meta
    partial = engine.open_store(store.path)
    assert not partial.complete and partial.committed("test") == 64
    assert len(partial.labels("test")) == 64
    with pytest.raises(engine.InvalidArgumentError, match="resume it first"):
        partial.read("test", "logits", 0, 65)


def test_newer_format_is_refused(store):
    group = zarr.open_group(store.path, mode="r+")
    meta = dict(group.attrs["probe_engine"])
    meta["format"] = 2
    group.attrs["probe_engine"] = meta
    with pytest.raises(engine.StoreError, match="format 2.*Upgrade probe-engine"):
        engine.open_store(store.path)


def test_missing_metadata_is_a_verify_problem(store):
    group = zarr.open_group(store.path, mode="r+")
    meta = dict(group.attrs["probe_engine"])
    del meta["config"]
    group.attrs["probe_engine"] = meta
    report = engine.open_store(store.path).verify()
    assert not report.ok and "attrs.probe_engine.config is missing" in report.problems[0]


def test_verify_finds_rows_stored_twice_or_in_two_splits(store):
    assert store.verify().ok
    index = zarr.open_array(f"{store.path}/train/index", mode="r+")
    valid = zarr.open_array(f"{store.path}/valid/index", mode="r")[...]
    items = index[...]
    items[[1, 2]] = items[0]  # one dataset item three times
    items[5] = valid[3]  # a valid row also in train (both carved from the train source)
    index[...] = items
    problems = engine.open_store(store.path).verify().problems
    assert any("train/index: 1 dataset item(s) stored more than once" in p
               and f"item {items[0]}" in p for p in problems), problems
    assert any("valid/index: 1 dataset item(s) of source 'train' are also in split 'train'"
               in p for p in problems), problems
    assert not any(p.startswith("test/") for p in problems)  # another source may repeat
    items[7] = -4
    index[...] = items
    assert any("dataset item -4, which is negative" in p
               for p in engine.open_store(store.path).verify().problems)


@pytest.mark.parametrize(("block", "row_bytes"), [(2048, 100), (2048, 20000), (768, 65536),
                                                  (7, 1 << 30)])
def test_chunks_divide_blocks_and_stay_small(block, row_bytes):
    rows = chunk_rows(block, row_bytes)
    assert block % rows == 0
    assert rows * row_bytes <= MAX_CHUNK_BYTES or rows == 1
    if rows < block:  # the largest such divisor
        bigger = [d for d in range(rows + 1, block + 1) if block % d == 0]
        assert all(d * row_bytes > MAX_CHUNK_BYTES for d in bigger)


def test_bfloat16_bits_decode_exactly():
    import torch

    x = torch.randn(1000).to(torch.bfloat16)
    bits = x.view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bf16_bits_to_float32(bits), x.float().numpy())


def test_fsspec_url_store_builds_resumes_and_verifies(fashion, convnet):
    url = "memory://probe-engine-test/s.zarr"
    kw = dict(layers=["logits"], progress=False)
    store = engine.build_store(convnet, fashion, url, **kw)
    assert store.complete and store.verify().ok
    np.testing.assert_array_equal(store.labels("test"), fashion["test"].targets)
    again = engine.build_store(convnet, fashion, url, **kw)  # complete: resumes to a no-op
    assert again.read("test", "logits").tobytes() == store.read("test", "logits").tobytes()
    with pytest.raises(engine.StoreExistsError):
        engine.build_store(convnet, fashion, url, resume=False, **kw)
    engine.build_store(convnet, fashion, url, overwrite=True, **kw)


def test_a_second_label_set_needs_no_new_capture(tmp_path, fashion):
    from torch import nn

    from engine.datasets import FASHION_COARSE

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 10))
    store = engine.build_store(model, fashion, tmp_path / "s.zarr", layers=["2"],
                               progress=False)
    features = {p: p.stat().st_mtime_ns for p in (tmp_path / "s.zarr").rglob("*")
                if "features" in p.parts and p.is_file()}
    store.add_labels("coarse", lambda y: FASHION_COARSE[y])
    assert store.label_names() == ["coarse", "y"]
    for split in store.splits:
        np.testing.assert_array_equal(store.labels(split, "coarse"),
                                      FASHION_COARSE[store.labels(split)])
    assert store.num_classes("coarse") == 4
    assert store.verify().ok
    assert features == {p: p.stat().st_mtime_ns for p in features}  # no new capture
    res = engine.solve(store, label="coarse", l2=1e-3, run="coarse", progress=False,
                       device="cpu")
    fine = engine.solve(store, l2=1e-3, run="fine", progress=False, device="cpu")
    assert res.config["num_classes"] == 4
    assert res.error("test")["2"] < fine.error("test")["2"]  # four groups: an easier task
    with pytest.raises(engine.StoreExistsError, match="already in"):
        store.add_labels("coarse", lambda y: y % 2)
    store.add_labels("coarse", lambda y: y % 2, overwrite=True)
    assert store.num_classes("coarse") == 2
    with pytest.raises(engine.InvalidArgumentError, match="other than 'y'"):
        store.add_labels("y", lambda y: y)
    with pytest.raises(engine.DataError, match="non-negative integers"):
        store.add_labels("bad", lambda y: y - 100)
    with pytest.raises(engine.LabelNotFoundError, match="every split"):
        store.add_labels("partial", {"train": store.labels("train")})
