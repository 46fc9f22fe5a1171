"""The bad-input catalogue: every way a caller can hand probe-engine something wrong, as data.

Each :class:`Case` performs one bad call (through the API or the ``probe-engine`` command line)
in a fresh temporary folder and says what must come back: the error class (for the command
line, the exit status) and fragments that the message must contain, so that it names the
layer / split / path / label / chunk and says what to do. ``check``, when given, then asserts
that nothing already written was lost (a store still verifies, a file is unchanged, ...).

``tests/test_bad_input.py`` runs every case; ``python -m benchmarks.reliability`` counts
"bad inputs with a clear error / tried" with :func:`run_case`; ``docs/errors.md`` has one
row per case name (a test keeps them in step).

Fragments may hold ``{tmp}`` (the case's folder); they are matched case-sensitively against
``str(error)`` plus any notes the error carries (``BaseException.add_note``), or against
what the command line printed on stderr.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import os
import shutil
import tempfile
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import engine
from engine import cli
from engine.datasets import ArrayDataset
from engine.errors import (
    DataError,
    InvalidArgumentError,
    LabelNotFoundError,
    LayerNotFoundError,
    MemoryBudgetError,
    NonFiniteError,
    ReductionError,
    ReportError,
    RunNotFoundError,
    SplitNotFoundError,
    StoreError,
    StoreExistsError,
    StoreMismatchError,
)

__all__ = ["CASES", "Case", "run_case", "run_all", "skip_reason", "tiny_model", "tiny_data",
           "base_store"]

CLASSES = ("a", "b", "c")
LAYERS = ["relu", "fc"]
#: build options of every tiny store: 8-row blocks (several per split), float32, quiet
BUILD = dict(layers=LAYERS, batch_size=8, block_bytes=2048, dtype="float32", progress=False,
             device="cpu")


# -- tiny fixtures ----------------------------------------------------------------------
class Tiny(nn.Module):
    """conv -> relu -> pool -> flatten -> fc on (C, 6, 6) images, 3 classes."""

    def __init__(self, channels: int = 1, classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        return self.fc(self.flat(self.pool(self.relu(self.conv(x)))))


def tiny_model(seed: int = 0, **kw) -> Tiny:
    torch.manual_seed(seed)
    return Tiny(**kw).eval()


def tiny_data(n: int = 40, seed: int = 0, channels: int = 1) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, channels, 6, 6), dtype=np.uint8)
    return ArrayDataset(images, np.arange(n) % len(CLASSES), CLASSES, source=f"tiny{seed}")


def tiny_splits() -> dict:
    return {"train": tiny_data(40, seed=0), "test": tiny_data(12, seed=1)}


class Items(Dataset):
    """Items given as a list of (input, label): labels of any type, as a user's dataset
    might return them."""

    def __init__(self, labels: list, shape=(1, 6, 6), *, targets: bool = False):
        self.labels = labels
        if targets:  # torchvision's convention: the labels listed up front
            self.targets = list(labels)
        self.x = torch.rand(len(labels), *shape, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.x[i], self.labels[i]


_CACHE: dict[str, Path] = {}


def _cache_dir() -> Path:
    if "dir" not in _CACHE:
        _CACHE["dir"] = Path(tempfile.mkdtemp(prefix="probe-engine-bad-inputs-"))
        atexit.register(shutil.rmtree, _CACHE["dir"], ignore_errors=True)
    return _CACHE["dir"]


def base_store(tmp: Path, name: str = "s.zarr", *, solved: bool = False) -> Path:
    """A copy, at ``tmp/name``, of a complete tiny store (built once per process), with a
    solved run "default" when ``solved``."""
    key = "solved" if solved else "plain"
    if key not in _CACHE:
        path = _cache_dir() / f"{key}.zarr"
        engine.build_store(tiny_model(), tiny_splits(), path, **BUILD)
        if solved:
            engine.solve(path, l2=1e-3, progress=False, device="cpu")
        _CACHE[key] = path
    dest = Path(tmp) / name
    shutil.copytree(_CACHE[key], dest)
    return dest


def _snapshot(path: Path) -> dict[str, Any]:
    """Every file under ``path``: its bytes, or for JSON metadata its parsed content."""
    return {str(p.relative_to(path)): json.loads(p.read_text()) if p.suffix == ".json"
            else p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _unchanged(name: str = "s.zarr") -> Callable[[Path], None]:
    """A check: the store is byte for byte the pristine copy, and verifies."""

    def check(tmp: Path) -> None:
        path = Path(tmp) / name
        pristine = _CACHE["solved"] if (path / "probes").exists() else _CACHE["plain"]
        assert _snapshot(path) == _snapshot(pristine), f"{path} changed"
        report = engine.open_store(path).verify()
        assert report.ok, str(report)

    return check


def _absent(name: str) -> Callable[[Path], None]:
    def check(tmp: Path) -> None:
        assert not (Path(tmp) / name).exists(), f"{name} was created"

    return check


# -- the catalogue ------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One bad input: ``call(tmp)`` must raise ``expected`` (an exception class; for
    ``where == "cli"`` an exit status) with every fragment in its message."""

    name: str
    where: str  # "api" | "cli"
    call: Callable[[Path], Any]
    expected: type[BaseException] | int
    fragments: tuple[str, ...]
    check: Callable[[Path], None] | None = None
    #: why the case cannot run here (e.g. root ignores file permissions), or None
    skip: Callable[[], str | None] | None = None


