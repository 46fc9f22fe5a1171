"""Fitting layers in this process: the chosen driver over a :class:`ProbeData`, the choice of
lambda and the record of each layer, and saving each finished layer into its run.

:func:`solve_data` fits the layers of a :class:`ProbeData` into a store's run (or without a
store); ``engine.solve`` calls it when it has no client. :func:`solve_stored` is the same
from a store's path: what each Dask task of ``engine.schedule`` runs, one layer per task.
:func:`fit_layers` fits a batch of layers and hands each one's record over as it finishes.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence

import torch

from . import _lbfgs, _ridge, _sgd
from . import format as fmt
from ._devices import resolve_device
from ._features import FeatureCache
from ._sources import ProbeData
from ._tasks import TaskPlan, mdl_codelength
from ._tasks import plan as plan_tasks
from .errors import DataError, InvalidArgumentError, SplitNotFoundError
from .kernels import uses_cuda_kernel
from .objective import Kernel, Point, ProbeObjective, Solution
from .options import SolveOptions
from .store import Store, open_store

__all__ = ["ARITHMETIC", "backend_of", "check_splits", "fit_layers", "objective_for", "select",
           "solve_data", "solve_stored", "task_plan"]

#: solve dtype -> the arithmetic dtype of weights, sums and full-batch passes ("tf32":
#: float32 with TF32 GEMMs on CUDA; "bfloat16": float32 with bfloat16 minibatch products)
ARITHMETIC = {"float32": torch.float32, "tf32": torch.float32, "bfloat16": torch.float32,
              "float64": torch.float64}


def check_splits(data: ProbeData, options: SolveOptions) -> None:
    """Refuse what needs a 'valid' split when there is none: a choice among several
    lambdas, and SGD's early stopping."""
    if len(options.grid) > 1 and "valid" not in data.splits:
        raise SplitNotFoundError(
            f"choosing among {len(options.grid)} l2 values needs a 'valid' split, and there "
            f"is none (splits: {list(data.splits)}); pass one l2 value, e.g. l2=1e-4")
    if options.shots and "valid" not in data.splits:
        raise SplitNotFoundError(f"few-shot probes choose their lambda on a 'valid' split, "
                                 f"and there is none (splits: {list(data.splits)})")
    if options.refit:
        missing = [s for s in ("valid", "test") if s not in data.splits]
        if missing:
            raise SplitNotFoundError(
                f"refit=True chooses lambda on 'valid', fits again on train + valid and "
                f"scores the result on 'test'; there is no {' or '.join(map(repr, missing))} "
                f"split (splits: {list(data.splits)})")
        if data.sources and data.sources.get("valid") == data.sources.get("test"):
            rows, digest = data.sources["test"]
            raise DataError(
                f"refit=True must not score as 'test' the rows that chose lambda: the valid "
                f"and test splits hold the same rows ({rows} rows, sample digest "
                f"{digest[:12]}); give a test split of its own")
    if options.solver == "sgd" and options.sgd.early_stopping and "valid" not in data.splits:
        raise SplitNotFoundError(
            f"early stopping needs a 'valid' split, and there is none (splits: "
            f"{list(data.splits)}); pass early_stopping=False to run all "
            f"{options.sgd.epochs} epochs")


def solve_stored(path: str, layers: list[str], options: SolveOptions, *,
                 progress: bool = False) -> dict[str, dict]:
    """Solve ``layers`` of the store at ``path`` into the run ``options.run`` in this
    process: open it, check or create the run, skip the layers already saved in it, fit the
    others, saving each as it finishes; returns the records of ``layers`` (saved ones
    included)."""
    store = open_store(path)
    data = ProbeData.from_store(store, layers, options.label, options.allow_partial)
    check_splits(data, options)
    return solve_data(data, options, store=store, progress=progress)


