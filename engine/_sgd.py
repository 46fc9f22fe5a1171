"""The SGD driver: minibatch Adam on every probe of every layer at once, streaming the train
rows from the store, with early stopping on the validation split.

Each epoch visits the train row blocks in a shuffled order and the rows of each block in a
shuffled order; every minibatch step of a layer updates all of its lambdas' probes (and its
control tasks', on their own labels) with one :meth:`ProbeObjective.minibatch_gradient`.
After each epoch the validation top-1 error of each probe (on its task's labels) decides
whether its weights are the best so far, and ``patience`` epochs without a better one stop
it (the paper's protocol); the best weights are kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .objective import Point, ProbeObjective, Solution
from .options import SGDOptions

__all__ = ["fit"]


@dataclass
class _Layer:
    """The Adam state of one layer's K probes (one per task and lambda), side by side:
    ``theta``, ``m``, ``v`` and ``best`` are (D+1, K, C); the lists hold one entry per probe."""

    theta: torch.Tensor
    m: torch.Tensor
    v: torch.Tensor
    best: torch.Tensor
    frozen: torch.Tensor  # (1, K, 1) bool on the device: the probes that stopped
    best_error: list[float]
    bad_epochs: list[int]
    stopped: list[bool]
    epochs: list[int]

    @classmethod
    def zeros(cls, d: int, k: int, c: int, dtype: torch.dtype, device: torch.device
              ) -> _Layer:
        theta = torch.zeros(d + 1, k, c, dtype=dtype, device=device)
        return cls(theta, torch.zeros_like(theta), torch.zeros_like(theta), theta.clone(),
                   torch.zeros(1, k, 1, dtype=torch.bool, device=device), [math.inf] * k,
                   [0] * k, [False] * k, [0] * k)

    def stop(self, j: int | None = None) -> None:
        """Stop probe ``j`` (default: all): its best weights are final, and its gradient is
        masked from now on."""
        for i in range(len(self.stopped)) if j is None else (j,):
            self.stopped[i] = True
        self.frozen.copy_(torch.tensor(self.stopped).view(1, -1, 1))


@dataclass
class _Schedule:
    """Where a run is: the row blocks and their shuffled order, the Adam step count, and
    the split that stops probes early (None: none does)."""

    rng: np.random.Generator
    blocks: list[tuple[int, int]]
    stop_on: str | None
    step: int = 0


def fit(objective: ProbeObjective, layers: Sequence[str], grid: Sequence[float],
        options: SGDOptions, on_layer: Callable[[str, list[Solution]], None], *,
        progress: bool = False, tasks: Sequence[str] = ("",)) -> None:
    """Fit one probe per (layer, task of ``tasks``, lambda of ``grid``) by minibatch Adam
    for at most ``options.epochs`` epochs, each stopped early on its own task's validation
    error; ``on_layer(layer, solutions)`` when every probe of a layer has stopped (or the
    epochs are spent), with each probe's best weights. A task's probes ride the same
    minibatches and GEMMs as the layer's own (a control task: its labels differ)."""
    data = objective.features.data
    c, dt, dev = objective.num_classes, objective.dtype, objective.device
    probes = [(task, lam) for task in tasks for lam in grid]  # task-major: equal segments
    l2 = objective.strengths([lam for _, lam in probes], dt)
    states = {layer: _Layer.zeros(data.dims[layer], len(probes), c, dt, dev)
              for layer in layers}
    n = data.rows("train")
    y_all = torch.stack([objective.task_labels(task, "train") for task in tasks])  # (S, N)
    block = data.block_rows
    sched = _Schedule(np.random.default_rng(options.seed),
                      [(r, min(r + block, n)) for r in range(0, n, block)],
                      "valid" if options.early_stopping and "valid" in data.splits else None)
    bar = tqdm(total=options.epochs, unit="epoch", disable=not progress, desc="solve (sgd)")
    for epoch in range(options.epochs):
        live = [layer for layer, st in states.items() if not all(st.stopped)]
        if not live:
            break
        _epoch(objective, states, live, l2, y_all, options, sched)
        bar.update(1)
        for layer in live:
            _end_of_epoch(objective, layer, states[layer], probes, epoch, options, sched,
                          on_layer)
    bar.close()