def _build(tmp, *, model=None, data=None, name="s.zarr", **kw):
    opts = {**BUILD, **kw}
    return engine.build_store(model if model is not None else tiny_model(),
                              data if data is not None else tiny_splits(),
                              Path(tmp) / name, **opts)


def _mapping(n: int = 30, dim: int = 5, classes: int = 3) -> tuple[dict, np.ndarray]:
    rng = np.random.default_rng(0)
    return ({"h": rng.normal(size=(n, dim)).astype(np.float32)},
            (np.arange(n) % classes).astype(np.int64))


def _solve_mapping(features=None, labels=None, **kw):
    f, y = _mapping()
    opts = {"l2": 1e-3, "progress": False, "device": "cpu", **kw}
    return engine.solve(features if features is not None else f,
                        labels=labels if labels is not None else y, **opts)


def _set_format(path: Path, version) -> None:
    meta = path / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["probe_engine"]["format"] = version
    meta.write_text(json.dumps(doc))


def _read_only(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        p.chmod(p.stat().st_mode & ~0o222)


def _writable(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        p.chmod(p.stat().st_mode | 0o200)


def _needs_permissions() -> str | None:
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return "root ignores file permissions"
    return None


# build_store ----------------------------------------------------------------------------
def _unknown_layer(tmp):
    _build(tmp, layers=["relu", "fcc"])


def _nan_activations(tmp):
    model = tiny_model()
    with torch.no_grad():
        model.fc.bias[1] = float("nan")
    _build(tmp, model=model)


def _check_nan(tmp):
    store = engine.open_store(Path(tmp) / "s.zarr")
    assert store.verify().ok
    assert store.committed("train") == 0  # the first block held the NaN: nothing committed


def _inf_float16(tmp):
    model = tiny_model()
    with torch.no_grad():
        model.conv.weight.mul_(1e6)  # fine in float32, beyond float16's 65504
    _build(tmp, model=model, dtype="float16")


def _empty_dataset(tmp):
    _build(tmp, data={"train": tiny_data(40), "test": TensorDataset(
        torch.zeros(0, 1, 6, 6), torch.zeros(0, dtype=torch.int64))})


def _single_row(tmp):
    _build(tmp, data=tiny_data(1))


def _labels_out_of_range(tmp):
    _build(tmp, data=Items([0, 1, 2, 7, 1, 0] * 4, targets=True), num_classes=3,
           valid_size=0)


def _labels_out_of_range_streamed(tmp):
    # no `targets` to check up front: found in the batch, after the blocks before it
    _build(tmp, data=Items([0, 1, 2] * 8 + [0, 5, 1, 2] * 2), num_classes=3, valid_size=0)


def _check_consistent(tmp):
    store = engine.open_store(Path(tmp) / "s.zarr")
    report = store.verify()
    assert report.ok, str(report)
    assert store.committed("train") == 24, store.committed("train")  # 3 blocks kept


def _labels_negative(tmp):
    _build(tmp, data=Items([0, 1, -1, 2] * 5), valid_size=0)


def _check_nothing_committed(tmp):
    store = engine.open_store(Path(tmp) / "s.zarr")
    assert store.verify().ok and store.committed("train") == 0


def _labels_float(tmp):
    _build(tmp, data=Items([0.0, 1.0, 2.5] * 5), valid_size=0)


def _labels_string(tmp):
    _build(tmp, data=Items(["cat", "dog", "cat"] * 5), valid_size=0)


class ZeroWidth(Tiny):
    def __init__(self):
        super().__init__()
        with warnings.catch_warnings():  # torch: "Initializing zero-element tensors is a no-op"
            warnings.simplefilter("ignore", UserWarning)
            self.empty = nn.Linear(16, 0)

    def forward(self, x):
        h = self.flat(self.pool(self.relu(self.conv(x))))
        self.empty(h)
        return self.fc(h)


def _zero_width_layer(tmp):
    torch.manual_seed(0)
    _build(tmp, model=ZeroWidth(), layers=["empty", "fc"])


def _path_is_a_file(tmp):
    (Path(tmp) / "s.zarr").write_text("my notes")
    _build(tmp)


def _check_file_kept(tmp):
    assert (Path(tmp) / "s.zarr").read_text() == "my notes"


def _newer_format_open(tmp):
    path = base_store(tmp)
    _set_format(path, 2)
    engine.open_store(path)


def _newer_format_resume(tmp):
    path = base_store(tmp)
    _set_format(path, 2)
    _build(tmp)


def _other_model_resume(tmp):
    base_store(tmp)
    _build(tmp, model=tiny_model(seed=1))


def _other_data_resume(tmp):
    base_store(tmp)
    _build(tmp, data={"train": tiny_data(40, seed=5), "test": tiny_data(12, seed=1)})


def _check_newer_kept(tmp):
    path = Path(tmp) / "s.zarr"
    doc = json.loads((path / "zarr.json").read_text())
    assert doc["attributes"]["probe_engine"]["format"] == 2
    _set_format(path, 1)  # apart from the edit, the store is the pristine copy
    _unchanged()(tmp)


def _other_config_resume(tmp):
    base_store(tmp)
    _build(tmp, dtype="float16")


def _loader_shuffles(tmp):
    from torch.utils.data import DataLoader

    _build(tmp, data={"train": DataLoader(tiny_data(40), batch_size=8, shuffle=True),
                      "test": tiny_data(12, seed=1)})


def _extra_labels_too_short(tmp):
    _build(tmp, labels={"coarse": np.zeros(10, np.int64)})


def _unknown_site(tmp):
    _build(tmp, sites=("output", "outptu"))


def _bad_valid_size(tmp):
    _build(tmp, data=tiny_data(40), valid_size=1.5)


def _subsample_too_large(tmp):
    _build(tmp, reduce={"relu": "subsample:500"})


def _pool_a_flat_layer(tmp):
    _build(tmp, reduce={"fc": "pool"})


def _exists_no_resume(tmp):
    base_store(tmp)
    _build(tmp, resume=False)


class FailsMidway(Tiny):
    """Raises in its fc layer on the ``fail_at``-th forward pass (counting the two passes of
    the first rows: the one finding the sites and the one checking their reductions)."""

    def __init__(self, fail_at: int = 5):
        super().__init__()
        self.calls, self.fail_at = 0, fail_at

    def forward(self, x):
        self.calls += 1
        h = self.flat(self.pool(self.relu(self.conv(x))))
        if self.calls == self.fail_at:
            raise RuntimeError("simulated failure inside the model")
        return self.fc(h)


def _forward_raises_midway(tmp):
    torch.manual_seed(0)
    model = FailsMidway()
    model.train()  # build_store must hand it back in training mode
    _CACHE["midway-model"] = model
    _build(tmp, model=model)


def _check_midway(tmp):
    model = _CACHE.pop("midway-model")
    for m in model.modules():
        hooks = (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks,
                 m._forward_hooks_with_kwargs, m._forward_pre_hooks_with_kwargs)
        assert not any(hooks), f"a hook was left on {type(m).__name__}"
        assert m.training, "training mode was not restored"
    path = Path(tmp) / "s.zarr"
    store = engine.open_store(path)
    assert store.verify().ok, str(store.verify())
    assert 0 < store.committed("train") < store.rows("train"), "expected a partial build"
    model.fail_at = -1  # fixed; same weights, so the same fingerprint
    fixed = _build(tmp, model=model)
    assert fixed.complete and fixed.verify().ok
    whole = _build(tmp, model=tiny_model(), name="whole.zarr")
    for split in whole.splits:
        for layer in whole.layers:
            np.testing.assert_array_equal(fixed.read(split, layer), whole.read(split, layer))


def _wrong_input_shape(tmp):
    _build(tmp, model=tiny_model(channels=3))


def _not_a_module(tmp):
    _build(tmp, model=lambda x: x)


def _unknown_reduction(tmp):
    _build(tmp, reduce="average")


def _reduce_key_unknown(tmp):
    _build(tmp, reduce={"reluu": "pool"})


# -- transformers: token sequences, structured outputs ------------------------------------
class _DropFirst(nn.Module):
    def forward(self, h):
        return h[:, 1:]  # (B, T, D) -> (B, T - 1, D): no longer the input's tokens


class _TinyText(nn.Module):
    """Token ids -> embeddings -> a layer that drops the first token."""

    def __init__(self):
        super().__init__()
        self.embed, self.drop = nn.Embedding(32, 4), _DropFirst()

    def forward(self, input_ids, attention_mask):
        return self.drop(self.embed(input_ids))


def _texts() -> engine.TextDataset:
    texts = ["ab", "abc", "b", "cab", "ca", "bbc"] * 3
    return engine.TextDataset(texts, [len(t) % 2 for t in texts],
                              tokenizer=lambda t: [ord(c) % 31 + 1 for c in t])


def _mask_misfits_tokens(tmp):
    _build(tmp, model=_TinyText(), data=_texts(), layers=["drop"],
           reduce={"drop": "tokens:mean"}, valid_size=0)


def _token_labels_misaligned(tmp):
    texts = ["ab", "abc", "b"] * 4
    data = engine.TextDataset(texts, tokenizer=lambda t: [ord(c) % 31 + 1 for c in t],
                              token_labels=[[0, 1]] * len(texts))  # "abc" has 3 tokens
    _build(tmp, model=_TinyText(), data=data, layers=["embed"], rows="tokens", valid_size=0)


def _tokens_on_a_conv_map(tmp):
    _build(tmp, reduce={"relu": "tokens:mean"})


def _sequence_of_unknown_layout(tmp):
    model = nn.Sequential()
    model.add_module("seq", nn.Flatten(2))  # (1, 6, 6) -> (1, 36): tokens? channels?
    _build(tmp, model=model, layers=["seq"], reduce="pool")


class _Pair(nn.Module):
    def forward(self, x):
        return x.flatten(1), None


def _select_names_no_tensor(tmp):
    model = nn.Sequential()
    model.add_module("pair", _Pair())
    _build(tmp, model=model, layers=["pair"], select={"pair": 1})


def _select_key_unknown(tmp):
    _build(tmp, select={"rleu": 0})


def _bad_dtype(tmp):
    _build(tmp, dtype="int8")


def _num_classes_too_small(tmp):
    _build(tmp, num_classes=2)


def _split_name_escapes(tmp):
    _build(tmp, data={"train": tiny_data(40), "../outside": tiny_data(12, seed=1)})


# solve ----------------------------------------------------------------------------------
def _solve_unknown_layer(tmp):
    engine.solve(base_store(tmp), layers=["fcc"], progress=False, device="cpu")


def _solve_unknown_label(tmp):
    engine.solve(base_store(tmp), label="coarse", progress=False, device="cpu")


def _solve_nan_features(tmp):
    f, y = _mapping()
    f["h"][7, 2] = np.nan
    _solve_mapping(f, y)


def _solve_inf_features(tmp):
    f, y = _mapping()
    f["h"][3, 0] = np.inf
    _solve_mapping({"train": f}, {"train": y})


def _solve_one_class(tmp):
    f, _ = _mapping()
    _solve_mapping(f, np.zeros(30, dtype=np.int64))


def _solve_single_row(tmp):
    _solve_mapping({"h": np.ones((1, 5), np.float32)}, np.array([0]))


def _solve_empty(tmp):
    _solve_mapping({"h": np.ones((0, 5), np.float32)}, np.zeros(0, np.int64))


def _solve_labels_negative(tmp):
    _, y = _mapping()
    y[4] = -2
    _solve_mapping(labels=y)


def _solve_labels_float(tmp):
    _, y = _mapping()
    _solve_mapping(labels=y.astype(np.float64) + 0.5)


def _solve_labels_string(tmp):
    _, y = _mapping()
    _solve_mapping(labels=np.array([CLASSES[i] for i in y]))


def _solve_length_mismatch(tmp):
    f, y = _mapping()
    _solve_mapping(f, y[:-3])


def _solve_zero_width(tmp):
    _solve_mapping({"h": np.ones((30, 0), np.float32)})


def _solve_read_only_store(tmp):
    path = base_store(tmp)
    _read_only(path)
    try:
        engine.solve(path, l2=1e-3, progress=False, device="cpu")
    finally:
        _writable(path)


def _solve_path_is_a_file(tmp):
    (Path(tmp) / "s.zarr").write_text("my notes")
    engine.solve(Path(tmp) / "s.zarr", progress=False)


def _solve_no_committed_rows(tmp):
    path = base_store(tmp)
    doc = json.loads((path / "zarr.json").read_text())
    for info in doc["attributes"]["probe_engine"]["splits"].values():
        info["rows_committed"] = 0
    (path / "zarr.json").write_text(json.dumps(doc))
    engine.solve(path, l2=1e-3, progress=False, device="cpu", allow_partial=True)


def _solve_incomplete(tmp):
    path = base_store(tmp)
    doc = json.loads((path / "zarr.json").read_text())
    doc["attributes"]["probe_engine"]["splits"]["train"]["rows_committed"] = 8
    (path / "zarr.json").write_text(json.dumps(doc))
    engine.solve(path, l2=1e-3, progress=False, device="cpu")


def _solve_l2_negative(tmp):
    _solve_mapping(l2=-1e-3)


def _solve_bad_solver(tmp):
    _solve_mapping(solver="adam")


def _splits_mapping(*names: str) -> tuple[dict, dict]:
    feats, labels = {}, {}
    for i, name in enumerate(names):
        f, y = _mapping()
        feats[name], labels[name] = {"h": f["h"] + i}, y
    return feats, labels


def _solve_mdl_sgd(tmp):
    _solve_mapping(solver="sgd", controls=["shuffled"], mdl=True, early_stopping=False)


def _solve_refit_no_test(tmp):
    _solve_mapping(*_splits_mapping("train", "valid"), l2=[1e-3, 1e-2], refit=True)


def _solve_refit_same_rows(tmp):
    feats, labels = _splits_mapping("train", "valid")
    _solve_mapping({**feats, "test": feats["valid"]}, {**labels, "test": labels["valid"]},
                   l2=[1e-3, 1e-2], refit=True)


def _solve_mdl_schedule(tmp):
    _solve_mapping(mdl=True, mdl_blocks=[10, 50])


def _multilabel() -> np.ndarray:
    return (np.arange(30)[:, None] % np.array([2, 3, 5]) == 0).astype(np.int64)


def _solve_multilabel_values(tmp):
    y = _multilabel()
    y[4, 1] = 2
    _solve_mapping(labels=y)


def _solve_multilabel_controls(tmp):
    _solve_mapping(labels=_multilabel(), controls=["control"])


def _solve_bfloat16_lbfgs(tmp):
    _solve_mapping(dtype="bfloat16")


def _solve_budget_too_small(tmp):
    engine.solve(base_store(tmp), l2=1e-3, max_memory=100, progress=False, device="cpu")


def _solve_budget_malformed(tmp):
    _solve_mapping(max_memory="lots")


def _solve_rows_with_sgd(tmp):
    engine.solve(base_store(tmp), solver="sgd", shard="rows", progress=False, device="cpu")


def _solve_run_name_escapes(tmp):
    engine.solve(base_store(tmp), l2=1e-3, run="../elsewhere", progress=False, device="cpu")


def _solve_unknown_split_labels(tmp):
    f, y = _mapping()
    _solve_mapping({"train": f, "valid": f}, {"train": y, "valdi": y})


def _solve_labels_with_store(tmp):
    engine.solve(base_store(tmp), labels=np.zeros(36, np.int64), progress=False)


def _solve_not_a_source(tmp):
    engine.solve([[1.0, 2.0]], labels=[0, 1], progress=False)


# store ----------------------------------------------------------------------------------
def _open_missing(tmp):
    engine.open_store(Path(tmp) / "nothing.zarr")


def _unknown_split(tmp):
    engine.open_store(base_store(tmp)).read("validation", "fc")


def _unknown_layer_read(tmp):
    engine.open_store(base_store(tmp)).read("train", "fc2")


def _unknown_run(tmp):
    engine.open_store(base_store(tmp, solved=True)).results("sgd")


def _add_labels_wrong_length(tmp):
    store = engine.open_store(base_store(tmp))
    store.add_labels("coarse", {s: np.zeros(store.rows(s) - 1, np.int64) for s in store.splits})


def _add_labels_read_only(tmp):
    path = base_store(tmp)
    _read_only(path)
    try:
        engine.open_store(path).add_labels("parity", lambda y: y % 2)
    finally:
        _writable(path)


def _add_labels_float(tmp):
    engine.open_store(base_store(tmp)).add_labels("half", lambda y: y / 2)


def _add_labels_bad_name(tmp):
    engine.open_store(base_store(tmp)).add_labels("../../coarse", lambda y: y % 2)


def _add_labels_too_few_classes(tmp):
    engine.open_store(base_store(tmp)).add_labels("parity", lambda y: y % 2, num_classes=1)


# report ---------------------------------------------------------------------------------
def _results():
    f, y = _mapping()
    return _solve_mapping(f, y)


def _report_out_is_a_file(tmp):
    res = _results()
    (Path(tmp) / "report").write_text("my notes")
    engine.report(res, Path(tmp) / "report")


def _check_report_kept(tmp):
    assert (Path(tmp) / "report").read_text() == "my notes"


def _report_no_permission(tmp):
    res = _results()
    out = Path(tmp) / "locked"
    out.mkdir()
    out.chmod(0o500)
    try:
        engine.report(res, out / "report")
    finally:
        out.chmod(0o700)


def _report_not_results(tmp):
    engine.report({"init": "probes.zarr"}, Path(tmp) / "report")


# command line ---------------------------------------------------------------------------
def _cli(tmp, *argv) -> int:
    args = [a.format(tmp=tmp) if isinstance(a, str) else str(a) for a in argv]
    return cli.main(args)


def _cli_workers_and_scheduler(tmp):
    return _cli(tmp, "solve", "{tmp}/s.zarr", "--workers", "2", "--scheduler",
                "tcp://127.0.0.1:8786")


def _cli_l2_auto_and_numbers(tmp):
    return _cli(tmp, "solve", "{tmp}/s.zarr", "--l2", "auto", "1e-3")


def _cli_overwrite_no_resume(tmp):
    return _cli(tmp, "build", "{tmp}/s.zarr", "--overwrite", "--no-resume")


def _cli_unknown_data(tmp):
    return _cli(tmp, "build", "{tmp}/s.zarr", "--data", "cifar10")


def _cli_bad_reduce(tmp):
    return _cli(tmp, "build", "{tmp}/s.zarr", "--reduce", "pool", "fc=none")


def _cli_workers_zero(tmp):
    return _cli(tmp, "build", "{tmp}/s.zarr", "--workers", "0")


def _cli_verify_not_a_store(tmp):
    (Path(tmp) / "s.zarr").mkdir()
    (Path(tmp) / "s.zarr" / "notes.txt").write_text("mine")
    return _cli(tmp, "verify", "{tmp}/s.zarr")


def _cli_solve_unknown_layer(tmp):
    base_store(tmp)
    return _cli(tmp, "solve", "{tmp}/s.zarr", "--layers", "fcc", "--quiet")


def _cli_report_out_is_a_file(tmp):
    base_store(tmp, solved=True)
    (Path(tmp) / "out").write_text("my notes")
    return _cli(tmp, "report", "{tmp}/s.zarr", "--out", "{tmp}/out")


def _cli_evil_weights(tmp):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"conv1.weight": Evil()}, Path(tmp) / "evil.pt")
    return _cli(tmp, "build", "{tmp}/s.zarr", "--weights", "{tmp}/evil.pt", "--limit", "32",
                "--quiet")


