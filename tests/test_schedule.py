"""engine.schedule: probe-parallel solves on a real ``distributed.LocalCluster`` (two worker
processes, on the CPU): the same probes as a single-process solve, a worker killed midway,
a task that keeps failing."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import engine
from engine.errors import ProbeEngineError
from engine.schedule import place

LAYERS = ["1", "2", "3", "4"]


@pytest.fixture(scope="module")
def wide_store(tmp_path_factory, fashion):
    """float32 features of a wide MLP on 600 Fashion-MNIST rows: four layers of 784 to 10
    features, train 540 / valid 60 / test 200."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 784), nn.ReLU(), nn.Linear(784, 64),
                          nn.Linear(64, 10))
    return engine.build_store(model, fashion, tmp_path_factory.mktemp("wide") / "s.zarr",
                              layers=LAYERS, dtype="float32", progress=False)


@pytest.fixture
def store(wide_store, tmp_path):
    import shutil

    shutil.copytree(wide_store.path, tmp_path / "s.zarr")
    return engine.open_store(tmp_path / "s.zarr")


@pytest.fixture
def client():
    with engine.cluster(2, threads_per_worker=1, processes=True) as c:
        yield c


SOLVE = dict(l2=[1e-4, 1e-2], tol=1e-6, device="cpu", progress=False)


def single(store, run):
    """The single-process solve with one torch thread, as each one-thread worker runs it:
    the same arithmetic in the same order, so the same bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return engine.solve(store, run=run, **SOLVE)
    finally:
        torch.set_num_threads(threads)


def test_place_is_longest_first_onto_the_least_loaded_worker():
    costs = {"a": 7, "b": 5, "c": 4, "d": 3, "e": 3, "f": 1}
    where = place(costs, ["w1", "w2"])
    assert where == {"a": "w1", "b": "w2", "c": "w2", "d": "w1", "e": "w2", "f": "w1"}
    loads = {w: sum(costs[k] for k, v in where.items() if v == w) for w in ("w1", "w2")}
    assert loads == {"w1": 11, "w2": 12}  # the best split of 23 is 11 / 12
    assert place(costs, ["w1"]) == dict.fromkeys(costs, "w1")
    with pytest.raises(ProbeEngineError, match="no workers"):
        place(costs, [])


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


def test_a_worker_killed_midway_changes_nothing(store, client):
    pids = client.run(os.getpid)
    box = {}

    def go():
        try:
            box["res"] = engine.solve(store, run="kill", client=client, **SOLVE)
        except BaseException as exc:  # noqa: BLE001 - reported below
            box["err"] = exc

    thread = threading.Thread(target=go)
    thread.start()
    victim = None
    deadline = time.monotonic() + 60
    while victim is None and time.monotonic() < deadline:
        busy = [w for w, tasks in client.processing().items() if tasks]
        if busy:
            victim = pids[busy[0]]
            os.kill(victim, signal.SIGKILL)
        time.sleep(0.05)
    thread.join(timeout=300)
    assert victim is not None and not thread.is_alive()
    assert "err" not in box, box.get("err")
    one = single(store, "one")
    for layer in LAYERS:
        np.testing.assert_array_equal(box["res"].weights[layer][0], one.weights[layer][0])
    assert victim not in client.run(os.getpid).values()  # the nanny started a new one


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


def test_client_needs_a_store(client):
    with pytest.raises(ValueError, match="every worker can open"):
        engine.solve({"a": np.ones((4, 2), np.float32)}, labels=np.array([0, 1, 0, 1]),
                      l2=0.1, client=client)
