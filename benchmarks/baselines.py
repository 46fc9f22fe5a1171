"""Baselines benchmark (issue 16): controls, MDL and the bootstrap report of the demo's store,
in one batched solve against the plain solve and against one fit at a time, side by side.

The store is the quick demo's (``engine/demo.py``): the paper's MNIST convnet trained for one
epoch on 12,000 Fashion-MNIST images, its ten probe sites captured on 3,000 train rows (500 of
them carved out as ``valid``) and 1,000 test rows, float16. Every case fits the same probes
(L-BFGS, lambdas 1e-4, 1e-3, 1e-2 chosen on valid, ``tol`` 1e-4) on the CPU:

- plain: ``engine.solve(store, l2=GRID)``: the grid of every layer, the chosen probe's per-row
  outputs on valid / test and their scores (bootstrap intervals, balanced accuracy, macro F1,
  ECE), what every solve of this version does;
- ours with baselines: the same solve with ``controls=["control", "shuffled"], mdl=True``:
  both controls and the ten MDL blocks of each layer fitted at the lambda its grid chose, in
  the same batched passes. Target: <= 3x plain (issue 16);
- one fit at a time (what a per-fit loop costs): per layer, the plain grid solve of that
  layer alone, a separate ``engine.solve`` per control (its labels from
  ``engine._tasks``, the chosen lambda, train / valid / test) and one per MDL block (fitted
  on the block's first ``t_i`` rows of the seeded order, its probe's cross-entropy summed on
  the next block here). The issue puts this at 12x+ plain. Its codelengths must equal ours
  within ``CODELENGTH_RTOL`` (relative) and its control errors ours: a cross-check that the
  batched baselines are the separate fits;
- scikit-learn (optional, ``--peers sklearn``): ``LogisticRegression(C=1/(lambda n))``
  fitted per control and per MDL block (what NLP probing toolkits loop over), on the same
  float32 features; ``--sklearn-max-dim`` leaves wider layers out (quick mode: 1,000);
- the codelength check (untimed): ours and one solve per MDL block again, in float64 at
  ``--check-tol`` (1e-6) and lambda 1e-2, on the blocks whose probes see every class: there
  the codelength does not depend on where the solver stops, and the two must agree within
  ``CODELENGTH_RTOL``;
- the bootstrap scoring alone: ``engine._scoring.score`` on the plain solve's saved per-row
  outputs (part of the plain solve's time).

Ratios are seconds / plain. ``--rows`` scales the store (train rows incl. valid; valid and
test scale with it). ``--quick``: a 2-layer MLP briefly trained, 600 train rows (100 valid),
200 test, Voita & Titov's schedule from 3.2 % (the 0.1 % blocks of 500 rows are one row,
which a separate fit refuses), scikit-learn on layers of at most 1,000 features.

    python -m benchmarks.baselines [--quick] [--rows N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn

import engine
from engine import _scoring, _tasks
from engine import format as fmt

from .capture import machine

GRID = [1e-4, 1e-3, 1e-2]
CONTROLS = ["control", "shuffled"]
TARGET = 3.0  # ours with baselines / plain (issue 16)
ISSUE_SEPARATE = 12.0  # "not the 12x+ that running each fit separately costs"
CODELENGTH_RTOL = 1e-3
CHECK_L2 = 1e-2  # the codelength check's lambda (check_codelength)
SEED = 0
#: quick mode's MDL schedule (percent of train): Voita & Titov's from 3.2 %
QUICK_BLOCKS = (3.2, 6.25, 12.5, 25.0, 50.0, 100.0)


def mlp() -> nn.Sequential:
    """The quick mode's model: Fashion-MNIST through a 2-layer MLP (784 -> 64 -> 10)."""
    return nn.Sequential(OrderedDict(flatten=nn.Flatten(), fc1_preact=nn.Linear(784, 64),
                                     fc1_postact=nn.ReLU(), logits=nn.Linear(64, 10)))


