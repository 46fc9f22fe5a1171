"""The probe objective, written once: loss, gradient, penalty and the kernel call.

Per probe k, with features X (N, D_k), labels y in [0, C) and L2 strength lambda::

    L_k(W, b) = (1/N) sum_i CE(softmax(X_i W + b), y_i) + (lambda / 2) ||W||_F^2

(b is not penalised; CE is the natural-log cross-entropy). This is scikit-learn's
``LogisticRegression(C=1/(lambda*N))`` objective for C > 2 classes. Its gradient::

    dL/dW = X^T dZ + lambda W,   dL/db = sum_i dZ_i,   dZ = (softmax(X W + b) - onehot(y)) / N

:class:`ProbeObjective` is the one place that computes them, for every driver, as
scikit-learn's ``LinearModelLoss`` serves all its solvers: the L-BFGS driver
(:mod:`engine._lbfgs`) and the result selection (:mod:`engine._fit`) evaluate it on whole
splits (:meth:`ProbeObjective.evaluate`), the SGD driver (:mod:`engine._sgd`) on minibatches
(:meth:`ProbeObjective.minibatch_gradient`). Either way the weights of many probes are laid
side by side into one GEMM operand (:meth:`ProbeObjective.pack`: the lambdas of a layer,
and on CUDA the layers of a width stack, add columns to the same products, not passes), the
logits ``X W + b`` are one GEMM, the softmax-cross-entropy kernel (``kernel=``: the fused CUDA
kernel where it runs, else its torch reference, or any function of their signature) turns
them into loss sums, hit counts and dZ in place, and ``X^T dZ`` is the second GEMM. The
probes of a task that counts few of the rows (an MDL block, a few-shot draw) take only those
rows of each block, gathered (:data:`SPARSE_SHARE`), in GEMMs of their own. The
penalty is added by :meth:`ProbeObjective.penalty` (value) and
:meth:`ProbeObjective.penalty_gradient` (gradient) only.

This module is a documented internal seam: the drivers, the tests and the benchmarks use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ._features import FeatureCache
from ._tasks import IGNORE, Task
from .errors import InvalidArgumentError
from .kernels import softmax_xent
from .kernels.reference import EXP_FLOOR, softmax_rows
from .kernels.reference import softmax_xent as reference_softmax_xent

__all__ = ["BLOCK_BYTES", "SPARSE_SHARE", "Kernel", "Partial", "Point", "ProbeObjective",
           "Solution", "Value", "kernel_function"]

#: bytes of the logits of one block of rows, all probes of a run: the rows per block of a
#: full-batch pass
BLOCK_BYTES = 64 << 20

#: rows per block of the preconditioner's products
MOMENT_ROWS = 8192

#: a task counting at most this share of a split's rows (an MDL block, a few-shot draw) is
#: evaluated on its own rows, gathered from each block, not over every row with the others
#: left out: its products then cost its rows, not the split's. Above it the gather (and a
#: GEMM of its own, thinner than the shared one) costs more than it saves.
SPARSE_SHARE = 0.5

#: a softmax-cross-entropy kernel: the signature of engine.kernels.reference.softmax_xent
Kernel = Callable[..., tuple]


class Point(NamedTuple):
    """Parameters of one probe of ``layer`` at L2 strength ``l2``: ``theta`` is (D+1, C),
    the weights W then the bias row b; ``task`` names the labels and row weights it is
    evaluated on (:mod:`engine._tasks`; "" the split's own labels, every row once)."""

    layer: str
    l2: float
    theta: torch.Tensor
    task: str = ""


class Partial(NamedTuple):
    """Sums of one probe over some rows of a split (all of them, or a shard's): ``loss``
    the cross-entropy sum (float64), ``top1`` / ``top5`` the hits (weighted, for a task
    with row weights), ``gradient`` the
    unpenalised dL/dtheta contribution ((D+1, C), already scaled by 1 / N of the whole
    split; None when not asked for). Shards' partials add up to the split's."""

    loss: float
    top1: float
    top5: float
    gradient: torch.Tensor | None


class Value(NamedTuple):
    """The objective of one probe on one split: ``loss`` the mean cross-entropy,
    ``objective`` L_k (loss plus penalty), ``gradient`` dL_k/dtheta ((D+1, C), or None when
    not asked for), and the top-1 / top-5 errors."""

    loss: float
    objective: float
    gradient: torch.Tensor | None
    top1_error: float
    top5_error: float


@dataclass
class Solution:
    """A fitted probe, whichever driver fitted it: its parameters ``theta`` ((D+1, C)),
    iterations (L-BFGS) or epochs (SGD), objective evaluations, and why it stopped."""

    layer: str
    l2: float
    theta: torch.Tensor
    iterations: int
    evaluations: int
    converged: bool
    reason: str
    task: str = ""


class _Rows(NamedTuple):
    """The counted rows of a sparse task on one split: ``at`` (M,) int64 their sorted
    indices on the host (a block's share by binary search), ``index`` the same on the
    device, and the task's ``labels`` and ``weights`` (None: unweighted) at them."""

    at: np.ndarray
    index: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor | None


class _Pack(NamedTuple):
    """One sparse task's probes of layer ``layer`` (position in the run) in a pass: their
    ``segment`` (task, first probe, probes), rows, GEMM operands W^T (cols, D) and b (cols,)
    padded like the shared ones, and their gradient sums X^T dZ (D, cols), sum dZ (cols,)."""

    layer: int
    segment: tuple[str, int, int]
    rows: _Rows
    wt: torch.Tensor
    b: torch.Tensor
    gw: torch.Tensor | None
    gb: torch.Tensor | None


def kernel_function(kernel: str | Kernel) -> Kernel:
    """``"auto"``: :func:`engine.kernels.softmax_xent` (the fused CUDA kernel where it runs,
    else the reference); ``"torch"``: always the reference; or a function of their signature
    (the tests' host-emulated kernel)."""
    if callable(kernel):
        return kernel
    table = {"auto": softmax_xent, "torch": reference_softmax_xent}
    if kernel not in table:
        raise InvalidArgumentError(f"kernel must be 'auto', 'torch' or a function, not "
                                   f"{kernel!r}")
    return table[kernel]


class ProbeObjective:
    """L_k, its gradient and metrics for many probes at once (see the module docs).

    ``features`` holds the data of the full-batch passes and fixes the device, the
    arithmetic dtype and the classes. ``low`` (bfloat16) is the dtype of the minibatch
    products (weights and sums stay in the arithmetic dtype). ``block_bytes`` bounds the
    logits of one block of rows of a full-batch pass. ``tasks`` are the tasks points may
    name besides the default one (:class:`engine._tasks.Task`).
    """

    def __init__(self, features: FeatureCache, *, kernel: str | Kernel = "auto",
                 low: torch.dtype | None = None, block_bytes: int = BLOCK_BYTES,
                 tasks: Sequence[Task] = ()):
        self.features = features
        self.device, self.dtype = features.device, features.dtype
        self.num_classes = features.num_classes
        self.low = low
        self.multilabel = features.data.multilabel
        # several classes per row: a sigmoid probe per class (the fused kernel is softmax)
        self.kernel = sigmoid_xent if self.multilabel and not callable(kernel) else \
            kernel_function(kernel)
        self.block_bytes = block_bytes
        # the K*C logit columns of a full-batch pass padded: MKL's float32 GEMMs with a thin
        # side of 10 (or 60) columns run several times slower than with 16 (or 64)
        # (docs/solve.md, benchmarks/RESULTS.md); tensor cores want multiples of 8. The
        # padding columns have zero weights; their gradient sums are never read.
        self.pad = 16 if self.device.type == "cpu" else 8
        self._strengths: dict[tuple, torch.Tensor] = {}
        self._sparse: dict[tuple[str, str], _Rows | None] = {}
        self.tasks: dict[str, Task] = {}
        self.add_tasks(tasks)

    def add_tasks(self, tasks: Sequence[Task]) -> None:
        """Make ``tasks`` nameable by points (their labels and weights moved to the device)."""
        for task in tasks:
            if not task.name:
                raise InvalidArgumentError("a task needs a name; '' is the default task")
            self.tasks[task.name] = task.to(self.device, self.dtype)

    def task_labels(self, task: str, split: str) -> torch.Tensor:
        """(N,) labels of ``task`` on ``split`` on the device (:data:`IGNORE`: not counted)."""
        if not task:
            return self.features.labels(split)
        try:
            return self.tasks[task].labels[split]
        except KeyError:
            raise InvalidArgumentError(f"task {task!r} has no labels for split {split!r}"
                                       ) from None

    def total(self, task: str, split: str, n: int, pooled: bool = False) -> float:
        """The N of ``task``'s mean loss on ``split``: ``n`` (the split's rows) for the
        default task, else the weight of the task's counted rows; ``pooled``: of the rows
        of every split the task pools (:attr:`engine._tasks.Task.pool`)."""
        if not task:
            return float(n)
        t = self.tasks[task]
        return sum(t.total(s) for s in t.pool) if pooled else t.total(split)

    def pool(self, task: str, split: str) -> tuple[str, ...]:
        """The splits whose rows an evaluation of ``task`` on ``split`` sums: the task's
        pool for "train" (a refit on train + valid), else ``split`` alone."""
        t = self.tasks.get(task) if task else None
        return t.pool if t is not None and t.pool and split == "train" else (split,)

    # -- the pieces, each written once -----------------------------------------------------
    def pack(self, thetas: Sequence[torch.Tensor], d: int, dtype: torch.dtype, pad: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """The GEMM operands of L layers' K probes each: ``thetas[j]`` is (D_j+1, K, C);
        returns W^T (L, width, d) and b (L, 1, width), each layer's weights in its first
        D_j of ``d`` columns, the K*C logit columns padded to ``width``, a multiple of
        ``pad``; zeros everywhere else."""
        nl, kc = len(thetas), thetas[0].shape[1] * self.num_classes
        width = -(-kc // pad) * pad
        full = width == kc and all(t.shape[0] - 1 == d for t in thetas)
        make = torch.empty if full else torch.zeros  # nothing to pad: every entry is set
        wt = make(nl, width, d, dtype=dtype, device=self.device)
        b = make(nl, 1, width, dtype=dtype, device=self.device)
        for j, theta in enumerate(thetas):
            dj = theta.shape[0] - 1
            wt[j, :kc, :dj] = theta[:dj].reshape(dj, kc).T
            b[j, 0, :kc] = theta[dj].reshape(kc)
        return wt, b

    @staticmethod
    def logits(x: torch.Tensor, wt: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(L, B, width) logits ``X W + b`` of L layers' blocks x (L, B, D)."""
        if x.shape[0] == 1:
            return torch.addmm(b[0], x[0], wt[0].T).unsqueeze(0)
        return torch.baddbmm(b, x, wt.transpose(1, 2))

    def softmax_xent(self, z: torch.Tensor, k: int, y: torch.Tensor, scale: float,
                     grad: bool, hits: bool = True) -> list[tuple[torch.Tensor, ...]]:
        """The kernel on each layer's logits (z (L, B, width), K probes each, seen as
        (K, B, C)): ``(loss sums, top-1 hits, top-5 hits)`` per layer; with ``grad``, dZ
        (times ``scale``) over the logits in place. Without ``hits`` the counts may be
        None."""
        c = self.num_classes
        return [self._kernel(z[j, :, : k * c].view(-1, k, c).transpose(0, 1),  # (K, B, C)
                             y, scale, grad, hits) for j in range(z.shape[0])]

    def _kernel(self, logits: torch.Tensor, y: torch.Tensor, scale: float, grad: bool,
                hits: bool) -> tuple[torch.Tensor, ...]:
        """``(loss sums, top-1 hits, top-5 hits)`` of the kernel on (K, B, C) logits (the
        counts may be None without ``hits``)."""
        _, loss, top1, top5 = self.kernel(logits, y, scale=scale, grad=grad, hits=hits)
        return loss, top1, top5

    def bias_gradient(self, dz: torch.Tensor) -> torch.Tensor:
        """sum_i dZ_i of each layer's block: (L, width) in the arithmetic dtype."""
        return dz.sum(dim=1, dtype=self.dtype)

    @staticmethod
    def penalty(w: torch.Tensor, l2: float) -> float:
        """(lambda / 2) ||W||_F^2 of one probe's weights W (D, C), summed in float64."""
        return 0.5 * l2 * float(torch.linalg.vector_norm(w, dtype=torch.float64)) ** 2

    @staticmethod
    def penalty_gradient(g: torch.Tensor, w: torch.Tensor, l2: torch.Tensor) -> None:
        """Adds lambda W to the weight gradients ``g`` (D, K, C) of K probes with weights
        ``w`` (D, K, C) and strengths ``l2`` (K,), in place."""
        g.addcmul_(w, l2.view(1, -1, 1))

    def strengths(self, l2: Sequence[float], dtype: torch.dtype) -> torch.Tensor:
        """The lambdas ``l2`` as a (K,) tensor on the device (kept: the same few recur in
        every pass, and each would be a host-to-device copy)."""
        key = (tuple(l2), dtype)
        out = self._strengths.get(key)
        if out is None:
            out = self._strengths[key] = torch.tensor(key[0], dtype=dtype, device=self.device)
        return out

    # -- full-batch passes -----------------------------------------------------------------
    @property
    def dims(self) -> dict[str, int]:
        """Layer -> its width D."""
        return self.features.data.dims

    @property
    def splits(self) -> list[str]:
        return self.features.data.splits

    def rows(self, split: str) -> int:
        return self.features.data.rows(split)

    def placement(self, layer: str) -> str:
        """Where the passes read ``layer``'s train features: "resident" or "streamed"."""
        return "streamed" if self.features.streamed("train", layer) else "resident"

    def evaluate(self, split: str, points: Sequence[Point], *, grad: bool,
                 hits: bool = True) -> list[Value]:
        """:class:`Value` of each point on ``split``: one pass over each layer's rows,
        shared by all of the layer's points, and by the layers of a stacked run. A point
        whose task pools splits (a refit on train + valid) sums a pass over each. Without
        ``hits`` the top-1 / top-5 errors are NaN, not counted (an optimiser's passes: on
        the CPU the counts cost more than the loss and gradient)."""
        pools: dict[tuple[str, ...], list[int]] = {}
        for i, point in enumerate(points):
            pools.setdefault(self.pool(point.task, split), []).append(i)
        if list(pools) == [(split,)]:
            n = self.rows(split)
            return self.finish(points, self.partials(split, points, grad=grad, n=n,
                                                     hits=hits), n, split)
        out: list = [None] * len(points)
        for pool, at in pools.items():
            pts = [points[i] for i in at]
            n = sum(self.rows(s) for s in pool)
            sums = None
            for s in pool:
                part = self.partials(s, pts, grad=grad, n=n, pooled=len(pool) > 1,
                                     hits=hits)
                sums = part if sums is None else [Partial(
                    a.loss + b.loss, a.top1 + b.top1, a.top5 + b.top5,
                    None if a.gradient is None else a.gradient + b.gradient)
                    for a, b in zip(sums, part, strict=True)]
            for i, v in zip(at, self.finish(pts, sums, n, pool[0], pooled=len(pool) > 1),
                            strict=True):
                out[i] = v
        return out

    def partials(self, split: str, points: Sequence[Point], *, grad: bool, n: int,
                 pooled: bool = False, hits: bool = True) -> list[Partial]:
        """:class:`Partial` sums of each point over this objective's rows of ``split``,
        gradients scaled by 1 / ``n`` (``n``: the rows of the whole split, of which these
        may be a shard): sums over shards add up to the whole split's."""
        out: list = [None] * len(points)
        by_layer: dict[str, list[int]] = {}
        for i, point in enumerate(points):
            by_layer.setdefault(point.layer, []).append(i)
        for at in by_layer.values():  # a task's probes side by side: one kernel call each,
            # the tasks over every row first: theirs are the columns of the shared products
            at.sort(key=lambda i: (self.sparse_rows(points[i].task, split) is not None,
                                   points[i].task))
        for run in self.features.runs(split, by_layer):
            self._run_partials(split, run, by_layer, points, out, grad, n, pooled, hits)
        return out

    @staticmethod
    def _segments(tasks: Sequence[str]) -> list[tuple[str, int, int]]:
        """(task, first probe, probes) of each run of equal tasks in ``tasks``."""
        out: list[tuple[str, int, int]] = []
        for m, task in enumerate(tasks):
            if out and out[-1][0] == task:
                out[-1] = (task, out[-1][1], out[-1][2] + 1)
            else:
                out.append((task, m, 1))
        return out

    def sparse_rows(self, task: str, split: str) -> _Rows | None:
        """The counted rows of ``task`` on ``split`` (:class:`_Rows`) when they are at most
        :data:`SPARSE_SHARE` of the split's; None when the task is evaluated over every row
        (the default task, and any task counting more)."""
        if not task or self.multilabel:
            return None
        key = (task, split)
        if key not in self._sparse:
            y = self.task_labels(task, split)
            index = (y != IGNORE).nonzero()[:, 0]
            rows = None
            if len(index) <= SPARSE_SHARE * len(y):
                w = self.tasks[task].weights.get(split)
                rows = _Rows(index.cpu().numpy(), index, y[index],
                             None if w is None else w[index])
            self._sparse[key] = rows
        return self._sparse[key]

    def _xent(self, z: torch.Tensor, m: int, y: torch.Tensor, weights: torch.Tensor | None,
              scale: float, grad: bool, hits: bool = True) -> tuple[torch.Tensor, ...]:
        """The kernel on the first ``m`` probes' logits of z (B, >= m*C), rows labelled y
        (B,) with row weights (B,) or None: loss sums, top-1 and top-5 hits, each (m,);
        with ``grad``, dZ over those logits."""
        c, rows = self.num_classes, z.shape[0]
        logits = z[:, : m * c].view(rows, m, c).transpose(0, 1)  # (m, B, C) view
        if weights is None:
            return self._kernel(logits, y, scale, grad, hits)
        return weighted_softmax_xent(logits, y, weights, scale, grad, hits)

    def _scale(self, task: str, split: str, n: int, pooled: bool) -> float:
        """1 / the N of ``task``'s mean loss: what its dZ is scaled by."""
        return 1.0 / max(self.total(task, split, n, pooled), 1e-300)

    def _run_partials(self, split: str, run: list[str], by_layer: dict[str, list[int]],
                      points: Sequence[Point], out: list, grad: bool, n: int,
                      pooled: bool = False, hits: bool = True) -> None:
        """One pass of a run's layers over the rows of ``split``: the probes of tasks over
        every row share the logit GEMMs of each block (their columns first, see
        :meth:`partials`); each sparse task's probes take its rows of the block alone."""
        y = self.features.labels(split)
        c, d = self.num_classes, max(self.dims[layer] for layer in run)
        if len(run) > 1:  # a stack: as wide as its widest layer
            d = self.features.run_features(split, run).shape[2]
        nl, k = len(run), len(by_layer[run[0]])
        thetas = [torch.stack([points[i].theta for i in by_layer[layer]], dim=1)
                  for layer in run]  # L x (D_j+1, K, C)
        dtype = thetas[0].dtype
        wt, b = self.pack(thetas, d, dtype, self.pad)
        width = wt.shape[1]
        segments = [self._segments([points[i].task for i in by_layer[layer]])
                    for layer in run]
        plain = all(seg == [("", 0, k)] for seg in segments)
        dense: list[list[tuple[str, int, int]]] = []  # per layer: its segments over every row
        sparse: list[_Pack] = []
        for j, segs in enumerate(segments):
            dense.append([])
            for seg in segs:
                rows_of = self.sparse_rows(seg[0], split)
                if rows_of is None:
                    dense[-1].append(seg)
                    continue
                lo, hi = seg[1] * c, (seg[1] + seg[2]) * c
                cols = -(-(hi - lo) // self.pad) * self.pad  # padded, as the shared GEMM
                ws, bs = wt.new_zeros(cols, d), b.new_zeros(cols)
                ws[: hi - lo], bs[: hi - lo] = wt[j, lo:hi], b[j, 0, lo:hi]
                sparse.append(_Pack(j, seg, rows_of, ws, bs,
                                    wt.new_zeros(d, cols) if grad else None,
                                    bs.new_zeros(cols) if grad else None))
        # dense columns: [0, kd_j * C) of layer j; the shared GEMM is as wide as the widest
        kd = [sum(seg[2] for seg in segs) * c for segs in dense]
        wd = min(width, -(-max(kd) // self.pad) * self.pad)
        wt_d, b_d = wt[:, :wd], b[:, :, :wd]
        gw = torch.zeros(nl, d, wd, dtype=dtype, device=self.device) if grad else None
        gb = torch.zeros(nl, wd, dtype=dtype, device=self.device) if grad else None
        loss = torch.zeros(nl, k, dtype=torch.float64, device=self.device)
        top1 = torch.zeros_like(loss)  # hits: float64 counts exactly, and weighted hits
        top5 = torch.zeros_like(loss)

        def add(j: int, first: int, m: int, sums: tuple[torch.Tensor, ...]) -> None:
            loss[j, first : first + m] += sums[0].double()
            if hits:
                top1[j, first : first + m] += sums[1]
                top5[j, first : first + m] += sums[2]

        rows = max(256, self.block_bytes // (nl * width * wt.element_size()))
        for r0, xb in self.features.blocks(split, run, rows):  # xb (L, B, D)
            nb = xb.shape[1]
            if wd:
                z = self.logits(xb, wt_d, b_d)  # (L, B, wd)
                if plain:
                    for j, sums in enumerate(self.softmax_xent(z, k, y[r0 : r0 + nb], 1.0 / n,
                                                               grad, hits)):
                        add(j, 0, k, sums)
                for j, segs in enumerate(dense if not plain else ()):
                    for task, first, m in segs:
                        t = self.tasks.get(task)
                        w = t.weights.get(split) if t is not None else None
                        add(j, first, m, self._xent(
                            z[j, :, first * c :], m,
                            self.task_labels(task, split)[r0 : r0 + nb],
                            None if w is None else w[r0 : r0 + nb],
                            self._scale(task, split, n, pooled), grad, hits))
                if grad:  # z now holds dZ in each layer's dense columns; a column of X^T dZ
                    # reads only its own, so the others (padding, sparse tasks) are not zeroed
                    if nl == 1:
                        gw[0].addmm_(xb[0].T, z[0])  # X^T dZ: MKL's fast orientation padded
                    else:
                        gw.baddbmm_(xb.transpose(1, 2), z)
                    gb += self.bias_gradient(z)
            for p in sparse:  # its counted rows in [r0, r0 + B)
                lo, hi = (int(i) for i in p.rows.at.searchsorted([r0, r0 + nb]))
                if lo == hi:
                    continue
                task, first, m = p.segment
                xs = xb[p.layer].index_select(0, p.rows.index[lo:hi] - r0)  # (B_s, D)
                zs = torch.addmm(p.b, xs, p.wt.T)
                add(p.layer, first, m, self._xent(
                    zs, m, p.rows.labels[lo:hi],
                    None if p.rows.weights is None else p.rows.weights[lo:hi],
                    self._scale(task, split, n, pooled), grad, hits))
                if grad:  # its padding columns' sums are never read, as above
                    p.gw.addmm_(xs.T, zs)
                    p.gb.add_(zs.sum(dim=0, dtype=self.dtype))
        if not hits:  # not counted: NaN, never a count of zero
            top1.fill_(math.nan), top5.fill_(math.nan)
        loss, top1, top5 = loss.tolist(), top1.tolist(), top5.tolist()
        for j, layer in enumerate(run):
            dj, g = thetas[j].shape[0] - 1, None
            if grad:  # (D_j+1, K, C): the layer's rows of X^T dZ, the bias row
                g = torch.empty(dj + 1, k * c, dtype=dtype, device=self.device)
                g[:dj, : kd[j]], g[dj, : kd[j]] = gw[j, :dj, : kd[j]], gb[j, : kd[j]]
                for p in sparse:
                    if p.layer == j:
                        lo, mc = p.segment[1] * c, p.segment[2] * c
                        g[:dj, lo : lo + mc], g[dj, lo : lo + mc] = p.gw[:dj, :mc], p.gb[:mc]
                g = g.view(dj + 1, k, c)
            for m, i in enumerate(by_layer[layer]):
                out[i] = Partial(loss[j][m], top1[j][m], top5[j][m],
                                 g[:, m] if grad else None)

    def finish(self, points: Sequence[Point], partials: Sequence[Partial], n: int,
               split: str = "train", pooled: bool = False) -> list[Value]:
        """Each point's :class:`Value` from its partial sums over all ``n`` rows of
        ``split``: the means (over its task's counted rows), and the penalty added to the
        objective and the gradient."""
        out: list = [None] * len(points)
        by_layer: dict[str, list[int]] = {}
        for i, point in enumerate(points):
            by_layer.setdefault(point.layer, []).append(i)
        for layer, at in by_layer.items():
            dj = self.dims[layer]
            for i in at:
                point, part = points[i], partials[i]
                g = None
                if part.gradient is not None:  # its own tensor: lambda W + dL/dW, and db
                    g = torch.empty_like(point.theta)
                    torch.add(part.gradient[:dj], point.theta[:dj], alpha=point.l2,
                              out=g[:dj])
                    g[dj] = part.gradient[dj]
                total = max(self.total(point.task, split, n, pooled), 1e-300)
                loss = part.loss / total
                out[i] = Value(loss, loss + self.penalty(point.theta[:dj], point.l2), g,
                               1.0 - part.top1 / total, 1.0 - part.top5 / total)
        return out

    def row_outputs(self, split: str, point: Point) -> dict[str, torch.Tensor]:
        """What one probe says about each row of ``split`` (the per-row figures of the
        metrics and the bootstrap, :mod:`engine.metrics`), on the CPU: ``pred`` (N,) int32
        the top class, ``loss`` (N,) float32 the cross-entropy of the task's label (nats),
        ``confidence`` (N,) float32 the top class's probability, ``hit5`` (N,) bool the
        label among the 5 highest (C > 5 only), ``score`` (N,) float32 the logit of class 1
        minus class 0 (C = 2 only)."""
        layer, theta = point.layer, point.theta
        d, c = self.dims[layer], self.num_classes
        y = self.task_labels(point.task, split)
        parts: dict[str, list[torch.Tensor]] = {}
        for r0, xb in self.features.blocks(split, [layer], MOMENT_ROWS):
            z = torch.addmm(theta[d], xb[0].to(theta.dtype), theta[:d])  # (B, C)
            if self.multilabel:  # scores (N, C) for the average precision of each class
                yb = y[r0 : r0 + z.shape[0]].to(z.dtype)
                p = torch.sigmoid(z)
                got = {"pred": z.argmax(dim=1).int(),
                       "loss": (F.softplus(z) - yb * z).sum(dim=1).float(),
                       "confidence": p.max(dim=1).values.float(), "scores": p.float()}
                for k, v in got.items():
                    parts.setdefault(k, []).append(v.cpu())
                continue
            yb = y[r0 : r0 + z.shape[0]].clamp(min=0).view(-1, 1)
            logp = torch.log_softmax(z, dim=1)
            top, pred = logp.max(dim=1)
            got = {"pred": pred.int(), "loss": -logp.gather(1, yb)[:, 0].float(),
                   "confidence": top.exp().float()}
            if c > 5:
                got["hit5"] = (z > z.gather(1, yb)).sum(dim=1) < 5
            if c == 2:
                got["score"] = (z[:, 1] - z[:, 0]).float()
            for k, v in got.items():
                parts.setdefault(k, []).append(v.cpu())
        return {k: torch.cat(v) for k, v in parts.items()}

    def moment_sums(self, split: str, layer: str, q: torch.Tensor) -> torch.Tensor:
        """``sum_i x~_i x~_i^T q`` over this objective's rows of ``split``, x~ = [x, 1]
        the features of ``layer`` with a bias column: q (D+1, l) -> (D+1, l), without
        forming the (D+1, D+1) matrix (the preconditioner's products)."""
        d = self.dims[layer]
        out = torch.zeros_like(q)
        for _, xb in self.features.blocks(split, [layer], MOMENT_ROWS):
            xb = xb[0].to(q.dtype)
            z = torch.addmm(q[d], xb, q[:d])  # (B, l)
            out[:d].addmm_(xb.T, z)  # X^T Z: MKL's fast orientation for a thin Z
            out[d] += z.sum(dim=0)
        return out

    # -- minibatches -----------------------------------------------------------------------
    def minibatch_gradient(self, x: torch.Tensor, y: torch.Tensor, theta: torch.Tensor,
                           l2: torch.Tensor) -> torch.Tensor:
        """dL_k/dtheta of K probes of one layer on one minibatch (x (B, D), y (B,); N = B):
        ``theta`` (D+1, K, C) in the arithmetic dtype, ``l2`` (K,); the products in ``low``
        when set (on CUDA the kernel's bfloat16 variant reads the bfloat16 logits). With y
        (S, B), the probes are S equal segments, segment s fitted to labels y[s] (a task's).
        Returns (D+1, K, C) in theta's dtype."""
        d, k = theta.shape[0] - 1, theta.shape[1]
        c = self.num_classes
        kc = k * c
        gemm = self.low or self.dtype
        # a minibatch is a few hundred rows: its products are not padded
        wt, b = self.pack([theta], d, gemm, 1)
        xb = x.to(gemm).unsqueeze(0)  # (1, B, D)
        z = self.logits(xb, wt, b)
        ys = y.view(-1, y.shape[-1])
        m = k // len(ys)
        for t, yt in enumerate(ys):  # z now holds dZ
            self.softmax_xent(z[:, :, t * m * c :], m, yt, 1.0 / len(yt), True, hits=False)
        grad = torch.empty_like(theta)
        grad[:d].view(d, kc).copy_(torch.mm(z[0].T, xb[0]).T)
        grad[d] = self.bias_gradient(z)[0].view(k, self.num_classes)
        self.penalty_gradient(grad[:d], theta[:d], l2)
        return grad


def weighted_softmax_xent(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                          scale: float, grad: bool, hits: bool = True
                          ) -> tuple[torch.Tensor, ...]:
    """The softmax-cross-entropy kernel with row weights (a task's class weights): logits
    (K, B, C) (overwritten with ``(softmax - onehot) * weight * scale`` when ``grad``),
    labels (B,) (:data:`engine._tasks.IGNORE` rows count for nothing), weights (B,).
    Returns the weighted loss sums and top-1 / top-5 hits, each (K,) float64 (the hits None
    without ``hits``): the reference kernel's rows, weighted."""
    keep = labels >= 0
    arith = logits.dtype if logits.dtype in (torch.float32, torch.float64) else torch.float32
    w = torch.where(keep, weights.to(arith), 0.0)
    loss, top1, top5 = softmax_rows(logits, torch.where(keep, labels, 0), w, scale,
                                    grad=grad, hits=hits)
    loss = (loss * w).sum(dim=1, dtype=torch.float64)
    if hits:
        top1, top5 = ((t * w).sum(dim=1, dtype=torch.float64) for t in (top1, top5))
    return loss, top1, top5


def sigmoid_xent(logits: torch.Tensor, labels: torch.Tensor, *, scale: float = 1.0,
                 grad: bool = True, hits: bool = True
                 ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None,
                            torch.Tensor | None]:
    """The multi-label kernel (a sigmoid probe per class, the softmax kernel's signature):
    logits (K, B, C), labels (B, C) of 0 / 1. Loss: the binary cross-entropies summed over
    classes, ``softplus(z) - y z``; gradient ``(sigmoid(z) - y) * scale`` (over the logits
    when ``grad``). A "top-1 hit" is a row whose highest-scored class is one of its
    positives (one minus the one-error); a top-5 hit, one among its five highest; not
    counted (None) without ``hits``."""
    k, b, c = logits.shape
    z = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    y = labels.to(z.dtype).unsqueeze(0)  # (1, B, C)
    # floored as the softmax's exponent is (EXP_FLOOR: no denormals), a change of at most
    # e^-60 per entry
    low = z.clamp(min=EXP_FLOOR)
    loss = (F.softplus(low) - y * z).sum(dim=(1, 2), dtype=torch.float64)
    top1 = top5 = None
    if hits:
        top = z.topk(min(5, c), dim=2).indices  # (K, B, 5)
        found = y.expand(k, b, c).gather(2, top) > 0
        top1 = found[:, :, 0].sum(dim=1)
        top5 = found.any(dim=2).sum(dim=1)
    if not grad:
        return None, loss, top1, top5
    g = low.sigmoid_().sub_(y).mul_(scale)
    logits.copy_(g)
    return logits, loss, top1, top5