def solve_data(data: ProbeData, options: SolveOptions, *, store: Store | None,
               progress: bool = False, started: float | None = None,
               objective: Callable[[list[str]], ProbeObjective] | None = None,
               backend: dict | None = None) -> dict[str, dict]:
    """Fit every layer of ``data``; with a ``store``, into its run ``options.run``: layers
    saved there are skipped and each layer is saved as it finishes. Returns the records of
    ``data.layers``; ``started`` (perf_counter) is when the solve began. ``objective``
    (layers to fit -> their objective) and ``backend`` replace :func:`fit_layers`'
    defaults (``engine.schedule``'s row-parallel solves)."""
    started = time.perf_counter() if started is None else started
    done: dict[str, dict] = {}
    if store is not None:
        done = fmt.saved_probes(fmt.open_root(store.path), options.run)
        if objective is None:  # a budget too small: refused before the run is written
            FeatureCache(data, resolve_device(options.device), ARITHMETIC[options.dtype],
                         budget=options.max_memory).check(
                [s for s in data.splits if s != "train" or options.solver != "sgd"],
                [layer for layer in data.layers if layer not in done])
            if options.solver == "ridge":  # a Gram too large: refused before the run too
                _ridge.check(data.dims, [layer for layer in data.layers if layer not in done])
        fmt.start_run(store.path, store.meta, options.run, options.config(data.num_classes))
        done = fmt.saved_probes(fmt.open_root(store.path), options.run)
    finished = dict(done)

    def on_layer(layer: str, record: dict) -> None:
        finished[layer] = record
        if store is not None:
            fmt.save_probe(store.path, options.run, layer, record)

    todo = [layer for layer in data.layers if layer not in done]
    if todo:
        fit_layers(data, todo, options, on_layer, progress=progress, started=started,
                   objective=objective(todo) if objective else None, backend=backend)
    return {layer: finished[layer] for layer in data.layers}


def backend_of(options: SolveOptions) -> dict:
    """How a solve with ``options`` computes here: device, kernel and matmul dtype (what
    ``results.backends`` reports)."""
    dev = resolve_device(options.device)
    arith = ARITHMETIC[options.dtype]
    low = torch.bfloat16 if options.dtype == "bfloat16" else None
    tf32 = options.dtype == "tf32" and dev.type == "cuda"
    return {"device": str(dev),
            "kernel": "cuda" if uses_cuda_kernel(dev, low or arith) else "torch",
            "matmul": "tf32" if tf32 else str(low or arith).removeprefix("torch.")}


def objective_for(data: ProbeData, layers: Sequence[str], options: SolveOptions, *,
                  kernel: str | Kernel = "auto", group: bool | None = None
                  ) -> ProbeObjective:
    """The objective of ``layers`` of ``data`` on ``options.device`` within
    ``options.max_memory``, every split's features placed (resident ones read and checked
    now, not after hours of fitting; train first, as every pass reads it; SGD streams
    train itself)."""
    dev = resolve_device(options.device)
    features = FeatureCache(data, dev, ARITHMETIC[options.dtype], group, options.max_memory)
    splits = sorted(data.splits, key=lambda s: s != "train")
    if options.solver == "sgd":
        splits.remove("train")
    features.load(splits, layers)
    return ProbeObjective(features, kernel=kernel,
                          low=torch.bfloat16 if options.dtype == "bfloat16" else None)


