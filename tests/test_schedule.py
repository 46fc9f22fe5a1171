"""engine.schedule on a real ``distributed.LocalCluster`` (two worker processes, on the CPU):
shard-parallel builds and probe-parallel solves give the store and probes of a single
process, also when a worker is killed midway; a task that keeps failing ends in a clear
error."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
import torch
from torch import nn

import engine
from engine.errors import ProbeEngineError

LAYERS = ["1", "2", "3", "4"]


@pytest.fixture(scope="module")
def wide_store(tmp_path_factory, fashion):
    """float32 features of a wide MLP on 600 Fashion-MNIST rows: four layers of 784 to 10
    features, train 540 / valid 60 / test 200, in blocks of 64 rows."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 784), nn.ReLU(), nn.Linear(784, 64),
                          nn.Linear(64, 10))
    # blocks of 64 rows: a row-parallel solve has whole blocks to split between workers
    return engine.build_store(model, fashion, tmp_path_factory.mktemp("wide") / "s.zarr",
                              layers=LAYERS, dtype="float32", batch_size=64,
                              block_bytes=1 << 16, progress=False)


@pytest.fixture
def store(wide_store, tmp_path):
    import shutil

    shutil.copytree(wide_store.path, tmp_path / "s.zarr")
    return engine.open_store(tmp_path / "s.zarr")


@pytest.fixture(scope="module")
def cluster():
    with engine.cluster(2, threads_per_worker=1, processes=True) as c:
        yield c


@pytest.fixture
def client(cluster):
    """The module's two-worker cluster (started once), both workers up: after a test killed
    one, its nanny has started another."""
    cluster.wait_for_workers(2, timeout=60)
    return cluster


SOLVE = dict(l2=[1e-4, 1e-2], tol=1e-6, device="cpu", progress=False)


def one_thread(fn, *args, **kwargs):
    """``fn`` with one torch thread, as each one-thread worker runs its tasks: the same
    arithmetic in the same order, so the same bits (across thread counts, matrix products
    may round differently)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


def single(store, run):
    """The single-process solve, at the workers' thread count."""
    return one_thread(engine.solve, store, run=run, **SOLVE)


def test_one_worker_takes_the_costliest_layers_first(store):
    from engine import schedule
    from engine.options import SolveOptions

    with engine.cluster(1) as one:
        costs = {"1": 10.0, "2": 40.0, "3": 30.0, "4": 20.0}
        kwargs = {k: v for k, v in SOLVE.items() if k != "progress"}
        options = SolveOptions.from_kwargs(**kwargs, run="order")
        reports = schedule.solve_on(one, store.path, LAYERS, costs, options)
    assert [r["layer"] for r in sorted(reports, key=lambda r: r["start"])] == ["2", "3", "4", "1"]


def test_distributed_solve_equals_the_single_process_solve(store, client):
    ours = engine.solve(store, run="dask", client=client, **SOLVE)
    one = single(store, "one")
    assert list(ours.weights) == LAYERS
    assert len(set(client.run(os.getpid).values())) == 2
    assert ours.config == one.config
    cols = ["layer", "split", "l2", "iterations", "converged", "loss", "top1_error"]
    assert ours.table[cols].equals(one.table[cols])
    for layer in LAYERS:
        for a, b in zip(ours.weights[layer], one.weights[layer], strict=True):
            np.testing.assert_array_equal(a, b)
    assert engine.load_results(store.path, run="dask").table[cols].equals(ours.table[cols])
    # idempotent: a rerun finds every probe saved and submits nothing
    again = engine.solve(store, run="dask", client=client, **SOLVE)
    assert again.table[cols].equals(ours.table[cols])