def _epoch(objective: ProbeObjective, states: dict[str, _Layer], live: list[str],
           l2: torch.Tensor, y_all: torch.Tensor, options: SGDOptions, sched: _Schedule
           ) -> None:
    """One pass over the train rows: blocks in a shuffled order, rows shuffled within each."""
    data, dev = objective.features.data, objective.device
    bs = options.batch_size
    order = sched.rng.permutation(len(sched.blocks))
    pin = dev.type == "cuda"

    def read(bi: int) -> dict[str, torch.Tensor]:
        r0, r1 = sched.blocks[bi]
        return {layer: (x.pin_memory() if pin else x) for layer, x in
                ((layer, data.read("train", layer, r0, r1)) for layer in live)}

    # the next block is read (decompressed, checked) on a thread while this one trains
    with ThreadPoolExecutor(1, thread_name_prefix="probe-engine-read") as pool:
        ahead = pool.submit(read, order[0]) if len(order) else None
        for i, bi in enumerate(order):
            raw = ahead.result()
            if i + 1 < len(order):
                ahead = pool.submit(read, order[i + 1])
            r0, r1 = sched.blocks[bi]
            perm = torch.from_numpy(sched.rng.permutation(r1 - r0)).to(dev)
            xs = {layer: x.to(dev, non_blocking=True)[perm] for layer, x in raw.items()}
            del raw
            yb = y_all[:, r0:r1][:, perm]
            for m0 in range(0, r1 - r0, bs):
                sched.step += 1
                y_mb = yb[:, m0 : m0 + bs]
                for layer in live:
                    st = states[layer]
                    grad = objective.minibatch_gradient(xs[layer][m0 : m0 + bs], y_mb,
                                                        st.theta, l2)
                    if any(st.stopped):  # stopped probes get no gradient
                        grad.masked_fill_(st.frozen, 0.0)
                    _adam(st.theta, grad, st.m, st.v, options.lr, sched.step)


def _end_of_epoch(objective: ProbeObjective, layer: str, st: _Layer,
                  probes: Sequence[tuple[str, float]], epoch: int, options: SGDOptions,
                  sched: _Schedule, on_layer: Callable[[str, list[Solution]], None]) -> None:
    """Keep each probe's best weights by validation error (of its task's labels), stop the
    probes out of patience, and hand the layer over once all of them stopped or the epochs
    are spent."""
    k = len(probes)
    errors = ([v.top1_error for v in objective.evaluate(
        sched.stop_on, [Point(layer, lam, st.theta[:, j], task)
                        for j, (task, lam) in enumerate(probes)], grad=False)]
              if sched.stop_on else [0.0] * k)
    for j in range(k):
        if st.stopped[j]:
            continue
        st.epochs[j] = epoch + 1
        if errors[j] < st.best_error[j] or not sched.stop_on:
            st.best_error[j], st.bad_epochs[j] = errors[j], 0
            st.best[:, j] = st.theta[:, j]
        else:
            st.bad_epochs[j] += 1
            if st.bad_epochs[j] >= options.patience:
                st.stop(j)
    if all(st.stopped) or epoch == options.epochs - 1:
        on_layer(layer, [
            Solution(layer, lam, st.best[:, j].clone(), st.epochs[j], 0, st.stopped[j],
                     f"early stopping: no better validation error in {options.patience} epochs"
                     if st.stopped[j] else "epochs exhausted", task)
            for j, (task, lam) in enumerate(probes)])
        st.stop()


def _adam(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, lr: float,
          step: int, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> None:
    """One Adam step in place (Kingma & Ba, 2015), bias-corrected."""
    m.mul_(beta1).add_(g, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (v / (1 - beta2**step)).sqrt_().add_(eps)
    p.addcdiv_(m, denom, value=-lr / (1 - beta1**step))