def fit_layers(data: ProbeData, layers: Sequence[str], options: SolveOptions,
               on_layer: Callable[[str, dict], None], *, progress: bool = False,
               started: float | None = None, kernel: str | Kernel = "auto",
               group: bool | None = None, precondition: bool = True,
               objective: ProbeObjective | None = None, backend: dict | None = None) -> None:
    """Fit ``layers`` of ``data`` with ``options.solver``, all at once, and call
    ``on_layer(layer, record)`` (:func:`select`, plus ``seconds`` since ``started`` and the
    ``backend``) as each layer finishes. ``objective`` (default :func:`objective_for`) is
    what the drivers evaluate: ``engine.schedule`` passes one whose passes run on row shards
    over Dask workers (L-BFGS only). ``kernel``, ``group`` (width stacking; default on CUDA)
    and ``precondition`` (L-BFGS) are for tests and benchmarks."""
    started = time.perf_counter() if started is None else started
    backend = backend_of(options) if backend is None else backend
    if objective is None:
        objective = objective_for(data, layers, options, kernel=kernel, group=group)
    tf32 = backend["matmul"] == "tf32"

    plan = task_plan(data, options)
    objective.add_tasks(plan.tasks)
    chosen: dict[str, dict] = {}

    def more(layer: str, solutions: list[Solution]) -> list[tuple[float, str]]:
        """A layer's grid is done: its controls and MDL blocks at the lambda it chose."""
        if layer in chosen:
            return []
        chosen[layer] = select(objective, [s for s in solutions if s.task == plan.main])
        return [(chosen[layer]["l2"], task) for task in plan.extra]

    def finished(layer: str, solutions: list[Solution],
                 seeds: dict[str, list[float]] | None = None) -> None:
        record = chosen.pop(layer, None) or select(
            objective, [s for s in solutions if s.task == plan.main])
        for split, errors in (seeds or {}).items():
            e = torch.tensor(errors, dtype=torch.float64)
            record["metrics"][split].update(top1_error_seed_mean=float(e.mean()),
                                            top1_error_seed_std=float(e.std()))
        if plan.extra or plan.shots:  # SGD fits its controls at every lambda: the chosen's
            add_baselines(objective, plan, record, [
                s for s in solutions if s.task not in plan.controls or s.l2 == record["l2"]])
        record["seconds"] = round(time.perf_counter() - started, 3)
        # SGD reads train block by block every epoch, whatever the budget
        record["backend"] = {**backend, "features": "streamed" if options.solver == "sgd"
                             else objective.placement(layer)}
        if getattr(objective, "multilabel", False):  # the sigmoid kernel is torch's alone
            record["backend"]["kernel"] = "torch"
        on_layer(layer, record)

    precision = torch.get_float32_matmul_precision()
    if tf32:
        torch.set_float32_matmul_precision("high")
    try:
        if options.solver == "lbfgs":
            _lbfgs.fit(objective, layers, options.grid, options.lbfgs, finished,
                       precondition=precondition, progress=progress, tasks=plan.grid_tasks,
                       more=more if plan.extra else None)
        elif options.solver == "ridge":
            _ridge.fit(objective, layers, options.grid, finished, progress=progress)
        elif options.sgd.repeats == 1:
            _sgd.fit(objective, layers, options.grid, options.sgd, finished,
                     progress=progress, tasks=(plan.main, *plan.controls))
        else:
            _sgd_repeats(objective, layers, options, finished, progress=progress,
                         tasks=(plan.main, *plan.controls))
    finally:
        torch.set_float32_matmul_precision(precision)


def _sgd_repeats(objective: ProbeObjective, layers: Sequence[str], options: SolveOptions,
                 finished: Callable[[str, list[Solution]], None], *, progress: bool,
                 tasks: Sequence[str] = ("",)) -> None:
    """SGD is stochastic: fit every layer ``options.sgd.repeats`` times, seeds ``seed``,
    ``seed + 1``, ...; the first seed's probe is the result, and each split's metrics get
    ``top1_error_seed_mean`` / ``top1_error_seed_std`` over the seeds (the spread that the
    row bootstrap does not see)."""
    errors: dict[str, dict[str, list[float]]] = {}

    def collect(layer: str, solutions: list[Solution]) -> None:
        points = [Point(s.layer, s.l2, s.theta, s.task) for s in solutions
                  if s.task == tasks[0]]
        values = {split: objective.evaluate(split, points, grad=False)
                  for split in objective.splits}
        pick = values["valid" if "valid" in values else "train"]
        best = min(range(len(points)), key=lambda i: (pick[i].top1_error, pick[i].loss,
                                                      -points[i].l2))  # as select chooses
        for split, vs in values.items():
            errors.setdefault(layer, {}).setdefault(split, []).append(vs[best].top1_error)

    first: dict[str, list[Solution]] = {}
    for r in range(options.sgd.repeats):
        sgd = dataclasses.replace(options.sgd, seed=options.sgd.seed + r)
        _sgd.fit(objective, layers, options.grid, sgd,
                 (lambda layer, sols: (first.__setitem__(layer, sols), collect(layer, sols)))
                 if r == 0 else collect, progress=progress, tasks=tasks)
    for layer in layers:
        finished(layer, first[layer], seeds=errors[layer])