def _cli_weights_wrong_model(tmp):
    torch.save(tiny_model().state_dict(), Path(tmp) / "tiny.pt")
    return _cli(tmp, "build", "{tmp}/s.zarr", "--weights", "{tmp}/tiny.pt", "--limit", "32",
                "--quiet")


T = "{tmp}"
CASES: list[Case] = [
    # build_store
    Case("unknown layer", "api", _unknown_layer, LayerNotFoundError,
         ("'fcc'", "closest: 'fc'"), _absent("s.zarr")),
    Case("NaN activations", "api", _nan_activations, NonFiniteError,
         ("layer 'fc'", "split 'train'", "row 0", "nan_policy='ignore'"), _check_nan),
    Case("inf activations (float16 overflow)", "api", _inf_float16, NonFiniteError,
         ("layer 'relu'", "split 'train'", "dtype='bfloat16' or 'float32'")),
    Case("empty dataset", "api", _empty_dataset, DataError,
         ("split 'test' is empty",), _absent("s.zarr")),
    Case("single row", "api", _single_row, DataError,
         ("1 training rows", "valid_size=0"), _absent("s.zarr")),
    Case("labels out of range", "api", _labels_out_of_range, DataError,
         ("split 'train', row 3", "label 7", "3 classes", "num_classes="), _absent("s.zarr")),
    Case("labels out of range, found while streaming", "api", _labels_out_of_range_streamed,
         DataError, ("split 'train', row 25", "label 5", "3 classes", "num_classes="),
         _check_consistent),
    Case("labels negative", "api", _labels_negative, DataError,
         ("split 'train', row 2", "label -1", "0..C-1"), _check_nothing_committed),
    Case("labels float", "api", _labels_float, DataError,
         ("split 'train'", "item 0", "float", "class index"), _absent("s.zarr")),
    Case("labels string", "api", _labels_string, DataError,
         ("split 'train'", "item 0", "'cat'", "map labels to 0..C-1"), _absent("s.zarr")),
    Case("num_classes too small", "api", _num_classes_too_small, DataError,
         ("label 2", "2 classes", "num_classes="), _absent("s.zarr")),
    Case("zero-width layer", "api", _zero_width_layer, ReductionError,
         ("layer 'empty'", "zero features", "leave it out"), _absent("s.zarr")),
    Case("path is a file", "api", _path_is_a_file, StoreError,
         (f"{T}/s.zarr", "a file", "another path"), _check_file_kept),
    Case("store exists, resume=False", "api", _exists_no_resume, StoreExistsError,
         (f"{T}/s.zarr", "resume=True", "overwrite=True"), _unchanged()),
    Case("newer store format (open)", "api", _newer_format_open, StoreError,
         (f"{T}/s.zarr", "format 2", "Upgrade probe-engine")),
    Case("newer store format (resume)", "api", _newer_format_resume, StoreError,
         (f"{T}/s.zarr", "format 2", "upgrade probe-engine", "another path"),
         _check_newer_kept),
    Case("resume with another model", "api", _other_model_resume, StoreMismatchError,
         (f"{T}/s.zarr", "model.digest", "overwrite=True"), _unchanged()),
    Case("resume with another dataset", "api", _other_data_resume, StoreMismatchError,
         (f"{T}/s.zarr", "dataset.splits.train.digest", "overwrite=True"), _unchanged()),
    Case("resume with another config", "api", _other_config_resume, StoreMismatchError,
         (f"{T}/s.zarr", "config.dtype", "'float32' in the store, 'float16' now"),
         _unchanged()),
    Case("model forward raises midway", "api", _forward_raises_midway, RuntimeError,
         ("simulated failure", "split 'train', rows 16..23", f"{T}/s.zarr",
          "rows before 16 are committed", "resume=True", "after the probe site 'relu'",
          "hooks are removed"), _check_midway),
    Case("wrong input shape for the model", "api", _wrong_input_shape, RuntimeError,
         ("channels", "(2, 1, 6, 6)", "first rows of the first split", "nothing was written",
          "fits the model"),
         _absent("s.zarr")),
    Case("model is not a Module", "api", _not_a_module, InvalidArgumentError,
         ("torch.nn.Module", "function"), _absent("s.zarr")),
    Case("unknown reduction", "api", _unknown_reduction, ReductionError,
         ("'average'", "'pool:HxW'", "'subsample:K'"), _absent("s.zarr")),
    Case("reduce key matches no layer", "api", _reduce_key_unknown, LayerNotFoundError,
         ("reduce", "'reluu'", "'relu'"), _absent("s.zarr")),
    Case("bad storage dtype", "api", _bad_dtype, InvalidArgumentError,
         ("'int8'", "float16"), _absent("s.zarr")),
    Case("DataLoader that shuffles", "api", _loader_shuffles, DataError,
         ("split 'train'", "shuffle=False"), _absent("s.zarr")),
    Case("extra labels too short", "api", _extra_labels_too_short, DataError,
         ("labels['coarse']", "split 'train'", "(10,)", "40"), _absent("s.zarr")),
    Case("unknown site", "api", _unknown_site, InvalidArgumentError,
         ("'outptu'", "'input', 'output'"), _absent("s.zarr")),
    Case("bad valid_size", "api", _bad_valid_size, InvalidArgumentError,
         ("valid_size", "1.5", "fraction in (0, 1)"), _absent("s.zarr")),
    Case("subsample larger than the layer", "api", _subsample_too_large, ReductionError,
         ("layer 'relu'", "144 features", "'subsample:500'", "smaller K"), _absent("s.zarr")),
    Case("pool a layer without spatial axes", "api", _pool_a_flat_layer, ReductionError,
         ("layer 'fc'", "no spatial axes", "'none'"), _absent("s.zarr")),
    Case("attention mask does not fit the tokens", "api", _mask_misfits_tokens, ReductionError,
         ("layer 'drop'", "attention mask is (2, 3)", "2 rows of 2 tokens", "'tokens:cls'"),
         _absent("s.zarr")),
    Case("token labels misaligned with tokens", "api", _token_labels_misaligned, DataError,
         ("text 1", "2 token labels for its 3 tokens", "one label per token id"),
         _absent("s.zarr")),
    Case("token reduction on a conv map", "api", _tokens_on_a_conv_map, ReductionError,
         ("layer 'relu'", "'tokens:mean'", "(tokens, channels)", "(4, 6, 6)", "'pool'"),
         _absent("s.zarr")),
    Case("sequence of unknown layout", "api", _sequence_of_unknown_layout, ReductionError,
         ("layer 'seq'", "(1, 36)", "{'seq': 'tokens:mean'}", "{'seq': 'pool'}"),
         _absent("s.zarr")),
    Case("select names no tensor", "api", _select_names_no_tensor, engine.ProbeEngineError,
         ("select=1", "layer 'pair'", "tuple(Tensor[2, 36] float32, None)"),
         _absent("s.zarr")),
    Case("select key matches no layer", "api", _select_key_unknown, LayerNotFoundError,
         ("select", "'rleu'", "'relu'"), _absent("s.zarr")),
    Case("split name escapes the store", "api", _split_name_escapes, DataError,
         ("'../outside'", "split name"), _absent("s.zarr")),
    # solve
    Case("solve: unknown layer", "api", _solve_unknown_layer, LayerNotFoundError,
         ("'fcc'", f"{T}/s.zarr", "'fc'")),
    Case("solve: unknown label", "api", _solve_unknown_label, LabelNotFoundError,
         ("'coarse'", f"{T}/s.zarr", "['y']", "Store.add_labels")),
    Case("solve: NaN features", "api", _solve_nan_features, NonFiniteError,
         ("layer 'h'", "split 'train'", "row 7")),
    Case("solve: inf features", "api", _solve_inf_features, NonFiniteError,
         ("layer 'h'", "split 'train'", "row 3")),
    Case("solve: one class", "api", _solve_one_class, DataError,
         ("one class", "at least two")),
    Case("solve: single row", "api", _solve_single_row, DataError,
         ("one class", "train")),
    Case("solve: no rows", "api", _solve_empty, DataError, ("split 'train'", "no rows")),
    Case("solve: labels negative", "api", _solve_labels_negative, DataError,
         ("split 'train', row 4", "label -2")),
    Case("solve: labels float", "api", _solve_labels_float, DataError,
         ("split 'train'", "float64", "integers")),
    Case("solve: labels string", "api", _solve_labels_string, DataError,
         ("split 'train'", "integer", "class indices")),
    Case("solve: features and labels differ in length", "api", _solve_length_mismatch,
         DataError, ("layer 'h'", "split 'train'", "(30, 5)", "27 labels")),
    Case("solve: zero-width features", "api", _solve_zero_width, DataError,
         ("layer 'h'", "zero features")),
    Case("solve: read-only store", "api", _solve_read_only_store, StoreError,
         (f"{T}/s.zarr", "cannot write probes", "read-only"), _unchanged(),
         _needs_permissions),
    Case("solve: path is a file", "api", _solve_path_is_a_file, StoreError,
         (f"{T}/s.zarr", "not a probe-engine store", "a file"), _check_file_kept),
    Case("solve: no committed rows", "api", _solve_no_committed_rows, SplitNotFoundError,
         (f"{T}/s.zarr", "no committed 'train' rows", "resume=True")),
    Case("solve: incomplete store", "api", _solve_incomplete, StoreError,
         (f"{T}/s.zarr", "train 8/36", "resume=True", "allow_partial=True")),
    Case("solve: negative l2", "api", _solve_l2_negative, InvalidArgumentError,
         ("l2", ">= 0", "-0.001")),
    Case("solve: unknown solver", "api", _solve_bad_solver, InvalidArgumentError,
         ("'adam'", "'lbfgs', 'sgd' or 'ridge'")),
    Case("solve: MDL with SGD", "api", _solve_mdl_sgd, InvalidArgumentError,
         ("MDL probes are fitted by L-BFGS", "solver='lbfgs'", "SGD fits controls alone")),
    Case("solve: refit without a test split", "api", _solve_refit_no_test, SplitNotFoundError,
         ("refit=True", "no 'test' split")),
    Case("solve: refit scoring valid's rows", "api", _solve_refit_same_rows, DataError,
         ("the rows that chose lambda", "same rows", "a test split of its own")),
    Case("solve: MDL schedule not ending at 100", "api", _solve_mdl_schedule,
         InvalidArgumentError, ("mdl_blocks", "ending at 100")),
    Case("solve: multi-label targets not 0 / 1", "api", _solve_multilabel_values, DataError,
         ("split 'train', row 4, class 1", "0 or 1")),
    Case("solve: controls on multi-label targets", "api", _solve_multilabel_controls,
         InvalidArgumentError, ("controls", "multi-label")),
    Case("solve: bfloat16 with L-BFGS", "api", _solve_bfloat16_lbfgs, InvalidArgumentError,
         ("dtype='bfloat16' is for solver='sgd'", "dtype='tf32'")),
    Case("solve: max_memory below one block", "api", _solve_budget_too_small,
         MemoryBudgetError, ("max_memory=100 bytes", "layer", "split 'train'", "rows 0-",
                             "raise max_memory to at least"), _unchanged()),
    Case("solve: max_memory malformed", "api", _solve_budget_malformed, InvalidArgumentError,
         ("max_memory", "'512M'", "'lots'")),
    Case("solve: row shards with SGD", "api", _solve_rows_with_sgd, InvalidArgumentError,
         ("shard='rows'", "L-BFGS", "shard='layers'"), _unchanged()),
    Case("solve: run name escapes the store", "api", _solve_run_name_escapes,
         InvalidArgumentError, ("run name", "'../elsewhere'"), _unchanged()),
    Case("solve: labels for an unknown split", "api", _solve_unknown_split_labels,
         DataError, ("'valdi'", "'valid'", "same splits")),
    Case("solve: labels= with a store", "api", _solve_labels_with_store, InvalidArgumentError,
         ("labels=", "mapping", "add_labels")),
    Case("solve: not a store or mapping", "api", _solve_not_a_source, InvalidArgumentError,
         ("Store", "mapping", "list")),
    # Store
    Case("open: nothing there", "api", _open_missing, StoreError,
         (f"{T}/nothing.zarr", "not a probe-engine store", "build_store")),
    Case("unknown split", "api", _unknown_split, SplitNotFoundError,
         ("'validation'", f"{T}/s.zarr", "'valid'")),
    Case("read: unknown layer", "api", _unknown_layer_read, LayerNotFoundError,
         ("'fc2'", f"{T}/s.zarr", "'fc'")),
    Case("unknown run name", "api", _unknown_run, RunNotFoundError,
         ("'sgd'", f"{T}/s.zarr", "['default']")),
    Case("add_labels: wrong length", "api", _add_labels_wrong_length, DataError,
         ("'coarse'", "split 'train'", "36", "(35,)"), _unchanged()),
    Case("add_labels: read-only store", "api", _add_labels_read_only, StoreError,
         (f"{T}/s.zarr", "read-only"), _unchanged(), _needs_permissions),
    Case("add_labels: float labels", "api", _add_labels_float, DataError,
         ("'half'", "split 'train'", "float64", "integers")),
    Case("add_labels: name escapes the store", "api", _add_labels_bad_name, InvalidArgumentError,
         ("'../../coarse'", "label name"), _unchanged()),
    Case("add_labels: num_classes too small", "api", _add_labels_too_few_classes, DataError,
         ("'parity'", "num_classes=1"), _unchanged()),
    # report
    Case("report: out is a file", "api", _report_out_is_a_file, ReportError,
         (f"{T}/report", "out="), _check_report_kept),
    Case("report: folder without permission", "api", _report_no_permission, ReportError,
         (f"{T}/locked/report", "out="), None, _needs_permissions),
    Case("report: not results", "api", _report_not_results, InvalidArgumentError,
         ("ProbeResults", "mapping")),
    # command line
    Case("cli: --workers with --scheduler", "cli", _cli_workers_and_scheduler, 2,
         ("usage:", "--scheduler", "--workers")),
    Case("cli: --l2 auto with numbers", "cli", _cli_l2_auto_and_numbers, 2,
         ("usage:", "--l2", "'auto' alone")),
    Case("cli: --overwrite with --no-resume", "cli", _cli_overwrite_no_resume, 2,
         ("usage:", "--overwrite", "--no-resume")),
    Case("cli: unknown --data", "cli", _cli_unknown_data, 2,
         ("usage:", "'cifar10'", "imagefolder:ROOT")),
    Case("cli: --reduce mixes forms", "cli", _cli_bad_reduce, 2,
         ("usage:", "--reduce", "LAYER=SPEC")),
    Case("cli: --workers 0", "cli", _cli_workers_zero, 2, ("usage:", "--workers", "at least 1")),
    Case("cli: verify a folder that is not a store", "cli", _cli_verify_not_a_store, 1,
         ("probe-engine: error:", f"{T}/s.zarr", "not a probe-engine store")),
    Case("cli: solve an unknown layer", "cli", _cli_solve_unknown_layer, 1,
         ("probe-engine: error:", "'fcc'", "'fc'")),
    Case("cli: report --out is a file", "cli", _cli_report_out_is_a_file, 1,
         ("probe-engine: error:", f"{T}/out", "out=")),
    Case("cli: --weights holding code", "cli", _cli_evil_weights, 1,
         ("probe-engine: error:", f"{T}/evil.pt", "weights_only=True", "state_dict")),
    Case("cli: --weights of another model", "cli", _cli_weights_wrong_model, 1,
         ("probe-engine: error:", f"{T}/tiny.pt", "mnist_convnet")),
]


