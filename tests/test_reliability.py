"""Reliability under faults, with real processes and real files: builds and solves SIGKILLed
at chosen moments, exceptions inside compression and store writes, full disks, no
permission, damaged chunk files, a second writer, and reruns that must write nothing."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import zarr

import engine
from benchmarks import _faults as F
from engine import _lock, _zarr

KILLED = -signal.SIGKILL


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted child build and the keys it wrote, in order."""
    root = tmp_path_factory.mktemp("reference")
    keys = F.trace_writes(root / "ref.zarr", root / "trace.txt")
    return root / "ref.zarr", keys


def _moment(keys: list[str], name: str) -> int:
    """1-based index of the write to kill at, by name."""
    chunks = [i for i, k in enumerate(keys, 1) if "/c/" in k]
    commits = [i for i, k in enumerate(keys, 1) if k == "zarr.json" and i > chunks[0]]
    first_valid = next(i for i in chunks if keys[i - 1].startswith("valid/"))
    train = [i for i in chunks if keys[i - 1].startswith("train/")]
    labels_attrs = [i for i, k in enumerate(keys, 1)
                    if k.endswith("labels/y/zarr.json") and i > chunks[0]]
    return {
        "first key": 1,
        "array creation": chunks[0] // 2,
        "first chunk": chunks[0],
        "first commit": commits[0],
        "middle chunk": train[len(train) // 2],
        "middle commit": commits[len(commits) // 2],
        "split boundary": first_valid,
        "last chunk": chunks[-1],
        "num_classes attributes": labels_attrs[1],
        "last commit": len(keys),
    }[name]


MOMENTS = [  # (moment, how): 13 kills, from the first key written to the last
    ("first key", "mid"),             # the root metadata half-written: no store yet
    ("array creation", "after"),      # some arrays created, others not
    ("first chunk", "mid"),           # first block, its first chunk half-written
    ("first commit", "before"),       # first block written, not committed
    ("first commit", "mid"),          # while the root metadata is rewritten
    ("first commit", "after"),        # just committed
    ("middle chunk", "before"),
    ("middle commit", "mid"),
    ("split boundary", "mid"),        # first chunk of the second split
    ("last chunk", "after"),          # every chunk written, the last block uncommitted
    ("num_classes attributes", "mid"),  # the end: inferred classes being written
    ("last commit", "mid"),           # just before the end
    ("last commit", "after"),         # complete, killed before returning
]


@pytest.mark.parametrize(("moment", "how"), MOMENTS, ids=[f"{m}-{h}" for m, h in MOMENTS])
def test_build_killed_at_any_moment_resumes_to_the_same_store(reference, tmp_path, moment,
                                                              how):
    ref, keys = reference
    path = tmp_path / "s.zarr"
    n = _moment(keys, moment)
    assert F.run_child(F.child_build, str(path), {"at": "write", "n": n, "mode": how}) \
        == KILLED
    if how == "mid":
        assert F.partial_files(path), "the kill left zarr's temporary file"
    if engine.format.describe_path(path) == "a probe-engine store":
        # what the killed build committed is intact, whatever it was doing
        killed = engine.open_store(path)
        report = killed.verify()
        assert report.bad_chunks == [], report
        # arrays may be missing only while nothing is committed (a creation cut short)
        assert report.ok or all(killed.committed(s) == 0 for s in killed.splits), report
        for s in killed.splits:  # whole blocks of 16 rows, or the split's end
            assert killed.committed(s) % 16 == 0 or killed.committed(s) == killed.rows(s)
    store = F.build(path)
    assert store.complete and store.verify().ok
    assert F.compare_stores(ref, path) == []
    assert F.partial_files(path) == []
    assert not _lock.lock_path(path).exists()


@pytest.mark.slow
def test_kills_at_every_twelfth_write_all_resume(tmp_path):
    result = F.kill_sweep(tmp_path, modes=("mid",), step=12, forwards=2)
    assert result["tried"] >= 22
    assert result["failures"] == [] and result["survived"] == result["tried"]
    assert result["rows_lost"] == 0


def test_rows_lost_counts_damaged_and_missing_rows(reference, tmp_path):
    ref, _ = reference
    path = tmp_path / "s.zarr"
    shutil.copytree(ref, path)
    assert F.rows_lost(ref, path) == 0
    arr = zarr.open_array(path / "train" / "labels" / "y", mode="r+")
    y = arr[...]
    y[[3, 5]] = (y[[3, 5]] + 1) % 5
    arr[...] = y
    assert F.rows_lost(ref, path) == 2
    shutil.rmtree(path / "test")  # every test row
    assert F.rows_lost(ref, path) == 2 + engine.open_store(ref).rows("test")


def test_commits_count_exactly_the_written_blocks(reference, tmp_path):
    """Killed after the k-th commit, exactly k blocks are committed; killed before it, k-1."""
    ref, keys = reference
    commits = [i for i, k in enumerate(keys, 1) if k == "zarr.json" and "/c/" in keys[i - 2]]
    k = 3
    for how, expect in (("after", k), ("before", k - 1)):
        path = tmp_path / f"{how}.zarr"
        assert F.run_child(F.child_build, str(path),
                           {"at": "write", "n": commits[k - 1], "mode": how}) == KILLED
        assert engine.open_store(path).committed("train") == 16 * expect


@pytest.mark.parametrize("n", [2, 9])  # the first batch of the capture, a middle one
def test_build_killed_in_a_forward_pass_resumes(reference, tmp_path, n):
    ref, _ = reference
    path = tmp_path / "s.zarr"
    assert F.run_child(F.child_build, str(path), {"at": "forward", "n": n}) == KILLED
    store = F.build(path)
    assert store.complete and F.compare_stores(ref, path) == []


# -- exceptions inside compression and store writes -------------------------------------
def _failing_put(monkeypatch, *, at: int, exc: BaseException, keys: list[str] | None = None):
    """zarr's LocalStore put of the ``at``-th chunk writes part of its temporary file,
    then raises ``exc`` (as a full disk does halfway through a write)."""
    real = getattr(*_zarr.LOCAL_PUT)
    count = {"n": 0}

    def put(path, value, exclusive=False):
        if "/c/" in str(path):
            count["n"] += 1
            if count["n"] == at:
                if keys is not None:
                    keys.append(str(path))
                path.parent.mkdir(parents=True, exist_ok=True)
                with _zarr.write_aside(path, "wb", exclusive) as f:
                    f.write(_zarr.buffer_bytes(value)[:7])
                    raise exc
        return real(path, value, exclusive)

    monkeypatch.setattr(*_zarr.LOCAL_PUT, put)


@pytest.mark.parametrize(("exc", "words"), [
    (OSError(errno.ENOSPC, "No space left on device"), "is full"),
    (PermissionError(errno.EACCES, "Permission denied"), "no permission"),
    (RuntimeError("injected store failure"), "injected store failure"),
], ids=["ENOSPC", "EACCES", "exception"])
def test_a_failing_store_write_leaves_nothing_half_written(reference, tmp_path, monkeypatch,
                                                           exc, words):
    ref, _ = reference
    path = tmp_path / "s.zarr"
    failed: list[str] = []
    _failing_put(monkeypatch, at=40, exc=exc, keys=failed)
    with pytest.raises(engine.StoreError) as info:
        F.build(path)
    msg = str(info.value)
    chunk = Path(failed[0]).relative_to(path.resolve()).as_posix()
    assert str(path) in msg and words in msg and "resume=True" in msg, msg
    assert chunk in msg  # the very chunk: train/features/<layer>/c/<i>/0
    assert not Path(failed[0]).exists() and F.partial_files(path) == []
    partial = engine.open_store(path)
    assert 0 < partial.committed("train") < partial.rows("train") and partial.verify().ok
    before = {s: partial.read(s, "4") for s in ("train",)}
    monkeypatch.undo()
    store = F.build(path)
    assert F.compare_stores(ref, path) == []
    np.testing.assert_array_equal(store.read("train", "4")[: len(before["train"])],
                                  before["train"])


def test_an_exception_in_compression_names_the_path_and_a_rerun_completes(
        reference, tmp_path, monkeypatch):
    ref, _ = reference
    path = tmp_path / "s.zarr"
    real = getattr(*_zarr.BLOSC_ENCODE)
    count = {"n": 0}

    async def encode(self, chunk, spec):
        count["n"] += 1
        if count["n"] == 30:
            raise RuntimeError("injected compression failure")
        return await real(self, chunk, spec)

    monkeypatch.setattr(*_zarr.BLOSC_ENCODE, encode)
    with pytest.raises(engine.StoreError, match="injected compression failure") as info:
        F.build(path)
    assert str(path) in str(info.value) and "/c/" in str(info.value)
    assert F.partial_files(path) == [] and engine.open_store(path).verify().ok
    monkeypatch.undo()
    F.build(path)
    assert F.compare_stores(ref, path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders anyway")
def test_a_read_only_store_folder_is_a_clear_error(reference, tmp_path):
    ref, keys = reference
    path = tmp_path / "s.zarr"
    assert F.run_child(F.child_build, str(path), {"at": "write", "n": len(keys) // 2,
                                                  "mode": "before"}) == KILLED
    committed = engine.open_store(path).committed("train")
    folders = [p for p in [path, *path.rglob("*")] if p.is_dir()]
    for p in folders:
        p.chmod(0o555)
    try:
        with pytest.raises(engine.StoreError, match="cannot write|permission"):
            F.build(path)
    finally:
        for p in folders:
            p.chmod(0o755)
    assert engine.open_store(path).committed("train") == committed
    F.build(path)
    assert F.compare_stores(ref, path) == []


# -- damaged chunk files and repair --------------------------------------------------------
DAMAGE = [("train/features/1", 3, "flip"), ("valid/labels/y", 1, "truncate"),
          ("test/features/4", 2, "delete")]


def test_damaged_chunks_are_found_and_repaired_exactly(reference, tmp_path):
    ref, _ = reference
    path = tmp_path / "s.zarr"
    shutil.copytree(ref, path)
    for array, chunk, how in DAMAGE:
        F.corrupt(path, array, chunk, how)
    store = engine.open_store(path)
    with pytest.raises(engine.StoreCorruptedError, match=r"'train/features/1'.*c/3/0"):
        store.read("train", "1")
    with pytest.raises(engine.StoreCorruptedError, match=r"'valid/labels/y'.*labels/y/c/1"):
        store.labels("valid")
    with pytest.raises(engine.StoreCorruptedError, match=r"'test/features/4'.*missing.*c/2/0"):
        store.read("test", "4")
    store.read("train", "4")  # undamaged arrays read as before
    report = store.verify()
    assert sorted(report.bad_chunks) == sorted((a, c) for a, c, _ in DAMAGE)
    for array, chunk, how in DAMAGE:
        word = "missing" if how == "delete" else "corrupted"
        assert any(p.startswith(f"{array}/c/{chunk}") and word in p for p in report.problems)
    assert len(report.problems) == 3

    plain_resume = F.files(path)
    F.build(path)  # resume without repair does not read the committed chunks: no change
    assert F.files(path) == plain_resume

    before = F.files(path)
    repaired = F.build(path, repair=True)
    after = F.files(path)
    changed = {k for k in after if before.get(k) != after[k]}
    assert changed == {F.chunk_file(path, a, c).relative_to(path).as_posix()
                       for a, c, _ in DAMAGE}
    assert set(before) - set(after) == set()
    assert repaired.verify().ok and F.compare_stores(ref, path) == []

    again = F.files(path)
    F.build(path, repair=True)  # sound now: repair writes nothing
    assert F.files(path) == again


def test_repair_recreates_a_deleted_array_and_refuses_what_it_cannot_fix(reference,
                                                                         tmp_path):
    ref, _ = reference
    path = tmp_path / "s.zarr"
    shutil.copytree(ref, path)
    shutil.rmtree(path / "valid" / "features" / "2")
    assert any("valid/features/2: array is missing" in p
               for p in engine.open_store(path).verify().problems)
    F.build(path, repair=True)
    assert F.compare_stores(ref, path) == []

    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["probe_engine"]["splits"]["test"]["rows_committed"] = 10 ** 6
    (path / "zarr.json").write_text(json.dumps(meta))
    before = F.files(path)
    with pytest.raises(engine.StoreCorruptedError, match="(?s)rows_committed=1000000.*overwrite"):
        F.build(path, repair=True)
    assert F.files(path) == before


# -- one writer ------------------------------------------------------------------------------
def test_a_second_writer_is_refused_until_the_first_dies(reference, tmp_path):
    ref, keys = reference
    path = tmp_path / "s.zarr"
    ready = tmp_path / "ready"
    child = F.start_child(F.child_build, str(path),
                          {"at": "write", "n": len(keys) // 2, "mode": "pause",
                           "ready": str(ready)})
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert child.is_alive() and time.monotonic() < deadline
            time.sleep(0.02)
        with pytest.raises(engine.StoreLockedError) as info:
            F.build(path)
        msg = str(info.value)
        assert str(path) in msg and f"pid {child.pid}" in msg and socket.gethostname() in msg
        assert isinstance(info.value, engine.StoreError)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join()
    assert child.exitcode == KILLED
    store = F.build(path)  # the dead holder's lock went with it
    assert store.complete and F.compare_stores(ref, path) == []
    assert not _lock.lock_path(path).exists()


def test_lock_in_this_process_refuses_a_build(tmp_path):
    path = tmp_path / "s.zarr"
    with _lock.hold(path), pytest.raises(engine.StoreLockedError, match=f"pid {os.getpid()}"):
        F.build(path)
    assert not path.exists() or engine.format.describe_path(path) is None
    F.build(path)


def test_without_flock_a_dead_holders_lock_file_is_taken_over(tmp_path, monkeypatch):
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    path = tmp_path / "s.zarr"
    lock = _lock.lock_path(path)
    dead = F.start_child(F.tiny_model)
    dead.join()
    host = socket.gethostname()
    lock.write_text(json.dumps({"pid": dead.pid, "host": host, "since": "then"}))
    F.build(path)  # pid not alive on this host: stale
    assert not lock.exists()

    lock.write_text(json.dumps({"pid": os.getppid(), "host": host, "since": "now"}))
    with pytest.raises(engine.StoreLockedError, match=f"pid {os.getppid()}.*delete the lock"):
        F.build(path)
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "now"}))
    with pytest.raises(engine.StoreLockedError, match="elsewhere"):
        F.build(path)  # another host's, refreshed lately: held
    old = time.time() - _lock.STALE_SECONDS - 10
    os.utime(lock, (old, old))
    F.build(path)  # another host's, not refreshed for too long: stale
    assert not lock.exists()