def demo_store(path: Path, *, model: str, rows: int, valid: int, test: int, fit_rows: int,
               device: str) -> tuple[engine.Store, float, float]:
    """The quick demo's store (``engine/demo.py``): the model trained for one epoch on
    ``fit_rows`` images (none: at initialisation), captured on ``rows`` train rows (``valid``
    of them carved out) and ``test`` test rows. Returns it, the training and capture
    seconds."""
    train, test_set = (engine.datasets.fashion_mnist("train"),
                       engine.datasets.fashion_mnist("test"))
    torch.manual_seed(SEED)
    net = engine.models.mnist_convnet() if model == "convnet" else mlp()
    t0 = time.perf_counter()
    if fit_rows:
        engine.models.train(net, train.subset(0, fit_rows), epochs=1, seed=SEED,
                            progress=False)
    t1 = time.perf_counter()
    store = engine.build_store(net, {"train": train.subset(0, rows),
                                     "test": test_set.subset(0, test)},
                               path, seed=SEED, valid_size=valid, device=device,
                               progress=False)
    return store, t1 - t0, time.perf_counter() - t1


def labels_of(store: engine.Store) -> dict[str, torch.Tensor]:
    """Each split's labels, in the store's split order (the order the engine draws the
    control tasks in)."""
    return {s: torch.from_numpy(store.labels(s)) for s in store.splits}


def codelength_of(boundaries, classes: int, next_losses) -> float:
    return _tasks.mdl_codelength(boundaries, classes, next_losses)["codelength"]


def summed_xent(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    """Summed cross-entropy (nats, float64) of a probe (W (D, C), b (C,)) on rows x, y."""
    z = x.astype(np.float64) @ w.astype(np.float64) + b.astype(np.float64)
    z -= z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].sum())


def mdl_rows(y_train: torch.Tensor, boundaries) -> list[tuple[np.ndarray, np.ndarray]]:
    """(fit rows, next block's rows) masks of each MDL probe: engine._tasks' seeded order."""
    fit, score = _tasks.mdl_tasks(y_train, boundaries, SEED)
    return [(f.labels["train"].numpy() != _tasks.IGNORE,
             s.labels["train"].numpy() != _tasks.IGNORE) for f, s in zip(fit, score, strict=True)]


def _peer_inputs(store: engine.Store, table, classes: int, blocks) -> tuple:
    """What the peers fit, as case 2 did: each layer's chosen lambda, the labels, the
    control tasks, the MDL boundaries and blocks' (fit, next) row masks, the train labels."""
    y = labels_of(store)
    controls = {t.name: t for t in (_tasks.control_task(y, classes, SEED),
                                    _tasks.shuffled_task(y, SEED))}
    boundaries = _tasks.mdl_boundaries(len(y["train"]), blocks)
    return (table.groupby("layer", sort=False).l2.first(), y, controls, boundaries,
            mdl_rows(y["train"], boundaries), y["train"].numpy())


