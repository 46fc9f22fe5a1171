"""Tasks: what a probe is fitted and scored on, beside its layer and its lambda.

A probe of the batched solve is a (layer, lambda, task) triple. The default task is the
store's labels, every row counted once. Other tasks reuse the same features and the same
passes; only the labels and the row weights differ:

- **controls** (Hewitt & Liang, 2019): ``"shuffled"`` (each split's labels permuted,
  seeded) and ``"control"`` (each item, or each token type of a token store, mapped to a
  class drawn at random from the train class distribution, the same type always to the same
  class). A probe that does as well on a control as on the task is memorising, not reading
  the layer.
- **MDL blocks** (Voita & Titov, 2020): probe ``i`` is fitted on the first ``t_i`` train
  rows of a seeded order and scored on rows ``(t_i, t_{i+1}]``; the online codelength is the
  sum of those scores (:func:`mdl_codelength`).
- **class weights** (``class_weight="balanced"``): row weight ``N / (C * N_c)`` on train,
  scikit-learn's rule; valid / test are scored unweighted.

Rows a task leaves out carry the label :data:`IGNORE` (-1), which the softmax-cross-entropy
kernel skips (no loss, no hit, zero gradient), on the fused CUDA kernel too. A task that
counts at most :data:`engine.objective.SPARSE_SHARE` of a split's rows (the MDL blocks, a
few-shot draw) is evaluated on its own rows only, gathered from each block, so it costs its
rows, not the split's; the others share the columns of the split's GEMMs. Only real-valued
weights take a torch path (:meth:`engine.objective.ProbeObjective`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import InvalidArgumentError

__all__ = ["CONTROLS", "IGNORE", "MDL_FRACTIONS", "Task", "balanced_weights", "control_task",
           "mdl_boundaries", "mdl_codelength", "mdl_tasks", "shuffled_task"]

#: the label of a row a task does not count
IGNORE = -1
#: the kinds of control task ``solve(controls=...)`` knows
CONTROLS = ("shuffled", "control")
#: Voita & Titov's block schedule, in % of train: probe i is fitted on the first
#: MDL_FRACTIONS[i] % of rows and scores the rows up to the next boundary
MDL_FRACTIONS = (0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.25, 12.5, 25.0, 50.0, 100.0)


@dataclass
class Task:
    """Labels (split -> (N,) int64, :data:`IGNORE` where a row does not count) and optional
    row weights (split -> (N,) float; absent: 1 for every counted row) of one task.
    ``total(split)`` is the weight of its counted rows: the N of its mean loss."""

    name: str
    labels: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    #: splits whose rows are fitted on together: a fit's "train" passes sum over each
    #: (the refit on train + valid); empty: train alone
    pool: tuple[str, ...] = ()
    _totals: dict[str, float] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for split, y in self.labels.items():
            counted = y != IGNORE
            w = self.weights.get(split)
            self._totals[split] = (float(counted.sum()) if w is None
                                   else float(w[counted].double().sum()))

    def total(self, split: str) -> float:
        return self._totals[split]

    def to(self, device: torch.device, dtype: torch.dtype) -> Task:
        """The same task with its labels (and weights, in ``dtype``) on ``device``."""
        out = Task(self.name, {s: y.to(device) for s, y in self.labels.items()},
                   {s: w.to(device, dtype) for s, w in self.weights.items()}, self.pool)
        out._totals = dict(self._totals)  # a shard's are its whole splits' (below)
        return out

    def shard(self, split: str, start: int, stop: int) -> Task:
        """The task on rows [start, stop) of ``split`` alone (a row shard of a row-parallel
        solve): its labels and weights there, its totals (the N of each mean loss) still
        the whole splits', so that the shards' partial sums add up to the split's."""
        out = Task(self.name, {split: self.labels[split][start:stop]},
                   {s: w[start:stop] for s, w in self.weights.items() if s == split},
                   self.pool)
        out._totals = dict(self._totals)
        return out


def _generator(seed: int, salt: str) -> np.random.Generator:
    # one stream per (seed, purpose): a control and an MDL order of the same seed differ
    return np.random.default_rng([seed, *salt.encode()])


def shuffled_task(labels: Mapping[str, torch.Tensor], seed: int) -> Task:
    """Each split's labels permuted (seeded): the class distribution kept, the link between
    a row and its class cut."""
    rng = _generator(seed, "shuffled")
    return Task("shuffled", {s: y[torch.from_numpy(rng.permutation(len(y)))]
                             for s, y in labels.items()})


