"""Scale-out with Dask: shard-parallel capture, and probe-parallel and row-parallel solves,
over the workers of a ``distributed.Client``.

Every worker opens the store by its path (a filesystem all workers share). A build cuts each
split's rows into whole row blocks, one task each: the worker runs the model on its block and
writes its chunks, which no other task touches, then marks the block done; when every block
is done the driver commits the splits in the root metadata, exactly as a single-process build
leaves them. A solve submits one task per layer with its cost N * D_k * C as priority, so
Dask hands the costliest layer left to whichever worker frees up first: longest first onto
the least-loaded worker (LPT), the load being the measured one rather than an estimate.
Each worker solves its layers with the single-device solver and saves their probes. A layer
too large for one worker is solved row-parallel instead (:func:`solve_rows`): the driver
runs its L-BFGS state and each pass is summed over row shards on the workers
(:class:`RowShardObjective`).

Every task is idempotent (a marked block or a saved probe is skipped; half-written ones are
written again), so Dask may re-run any task on any worker, after a worker dies for example,
and the store and probes stay those of a single process.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from . import format as fmt
from ._features import BUDGET_SHARE, FeatureCache, free_bytes
from ._fit import ARITHMETIC, backend_of, objective_for, solve_data, solve_stored, task_plan
from ._sources import ProbeData
from ._writer import Block, CaptureJob, write_rows
from .capture import Runner
from .errors import ProbeEngineError
from .objective import Partial, Point, ProbeObjective
from .options import SolveOptions
from .store import Store, open_store

__all__ = ["cluster", "solve_on", "solve_rows", "build_on", "remove_markers", "row_shards",
           "RowShardObjective", "RETRIES", "SHARDS"]

RETRIES = 2  # Dask re-runs a failing task this many times before its error is final
SCATTER_BYTES = 1 << 20  # a row-parallel pass's arguments above this go by scatter


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


# -- row-parallel solves -----------------------------------------------------------------
#: worker side: the row shards' objectives of the latest row-parallel solve, kept across its
#: passes (the shards' features stay resident, or their streams planned); a new solve's
#: first task drops the previous one's
_SHARD_CACHE: dict[tuple, ProbeObjective] = {}


@dataclass
class _Shard:
    """What a shard task needs to find or make its objective: the solve's token (the cache
    key), the store, the layers, the options, and its rows [start, stop) of ``split``."""

    token: str
    path: str
    layers: list[str]
    options: SolveOptions
    split: str
    start: int
    stop: int


def _shard_objective(shard: _Shard) -> ProbeObjective:
    """On a worker: the objective of a row shard, made once per solve and kept."""
    key = (shard.token, shard.split, shard.start, shard.stop)
    objective = _SHARD_CACHE.get(key)
    if objective is None:
        for old in [k for k in _SHARD_CACHE if k[0] != shard.token]:
            del _SHARD_CACHE[old]  # another solve's: its features go
        store = open_store(shard.path)
        data = ProbeData.from_store(store, shard.layers, shard.options.label,
                                    shard.options.allow_partial)
        part = data.shard(shard.split, shard.start, shard.stop)
        objective = _SHARD_CACHE[key] = objective_for(part, shard.layers, shard.options)
        # the tasks made from the whole labels, as the driver made them (seeded), then cut
        # to the shard's rows: their totals stay the whole split's
        objective.add_tasks([t.shard(shard.split, shard.start, shard.stop)
                             for t in task_plan(data, shard.options).tasks
                             if shard.split in t.labels])
    return objective


def _pass_task(shard: _Shard, points: list[tuple[str, float, Any, str]], grad: bool, n: int,
               pooled: bool, hits: bool = True) -> list[tuple]:
    """On a worker: the partial sums of ``points`` ((layer, l2, theta as numpy, task)) over
    the shard's rows, gradients scaled by 1 / ``n``; numpy out."""
    _worker_threads()
    objective = _shard_objective(shard)
    dev = objective.device
    pts = [Point(layer, l2, torch.from_numpy(theta).to(dev), task)
           for layer, l2, theta, task in points]
    return [(p.loss, p.top1, p.top5, None if p.gradient is None else p.gradient.cpu().numpy())
            for p in objective.partials(shard.split, pts, grad=grad, n=n, pooled=pooled,
                                        hits=hits)]


