"""engine._features: features within a memory budget. Layers that do not fit are streamed
from the store on every pass; the optimum is the in-memory one (and scikit-learn's), a
budget too small for one block is refused by name, a chunk corrupted mid-solve stops the
solve with nothing saved for the layer, and the peak memory of a solve stays within its
budget (measured in a child process)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from test_solve import _one_thread  # noqa: F401  (fixture: one thread, as there)
from torch import nn
from torch.utils.data import TensorDataset

import engine
from engine import format as fmt
from engine._features import FeatureCache
from engine._sources import ProbeData
from engine.errors import MemoryBudgetError, StoreCorruptedError
from engine.objective import Point, ProbeObjective

L2 = [1e-3, 1e-2]


def blob_store(path, n: int, d: int, c: int, *, seed: int = 0, block_bytes: int = 1 << 16,
               valid: int = 400, test: int = 400, layers=("0", "2")) -> engine.Store:
    """A real float32 store of Gaussian class clusters: layer "0" (the d inputs) and "1"
    (tanh of a random projection, d wide); small blocks (``block_bytes``) so that streams
    cross many chunks."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(c, d)).astype(np.float32)

    def split(rows: int) -> TensorDataset:
        y = rng.permutation(np.arange(rows) % c)
        x = means[y] + 1.5 * rng.normal(size=(rows, d)).astype(np.float32)
        return TensorDataset(torch.from_numpy(x), torch.from_numpy(y))

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Identity(), nn.Linear(d, d), nn.Tanh())
    return engine.build_store(
        model, {"train": split(n), "valid": split(valid), "test": split(test)}, path,
        layers=list(layers), reduce="none", dtype="float32", batch_size=64,
        block_bytes=block_bytes, progress=False)


@pytest.fixture(scope="module")
def base_store(tmp_path_factory):
    return blob_store(tmp_path_factory.mktemp("ooc") / "s.zarr", 1500, 40, 5)


@pytest.fixture
def store(base_store, tmp_path):
    shutil.copytree(base_store.path, tmp_path / "s.zarr")
    return engine.open_store(tmp_path / "s.zarr")


def objective64(x, y, w, b, lam: float) -> float:
    x, w, b = (np.asarray(a, dtype=np.float64) for a in (x, w, b))
    z = x @ w + b
    m = z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z - m).sum(axis=1)) + m[:, 0]
    return float(np.mean(lse - z[np.arange(len(y)), y]) + 0.5 * lam * np.sum(w * w))


def test_streamed_passes_equal_resident_ones(base_store):
    data = ProbeData.from_store(base_store, None, "y", False)
    assert base_store.block_rows < data.rows("train")  # several chunks a pass
    resident = FeatureCache(data, torch.device("cpu"), torch.float32)
    resident.load("train", data.layers)
    # room for one layer's stream blocks and little else: everything on train streams
    streamed = FeatureCache(data, torch.device("cpu"), torch.float32, budget=200_000)
    streamed.load(["train", "valid"], data.layers)
    assert all(streamed.streamed("train", layer) for layer in data.layers)
    assert not any(resident.streamed("train", layer) for layer in data.layers)
    gen = torch.Generator().manual_seed(0)
    points = [Point(layer, lam, 0.1 * torch.randn(41, 5, generator=gen))
              for layer in data.layers for lam in L2]
    want = ProbeObjective(resident, block_bytes=1).evaluate("train", points, grad=True)
    got = ProbeObjective(streamed, block_bytes=1).evaluate("train", points, grad=True)
    for v1, v2 in zip(got, want, strict=True):
        assert v1.objective == pytest.approx(v2.objective, rel=1e-6)
        torch.testing.assert_close(v1.gradient, v2.gradient, rtol=1e-5, atol=1e-7)
        assert (v1.top1_error, v1.top5_error) == (v2.top1_error, v2.top5_error)


def test_the_cpu_budget_counts_the_page_cache_as_available():
    # a store just written sits in the page cache: free pages alone would starve the budget
    from engine._features import cgroup_free, free_bytes

    meminfo = dict(line.split(":") for line in Path("/proc/meminfo").read_text().splitlines())
    available = int(meminfo["MemAvailable"].split()[0]) * 1024
    allowed = cgroup_free()  # a machine whose cgroup allows less: that figure instead
    want = available if allowed is None else min(available, allowed)
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    got = free_bytes(torch.device("cpu"))
    assert abs(got - want) < 256 << 20
    assert allowed is not None or got >= free - (256 << 20)


