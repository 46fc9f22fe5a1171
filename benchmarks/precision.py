"""Precision benchmark: what bfloat16 products give and cost, side by side with float32.

1. L-BFGS, and why ``dtype="bfloat16"`` is for SGD only. Probes on Fashion-MNIST (the pixels,
   and 1,024 random ReLU features of them), solved in float32 to ``tol``; every iterate's
   float32 gradient is recorded. At the optimum the gradient is evaluated again with
   bfloat16 operands (features, weights, bias and the logits' gradient rounded to bfloat16,
   float32 sums), once with the logits rounded to bfloat16 (torch's bfloat16 GEMM output)
   and once with float32 logits (cuBLAS's bfloat16 GEMM with a float32 output, emulated
   exactly: a product of two bfloat16 numbers is exact in float32). Its error against the
   float64 gradient is the floor below which bfloat16 passes no longer show the way; the
   share of the float32 solve's iterations spent above that floor is the most that
   bfloat16 passes could take over.
2. SGD: ``engine.solve(solver="sgd")`` with float32 and with bfloat16 minibatch products
   on the same data, alternated, best of two each: seconds (ratio) and validation top-1
   error. Class-structured Gaussian features shaped like ImageNet probes (C = 1,000,
   D = 2,048).

    python -m benchmarks.precision [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import engine
from engine import _lbfgs

L2 = 1e-4
TOL = 1e-5


def gradient(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
             mode: str) -> torch.Tensor:
    """(D+1, C) gradient of the probe objective at (w, b), float64 result.

    mode: ``"float64"`` (exact), ``"bf16"`` (bfloat16 operands and logits) or
    ``"bf16-f32-logits"`` (bfloat16 operands, float32 logits and sums).
    """
    n = len(y)
    if mode == "float64":
        xd, wd, bd = x.double(), w.double(), b.double()
        z = torch.addmm(bd, xd, wd)
    else:
        xd, wd, bd = (t.to(torch.bfloat16) for t in (x, w, b))
        z = (torch.addmm(bd, xd, wd).float() if mode == "bf16"
             else torch.addmm(bd.float(), xd.float(), wd.float()))
    dz = torch.softmax(z.to(torch.float64 if mode == "float64" else torch.float32), dim=1)
    dz[torch.arange(n), y] -= 1
    dz /= n
    if mode != "float64":  # the second product's operand is bfloat16 too
        dz = dz.to(torch.bfloat16)
        gw = (xd.T @ dz).float() if mode == "bf16" else xd.float().T @ dz.float()
    else:
        gw = xd.T @ dz
    g = torch.cat([gw.double() + L2 * w.double(), dz.double().sum(0, keepdim=True)])
    return g


def lbfgs_floor(quick: bool) -> list[dict]:
    rows = 3000 if quick else 10_000
    ds = engine.datasets.fashion_mnist("train").subset(0, rows)
    x = torch.stack([ds[i][0] for i in range(rows)]).reshape(rows, -1)
    y = torch.tensor([ds[i][1] for i in range(rows)])
    torch.manual_seed(0)
    layers = {"pixels": x, "relu1024": torch.relu(x @ (torch.randn(784, 1024) / 28))}

    finish = _lbfgs.LBFGSState.finish_iteration
    out = []
    for layer, feats in layers.items():
        path: list[float] = []  # max|grad| after each iteration of the layer's one probe

        def recording(self, point, tol, max_iter, path=path):
            finish(self, point, tol, max_iter)
            path.append(float(self.g.abs().max()))

        _lbfgs.LBFGSState.finish_iteration = recording
        try:
            res = engine.solve({layer: feats.numpy()}, labels=y.numpy(), l2=L2, tol=TOL,
                               max_iter=5000, device="cpu", progress=False)
        finally:
            _lbfgs.LBFGSState.finish_iteration = finish
        w, b = (torch.from_numpy(a) for a in res.weights[layer])
        iters = int(res.table["iterations"].iloc[0])
        assert len(path) == iters, (len(path), iters)
        exact = gradient(w, b, feats, y, "float64")
        row = {"case": f"L-BFGS floor, {layer}", "rows": rows, "dim": feats.shape[1],
               "float32_iterations": iters, "max_grad_at_optimum": float(exact.abs().max())}
        for mode in ("bf16", "bf16-f32-logits"):
            floor = float((gradient(w, b, feats, y, mode) - exact).abs().max())
            above = next((i + 1 for i, g in enumerate(path) if g <= floor), iters)
            row[f"{mode}_floor"] = floor
            row[f"{mode}_share"] = round(above / iters, 3)
        out.append(row)
    return out


def sgd_side_by_side(quick: bool) -> dict:
    c, d, n_train, n_valid = (200, 512, 10_000, 2000) if quick else (1000, 2048, 50_000, 10_000)
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(c, d, generator=gen)
    y = torch.randint(0, c, (n_train + n_valid,), generator=gen)
    # centres 6 noise-sigmas apart whatever d: a few percent validation error
    x = (6 / d**0.5 * centers[y] + torch.randn(n_train + n_valid, d, generator=gen)).numpy()
    feats = {"train": {"h": x[:n_train]}, "valid": {"h": x[n_train:]}}
    labels = {"train": y[:n_train].numpy(), "valid": y[n_train:].numpy()}
    seconds: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    errors = {}
    for dtype in ("float32", "bfloat16") * 2:
        t0 = time.perf_counter()
        res = engine.solve(feats, labels=labels, solver="sgd", l2=L2, epochs=3,
                           dtype=dtype, device="cpu", progress=False)
        seconds[dtype].append(time.perf_counter() - t0)
        errors[dtype] = float(res.error("valid").iloc[0])
    t32, t16 = min(seconds["float32"]), min(seconds["bfloat16"])
    return {"case": f"SGD bfloat16 vs float32 products, C={c}, D={d}", "rows": n_train,
            "float32_s": round(t32, 2), "bfloat16_s": round(t16, 2),
            "speedup": round(t32 / t16, 2), "target": None,
            "float32_valid_error": errors["float32"],
            "bfloat16_valid_error": errors["bfloat16"]}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    results = lbfgs_floor(args.quick)
    for r in results:
        print(r, flush=True)
    results.append(sgd_side_by_side(args.quick))
    print(results[-1], flush=True)
    print(f"\n{'layer':<10} {'f32 iters':>9} {'bf16 floor':>11} {'share':>6} "
          f"{'bf16+f32 logits floor':>22} {'share':>6}")
    for r in results[:-1]:
        print(f"{r['case'].split(', ')[1]:<10} {r['float32_iterations']:>9} "
              f"{r['bf16_floor']:>11.2e} {r['bf16_share']:>6.2f} "
              f"{r['bf16-f32-logits_floor']:>22.2e} {r['bf16-f32-logits_share']:>6.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(), "l2": L2, "tol": TOL,
            "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
