import gzip
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from engine.datasets import (
    FASHION_MNIST_CLASSES,
    ArrayDataset,
    Batch,
    fashion_mnist,
    image_folder,
    read_idx,
)
from engine.errors import DataError, DatasetNotFoundError

TEST_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
TRAIN_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")


def _load(split):
    try:
        return fashion_mnist(split)
    except DatasetNotFoundError as exc:  # `make test` installs it; say why when it did not
        pytest.skip(f"Fashion-MNIST not installed: {exc}")


@pytest.fixture(scope="module")
def train():
    return _load("train")


@pytest.fixture(scope="module")
def test():
    return _load("test")


def write_idx(path, array, magic=None):
    """Write a uint8 array as an IDX file (gzip-compressed when path ends in .gz)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = 0x0800 | array.ndim if magic is None else magic
    data = magic.to_bytes(4, "big")
    data += b"".join(int(d).to_bytes(4, "big") for d in array.shape) + array.tobytes()
    with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as f:
        f.write(data)


def tiny_split(folder, n=5, prefix="t10k", gz=False, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    ext = ".gz" if gz else ""
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", images)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", labels)
    return images, labels


# ---------------------------------------------------------------- real Fashion-MNIST


def test_lengths_shapes_dtypes(train, test):
    assert len(train) == 60_000 and len(test) == 10_000
    for ds in (train, test):
        x, y = ds[0]
        assert x.shape == (1, 28, 28) and x.dtype == torch.float32
        assert isinstance(y, int) and 0 <= y < 10
        assert ds.targets.dtype == np.int64 and ds.targets.shape == (len(ds),)
        assert ds.targets.min() == 0 and ds.targets.max() == 9
        assert ds.classes == list(FASHION_MNIST_CLASSES)
        assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"
    assert train.source == "fashion-mnist/train" and test.source == "fashion-mnist/test"
    # Balanced classes: 6,000 / 1,000 of each.
    assert np.bincount(train.targets).tolist() == [6000] * 10
    assert np.bincount(test.targets).tolist() == [1000] * 10


def test_normalisation(train):
    idx = np.random.default_rng(0).choice(len(train), 4000, replace=False).tolist()
    x = train.__getitems__(idx).inputs
    assert abs(x.mean().item()) < 0.05
    assert abs(x.std().item() - 1.0) < 0.05
    raw = fashion_mnist("train", normalize=False)
    r = raw.__getitems__(idx).inputs
    assert r.min() >= 0 and r.max() <= 1
    torch.testing.assert_close(x, (r - 0.2860) / 0.3530)


def test_getitems_equals_stacked_getitem(test):
    idx = [0, 9999, 17, 17, 4242, -1]
    batch = test.__getitems__(idx)
    assert isinstance(batch, Batch)
    assert batch.inputs.shape == (len(idx), 1, 28, 28) and batch.inputs.dtype == torch.float32
    assert batch.labels.dtype == torch.int64
    items = [test[i] for i in idx]
    assert torch.equal(batch.inputs, torch.stack([x for x, _ in items]))
    assert batch.labels.tolist() == [y for _, y in items]
    assert batch.labels.tolist() == test.targets[idx].tolist()


def test_dataloader_passes_batches_through(test):
    loader = DataLoader(test, batch_size=4096, collate_fn=lambda b: b)
    batches = list(loader)
    assert all(isinstance(b, Batch) for b in batches)
    assert sum(len(b.labels) for b in batches) == 10_000
    assert torch.cat([b.labels for b in batches]).tolist() == test.targets.tolist()


def test_plain_idx_files_via_root(tmp_path, test):
    for name in TEST_FILES:
        src = test.files[0].parent / (name + ".gz")
        if not src.exists():  # the installed copy may itself be plain
            src = test.files[0].parent / name
            shutil.copyfile(src, tmp_path / name)
            continue
        with gzip.open(src, "rb") as f, open(tmp_path / name, "wb") as g:
            shutil.copyfileobj(f, g)
    plain = fashion_mnist("test", root=tmp_path)
    assert plain.files == (tmp_path / TEST_FILES[0], tmp_path / TEST_FILES[1])
    np.testing.assert_array_equal(plain.targets, test.targets)
    np.testing.assert_array_equal(read_idx(plain.files[0]), read_idx(test.files[0]))
    idx = list(range(0, 10_000, 7))
    assert torch.equal(plain.__getitems__(idx).inputs, test.__getitems__(idx).inputs)


# ---------------------------------------------------------------- IDX parsing and lookup


@pytest.mark.parametrize("gz", [False, True])
def test_tiny_files_via_root(tmp_path, gz):
    images, labels = tiny_split(tmp_path, gz=gz)
    ds = fashion_mnist("test", root=tmp_path, normalize=False)
    assert len(ds) == 5
    np.testing.assert_array_equal(ds.targets, labels)
    x, y = ds[3]
    np.testing.assert_allclose(x[0].numpy(), images[3] / 255.0, rtol=1e-6)
    assert y == labels[3]


def test_env_folder_is_used(tmp_path, monkeypatch):
    _, labels = tiny_split(tmp_path / "fashion-mnist", n=3, prefix="train")
    monkeypatch.setenv("PROBE_ENGINE_DATA", str(tmp_path))
    ds = fashion_mnist("train")
    assert len(ds) == 3
    np.testing.assert_array_equal(ds.targets, labels)


def test_bad_magic_names_the_path(tmp_path):
    tiny_split(tmp_path)
    bad = tmp_path / TEST_FILES[0]
    write_idx(bad, np.zeros((2, 28, 28)), magic=0x12345678)
    with pytest.raises(DataError, match=str(bad)):
        fashion_mnist("test", root=tmp_path)


def test_labels_file_with_image_magic(tmp_path):
    tiny_split(tmp_path)
    bad = tmp_path / TEST_FILES[1]
    write_idx(bad, np.zeros((5, 2, 2)))
    with pytest.raises(DataError, match=str(bad)):
        fashion_mnist("test", root=tmp_path)


def test_truncated_and_non_gzip_files(tmp_path):
    tiny_split(tmp_path)
    path = tmp_path / TEST_FILES[0]
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="data bytes"):
        fashion_mnist("test", root=tmp_path)
    path.unlink()
    (tmp_path / (TEST_FILES[0] + ".gz")).write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=str(tmp_path / TEST_FILES[0])):
        fashion_mnist("test", root=tmp_path)


def test_count_mismatch_and_bad_labels(tmp_path):
    tiny_split(tmp_path)
    write_idx(tmp_path / TEST_FILES[1], np.zeros(4))
    with pytest.raises(DataError, match="5 images but"):
        fashion_mnist("test", root=tmp_path)
    write_idx(tmp_path / TEST_FILES[1], np.array([0, 1, 2, 3, 10]))
    with pytest.raises(DataError, match="out of range"):
        fashion_mnist("test", root=tmp_path)


def test_empty_root_not_found(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        fashion_mnist("train", root=tmp_path)
    msg = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert str(tmp_path) in msg and "train-images-idx3-ubyte" in msg
    # Only the given root is searched: the test split there does not satisfy "train".
    tiny_split(tmp_path)
    with pytest.raises(DatasetNotFoundError):
        fashion_mnist("train", root=tmp_path)


def test_bad_split():
    with pytest.raises(DataError, match="'val'"):
        fashion_mnist("val")


# ---------------------------------------------------------------- ArrayDataset


def test_array_dataset_rgb_and_validation():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).view(2, 3, 4, 4)
    ds = ArrayDataset(images, np.array([1, 0]), ["a", "b"], mean=(0.5, 0.5, 0.5), std=0.25)
    x, y = ds[0]
    assert x.shape == (3, 4, 4) and y == 1
    torch.testing.assert_close(x, (images[0].float() / 255 - 0.5) / 0.25)
    assert ds.image_shape == (3, 4, 4) and ds.source == "array"
    with pytest.raises(DataError, match="labels must lie"):
        ArrayDataset(images, [0, 2], ["a", "b"])
    with pytest.raises(DataError, match="shape"):
        ArrayDataset(images, [0], ["a", "b"])
    with pytest.raises(DataError, match="integers"):
        ArrayDataset(images, [0.0, 1.0], ["a", "b"])
    with pytest.raises(DataError, match="mean needs"):
        ArrayDataset(images, [0, 1], ["a", "b"], mean=(0.1, 0.2), std=1.0)
    with pytest.raises(DataError, match="empty"):
        ArrayDataset(images[:0], [], ["a", "b"])
    with pytest.raises(IndexError):
        ds[2]


def test_array_dataset_accepts_read_only_numpy():
    images = np.zeros((2, 5, 5), dtype=np.uint8)
    images.setflags(write=False)
    ds = ArrayDataset(images, np.array([0, 1], dtype=np.int32), ["a", "b"])
    assert ds[1][0].shape == (1, 5, 5) and ds.targets.dtype == np.int64


# ---------------------------------------------------------------- image folders


@pytest.fixture
def png_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        d = tmp_path / "val" / cls
        d.mkdir(parents=True)
        for k in range(3):
            pixels = rng.integers(0, 256, size=(40 + 7 * k, 50, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(d / f"{k}.png")
    return tmp_path


def test_image_folder(png_folder):
    ds = image_folder(png_folder, "val", size=32)
    assert len(ds) == 6 and ds.classes == ["cat", "dog"]
    assert [y for _, y in ds.samples] == [0, 0, 0, 1, 1, 1]
    x, y = ds[4]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 1
    # Without split the class folders sit directly under root.
    assert len(image_folder(png_folder / "val", size=16, resize=20)) == 6


def test_image_folder_missing(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="val") as info:
        image_folder(tmp_path, "val")
    assert str(tmp_path / "val") in str(info.value) and "<class>" in str(info.value)
    (tmp_path / "val").mkdir()
    with pytest.raises(DatasetNotFoundError, match="holds no images"):
        image_folder(tmp_path, "val")


def test_subset_keeps_classes_normalisation_and_says_where_it_came_from():
    rng = np.random.default_rng(0)
    ds = ArrayDataset(rng.integers(0, 256, (10, 1, 4, 4), dtype=np.uint8), np.arange(10) % 3,
                      ["a", "b", "c"], mean=0.5, std=0.25, source="toy")
    sub = ds.subset(2, 6)
    assert len(sub) == 4 and sub.classes == ds.classes and sub.source == "toy[2:6]"
    for i in range(4):
        x, y = sub[i]
        x0, y0 = ds[i + 2]
        assert y == y0 and torch.equal(x, x0)
    assert len(ds.subset(7)) == 3 and ds.subset(7).source == "toy[7:]"


def test_collate_passes_batches_through_and_stacks_items():
    from engine.datasets import Batch, collate

    b = Batch(torch.zeros(2, 1, 4, 4), torch.tensor([0, 1]))
    assert collate(b) is b
    x, y = collate([(torch.ones(3), 1), (torch.zeros(3), 0)])
    assert x.shape == (2, 3) and y.tolist() == [1, 0]