@pytest.mark.parametrize("version", [1, 2])
def test_the_cpu_budget_stays_within_the_memory_cgroup(tmp_path, version):
    # a container's or a batch job's limit: the host's MemAvailable does not see it
    from engine._features import cgroup_free

    gib = 1 << 30
    if version == 2:
        line, where = "0::/job/7\n", tmp_path / "job" / "7"
        files = {"memory.max": f"{4 * gib}\n", "memory.current": f"{3 * gib}\n",
                 "memory.stat": f"anon 1\ninactive_file {gib // 2}\nactive_file 5\n"}
    else:
        line, where = "4:memory:/job/7\n3:cpu:/\n", tmp_path / "memory" / "job" / "7"
        files = {"memory.limit_in_bytes": f"{4 * gib}\n",
                 "memory.usage_in_bytes": f"{3 * gib}\n",
                 "memory.stat": f"cache 9\ntotal_inactive_file {gib // 2}\n"}
    where.mkdir(parents=True)
    for name, text in files.items():
        (where / name).write_text(text)
    (tmp_path / "cgroup").write_text(line)
    kw = dict(root=str(tmp_path), cgroup=str(tmp_path / "cgroup"))
    assert cgroup_free(**kw) == gib + gib // 2  # limit - usage + reclaimable cache
    limit_file = next(iter(files))  # memory.max, memory.limit_in_bytes
    (where / limit_file).write_text("max\n" if version == 2 else f"{1 << 63}\n")
    assert cgroup_free(**kw) is None  # no limit: the host's figure stands
    assert cgroup_free(cgroup=str(tmp_path / "absent")) is None


def test_layers_placed_one_at_a_time_keep_room_to_stream_the_last(base_store):
    # SGD places each layer as it finishes: the first loads must leave room for the stream
    # blocks of a later one that does not fit, not spend the budget and refuse it
    data = ProbeData.from_store(base_store, None, "y", False)
    one = FeatureCache(data, torch.device("cpu"), torch.float32)
    one.load(["train", "valid", "test"], ["0"])
    layer_bytes = (one._resident[("train", "0")].nbytes + one._resident[("valid", "0")].nbytes
                   + one._resident[("test", "0")].nbytes)  # each layer is 40 wide: the same
    cache = FeatureCache(data, torch.device("cpu"), torch.float32,
                         budget=layer_bytes + 30_000)  # one layer, and less than another
    for layer in data.layers:
        cache.load(["train", "valid", "test"], [layer])
    assert not cache.streamed("train", "0") and cache.streamed("train", "2")
    assert cache._left >= 0  # nothing placed beyond the budget
    gen = torch.Generator().manual_seed(1)
    points = [Point("2", 1e-3, 0.1 * torch.randn(41, 5, generator=gen))]
    full = FeatureCache(data, torch.device("cpu"), torch.float32)
    (want,) = ProbeObjective(full).evaluate("train", points, grad=True)
    (got,) = ProbeObjective(cache).evaluate("train", points, grad=True)
    assert got.objective == pytest.approx(want.objective, rel=1e-6)


def test_an_out_of_core_solve_reaches_the_in_memory_and_sklearn_optimum(store):
    kw = {"layers": ["2"], "l2": L2, "tol": 1e-6, "device": "cpu", "progress": False}
    memory = engine.solve(store, run="memory", **kw)
    ooc = engine.solve(store, run="ooc", max_memory="200k", **kw)
    assert {b["features"] for b in memory.backends.values()} == {"resident"}
    assert {b["features"] for b in ooc.backends.values()} == {"streamed"}
    y = store.labels("train")
    for layer in ["2"]:
        x = store.read("train", layer)
        lam = float(ooc.table.query("layer == @layer").l2.iloc[0])
        assert lam == float(memory.table.query("layer == @layer").l2.iloc[0])
        f_ooc = objective64(x, y, *ooc.weights[layer], lam)
        f_mem = objective64(x, y, *memory.weights[layer], lam)
        assert f_ooc == pytest.approx(f_mem, rel=1e-6)
        clf = LogisticRegression(C=1 / (lam * len(y)), tol=1e-10, max_iter=10_000)
        clf.fit(x.astype(np.float64), y)
        assert f_ooc == pytest.approx(objective64(x, y, clf.coef_.T, clf.intercept_, lam),
                                      rel=1e-5)
    cols = ["layer", "split", "l2", "top1_error"]
    assert ooc.table[cols].equals(memory.table[cols])


def test_a_budget_too_small_for_one_block_is_refused_by_name(store):
    with pytest.raises(MemoryBudgetError, match=r"layer '0' of split 'train': one block of "
                       r"its rows \(rows 0-\d+, \d+ x 40 float32\).*raise max_memory"):
        engine.solve(store, l2=1e-3, device="cpu", max_memory=10_000, progress=False)
    assert fmt.saved_probes(fmt.open_root(store.path), "default") == {}


