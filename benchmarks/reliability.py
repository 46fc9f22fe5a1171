"""Reliability figures for ``benchmarks/RESULTS.md``: kills survived, corruptions detected
and repaired, bad inputs with a clear error, and rows lost (which must be 0).

    python -m benchmarks.reliability               # about 10 minutes on 2 cores
    python -m benchmarks.reliability --quick       # about 2 minutes

- Build kills: the tiny build of ``benchmarks._faults`` is SIGKILLed at every ``--step``-th
  key zarr writes (before the write, halfway through its temporary file, just after the
  rename) and at its first forward passes, resumed, and compared with an uninterrupted
  build array for array.
- Solve kills: a solve is killed after each k-th saved probe (and while saving one); the
  rerun must finish with the uninterrupted solve's probes, bit for bit (the killed solve
  runs with this process's thread count: GEMM reductions split by thread count).
- Corruptions: a byte flipped in, half truncated off or deleted from a chunk of a feature,
  label and index array (first, middle and last chunk); a read must raise
  ``StoreCorruptedError`` naming the array and chunk, ``verify`` must list it, and
  ``build_store(resume=True, repair=True)`` must restore the reference store.
- Bad inputs: every case of ``benchmarks._bad_inputs`` that can run here.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

import engine
from benchmarks import _bad_inputs
from benchmarks import _faults as F

RESULTS = Path(__file__).resolve().parent / "results"
SOLVE_KW = {"l2": 1e-3, "tol": 1e-5}


def build_kills(root: Path, step: int, forwards: int) -> dict:
    out = F.kill_sweep(root, step=step, forwards=forwards)
    out["failures"] = [f"{kill}: {key}: {what[:3]}" for kill, key, what in out["failures"]]
    return out


def _reference(root: Path) -> Path:
    """The tiny store, built uninterrupted into ``root/reference.zarr``."""
    root.mkdir(parents=True, exist_ok=True)
    ref = root / "reference.zarr"
    if not ref.exists():
        F.build(ref)
    return ref


def solve_kills(root: Path) -> dict:
    ref = _reference(root)
    full_path = root / "solved.zarr"
    shutil.rmtree(full_path, ignore_errors=True)
    shutil.copytree(ref, full_path)
    full = engine.solve(full_path, **SOLVE_KW, device="cpu", progress=False)
    layers = engine.open_store(ref).layers
    out = {"tried": 0, "survived": 0, "failures": []}
    for k in range(1, len(layers) + 1):
        for how in ("after", "mid"):
            path = root / "killed-solve.zarr"
            shutil.rmtree(path, ignore_errors=True)
            shutil.copytree(ref, path)
            out["tried"] += 1
            code = F.run_child(F.child_solve, str(path), k, how, SOLVE_KW,
                               threads=torch.get_num_threads())
            again = engine.solve(path, **SOLVE_KW, device="cpu", progress=False)
            problems = [] if code == -signal.SIGKILL else [f"the child exited with {code}"]
            for layer, (w, b) in full.weights.items():
                w2, b2 = again.weights[layer]
                if not (np.array_equal(w2, w) and np.array_equal(b2, b)):
                    problems.append(f"layer {layer}: other weights")
            cols = ["loss", "top1_error", "top5_error", "iterations"]
            if not again.table[cols].equals(full.table[cols]):
                problems.append("other losses, errors or iteration counts")
            if sorted(again.table.layer.unique()) != sorted(layers):
                problems.append("layers missing from the results")
            if problems:
                out["failures"].append(f"killed at probe {k} ({how}): {problems}")
            else:
                out["survived"] += 1
    return out


def corruptions(root: Path) -> dict:
    ref = _reference(root)
    store = engine.open_store(ref)
    layer = store.layers[len(store.layers) // 2]
    arrays = [f"train/features/{layer}", "valid/labels/y", "test/index"]
    out = {"injected": 0, "detected": 0, "repaired": 0, "rows_lost": 0, "failures": []}
    for array in arrays:
        a = zarr.open_array(ref / array, mode="r")
        chunks = -(-a.shape[0] // a.chunks[0])
        for chunk in sorted({0, chunks // 2, chunks - 1}):
            for how in ("flip", "truncate", "delete"):
                path = root / "damaged.zarr"
                shutil.rmtree(path, ignore_errors=True)
                shutil.copytree(ref, path)
                F.corrupt(path, array, chunk, how)
                out["injected"] += 1
                damaged = engine.open_store(path)
                split, kind, *rest = array.split("/")
                try:
                    if kind == "features":
                        damaged.read(split, rest[0])
                    elif kind == "labels":
                        damaged.labels(split, rest[0])
                    else:
                        damaged.index(split)
                    read = None
                except engine.StoreCorruptedError as exc:
                    read = str(exc)
                named = read is not None and array in read and f"c/{chunk}" in read
                listed = (array, chunk) in damaged.verify().bad_chunks
                if named and listed:
                    out["detected"] += 1
                else:
                    out["failures"].append(f"{how} {array} chunk {chunk}: read error "
                                           f"{read!r}, listed by verify: {listed}")
                try:
                    F.build(path, repair=True)
                    same = F.compare_stores(ref, path) == []
                except engine.ProbeEngineError as exc:
                    same = False
                    out["failures"].append(f"{how} {array} chunk {chunk}: repair: {exc}")
                out["repaired"] += same
                out["rows_lost"] += F.rows_lost(ref, path)
    return out


def bad_inputs() -> dict:
    runs = _bad_inputs.run_all(verbose=False)
    skipped = [c.name for c in _bad_inputs.CASES if _bad_inputs.skip_reason(c) is not None]
    return {"tried": len(runs), "clear": sum(ok for _, ok, _ in runs), "skipped": skipped,
            "failures": [f"{case.name}: {msg[:200]}" for case, ok, msg in runs if not ok]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="every 24th write, fewer kills")
    ap.add_argument("--step", type=int, help="kill at every STEP-th write (default 4; "
                    "quick 24)")
    ap.add_argument("--out", type=Path, help="JSON file (default: benchmarks/results/"
                    "reliability-cpu-DATE.json; quick runs write none)")
    args = ap.parse_args(argv)
    step = args.step or (24 if args.quick else 4)
    report: dict = {"machine": f"{platform.node()} {platform.machine()}, "
                    f"{os.cpu_count()} CPUs", "date": dt.date.today().isoformat(),
                    "command": "python -m benchmarks.reliability"
                    + (" --quick" if args.quick else "") + (f" --step {step}"
                                                            if args.step else "")}
    with tempfile.TemporaryDirectory(prefix="probe-engine-reliability-") as tmp:
        root = Path(tmp)
        for name, fn in (("build_kills", lambda: build_kills(root / "build", step,
                                                              forwards=4)),
                         ("solve_kills", lambda: solve_kills(root / "solve")),
                         ("corruptions", lambda: corruptions(root / "damage")),
                         ("bad_inputs", bad_inputs)):
            t = time.perf_counter()
            report[name] = fn()
            report[name]["seconds"] = round(time.perf_counter() - t, 1)
            print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in report[name].items()
                                           if k not in ("failures", "skipped")), flush=True)
    b, s, c, i = (report[k] for k in ("build_kills", "solve_kills", "corruptions",
                                       "bad_inputs"))
    report["summary"] = {
        "kills survived / tried": f"{b['survived'] + s['survived']} / "
                                  f"{b['tried'] + s['tried']}",
        "corruptions detected / injected": f"{c['detected']} / {c['injected']}",
        "corruptions repaired / injected": f"{c['repaired']} / {c['injected']}",
        "bad inputs with a clear error / tried": f"{i['clear']} / {i['tried']}",
        "rows lost": b["rows_lost"] + c["rows_lost"],
    }
    for k, v in report["summary"].items():
        print(f"{k:>40}: {v}")
    for part in (b, s, c, i):
        for failure in part["failures"]:
            print("FAILURE", failure)
    if not args.quick or args.out:
        out = args.out or RESULTS / f"reliability-cpu-{report['date']}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