def separate(store: engine.Store, table, classes: int, blocks, device: str) -> dict:
    """Case 3: every fit of case 2 as a separate ``engine.solve`` (the layer's grid; each
    control; each MDL block), timed in total; with each layer's codelength and control
    errors for the cross-check."""
    chosen, y, controls, boundaries, masks, ytr = _peer_inputs(store, table, classes, blocks)
    out: dict = {"codelength": {}, "control_test_error": {}, "same_l2": {}, "solves": 0}
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        # a block's next rows may hold classes its fit rows lack: the peer hears it and goes on
        warnings.simplefilter("ignore", engine.ProbeEngineWarning)
        for layer in store.layers:
            lam = float(chosen[layer])
            grid = engine.solve(store, layers=[layer], run=f"separate-{layer}", l2=GRID,
                                device=device, progress=False)
            out["same_l2"][layer] = float(grid.table.l2.iloc[0]) == lam
            x = {s: store.read(s, layer).astype(np.float32) for s in store.splits}
            errors = {}
            for name in CONTROLS:
                res = engine.solve({s: {layer: x[s]} for s in store.splits},
                                   labels={s: controls[name].labels[s] for s in store.splits},
                                   l2=lam, device=device, progress=False)
                t = res.table.set_index("split")
                errors[name] = float(t.loc["test", "top1_error"])
            losses = []
            for fit_rows, next_rows in masks:
                xs, ys = x["train"][fit_rows], ytr[fit_rows]
                # the probe has every class, as ours (C from the labels: one row of the top
                # class in a "test" split when the block lacks it; it changes no fit)
                pad = ys.max() < classes - 1
                src = {"train": {layer: xs}}
                lab = {"train": ys}
                if pad:
                    src["test"] = {layer: xs[:1]}
                    lab["test"] = np.array([classes - 1])
                res = engine.solve(src, labels=lab, l2=lam, device=device, progress=False)
                w, b = res.weights[layer]
                losses.append(summed_xent(w, b, x["train"][next_rows], ytr[next_rows]))
            out["codelength"][layer] = codelength_of(boundaries, classes, losses)
            out["control_test_error"][layer] = errors
            out["solves"] += 1 + len(CONTROLS) + len(masks)
    out["seconds"] = time.perf_counter() - t0
    return out


def full_blocks(y_train: torch.Tensor, blocks, classes: int) -> tuple[float, ...]:
    """The tail of the schedule ``blocks`` whose every MDL probe is fitted on rows holding
    all ``classes``: where the codelength does not depend on the solver's tolerance (a class
    missing from a probe's rows has an unpenalised bias that only the tolerance stops on its
    way to -inf, and the next block's rows of that class cost -log of what is left)."""
    n = len(y_train)
    for i, f in enumerate(blocks):
        t = min(n, max(1, math.ceil(f * n / 100)))
        if t == n:
            break
        (first,), _ = _tasks.mdl_tasks(y_train, [t, n], SEED)  # the first t rows
        if len(np.unique(first.labels["train"].numpy())) == classes + 1:  # and IGNORE
            return tuple(blocks[i:])
    return ()


def check_codelength(store: engine.Store, classes: int, blocks, tol: float, device: str
                     ) -> dict:
    """The batched MDL probes against one solve per block, untimed, where both are exact:
    float64, a tight ``tol``, lambda ``CHECK_L2`` (at 1e-4 a probe of a few dozen rows of a
    wide layer is nearly separable, and neither way reaches a tight tol in 10,000
    iterations), on the blocks whose probes see every class (:func:`full_blocks`). Returns
    the relative difference of the codelengths per layer and its max."""
    y = labels_of(store)
    tail = full_blocks(y["train"], blocks, classes)
    if len(tail) < 2:
        return {"blocks": list(tail), "max_rel_diff": None}
    exact = dict(l2=CHECK_L2, tol=tol, max_iter=10_000, dtype="float64", device=device,
                 progress=False)
    res = engine.solve(store, run=f"check-{tol:g}", mdl=True, mdl_blocks=tail, **exact)
    t = res.table[res.table.split == "train"].set_index("layer")
    boundaries = _tasks.mdl_boundaries(len(y["train"]), tail)
    ytr = y["train"].numpy()
    rel, converged = {}, True
    for layer in store.layers:
        x = store.read("train", layer).astype(np.float32)
        losses = []
        for fit_rows, next_rows in mdl_rows(y["train"], boundaries):
            r = engine.solve({layer: x[fit_rows]}, labels=ytr[fit_rows], **exact)
            converged &= bool(r.table.converged.all())
            losses.append(summed_xent(*r.weights[layer], x[next_rows], ytr[next_rows]))
        ours = float(t.loc[layer, "codelength"])
        rel[layer] = abs(codelength_of(boundaries, classes, losses) - ours) / ours
    return {"blocks": list(tail), "boundaries": boundaries, "tol": tol, "l2": CHECK_L2,
            "rel_diff": rel, "max_rel_diff": max(rel.values()), "converged": converged}


