"""Solve benchmark: the batched solver against what users do today, side by side.

1. ``engine.solve`` (all K probes batched, L-BFGS) vs scikit-learn
   ``LogisticRegression(solver="lbfgs")`` fitted layer after layer: same features, same
   lambda (C = 1 / (lambda N)), float32 both. Twice: with the same stopping rule
   (max |grad| <= tol), and with ours held to tol / 10, where it must reach an objective at
   least as low as scikit-learn's on every layer (the fair "same accuracy" comparison: a
   better-preconditioned path can meet a gradient test at a slightly higher objective).
2. ``engine.solve`` vs a naive torch loop: one ``nn.Linear`` and ``torch.optim.LBFGS``
   (strong Wolfe, same tolerance) per layer, one after another.
3. Cost growth: seconds per full pass (loss + gradient of every probe) against the rows N
   and against the total width sum(D_k); log-log slopes near 1 mean linear cost.
4. ``--device cuda``: one full pass over ResNet-50-shaped pooled features (17 layers,
   sum(D) = 15,168, C = 1,000, N = 100,000 rows, random class-structured values) against
   the GEMM floor 4 N sum(D) C FLOP at the matmul rate measured on the same device, in
   float32 and in TF32 (``dtype="tf32"``), each against the torch path (the reference
   instead of the fused kernel) and scikit-learn's pass on the CPU, extrapolated per row.

Features for 1-3: the paper's MNIST convnet (seeded, untrained) at its ten sites on
Fashion-MNIST, ``reduce="auto"``, captured with ``engine.build_store``.

    python -m benchmarks.solve [--quick] [--rows N] [--device cuda] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

import engine
from engine._features import FeatureCache
from engine._sources import ProbeData
from engine.objective import Point, ProbeObjective

L2 = 1e-4
TOL = 1e-4
#: ResNet-50's 17 per-channel-pooled sites: the stem, then each bottleneck's output
RESNET50_WIDTHS = (64,) + (256,) * 3 + (512,) * 4 + (1024,) * 6 + (2048,) * 3


def objective(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray, lam: float) -> float:
    """The probe objective in float64 (docs/design.md section 4)."""
    z = x.astype(np.float64) @ w.astype(np.float64) + b
    z -= z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1))
    penalty = 0.5 * lam * float((w.astype(np.float64) ** 2).sum())
    return float(np.mean(lse - z[np.arange(len(y)), y])) + penalty


def make_store(path: Path, rows: int) -> engine.Store:
    torch.manual_seed(0)
    model = engine.models.mnist_convnet()
    train = engine.datasets.fashion_mnist("train")
    return engine.build_store(model, {"train": train.subset(0, rows)}, path, valid_size=0,
                              progress=False)


def sklearn_layers(store, layers) -> tuple[float, dict]:
    y = store.labels("train")
    n = len(y)
    out, t0 = {}, time.perf_counter()
    for layer in layers:
        x = store.read("train", layer).astype(np.float32)
        clf = LogisticRegression(C=1.0 / (L2 * n), tol=TOL, max_iter=10_000).fit(x, y)
        out[layer] = (clf.coef_.T, clf.intercept_, clf.n_iter_[0])
    return time.perf_counter() - t0, out


def _torch_lbfgs(x: torch.Tensor, y: torch.Tensor, classes: int) -> tuple:
    lin = torch.nn.Linear(x.shape[1], classes)
    torch.nn.init.zeros_(lin.weight), torch.nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=10_000, tolerance_grad=TOL,
                            tolerance_change=1e-12, history_size=10,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(x), y)
        loss = loss + 0.5 * L2 * (lin.weight**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return (lin.weight.detach().T.numpy(), lin.bias.detach().numpy(),
            opt.state[opt._params[0]]["n_iter"])


def torch_loop(store, layers) -> tuple[float, dict]:
    """What a user writes: per layer, nn.Linear + torch.optim.LBFGS on the full batch."""
    y = torch.from_numpy(store.labels("train"))
    out, t0 = {}, time.perf_counter()
    for layer in layers:
        x = torch.from_numpy(store.read("train", layer)).float()
        out[layer] = _torch_lbfgs(x, y, int(y.max()) + 1)
    return time.perf_counter() - t0, out


def pass_seconds(store, layers, rows: int | None = None, repeats: int = 3) -> float:
    """Median seconds of one loss + gradient pass over every probe of ``layers``."""
    data = ProbeData.from_store(store, layers, "y", False)
    if rows is not None:
        data.labels = {"train": data.labels["train"][:rows]}
        reader = data.reader
        data.reader = lambda s, layer, a, b: reader(s, layer, a, min(b, rows))
    objective = ProbeObjective(FeatureCache(data, torch.device("cpu"), torch.float32))
    points = [Point(layer, L2, torch.randn(data.dims[layer] + 1, data.num_classes) * 0.01)
              for layer in layers]
    objective.evaluate("train", points, grad=True)  # loads the features, warms up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        objective.evaluate("train", points, grad=True)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def median_pass(objective: ProbeObjective, points: list[Point], device: torch.device,
                repeats: int = 3) -> float:
    """Median seconds of one loss + gradient pass of ``points`` over train, after a warm-up
    pass (compilation, handles, loading), synchronised on CUDA."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    objective.evaluate("train", points, grad=True)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        objective.evaluate("train", points, grad=True)
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int = 8192) -> float:
    """Measured dense matmul rate (TFLOP/s) of ``device`` for (n, n) @ (n, n)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    t0, reps = time.perf_counter(), 10
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def resnet50_pass(device: torch.device, rows: int, classes: int = 1000, repeats: int = 3,
                  precisions: tuple[str, ...] = ("highest",)) -> list[dict]:
    """Seconds of one full loss + gradient pass over ResNet-50-shaped pooled features
    against the GEMM floor 4 N sum(D) C FLOP at the matmul rate measured on the same device,
    once per float32 matmul precision (``"highest"``: float32; ``"high"``: TF32 on CUDA)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    y = torch.randint(0, classes, (rows,), generator=gen)
    feats = {}
    for k, d in enumerate(RESNET50_WIDTHS):  # class means plus noise, stored as float16
        means = torch.randn(classes, d, generator=gen)
        feats[f"site{k:02d}"] = (means[y] + torch.randn(rows, d, generator=gen)).half()
    data = ProbeData.from_arrays(feats, y.numpy(), None)
    def one_pass(kernel: str) -> float:
        features = FeatureCache(data, device, torch.float32)
        features.load("train", data.layers)
        objective = ProbeObjective(features, kernel=kernel)
        gen = torch.Generator(device="cpu").manual_seed(1)
        points = [Point(layer, L2, (0.01 * torch.randn(data.dims[layer] + 1, classes,
                                                       generator=gen)).to(device))
                  for layer in data.layers]  # random weights: never time on zeros
        return median_pass(objective, points, device, repeats)

    sk_row = sklearn_pass_per_row(classes)
    flop = 4 * rows * sum(RESNET50_WIDTHS) * classes
    results = []
    before = torch.get_float32_matmul_precision()
    for precision in precisions:
        torch.set_float32_matmul_precision(precision)
        try:
            seconds = one_pass("auto")
            torch_path = one_pass("torch") if device.type == "cuda" else seconds
            rate = matmul_tflops(device, torch.float32, 8192 if device.type == "cuda" else 2048)
        finally:
            torch.set_float32_matmul_precision(before)
        matmul = "tf32" if precision != "highest" and device.type == "cuda" else "float32"
        floor = flop / (rate * 1e12)
        results.append({
            "case": f"ResNet-50-shaped pass vs GEMM floor, {matmul}", "device": str(device),
            "matmul": matmul, "rows": rows, "sum_D": sum(RESNET50_WIDTHS),
            "classes": classes, "pass_s": seconds, "floor_s": floor, "matmul_tflops": rate,
            "ratio": round(seconds / floor, 2), "target": 1.5,
            "torch_path_s": torch_path,
            "speedup_vs_torch_path": round(torch_path / seconds, 2),
            "sklearn_cpu_s_extrapolated": None if sk_row is None else sk_row * rows,
            "speedup_vs_sklearn": None if sk_row is None else round(sk_row * rows / seconds, 1)})
    return results


