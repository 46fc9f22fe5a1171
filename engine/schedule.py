"""Scale-out with Dask: probe-parallel solves over the workers of a ``distributed.Client``.

Every worker opens the store by its path (a filesystem all workers share), solves the layers
it is given with the single-device solver and writes their probes; nothing but the layer
names and the solve's arguments crosses the network. Layers are placed by cost, N * D_k * C
(longest first onto the least-loaded worker, LPT). A task is idempotent: a layer whose probe
is already saved is skipped, and one half-written by a worker that died is solved again, so
Dask may re-run any task on any worker and the results stay those of a single-process solve.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

from .errors import ProbeEngineError

__all__ = ["cluster", "place", "RETRIES"]

RETRIES = 2  # Dask re-runs a failing task this many times before its error is final


def cluster(n_workers: int | None = None, **kwargs: Any):
    """Start a local Dask cluster and return its ``distributed.Client``.

    One worker per GPU (``dask_cuda.LocalCUDACluster``) when CUDA devices and dask-cuda are
    present; else ``distributed.LocalCluster`` with ``n_workers`` processes (default: one per
    core) of one thread each. ``kwargs`` go to the cluster. Close the client when done (it is
    a context manager).
    """
    import torch
    from distributed import Client, LocalCluster

    kwargs.setdefault("dashboard_address", ":0")  # a free port: two clusters never clash
    if torch.cuda.is_available():
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            pass
        else:
            if n_workers is not None:
                kwargs.setdefault("n_workers", n_workers)
            return Client(LocalCUDACluster(**kwargs))
    kwargs.setdefault("n_workers", n_workers or os.cpu_count() or 1)
    kwargs.setdefault("threads_per_worker", 1)
    kwargs.setdefault("processes", True)
    return Client(LocalCluster(**kwargs))


def place(costs: Mapping[str, float], workers: list[str]) -> dict[str, str]:
    """layer -> worker: longest first onto the least-loaded worker (LPT; within 4/3 of the
    best makespan). Ties go to the worker listed first, so the placement is deterministic."""
    if not workers:
        raise ProbeEngineError("the Dask cluster has no workers; start some, or pass no client")
    load = dict.fromkeys(workers, 0.0)
    out = {}
    for layer in sorted(costs, key=lambda k: (-costs[k], k)):
        w = min(workers, key=lambda w: load[w])
        out[layer] = w
        load[w] += costs[layer]
    return out


def _solve_task(path: str, layer: str, kwargs: dict) -> dict:
    """On a worker: solve one layer of the store at ``path`` into its run; returns timings."""
    import torch
    from distributed import get_worker

    from .solve import solve

    try:  # one worker thread should not spin up every core's worth of torch threads
        torch.set_num_threads(max(1, get_worker().state.nthreads))
    except ValueError:  # not in a worker (a synchronous client in tests)
        pass
    t0 = time.perf_counter()
    solve(path, layers=[layer], progress=False, **kwargs)
    return {"layer": layer, "seconds": time.perf_counter() - t0, "pid": os.getpid()}


def solve_on(client, store, layers: list[str], costs: Mapping[str, float], kwargs: dict,
             *, progress: bool = False) -> list[dict]:
    """Solve ``layers`` of ``store`` on the workers of ``client`` (one task per layer, placed
    by :func:`place`, free to move if its worker dies); returns the tasks' reports."""
    from distributed import as_completed
    from tqdm.auto import tqdm

    workers = sorted(client.scheduler_info()["workers"])
    where = place({layer: costs[layer] for layer in layers}, workers)
    futures = {
        layer: client.submit(_solve_task, store.path, layer, kwargs, key=f"probe-{layer}-"
                             f"{time.time_ns()}", workers=[where[layer]],
                             allow_other_workers=True, retries=RETRIES, pure=False,
                             priority=int(costs[layer]))
        for layer in sorted(layers, key=lambda k: -costs[k])
    }
    with tqdm(total=len(futures), unit="layer", disable=not progress,
              desc=f"solve on {len(workers)} workers") as bar:
        for _ in as_completed(list(futures.values())):
            bar.update(1)
    reports, failed = [], []
    for layer, fut in futures.items():
        if fut.status == "finished":
            reports.append(fut.result())
        else:
            failed.append((layer, fut.exception()))
    if failed:
        layer, exc = failed[0]
        others = f" (and {len(failed) - 1} more layers)" if len(failed) > 1 else ""
        raise ProbeEngineError(
            f"solving layer {layer!r}{others} on the Dask cluster failed after {RETRIES} "
            f"retries: {type(exc).__name__}: {exc}. The probes already saved in "
            f"{store.path} are kept; fix the cause and run the same solve again to finish"
        ) from exc
    return reports