def _outputs_task(shard: _Shard, layer: str, l2: float, theta: Any, task: str
                  ) -> dict[str, Any]:
    """On a worker: the per-row outputs of one probe over the shard's rows; numpy out."""
    _worker_threads()
    objective = _shard_objective(shard)
    point = Point(layer, l2, torch.from_numpy(theta).to(objective.device), task)
    return {k: v.numpy() for k, v in objective.row_outputs(shard.split, point).items()}


def _moment_task(shard: _Shard, layer: str, q: Any) -> Any:
    """On a worker: ``sum_i x~_i x~_i^T q`` over the shard's rows of ``layer``."""
    _worker_threads()
    objective = _shard_objective(shard)
    return objective.moment_sums(shard.split, layer,
                                 torch.from_numpy(q).to(objective.device)).cpu().numpy()


def row_shards(rows: int, block_rows: int, count: int) -> list[tuple[int, int]]:
    """``count`` (or fewer) contiguous ranges of whole blocks covering ``rows`` rows, as
    even as blocks allow."""
    blocks = -(-rows // block_rows)
    count = max(1, min(count, blocks))
    edges = [round(i * blocks / count) * block_rows for i in range(count + 1)]
    return [(a, min(b, rows)) for a, b in zip(edges, edges[1:], strict=False) if a < rows]


class RowShardObjective(ProbeObjective):
    """The objective of a row-parallel solve, on the driver: each pass sends the points to
    the workers, each of which sums the pass over its row shard of the split
    (:func:`_pass_task`, features kept on the worker between passes), and adds the shards'
    partial sums in shard order; the penalty and the means are added here. The driver keeps
    the L-BFGS state (on the CPU); the workers never see more than their rows.

    A shard's task is pinned to a worker and runs anywhere else when that one is gone (its
    rows are read again there); the sums, and so the solve, are the same either way.
    """

    def __init__(self, client, path: str, data: ProbeData, layers: list[str],
                 options: SolveOptions, shards: int | None = None):
        cache = FeatureCache(data, torch.device("cpu"), ARITHMETIC[options.dtype], budget=0)
        super().__init__(cache, kernel="torch")
        self.client = client
        workers = sorted(client.scheduler_info()["workers"])
        if not workers:
            raise ProbeEngineError("the Dask cluster has no workers; start some, or pass no "
                                   "client")
        count = shards or len(workers)
        self.token = token = f"{path}-{time.time_ns()}"
        self.shards = {split: [_Shard(token, path, list(layers), options, split, a, b)
                               for a, b in row_shards(data.rows(split), data.block_rows,
                                                      count)]
                       for split in data.splits}
        self._home: dict[tuple[str, int], str] = {}  # (split, shard) -> its worker

    def placement(self, layer: str) -> str:
        return f"rows over {len(self.shards['train'])} shards"

    def _where(self, split: str, i: int, workers: list[str]) -> list[str]:
        """The worker of shard ``i`` of ``split``: the same as before while it lives."""
        home = self._home.get((split, i))
        if home not in workers and workers:
            home = self._home[(split, i)] = workers[i % len(workers)]
        return [home] if home else []

    def _map(self, split: str, task, *args) -> list:
        """``task(shard, *args)`` on every shard of ``split``, results in shard order; a
        shard that fails for good (Dask's retries spent) raises, naming its rows."""
        from distributed import wait

        # large arguments (the weights of wide probes) go to every worker once, not with
        # each task; small ones ride in the task (a scatter is a round trip of its own)
        big = sum(getattr(a, "nbytes", 0) for a in _arrays(args)) > SCATTER_BYTES
        shared = self.client.scatter([args], broadcast=True, hash=False)[0] if big else args
        stamp = time.time_ns()
        shards = self.shards[split]
        workers = sorted(self.client.scheduler_info()["workers"])
        futures = {
            i: self.client.submit(_call, task, shard, shared, retries=RETRIES, pure=False,
                                  workers=self._where(split, i, workers),
                                  allow_other_workers=True,
                                  key=f"rows-{split}-{shard.start}-{stamp}")
            for i, shard in enumerate(shards)}
        wait(list(futures.values()))
        _raise_failed(futures, lambda i: f"the row shard [{shards[i].start}, "
                      f"{shards[i].stop}) of split {split!r} (layers {shards[i].layers})",
                      "shards",
                      "The probes already saved are kept; fix the cause and run the same "
                      "solve again to finish")
        return self.client.gather(list(futures.values()))

    def partials(self, split: str, points, *, grad: bool, n: int, pooled: bool = False,
                 hits: bool = True) -> list[Partial]:
        payload = [(p.layer, p.l2, p.theta.cpu().numpy(), p.task) for p in points]
        out = None
        for part in self._map(split, _pass_task, payload, grad, n, pooled, hits):  # in order
            if out is None:
                out = [[loss, t1, t5, None if g is None else torch.from_numpy(g)]
                       for loss, t1, t5, g in part]
                continue
            for acc, (loss, t1, t5, g) in zip(out, part, strict=True):
                acc[0] += loss
                acc[1] += t1
                acc[2] += t5
                if g is not None:
                    acc[3] += torch.from_numpy(g)
        return [Partial(*acc) for acc in out]

    def row_outputs(self, split: str, point: Point) -> dict[str, torch.Tensor]:
        parts = self._map(split, _outputs_task, point.layer, point.l2,
                          point.theta.cpu().numpy(), point.task)  # in shard order
        return {k: torch.cat([torch.from_numpy(p[k]) for p in parts]) for k in parts[0]}

    def moment_sums(self, split: str, layer: str, q: torch.Tensor) -> torch.Tensor:
        parts = self._map(split, _moment_task, layer, q.cpu().numpy())
        out = torch.from_numpy(parts[0])
        for part in parts[1:]:
            out += torch.from_numpy(part)
        return out


def _call(task, shard: _Shard, args: tuple):
    return task(shard, *args)


def _arrays(obj):
    """The numpy arrays inside nested tuples and lists."""
    if isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _arrays(item)
    elif hasattr(obj, "nbytes"):
        yield obj


def solve_rows(client, store: Store, data: ProbeData, layers: list[str],
               options: SolveOptions, *, shards: int | None = None,
               progress: bool = False) -> dict[str, dict]:
    """Solve ``layers`` of ``store`` row-parallel: this process runs the L-BFGS state of
    every probe; each pass is summed over row shards on the workers of ``client``
    (:class:`RowShardObjective`, one shard per worker unless ``shards``). Layers are saved
    into the run as they finish, as a single-process solve does; returns every layer's
    record."""
    made: list[RowShardObjective] = []

    def objective(todo: list[str]) -> ProbeObjective:
        made.append(RowShardObjective(client, store.path, data, todo, options, shards))
        return made[-1]

    # how the workers compute (their device, kernel and matmul), not this process
    backend = next(iter(client.run(backend_of, options).values()))
    try:
        return solve_data(data, options, store=store, progress=progress, objective=objective,
                          backend=backend)
    finally:
        for obj in made:  # the shards' features leave the workers
            client.run(_forget, obj.token)


def worker_budget(client, options: SolveOptions) -> int:
    """Bytes of features one worker may keep: ``options.max_memory``, else
    :data:`~engine._features.BUDGET_SHARE` of the smallest worker memory limit (of this
    machine's free memory when the workers have none)."""
    if options.max_memory is not None:
        return options.max_memory
    limits = [w.get("memory_limit") or 0 for w in client.scheduler_info()["workers"].values()]
    least = min((x for x in limits if x), default=0) or free_bytes(torch.device("cpu"))
    return int(least * BUDGET_SHARE)


def by_shard(client, data: ProbeData, layers: list[str], options: SolveOptions
             ) -> tuple[list[str], list[str]]:
    """``(row-parallel layers, probe-parallel layers)`` of a Dask solve: by ``options.shard``;
    ``"auto"``: row-parallel the L-BFGS layers whose train features, as stored, exceed one
    worker's budget (:func:`worker_budget`)."""
    if options.shard == "layers" or (options.shard == "auto" and options.solver != "lbfgs"):
        return [], list(layers)
    if options.shard == "rows":
        return list(layers), []
    budget, n = worker_budget(client, options), data.rows("train")
    big = [layer for layer in layers if n * data.dims[layer]
           * torch.finfo(data.stored[layer]).bits // 8 > budget]
    return big, [layer for layer in layers if layer not in big]


def _forget(token: str) -> None:
    for key in [k for k in _SHARD_CACHE if k[0] == token]:
        del _SHARD_CACHE[key]


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
    shards = [(s.name, b0, min(b0 + block_rows, job.rows(s))) for s in job.splits
              for b0 in range(meta.splits[s.name].rows_committed, job.rows(s), block_rows)]
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
        info.rows_committed = job.rows(s)
    if meta.dataset.num_classes is None:
        fmt.infer_num_classes(group, meta)  # before the commit that says "complete"
    fmt.write_meta(group, meta)
    remove_markers(path)
