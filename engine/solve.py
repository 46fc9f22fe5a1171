"""``solve``: fit every layer's softmax probe at once.

Per probe k, with features X (N, D_k), labels y in [0, C) and L2 strength lambda::

    L_k(W, b) = (1/N) sum_i CE(softmax(X_i W + b), y_i) + (lambda / 2) ||W||_F^2

(b is not penalised): scikit-learn's ``LogisticRegression(C=1/(lambda*N))`` objective for
C > 2 classes. This module is the public entry point only: it checks the options
(:class:`engine.options.SolveOptions`), resolves the source (:mod:`engine._sources`), and
fits in this process (:mod:`engine._fit`) or, with a client, one layer per Dask task
(:mod:`engine.schedule`). The objective itself is :mod:`engine.objective`; its drivers are
:mod:`engine._lbfgs` (batched L-BFGS) and :mod:`engine._sgd` (minibatch Adam). On CUDA with
CuPy installed, loss and gradient come from the fused kernel (``kernels/softmax_xent.cu``),
else from its torch reference; ``results.backends`` says which ran.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import Any

from . import _fit, schedule
from . import format as fmt
from ._devices import resolve_device
from ._sources import ProbeData
from ._tasks import MDL_FRACTIONS
from .errors import InvalidArgumentError, StoreError
from .options import DEFAULT_L2_GRID, SolveOptions
from .results import ProbeResults
from .store import Store, open_store

__all__ = ["solve", "DEFAULT_L2_GRID"]


def solve(
    source: Store | str | Mapping,
    *,
    labels: Any = None,
    layers: list[str] | None = None,
    label: str = "y",
    solver: str = "lbfgs",
    l2: str | float | list[float] = "auto",
    max_iter: int = 500,
    tol: float = 1e-4,
    early_stopping: bool = True,
    epochs: int = 30,
    patience: int = 5,
    lr: float = 1e-2,
    batch_size: int = 256,
    seed: int = 0,
    repeats: int = 1,
    device: str = "auto",
    dtype: str = "float32",
    run: str = "default",
    allow_partial: bool = False,
    max_memory: int | str | None = None,
    shard: str = "auto",
    controls: str | tuple[str, ...] = (),
    mdl: bool = False,
    mdl_blocks: tuple[float, ...] = MDL_FRACTIONS,
    class_weight: str | None = None,
    refit: bool = False,
    shots: int | tuple[int, ...] = (),
    draws: int = 5,
    progress: bool = True,
    client: Any = None,
) -> ProbeResults:
    """Fit a softmax linear probe on every layer of ``source``.

    Args:
        source: a :class:`Store` or its path; or, without a store, a mapping
            ``{layer: (N, D) array}`` (one "train" split) or ``{split: {layer: array}}``,
            numpy, torch or zarr arrays, with ``labels`` an (N,) array or ``{split: array}``.
        layers: layer keys to probe (default: all).
        label: which label array of the store to predict.
        solver: ``"lbfgs"`` (full batch: the exact optimum; features resident on
            ``device`` within ``max_memory``, else streamed from the store every pass),
            ``"sgd"`` (minibatch Adam streaming row blocks from the store in a shuffled
            order, with early stopping) or ``"ridge"`` (least squares on {-1, +1} one-hot
            targets in closed form, every lambda from one pass and one eigendecomposition
            per layer; docs/solve.md, "Ridge probes").
        l2: lambda, a list of lambdas, or ``"auto"`` (:data:`DEFAULT_L2_GRID`); with more
            than one, every lambda is fitted and the one with the lowest validation top-1
            error (then loss) is kept, which needs a ``"valid"`` split.
        max_iter, tol: L-BFGS stops a probe when ``max |grad| <= tol`` (scikit-learn's
            ``tol`` for lbfgs) or after ``max_iter`` iterations.
        early_stopping, epochs, patience, lr, batch_size, seed: SGD runs at most ``epochs``
            passes of minibatches of ``batch_size`` rows with Adam at learning rate ``lr``;
            with ``early_stopping`` (needs a ``"valid"`` split) a probe stops after
            ``patience`` epochs without a lower validation top-1 error and keeps its best
            weights. L-BFGS ignores these: it solves the penalised problem exactly.
        repeats: SGD only: fit every layer this many times with seeds ``seed``,
            ``seed + 1``, ...; the first is the result, and every split gets
            ``top1_error_seed_mean`` and ``top1_error_seed_std`` over the seeds.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda:1"``, ...
        dtype: arithmetic, ``"float32"``, ``"tf32"`` (float32 with TF32 tensor-core GEMMs
            on CUDA, float32 elsewhere), ``"float64"``, or for SGD ``"bfloat16"`` (the
            minibatch products in bfloat16 with float32 accumulation, the weights, Adam and
            the validation passes in float32); float16 / bfloat16 features are
            upcast block by block. On CUDA with CuPy installed, loss and gradient come from
            the fused kernel (``kernels/softmax_xent.cu``), else from its torch reference;
            ``results.backends`` says which.
        run: name of the run: probes are saved to ``probes/<run>/<layer>`` in the store as
            each layer finishes, and a rerun of the same run skips finished layers.
        allow_partial: solve an incomplete store on its committed rows instead of refusing.
        max_memory: bytes (or ``"512M"``, ``"4G"``) of features one process keeps: resident
            features plus stream buffers (default: half of the device's free memory). A
            (split, layer) that does not fit is streamed from the store block by block on
            every pass (docs/solve.md, "Memory"); the optimum is the same.
        shard: with a client, ``"layers"`` (each layer a task), ``"rows"`` (each pass
            summed over row shards on the workers, the L-BFGS state kept here) or
            ``"auto"`` (rows for the layers whose train features exceed one worker's
            ``max_memory``, the others a layer per task).
        controls: baselines fitted beside each layer's probe, at the lambda its grid
            chose, in the same passes (with SGD: at every lambda, in the same minibatches,
            the chosen lambda's reported): ``"shuffled"`` (each split's labels permuted,
            seeded by ``seed``) and / or ``"control"`` (Hewitt & Liang's control task: each
            item, or each token type of a token store with a ``"token"`` label set, a
            random class drawn from the train class distribution). The table gets
            ``<control>_top1_error`` and ``selectivity``, the accuracy minus the first
            control's (docs/reproducing.md, "Reading the baselines").
        mdl, mdl_blocks: report each layer's online codelength (Voita & Titov, 2020): a
            probe per block of the schedule (percent of train, in a seeded order), fitted
            on the rows before the block at the layer's chosen lambda, codes the block; the
            table gets ``codelength`` (bits), ``compression`` (uniform / online).
        refit: DINOv2's linear-eval protocol: once lambda is chosen on valid, the probe is
            fitted again on train + valid at that lambda; its weights are the result, and
            the test row scores it (``fitted_on`` says "train+valid"; the train and valid
            rows stay those of the probe that chose lambda). Needs a valid and a test split
            that share no rows.
        shots, draws: few-shot protocols (CLIP's linear-probe benchmark): for each k of
            ``shots``, ``draws`` random draws (seeded by ``seed``) of k train rows per
            class; each draw's probes cover the lambda grid in the same passes and choose
            their lambda on valid. The table gets ``shots_<k>_top1_error`` (the mean over
            draws) and ``shots_<k>_top1_error_std`` on valid and test.
        class_weight: ``"balanced"`` weights train rows N / (C N_c) (scikit-learn's
            rule): the objective is the weighted mean, and train loss / error are
            weighted; valid / test are scored unweighted.
        client: a ``distributed.Client`` (e.g. :func:`engine.cluster`): each layer is solved
            on a worker, placed by cost N * D * C, which reads it from the store's path and
            saves its probe there; the results equal a single-process solve's. Needs a store
            on a filesystem every worker can read.

    Returns:
        :class:`ProbeResults`: ``.table`` has one row per (layer, split).
    """
    options = SolveOptions.from_kwargs(
        label=label, solver=solver, l2=l2, max_iter=max_iter, tol=tol,
        early_stopping=early_stopping, epochs=epochs, patience=patience, lr=lr,
        batch_size=batch_size, seed=seed, repeats=repeats, device=device, dtype=dtype, run=run,
        allow_partial=allow_partial, max_memory=max_memory, shard=shard, controls=controls,
        mdl=mdl, mdl_blocks=mdl_blocks, class_weight=class_weight, refit=refit,
        shots=shots, draws=draws)
    resolve_device(options.device)  # a device that does not exist: refused before any read
    t_start = time.perf_counter()

    store = None
    if isinstance(source, (str, Store)) or hasattr(source, "__fspath__"):
        store = source if isinstance(source, Store) else open_store(source)
        if labels is not None:
            raise InvalidArgumentError("labels= is for mapping sources; a store has its own "
                                       "labels (Store.add_labels adds more)")
        data = ProbeData.from_store(store, layers, options.label, options.allow_partial)
    elif isinstance(source, Mapping):
        data = ProbeData.from_arrays(source, labels, layers)
    else:
        raise InvalidArgumentError(f"solve() takes a Store, a store path or a mapping of "
                                   f"arrays, not {type(source).__name__}")
    _fit.check_splits(data, options)
    config = options.config(data.num_classes)

    if client is None:
        finished = _fit.solve_data(data, options, store=store, progress=progress,
                                   started=t_start)
        return _results(data, finished, config, options.run, store)
    if store is None:
        raise InvalidArgumentError("client= solves a store that every worker can open by its "
                                   "path; build one with engine.build_store, or pass no "
                                   "client")
    fmt.start_run(store.path, store.meta, options.run, config)
    done = fmt.saved_probes(fmt.open_root(store.path), options.run)
    todo = [layer for layer in data.layers if layer not in done]
    rows, whole = schedule.by_shard(client, data, todo, options)
    if rows:  # each pass summed over row shards on the workers, the state kept here
        schedule.solve_rows(client, store, dataclasses.replace(data, layers=rows), rows,
                            options, progress=progress)
    if whole:  # a layer per task
        n = data.rows("train")
        costs = {layer: float(n * data.dims[layer] * data.num_classes) for layer in whole}
        schedule.solve_on(client, store.path, whole, costs, options, progress=progress)
    finished = fmt.saved_probes(fmt.open_root(store.path), options.run)
    missing = [layer for layer in data.layers if layer not in finished]
    if missing:  # pragma: no cover - solve_on raises first
        raise StoreError(f"layers {missing} have no saved probe after the Dask solve")
    return _results(data, finished, config, options.run, store)


def _results(data: ProbeData, finished: dict[str, dict], config: dict, run: str,
             store: Store | None) -> ProbeResults:
    info = {layer: data.info.get(layer, {}) for layer in data.layers}
    return ProbeResults.from_records(
        {layer: finished[layer] for layer in data.layers}, info, config=config,
        run=run if store is not None else None, path=store.path if store else None,
        labels={s: y.numpy() for s, y in data.labels.items()}, groups=data.groups or None,
    )