# -- running ------------------------------------------------------------------------------
def _message(exc: BaseException) -> str:
    return "\n".join([str(exc), *getattr(exc, "__notes__", ())])


def skip_reason(case: Case) -> str | None:
    """Why ``case`` cannot run on this machine (then leave it out of any count), or None."""
    return case.skip() if case.skip is not None else None


def run_case(case: Case, tmpdir: str | os.PathLike) -> tuple[bool, str]:
    """Run one case in the empty folder ``tmpdir``: (ok, what came back). ``ok``: the
    expected error class (or exit status), every fragment in its message, and the
    case's ``check`` passed."""
    reason = skip_reason(case)
    if reason is not None:
        return False, f"not run here: {reason}"
    tmp = Path(tmpdir)
    frags = [f.replace("{tmp}", str(tmp)) for f in case.fragments]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            result = case.call(tmp)
    except SystemExit as exc:  # argparse usage errors
        got: Any = exc.code
        message = err.getvalue()
    except Exception as exc:  # noqa: BLE001 - the point is to see what comes back
        got = exc
        message = _message(exc)
    else:
        got = result
        message = err.getvalue() if case.where == "cli" else f"no error (returned {result!r})"
    if case.where == "cli":
        if isinstance(got, BaseException):
            return False, f"raised {type(got).__name__}: {_message(got)}"
        if got != case.expected:
            return False, f"exit status {got!r}, expected {case.expected}: {message}"
    else:
        if not isinstance(got, BaseException):
            return False, message
        if not isinstance(got, case.expected):
            return False, f"{type(got).__name__} (expected {case.expected.__name__}): {message}"
    missing = [f for f in frags if f not in message]
    if missing:
        return False, f"message lacks {missing}: {message}"
    if case.check is not None:
        try:
            case.check(tmp)
        except Exception as exc:  # noqa: BLE001
            return False, f"{message}\n-- but the check failed: {type(exc).__name__}: {exc}"
    return True, message


def run_all(verbose: bool = True) -> list[tuple[Case, bool, str]]:
    """Every case that can run here, each in its own temporary folder."""
    out = []
    for case in CASES:
        if skip_reason(case) is not None:
            if verbose:
                print(f"skip {case.name}: {skip_reason(case)}")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            try:
                ok, msg = run_case(case, tmp)
            except Exception:  # noqa: BLE001
                ok, msg = False, traceback.format_exc()
        out.append((case, ok, msg))
        if verbose:
            print(f"{'ok  ' if ok else 'FAIL'} {case.name}: {msg.splitlines()[0] if msg else ''}")
    return out


if __name__ == "__main__":
    results = run_all()
    print(f"{sum(ok for _, ok, _ in results)} / {len(results)} bad inputs with a clear error")
