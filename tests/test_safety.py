"""Safety: no pickle in stores or results, checkpoints read with weights_only=True, and no
name a caller passes can put a file outside the store."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import engine
from benchmarks import _bad_inputs as B
from engine import cli

ENGINE = Path(engine.__file__).resolve().parent
#: pickle protocol 2-5 headers (protocol 0/1 have no header; their opcodes are text and
#: would fail the JSON / codec checks below)
PICKLE_HEADERS = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
NUMERIC = {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
           "float16", "float32", "float64"}


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def _scan(root: Path) -> tuple[int, int]:
    """Assert nothing under ``root`` is a pickle; (files, zarr.json files) scanned."""
    files = sorted(_files(root))
    metas = 0
    for f in files:
        head = f.read_bytes()[:2]
        assert head not in PICKLE_HEADERS, f"{f} starts with a pickle header"
        if f.name == "zarr.json":
            metas += 1
            doc = json.loads(f.read_text())  # JSON, or this raises
            text = json.dumps(doc).lower()
            assert "pickle" not in text, f"{f} names a pickle codec"
            if doc.get("node_type") == "array":
                assert doc["data_type"] in NUMERIC, f"{f}: data_type {doc['data_type']}"
                codecs = [c["name"] for c in doc["codecs"]]
                assert set(codecs) <= {"bytes", "blosc", "crc32c", "zstd", "gzip"}, codecs
    return len(files), metas


def test_no_pickle_in_a_built_and_solved_store_nor_in_a_report(tmp_path):
    path = tmp_path / "s.zarr"
    store = engine.build_store(
        B.tiny_model(), B.tiny_splits(), path, **{**B.BUILD, "layers": ["conv", "fc"]},
        reduce={"conv": "subsample:20"}, labels={"parity": lambda y: y % 2})
    store.add_labels("coarse", lambda y: np.minimum(y, 1))
    results = engine.solve(path, l2=[1e-3, 1e-2], progress=False, device="cpu")
    engine.solve(path, label="coarse", l2=1e-3, solver="sgd", epochs=2, run="sgd",
                 progress=False, device="cpu")
    files, metas = _scan(path)
    # the scan saw features, labels, index, subsample indices and both runs' probes
    assert metas >= 20 and files > metas
    for sub in ("reductions/conv/indices", "probes/default/fc/W", "probes/sgd/conv/b",
                "train/labels/coarse", "valid/labels/parity"):
        assert (path / sub / "zarr.json").exists(), sub
    page = engine.report(results, tmp_path / "report")
    files, _ = _scan(page.parent)
    assert files >= 4


def test_a_pickle_would_be_caught(tmp_path):
    """The scan is not vacuous: a pickled object, or an object-dtype array, fails it."""
    import pickle

    (tmp_path / "a").write_bytes(pickle.dumps({"x": 1}, protocol=4))
    with pytest.raises(AssertionError, match="pickle header"):
        _scan(tmp_path)
    (tmp_path / "a").unlink()
    (tmp_path / "zarr.json").write_text(json.dumps(
        {"node_type": "array", "data_type": "object", "codecs": [{"name": "bytes"}]}))
    with pytest.raises(AssertionError, match="data_type"):
        _scan(tmp_path)


def _torch_load_calls(tree: ast.AST):
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load" and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"):
            yield node


def test_every_torch_load_in_the_engine_is_weights_only():
    calls = 0
    for f in sorted(ENGINE.rglob("*.py")):
        tree = ast.parse(f.read_text(), str(f))
        for node in _torch_load_calls(tree):
            calls += 1
            kw = {k.arg: k.value for k in node.keywords}
            assert "weights_only" in kw, f"{f.name}:{node.lineno}: torch.load without it"
            value = kw["weights_only"]
            assert isinstance(value, ast.Constant) and value.value is True, \
                f"{f.name}:{node.lineno}: weights_only is not the constant True"
        # nothing else that unpickles files
        src = f.read_text()
        assert "allow_pickle=True" not in src, f.name
        assert "pickle.load(" not in src, f.name
    assert calls >= 2  # models.load_model and sweep read checkpoints


class Evil:
    """Unpickling this would create a file: the proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_checkpoint_holding_code_is_refused(tmp_path, capsys):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"conv1_preact.weight": Evil(marker)}, evil)
    with pytest.raises(Exception, match="weights_only") as info:  # torch's UnpicklingError
        engine.models.load_model("mnist_convnet", weights=evil)
    assert not isinstance(info.value, AssertionError)
    with pytest.raises(Exception, match="weights_only"):
        engine.sweep(B.tiny_model, {"bad": evil}, B.tiny_splits(), tmp_path / "sweep",
                     layers=["fc"], progress=False)
    rc = cli.main(["build", str(tmp_path / "s.zarr"), "--weights", str(evil), "--limit", "16",
                   "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and str(evil) in err and "weights_only=True" in err
    assert not marker.exists(), "code in the checkpoint ran"
    assert not (tmp_path / "s.zarr").exists()


BAD_NAMES = ["../x", "a/../../b", "/tmp/abs", "a\x00b", "..", ".", "", "x\\..\\y", ".hidden",
             "zarr.json"]


@pytest.fixture
def sandbox(tmp_path):
    """tmp_path/inner holds the store; anything that appears beside it escaped."""
    inner = tmp_path / "inner"
    inner.mkdir()
    yield inner
    outside = {p for p in tmp_path.rglob("*") if inner not in p.parents and p != inner}
    assert not outside, f"files outside the store's folder: {outside}"


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_split_and_label_names_are_refused_before_writing(name, sandbox):
    with pytest.raises(engine.DataError, match="cannot name a folder|is empty|must be"):
        B._build(sandbox, data={"train": B.tiny_data(40), name: B.tiny_data(12, seed=1)})
    with pytest.raises(engine.DataError):
        B._build(sandbox, labels={name: lambda y: y % 2})
    assert not (sandbox / "s.zarr").exists()


def test_split_names_cannot_take_the_store_folders(sandbox):
    for name in ("probes", "reductions"):
        with pytest.raises(engine.DataError, match="taken by the store"):
            B._build(sandbox, data={"train": B.tiny_data(40), name: B.tiny_data(12)})


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_store_level_names_are_refused(name, sandbox):
    path = B.base_store(sandbox, solved=True)
    before = {p: p.read_bytes() for p in _files(path)}
    store = engine.open_store(path)
    with pytest.raises(engine.InvalidArgumentError, match="label name"):
        store.add_labels(name, lambda y: y % 2)
    with pytest.raises(engine.InvalidArgumentError, match="run name"):
        engine.solve(path, l2=1e-3, run=name, progress=False, device="cpu")
    with pytest.raises(engine.InvalidArgumentError, match="run name"):
        store.results(name)
    with pytest.raises(engine.LayerNotFoundError):
        store.read("train", name)
    with pytest.raises(engine.LabelNotFoundError):
        store.labels("train", name)
    with pytest.raises((engine.LayerNotFoundError, engine.ReductionError)):
        B._build(sandbox, name="t.zarr", reduce={name: "pool"})
    assert {p: p.read_bytes() for p in _files(path)} == before
    assert sorted(p.name for p in sandbox.iterdir()) == ["s.zarr"]


@pytest.mark.parametrize("name", ["../x", "a/../../b", "/abs", "a\x00b"], ids=repr)
def test_a_mapping_source_writes_nothing_whatever_its_keys(name, sandbox):
    """solve() on in-memory arrays keeps them in memory: odd layer names are results-table
    labels, never paths."""
    f, y = B._mapping()
    results = engine.solve({name: f["h"]}, labels=y, l2=1e-3, progress=False, device="cpu")
    assert list(results.table.layer.unique()) == [name]
    assert not any(sandbox.iterdir())


@pytest.mark.parametrize("name", ["a/b", "/abs", "a\x00b", "__x"], ids=repr)
def test_module_names_that_cannot_be_stored_are_refused(name, sandbox):
    model = B.tiny_model()
    model.add_module(name, torch.nn.Identity())
    original = model.forward

    def forward(x):
        return getattr(model, name)(original(x))

    model.forward = forward
    with pytest.raises(engine.InvalidArgumentError, match="cannot name an array"):
        B._build(sandbox, model=model, layers=[name])
    assert not (sandbox / "s.zarr").exists()