def sklearn_loop(store: engine.Store, table, classes: int, blocks, max_dim: int | None
                 ) -> dict:
    """Case 4: scikit-learn's ``LogisticRegression`` fitted per control and per MDL block at
    each layer's chosen lambda (``C = 1 / (lambda n)``, lbfgs, ``tol`` 1e-4 as ours), the
    features read from the store beforehand (not timed). Layers wider than ``max_dim``
    are left out."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    chosen, y, controls, boundaries, masks, ytr = _peer_inputs(store, table, classes, blocks)
    layers = [layer for layer in store.layers
              if max_dim is None or store.layer_info(layer)["dim"] <= max_dim]
    out: dict = {"layers": layers, "codelength": {}, "control_test_error": {}, "seconds": 0.0,
                 "fits": 0}

    def fit(x, labels, lam):
        clf = LogisticRegression(C=1.0 / (lam * len(labels)), tol=1e-4, max_iter=500)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(x, labels)
        out["fits"] += 1
        return clf

    for layer in layers:
        lam = float(chosen[layer])
        x = {s: store.read(s, layer).astype(np.float32) for s in store.splits}
        t0 = time.perf_counter()
        errors = {}
        for name in CONTROLS:
            clf = fit(x["train"], controls[name].labels["train"].numpy(), lam)
            errors[name] = float(np.mean(clf.predict(x["test"])
                                         != controls[name].labels["test"].numpy()))
        losses = []
        for fit_rows, next_rows in masks:
            clf = fit(x["train"][fit_rows], ytr[fit_rows], lam)
            # scikit-learn fits the classes present only: the others get probability 0,
            # clipped as log_loss does (not the codelength ours reports for such blocks)
            p = np.full((int(next_rows.sum()), classes), 1e-15)
            p[:, clf.classes_] = np.maximum(clf.predict_proba(x["train"][next_rows]), 1e-15)
            losses.append(float(-np.log(p[np.arange(len(p)), ytr[next_rows]]).sum()))
        out["seconds"] += time.perf_counter() - t0
        out["codelength"][layer] = codelength_of(boundaries, classes, losses)
        out["control_test_error"][layer] = errors
    return out


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rows", type=int,
                    help="train rows incl. valid (default 3,000; quick 600); valid is a "
                         "sixth of them, test a third")
    ap.add_argument("--model", choices=["convnet", "mlp"],
                    help="default convnet (the demo's); quick: mlp")
    ap.add_argument("--fit-rows", type=int,
                    help="images the model is trained on for one epoch (default 12,000; "
                         "quick 2,000; 0: at initialisation)")
    ap.add_argument("--mdl-blocks", type=float, nargs="+",
                    help="MDL schedule, percent of train (default Voita & Titov's; quick "
                         "from 3.2 %%)")
    ap.add_argument("--repeats", type=int, default=1, help="of the plain and baselines "
                    "solves (median)")
    ap.add_argument("--peers", nargs="*", default=["separate", "sklearn"],
                    choices=["separate", "sklearn"])
    ap.add_argument("--sklearn-max-dim", type=int,
                    help="leave layers wider than this out of the scikit-learn loop "
                         "(default: none; quick 1,000)")
    ap.add_argument("--check-tol", type=float, default=1e-6,
                    help="tolerance of the untimed codelength check on the blocks whose "
                         "probes see every class (0: no check)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rows = args.rows or (600 if args.quick else 3000)
    valid, test = max(rows // 6, 2), max(rows // 3, 2)
    model = args.model or ("mlp" if args.quick else "convnet")
    fit_rows = args.fit_rows if args.fit_rows is not None else (2000 if args.quick else 12000)
    blocks = tuple(args.mdl_blocks or (QUICK_BLOCKS if args.quick else _tasks.MDL_FRACTIONS))
    max_dim = args.sklearn_max_dim or (1000 if args.quick else None)
    if "sklearn" in args.peers:
        try:
            import sklearn  # noqa: F401
        except ImportError:
            print("scikit-learn is not installed (pip install -e '.[bench]'): left out")
            args.peers.remove("sklearn")

    kw = dict(l2=GRID, device=args.device, progress=False)
    with tempfile.TemporaryDirectory(prefix="probe-engine-baselines-") as tmp:
        store, train_s, capture_s = demo_store(Path(tmp) / "demo.zarr", model=model, rows=rows,
                                               valid=valid, test=test, fit_rows=fit_rows,
                                               device=args.device)
        classes = store.num_classes()
        dims = {layer: store.layer_info(layer)["dim"] for layer in store.layers}
        n_train = store.rows("train")
        bounds = _tasks.mdl_boundaries(n_train, blocks)
        print(f"{model} trained on {fit_rows:,} images ({train_s:.1f} s), captured in "
              f"{capture_s:.1f} s: {len(dims)} layers (D {min(dims.values())}.."
              f"{max(dims.values())}, sum {sum(dims.values()):,}), train {n_train:,} / valid "
              f"{store.rows('valid'):,} / test {store.rows('test'):,} rows, {classes} classes;"
              f" grid {GRID}; {len(bounds) - 1} MDL blocks {bounds}; torch threads "
              f"{torch.get_num_threads()}", flush=True)
        # warm-up, not timed: the first solve of a process pays for imports and thread pools
        engine.solve(store, layers=store.layers[-1:], run="warmup", controls=CONTROLS,
                     mdl=True, mdl_blocks=blocks, **kw)

        counter = iter(range(10**6))
        plain_s, plain = timed(lambda: engine.solve(store, run=f"plain-{next(counter)}", **kw),
                               args.repeats)
        print(f"plain solve: {plain_s:.2f} s", flush=True)
        ours_s, ours = timed(lambda: engine.solve(
            store, run=f"baselines-{next(counter)}", controls=CONTROLS, mdl=True,
            mdl_blocks=blocks, **kw), args.repeats)
        print(f"ours with baselines: {ours_s:.2f} s, {ours_s / plain_s:.2f}x plain "
              f"(target <= {TARGET})", flush=True)

        # the bootstrap scoring alone, on the plain solve's saved outputs
        records = fmt.saved_probes(fmt.open_root(store.path), "plain-0")
        outputs = {layer: rec["outputs"] for layer, rec in records.items()}
        y_scored = {s: store.labels(s) for s in store.splits}
        score_s, _ = timed(lambda: _scoring.score(outputs, y_scored, classes), 3)
        print(f"bootstrap scoring alone: {score_s:.2f} s ({score_s / plain_s:.1%} of plain)",
              flush=True)

        table = ours.table
        layer_rows = table[table.split == "test"].set_index("layer")
        peers: dict[str, dict] = {}
        if "separate" in args.peers:
            peers["separate"] = separate(store, table, classes, blocks, args.device)
            print(f"one fit at a time: {peers['separate']['seconds']:.2f} s "
                  f"({peers['separate']['solves']} solves), "
                  f"{peers['separate']['seconds'] / plain_s:.2f}x plain", flush=True)
        check = (check_codelength(store, classes, blocks, args.check_tol, args.device)
                 if args.check_tol else None)
        if check and check["max_rel_diff"] is not None:
            print(f"codelength check at tol {args.check_tol:g} on blocks {check['blocks']} "
                  f"(every class in each probe's rows): max relative difference, one solve "
                  f"per block against ours, {check['max_rel_diff']:.1e}", flush=True)
        if "sklearn" in args.peers:  # last: its thread pools share the process afterwards
            peers["sklearn"] = sklearn_loop(store, table, classes, blocks, max_dim)
            print(f"scikit-learn loop (controls + MDL, {len(peers['sklearn']['layers'])} "
                  f"layers): {peers['sklearn']['seconds']:.2f} s ({peers['sklearn']['fits']} "
                  f"fits)", flush=True)

    common = {"model": model, "rows": rows, "train_rows": n_train, "valid_rows": valid,
              "test_rows": test, "fit_rows": fit_rows, "dims": dims, "grid": GRID,
              "mdl_boundaries": bounds, "device": args.device}
    per_layer = {layer: {"dim": dims[layer], "l2": float(layer_rows.loc[layer, "l2"]),
                         "iterations": int(layer_rows.loc[layer, "iterations"]),
                         "test_top1_error": float(layer_rows.loc[layer, "top1_error"]),
                         **{f"{c}_test_top1_error": float(layer_rows.loc[layer,
                                                                         f"{c}_top1_error"])
                            for c in CONTROLS},
                         "codelength": float(layer_rows.loc[layer, "codelength"]),
                         "compression": float(layer_rows.loc[layer, "compression"])}
                 for layer in dims}
    results = [
        {"case": "baselines plain solve (grid, outputs, bootstrap)", **common,
         "seconds": round(plain_s, 3), "ratio": 1.0, "target": None, "kind": "time/plain"},
        {"case": "baselines ours: + controls + MDL, one solve / plain",
         "seconds": round(ours_s, 3), "plain_s": round(plain_s, 3),
         "ratio": round(ours_s / plain_s, 2), "target": TARGET, "kind": "time/plain",
         "added_s": round(ours_s - plain_s, 3), "per_layer": per_layer,
         "codelength_check": check},
        {"case": "baselines bootstrap scoring alone / plain", "seconds": round(score_s, 3),
         "plain_s": round(plain_s, 3), "ratio": round(score_s / plain_s, 3), "target": None,
         "kind": "time/plain"},
    ]
    if "separate" in peers:
        p = peers["separate"]
        rel = {layer: abs(p["codelength"][layer] - per_layer[layer]["codelength"])
               / per_layer[layer]["codelength"] for layer in dims}
        ctrl = max(abs(p["control_test_error"][layer][c]
                       - per_layer[layer][f"{c}_test_top1_error"])
                   for layer in dims for c in CONTROLS)
        print(f"cross-check, one fit at a time against ours: codelength max relative "
              f"difference {max(rel.values()):.1e} (tolerance {CODELENGTH_RTOL:.0e}); control "
              f"test errors max |difference| {ctrl:.4f}; same lambda from each layer's own "
              f"grid: {all(p['same_l2'].values())}", flush=True)
        results.append({
            "case": "baselines one fit at a time / plain", "seconds": round(p["seconds"], 3),
            "plain_s": round(plain_s, 3), "ratio": round(p["seconds"] / plain_s, 2),
            "target": None, "issue_figure": f">= {ISSUE_SEPARATE}x", "kind": "time/plain",
            "solves": p["solves"], "separate_over_ours": round(p["seconds"] / ours_s, 2),
            "codelength_max_rel_diff": max(rel.values()),
            "codelength_rel_diff": rel, "codelength_within_tolerance":
                max(rel.values()) <= CODELENGTH_RTOL,
            "control_test_error_max_abs_diff": ctrl,
            "same_l2_alone": all(p["same_l2"].values())})
    if "sklearn" in peers:
        p = peers["sklearn"]
        results.append({
            "case": "baselines scikit-learn loop (controls + MDL) / plain",
            "seconds": round(p["seconds"], 3), "plain_s": round(plain_s, 3),
            "ratio": round(p["seconds"] / plain_s, 2), "target": None, "kind": "time/plain",
            "layers": p["layers"], "left_out": [layer for layer in dims
                                                if layer not in p["layers"]],
            "fits": p["fits"], "codelength": p["codelength"],
            "control_test_error": p["control_test_error"]})

    print(f"\n{'case':<55} {'seconds':>9} {'x plain':>8}  target")
    for r in results:
        goal = f"<= {r['target']}" if r["target"] else r.get("issue_figure", "")
        print(f"{r['case']:<55} {r['seconds']:9.2f} {r['ratio']:8.2f}  {goal}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "quick": args.quick,
             "torch": torch.__version__, "train_s": round(train_s, 2),
             "capture_s": round(capture_s, 2), "results": results}, indent=2, default=float))
    return results


if __name__ == "__main__":
    main()