def run_killing_a_worker(client, job):
    """Run ``job()`` in a thread, SIGKILL the process of the first worker seen executing a
    task, and return (job's result, the killed pid); the job must still succeed."""
    pids = client.run(os.getpid)
    box = {}

    def go():
        try:
            box["out"] = job()
        except BaseException as exc:  # noqa: BLE001 - reported below
            box["err"] = exc

    thread = threading.Thread(target=go)
    thread.start()
    victim = None
    deadline = time.monotonic() + 60
    while victim is None and time.monotonic() < deadline and thread.is_alive():
        busy = [w for w, tasks in client.processing().items() if tasks]
        if busy:
            victim = pids[busy[0]]
            os.kill(victim, signal.SIGKILL)
        time.sleep(0.01)
    thread.join(timeout=300)
    assert victim is not None and not thread.is_alive()
    assert "err" not in box, box.get("err")
    assert victim not in client.run(os.getpid).values()  # the nanny started a new one
    return box["out"], victim


def test_a_worker_killed_midway_changes_nothing(store, client):
    res, _ = run_killing_a_worker(
        client, lambda: engine.solve(store, run="kill", client=client, **SOLVE))
    one = single(store, "one")
    for layer in LAYERS:
        np.testing.assert_array_equal(res.weights[layer][0], one.weights[layer][0])


def test_a_task_that_keeps_failing_names_its_layer(store, client):
    chunk = next(p for p in sorted((Path(store.path) / "train/features/2/c").rglob("*"))
                 if p.is_file())
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(ProbeEngineError, match=r"layer '2' on the Dask cluster failed after 2 "
                                              r"retries: StoreCorruptedError"):
        engine.solve(store, run="poison", client=client, **SOLVE)
    saved = engine.load_results(store.path, run="poison")  # the other layers are kept
    assert set(saved.weights) == {"1", "3", "4"}


def objective64(store, layer: str, res) -> float:
    """The penalised train objective of ``res``'s probe of ``layer``, in float64."""
    x = store.read("train", layer).astype(np.float64)
    y = store.labels("train")
    w, b = (a.astype(np.float64) for a in res.weights[layer])
    lam = float(res.table.query("layer == @layer").l2.iloc[0])
    z = x @ w + b
    m = z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z - m).sum(axis=1)) + m[:, 0]
    return float(np.mean(lse - z[np.arange(len(y)), y]) + 0.5 * lam * np.sum(w * w))


def test_a_row_parallel_solve_equals_the_single_process_solve_and_survives_a_kill(
        store, client):
    """Each pass summed over two row shards: the optimum is the single process's (to the
    solver's tolerance: the sums are added in another order); killing a worker midway
    changes no bit (its shard is summed again, by a fresh worker, in the same order)."""
    from engine.schedule import row_shards

    assert row_shards(540, 64, 2) == [(0, 256), (256, 540)]
    kw = dict(SOLVE, layers=["3", "4"], l2=[1e-3, 1e-2], tol=1e-5)  # a pass: a round trip
    ours = engine.solve(store, run="rows", client=client, shard="rows", **kw)
    one = one_thread(engine.solve, store, run="one", **kw)
    assert {b["features"] for b in ours.backends.values()} == {"rows over 2 shards"}
    assert ours.config == one.config
    for layer in ("3", "4"):
        assert objective64(store, layer, ours) == pytest.approx(
            objective64(store, layer, one), rel=1e-5)
    cols = ["layer", "split", "l2", "top1_error"]
    assert ours.table[cols].equals(one.table[cols])
    assert engine.load_results(store.path, run="rows").table[cols].equals(ours.table[cols])
    # the workers keep no shard once the solve is over
    assert set(client.run(lambda: len(__import__("engine.schedule").schedule._SHARD_CACHE))
               .values()) == {0}
    killed, _ = run_killing_a_worker(client, lambda: engine.solve(
        store, run="rkill", client=client, shard="rows", **kw))
    for layer in ("3", "4"):
        for a, b in zip(killed.weights[layer], ours.weights[layer], strict=True):
            np.testing.assert_array_equal(a, b)


def test_auto_shards_rows_of_the_layers_a_worker_cannot_hold(store, client):
    """A budget of 1.2 MB: the 784-wide layer (1.7 MB of train features) is solved
    row-parallel (each worker streams its shard), the narrow one as a task of its own;
    both optima are the single process's."""
    kw = dict(SOLVE, layers=["2", "3"], l2=1e-2, tol=1e-5)
    res = engine.solve(store, run="auto", client=client, max_memory="1.2M", **kw)
    assert {k: b["features"] for k, b in res.backends.items()} == {
        "2": "rows over 2 shards", "3": "resident"}
    one = one_thread(engine.solve, store, run="one", **kw)
    for layer in ("2", "3"):
        assert objective64(store, layer, res) == pytest.approx(
            objective64(store, layer, one), rel=1e-5)