def select(objective: ProbeObjective, solutions: list[Solution]) -> dict:
    """The record of a finished layer: the metrics of every lambda's probe on every split,
    the chosen one (lowest validation top-1 error, then loss, then the larger lambda; train
    without a 'valid' split) first-class, every lambda's summary in ``grid``, and the
    chosen probe's per-row ``outputs`` on every split but train
    (:meth:`ProbeObjective.row_outputs`)."""
    splits = objective.splits
    metrics: dict[float, dict[str, dict]] = {}
    objectives: dict[float, float] = {}
    for split in splits:
        values = objective.evaluate(
            split, [Point(s.layer, s.l2, s.theta, s.task) for s in solutions], grad=False)
        for s, v in zip(solutions, values, strict=True):
            metrics.setdefault(s.l2, {})[split] = {
                "loss": v.loss, "top1_error": v.top1_error,
                "top5_error": v.top5_error if objective.num_classes > 5 else math.nan}
            if split == "train":
                objectives[s.l2] = v.objective  # L_k: the penalised training loss
    pick = "valid" if "valid" in splits else "train"
    best = min(solutions, key=lambda s: (metrics[s.l2][pick]["top1_error"],
                                         metrics[s.l2][pick]["loss"], -s.l2))
    return {
        "l2": best.l2, "W": best.theta[:-1].float().cpu().numpy(),
        "b": best.theta[-1].float().cpu().numpy(), "objective": objectives[best.l2],
        "iterations": best.iterations, "evaluations": best.evaluations,
        "converged": best.converged, "reason": best.reason, "metrics": metrics[best.l2],
        "grid": [{"l2": s.l2, "objective": objectives[s.l2], "iterations": s.iterations,
                  "converged": s.converged, **{
                      f"{split}_{m}": v for split, ms in metrics[s.l2].items()
                      for m, v in ms.items()}} for s in solutions],
        # per-row outputs of the chosen probe where it is scored: the metrics and the
        # bootstrap intervals of engine.metrics (train's would cost a copy of its labels)
        "outputs": {split: {k: v.numpy() for k, v in objective.row_outputs(
            split, Point(best.layer, best.l2, best.theta, best.task)).items()}
            for split in splits if split != "train"},
    }


def task_plan(data: ProbeData, options: SolveOptions) -> TaskPlan:
    """The tasks ``options`` ask of a solve of ``data`` (:mod:`engine._tasks`)."""
    if not options.tasks:
        return TaskPlan()
    if data.multilabel:
        raise InvalidArgumentError(f"{options.task_words()} are for single-label probes; "
                                   f"this label set is multi-label (N, C)")
    return plan_tasks(data.labels, data.num_classes, controls=options.controls,
                      mdl_blocks=options.mdl_blocks if options.mdl else None,
                      class_weight=options.class_weight, seed=options.sgd.seed,
                      types=data.types, token_rows=data.token_rows, refit=options.refit,
                      shots=options.shots, draws=options.draws)


def add_baselines(objective: ProbeObjective, plan: TaskPlan, record: dict,
                  solutions: list[Solution]) -> None:
    """Adds to a layer's ``record`` what its probes beside the chosen one found: the
    few-shot draws' errors, the refit probe, the controls' errors and the MDL codelength
    (each below)."""
    by_task = {s.task: s for s in solutions}
    if plan.shots:
        add_few_shot(objective, plan, record, solutions)
    if plan.refit:
        add_refit(objective, plan, record, by_task["refit"])
    if plan.controls:
        add_controls(objective, plan, record, [by_task[c] for c in plan.controls])
    if plan.boundaries:
        add_mdl(objective, plan, record,
                [by_task[f"mdl:{i}"] for i in range(1, len(plan.boundaries))])