def test_a_chunk_corrupted_mid_solve_names_the_rows_and_saves_nothing_for_the_layer(
        store, monkeypatch):
    """A chunk of train rows goes bad after the solve started (after its first passes):
    the pass that streams it stops with the chunk and rows named; no probe of the layer is
    saved, and a rerun after the repair finishes the run."""
    data = ProbeData.from_store(store, None, "y", False)
    reads = {"n": 0}
    real = data.reader

    def reader(split, layer, start, stop):
        if split == "train":
            reads["n"] += 1
            if reads["n"] == 40:  # mid-solve: flip a byte of the chunk about to be read
                key = fmt.chunk_key(fmt.features_path(split, layer), start // store.block_rows, 2)
                path = Path(store.path, key)
                raw = bytearray(path.read_bytes())
                raw[len(raw) // 2] ^= 0xFF
                path.write_bytes(bytes(raw))
        return real(split, layer, start, stop)

    monkeypatch.setattr(ProbeData, "from_store", classmethod(
        lambda cls, *a, **k: ProbeData(reader, data.dims, data.labels, data.num_classes,
                                       data.layers, data.info, data.block_rows, data.stored)))
    with pytest.raises(StoreCorruptedError, match=r"streaming rows \[\d+, \d+\) of layer "
                       r"'(0|2)', split 'train'.*unreadable chunk"):
        engine.solve(store, l2=1e-3, device="cpu", max_memory="200k", progress=False)
    assert fmt.saved_probes(fmt.open_root(store.path), "default") == {}


def test_a_stream_stopped_early_leaves_no_reader_behind(base_store):
    data = ProbeData.from_store(base_store, ["0"], "y", False)
    cache = FeatureCache(data, torch.device("cpu"), torch.float32, budget=200_000)
    cache.load("train", ["0"])
    blocks = cache.blocks("train", ["0"], 64)
    start, first = next(blocks)
    assert start == 0 and first.shape == (1, 64, 40)
    np.testing.assert_array_equal(first[0].numpy(), base_store.read("train", "0", 0, 64))
    blocks.close()  # the pass stopped (an error in the kernel, say): the reads stop too
    import threading
    assert not [t for t in threading.enumerate() if t.name.startswith("probe-engine-read")]


MEASURE = textwrap.dedent("""
    import json, resource, sys
    import torch
    import engine
    torch.set_num_threads(1)
    path, budget = sys.argv[1], int(sys.argv[2])
    store = engine.open_store(path)
    def rss():  # bytes resident now
        return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
    # warm up: the code pages of torch, MKL and Blosc count as resident once touched
    store.read("train", "0", 0, 2000)
    x = store.read("valid", "0")
    engine.solve({"0": x}, labels=store.labels("valid"), l2=1e-3, max_iter=3,
                 device="cpu", progress=False)
    del x
    with open("/proc/self/clear_refs", "w") as f:  # peak resident memory := resident now
        f.write("5")
    before = rss()
    res = engine.solve(store, l2=1e-3, max_iter=10, device="cpu", progress=False,
                       max_memory=budget if budget else None, run=f"budget{budget}")
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    peak = int(status["VmHWM"].split()[0]) * 1024  # peak resident memory since the reset
    print(json.dumps({"before": before, "peak": peak,
                      "features": [b["features"] for b in res.backends.values()]}))
""")


@pytest.mark.slow
def test_peak_memory_stays_within_the_budget(tmp_path):
    """Float32 train features 3x the budget: the solve's peak resident memory grows by at
    most the budget plus 16 MB (the solver's state, zarr's decode buffers, thread stacks);
    the same solve with everything resident grows by more than that bound."""
    store = blob_store(tmp_path / "big.zarr", 24_000, 256, 10, block_bytes=1 << 20,
                       valid=1000, test=1000, layers=["0"])
    features = 24_000 * 256 * 4  # train, float32
    budget, slack = features // 3, 16 << 20
    out = {}
    for name, limit in (("budget", budget), ("resident", 0)):
        run = subprocess.run([sys.executable, "-c", MEASURE, str(store.path), str(limit)],
                             capture_output=True, text=True, timeout=300, check=True)
        out[name] = json.loads(run.stdout.strip().splitlines()[-1])
    grew = out["budget"]["peak"] - out["budget"]["before"]
    assert out["budget"]["features"] == ["streamed"]
    assert grew <= budget + slack, (grew, budget)
    assert out["resident"]["features"] == ["resident"]
    assert out["resident"]["peak"] - out["resident"]["before"] > budget + slack


@pytest.mark.gpu
def test_a_streamed_solve_on_cuda_equals_the_resident_one(store):
    """On CUDA the streamed blocks are pinned and copied asynchronously: the same optimum
    as the features resident on the card."""
    kw = {"layers": ["2"], "l2": L2, "tol": 1e-6, "device": "cuda", "progress": False}
    resident = engine.solve(store, run="cuda-memory", **kw)
    streamed = engine.solve(store, run="cuda-ooc", max_memory="200k", **kw)
    assert resident.backends["2"]["features"] == "resident"
    assert streamed.backends["2"]["features"] == "streamed"
    y, x = store.labels("train"), store.read("train", "2")
    lam = float(streamed.table.query("layer == '2'").l2.iloc[0])
    assert objective64(x, y, *streamed.weights["2"], lam) == pytest.approx(
        objective64(x, y, *resident.weights["2"], lam), rel=1e-6)
