"""``solve``: fit every layer's softmax probe at once.

Per probe k, with features X (N, D_k), labels y in [0, C) and L2 strength lambda::

    L_k(W, b) = (1/N) sum_i CE(softmax(X_i W + b), y_i) + (lambda / 2) ||W||_F^2

(b is not penalised). This is scikit-learn's ``LogisticRegression(C=1/(lambda*N))``
objective for C > 2 classes. The problem is convex; L-BFGS (``engine._lbfgs``) solves each
probe to ``max|grad| <= tol``, every probe with its own line search and convergence test,
while one pass over the features per layer evaluates every probe of that layer that asked
for a point: the lambda grid of ``l2="auto"`` adds columns to the same matrix products, not
passes. Loss and gradient come from the softmax-cross-entropy kernel seam
(``kernels.reference.softmax_xent`` on the CPU and through torch on CUDA).
"""

from __future__ import annotations

import math
import numbers
import os
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import format as fmt
from . import schedule
from ._devices import resolve_device
from ._lbfgs import LBFGSState
from ._precond import RANK, LowRankPreconditioner, top_eigenpairs
from .errors import (
    DataError,
    InvalidArgumentError,
    LayerNotFoundError,
    NonFiniteError,
    ProbeEngineWarning,
    SplitNotFoundError,
    StoreError,
)
from .format import check_name
from .kernels import softmax_xent, uses_cuda_kernel
from .kernels.reference import softmax_xent as reference_softmax_xent
from .results import ProbeResults
from .store import Store, open_store

__all__ = ["solve", "DEFAULT_L2_GRID"]

#: lambda values tried by ``l2="auto"`` (per-row loss scale: sklearn C = 1 / (lambda * N))
DEFAULT_L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
#: arithmetic; "tf32" is float32 with TF32 tensor-core GEMMs on CUDA (float32 elsewhere),
#: "bfloat16" (SGD only) float32 weights with bfloat16 minibatch products
_DTYPES = {"float32": torch.float32, "tf32": torch.float32, "bfloat16": torch.float32,
           "float64": torch.float64}
