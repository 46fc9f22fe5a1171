"""Export of probe results (engine/_export.py): weights as safetensors and NumPy .npz, tables
as Parquet, each read back bit for bit and by the other tools on their own."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import safetensors
import safetensors.numpy

import engine
from engine import ProbeResults
from engine.errors import DataError, InvalidArgumentError, MissingDependencyError

L2 = [1e-3, 1e-2]


@pytest.fixture(scope="module")
def results() -> ProbeResults:
    """A real solve of two small random layers (one named with dots, as module names are), 3
    classes, two lambdas chosen between on 'valid'."""
    rng = np.random.default_rng(0)
    y = {"train": rng.integers(0, 3, 90), "valid": rng.integers(0, 3, 30)}
    features = {split: {"blocks.0.mlp": rng.normal(size=(len(v), 7)).astype(np.float32)
                        + v[:, None].astype(np.float32),
                        "head": rng.normal(size=(len(v), 4)).astype(np.float32)}
                for split, v in y.items()}
    return engine.solve(features, labels=y, l2=L2, progress=False, device="cpu")


def assert_same_weights(got: dict, want: dict) -> None:
    assert list(got) == list(want)  # the layer order too
    for layer, (w, b) in want.items():
        assert got[layer][0].dtype == got[layer][1].dtype == np.float32
        np.testing.assert_array_equal(got[layer][0], w, strict=True)
        np.testing.assert_array_equal(got[layer][1], b, strict=True)


def default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def test_safetensors_round_trip_and_read_by_safetensors_alone(results, tmp_path):
    path = tmp_path / "probes.safetensors"
    results.save_weights(path)
    assert_same_weights(ProbeResults.load_weights(path), results.weights)
    assert path.stat().st_mode & 0o777 == default_mode()  # not the temporary file's 0600

    tensors = safetensors.numpy.load_file(path)
    assert set(tensors) == {f"{layer}/{p}" for layer in results.weights for p in "Wb"}
    for layer, (w, b) in results.weights.items():
        np.testing.assert_array_equal(tensors[f"{layer}/W"], w, strict=True)
        np.testing.assert_array_equal(tensors[f"{layer}/b"], b, strict=True)
    with safetensors.safe_open(path, framework="np") as f:
        meta = json.loads(f.metadata()["probe_engine"])
    assert meta["config"] == results.config and meta["config"]["l2"] == L2
    assert meta["run"] is None and meta["path"] is None  # solved from arrays: no store
    assert meta["layers"] == list(results.weights)
    chosen = results.table.drop_duplicates("layer").set_index("layer").l2
    assert meta["l2"] == chosen.to_dict() and set(meta["l2"].values()) <= set(L2)


def test_npz_round_trip_plain_arrays_only(results, tmp_path):
    path = tmp_path / "probes.npz"
    results.save_weights(path)
    assert_same_weights(ProbeResults.load_weights(path), results.weights)
    with np.load(path, allow_pickle=False) as z:  # no object arrays in the file
        assert z.files == [f"{layer}/{p}" for layer in results.weights for p in "Wb"] + [
            "__metadata__"]
        for layer, (w, b) in results.weights.items():
            np.testing.assert_array_equal(z[f"{layer}/W"], w, strict=True)
            np.testing.assert_array_equal(z[f"{layer}/b"], b, strict=True)
        assert json.loads(z["__metadata__"].item())["config"] == results.config

    # the format may be named instead; loading tells the formats apart by content
    other = tmp_path / "probes.bin"
    results.save_weights(other, format="npz")
    assert other.read_bytes() == path.read_bytes()
    assert_same_weights(ProbeResults.load_weights(other), results.weights)


def test_bad_suffix_or_format_is_refused_naming_the_path(results, tmp_path):
    with pytest.raises(InvalidArgumentError, match=r"probes\.pt.*\.safetensors or \*\.npz"):
        results.save_weights(tmp_path / "probes.pt")
    with pytest.raises(InvalidArgumentError, match=r"format='pt'.*\['npz', 'safetensors'\]"):
        results.save_weights(tmp_path / "probes.npz", format="pt")
    with pytest.raises(InvalidArgumentError, match=r"folder .*nowhere does not exist"):
        results.to_parquet(tmp_path / "nowhere" / "t.parquet")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name, module, writer", [
    ("w.safetensors", safetensors.numpy, "save"),
    ("w.npz", np, "savez"),
    ("t.parquet", pq, "write_table"),
])
def test_a_failed_write_leaves_the_old_file_and_nothing_else(results, tmp_path, monkeypatch,
                                                             name, module, writer):
    def full_disk(*args, **kwargs):  # writes part of the file (if it has one), then fails
        target = next((a for a in args if isinstance(a, (str, os.PathLike)) or
                       hasattr(a, "write")), None)
        if hasattr(target, "write"):
            target.write(b"partial")
        elif target is not None:
            with open(target, "wb") as f:
                f.write(b"partial")
        raise OSError(28, "No space left on device")

    path = tmp_path / name
    path.write_bytes(b"old")
    monkeypatch.setattr(module, writer, full_disk)
    with pytest.raises(OSError, match="No space left"):
        results.to_parquet(path) if name.endswith(".parquet") else results.save_weights(path)
    assert path.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("grid", [False, True])
def test_parquet_round_trip_with_the_config(results, tmp_path, grid):
    path = tmp_path / "t.parquet"
    results.to_parquet(path, grid=grid)
    want = results.grid if grid else results.table
    pd.testing.assert_frame_equal(pd.read_parquet(path), want)  # dtypes and index too
    meta = json.loads(pq.read_schema(path).metadata[b"probe_engine"])
    assert meta["config"] == results.config and meta["table"] == ("grid" if grid else "table")
    if grid:
        assert len(want) == 2 * len(L2) and {"layer", "l2", "valid_top1_error"} <= set(want)


def test_parquet_with_missing_values(results, tmp_path):
    """A column of Nones (``seconds`` of probes saved without it) and NaN errors (top-5 with
    3 classes) write and read back as they were."""
    table = results.table.assign(seconds=None)
    assert table.seconds.dtype == object and results.table.top5_error.isna().all()
    path = tmp_path / "t.parquet"
    dataclasses.replace(results, table=table).to_parquet(path)
    pd.testing.assert_frame_equal(pd.read_parquet(path), table)


def test_missing_optional_dependency_says_what_to_install(results, tmp_path, monkeypatch):
    for name in ("safetensors", "safetensors.numpy", "pyarrow", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    with pytest.raises(MissingDependencyError, match=r"pip install safetensors .*\[export\]"):
        results.save_weights(tmp_path / "w.safetensors")
    with pytest.raises(ModuleNotFoundError, match="pip install pyarrow"):
        results.to_parquet(tmp_path / "t.parquet")
    results.save_weights(tmp_path / "w.npz")  # numpy alone
    assert [p.name for p in tmp_path.iterdir()] == ["w.npz"]


def test_load_refuses_what_save_weights_did_not_write(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    with pytest.raises(DataError, match="junk.safetensors is neither a safetensors nor"):
        ProbeResults.load_weights(junk)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, **{"a/W": np.array([{"x": 1}], dtype=object)})
    with pytest.raises(DataError, match="pickled.npz: .*plain numeric arrays"):
        ProbeResults.load_weights(pickled)
    stray = tmp_path / "stray.npz"
    np.savez(stray, **{"a/W": np.zeros((3, 2), np.float32), "a/bias": np.zeros(2, np.float32)})
    with pytest.raises(DataError, match=r"stray.npz: tensor 'a/bias' is not named"):
        ProbeResults.load_weights(stray)
    half = tmp_path / "half.safetensors"
    safetensors.numpy.save_file({"a/W": np.zeros((3, 2), np.float32)}, half)
    with pytest.raises(DataError, match=r"half.safetensors: layer 'a' needs W \(D, C\) and b"):
        ProbeResults.load_weights(half)
