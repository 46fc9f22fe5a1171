"""build_store end to end: real models, real Zarr on disk, real Fashion-MNIST."""

from __future__ import annotations

import dataclasses
import os
import random

import numpy as np
import pytest
import torch
import torchvision
import zarr
from conftest import random_images
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.models.feature_extraction import create_feature_extractor

import engine
from engine import _writer
from engine.capture import Runner
from engine.datasets import ArrayDataset


def build(model, data, path, **kw):
    kw.setdefault("progress", False)
    return engine.build_store(model, data, path, **kw)


def test_convnet_on_fashion_mnist_equals_plain_forward(tmp_path, fashion, convnet):
    store = build(convnet, fashion, tmp_path / "s.zarr", reduce="none", dtype="float32")
    assert store.splits == ["train", "valid", "test"]
    assert store.layers == ["input", "conv1_preact", "conv1_postact", "conv1_postpool",
                            "conv2_preact", "conv2_postact", "conv2_postpool", "fc1_preact",
                            "fc1_postact", "logits"]
    assert store.rows("train") + store.rows("valid") == 600
    assert store.rows("valid") == 60  # 10% of 600 (< 10,000)
    assert store.verify().ok
    index = store.index("valid")
    x, y = fashion["train"].__getitems__(index.tolist())
    with torch.inference_mode():
        h1 = convnet.conv1_preact(x)
        logits = convnet(x)
    np.testing.assert_allclose(store.read("valid", "input"), x.flatten(1).numpy(), rtol=0)
    np.testing.assert_allclose(store.read("valid", "conv1_preact"), h1.flatten(1).numpy(),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(store.read("valid", "logits"), logits.numpy(),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(store.labels("valid"), y.numpy())
    np.testing.assert_array_equal(store.labels("test"), fashion["test"].targets)
    assert store.num_classes() == 10
    # train and valid partition the source rows, each in source order
    both = np.concatenate([store.index("train"), index])
    assert sorted(both.tolist()) == list(range(600))
    assert (np.diff(index) > 0).all()


def test_split_is_seeded_and_recorded(tmp_path, fashion, convnet):
    a = build(convnet, fashion["train"], tmp_path / "a.zarr", layers=["logits"], seed=3)
    b = build(convnet, fashion["train"], tmp_path / "b.zarr", layers=["logits"], seed=3)
    c = build(convnet, fashion["train"], tmp_path / "c.zarr", layers=["logits"], seed=4)
    np.testing.assert_array_equal(a.index("valid"), b.index("valid"))
    assert not np.array_equal(a.index("valid"), c.index("valid"))
    assert a.meta.dataset.split_seed == 3


def _resnet18():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=5).eval()
    # non-trivial batch-norm statistics, so that bn outputs differ from their inputs
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


def test_resnet18_blocks_equal_torchvision_feature_extractor(tmp_path):
    model = _resnet18()
    data = {"train": random_images(10, (3, 64, 64), classes=5)}
    blocks = ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    store = build(model, data, tmp_path / "r.zarr", layers=blocks, reduce="none",
                  dtype="float32", valid_size=0, batch_size=4)
    extractor = create_feature_extractor(model, return_nodes=blocks)
    x, _ = data["train"].__getitems__(list(range(10)))
    with torch.inference_mode():
        ref = extractor(x)
    for name in blocks:
        np.testing.assert_allclose(store.read("train", name), ref[name].flatten(1).numpy(),
                                   rtol=1e-5, atol=1e-5, err_msg=name)
    # pooled, the same features are the per-channel means
    pooled = build(model, data, tmp_path / "p.zarr", layers=blocks, reduce="pool",
                   dtype="float32", valid_size=0)
    for name in blocks:
        np.testing.assert_allclose(pooled.read("train", name),
                                   ref[name].mean(dim=(2, 3)).numpy(), rtol=1e-5, atol=1e-6)


def test_input_sites_and_inplace_relu_match_hand_written_forward(tmp_path):
    model = _resnet18()
    assert model.relu.inplace and model.layer1[0].relu.inplace
    data = {"train": random_images(6, (3, 64, 64), classes=5)}
    store = build(model, data, tmp_path / "r.zarr", layers=["bn1", "layer1.0.relu", "relu"],
                  sites=("input", "output"), reduce="none", dtype="float32", valid_size=0)
    x, _ = data["train"].__getitems__(list(range(6)))
    with torch.inference_mode():
        bn1 = model.bn1(model.conv1(x))  # what the in-place stem ReLU overwrites
        stem = model.maxpool(torch.relu(bn1))
        block = model.layer1[0]
        pre0 = block.bn1(block.conv1(stem))  # input of the block's ReLU, first call
        pre1 = block.bn2(block.conv2(torch.relu(pre0))) + stem  # second call: after the add

    def read(key):
        return store.read("train", key)

    assert (bn1 < 0).any()
    np.testing.assert_allclose(read("bn1"), bn1.flatten(1).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(read("relu:input"), bn1.flatten(1).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(read("relu"), bn1.clamp(min=0).flatten(1).numpy(),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(read("layer1.0.relu:input"), pre0.flatten(1).numpy(),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(read("layer1.0.relu:input:1"), pre1.flatten(1).numpy(),
                               rtol=1e-4, atol=1e-4)
    assert store.layer_info("layer1.0.relu:input:1")["call"] == 1


@pytest.mark.parametrize(
    ("spec", "dim"),
    [("none", 32 * 28 * 28), ("pool", 32), ("pool:7x7", 32 * 49), ("pool:5x5", 32 * 25),
     ("subsample:300", 300), ("auto", 32 * 14 * 14)],
)
def test_every_reduction_end_to_end(tmp_path, fashion, convnet, spec, dim):
    store = build(convnet, fashion["test"], tmp_path / "s.zarr", layers=["conv1_postact"],
                  reduce={"conv1_postact": spec}, dtype="float32", valid_size=0,
                  max_features=8192)
    assert store.layer_info("conv1_postact")["dim"] == dim
    x, _ = fashion["test"].__getitems__(store.index("train").tolist())
    with torch.inference_mode():
        act = torch.relu(convnet.conv1_preact(x))
    kind = spec.split(":")[0]
    if kind == "none":
        ref = act.flatten(1)
    elif spec == "pool":
        ref = act.mean(dim=(2, 3))
    elif kind in ("pool", "auto"):
        grid = (14, 14) if spec == "auto" else tuple(map(int, spec[5:].split("x")))
        ref = nn.functional.adaptive_avg_pool2d(act, grid).flatten(1)
    else:
        idx = store.reduction_indices("conv1_postact")
        assert len(idx) == 300 and (np.diff(idx) > 0).all()
        ref = act.flatten(1)[:, torch.from_numpy(idx)]
    np.testing.assert_allclose(store.read("train", "conv1_postact"), ref.numpy(),
                               rtol=1e-5, atol=1e-6)


def test_subsample_indices_are_stored_and_reproducible(tmp_path, fashion, convnet):
    kw = dict(layers=["conv1_postact", "conv2_postact"], reduce="subsample:50", valid_size=0)
    a = build(convnet, fashion["test"], tmp_path / "a.zarr", **kw)
    b = build(convnet, fashion["test"], tmp_path / "b.zarr", **kw)
    ia, ib = a.reduction_indices("conv1_postact"), b.reduction_indices("conv1_postact")
    np.testing.assert_array_equal(ia, ib)
    assert not np.array_equal(ia, a.reduction_indices("conv2_postact"))
    assert zarr.open_array(tmp_path / "a.zarr" / "reductions" / "conv1_postact" / "indices")[:]\
        .tolist() == ia.tolist()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_storage_dtypes_round_trip(tmp_path, fashion, convnet, dtype):
    store = build(convnet, fashion["test"], tmp_path / "s.zarr", layers=["fc1_preact"],
                  dtype=dtype, valid_size=0)
    ref = build(convnet, fashion["test"], tmp_path / "r.zarr", layers=["fc1_preact"],
                dtype="float32", valid_size=0).read("train", "fc1_preact")
    got = store.read("train", "fc1_preact")
    expected = torch.from_numpy(ref).to(getattr(torch, dtype)).float().numpy()
    np.testing.assert_array_equal(got.astype(np.float32), expected)
    assert store.dask("train", "fc1_preact").compute().tobytes() == got.tobytes()


def test_interrupted_build_resumes_to_identical_arrays(tmp_path, fashion, convnet, monkeypatch):
    kw = dict(block_bytes=1, batch_size=64)  # one 64-row block per batch: many blocks
    whole = build(convnet, fashion, tmp_path / "whole.zarr", **kw)
    n_blocks = sum(-(-whole.rows(s) // 64) for s in whole.splits)
    stop_at = random.Random(1).randrange(2, n_blocks - 1)
    calls = {"n": 0}
    original = _writer.BlockWriter.put

    def failing_put(self, block):
        calls["n"] += 1
        if calls["n"] == stop_at:
            raise KeyboardInterrupt("simulated interruption")
        original(self, block)

    monkeypatch.setattr(_writer.BlockWriter, "put", failing_put)
    path = tmp_path / "resumed.zarr"
    with pytest.raises(KeyboardInterrupt):
        build(convnet, fashion, path, **kw)
    partial = engine.open_store(path)
    assert not partial.complete
    assert sum(partial.committed(s) for s in partial.splits) == (stop_at - 1) * 64
    monkeypatch.setattr(_writer.BlockWriter, "put", original)
    resumed = build(convnet, fashion, path, **kw)
    assert resumed.complete and resumed.verify().ok
    for split in whole.splits:
        for layer in whole.layers:
            a, b = whole.features(split, layer)[:], resumed.features(split, layer)[:]
            assert a.tobytes() == b.tobytes(), (split, layer)
        np.testing.assert_array_equal(whole.labels(split), resumed.labels(split))
        np.testing.assert_array_equal(whole.index(split), resumed.index(split))


def test_rerunning_a_complete_build_writes_nothing(tmp_path, fashion, convnet):
    path = tmp_path / "s.zarr"
    build(convnet, fashion["test"], path, layers=["logits"])
    stamps = {p: p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file()}
    build(convnet, fashion["test"], path, layers=["logits"])
    assert {p: p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file()} == stamps


def test_resume_refuses_another_model_data_or_config(tmp_path, fashion, convnet):
    path = tmp_path / "s.zarr"
    build(convnet, fashion, path, layers=["logits"])
    other = engine.models.mnist_convnet()
    with pytest.raises(engine.StoreMismatchError, match="model.digest"):
        build(other, fashion, path, layers=["logits"])
    with pytest.raises(engine.StoreMismatchError, match="config.dtype"):
        build(convnet, fashion, path, layers=["logits"], dtype="float32")
    with pytest.raises(engine.StoreMismatchError, match="dataset.splits.test"):
        build(convnet, {"train": fashion["train"], "test": fashion["train"]}, path,
              layers=["logits"])
    assert engine.open_store(path).verify().ok  # nothing was touched
    old = engine.open_store(path).meta.model.digest
    rebuilt = build(other, fashion, path, layers=["logits"], overwrite=True)
    assert rebuilt.complete and rebuilt.meta.model.digest != old


def test_existing_paths_are_never_clobbered(tmp_path, fashion, convnet):
    path = tmp_path / "s.zarr"
    build(convnet, fashion["test"], path, layers=["logits"])
    with pytest.raises(engine.StoreExistsError, match="resume=True"):
        build(convnet, fashion["test"], path, layers=["logits"], resume=False)
    a_file = tmp_path / "file.txt"
    a_file.write_text("precious")
    with pytest.raises(engine.StoreError, match="a file"):
        build(convnet, fashion["test"], a_file, overwrite=True)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("precious")
    with pytest.raises(engine.StoreError, match="not a zarr store"):
        build(convnet, fashion["test"], other, overwrite=True)
    assert a_file.read_text() == "precious" and (other / "notes.txt").read_text() == "precious"
    with pytest.raises(engine.StoreError, match="not a probe-engine store"):
        engine.open_store(other)


def test_read_only_location_is_refused(tmp_path, fashion, convnet, monkeypatch):
    monkeypatch.setattr(os, "access", lambda p, mode: mode != os.W_OK)
    with pytest.raises(engine.StoreError, match="cannot write"):
        build(convnet, fashion["test"], tmp_path / "s.zarr")
    assert not (tmp_path / "s.zarr").exists()


def test_flipped_byte_is_caught_by_verify_and_reads(tmp_path, fashion, convnet):
    path = tmp_path / "s.zarr"
    store = build(convnet, fashion["test"], path, layers=["fc1_postact"], valid_size=0)
    chunk = path / "train" / "features" / "fc1_postact" / "c" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    chunk.write_bytes(bytes(raw))
    report = store.verify()
    assert not report.ok
    assert any("train/features/fc1_postact/c/0/0" in p and "corrupted" in p
               for p in report.problems)
    with pytest.raises(engine.StoreCorruptedError, match=r"fc1_postact/c/0/0"):
        store.read("train", "fc1_postact")
    with pytest.raises(ValueError, match="checksum"):  # plain zarr sees it too
        zarr.open_array(path / "train" / "features" / "fc1_postact")[:]


def test_missing_chunk_is_reported(tmp_path, fashion, convnet):
    path = tmp_path / "s.zarr"
    store = build(convnet, fashion["test"], path, layers=["logits"], valid_size=0)
    (path / "train" / "labels" / "y" / "c" / "0").unlink()
    report = store.verify()
    assert [p for p in report.problems if "labels/y/c/0" in p and "missing" in p]


def test_store_opens_without_probe_engine(tmp_path, fashion, convnet):
    import dask.array as da
    import xarray as xr

    path = tmp_path / "s.zarr"
    store = build(convnet, fashion, path, layers=["conv2_postpool", "logits"])
    expected = store.read("test", "logits")
    group = zarr.open_group(path, mode="r")
    assert group["test/features/logits"][:].tobytes() == expected.tobytes()
    assert group.attrs["probe_engine"]["format"] == 1
    ds = xr.open_zarr(path, group="test/features", consolidated=False)
    np.testing.assert_array_equal(ds["logits"].values, expected.astype(ds["logits"].dtype))
    labels = xr.open_zarr(path, group="test/labels", consolidated=False)
    np.testing.assert_array_equal(labels["y"].values, fashion["test"].targets)
    arr = da.from_zarr(str(path), component="test/features/conv2_postpool")
    assert arr.shape == (200, 3136)
    np.testing.assert_array_equal(arr.compute(), store.read("test", "conv2_postpool"))


def test_model_state_restored_and_outputs_unchanged(tmp_path, fashion, convnet):
    convnet.train()
    convnet.fc1_postact.eval()
    x, _ = fashion["test"].__getitems__(list(range(8)))
    with torch.inference_mode():
        convnet.eval()
        before = convnet(x)
        convnet.train()
        convnet.fc1_postact.eval()
    build(convnet, fashion["test"], tmp_path / "s.zarr")
    assert convnet.training and not convnet.fc1_postact.training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in convnet.modules())
    with torch.inference_mode():
        convnet.eval()
        assert torch.equal(convnet(x), before)


class _Exploding(nn.Module):
    def __init__(self, after: int):
        super().__init__()
        self.net = engine.models.mnist_convnet()
        self.calls, self.after = 0, after

    def forward(self, x):
        self.calls += 1
        if self.calls > self.after:
            raise RuntimeError("boom in forward")
        return self.net(x)


def test_forward_that_raises_midway_leaves_a_consistent_store(tmp_path, fashion):
    model = _Exploding(after=5)  # two passes of the first rows + 3 batches of 64, then fails
    model.train()
    path = tmp_path / "s.zarr"
    with pytest.raises(RuntimeError, match="boom"):
        build(model, fashion["test"], path, batch_size=64, block_bytes=1, valid_size=0)
    assert model.training and all(m.training for m in model.modules())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    store = engine.open_store(path)
    assert store.committed("train") == 192
    assert store.verify().ok


class _Pairs(Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@pytest.mark.parametrize(
    ("item", "match"),
    [
        ((torch.zeros(1, 28, 28), 1.5), "label is 1.5"),
        ((torch.zeros(1, 28, 28), "cat"), "label is 'cat'"),
        ((np.zeros((1, 28, 28), np.float32), 1), "not a torch.Tensor"),
        (torch.zeros(1, 28, 28), "not an \\(input, label\\) pair"),
        ((torch.zeros(1, 28, 28), torch.tensor(0.5)), "float32 tensor"),
    ],
)
def test_bad_items_name_the_index(tmp_path, convnet, item, match):
    good = (torch.zeros(1, 28, 28), 0)
    items = [good] * 5 + [item] + [good] * 4
    with pytest.raises(engine.DataError, match=match) as info:
        build(convnet, {"train": _Pairs(items)}, tmp_path / "s.zarr", valid_size=0, batch_size=4)
    assert "dataset item" in str(info.value) and "5" in str(info.value)


def test_label_errors(tmp_path, convnet):
    x = torch.zeros(1, 28, 28)
    negative = _Pairs([(x, 1)] * 5 + [(x, -2)] * 3)
    with pytest.raises(engine.DataError, match="row 5: label -2 is negative"):
        build(convnet, {"train": negative}, tmp_path / "a.zarr", valid_size=0)
    over = _Pairs([(x, 1)] * 5 + [(x, 12)] * 3)
    with pytest.raises(engine.DataError, match="row 5: label 12 is out of range for 10"):
        build(convnet, {"train": over}, tmp_path / "b.zarr", valid_size=0, num_classes=10)
    floats = DataLoader(_Pairs([(x, 1)] * 4), batch_size=2,
                        collate_fn=lambda b: (torch.stack([i[0] for i in b]),
                                              torch.tensor([0.5] * len(b))))
    with pytest.raises(engine.DataError, match="float32, not integer"):
        build(convnet, {"train": floats}, tmp_path / "c.zarr", valid_size=0)


def test_empty_dataset_and_bad_loaders(tmp_path, convnet, fashion):
    with pytest.raises(engine.DataError, match="split 'train' is empty"):
        build(convnet, {"train": _Pairs([])}, tmp_path / "a.zarr")
    shuffled = DataLoader(fashion["test"], batch_size=32, shuffle=True)
    with pytest.raises(engine.DataError, match="shuffles"):
        build(convnet, {"train": shuffled}, tmp_path / "b.zarr")
    dropping = DataLoader(fashion["test"], batch_size=32, drop_last=True)
    with pytest.raises(engine.DataError, match="drop_last"):
        build(convnet, {"train": dropping}, tmp_path / "c.zarr")
    assert not (tmp_path / "b.zarr").exists()


def test_dataloader_input_uses_its_batch_size_and_rows(tmp_path, fashion, convnet):
    loader = DataLoader(fashion["test"], batch_size=50)
    store = build(convnet, {"test": loader}, tmp_path / "s.zarr", layers=["logits"])
    assert store.meta.config.batch_size == 50
    assert store.rows("test") == 200


def test_nan_activation_names_layer_and_row(tmp_path, fashion):
    torch.manual_seed(0)
    model = engine.models.mnist_convnet()
    images = fashion["test"].images[:100].clone()
    data = ArrayDataset(images.float() / 255, fashion["test"].targets[:100],
                        fashion["test"].classes)
    data._images[37, 0, 3, 3] = float("nan")
    with pytest.raises(engine.NonFiniteError, match=r"layer 'input', split 'train', row 37"):
        build(model, data, tmp_path / "a.zarr", valid_size=0, batch_size=16)
    store = build(model, data, tmp_path / "b.zarr", valid_size=0, nan_policy="ignore",
                  layers=["input"])
    assert np.isnan(store.read("train", "input")[37]).any()


def test_float16_overflow_is_reported(tmp_path, fashion):
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 4))
    with torch.no_grad():
        model[1].weight.fill_(200.0)
    with pytest.raises(engine.NonFiniteError, match="layer '1'.*65504"):
        build(model, fashion["test"], tmp_path / "a.zarr", valid_size=0, layers=["1"])
    store = build(model, fashion["test"], tmp_path / "b.zarr", valid_size=0, layers=["1"],
                  dtype="bfloat16")
    assert np.isfinite(store.read("train", "1")).all()


def test_extra_labels(tmp_path, fashion, convnet):
    coarse = np.array([0, 1, 0, 0, 0, 2, 0, 2, 3, 2])  # tops, bottoms, footwear, bags
    parity = np.arange(600) % 2
    store = build(convnet, fashion, tmp_path / "s.zarr", layers=["logits"],
                  labels={"coarse": lambda y: coarse[y], "parity": {"train": parity,
                                                                      "test": np.arange(200) % 2}})
    for split in store.splits:
        y = store.labels(split)
        np.testing.assert_array_equal(store.labels(split, "coarse"), coarse[y])
        np.testing.assert_array_equal(store.labels(split, "parity"), store.index(split) % 2)
    assert store.label_names("train") == ["coarse", "parity", "y"]
    with pytest.raises(engine.LabelNotFoundError, match="it has"):
        store.labels("train", "fine")


def test_unknown_layer_and_device(tmp_path, fashion, convnet):
    with pytest.raises(engine.LayerNotFoundError, match="conv1_preact"):
        build(convnet, fashion, tmp_path / "a.zarr", layers=["conv1_preakt"])
    with pytest.raises(engine.InvalidArgumentError, match="does not exist"):
        build(convnet, fashion, tmp_path / "b.zarr", device="cuda:7")
    assert not (tmp_path / "a.zarr").exists()


def test_memory_is_bounded_by_blocks(tmp_path, fashion, convnet, monkeypatch):
    sizes = []
    original = _writer.BlockWriter.put

    def spy(self, block):
        sizes.append(block.stop - block.start)
        original(self, block)

    monkeypatch.setattr(_writer.BlockWriter, "put", spy)
    store = build(convnet, fashion, tmp_path / "s.zarr", batch_size=32, block_bytes=2 << 20)
    block_rows = store.meta.config.block_rows
    row_bytes = sum(store.layer_info(k)["dim"] for k in store.layers) * 2
    assert block_rows % 32 == 0 and block_rows * row_bytes <= 2 << 20
    assert max(sizes) == block_rows and len(sizes) >= 600 // block_rows
    for split in store.splits:
        for layer in store.layers:
            chunk = store.features(split, layer).chunks[0]
            assert block_rows % chunk == 0


@pytest.mark.gpu
def test_cuda_capture_matches_cpu(tmp_path):
    model = _resnet18()
    data = {"train": random_images(40, (3, 64, 64), classes=5)}
    kw = dict(layers=["maxpool", "layer?.?"], reduce="pool", dtype="float32", valid_size=0,
              batch_size=16)
    cpu = build(model, data, tmp_path / "cpu.zarr", device="cpu", **kw)
    gpu = build(model, data, tmp_path / "gpu.zarr", device="cuda", **kw)
    assert next(model.parameters()).device.type == "cpu"  # moved back
    for layer in cpu.layers:
        np.testing.assert_allclose(gpu.read("train", layer), cpu.read("train", layer),
                                   rtol=1e-3, atol=1e-4, err_msg=layer)
    bf16 = build(model, data, tmp_path / "bf16.zarr", device="cuda", autocast="bfloat16",
                 channels_last=True, **{**kw, "dtype": "bfloat16"})
    for layer in cpu.layers:
        ref = cpu.read("train", layer)
        err = np.linalg.norm(bf16.read("train", layer) - ref) / np.linalg.norm(ref)
        assert err < 3e-2, (layer, err)


class _Skipping(nn.Module):
    """Runs its second layer only on the first three calls (the two passes of the first rows
    and the first batch): data-dependent control flow."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(784, 8), nn.Linear(8, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        h = self.a(x.flatten(1))
        return self.b(h) if self.calls <= 3 else h


def test_a_site_that_stops_firing_is_an_error_not_stale_rows(tmp_path, fashion):
    path = tmp_path / "s.zarr"
    with pytest.raises(engine.ProbeEngineError, match="data-dependent control flow"):
        build(_Skipping(), fashion["test"], path, layers=["a", "b"], valid_size=0,
              batch_size=32, block_bytes=1)
    store = engine.open_store(path)
    assert store.committed("train") == 32 and store.verify().ok


def test_interrupted_creation_is_resumable(tmp_path, fashion, convnet, monkeypatch):
    path = tmp_path / "s.zarr"
    original = engine.format.ensure_arrays

    def half(group, meta, indices, **kw):
        original(group, dataclasses.replace(meta, layers=meta.layers[:3]), indices, **kw)
        raise KeyboardInterrupt("killed while creating arrays")

    monkeypatch.setattr(engine.format, "ensure_arrays", half)
    with pytest.raises(KeyboardInterrupt):
        build(convnet, fashion["test"], path)
    monkeypatch.setattr(engine.format, "ensure_arrays", original)
    store = build(convnet, fashion["test"], path)
    assert store.complete and store.verify().ok and len(store.layers) == 10


def test_bad_arguments_fail_before_anything_is_written(tmp_path, fashion, convnet):
    for kw, match in [({"compressor": "gzip"}, "compressor"), ({"batch_size": 0}, "batch_size"),
                      ({"dtype": "int8"}, "dtype"), ({"nan_policy": "drop"}, "nan_policy"),
                      ({"sites": ("middle",)}, "sites")]:
        with pytest.raises(engine.InvalidArgumentError, match=match):
            build(convnet, fashion["test"], tmp_path / "s.zarr", **kw)
        assert not (tmp_path / "s.zarr").exists()


def test_model_spread_over_devices_is_not_moved(tmp_path, fashion):
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 4))
    run = Runner(model, "cpu")
    assert run.home == torch.device("cpu") and not run.moves
    model.register_buffer("elsewhere", torch.zeros(1, device="meta"))
    run = Runner(model, "cpu")
    assert run.home is None and not run.moves


def test_dataloader_workers_give_the_same_store(tmp_path, fashion, convnet):
    kw = dict(layers=["conv2_postpool", "logits"], batch_size=64)
    plain = build(convnet, fashion["test"], tmp_path / "a.zarr", **kw)
    loader = DataLoader(fashion["test"], batch_size=64, num_workers=2)
    workers = build(convnet, loader, tmp_path / "b.zarr", **kw)
    for split in plain.splits:
        for layer in plain.layers:
            assert plain.read(split, layer).tobytes() == workers.read(split, layer).tobytes()