def add_refit(objective: ProbeObjective, plan: TaskPlan, record: dict, s: Solution) -> None:
    """The refit probe ``s`` (train + valid) becomes the layer's result: its weights, its
    test metrics and outputs; ``fitted_on`` per split says which probe a row scores."""
    scored = Point(s.layer, s.l2, s.theta, plan.main)
    (v,) = objective.evaluate("test", [scored], grad=False)
    for split, m in record["metrics"].items():
        m["fitted_on"] = "train+valid" if split == "test" else "train"
    record["metrics"]["test"].update(  # the row of the probe that scores it: the refit's
        loss=v.loss, top1_error=v.top1_error,
        top5_error=v.top5_error if objective.num_classes > 5 else math.nan,
        iterations=s.iterations, converged=s.converged)
    record["W"], record["b"] = (s.theta[:-1].float().cpu().numpy(),
                                s.theta[-1].float().cpu().numpy())
    record["outputs"]["test"] = {k: t.numpy() for k, t in objective.row_outputs(
        "test", scored).items()}
    record["refit"] = {"iterations": s.iterations, "evaluations": s.evaluations,
                       "converged": s.converged, "reason": s.reason}


def add_controls(objective: ProbeObjective, plan: TaskPlan, record: dict,
                 controls: list[Solution]) -> None:
    """Per split, ``<control>_top1_error`` of each control probe and ``selectivity`` (the
    first control's error minus the probe's: accuracy above the control's)."""
    for split in objective.splits:
        values = objective.evaluate(split, [Point(s.layer, s.l2, s.theta, s.task)
                                            for s in controls], grad=False)
        m = record["metrics"][split]
        for name, v in zip(plan.controls, values, strict=True):
            m[f"{name}_top1_error"] = v.top1_error
        m["selectivity"] = m[f"{plan.controls[0]}_top1_error"] - m["top1_error"]
    record["controls"] = {c: {"converged": s.converged, "iterations": s.iterations}
                          for c, s in zip(plan.controls, controls, strict=True)}


def add_mdl(objective: ProbeObjective, plan: TaskPlan, record: dict,
            fitted: list[Solution]) -> None:
    """``mdl``: the online codelength in bits (each block's probe scored on the next
    block), the uniform one, the compression and the blocks."""
    points = [Point(s.layer, s.l2, s.theta, f"{s.task}:next") for s in fitted]
    n = objective.rows("train")
    losses = [v.loss * objective.total(p.task, "train", n) for p, v in zip(
        points, objective.evaluate("train", points, grad=False), strict=True)]
    record["mdl"] = {**mdl_codelength(plan.boundaries, objective.num_classes, losses),
                     "boundaries": list(plan.boundaries),
                     "converged": all(s.converged for s in fitted)}


def add_few_shot(objective: ProbeObjective, plan: TaskPlan, record: dict,
                 solutions: list[Solution]) -> None:
    """Adds each few-shot protocol's errors to a layer's ``record``: every draw keeps the
    lambda with the lowest validation error (then the larger lambda); on valid and test,
    ``shots_<k>_top1_error`` is the mean over draws and ``..._std`` their deviation."""
    names = [t for ts in plan.shots.values() for t in ts]
    mine = [s for s in solutions if s.task in set(names)]
    valid = objective.evaluate("valid", [Point(s.layer, s.l2, s.theta, s.task) for s in mine],
                               grad=False)
    best: dict[str, tuple] = {}
    for s, v in zip(mine, valid, strict=True):
        key = (v.top1_error, v.loss, -s.l2)
        if s.task not in best or key < best[s.task][0]:
            best[s.task] = (key, s, v)
    picked = [best[t][1] for t in names]
    scores = {"valid": [best[t][2] for t in names]}
    if "test" in objective.splits:
        scores["test"] = objective.evaluate(
            "test", [Point(s.layer, s.l2, s.theta, s.task) for s in picked], grad=False)
    record["shots"] = {}
    for k, tasks in plan.shots.items():
        at = [names.index(t) for t in tasks]
        record["shots"][str(k)] = {"l2": [picked[i].l2 for i in at], **{
            f"{split}_top1_error": [vs[i].top1_error for i in at]
            for split, vs in scores.items()}}
        for split, vs in scores.items():
            errors = torch.tensor([vs[i].top1_error for i in at], dtype=torch.float64)
            m = record["metrics"][split]
            m[f"shots_{k}_top1_error"] = float(errors.mean())
            m[f"shots_{k}_top1_error_std"] = (float(errors.std()) if len(at) > 1
                                              else math.nan)