def sklearn_pass_per_row(classes: int, rows: int = 2000) -> float | None:
    """Seconds per row of one loss + gradient pass of scikit-learn's lbfgs objective over
    the 17 ResNet-50 widths on this machine's CPU (its ``LinearModelLoss``, what each of its
    L-BFGS iterations calls), or None without scikit-learn."""
    try:
        from sklearn._loss.loss import HalfMultinomialLoss
        from sklearn.linear_model._linear_loss import LinearModelLoss
    except ImportError:
        return None
    rng = np.random.default_rng(0)
    y = rng.integers(0, classes, rows).astype(np.float32)
    lml = LinearModelLoss(base_loss=HalfMultinomialLoss(n_classes=classes), fit_intercept=True)
    total = 0.0
    for d in RESNET50_WIDTHS:
        x = rng.normal(size=(rows, d)).astype(np.float32)
        coef = 0.01 * rng.normal(size=(classes, d + 1)).astype(np.float32)
        t0 = time.perf_counter()
        lml.loss_gradient(coef, x, y, l2_reg_strength=L2)
        total += time.perf_counter() - t0
    return total / rows


def slope(xs, ts) -> float:
    return float(np.polyfit(np.log(xs), np.log(ts), 1)[0])


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rows", type=int, help="train rows (default 10,000; quick 2,000)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rows = args.rows or (2000 if args.quick else 10_000)
    results = []
    if args.device != "cpu":  # the GPU case; the comparisons with scikit-learn are CPU ones
        results += resnet50_pass(torch.device(args.device), 10_000 if args.quick else 100_000,
                                 precisions=("highest", "high"))
        for r in results:
            print(r, flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"),
                                                   "torch": torch.__version__,
                                                   "results": results}, indent=2))
        return results
    with tempfile.TemporaryDirectory(prefix="probe-engine-solve-") as tmp:
        store = make_store(Path(tmp) / "s.zarr", rows)
        layers = store.layers
        y = store.labels("train")
        t0 = time.perf_counter()
        ours = engine.solve(store, l2=L2, tol=TOL, max_iter=10_000, run="bench",
                            device="cpu", progress=False)
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        tight = engine.solve(store, l2=L2, tol=TOL / 10, max_iter=10_000, run="bench-tight",
                             device="cpu", progress=False)
        t_tight = time.perf_counter() - t0
        t_sk, sk = sklearn_layers(store, layers)
        t_torch, naive = torch_loop(store, layers)
        gap = {}
        for layer in layers:
            x = store.read("train", layer)
            f_sk = objective(*sk[layer][:2], x, y, L2)
            gap[layer] = {"ours": objective(*ours.weights[layer], x, y, L2),
                          "ours_tight": objective(*tight.weights[layer], x, y, L2),
                          "sklearn": f_sk, "torch_loop": objective(*naive[layer][:2], x, y, L2),
                          "ours_iters": int(ours.table.query("layer == @layer")
                                            ["iterations"].iloc[0]),
                          "sklearn_iters": int(sk[layer][2]),
                          "torch_iters": int(naive[layer][2])}
        not_lower = [layer for layer, g in gap.items() if g["ours_tight"] > g["sklearn"]]
        sum_d = sum(store.layer_info(layer)["dim"] for layer in layers)
        common = {"rows": len(y), "sum_D": sum_d}
        results.append({"case": f"batched vs sklearn, {len(layers)} layers, same tol",
                        **common, "ours_s": round(t_ours, 2), "peer_s": round(t_sk, 2),
                        "speedup": round(t_sk / t_ours, 2), "target": 3.0})
        results.append({"case": f"batched at tol/10 vs sklearn at tol, {len(layers)} layers",
                        **common, "ours_s": round(t_tight, 2), "peer_s": round(t_sk, 2),
                        "speedup": round(t_sk / t_tight, 2), "target": 3.0,
                        "layers_not_lower": not_lower})
        results.append({"case": f"batched vs torch loop, {len(layers)} layers", **common,
                        "ours_s": round(t_ours, 2), "peer_s": round(t_torch, 2),
                        "speedup": round(t_torch / t_ours, 2), "target": None})
        ns = [rows // 8, rows // 4, rows // 2, rows]
        tn = [pass_seconds(store, layers, n) for n in ns]
        by_width = sorted(layers, key=lambda layer: store.layer_info(layer)["dim"])
        subsets = [by_width[:k] for k in (4, 6, 8, 10)]
        ds = [sum(store.layer_info(layer)["dim"] for layer in sub) for sub in subsets]
        td = [pass_seconds(store, sub) for sub in subsets]
        results.append({"case": "pass time vs rows", "x": ns, "seconds": tn,
                        "slope": round(slope(ns, tn), 2), "target": "about 1"})
        results.append({"case": "pass time vs sum(D)", "x": ds, "seconds": td,
                        "slope": round(slope(ds, td), 2), "target": "about 1"})
        for r in results:
            print({k: v for k, v in r.items()}, flush=True)
        print("objectives per layer (ours / ours at tol/10 / sklearn / torch loop):")
        for layer, g in gap.items():
            print(f"  {layer:<16} {g['ours']:.6f} {g['ours_tight']:.6f} {g['sklearn']:.6f} "
                  f"{g['torch_loop']:.6f}  iterations: ours {g['ours_iters']}, sklearn "
                  f"{g['sklearn_iters']}, torch {g['torch_iters']}")
    report = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "rows": rows,
              "l2": L2, "tol": TOL, "results": results, "objectives": gap}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return results


if __name__ == "__main__":
    main()