def test_remote_urls_get_no_lock_file():
    assert _lock.lock_path("memory://x/s.zarr") is None
    assert _lock.lock_path("s3://bucket/s.zarr") is None
    assert _lock.lock_path("file:///tmp/a/s.zarr") == Path("/tmp/a/.s.zarr.lock")


# -- idempotence -------------------------------------------------------------------------------
def test_rerunning_a_complete_build_or_solve_writes_nothing(reference, tmp_path):
    ref, _ = reference
    path = tmp_path / "s.zarr"
    shutil.copytree(ref, path)
    kw = dict(l2=1e-3, tol=1e-4, device="cpu", progress=False)
    engine.solve(path, **kw)
    before = F.files(path)
    dirs = sorted(p for p in path.rglob("*") if p.is_dir())
    F.build(path)
    F.build(path, repair=True)
    first = engine.solve(path, **kw)
    again = engine.solve(path, **kw)
    assert F.files(path) == before
    assert sorted(p for p in path.rglob("*") if p.is_dir()) == dirs
    pd.testing.assert_frame_equal(first.table.drop(columns="seconds"),
                                  again.table.drop(columns="seconds"))


def test_an_overwrite_killed_while_deleting_leaves_a_free_path(reference, tmp_path,
                                                               monkeypatch):
    ref, _ = reference
    path = tmp_path / "s.zarr"
    shutil.copytree(ref, path)
    real = shutil.rmtree

    def killed(p, *a, **kw):
        raise KeyboardInterrupt("killed while deleting")

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        F.build(path, overwrite=True)
    monkeypatch.setattr(shutil, "rmtree", real)
    assert not path.exists()  # renamed aside whole, never half-deleted
    leftovers = list(tmp_path.glob(".s.zarr.deleting-*"))
    assert len(leftovers) == 1
    F.build(path)
    F.build(path, overwrite=True)  # the next deletion sweeps the leftovers
    assert not list(tmp_path.glob(".s.zarr.deleting-*"))
    assert F.compare_stores(ref, path) == []


