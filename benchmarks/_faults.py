"""Fault injection for probe-engine stores: real processes killed at chosen moments, chunk
files damaged on disk, and stores compared array for array.

Used by ``tests/test_reliability.py`` (and meant for a ``python -m benchmarks.reliability``):

- :func:`tiny_model` / :func:`tiny_data` / :data:`BUILD_KW`: a build of a few hundred rows
  and some twenty blocks that takes well under a second.
- :func:`run_child`: runs :func:`child_build` or :func:`child_solve` in a separate process
  (forked from a server that has imported torch once) that SIGKILLs itself at an exact
  moment: at the N-th key zarr's ``LocalStore`` writes (before it, halfway through its
  temporary file, or just after its rename), at the N-th forward pass, or after the K-th
  saved probe. Every moment is hit deterministically, with no sleeping.
- :func:`trace_writes`: the keys an uninterrupted build writes, in order, to pick moments;
  :func:`kill_sweep`: a kill at every key (or every ``step``-th), each resumed and compared.
- :func:`corrupt`: flip a byte in, truncate or delete a chunk file.
- :func:`compare_stores`: every difference between two stores (arrays, attributes).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from torch import nn

import engine
from engine import _zarr

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the fork server imports this module by name
    sys.path.insert(0, str(ROOT))

#: a build with many small blocks: 16 rows each, about 20 of them over three splits
BUILD_KW: dict[str, Any] = dict(batch_size=16, block_bytes=1, progress=False, device="cpu")


def tiny_model() -> nn.Module:
    """A small seeded convnet on 1x8x8 inputs (5 probe sites with ``layers="auto"``)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(64, 5),
    ).eval()