def test_tasks_over_row_shards_equal_the_single_process_solve(store, client):
    """Controls, MDL blocks, few-shot draws, class weights and the refit on train + valid
    over two row shards: each worker makes the tasks from the whole labels and cuts them to
    its rows (totals kept whole), so every figure is the single process's."""
    kw = dict(SOLVE, layers=["4"], l2=[1e-3, 1e-1], controls=["shuffled"], mdl=True,
              mdl_blocks=(10.0, 50.0, 100.0), shots=[5], draws=2, class_weight="balanced",
              refit=True)
    ours = engine.solve(store, run="trows", client=client, shard="rows", **kw)
    one = one_thread(engine.solve, store, run="tone", **kw)
    assert ours.backends["4"]["features"] == "rows over 2 shards"
    a, b = (r.table.set_index("split") for r in (ours, one))
    assert a.l2.equals(b.l2) and a.fitted_on.equals(b.fitted_on)
    assert a.loc["test", "shuffled_top1_error"] > 0.6  # the shuffled labels, not the task's
    for col in ("top1_error", "shuffled_top1_error", "shots_5_top1_error"):
        np.testing.assert_allclose(a[col], b[col], atol=0.011, err_msg=col)  # a row or two
    np.testing.assert_allclose(a.codelength, b.codelength, rtol=1e-3)
    np.testing.assert_allclose(ours.weights["4"][0], one.weights["4"][0], atol=1e-3)


def test_a_row_shard_that_keeps_failing_names_its_rows(store, client):
    chunk = Path(store.path) / "train/features/1/c/6/0"  # rows 384-447: the second shard
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(ProbeEngineError, match=r"the row shard \[256, 540\) of split 'train' "
                       r"\(layers \['1', '3'\]\) on the Dask cluster failed after 2 retries: "
                       r"StoreCorruptedError"):
        engine.solve(store, run="rpoison", layers=["1", "3"], client=client, shard="rows",
                     **SOLVE)
    assert engine.load_results(store.path, run="rpoison").weights == {}  # nothing half-done


def test_client_needs_a_store(client):
    with pytest.raises(engine.InvalidArgumentError, match="every worker can open"):
        engine.solve({"a": np.ones((4, 2), np.float32)}, labels=np.array([0, 1, 0, 1]),
                      l2=0.1, client=client)


# -- builds ------------------------------------------------------------------------------
class _Poisoned(nn.Module):
    """An MLP whose forward fails on any batch holding row 300 of the training images (whose
    pixels it recognises), on whatever worker, every time."""

    def __init__(self, marker: torch.Tensor):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))
        self.register_buffer("marker", marker)

    def forward(self, x):
        if (x.flatten(1) == self.marker.flatten()).all(dim=1).any():
            raise RuntimeError("poisoned row")
        return self.body(x)


cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/

BUILD = dict(layers="auto", dtype="float16", batch_size=32, block_bytes=1, progress=False)


def _tree(path) -> dict:
    """Every array of a store (as numpy) and every group's attributes."""
    import zarr

    root = zarr.open_group(str(path), mode="r")
    out = {"/": json.dumps(dict(root.attrs), sort_keys=True)}
    for name, node in root.members(max_depth=None):
        if isinstance(node, zarr.Array):
            out[name] = (node[...], json.dumps(dict(node.attrs), sort_keys=True))
        else:
            out[name] = json.dumps(dict(node.attrs), sort_keys=True)
    return out


def _assert_same_store(a, b):
    ta, tb = _tree(a), _tree(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        if isinstance(ta[name], tuple):
            np.testing.assert_array_equal(ta[name][0], tb[name][0], err_msg=name)
            assert ta[name][1] == tb[name][1], name
        else:
            assert ta[name] == tb[name], name


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))


@pytest.fixture
def mlp():
    return _mlp()


