"""Scale-out with Dask: shard-parallel capture and probe-parallel solves over the workers of
a ``distributed.Client``.

Every worker opens the store by its path (a filesystem all workers share). A build cuts each
split's rows into whole row blocks, one task each: the worker runs the model on its block and
writes its chunks, which no other task touches, then marks the block done; when every block
is done the driver commits the splits in the root metadata, exactly as a single-process build
leaves them. A solve submits one task per layer with its cost N * D_k * C as priority, so
Dask hands the costliest layer left to whichever worker frees up first: longest first onto
the least-loaded worker (LPT), the load being the measured one rather than an estimate.
Each worker solves its layers with the single-device solver and saves their probes.

Every task is idempotent (a marked block or a saved probe is skipped; half-written ones are
written again), so Dask may re-run any task on any worker, after a worker dies for example,
and the store and probes stay those of a single process.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

from . import format as fmt
from ._fit import solve_stored
from ._writer import Block, CaptureJob, write_rows
from .capture import Runner
from .errors import ProbeEngineError
from .options import SolveOptions

__all__ = ["cluster", "solve_on", "build_on", "remove_markers", "RETRIES", "SHARDS"]

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


def _worker_threads() -> None:
    """One Dask worker thread should not spin up every core's worth of torch threads."""
    import torch
    from distributed import get_worker

    try:
        torch.set_num_threads(max(1, get_worker().state.nthreads))
    except ValueError:  # not in a worker
        pass


def _solve_task(path: str, layer: str, options: SolveOptions) -> dict:
    """On a worker: solve one layer of the store at ``path`` into its run; returns timings."""
    _worker_threads()
    start, t0 = time.time(), time.perf_counter()
    solve_stored(path, [layer], options)
    return {"layer": layer, "start": start, "seconds": time.perf_counter() - t0,
            "pid": os.getpid()}


def solve_on(client, path: str, layers: list[str], costs: Mapping[str, float],
             options: SolveOptions, *, progress: bool = False) -> list[dict]:
    """Solve ``layers`` of the store at ``path`` on the workers of ``client`` with
    ``options``, one task per layer, the costliest first, each running
    :func:`engine._fit.solve_stored`; returns the tasks' reports.

    Pinning layers to workers by their estimated costs (static LPT) was tried and lost to
    this dynamic order: iteration counts vary several-fold between layers of one cost
    (benchmarks/RESULTS.md, "Scaling").
    """
    from distributed import as_completed
    from tqdm.auto import tqdm

    workers = client.scheduler_info()["workers"]
    if not workers:
        raise ProbeEngineError("the Dask cluster has no workers; start some, or pass no client")
    futures = {
        layer: client.submit(_solve_task, path, layer, options,
                             key=f"probe-{layer}-{time.time_ns()}", retries=RETRIES,
                             pure=False, priority=int(costs[layer]))
        for layer in sorted(layers, key=lambda k: -costs[k])
    }
    with tqdm(total=len(futures), unit="layer", disable=not progress,
              desc=f"solve on {len(workers)} workers") as bar:
        for _ in as_completed(list(futures.values())):
            bar.update(1)
    _raise_failed(futures, lambda layer: f"solving layer {layer!r}", "layers",
                  f"The probes already saved in {path} are kept; fix the cause and run "
                  f"the same solve again to finish")
    return [fut.result() for fut in futures.values()]


def _raise_failed(futures: dict, name, plural: str, advice: str) -> None:
    """The first of the tasks that failed for good (Dask's retries spent), as one error."""
    failed = [(item, fut.exception()) for item, fut in futures.items()
              if fut.status != "finished"]
    if failed:
        item, exc = failed[0]
        others = f" (and {len(failed) - 1} more {plural})" if len(failed) > 1 else ""
        raise ProbeEngineError(
            f"{name(item)}{others} on the Dask cluster failed after {RETRIES} retries: "
            f"{type(exc).__name__}: {exc}. {advice}") from exc


# -- shard-parallel builds ---------------------------------------------------------------
#: where the tasks of a Dask build mark their finished blocks; removed when the build ends
SHARDS = ".probe-engine-shards"