def tiny_data(n_train: int = 200, n_test: int = 60, classes: int = 5, seed: int = 0) -> dict:
    """{"train", "test"} TensorDatasets of 1x8x8 images; no ``classes`` attribute, so the
    build infers the number of classes at its end (one more metadata write to survive)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, n in (("train", n_train), ("test", n_test)):
        x = torch.randn(n, 1, 8, 8, generator=g)
        y = torch.randint(0, classes, (n,), generator=g)
        out[name] = torch.utils.data.TensorDataset(x, y)
    return out


def build(path: str | os.PathLike, **kw) -> engine.Store:
    """The tiny build, in this process."""
    return engine.build_store(tiny_model(), tiny_data(), path, **{**BUILD_KW, **kw})


# -- hooks, installed in the child ---------------------------------------------------------
def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _hook_writes(root: Path, kill: dict | None, trace: str | None) -> None:
    """Wrap zarr's LocalStore key writer (every key it writes: chunks and zarr.json)."""
    real = getattr(*_zarr.LOCAL_PUT)
    count = {"n": 0}

    def put(path: Path, value, exclusive: bool = False) -> int:
        count["n"] += 1
        if trace:
            with open(trace, "a") as f:
                f.write(os.path.relpath(path, root) + "\n")
        if kill and count["n"] == kill["n"]:
            if kill["mode"] == "before":
                _die()
            if kill["mode"] == "pause":  # hold the store (and its lock) until killed
                Path(kill["ready"]).write_text(str(os.getpid()))
                while True:
                    time.sleep(1)
            if kill["mode"] == "mid":  # zarr's temporary file half-written, never renamed
                path.parent.mkdir(parents=True, exist_ok=True)
                data = _zarr.buffer_bytes(value)
                with open(_zarr.temp_path(path), "wb") as f:
                    f.write(data[: len(data) // 2])
                    f.flush()
                    _die()
            try:  # zarr's exclusive writes of parent groups that exist fail, and it goes on
                return real(path, value, exclusive)
            finally:
                _die()  # "after": the key is complete, whatever was to follow is not
        return real(path, value, exclusive)

    setattr(*_zarr.LOCAL_PUT, put)


def _hook_forward(model: nn.Module, n: int) -> None:
    count = {"n": 0}

    def pre(module, args):
        count["n"] += 1
        if count["n"] == n:
            _die()

    model.register_forward_pre_hook(pre)


def child_build(path: str, kill: dict | None = None, trace: str | None = None,
                kw: dict | None = None) -> None:
    """Run the tiny build into ``path``; ``kill``: {"at": "write", "n": N, "mode": "before"
    | "mid" | "after"} or {"at": "forward", "n": N}, or {"at": "write", "n": N, "mode":
    "pause", "ready": FILE} to write FILE and wait there, holding the store, until killed;
    ``trace``: a file to log written keys."""
    torch.set_num_threads(1)
    model = tiny_model()
    if kill and kill["at"] == "write" or trace:
        _hook_writes(Path(path).resolve(), kill if kill and kill["at"] == "write" else None,
                     trace)
    if kill and kill["at"] == "forward":
        _hook_forward(model, kill["n"])
    engine.build_store(model, tiny_data(), path, **{**BUILD_KW, **(kw or {})})


def child_solve(path: str, kill_after: int, mode: str = "after", kw: dict | None = None,
                log: str | None = None, threads: int = 1) -> None:
    """Solve the store at ``path`` with ``threads`` torch threads and SIGKILL after the
    ``kill_after``-th probe is saved (``mode="mid"``: while saving it, after its W and before
    its completion mark); ``log`` gets the saved layers, one a line. A probe is bitwise
    reproducible at a given thread count (not across counts: the GEMMs' reductions split
    differently), so compare with a solve run at the same count."""
    torch.set_num_threads(threads)
    real = engine.format.save_probe
    count = {"n": 0}

    def save(store_path, run, layer, record):
        count["n"] += 1
        if count["n"] == kill_after and mode == "mid":
            g = zarr.open_group(store_path, mode="r+").require_group(f"probes/{run}/{layer}")
            w = np.ascontiguousarray(record["W"], dtype=np.float32)
            g.create_array("W", shape=w.shape, dtype="float32", overwrite=True)[...] = w
            _die()
        real(store_path, run, layer, record)
        if log:
            with open(log, "a") as f:
                f.write(layer + "\n")
        if count["n"] == kill_after:
            _die()

    engine.format.save_probe = save  # the solver saves every probe through it
    engine.solve(path, progress=False, device="cpu", **(kw or {}))


_CTX = None


def _context():
    """Processes forked from a server that imported torch and this module once: each child
    starts in milliseconds, not seconds, yet is a fresh process with its own torch state."""
    global _CTX
    if _CTX is None:
        _CTX = multiprocessing.get_context("forkserver")
        _CTX.set_forkserver_preload(["benchmarks._faults"])
    return _CTX


def start_child(target, *args, **kwargs):
    """Start ``target(*args, **kwargs)`` (a function of this module) in a child process;
    returns the ``multiprocessing.Process``."""
    proc = _context().Process(target=target, args=args, kwargs=kwargs)
    proc.start()
    return proc


def run_child(target, *args, timeout: float = 120, **kwargs) -> int:
    """Run ``target(*args, **kwargs)`` (a function of this module) in a child process;
    returns its exit code (``-signal.SIGKILL`` when it killed itself)."""
    proc = start_child(target, *args, **kwargs)
    proc.join(timeout)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
        raise TimeoutError(f"child {target.__name__}{args} ran past {timeout} s")
    return proc.exitcode


def trace_writes(path: str | os.PathLike, trace: str | os.PathLike, **kw) -> list[str]:
    """The keys (relative paths) an uninterrupted child build into ``path`` writes, in
    order."""
    code = run_child(child_build, str(path), None, str(trace), kw)
    if code != 0:
        raise RuntimeError(f"the traced build exited with {code}")
    return Path(trace).read_text().splitlines()


def kill_sweep(root: str | os.PathLike, *, modes=("mid", "before", "after"), step: int = 1,
               forwards: int = 0) -> dict:
    """Kill the tiny build at every ``step``-th key it writes, in each of ``modes``, and at
    each of its first ``forwards`` forward passes; resume each in this process and compare
    it with an uninterrupted build.

    Returns {"tried": kills, "survived": resumed stores equal to the reference that pass
    ``verify`` with no temporary file left, "rows_lost": rows of the resumed stores that
    differ from the reference, summed, "failures": [(kill, key, what)]}.
    """
    import shutil

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    ref = root / "reference.zarr"
    keys = trace_writes(ref, root / "trace.txt")
    kills = [{"at": "write", "n": n, "mode": mode}
             for n in range(1, len(keys) + 1, step) for mode in modes]
    kills += [{"at": "forward", "n": n} for n in range(1, forwards + 1)]
    out: dict = {"tried": 0, "survived": 0, "rows_lost": 0, "failures": []}
    for kill in kills:
        path = root / "killed.zarr"
        shutil.rmtree(path, ignore_errors=True)
        out["tried"] += 1
        code = run_child(child_build, str(path), kill)
        try:
            store = build(path)
            out["rows_lost"] += rows_lost(ref, path)
            problems = [*compare_stores(ref, path), *store.verify().problems,
                        *map(str, partial_files(path))]
        except Exception as exc:  # noqa: BLE001 - a failure to report, not to raise
            problems = [f"{type(exc).__name__}: {exc}"]
            out["rows_lost"] += rows_lost(ref, path)
        if code != -signal.SIGKILL:
            problems.insert(0, f"the child exited with {code}, not SIGKILL")
        if problems:
            key = keys[kill["n"] - 1] if kill["at"] == "write" else "forward pass"
            out["failures"].append((kill, key, problems))
        else:
            out["survived"] += 1
    return out


def rows_lost(ref: str | os.PathLike, path: str | os.PathLike) -> int:
    """Rows of the reference store's split arrays (features, labels, index) that the store
    at ``path`` lacks, cannot read, or holds with other values; each row counted once per
    split."""
    lost = 0
    ga = zarr.open_group(str(ref), mode="r")
    try:
        gb = zarr.open_group(str(path), mode="r")
    except (FileNotFoundError, ValueError, OSError):
        gb = None
    for split in ga.attrs["probe_engine"]["splits"]:
        rows = ga[f"{split}/index"].shape[0]
        bad = np.zeros(rows, dtype=bool)
        for name, node in ga[split].members(max_depth=None):
            if not isinstance(node, zarr.Array):
                continue
            try:
                other = gb[f"{split}/{name}"][...]
                same = (node[...] == other).reshape(rows, -1).all(axis=1)
            except Exception:  # noqa: BLE001 - absent, unreadable or reshaped: all lost
                same = np.zeros(rows, dtype=bool)
            bad |= ~same
        lost += int(bad.sum())
    return lost


# -- damage ----------------------------------------------------------------------------------
def chunk_file(store: str | os.PathLike, array: str, chunk: int) -> Path:
    """The file of row-chunk ``chunk`` of ``array`` (e.g. ``"train/features/logits"``)."""
    arr = zarr.open_array(Path(store) / array, mode="r")
    return Path(store, array, "c", str(chunk), *(["0"] * (len(arr.shape) - 1)))


def corrupt(store: str | os.PathLike, array: str, chunk: int, how: str) -> Path:
    """Damage one chunk file: ``"flip"`` a byte in its middle, ``"truncate"`` it to half,
    or ``"delete"`` it. Returns the file."""
    f = chunk_file(store, array, chunk)
    raw = bytearray(f.read_bytes())
    if how == "flip":
        raw[len(raw) // 2] ^= 0x5A
        f.write_bytes(bytes(raw))
    elif how == "truncate":
        f.write_bytes(bytes(raw[: len(raw) // 2]))
    elif how == "delete":
        f.unlink()
    else:
        raise ValueError(f"how must be 'flip', 'truncate' or 'delete', not {how!r}")
    return f


def partial_files(store: str | os.PathLike) -> list[Path]:
    """zarr temporary files (``*.partial``) left in a store."""
    return sorted(_zarr.temp_files(store))


def files(store: str | os.PathLike) -> dict[str, tuple[int, bytes]]:
    """relative path -> (mtime_ns, contents) of every file of a local store."""
    root = Path(store)
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}


def compare_stores(a: str | os.PathLike, b: str | os.PathLike, *,
                   probes: bool = True) -> list[str]:
    """Every difference between the stores at ``a`` and ``b``: the set of arrays and groups,
    each array's shape, dtype, chunks and bytes, and every node's attributes (the probes'
    ``seconds`` and ``backend`` excepted). Empty when they are the same store."""
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    na = dict(ga.members(max_depth=None))
    nb = dict(gb.members(max_depth=None))
    if not probes:
        na = {k: v for k, v in na.items() if not k.startswith("probes")}
        nb = {k: v for k, v in nb.items() if not k.startswith("probes")}
    out = [f"{k}: only in {a}" for k in sorted(set(na) - set(nb))]
    out += [f"{k}: only in {b}" for k in sorted(set(nb) - set(na))]
    if _attrs(ga) != _attrs(gb):
        out.append(f"root attributes differ: {_attrs(ga)} != {_attrs(gb)}")
    for k in sorted(set(na) & set(nb)):
        x, y = na[k], nb[k]
        if _attrs(x) != _attrs(y):
            out.append(f"{k}: attributes differ: {_attrs(x)} != {_attrs(y)}")
        if isinstance(x, zarr.Array) != isinstance(y, zarr.Array):
            out.append(f"{k}: an array in one store only")
        elif isinstance(x, zarr.Array):
            if (x.shape, x.dtype, x.chunks) != (y.shape, y.dtype, y.chunks):
                out.append(f"{k}: {x.shape} {x.dtype} {x.chunks} != "
                           f"{y.shape} {y.dtype} {y.chunks}")
            elif x[...].tobytes() != y[...].tobytes():
                out.append(f"{k}: values differ")
    return out


def _attrs(node) -> dict:
    attrs = json.loads(json.dumps(dict(node.attrs)))
    rec = attrs.get("probe_engine")
    if isinstance(rec, dict):
        for volatile in ("seconds", "backend"):
            rec.pop(volatile, None)
    return attrs


if __name__ == "__main__":  # python -m benchmarks._faults build PATH [KILL-JSON]
    if sys.argv[1] == "build":
        child_build(sys.argv[2], json.loads(sys.argv[3]) if len(sys.argv) > 3 else None)
    else:
        raise SystemExit(f"unknown command {sys.argv[1]!r}")
