"""engine._zarr: every assumption probe-engine makes of zarr-python beyond its public API,
checked against the installed zarr, so that a new zarr release fails here first, by name."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from engine import _zarr


def test_the_installed_zarr_is_the_minor_version_the_assumptions_were_checked_on():
    assert _zarr.version() == _zarr.TESTED, (
        f"zarr {zarr.__version__}: check the assumptions of engine/_zarr.py against it, then "
        f"update TESTED and the pin in pyproject.toml")


def test_local_store_writes_every_key_through_local_put(tmp_path, monkeypatch):
    written = []
    real = getattr(*_zarr.LOCAL_PUT)

    def put(path, value, exclusive=False):
        written.append((path.relative_to(tmp_path).as_posix(), _zarr.buffer_bytes(value)))
        return real(path, value, exclusive)

    monkeypatch.setattr(*_zarr.LOCAL_PUT, put)
    group = zarr.open_group(_zarr.open_zarr_store(tmp_path, read_only=False), mode="w")
    arr = group.create_array("a", shape=(4,), chunks=(2,), dtype="int64")
    arr[:] = np.arange(4)
    keys = [k for k, _ in written]
    assert "zarr.json" in keys and "a/zarr.json" in keys
    assert {"a/c/0", "a/c/1"} <= set(keys)
    assert all(isinstance(data, bytes) and data for _, data in written)


def test_keys_are_written_aside_under_the_temp_file_pattern_then_renamed(tmp_path):
    target = tmp_path / "key"
    with _zarr.write_aside(target, "wb", False) as f:
        f.write(b"data")
        aside = _zarr.temp_files(tmp_path)
        assert len(aside) == 1 and aside[0] != target and not target.exists()
    assert target.read_bytes() == b"data" and _zarr.temp_files(tmp_path) == []
    assert _zarr.TEMP_FILE.search(_zarr.temp_path(target).name)
    _zarr.temp_path(tmp_path / "left").write_bytes(b"half")  # what a kill leaves
    (tmp_path / "empty").mkdir()
    assert _zarr.remove_temp_files(tmp_path) == 2 and sorted(p.name for p in
                                                             tmp_path.iterdir()) == ["key"]


def test_blosc_encodes_each_chunk_through_its_encoder(tmp_path, monkeypatch):
    from zarr.codecs import BloscCodec, Crc32cCodec

    calls = []
    real = getattr(*_zarr.BLOSC_ENCODE)

    async def encode(self, chunk, spec):
        calls.append(spec.shape)
        return await real(self, chunk, spec)

    monkeypatch.setattr(*_zarr.BLOSC_ENCODE, encode)
    arr = zarr.create_array(_zarr.open_zarr_store(tmp_path, read_only=False), shape=(6,),
                            chunks=(2,), dtype="float32",
                            compressors=[BloscCodec(cname="lz4"), Crc32cCodec()])
    arr[:] = np.ones(6, dtype=np.float32)
    assert len(calls) == 3


def test_store_queries_and_errors(tmp_path):
    store = _zarr.open_zarr_store(tmp_path / "s", read_only=False)
    group = zarr.open_group(store, mode="w")
    group.create_array("x", shape=(3,), chunks=(1,), dtype="int8")[:] = [1, 2, 3]
    assert _zarr.exists(store, "x/zarr.json")
    assert _zarr.exists_many(store, ["x/c/0", "x/c/9", "zarr.json"]) == [True, False, True]
    assert sorted(_zarr.list_prefix(store, "x/c/")) == ["x/c/0", "x/c/1", "x/c/2"]
    _zarr.delete_all(store)
    assert not (tmp_path / "s" / "zarr.json").exists()
    with pytest.raises((_zarr.GroupNotFoundError, FileNotFoundError)):
        zarr.open_group(_zarr.open_zarr_store(tmp_path / "none", read_only=True), mode="r")
    memory = _zarr.open_zarr_store("memory://compat/s.zarr", read_only=False)
    assert type(memory).__name__ == "FsspecStore"
