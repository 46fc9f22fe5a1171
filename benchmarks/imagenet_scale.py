"""ImageNet-scale head-to-head: probes on ResNet-50-shaped penultimate features (1,000
classes, D = 2,048) under the DINOv2 linear-eval protocol, ours against what people use.

Protocol (DINOv2's logistic-regression evaluation): fit every lambda of a grid on train,
keep the one with the lowest top-1 error on a held-out split (a tenth of train's size), refit
on train + held-out at that lambda, report test top-1 error. Every solver runs the whole
protocol on the same float16 features, read from one store built by ``engine.build_store``,
at the same objective: mean softmax cross-entropy + lambda / 2 ||W||^2, bias unpenalised
(scikit-learn's C = 1 / (lambda N), cyanure's lambda_1 = lambda). Each solver's objective,
at every lambda and at the refit, must be within ``REL_GAP`` of the lowest any solver reached
(``same_objective`` says whether it is).

Side by side, one after another in one process, each timed for the whole protocol:

- ours: ``engine.solve(store, l2=GRID, refit=True)`` (every lambda batched, L-BFGS, then
  the refit), the protocol in one call;
- a torch L-BFGS loop: ``nn.Linear`` + ``torch.optim.LBFGS`` (strong Wolfe) per lambda;
- scikit-learn ``LogisticRegression``: ``lbfgs``, and ``newton-cg``, its other multinomial
  solver that fits here (``newton-cholesky`` would build the (D + 1) C = 2.05M-square
  Hessian; ``sag`` / ``saga`` need ~N epochs per digit at these lambdas);
- cyanure's ``Classifier`` (``multiclass-logistic``, its default solver; optional, the
  ``bench`` extra), to a relative duality gap of ``REL_GAP`` or ``CYANURE_EPOCHS`` epochs.

Then ours alone:

- out-of-core: one pass (loss + gradient of every lambda's probe) with train streamed from
  the store (``max_memory`` half of its float16 bytes) against the same pass resident, and
  the grid solved streamed against resident;
- cost slopes: seconds per pass at N/4, N/2, N rows and at D/4, D/2, D features (log-log);
- extrapolation to ImageNet's 1,281,167 train rows: each solver's protocol time times
  1,281,167 / N. Linear, because a pass is GEMMs of N rows (a measured slope below 1 is the
  fixed cost of small passes, which fades), and the number of passes is assumed not to grow
  with N (the conditioning sets it): an estimate, printed as one.

``--device cuda``: ours and the torch loop on the GPU; scikit-learn and cyanure on the CPU on
``--peer-rows`` rows, their times scaled linearly to N (flagged ``extrapolated``; no
objective comparison for those).

``--quick`` (2,000 rows, two lambdas, scikit-learn's lbfgs and the torch loop): about two
minutes on two cores.

    python -m benchmarks.imagenet_scale [--quick] [--rows N] [--device cuda] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

import engine
from engine._features import FeatureCache
from engine._sources import ProbeData
from engine.objective import Point, ProbeObjective

from .solve import median_pass, objective, slope

CLASSES = 1000
WIDTH = 2048
IMAGENET_ROWS = 1_281_167
#: lambdas of the protocol's grid (DINOv2 sweeps 45 values of C; these span its useful part
#: for a few rows per class)
GRID = (1e-4, 1e-3, 1e-2, 1e-1)
QUICK_GRID = (1e-3, 1e-2)
#: the peers, in the order they run (whatever the order asked): torch's before the others'
#: thread pools have run in this process (see main)
PEERS = ("torch-lbfgs", "sklearn-lbfgs", "sklearn-newton-cg", "cyanure")
#: every gradient-based solver stops at max |grad| <= TOL (scikit-learn's lbfgs rule). At
#: 1e-5 the rule let objectives stop 1e-4 to 1e-3 (relative) apart at lambda 1e-3 (flat
#: directions of curvature lambda: a gap of about |g|^2 / (2 lambda) per coordinate)
TOL = 1e-6
#: a solver is "at the same objective" when within this relative gap of the lowest found
REL_GAP = 1e-4
#: cyanure stops at a relative duality gap, which bounds its objective's relative gap: the
#: same tolerance. Its incremental solvers update the whole (D, C) matrix per row, so an
#: epoch costs what ~50 of our passes do at C = 1,000 (4 s at 2,000 rows here): it gets a
#: fixed number of epochs, and its speed-up is a lower bound when it stops short of the
#: objective (``speedup_is_lower_bound``)
CYANURE_TOL = REL_GAP
CYANURE_EPOCHS = 5
LAYER = "penultimate"

Fit = Callable[[np.ndarray, np.ndarray, float], tuple[np.ndarray, np.ndarray]]


def features(rows: int, d: int = WIDTH, classes: int = CLASSES, seed: int = 0
             ) -> dict[str, TensorDataset]:
    """Class-structured, nonnegative features like a ResNet's pooled penultimate layer:
    relu(class mean + noise), train ``rows``, valid ``rows // 10`` (the held-out split),
    test ``rows // 5``; classes balanced, so train holds every class when ``rows >=
    classes``."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, d, generator=gen) * 0.25

    def split(n: int) -> TensorDataset:
        y = torch.randperm(n, generator=gen) % classes
        return TensorDataset(torch.relu(means[y] + torch.randn(n, d, generator=gen)), y)

    return {"train": split(rows), "valid": split(max(rows // 10, 1)),
            "test": split(max(rows // 5, 1))}


def make_store(path: Path, data: dict[str, TensorDataset]) -> engine.Store:
    """The features in a float16 store written by ``engine.build_store`` (one layer), in
    chunks of about a sixteenth of train, so that a budget below its size can stream it."""
    class Penultimate(nn.Module):
        def forward(self, x):
            return x

    width = data["train"][0][0].shape[0]
    model = nn.Sequential()
    model.add_module(LAYER, Penultimate())
    return engine.build_store(model, data, path, layers=[LAYER], reduce="none",
                              dtype="float16", batch_size=16,
                              block_bytes=len(data["train"]) // 16 * width * 2,
                              progress=False)


# -- the peers: each fits one lambda on (N, D) float32 x, returns (W (D, C), b (C,)) ---------

def sklearn_fit(solver: str) -> Fit:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    def fit(x, y, lam):
        clf = LogisticRegression(C=1.0 / (lam * len(y)), solver=solver, tol=TOL,
                                 max_iter=10_000)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # the objective gap tells
            warnings.filterwarnings("ignore", "The number of unique classes")  # few per class
            clf.fit(x, y)
        return clf.coef_.T.astype(np.float32), clf.intercept_.astype(np.float32)
    return fit


def cyanure_fit(x, y, lam):
    from cyanure.estimators import Classifier
    from sklearn.exceptions import ConvergenceWarning

    clf = Classifier(loss="multiclass-logistic", penalty="l2", lambda_1=lam,
                     fit_intercept=True, tol=CYANURE_TOL, max_iter=CYANURE_EPOCHS,
                     verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # the objective gap tells
        clf.fit(x, y)
    return (np.asarray(clf.coef_, np.float32).reshape(x.shape[1], -1),
            np.asarray(clf.intercept_, np.float32))


def torch_fit(device: torch.device, classes: int) -> Fit:
    """What a user writes: nn.Linear + torch.optim.LBFGS on the full batch, one lambda at a
    time, stopping at max |grad| <= TOL."""
    def fit(x, y, lam):
        xt = torch.from_numpy(x).to(device)
        yt = torch.from_numpy(y).to(device)
        lin = nn.Linear(x.shape[1], classes, device=device)
        nn.init.zeros_(lin.weight), nn.init.zeros_(lin.bias)
        opt = torch.optim.LBFGS(lin.parameters(), max_iter=10_000, tolerance_grad=TOL,
                                tolerance_change=1e-12, history_size=10,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(lin(xt), yt) + 0.5 * lam * (lin.weight**2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return lin.weight.detach().T.cpu().numpy(), lin.bias.detach().cpu().numpy()
    return fit


def top1(w, b, x, y) -> float:
    return float(np.mean(np.argmax(x @ w + b, axis=1) != y))


def choice(w, b, x, y, lam) -> tuple:
    """engine.solve's rule for the kept lambda: lowest held-out top-1 error, then mean
    cross-entropy, then the larger lambda."""
    return top1(w, b, x, y), objective(w, b, x, y, 0.0), -lam


def protocol(fit: Fit, arrays: dict, grid) -> dict:
    """The DINOv2 protocol with one peer: every lambda on train, the best on valid
    (:func:`choice`), refit on train + valid; seconds for all of it."""
    (xtr, ytr), (xva, yva) = arrays["train"], arrays["valid"]
    xall, yall = arrays["train+valid"]
    t0 = time.perf_counter()
    fits = {lam: fit(xtr, ytr, lam) for lam in grid}
    best = min(grid, key=lambda lam: choice(*fits[lam], xva, yva, lam))
    refit = fit(xall, yall, best)
    return {"seconds": time.perf_counter() - t0, "fits": fits, "best": best, "refit": refit}


def ours(store: engine.Store, grid, device: str, max_memory: int | None = None) -> dict:
    """The protocol as one ``engine.solve(..., refit=True)`` of the store: every lambda
    batched, the one chosen on valid, the refit on train + valid (the solve's result)."""
    run = f"grid-{time.perf_counter_ns()}"
    t0 = time.perf_counter()
    res = engine.solve(store, l2=list(grid), tol=TOL, max_iter=10_000, device=device,
                       run=run, max_memory=max_memory, refit=True, progress=False)
    seconds = time.perf_counter() - t0
    grid_rows = res.grid.set_index("l2")
    return {"seconds": seconds, "best": float(res.table.l2.iloc[0]),
            "objectives": {float(lam): float(grid_rows.loc[lam, "objective"]) for lam in grid},
            "iterations": {float(lam): int(grid_rows.loc[lam, "iterations"]) for lam in grid},
            "refit": res.weights[LAYER], "features": res.backends[LAYER]["features"]}


def pass_seconds(x: np.ndarray, y: np.ndarray, grid, device: torch.device,
                 budget: int | None = None, store: engine.Store | None = None,
                 repeats: int = 3) -> tuple[float, str]:
    """Median seconds of one loss + gradient pass of every lambda's probe over train (``x``
    in memory, or ``store``'s train split), and where the features were."""
    data = (ProbeData.from_store(store, [LAYER], "y", False) if store is not None else
            ProbeData.from_arrays({LAYER: x}, y, None))
    cache = FeatureCache(data, device, torch.float32, budget=budget)
    cache.load("train", [LAYER])
    obj = ProbeObjective(cache)
    gen = torch.Generator().manual_seed(1)
    points = [Point(LAYER, lam, (0.01 * torch.randn(data.dims[LAYER] + 1, data.num_classes,
                                                    generator=gen)).to(device))
              for lam in grid]  # random weights: never time on zeros
    return median_pass(obj, points, device, repeats), obj.placement(LAYER)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rows", type=int, help="train rows (default 8,000; quick 2,000)")
    ap.add_argument("--width", type=int, default=WIDTH)
    ap.add_argument("--classes", type=int, default=CLASSES)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--peer-rows", type=int,
                    help="rows for the CPU peers with --device cuda (default 4,000)")
    ap.add_argument("--peers", nargs="*", choices=PEERS, default=list(PEERS))
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    args.peers = sorted(set(args.peers), key=PEERS.index)
    rows = args.rows or (2000 if args.quick else 8000)
    grid = QUICK_GRID if args.quick else GRID
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    peer_rows = min(args.peer_rows or 4000, rows) if gpu else rows
    if min(rows, peer_rows) < args.classes:
        ap.error(f"--rows and --peer-rows must be at least --classes ({args.classes}): every "
                 f"class in train, as every solver here assumes")
    if args.quick:  # one scikit-learn solver, and no cyanure (4 s an epoch at 2,000 rows)
        args.peers = [p for p in args.peers if p not in ("sklearn-newton-cg", "cyanure")]
    try:
        import cyanure  # noqa: F401
    except ImportError:
        if "cyanure" in args.peers:
            print("cyanure is not installed (pip install -e '.[bench]'): left out")
            args.peers.remove("cyanure")

    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="probe-engine-imagenet-") as tmp:
        data = features(rows, args.width, args.classes)
        store = make_store(Path(tmp) / "s.zarr", data)
        del data
        t0 = time.perf_counter()
        arrays = {s: (store.read(s, LAYER).astype(np.float32), store.labels(s))
                  for s in ("train", "valid", "test")}
        load_s = time.perf_counter() - t0
        arrays["train+valid"] = tuple(np.concatenate(p) for p in
                                      zip(arrays["train"], arrays["valid"], strict=True))
        xtr, ytr = arrays["train"]
        print(f"{rows:,} train rows x {args.width:,} features x {args.classes:,} classes, "
              f"float16 store {xtr.nbytes / 2**21:,.0f} MiB of train; grid {list(grid)}; "
              f"peers read it in {load_s:.1f} s (not timed)", flush=True)

        solved = {"ours": ours(store, grid, args.device)}
        print(f"ours: {solved['ours']['seconds']:.1f} s (iterations "
              f"{solved['ours']['iterations']}, features {solved['ours']['features']})",
              flush=True)
        # Everything of ours runs before the peers, and the torch loop before scikit-learn
        # and cyanure: once those have run their thread pools in this process, MKL's
        # threaded QR (the preconditioner's) was seen to spin without end (sched_yield in
        # mkl_lapack_sgeqrf; two OpenMP runtimes), and after a cyanure fit the torch loop
        # ran 1.9x slower (2.6 -> 4.9 s at 2,000 rows; scikit-learn leaves it as it was).
        # cost slopes of ours, then the out-of-core pass against the resident one
        ns = [rows // 4, rows // 2, rows]
        tn = [pass_seconds(xtr[:n], ytr[:n], grid, device)[0] for n in ns]
        ds = [args.width // 4, args.width // 2, args.width]
        td = [pass_seconds(np.ascontiguousarray(xtr[:, :d]), ytr, grid, device)[0]
              for d in ds]
        s_rows, s_width = slope(ns, tn), slope(ds, td)
        budget = xtr.nbytes // 4  # half of train's float16 features: they stream
        t_res, where_res = pass_seconds(None, None, grid, device, store=store)
        t_ooc, where_ooc = pass_seconds(None, None, grid, device, budget=budget, store=store)
        t0 = time.perf_counter()
        streamed = ours(store, grid, args.device, max_memory=budget)
        t_streamed = time.perf_counter() - t0
        print(f"ours, train streamed within {budget / 2**20:.0f} MiB: {t_streamed:.1f} s; one "
              f"pass {t_ooc:.3f} s streamed ({where_ooc}), {t_res:.3f} s resident "
              f"({where_res}): {t_ooc / t_res:.2f}x; slopes rows {s_rows:.2f}, features "
              f"{s_width:.2f}", flush=True)

        # the CPU peers of a GPU run see the first peer_rows rows of each split
        small = arrays if peer_rows == rows else _first(arrays, peer_rows)
        peers = {"sklearn-lbfgs": (sklearn_fit("lbfgs"), small),
                 "sklearn-newton-cg": (sklearn_fit("newton-cg"), small),
                 "cyanure": (cyanure_fit, small),
                 "torch-lbfgs": (torch_fit(device, args.classes), arrays)}
        for name in args.peers:
            fit, on = peers[name]
            solved[name] = protocol(fit, on, grid)
            solved[name]["rows"] = len(on["train"][1])
            print(f"{name}: {solved[name]['seconds']:.1f} s on {solved[name]['rows']:,} rows",
                  flush=True)

        # the objective of every solver at every lambda, in float64 (ours: its own float32
        # sums; its result is the refit, recomputed here as every refit is)
        xall, yall = arrays["train+valid"]
        objectives = {"ours": dict(solved["ours"]["objectives"])}
        refit_obj = {"ours": objective(*solved["ours"]["refit"], xall, yall,
                                       solved["ours"]["best"])}
        for name in args.peers:
            if solved[name]["rows"] != rows:
                continue
            objectives[name] = {lam: objective(*wb, xtr, ytr, lam)
                                for lam, wb in solved[name]["fits"].items()}
            if solved[name]["best"] == solved["ours"]["best"]:
                refit_obj[name] = objective(*solved[name]["refit"], xall, yall,
                                            solved[name]["best"])
        lowest = {lam: min(o[lam] for o in objectives.values()) for lam in grid}
        lowest_refit = min(refit_obj.values())
        gaps = {name: max([(o[lam] - lowest[lam]) / abs(lowest[lam]) for lam in grid] +
                          ([(refit_obj[name] - lowest_refit) / abs(lowest_refit)]
                           if name in refit_obj else []))
                for name, o in objectives.items()}

        print("objectives (float64; ours on train: its float32 sums):")
        for name, o in objectives.items():
            print(f"  {name:<18} " + " ".join(f"{o[lam]:.7f}" for lam in grid)
                  + (f"  refit {refit_obj[name]:.7f}" if name in refit_obj else ""))

    test_x, test_y = arrays["test"]
    common = {"rows": rows, "width": args.width, "classes": args.classes,
              "grid": list(grid), "tol": TOL, "device": str(device)}
    mine = solved["ours"]
    scale = IMAGENET_ROWS / rows
    results.append({"case": "ours: DINOv2 protocol", **common,
                    "seconds": round(mine["seconds"], 2), "best_l2": mine["best"],
                    "test_top1": top1(*mine["refit"], test_x, test_y),
                    "objective_gap": gaps["ours"],
                    f"extrapolated_s_at_{IMAGENET_ROWS}": round(mine["seconds"] * scale)})
    for name in args.peers:
        p = solved[name]
        peer_s = p["seconds"] * rows / p["rows"]
        same = gaps[name] <= REL_GAP if name in gaps else None
        results.append({
            "case": f"ours vs {name}", **common, "ours_s": round(mine["seconds"], 2),
            "peer_s": round(peer_s, 2), "peer_rows": p["rows"],
            "extrapolated": p["rows"] != rows, "speedup": round(peer_s / mine["seconds"], 2),
            "target": 10.0 if name.startswith("sklearn") else 1.0, "peer_best_l2": p["best"],
            "peer_test_top1": top1(*p["refit"], *_first(arrays, p["rows"])["test"]),
            "objective_gap": gaps.get(name), "same_objective": same,
            "speedup_is_lower_bound": same is False and peer_s > mine["seconds"],
            f"peer_extrapolated_s_at_{IMAGENET_ROWS}": round(peer_s * scale)})
    results.append({"case": "out-of-core pass / in-memory pass", **common,
                    "streamed_s": t_ooc, "resident_s": t_res, "budget_bytes": budget,
                    "features": [where_ooc, where_res], "ratio": round(t_ooc / t_res, 2),
                    "target": 1.5})
    results.append({"case": "out-of-core protocol / in-memory protocol", **common,
                    "streamed_s": round(t_streamed, 2), "resident_s": round(mine["seconds"], 2),
                    "features": streamed["features"], "same_l2": streamed["best"] == mine["best"],
                    "ratio": round(t_streamed / mine["seconds"], 2), "target": None})
    results.append({"case": "pass time vs rows", **common, "x": ns, "seconds": tn,
                    "slope": round(s_rows, 2), "target": "about 1"})
    results.append({"case": "pass time vs features", **common, "x": ds, "seconds": td,
                    "slope": round(s_width, 2), "target": "about 1"})
    for r in results:
        print(r, flush=True)
    best_sk = [r for r in results if r["case"].startswith("ours vs sklearn")]
    if best_sk:
        fastest = min(best_sk, key=lambda r: r["peer_s"])
        print(f"fastest scikit-learn solver: {fastest['case'][8:]}, "
              f"{fastest['speedup']}x slower than ours (target 10x)")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
             "results": results}, indent=2, default=float))
    return results


def _first(arrays: dict, n: int) -> dict:
    out = {}
    for split, (x, y) in arrays.items():
        k = n if split == "train" else max(n * len(y) // len(arrays["train"][1]), 1)
        out[split] = (x[:k], y[:k])
    return out


if __name__ == "__main__":
    main()