# -- a solve killed in the middle -----------------------------------------------------------
@pytest.fixture(scope="module")
def solved(reference, tmp_path_factory):
    """A store of the reference build and its uninterrupted solve."""
    ref, _ = reference
    root = tmp_path_factory.mktemp("solved")
    shutil.copytree(ref, root / "full.zarr")
    full = engine.solve(root / "full.zarr", **SOLVE_KW, device="cpu", progress=False)
    return root / "full.zarr", full


SOLVE_KW = dict(l2=1e-3, tol=1e-4)


@pytest.mark.parametrize("how", ["after", "mid"])
def test_a_killed_solve_reruns_only_the_missing_probes(solved, reference, tmp_path, refits,
                                                       how):
    full_path, full = solved
    ref, _ = reference
    path = tmp_path / "s.zarr"
    shutil.copytree(ref, path)
    log = tmp_path / "saved.txt"
    assert F.run_child(F.child_solve, str(path), 2, how, SOLVE_KW, str(log),
                       threads=torch.get_num_threads()) == KILLED
    saved = log.read_text().splitlines() if log.exists() else []
    assert len(saved) == (2 if how == "after" else 1)
    store = engine.open_store(path)
    assert set(engine.load_results(store).weights) == set(saved)

    again = engine.solve(path, **SOLVE_KW, device="cpu", progress=False)
    assert refits == [[layer for layer in store.layers if layer not in saved]]
    # bit for bit: a probe does not depend on which probes it is fitted with, only on the
    # thread count, which the killed child shares with this process
    cols = [c for c in full.table.columns if c != "seconds"]
    pd.testing.assert_frame_equal(again.table[cols], full.table[cols], check_exact=True)
    for layer, (w, b) in full.weights.items():
        np.testing.assert_array_equal(again.weights[layer][0], w)
        np.testing.assert_array_equal(again.weights[layer][1], b)
    assert F.compare_stores(full_path, path, probes=False) == []


def test_subsample_indices_damaged_or_never_written_are_rewritten(tmp_path):
    kw = dict(reduce={"0": "subsample:7"})
    ref = F.build(tmp_path / "ref.zarr", **kw)
    path = tmp_path / "s.zarr"
    shutil.copytree(ref.path, path)
    F.corrupt(path, "reductions/0/indices", 0, "flip")
    assert engine.open_store(path).verify().bad_chunks == [("reductions/0/indices", 0)]
    with pytest.raises(engine.StoreCorruptedError, match=r"reductions/0/indices/c/0.*repair"):
        F.build(path, **kw)
    F.build(path, repair=True, **kw)
    assert F.compare_stores(ref.path, path) == []
    F.corrupt(path, "reductions/0/indices", 0, "delete")  # as a kill before its first write
    F.build(path, **kw)
    assert F.compare_stores(ref.path, path) == []
