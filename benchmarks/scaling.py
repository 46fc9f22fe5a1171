"""Scaling benchmark: build and solve on a local Dask cluster of 1 and 2 workers, side by side.

Workers are processes of one thread each (``engine.cluster``), so 2 workers use the two
cores of the CI machine; speed-up = time(1 worker) / time(2 workers), efficiency = speed-up
/ 2. Cluster start-up is outside the timings; scattering the model and data is inside.

- build: the paper's MNIST convnet (10 sites, ``reduce="auto"``) on Fashion-MNIST rows.
- solve: a problem with enough probes to share: the 16 hidden layers (256 units, ReLU) of a
  seeded MLP on Fashion-MNIST, each probed at lambda 1e-4 to tol 1e-5.
- rows: one wide layer no task can split (D = 1,024 class-structured features, 100 classes,
  three lambdas), solved row-parallel (``shard="rows"``): each pass summed over one row
  shard per worker, the L-BFGS state on the driver.

    python -m benchmarks.scaling [--quick] [--workers 1 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

import engine

SOLVE = dict(l2=1e-4, tol=1e-5, max_iter=2000, device="cpu", progress=False)
ROWS = dict(l2=[1e-4, 1e-3, 1e-2], tol=1e-4, max_iter=2000, device="cpu", progress=False)


def _rows(n: int) -> dict:
    return {"train": engine.datasets.fashion_mnist("train").subset(0, n)}


def deep_mlp(depth: int = 16, width: int = 256) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(784, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def wide_layer_store(path: Path, rows: int, d: int = 1024, classes: int = 100
                     ) -> engine.Store:
    """One layer of ``d`` class-structured float32 features (class means plus noise),
    train ``rows`` and valid ``rows // 5``, in a store built by the engine. Blocks of 4 MiB
    (1,024 rows at D = 1,024): row shards are whole blocks, so small blocks keep two
    workers' shards even (the default 64 MiB would make 6,000 rows one block, one shard)."""
    gen = torch.Generator().manual_seed(0)
    means = torch.randn(classes, d, generator=gen) * 0.3

    def split(n: int) -> TensorDataset:
        y = torch.randint(0, classes, (n,), generator=gen)
        return TensorDataset(means[y] + torch.randn(n, d, generator=gen), y)

    return engine.build_store(nn.Sequential(nn.Identity()),
                              {"train": split(rows), "valid": split(rows // 5)}, path,
                              layers=["0"], reduce="none", dtype="float32", block_bytes=4 << 20,
                              progress=False)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--device", default="cpu", help="accepted for python -m benchmarks")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    build_rows, solve_rows = (4096, 3000) if args.quick else (16384, 10_000)
    wide_rows = 6000 if args.quick else 20_000
    times: dict[str, dict[int, float]] = {"build": {}, "solve": {}, "rows": {}}
    with tempfile.TemporaryDirectory(prefix="probe-engine-scaling-") as tmp:
        tmp = Path(tmp)
        convnet = engine.models.mnist_convnet()
        mlp = deep_mlp()
        relus = [str(i) for i, m in enumerate(mlp) if isinstance(m, nn.ReLU)]
        base = engine.build_store(mlp, _rows(solve_rows), tmp / "mlp.zarr", layers=relus,
                                  dtype="float32", valid_size=0, progress=False)
        wide = wide_layer_store(tmp / "wide.zarr", wide_rows)
        t0 = time.perf_counter()
        engine.solve(wide, run="here", **ROWS)
        here = time.perf_counter() - t0
        for n in args.workers:
            with engine.cluster(n) as client:
                client.wait_for_workers(n)
                t0 = time.perf_counter()
                engine.build_store(convnet, _rows(build_rows), tmp / f"b{n}.zarr",
                                   valid_size=0, progress=False, client=client)
                times["build"][n] = time.perf_counter() - t0
                t0 = time.perf_counter()
                res = engine.solve(base, run=f"w{n}", client=client, **SOLVE)
                times["solve"][n] = time.perf_counter() - t0
                assert list(res.weights) == base.layers
                t0 = time.perf_counter()
                res = engine.solve(wide, run=f"rows{n}", client=client, shard="rows", **ROWS)
                times["rows"][n] = time.perf_counter() - t0
                sharded = res.backends["0"]["features"]
                assert sharded == f"rows over {n} shards", (
                    f"the wide layer ran as {sharded!r}, not over {n} row shards: give it "
                    f"at least {n} blocks of rows")
            print(f"{n} worker(s): build {times['build'][n]:.1f} s, solve "
                  f"{times['solve'][n]:.1f} s, row-parallel {times['rows'][n]:.1f} s",
                  flush=True)
    results = []
    lo, hi = min(args.workers), max(args.workers)
    for stage, t in times.items():
        speedup = t[lo] / t[hi]
        results.append({
            "case": f"{stage} on {hi} vs {lo} worker(s)",
            "rows": {"build": build_rows, "solve": solve_rows, "rows": wide_rows}[stage],
            "seconds": {str(k): round(v, 2) for k, v in t.items()},
            "workers_speedup": round(speedup, 2), "efficiency": round(speedup / (hi / lo), 2),
            "ratio": round(speedup / (hi / lo), 2), "kind": "efficiency",
            "target": 0.8 if stage == "solve" else None})
        if stage == "rows":  # what the Dask round trips cost against no Dask at all
            results[-1]["in_process_s"] = round(here, 2)
        print(results[-1], flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "solve_layers": len(relus), "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