@pytest.fixture(scope="module")
def one(fashion, tmp_path_factory):
    """The single-process build of the MLP at the workers' thread count, built once: what
    every Dask build here must equal, array for array."""
    return one_thread(engine.build_store, _mlp(), fashion,
                      tmp_path_factory.mktemp("one") / "one.zarr", **BUILD)


def test_distributed_build_equals_the_single_process_build(fashion, mlp, one, client,
                                                           tmp_path):
    ours = engine.build_store(mlp, fashion, tmp_path / "dask.zarr", client=client, **BUILD)
    assert one.meta.config.block_rows == 32  # 27 blocks: many tasks on two workers
    _assert_same_store(one.path, ours.path)
    assert ours.complete and ours.verify().ok
    assert sorted(os.listdir(ours.path)) == sorted(os.listdir(one.path))  # no markers left
    # idempotent: building it again writes nothing
    mtimes = {p: p.stat().st_mtime_ns for p in Path(ours.path).rglob("*") if p.is_file()}
    engine.build_store(mlp, fashion, tmp_path / "dask.zarr", client=client, **BUILD)
    assert mtimes == {p: p.stat().st_mtime_ns for p in Path(ours.path).rglob("*")
                      if p.is_file()}


def test_a_token_row_store_builds_on_the_cluster_as_in_one_process(client, tmp_path):
    """rows="tokens" on two workers: each task captures its blocks of token rows from the
    batch holding their first row; the store equals the single-process build."""
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32)
    bert = transformers.BertModel(config).eval()
    rng = np.random.default_rng(0)
    texts = [" ".join("abcdefgh"[int(i)] for i in rng.integers(0, 8, size=int(n)))
             for n in rng.integers(3, 20, size=40)]
    labels = [[int(c in "aeiou") for c in t.split()] for t in texts]

    def build(path, **kw):
        data = engine.TextDataset(texts, tokenizer=lambda t: [ord(c) - 90 for c in t.split()],
                                  token_labels=labels)
        return engine.build_store(bert, data, path, layers=["encoder.layer.0",
                                                            "encoder.layer.1"],
                                  rows="tokens", batch_size=6, block_bytes=1, valid_size=0,
                                  progress=False, **kw)

    one = one_thread(build, tmp_path / "one.zarr")
    assert one.rows("train") > 3 * one.meta.config.block_rows  # several tasks, cut batches
    ours = build(tmp_path / "dask.zarr", client=client)
    _assert_same_store(one.path, ours.path)
    assert ours.verify().ok


def test_a_worker_killed_during_a_build_changes_nothing(fashion, mlp, one, client, tmp_path):
    store, _ = run_killing_a_worker(client, lambda: engine.build_store(
        mlp, fashion, tmp_path / "dask.zarr", client=client, **BUILD))
    _assert_same_store(one.path, store.path)


def test_a_block_that_keeps_failing_names_its_rows(fashion, client, tmp_path):
    torch.manual_seed(0)
    model = _Poisoned(fashion["train"][300][0])
    path = tmp_path / "p.zarr"
    with pytest.raises(ProbeEngineError, match=r"capturing split '(train|valid)', rows \d+\.\."
                                              r"\d+ on the Dask cluster failed after 2 "
                                              r"retries: RuntimeError: poisoned row"):
        engine.build_store(model, fashion, path, client=client,
                           **{**BUILD, "layers": ["body.1"]})
    store = engine.open_store(path)
    assert not store.complete  # nothing committed in the metadata, the other blocks marked
    assert len(list((path / ".probe-engine-shards").rglob("*-*"))) >= 20


def test_an_fsspec_url_store_builds_and_solves_on_the_cluster(fashion, mlp, one, client,
                                                              tmp_path):
    url = f"file://{tmp_path}/url.zarr"  # through fsspec, as an object store would be
    ours = engine.build_store(mlp, fashion, url, client=client, **BUILD)
    assert ours.path == url and ours.complete
    _assert_same_store(one.path, tmp_path / "url.zarr")
    res = engine.solve(url, client=client, layers=["1", "3"], **SOLVE)
    assert list(res.weights) == ["1", "3"]
    assert set(engine.load_results(url).weights) == {"1", "3"}