def control_task(labels: Mapping[str, torch.Tensor], num_classes: int, seed: int,
                 types: Mapping[str, np.ndarray] | None = None) -> Task:
    """Hewitt & Liang's control task: every type gets a class drawn from the train class
    distribution (seeded), and a row takes its type's class. ``types`` (split -> (N,) int
    ids, e.g. the token ids of a token store) makes one type out of rows with equal ids,
    across splits; without it every row is a type of its own."""
    rng = _generator(seed, "control")
    p = torch.bincount(labels["train"], minlength=num_classes).double().numpy()
    p /= p.sum()
    if types is None:
        return Task("control", {s: torch.from_numpy(rng.choice(num_classes, len(y), p=p))
                                for s, y in labels.items()})
    ids = np.unique(np.concatenate([np.asarray(types[s]) for s in labels]))
    table = rng.choice(num_classes, len(ids), p=p)
    return Task("control", {s: torch.from_numpy(table[np.searchsorted(ids, types[s])])
                            for s in labels})


def balanced_weights(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """scikit-learn's ``class_weight="balanced"`` row weights ``N / (C * N_c)`` (C: the
    classes present) as (N,) float64."""
    counts = torch.bincount(y, minlength=num_classes).double()
    present = int((counts > 0).sum())
    per_class = torch.where(counts > 0, len(y) / (present * counts.clamp(min=1)), 0.0)
    return per_class[y]


def few_shot_tasks(labels: Mapping[str, torch.Tensor], num_classes: int, k: int,
                   draws: int, seed: int) -> list[Task]:
    """CLIP's few-shot linear-probe protocol: per draw, ``k`` train rows of each class
    (all of a class's rows when it has fewer), drawn at random (seeded), the other train
    rows left out; valid and test whole."""
    y = labels["train"].numpy()
    rng = _generator(seed, f"shots:{k}")
    by_class = [np.flatnonzero(y == c) for c in range(num_classes)]
    out = []
    for d in range(draws):
        keep = np.concatenate([rng.choice(rows, min(k, len(rows)), replace=False)
                               for rows in by_class if len(rows)])
        train = torch.full_like(labels["train"], IGNORE)
        train[torch.from_numpy(keep)] = labels["train"][torch.from_numpy(keep)]
        out.append(Task(f"shots:{k}:{d}", {**labels, "train": train}))
    return out


def mdl_boundaries(n: int, fractions: Sequence[float]) -> list[int]:
    """Row counts ``0 < t_1 < ... < t_S = n`` of the block schedule ``fractions`` (% of
    train, increasing, the last 100): each at least one row; equal counts (a small train
    split) merged."""
    fr = [float(f) for f in fractions]
    if not fr or any(not 0 < f <= 100 for f in fr) or fr != sorted(fr) or fr[-1] != 100:
        raise InvalidArgumentError(f"mdl block fractions must increase within (0, 100] and "
                                   f"end at 100 (percent of train), not {list(fractions)}")
    out: list[int] = []
    for f in fr:
        t = min(n, max(1, math.ceil(f * n / 100)))
        if not out or t > out[-1]:
            out.append(t)
    if len(out) < 2:
        raise InvalidArgumentError(f"{n} train rows make a single MDL block; the online code "
                                   f"needs at least two: give more rows or fewer fractions")
    return out


def mdl_tasks(y: torch.Tensor, boundaries: Sequence[int], seed: int
              ) -> tuple[list[Task], list[Task]]:
    """The MDL probes' train tasks (``mdl:i``: the first ``t_i`` rows of a seeded order of
    train, i = 1 .. S-1) and the tasks they are scored on (``mdl:i:next``: rows
    ``(t_i, t_{i+1}]``), both on the "train" split only."""
    rank = torch.empty(len(y), dtype=torch.int64)
    rank[torch.from_numpy(_generator(seed, "mdl").permutation(len(y)))] = torch.arange(len(y))
    fit, score = [], []
    for i, (t, t_next) in enumerate(zip(boundaries[:-1], boundaries[1:], strict=True), 1):
        fit.append(Task(f"mdl:{i}", {"train": torch.where(rank < t, y, IGNORE)}))
        score.append(Task(f"mdl:{i}:next", {"train": torch.where(
            (rank >= t) & (rank < t_next), y, IGNORE)}))
    return fit, score


def mdl_codelength(boundaries: Sequence[int], num_classes: int,
                   next_losses: Sequence[float]) -> dict[str, float]:
    """Online codelength in bits of the train labels: the first block sent with the uniform
    code (``t_1 log2 C``), each later block with the probe fitted on the rows before it
    (``next_losses[i]``: the summed cross-entropy of block i + 1, in nats). Also the uniform
    codelength of all ``t_S`` rows and the compression, uniform over online."""
    bits = math.log2(num_classes)
    online = boundaries[0] * bits + sum(next_losses) / math.log(2)
    uniform = boundaries[-1] * bits
    return {"codelength": online, "uniform_codelength": uniform,
            "compression": uniform / online}


@dataclass
class TaskPlan:
    """The tasks of one solve: ``main`` (what each layer's grid is fitted on: "" the
    labels, or "balanced" with class weights), ``tasks`` (every named task), and what is
    fitted beside a layer's chosen probe: its ``controls`` and the MDL blocks
    (``boundaries``: row counts t_1 < ... < t_S; empty without MDL)."""

    main: str = ""
    tasks: list[Task] = field(default_factory=list)
    controls: tuple[str, ...] = ()
    boundaries: list[int] = field(default_factory=list)
    refit: bool = False
    #: k -> the few-shot tasks of k train rows per class, one per draw
    shots: dict[int, list[str]] = field(default_factory=dict)

    @property
    def grid_tasks(self) -> list[str]:
        """The tasks fitted over the whole lambda grid: the main one, then the few-shot
        draws (each chooses its own lambda on valid)."""
        return [self.main, *(t for names in self.shots.values() for t in names)]

    @property
    def extra(self) -> list[str]:
        """The tasks fitted at each layer's chosen lambda once its grid is done."""
        return [*self.controls, *(f"mdl:{i}" for i in range(1, len(self.boundaries))),
                *(["refit"] if self.refit else [])]


def plan(labels: Mapping[str, torch.Tensor], num_classes: int, *, controls: Sequence[str],
         mdl_blocks: Sequence[float] | None, class_weight: str | None, seed: int,
         types: Mapping[str, np.ndarray] | None = None, token_rows: bool = False,
         refit: bool = False, shots: Sequence[int] = (), draws: int = 5) -> TaskPlan:
    """The :class:`TaskPlan` of a solve with these options (``labels``: split -> (N,) on
    the CPU; ``types``: the token ids of a token store, for its control task; ``refit``:
    fit each layer again at its chosen lambda on train + valid; ``shots``: few-shot
    protocols of k train rows per class, ``draws`` random draws each)."""
    out = TaskPlan(controls=tuple(controls), refit=refit)
    if refit:  # the same labels (and rule for weights) over the rows of both splits
        weights = {}
        if class_weight == "balanced":
            both = balanced_weights(torch.cat([labels["train"], labels["valid"]]),
                                    num_classes)
            weights = {"train": both[: len(labels["train"])],
                       "valid": both[len(labels["train"]):]}
        out.tasks.append(Task("refit", dict(labels), weights, pool=("train", "valid")))
    if class_weight == "balanced":
        out.main = "balanced"
        out.tasks.append(Task("balanced", dict(labels), {
            "train": balanced_weights(labels["train"], num_classes)}))
    for name in controls:
        if name == "shuffled":
            out.tasks.append(shuffled_task(labels, seed))
        elif token_rows and types is None:
            raise InvalidArgumentError(
                "the control task of a token store maps each token type to a class, and this "
                "store has no token ids: add them as a label set named 'token' "
                "(Store.add_labels('token', {split: ids})), or use controls=['shuffled']")
        else:
            out.tasks.append(control_task(labels, num_classes, seed, types))
    for k in shots:
        draws_of_k = few_shot_tasks(labels, num_classes, k, draws, seed)
        out.shots[k] = [t.name for t in draws_of_k]
        out.tasks += draws_of_k
    if mdl_blocks is not None:
        out.boundaries = mdl_boundaries(len(labels["train"]), mdl_blocks)
        fit, score = mdl_tasks(labels["train"], out.boundaries, seed)
        out.tasks += fit + score
    return out