def _shard_fs(path: str):
    """(fsspec filesystem, marker folder) of the store at ``path``, a path or any URL."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(path))
    return fs, f"{root.rstrip('/')}/{SHARDS}"


def _marker(path: str, split: str, start: int, stop: int) -> str:
    return f"{_shard_fs(path)[1]}/{split}/{start}-{stop}"


def _marked(path: str, split: str, start: int, stop: int) -> bool:
    return _shard_fs(path)[0].exists(_marker(path, split, start, stop))


def remove_markers(path: str) -> None:
    """Drop the block markers of an unfinished Dask build (a single process redoes those
    blocks, uncommitted as they are)."""
    fs, folder = _shard_fs(path)
    if fs.exists(folder):
        fs.rm(folder, recursive=True)


def _mark(path: str, block: Block) -> None:
    """A block's arrays are written: say so, all or nothing, with its largest label."""
    from fsspec.implementations.local import LocalFileSystem

    fs = _shard_fs(path)[0]
    marker = _marker(path, block.split, block.start, block.stop)
    data = json.dumps({"max_label": int(block.arrays[fmt.labels_path(block.split)].max())})
    fs.makedirs(marker.rpartition("/")[0], exist_ok=True)
    if isinstance(fs, LocalFileSystem):  # write aside, then rename
        fs.pipe_file(marker + ".tmp", data.encode())
        fs.mv(marker + ".tmp", marker)
    else:  # an object store's put is already all or nothing
        fs.pipe_file(marker, data.encode())


def _shard_task(path: str, model: bytes, job: CaptureJob, split: str, start: int,
                stop: int) -> dict:
    """On a worker: capture rows [start, stop) (whole blocks) of ``split`` into the store
    at ``path``; each block is marked done only once its arrays are written."""
    import pickle

    _worker_threads()
    # the model travels pickled by us: Dask's own torch serializer rebuilds a module's hook
    # tables as plain dicts, on which torch can no longer register hooks
    runner = Runner(pickle.loads(model), job.options.device, job.options.autocast,
                    job.options.channels_last)
    group = fmt.open_root(path, write=True)
    meta = fmt.read_meta(group, path)
    t0 = time.perf_counter()
    with runner:
        write_rows(runner, job, group, meta, path=path, ranges={split: (start, stop)},
                   on_commit=lambda block: _mark(path, block))
    return {"split": split, "start": start, "stop": stop, "seconds": time.perf_counter() - t0,
            "pid": os.getpid()}


def build_on(client, path: str, group, meta: fmt.StoreMeta, model, job: CaptureJob, *,
             progress: bool = False) -> None:
    """Capture every uncommitted block of the job's splits on the workers of ``client`` (one
    task per block of ``block_rows`` rows), then commit them in ``meta``, exactly as a
    single-process build leaves them."""
    from distributed import as_completed
    from tqdm.auto import tqdm

    block_rows = meta.config.block_rows
    shards = [(s.name, b0, min(b0 + block_rows, s.rows)) for s in job.splits
              for b0 in range(meta.splits[s.name].rows_committed, s.rows, block_rows)]
    if not shards:  # complete already: write nothing
        return
    todo = [sh for sh in shards if not _marked(path, *sh)]
    if todo:
        # the model and the job go to every worker once, not with every task
        import cloudpickle

        shared = client.scatter([cloudpickle.dumps(model), job], broadcast=True, hash=False)
        stamp = time.time_ns()
        futures = {
            sh: client.submit(_shard_task, path, *shared, *sh,
                              key=f"capture-{sh[0]}-{sh[1]}-{stamp}", retries=RETRIES,
                              pure=False)
            for sh in todo
        }
        with tqdm(total=sum(b - a for _, a, b in todo), unit="row", unit_scale=True,
                  disable=not progress, desc=f"build on {len(client.scheduler_info()['workers'])}"
                                             f" workers") as bar:
            for fut in as_completed(list(futures.values())):
                if fut.status == "finished":
                    r = fut.result()
                    bar.update(r["stop"] - r["start"])
        _raise_failed(futures, lambda sh: f"capturing split {sh[0]!r}, rows {sh[1]}..{sh[2]}",
                      "blocks", f"The blocks already written to {path} are kept; fix the "
                      f"cause and build again with resume=True")
    _commit_shards(path, group, meta, job)


def _commit_shards(path: str, group, meta: fmt.StoreMeta, job: CaptureJob) -> None:
    """Every block written: commit the splits in the root metadata as a single-process
    build does, then drop the markers."""
    fs, folder = _shard_fs(path)
    for s in job.splits:
        info = meta.splits[s.name]
        markers = [m for m in fs.glob(f"{folder}/{s.name}/*-*") if not m.endswith(".tmp")]
        labels = [json.loads(fs.cat_file(m))["max_label"] for m in markers]
        if labels:
            info.max_label = max(-1 if info.max_label is None else info.max_label, *labels)
        info.rows_committed = s.rows
    if meta.dataset.num_classes is None:
        fmt.infer_num_classes(group, meta)  # before the commit that says "complete"
    fmt.write_meta(group, meta)
    remove_markers(path)