_BLOCK_BYTES = 64 << 20  # logits of one block, all probes of a layer
#: layers share a stack (zero-padded to its widest) when its widest is at most this many
#: times its narrowest: a narrower layer's product does at most 25% extra work on padding
_STACK_SLACK = 1.25


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
    device: str = "auto",
    dtype: str = "float32",
    run: str = "default",
    allow_partial: bool = False,
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
        solver: ``"lbfgs"`` (full batch, features resident on ``device``: the exact
            optimum) or ``"sgd"`` (minibatch Adam streaming row blocks from the store in a
            shuffled order, for data larger than memory, with early stopping).
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
        client: a ``distributed.Client`` (e.g. :func:`engine.cluster`): each layer is solved
            on a worker, placed by cost N * D * C, which reads it from the store's path and
            saves its probe there; the results equal a single-process solve's. Needs a store
            on a filesystem every worker can read.

    Returns:
        :class:`ProbeResults`: ``.table`` has one row per (layer, split).
    """
    if solver not in ("lbfgs", "sgd"):
        raise InvalidArgumentError(f"solver must be 'lbfgs' or 'sgd', not {solver!r}")
    if epochs < 1 or patience < 1 or batch_size < 1 or not lr > 0:
        raise InvalidArgumentError(f"epochs, patience and batch_size must be >= 1 and lr > 0, "
                                   f"got {epochs}, {patience}, {batch_size}, {lr}")
    if dtype not in _DTYPES:
        raise InvalidArgumentError(f"dtype must be one of {sorted(_DTYPES)}, not {dtype!r}")
    if dtype == "bfloat16" and solver == "lbfgs":
        # measured (benchmarks.precision, docs/solve.md): bfloat16 passes lose the way
        # once max|grad| nears 5e-4..1.5e-3, after 6-8% of float32's iterations
        raise InvalidArgumentError(
            "dtype='bfloat16' is for solver='sgd': L-BFGS with bfloat16 products stalls "
            "far from the optimum (gradient entries near 1e-3). Use dtype='tf32' for fast "
            "L-BFGS products on CUDA, or solver='sgd' with dtype='bfloat16'")
    if max_iter < 1 or not tol > 0:
        raise InvalidArgumentError(f"max_iter must be >= 1 and tol > 0, got {max_iter}, {tol}")
    check_name(run, "run name")
    grid = _grid(l2)
    dev = resolve_device(device)
    t_start = time.perf_counter()

    store = None
    if isinstance(source, (str, Store)) or hasattr(source, "__fspath__"):
        store = source if isinstance(source, Store) else open_store(source)
        if labels is not None:
            raise InvalidArgumentError("labels= is for mapping sources; a store has its own "
                                       "labels (Store.add_labels adds more)")
        data = _from_store(store, layers, label, allow_partial)
    elif isinstance(source, Mapping):
        data = _from_mapping(source, labels, layers)
    else:
        raise InvalidArgumentError(f"solve() takes a Store, a store path or a mapping of "
                                   f"arrays, not {type(source).__name__}")
    if len(grid) > 1 and "valid" not in data.splits:
        raise SplitNotFoundError(
            f"choosing among {len(grid)} l2 values needs a 'valid' split, and there is none "
            f"(splits: {list(data.splits)}); pass one l2 value, e.g. l2=1e-4"
        )
    if solver == "sgd" and early_stopping and "valid" not in data.splits:
        raise SplitNotFoundError(
            f"early stopping needs a 'valid' split, and there is none (splits: "
            f"{list(data.splits)}); pass early_stopping=False to run all {epochs} epochs")
    config = {"solver": solver, "l2": list(grid), "label": label, "dtype": dtype,
              "num_classes": data.num_classes, "allow_partial": allow_partial}
    if solver == "lbfgs":
        config.update(max_iter=max_iter, tol=tol,
                      preconditioner=f"low-rank curvature, rank {RANK}")
    else:
        config.update(early_stopping=early_stopping, epochs=epochs, patience=patience, lr=lr,
                      batch_size=batch_size, seed=seed)
    done: dict[str, dict] = {}
    if store is not None:
        fmt.start_run(store.path, store.meta, run, config)
        done = fmt.saved_probes(fmt.open_root(store.path), run)
    todo = [layer for layer in data.layers if layer not in done]

    finished: dict[str, dict] = dict(done)
    if client is not None:
        if store is None:
            raise InvalidArgumentError("client= solves a store that every worker can open by "
                                       "its path; build one with engine.build_store, or pass "
                                       "no client")
        if todo:
            n = data.rows("train")
            costs = {layer: float(n * data.dims[layer] * data.num_classes) for layer in todo}
            kwargs = dict(label=label, solver=solver, l2=list(grid), max_iter=max_iter, tol=tol,
                          early_stopping=early_stopping, epochs=epochs, patience=patience,
                          lr=lr, batch_size=batch_size, seed=seed, device=device, dtype=dtype,
                          run=run, allow_partial=allow_partial)
            from .options import SolveOptions

            schedule.solve_on(client, store.path, todo, costs,
                              SolveOptions.from_kwargs(**kwargs), progress=progress)
        finished = fmt.saved_probes(fmt.open_root(store.path), run)
        missing = [layer for layer in data.layers if layer not in finished]
        if missing:  # pragma: no cover - solve_on raises first
            raise StoreError(f"layers {missing} have no saved probe after the Dask solve")
        return _results(data, finished, config, run, store)

    arith = _DTYPES[dtype]
    tf32 = dtype == "tf32" and dev.type == "cuda"
    low = torch.bfloat16 if dtype == "bfloat16" else None
    backend = {"device": str(dev),
               "kernel": "cuda" if uses_cuda_kernel(dev, low or arith) else "torch",
               "matmul": "tf32" if tf32 else str(low or arith).removeprefix("torch.")}
    fit = _Fitter(data, dev, arith, grid, max_iter, tol, low=low)
    for split in data.splits:  # load and check now, not after hours of fitting
        if split != "train" or solver == "lbfgs":  # sgd streams train
            fit.load(split, todo)

    def on_layer(layer: str, record: dict) -> None:
        record["seconds"] = round(time.perf_counter() - t_start, 3)
        record["backend"] = backend
        finished[layer] = record
        if store is not None:
            fmt.save_probe(store.path, run, layer, record)

    precision = torch.get_float32_matmul_precision()
    if tf32:
        torch.set_float32_matmul_precision("high")
    try:
        if todo and solver == "lbfgs":
            fit.run(todo, on_layer, progress=progress)
        elif todo:
            fit.run_sgd(todo, on_layer, epochs=epochs, patience=patience, lr=lr,
                        batch_size=batch_size, early_stopping=early_stopping, seed=seed,
                        progress=progress)
    finally:
        torch.set_float32_matmul_precision(precision)
    return _results(data, finished, config, run, store)


def _results(data: _Data, finished: dict[str, dict], config: dict, run: str,
             store: Store | None) -> ProbeResults:
    info = {layer: data.info.get(layer, {}) for layer in data.layers}
    return ProbeResults.from_records(
        {layer: finished[layer] for layer in data.layers}, info, config=config,
        run=run if store is not None else None, path=store.path if store else None,
    )


# -- inputs ------------------------------------------------------------------------------
def _grid(l2) -> tuple[float, ...]:
    if isinstance(l2, str):
        if l2 != "auto":
            raise InvalidArgumentError(f"l2 must be 'auto', a number or a list of numbers, not "
                                       f"{l2!r}")
        return DEFAULT_L2_GRID
    values = [l2] if isinstance(l2, numbers.Real) else list(l2)
    if not values or not all(isinstance(v, numbers.Real) and v >= 0 and math.isfinite(v)
                             for v in values):
        raise InvalidArgumentError(f"l2 values must be finite and >= 0, got {l2!r}")
    return tuple(float(v) for v in sorted(set(values)))


@dataclass
class _Data:
    """Where the features are (read lazily, row range by row range) and the labels
    (split -> (N,) int64, in memory: labels are small)."""

    reader: Callable[[str, str, int, int], Any]
    dims: dict[str, int]
    labels: dict[str, torch.Tensor]
    num_classes: int
    layers: list[str]
    info: dict[str, dict] = field(default_factory=dict)
    block_rows: int = 8192  # rows per read when streaming

    @property
    def splits(self) -> list[str]:
        return list(self.labels)

    def rows(self, split: str) -> int:
        return int(self.labels[split].shape[0])

    def read(self, split: str, layer: str, start: int = 0, stop: int | None = None
             ) -> torch.Tensor:
        """Rows [start, stop) of ``layer`` on ``split`` as a CPU tensor, checked finite."""
        stop = self.rows(split) if stop is None else stop
        x = _as_tensor(self.reader(split, layer, start, stop))
        if not x.is_floating_point():
            raise DataError(f"layer {layer!r}, split {split!r}: features are {x.dtype}, not "
                            f"floating point")
        _check_finite(x, layer, split, start)
        return x


def _from_store(store: Store, layers, label: str, allow_partial: bool) -> _Data:
    if not store.complete and not allow_partial:
        counts = ", ".join(f"{s} {store.committed(s)}/{store.rows(s)}" for s in store.splits)
        raise StoreError(f"the build of {store.path} is incomplete ({counts} rows committed); "
                         f"finish it with build_store(..., resume=True), or pass "
                         f"allow_partial=True to solve on the committed rows")
    chosen = list(store.layers) if layers is None else list(layers)
    for layer in chosen:
        store.layer_info(layer)  # LayerNotFoundError listing what exists
    chosen = [layer for layer in store.layers if layer in set(chosen)]  # network order
    labels = {s: torch.from_numpy(store.labels(s, label)) for s in store.splits
              if store.committed(s) > 0}
    if "train" not in labels:
        raise SplitNotFoundError(f"{store.path} has no committed 'train' rows to fit on "
                                 f"(splits: {store.splits}); finish the build with "
                                 f"build_store(..., resume=True)")
    info = {layer: {k: store.layer_info(layer)[k] for k in ("site", "dim", "reduction")}
            for layer in chosen}
    dims = {layer: info[layer]["dim"] for layer in chosen}
    return _checked(store.read, dims, labels, chosen, info, store.num_classes(label),
                    store.block_rows)


def _as_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    a = np.ascontiguousarray(x[:] if hasattr(x, "chunks") else x)
    return torch.from_numpy(a if a.flags.writeable else a.copy())  # e.g. np.load(mmap_mode="r")


def _as_labels(y: Any, split: str) -> torch.Tensor:
    if not isinstance(y, torch.Tensor):
        a = np.asarray(y[:] if hasattr(y, "chunks") else y)
        if a.dtype.kind not in "biuf":
            raise DataError(f"labels of split {split!r} are {a.dtype}, not integer class "
                            f"indices; map them to 0..C-1 first")
    return _as_tensor(y)


def _from_mapping(source: Mapping, labels: Any, layers) -> _Data:
    first = next(iter(source.values()), None)
    by_split = source if isinstance(first, Mapping) else {"train": source}
    if labels is None:
        raise DataError("solve(mapping) needs labels=: an (N,) array, or {split: array}")
    labels = labels if isinstance(labels, Mapping) else {"train": labels}
    if set(labels) != set(by_split):
        raise DataError(f"labels are given for splits {sorted(labels)}, features for "
                        f"{sorted(by_split)}; give both for the same splits")
    if "train" not in by_split:
        raise SplitNotFoundError(f"no 'train' split to fit on; splits: {sorted(by_split)}")
    chosen = list(by_split["train"]) if layers is None else list(layers)
    y = {s: _as_labels(v, s) for s, v in labels.items()}
    dims = {}
    for split, layers_of in by_split.items():
        missing = [layer for layer in chosen if layer not in layers_of]
        if missing:
            raise LayerNotFoundError(f"split {split!r} has no features for {missing}; it has "
                                     f"{sorted(layers_of)}")
        for layer in chosen:
            shape = tuple(layers_of[layer].shape)
            if len(shape) != 2 or shape[0] != y[split].shape[0]:
                raise DataError(f"layer {layer!r}, split {split!r}: features of shape {shape} "
                                f"do not match {y[split].shape[0]} labels")
            if shape[1] == 0:
                raise DataError(f"layer {layer!r}, split {split!r} has zero features (shape "
                                f"{shape}); leave it out")
            if dims.setdefault(layer, shape[1]) != shape[1]:
                raise DataError(f"layer {layer!r} has {dims[layer]} features on one split "
                                f"and {shape[1]} on {split!r}")
    info = {layer: {"site": "", "dim": dims[layer], "reduction": ""} for layer in chosen}

    def reader(split: str, layer: str, start: int, stop: int):
        return by_split[split][layer][start:stop]

    return _checked(reader, dims, y, chosen, info, None, 8192)


def _checked(reader, dims, labels, layers, info, num_classes, block_rows) -> _Data:
    for split, y in labels.items():
        if y.ndim != 1 or y.is_floating_point() or y.dtype == torch.bool:
            raise DataError(f"labels of split {split!r} must be (N,) integers, got "
                            f"{y.dtype} of shape {tuple(y.shape)}")
        labels[split] = y.to(torch.int64)
    for split, y in labels.items():
        if y.numel() == 0:
            raise DataError(f"split {split!r} has no rows; give it some or leave it out")
    y_train = labels["train"]
    top = max(int(y.max()) for y in labels.values() if y.numel())
    c = int(num_classes) if num_classes else top + 1
    for split, y in labels.items():
        bad = ((y < 0) | (y >= c)).nonzero()
        if len(bad):
            r = int(bad[0])
            raise DataError(f"split {split!r}, row {r}: label {int(y[r])} is out of range for "
                            f"{c} classes")
    present = torch.bincount(y_train, minlength=c) > 0
    if int(present.sum()) < 2:
        raise DataError(f"the train split has one class only ({int(y_train[0])}); a probe "
                        f"needs at least two")
    seen = set(present.nonzero().view(-1).tolist())
    for split, y in labels.items():
        unseen = sorted(set(torch.unique(y).tolist()) - seen)
        if unseen and split != "train":
            warnings.warn(f"split {split!r} has classes never seen in train: {unseen[:10]}; "
                          f"their rows count as errors", ProbeEngineWarning, stacklevel=4)
    return _Data(reader, dims, labels, c, list(layers), info, block_rows)


def _check_finite(x: torch.Tensor, layer: str, split: str, offset: int = 0) -> None:
    step = 1 << 16
    for r0 in range(0, x.shape[0], step):
        block = x[r0 : r0 + step]
        if math.isfinite(float(block.sum(dtype=torch.float64))):
            continue
        row = offset + r0 + int((~torch.isfinite(block.float())).any(dim=1).nonzero()[0])
        raise NonFiniteError(f"layer {layer!r}, split {split!r}, row {row}: the features hold "
                             f"NaN or inf; rebuild those rows or leave the layer out")


# -- the fit -----------------------------------------------------------------------------
@dataclass
class _Probe:
    layer: str
    l2: float
    state: LBFGSState


class _Fitter:
    """Evaluates many probes per pass over each layer's features, and drives L-BFGS.

    With ``group`` (the default on CUDA), layers of similar width keep their features in one
    (L, N, D) stack, zero-padded to the widest (:func:`_width_groups`), and the probes of
    consecutive stacked layers are evaluated by batched GEMMs: many small products become a
    few large ones. The padding columns meet zero weights, so the logits are exact.
    ``low`` (bfloat16) is the dtype of SGD's minibatch products; everything else runs in
    ``dtype``.
    """

    def __init__(self, data: _Data, device: torch.device, dtype: torch.dtype,
                 grid: tuple[float, ...], max_iter: int, tol: float,
                 precondition: bool = True, group: bool | None = None,
                 kernel: str | Callable = "auto", low: torch.dtype | None = None):
        self.data, self.device, self.dtype, self.low = data, device, dtype, low
        self.precondition = precondition
        # "auto": the fused CUDA kernel where it runs; "torch": always the reference; or a
        # function of their signature (the tests' host-emulated kernel)
        self._xent = ({"auto": softmax_xent, "torch": reference_softmax_xent}[kernel]
                      if isinstance(kernel, str) else kernel)
        self.group = device.type == "cuda" if group is None else group
        self.grid, self.max_iter, self.tol = grid, max_iter, tol
        self.C = data.num_classes
        self._resident: dict[tuple[str, str], torch.Tensor] = {}
        self._stacks: dict[tuple[str, str], tuple[torch.Tensor, int]] = {}  # -> (stack, index)
        self._y = {s: y.to(device) for s, y in data.labels.items()}

    def _target_dtype(self, nbytes_wide: int, stored: torch.dtype) -> torch.dtype:
        """The arithmetic dtype when the features fit in a third of the free memory in it,
        else the stored dtype (upcast block by block)."""
        return self.dtype if nbytes_wide < _free_bytes(self.device) // 3 else stored

    def load(self, split: str, layers: list[str]) -> None:
        """Read and check the features of ``layers`` onto the device (stacked by width)."""
        for group in _width_groups({layer: self.data.dims[layer] for layer in layers}):
            if not self.group or len(group) < 2:
                for layer in group:
                    self.features(split, layer)
                continue
            n = self.data.rows(split)
            width = max(self.data.dims[layer] for layer in group)
            first = self.data.read(split, group[0])
            target = self._target_dtype(
                len(group) * n * width * torch.finfo(self.dtype).bits // 8, first.dtype)
            # zeros: a narrower layer's padding columns must add nothing to its logits
            stack = torch.zeros(len(group), n, width, dtype=target, device=self.device)
            i = 0
            for layer in group:
                src = first if layer == group[0] else self.data.read(split, layer)
                if target != self.dtype and src.dtype != target:  # stored kept: never narrow
                    self._resident[(split, layer)] = src.to(self.device)
                    continue
                d = src.shape[1]
                stack[i, :, :d].copy_(src)
                self._resident[(split, layer)] = stack[i, :, :d]
                self._stacks[(split, layer)] = (stack, i)
                i += 1

    def features(self, split: str, layer: str) -> torch.Tensor:
        """(N, D) features on the device: in the arithmetic dtype when that fits in a third
        of the device's free memory, else as stored (upcast block by block)."""
        key = (split, layer)
        x = self._resident.get(key)
        if x is None:
            src = self.data.read(split, layer)
            target = self._target_dtype(src.numel() * torch.finfo(self.dtype).bits // 8,
                                        src.dtype)
            x = self._resident[key] = src.to(self.device, target)
        return x

    def _runs(self, split: str, by_layer: dict[str, list[int]]) -> list[list[str]]:
        """Layers evaluated together: consecutive layers of one stack asking for as many
        probes each; every other layer alone."""
        order = sorted(by_layer, key=lambda layer: (
            id(self._stacks[(split, layer)][0]), self._stacks[(split, layer)][1])
            if (split, layer) in self._stacks else (0, 0))
        runs: list[list[str]] = []
        for layer in order:
            here = self._stacks.get((split, layer))
            if runs and here is not None:
                prev = self._stacks.get((split, runs[-1][-1]))
                if (prev is not None and prev[0] is here[0] and prev[1] + 1 == here[1]
                        and len(by_layer[layer]) == len(by_layer[runs[-1][-1]])):
                    runs[-1].append(layer)
                    continue
            runs.append([layer])
        return runs

    def evaluate(self, split: str, requests: list[tuple[_Probe, torch.Tensor]], *,
                 grad: bool) -> list[tuple[float, torch.Tensor | None, float, float]]:
        """(objective, gradient, top1_error, top5_error) of each requested (probe, params),
        one pass over each layer's rows (shared by all of the layer's probes, and by the
        layers of a run); without ``grad`` the objective is the plain mean cross-entropy."""
        out: list = [None] * len(requests)
        by_layer: dict[str, list[int]] = {}
        for i, (probe, _) in enumerate(requests):
            by_layer.setdefault(probe.layer, []).append(i)
        for run in self._runs(split, by_layer):
            self._evaluate_run(split, run, by_layer, requests, out, grad)
        return out

    def _evaluate_run(self, split: str, run: list[str], by_layer: dict[str, list[int]],
                      requests: list, out: list, grad: bool) -> None:
        y = self._y[split]
        n, c = y.shape[0], self.C
        nl = len(run)
        if nl == 1:
            x = self.features(split, run[0]).unsqueeze(0)  # (1, N, D)
        else:
            stack, first = self._stacks[(split, run[0])]
            x = stack[first : first + nl]  # (L, N, D), a view; narrower layers zero-padded
        d, k = x.shape[2], len(by_layer[run[0]])
        dims = [self.data.dims[layer] for layer in run]
        thetas = [torch.stack([requests[i][1] for i in by_layer[layer]], dim=1)
                  for layer in run]  # L x (D_j+1, K, C)
        dtype = thetas[0].dtype
        kc = k * c
        # the K*C logit columns padded: MKL's float32 GEMMs with a thin side of 10 (or 60)
        # columns run up to 11x slower than with 16 (or 64); tensor cores want multiples of
        # 8. The padding columns have zero weights and get a zero gradient.
        pad = 16 if self.device.type == "cpu" else 8
        width = -(-kc // pad) * pad
        wt = torch.zeros(nl, width, d, dtype=dtype, device=self.device)
        b = torch.zeros(nl, 1, width, dtype=dtype, device=self.device)
        # each layer's weights in its first D_j columns, zeros against a stack's padding
        for j, (dj, theta) in enumerate(zip(dims, thetas, strict=True)):
            wt[j, :kc, :dj] = theta[:dj].reshape(dj, kc).T
            b[j, 0, :kc] = theta[dj].reshape(kc)
        gw = torch.zeros(nl, d, width, dtype=dtype, device=self.device) if grad else None
        gb = torch.zeros(nl, width, dtype=dtype, device=self.device) if grad else None
        loss = torch.zeros(nl, k, dtype=torch.float64, device=self.device)
        top1 = torch.zeros(nl, k, dtype=torch.int64, device=self.device)
        top5 = torch.zeros_like(top1)
        rows = max(256, _BLOCK_BYTES // (nl * width * wt.element_size()))
        for r0 in range(0, n, rows):
            yb = y[r0 : r0 + rows]
            if nl == 1:
                xb = x[0, r0 : r0 + rows].to(self.dtype)  # (B, D)
                z = torch.addmm(b[0], xb, wt[0].T).unsqueeze(0)  # (1, B, width)
            else:
                xb = x[:, r0 : r0 + rows].to(self.dtype)  # (L, B, D)
                z = torch.baddbmm(b, xb, wt.transpose(1, 2))  # (L, B, width)
            for j in range(nl):
                logits = z[j, :, :kc].view(-1, k, c).transpose(0, 1)  # (K, B, C) view
                _, ls, t1, t5 = self._xent(logits, yb, scale=1.0 / n, grad=grad)
                loss[j] += ls.double()
                top1[j] += t1
                top5[j] += t5
            if grad:  # z now holds the gradient w.r.t. the logits
                z[:, :, kc:].zero_()
                if nl == 1:
                    gw[0].addmm_(xb.T, z[0])  # X^T dZ: MKL's fast orientation once padded
                else:
                    gw.baddbmm_(xb.transpose(1, 2), z)
                gb += z.sum(dim=1)
        loss, top1, top5 = (loss / n).tolist(), top1.tolist(), top5.tolist()
        for j, layer in enumerate(run):
            dj = dims[j]
            if grad:  # (D_j+1, K, C): the layer's own rows of X^T dZ, then the bias row
                g = torch.cat([gw[j, :dj, :kc], gb[j : j + 1, :kc]]).view(dj + 1, k, c)
            for m, i in enumerate(by_layer[layer]):
                probe, params = requests[i]
                f, gj = loss[j][m], None
                if grad:
                    wj = params[:dj]
                    f += 0.5 * probe.l2 * float((wj.double() ** 2).sum())
                    gj = g[:, m].clone()
                    gj[:dj].add_(wj, alpha=probe.l2)
                out[i] = (f, gj, 1.0 - top1[j][m] / n, 1.0 - top5[j][m] / n)

    def run(self, layers: list[str], on_layer, *, progress: bool) -> None:
        probes = []
        for layer in layers:
            eig = (top_eigenpairs(self.features("train", layer), dtype=self.dtype)
                   if self.precondition else None)
            for l2 in self.grid:
                pre = LowRankPreconditioner(*eig, l2, self.C) if eig else None
                x0 = torch.zeros(self.data.dims[layer] + 1, self.C, dtype=self.dtype,
                                 device=self.device)
                probes.append(_Probe(layer, l2, LBFGSState(x0, precond=pre)))

        for p, (f, g, _, _) in zip(probes, self.evaluate(
                "train", [(p, p.state.x) for p in probes], grad=True), strict=True):
            p.state.f, p.state.g = f, g
        pending = set(layers)
        bar = tqdm(total=len(probes), unit="probe", disable=not progress, desc="solve")
        iterations = 0
        while True:
            active = [p for p in probes if not p.state.done]
            for layer in sorted(pending - {p.layer for p in active}):
                pending.discard(layer)
                on_layer(layer, self._record(layer, [p for p in probes if p.layer == layer]))
            if not active:
                break
            for p in active:
                p.state.start_iteration()
            searching = active
            while searching:
                results = self.evaluate("train", [(p, p.state.trial()) for p in searching],
                                        grad=True)
                still = []
                for p, (f, g, _, _) in zip(searching, results, strict=True):
                    st = p.state
                    st.evaluations += 1
                    status = st.search.observe(f, float(torch.dot(g.reshape(-1),
                                                                  st.d.reshape(-1))), g)
                    if status == "accept":
                        st.finish_iteration(st.search.accepted, self.tol, self.max_iter)
                    elif status == "fail":
                        st.fail(self.tol)
                    else:
                        still.append(p)
                searching = still
            iterations += 1
            bar.n = sum(p.state.done for p in probes)
            bar.set_postfix_str(f"iteration {iterations}", refresh=True)
        bar.close()

    def _record(self, layer: str, probes: list[_Probe]) -> dict:
        """Metrics of every lambda of a finished layer, the chosen one first-class."""
        metrics = {}
        for split in self.data.splits:
            res = self.evaluate(split, [(p, p.state.x) for p in probes], grad=False)
            for p, (loss, _, e1, e5) in zip(probes, res, strict=True):
                metrics.setdefault(p.l2, {})[split] = {
                    "loss": loss, "top1_error": e1,
                    "top5_error": e5 if self.C > 5 else float("nan")}
        pick = "valid" if "valid" in self.data.splits else "train"
        best = min(probes, key=lambda p: (metrics[p.l2][pick]["top1_error"],
                                          metrics[p.l2][pick]["loss"], -p.l2))

        def objective(p: _Probe) -> float:  # the penalised training loss, L_k of the docs
            w = p.state.x[:-1].double()
            return metrics[p.l2]["train"]["loss"] + 0.5 * p.l2 * float((w * w).sum())

        st = best.state
        return {
            "l2": best.l2, "W": st.x[:-1].float().cpu().numpy(),
            "b": st.x[-1].float().cpu().numpy(), "objective": objective(best),
            "iterations": st.iterations, "evaluations": st.evaluations,
            "converged": st.converged, "reason": st.reason, "metrics": metrics[best.l2],
            "grid": [{"l2": p.l2, "objective": objective(p), "iterations": p.state.iterations,
                      "converged": p.state.converged, **{
                          f"{s}_{m}": v for s, ms in metrics[p.l2].items()
                          for m, v in ms.items()}} for p in probes],
        }

    def run_sgd(self, layers: list[str], on_layer, *, epochs: int, patience: int, lr: float,
                batch_size: int, early_stopping: bool, seed: int, progress: bool) -> None:
        """Minibatch Adam on every probe at once, streaming the train rows block by block in
        a shuffled order; after each epoch the validation top-1 error of each probe decides
        whether its weights are the best so far, and ``patience`` epochs without a better
        one stop it (the paper's protocol). The best weights are kept."""
        c, dt, dev = self.C, self.dtype, self.device
        gemm = self.low or dt  # the minibatch products' dtype; weights and Adam stay in dt
        g_count = len(self.grid)
        lam = torch.tensor(self.grid, dtype=dt, device=dev).view(1, g_count, 1)
        groups = {}
        for layer in layers:
            d = self.data.dims[layer]
            theta = torch.zeros(d + 1, g_count, c, dtype=dt, device=dev)
            groups[layer] = {
                "theta": theta, "m": torch.zeros_like(theta), "v": torch.zeros_like(theta),
                "best": theta.clone(), "best_err": [math.inf] * g_count,
                "bad": [0] * g_count, "stopped": [False] * g_count, "epochs": [0] * g_count}
        n = self.data.rows("train")
        y_all = self._y["train"]
        block = self.data.block_rows
        blocks = [(r, min(r + block, n)) for r in range(0, n, block)]
        rng = np.random.default_rng(seed)
        stop_on = "valid" if early_stopping and "valid" in self.data.splits else None
        step = 0
        bar = tqdm(total=epochs, unit="epoch", disable=not progress, desc="solve (sgd)")
        for epoch in range(epochs):
            live = [layer for layer in groups if not all(groups[layer]["stopped"])]
            if not live:
                break
            for bi in rng.permutation(len(blocks)):
                r0, r1 = blocks[bi]
                perm = torch.from_numpy(rng.permutation(r1 - r0)).to(dev)
                xs = {layer: self.data.read("train", layer, r0, r1).to(dev)[perm]
                      for layer in live}
                yb = y_all[r0:r1][perm]
                for m0 in range(0, r1 - r0, batch_size):
                    step += 1
                    y_mb = yb[m0 : m0 + batch_size]
                    for layer in live:
                        grp = groups[layer]
                        x = xs[layer][m0 : m0 + batch_size].to(gemm)
                        theta, d = grp["theta"], x.shape[1]
                        wt = theta[:d].view(d, g_count * c).T.to(gemm).contiguous()
                        z = torch.addmm(theta[d].view(-1).to(gemm), x, wt.T)
                        softmax_xent(z.view(-1, g_count, c).transpose(0, 1), y_mb,
                                     scale=1.0 / len(y_mb))
                        grad = torch.empty_like(theta)
                        grad[:d].view(d, g_count * c).copy_(torch.mm(z.T, x).T)
                        grad[d] = z.sum(dim=0, dtype=dt).view(g_count, c)
                        grad[:d].add_(theta[:d] * lam)
                        frozen = torch.tensor(grp["stopped"], device=dev).view(1, g_count, 1)
                        grad.masked_fill_(frozen, 0.0)
                        _adam(theta, grad, grp["m"], grp["v"], lr, step)
            bar.update(1)
            for layer in live:
                grp = groups[layer]
                probes = [_Probe(layer, l2, LBFGSState(grp["theta"][:, j]))
                          for j, l2 in enumerate(self.grid)]
                errs = ([e1 for _, _, e1, _ in self.evaluate(
                    stop_on, [(p, p.state.x) for p in probes], grad=False)]
                    if stop_on else [0.0] * g_count)
                for j in range(g_count):
                    if grp["stopped"][j]:
                        continue
                    grp["epochs"][j] = epoch + 1
                    if errs[j] < grp["best_err"][j] or not stop_on:
                        grp["best_err"][j], grp["bad"][j] = errs[j], 0
                        grp["best"][:, j] = grp["theta"][:, j]
                    else:
                        grp["bad"][j] += 1
                        grp["stopped"][j] = grp["bad"][j] >= patience
                if all(grp["stopped"]) or epoch == epochs - 1:
                    finals = []
                    for j, l2 in enumerate(self.grid):
                        st = LBFGSState(grp["best"][:, j].clone())
                        st.iterations, st.converged = grp["epochs"][j], grp["stopped"][j]
                        st.reason = ("early stopping: no better validation error in "
                                     f"{patience} epochs" if st.converged else
                                     "epochs exhausted")
                        finals.append(_Probe(layer, l2, st))
                    on_layer(layer, self._record(layer, finals))
                    grp["stopped"] = [True] * g_count
        bar.close()


def _adam(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, lr: float,
          step: int, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> None:
    """One Adam step in place (Kingma & Ba, 2015), bias-corrected."""
    m.mul_(beta1).add_(g, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (v / (1 - beta2**step)).sqrt_().add_(eps)
    p.addcdiv_(m, denom, value=-lr / (1 - beta1**step))


def _width_groups(dims: dict[str, int], slack: float = _STACK_SLACK) -> list[list[str]]:
    """Layers in groups of similar width, narrowest first: sorted by width, a group takes
    the next layer while that one is at most ``slack`` times the group's narrowest."""
    groups: list[list[str]] = []
    for layer in sorted(dims, key=dims.__getitem__):  # stable: equal widths keep their order
        if groups and dims[layer] <= slack * dims[groups[-1][0]]:
            groups[-1].append(layer)
        else:
            groups.append([layer])
    return groups


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # pragma: no cover - non-POSIX
        return 4 << 30

