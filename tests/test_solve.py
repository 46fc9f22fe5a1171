"""engine.solve: the optimum against scikit-learn, batching, the gradient, lambda selection,
results in the store, resume, and bad input.

The objective of one probe (docs/design.md, section 4)::

    L(W, b) = (1/N) sum_i CE(softmax(X_i W + b), y_i) + (lambda / 2) ||W||_F^2

is scikit-learn's ``LogisticRegression(C=1/(lambda N))`` for more than two classes. With two,
scikit-learn fits one weight vector w (binomial); at our optimum W[:, 0] = -W[:, 1], so
w = W[:, 1] - W[:, 0] and our penalty (lambda/2)(|w0|^2 + |w1|^2) is (lambda/4)|w|^2: our
minimum is scikit-learn's binomial minimum at C = 1/((lambda/2) N).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import zarr
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, f1_score
from threadpoolctl import threadpool_limits
from torch import nn

import engine
from engine import _fit
from engine._features import FeatureCache, width_groups
from engine._sources import ProbeData
from engine.kernels.reference import softmax_xent as reference_softmax_xent
from engine.objective import Point, ProbeObjective
from engine.options import DEFAULT_L2_GRID, SolveOptions

COLUMNS = ["layer", "split", "site", "dim", "reduction", "l2", "iterations", "converged",
           "loss", "top1_error", "top5_error", "seconds"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These problems are tiny: one thread each for torch and BLAS keeps them fast and
    steady on a busy two-core machine (spinning thread pools lose badly when oversubscribed)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


def solve(source, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("device", "cpu")
    return engine.solve(source, **kw)


def blobs(n: int, d: int, c: int, *, seed: int, noise: float = 1.0, dtype=np.float32):
    """Every class present (n >= c), in random order; Gaussian clusters around random means."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % c)
    centres = rng.normal(size=(c, d))
    x = centres[y] + noise * rng.normal(size=(n, d))
    return x.astype(dtype), y


def objective(x, y, w, b, lam: float) -> float:
    """Our per-probe objective in float64."""
    x, w, b = (np.asarray(a, dtype=np.float64) for a in (x, w, b))
    z = x @ w + b
    m = z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z - m).sum(axis=1)) + m[:, 0]
    return float(np.mean(lse - z[np.arange(len(y)), y]) + 0.5 * lam * np.sum(w * w))


def sklearn_fit(x, y, c_inverse: float) -> LogisticRegression:
    clf = LogisticRegression(C=c_inverse, solver="lbfgs", tol=1e-10, max_iter=10000)
    return clf.fit(np.asarray(x, dtype=np.float64), y)


def assert_matches_sklearn(x, y, w, b, lam: float) -> None:
    """Objective within 1e-5 relative of scikit-learn's optimum, and the same predictions."""
    assert len(np.unique(y)) > 2
    clf = sklearn_fit(x, y, 1.0 / (lam * len(y)))
    ref = objective(x, y, clf.coef_.T, clf.intercept_, lam)
    ours = objective(x, y, w, b, lam)
    assert abs(ours - ref) <= 1e-5 * abs(ref), (ours, ref)
    pred = (np.asarray(x, dtype=np.float64) @ w.astype(np.float64) + b).argmax(axis=1)
    agree = np.mean(clf.classes_[pred] == clf.predict(np.asarray(x, dtype=np.float64)))
    assert agree >= 0.999, agree


def files_outside_probes(path) -> dict:
    """relative path -> (mtime, size, digest) of every file of the store but probes/."""
    out = {}
    for root, _, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, path)
            if rel.split(os.sep)[0] == "probes":
                continue
            st = os.stat(full)
            with open(full, "rb") as f:
                out[rel] = (st.st_mtime_ns, st.st_size, hashlib.sha1(f.read()).hexdigest())
    return out


def without_seconds(table: pd.DataFrame) -> pd.DataFrame:
    return table.drop(columns=["seconds"]).reset_index(drop=True)


# -- a small real store ------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_store(tmp_path_factory, fashion):
    """float16 features of a tiny MLP on 800 Fashion-MNIST rows: layers "1" (linear, 20),
    "2" (ReLU, 20), "3" (linear, 10); splits train 540 / valid 60 / test 200; labels "y"
    (10 classes) and "coarse" (y // 3: 4 classes)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 20), nn.ReLU(), nn.Linear(20, 10))
    return engine.build_store(model, fashion, tmp_path_factory.mktemp("base") / "s.zarr",
                              layers=["1", "2", "3"], dtype="float16",
                              labels={"coarse": lambda y: y // 3}, progress=False)


@pytest.fixture
def store(base_store, tmp_path):
    """A fresh copy of the base store (solves write probes/ into it)."""
    path = tmp_path / "s.zarr"
    shutil.copytree(base_store.path, path)
    return engine.open_store(path)


def test_base_store_is_what_the_tests_assume(base_store):
    assert base_store.layers == ["1", "2", "3"]
    assert base_store.splits == ["train", "valid", "test"]
    assert base_store.dtype == "float16" and base_store.complete
    assert base_store.num_classes() == 10
    assert len(np.unique(base_store.labels("train"))) == 10


# -- 1. the optimum is scikit-learn's ------------------------------------------------------
@pytest.mark.parametrize(("n", "d", "c", "lam", "noise"), [
    (1500, 24, 7, 1e-3, 1.5),
    (800, 50, 10, 1e-2, 2.0),
])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_multiclass_matches_sklearn(n, d, c, lam, noise, dtype):
    x, y = blobs(n, d, c, seed=c, noise=noise)
    res = solve({"a": x}, labels=y, l2=lam, tol=1e-6, dtype=dtype)
    w, b = res.weights["a"]
    assert w.shape == (d, c) and b.shape == (c,)
    assert w.dtype == np.float32 and b.dtype == np.float32
    if dtype == "float64":
        assert res.table.converged.all()
    else:  # tol=1e-6 is at float32's limit: it may stop there, on the same optimum
        assert res.table.converged.all() or res.table.iterations.iloc[0] < 500
    assert_matches_sklearn(x, y, w, b, lam)


def test_two_classes_match_sklearn_binomial_at_half_lambda():
    x, y = blobs(1200, 12, 2, seed=2, noise=2.0)
    lam, n, d = 1e-2, len(y), x.shape[1]
    x64 = x.astype(np.float64)
    res = solve({"a": x}, labels=y, l2=lam, tol=1e-6)
    w, b = res.weights["a"]
    ours = objective(x, y, w, b, lam)

    clf = sklearn_fit(x, y, 1.0 / ((lam / 2) * n))
    v, c0 = clf.coef_[0], clf.intercept_[0]
    assert clf.coef_.shape == (1, d)  # binomial: one weight vector
    s = 2.0 * y - 1.0
    binomial = float(np.mean(np.logaddexp(0.0, -s * (x64 @ v + c0))) + lam / 4 * v @ v)
    # the same point in our parametrisation has exactly that objective ...
    mapped = objective(x, y, np.stack([-v / 2, v / 2], axis=1), np.array([-c0 / 2, c0 / 2]), lam)
    assert mapped == pytest.approx(binomial, rel=1e-12)
    # ... and an independent float64 minimisation of our softmax objective reaches it too
    xt, yt = torch.from_numpy(x64), torch.from_numpy(y)
    theta = torch.zeros(d + 1, 2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=1000, tolerance_grad=1e-12,
                            tolerance_change=1e-15, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        f = (F.cross_entropy(xt @ theta[:d] + theta[d], yt)
             + lam / 2 * (theta[:d] ** 2).sum())
        f.backward()
        return f

    opt.step(closure)
    reference = objective(x, y, theta[:d].detach().numpy(), theta[d].detach().numpy(), lam)
    assert reference == pytest.approx(binomial, rel=1e-9)

    assert abs(ours - binomial) <= 1e-5 * binomial, (ours, binomial)
    # the optimum is antisymmetric, and its difference is scikit-learn's w
    np.testing.assert_allclose(w.sum(axis=1), 0.0, atol=1e-4)
    np.testing.assert_allclose(w[:, 1] - w[:, 0], v, rtol=1e-3, atol=1e-3)
    pred_ours = (x64 @ w.astype(np.float64) + b).argmax(axis=1)
    pred_sklearn = (x64 @ v + c0 > 0).astype(int)
    assert np.mean(pred_ours == pred_sklearn) >= 0.999


def test_a_thousand_classes_match_sklearn():
    x, y = blobs(2000, 8, 1000, seed=0, noise=0.3)
    assert len(np.unique(y)) == 1000  # scikit-learn sees the same 1000 classes
    lam = 1e-3
    res = solve({"a": x}, labels=y, l2=lam, tol=1e-6)
    w, b = res.weights["a"]
    assert w.shape == (8, 1000)
    assert_matches_sklearn(x, y, w, b, lam)


def test_float16_store_matches_sklearn(store):
    lam = 1e-3
    res = solve(store, layers=["1"], l2=lam, tol=1e-6)
    x = store.read("train", "1")
    assert x.dtype == np.float16
    w, b = res.weights["1"]
    assert_matches_sklearn(x.astype(np.float64), store.labels("train"), w, b, lam)


# -- 2. batching -------------------------------------------------------------------------
def test_layers_solved_together_equal_layers_solved_alone():
    rng = np.random.default_rng(5)
    y = rng.permutation(np.arange(600) % 6)
    xs = {name: (rng.normal(size=(6, d))[y] + rng.normal(size=(600, d))).astype(np.float32)
          for name, d in (("a", 5), ("b", 17), ("c", 30))}
    lam = 1e-2
    together = solve(xs, labels=y, l2=lam, tol=1e-6)
    assert list(together.weights) == ["a", "b", "c"]
    for name, x in xs.items():
        alone = solve({name: x}, labels=y, l2=lam, tol=1e-6)
        (w1, b1), (w2, b2) = together.weights[name], alone.weights[name]
        np.testing.assert_allclose(w1, w2, rtol=1e-3, atol=1e-5)
        np.testing.assert_allclose(b1, b2, rtol=1e-3, atol=1e-5)
        f1, f2 = objective(x, y, w1, b1, lam), objective(x, y, w2, b2, lam)
        assert f1 == pytest.approx(f2, rel=1e-6)


def _same_width_problem(seed=7):
    """Four layers, three of width 12 (stacked together when grouping) and one of 5."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(500) % 4)
    xs = {name: (rng.normal(size=(4, d))[y] + scale * rng.normal(size=(500, d)))
          .astype(np.float32) for name, d, scale in
          (("p", 12, 1.0), ("q", 12, 2.0), ("r", 5, 1.0), ("s", 12, 0.5))}
    return xs, y


def _cache(xs, y, group):
    """The features of ``xs`` on the CPU in float32, stacked by width with ``group``."""
    data = ProbeData.from_arrays(xs, y, None)
    cache = FeatureCache(data, torch.device("cpu"), torch.float32, group=group)
    cache.load("train", data.layers)
    return cache


def _lbfgs_records(xs, y, group, grid) -> dict[str, dict]:
    """Every layer's record of an L-BFGS fit of ``xs`` (tol 1e-6), grouped or not."""
    records = {}
    _fit.fit_layers(ProbeData.from_arrays(xs, y, None), list(xs),
                    SolveOptions.from_kwargs(l2=list(grid), tol=1e-6, device="cpu"),
                    lambda layer, rec: records.update({layer: rec}), group=group)
    return records


def test_layers_of_one_width_share_a_stack_and_batched_products():
    xs, y = _same_width_problem()
    cache = _cache(xs, y, group=True)
    stack, i = cache.stack_of("train", "q")
    assert stack.shape == (3, 500, 12) and i == 1 and cache.stack_of("train", "r") is None
    np.testing.assert_array_equal(cache.features("train", "s").numpy(), xs["s"])
    alone = _cache(xs, y, group=False)
    gen = torch.Generator().manual_seed(0)
    points = []
    for layer in ("p", "q", "r", "s"):
        for lam in (1e-3, 1e-1):
            points.append(Point(layer, lam, torch.randn(xs[layer].shape[1] + 1, 4,
                                                        generator=gen)))
    # p, q, s ask for two probes each: one run of three stacked layers, and r alone
    by_layer = {layer: [0, 1] for layer in ("p", "q", "r", "s")}
    assert cache.runs("train", by_layer) == [["r"], ["p", "q", "s"]]
    assert cache.runs("train", {"p": [0], "q": [1, 2], "s": [3]}) == [["p"], ["q"], ["s"]]
    assert cache.runs("train", {"p": [0], "s": [1]}) == [["p"], ["s"]]  # not consecutive
    got = ProbeObjective(cache).evaluate("train", points, grad=True)
    want = ProbeObjective(alone).evaluate("train", points, grad=True)
    for v1, v2 in zip(got, want, strict=True):
        assert v1.objective == pytest.approx(v2.objective, rel=1e-6)
        torch.testing.assert_close(v1.gradient, v2.gradient, rtol=1e-5, atol=1e-7)
        assert (v1.top1_error, v1.top5_error) == (v2.top1_error, v2.top5_error)


def test_layers_of_similar_width_share_a_zero_padded_stack():
    assert width_groups({"a": 10, "b": 12, "c": 13, "d": 5, "e": 6, "f": 100}) == [
        ["d", "e"], ["a", "b"], ["c"], ["f"]]
    rng = np.random.default_rng(11)
    y = rng.permutation(np.arange(400) % 5)
    xs = {name: (rng.normal(size=(5, d))[y] + rng.normal(size=(400, d))).astype(np.float32)
          for name, d in (("p", 12), ("q", 10), ("r", 5), ("s", 11), ("t", 30))}
    cache = _cache(xs, y, group=True)
    stack, i = cache.stack_of("train", "s")
    assert stack.shape == (3, 400, 12) and i == 1  # q (10), s (11), p (12)
    assert (stack[0, :, 10:] == 0).all() and (stack[1, :, 11:] == 0).all()
    assert cache.stack_of("train", "r") is None and cache.stack_of("train", "t") is None
    np.testing.assert_array_equal(cache.features("train", "q").numpy(), xs["q"])
    by_layer = {layer: [0, 1] for layer in xs}
    assert cache.runs("train", by_layer) == [["r"], ["t"], ["q", "s", "p"]]
    gen = torch.Generator().manual_seed(1)
    points = [Point(layer, lam, torch.randn(xs[layer].shape[1] + 1, 5, generator=gen))
              for layer in xs for lam in (1e-3, 1e-1)]
    got = ProbeObjective(cache).evaluate("train", points, grad=True)
    want = ProbeObjective(_cache(xs, y, group=False)).evaluate("train", points, grad=True)
    for point, v1, v2 in zip(points, got, want, strict=True):
        assert v1.gradient.shape == (xs[point.layer].shape[1] + 1, 5)
        assert v1.objective == pytest.approx(v2.objective, rel=1e-6)
        torch.testing.assert_close(v1.gradient, v2.gradient, rtol=1e-5, atol=1e-7)
        assert (v1.top1_error, v1.top5_error) == (v2.top1_error, v2.top5_error)
    records = _lbfgs_records(xs, y, True, (1e-3, 1e-1))
    plain = _lbfgs_records(xs, y, False, (1e-3, 1e-1))
    for layer in xs:
        assert records[layer]["W"].shape == (xs[layer].shape[1], 5)
        assert records[layer]["objective"] == pytest.approx(plain[layer]["objective"],
                                                            rel=1e-6)


def test_a_stack_kept_as_stored_never_narrows_a_wider_layer():
    rng = np.random.default_rng(3)
    y = rng.permutation(np.arange(200) % 4)
    xs = {"a": rng.normal(size=(200, 12)).astype(np.float16),
          "b": rng.normal(size=(200, 12)).astype(np.float32),
          "c": rng.normal(size=(200, 12)).astype(np.float16)}
    data = ProbeData.from_arrays(xs, y, None)
    stored = 200 * 12 * (2 + 4 + 2)  # the budget holds them as stored, not upcast
    cache = FeatureCache(data, torch.device("cpu"), torch.float32, group=True, budget=stored)
    cache.load("train", data.layers)
    assert cache.features("train", "b").dtype == torch.float32  # its own tensor, not narrowed
    np.testing.assert_array_equal(cache.features("train", "b").numpy(), xs["b"])
    stack, i = cache.stack_of("train", "c")
    assert stack.dtype == torch.float16 and i == 1 and cache.stack_of("train", "b") is None


def test_grouped_and_ungrouped_solves_reach_the_same_optimum():
    xs, y = _same_width_problem(seed=8)
    out = {group: _lbfgs_records(xs, y, group, (1e-3, 1e-2)) for group in (False, True)}
    for layer in xs:
        a, b = out[False][layer], out[True][layer]
        assert a["l2"] == b["l2"]
        assert a["objective"] == pytest.approx(b["objective"], rel=1e-7)
        np.testing.assert_allclose(a["W"], b["W"], rtol=1e-3, atol=1e-4)


def test_results_say_how_each_layer_was_solved(store):
    res = solve(store, layers=["1"], l2=1e-3, dtype="tf32", run="how")
    assert res.backends == {"1": {"device": "cpu", "kernel": "torch", "matmul": "float32",
                                  "features": "resident"}}
    assert engine.load_results(store.path, run="how").backends == res.backends
    res = solve({"a": np.eye(4, dtype=np.float32)}, labels=np.arange(4) % 2, l2=0.1,
                dtype="float64")
    assert res.backends["a"]["matmul"] == "float64"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, rel", [("float32", 1e-6), ("tf32", 1e-3)])
def test_gpu_solve_matches_the_cpu_solve(dtype, rel):
    from engine import kernels

    xs, y = _same_width_problem(seed=9)
    cpu = solve(xs, labels=y, l2=1e-3, tol=1e-6)
    gpu = solve(xs, labels=y, l2=1e-3, tol=1e-6, device="cuda", dtype=dtype)
    for layer, x in xs.items():
        assert gpu.backends[layer] == {
            "device": "cuda:0", "kernel": "cuda" if kernels.cuda.available() else "torch",
            "matmul": "tf32" if dtype == "tf32" else "float32", "features": "resident"}
        f_cpu = objective(x, y, *cpu.weights[layer], 1e-3)
        f_gpu = objective(x, y, *gpu.weights[layer], 1e-3)
        assert f_gpu == pytest.approx(f_cpu, rel=rel)
    assert torch.get_float32_matmul_precision() == "highest"  # restored after tf32
    sgd_cpu = solve({"train": xs, "valid": xs}, labels={"train": y, "valid": y}, l2=1e-3,
                    solver="sgd", epochs=3)
    sgd_gpu = solve({"train": xs, "valid": xs}, labels={"train": y, "valid": y}, l2=1e-3,
                    solver="sgd", epochs=3, device="cuda")
    np.testing.assert_allclose(sgd_gpu.error("valid"), sgd_cpu.error("valid"), atol=0.02)
    sgd_bf16 = solve({"train": xs, "valid": xs}, labels={"train": y, "valid": y}, l2=1e-3,
                     solver="sgd", epochs=3, device="cuda", dtype="bfloat16")
    assert {b["matmul"] for b in sgd_bf16.backends.values()} == {"bfloat16"}
    np.testing.assert_allclose(sgd_bf16.error("valid"), sgd_cpu.error("valid"), atol=0.02)


# -- 3. the gradient ---------------------------------------------------------------------
@pytest.fixture
def probe_objective():
    """The float64 objective of two layers (float64 and float32 features) with 256-row
    blocks (3 of them), with its features and labels."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, 7, size=700)
    feats = {"a": rng.normal(size=(700, 6)), "b": rng.normal(size=(700, 11)).astype(np.float32)}
    cache = FeatureCache(ProbeData.from_arrays(feats, y, None), torch.device("cpu"),
                         torch.float64)
    cache.load("train", list(feats))
    return ProbeObjective(cache, block_bytes=1), feats, y  # 1 byte: the 256-row minimum


def _autograd_objective(x, y, theta, lam):
    d = x.shape[1]
    z = x @ theta[:d] + theta[d]
    return F.cross_entropy(z, y) + lam / 2 * (theta[:d] ** 2).sum(), z


def test_solver_gradient_equals_autograd(probe_objective):
    obj, feats, y = probe_objective
    gen = torch.Generator().manual_seed(0)
    points = []
    for layer, lam in (("a", 0.1), ("b", 0.0), ("a", 3.0), ("b", 1e-3)):
        d = feats[layer].shape[1]
        points.append(Point(layer, lam, torch.randn(d + 1, 7, dtype=torch.float64,
                                                    generator=gen)))
    out = obj.evaluate("train", points, grad=True)
    yt = torch.from_numpy(y)
    for point, v in zip(points, out, strict=True):
        x = torch.from_numpy(feats[point.layer]).double()
        t = point.theta.clone().requires_grad_()
        loss, z = _autograd_objective(x, yt, t, point.l2)
        loss.backward()
        g = v.gradient
        assert g.dtype == torch.float64 and g.shape == point.theta.shape
        assert v.objective == pytest.approx(loss.item(), rel=1e-12)
        torch.testing.assert_close(g, t.grad, rtol=1e-10, atol=1e-12)  # float64 end to end
        z = z.detach()
        assert v.top1_error == pytest.approx(float((z.argmax(1) != yt).double().mean()))
        in5 = (z.topk(5, dim=1).indices == yt[:, None]).any(dim=1)
        assert v.top5_error == pytest.approx(float((~in5).double().mean()))
    # without grad: no gradient; the loss is the plain mean cross-entropy (no penalty), the
    # objective the same L_k as with it
    point = points[2]
    (v,) = obj.evaluate("train", [point], grad=False)
    x = torch.from_numpy(feats[point.layer]).double()
    assert v.gradient is None
    assert v.loss == pytest.approx(float(_autograd_objective(x, yt, point.theta, 0.0)[0]),
                                   rel=1e-12)
    assert v.objective == out[2].objective


@pytest.mark.parametrize("kernel", ["torch", "counting"])
def test_passes_without_hits_keep_the_objective_and_gradient_and_count_nothing(
        probe_objective, kernel):
    # an optimiser's passes skip the hit counts; a kernel that counts them anyway (as the
    # fused one does in its one sweep) has them dropped all the same
    obj, feats, y = probe_objective
    if kernel == "counting":
        def counting(logits, labels, *, scale=1.0, grad=True, hits=True):
            return reference_softmax_xent(logits, labels, scale=scale, grad=grad)

        obj = ProbeObjective(obj.features, kernel=counting, block_bytes=1)
    gen = torch.Generator().manual_seed(3)
    points = [Point(layer, lam, torch.randn(feats[layer].shape[1] + 1, 7, dtype=torch.float64,
                                            generator=gen))
              for layer, lam in (("a", 0.1), ("b", 1e-3))]
    want = obj.evaluate("train", points, grad=True)
    got = obj.evaluate("train", points, grad=True, hits=False)
    for g, w in zip(got, want, strict=True):
        assert g.objective == w.objective and g.loss == w.loss
        torch.testing.assert_close(g.gradient, w.gradient, rtol=0, atol=0)
        assert math.isnan(g.top1_error) and math.isnan(g.top5_error)
        assert 0.0 < w.top1_error < 1.0


class _ProbeObjective(torch.autograd.Function):
    """Our objective of (W; b), forward in float64 torch, backward through softmax_xent's
    gradient with respect to the logits (X^T dZ + lambda W, sum dZ)."""

    @staticmethod
    def forward(ctx, theta, x, y, lam):
        ctx.save_for_backward(theta, x, y)
        ctx.lam = lam
        return _autograd_objective(x, y, theta, lam)[0]

    @staticmethod
    def backward(ctx, grad_out):
        from engine.kernels.reference import softmax_xent

        theta, x, y = ctx.saved_tensors
        d, n = x.shape[1], x.shape[0]
        z = (x @ theta[:d] + theta[d]).unsqueeze(0)
        dz = softmax_xent(z, y, scale=float(grad_out) / n)[0][0]
        g = torch.cat([x.T @ dz + ctx.lam * float(grad_out) * theta[:d], dz.sum(0, keepdim=True)])
        return g, None, None, None


def test_objective_gradient_passes_gradcheck():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(40, 4, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 5, (40,), generator=gen)
    theta = torch.randn(5, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: _ProbeObjective.apply(t, x, y, 0.3), (theta,))


# -- 4. choosing lambda ------------------------------------------------------------------
def _two_split_problem(seed=7):
    x, y = blobs(500, 10, 5, seed=seed, noise=3.0)
    rng = np.random.default_rng(seed)
    x2 = (x @ rng.normal(size=(10, 6))).astype(np.float32)  # a second layer
    feats = {"train": {"a": x[:350], "b": x2[:350]}, "valid": {"a": x[350:], "b": x2[350:]}}
    labels = {"train": y[:350], "valid": y[350:]}
    return feats, labels


def test_lambda_list_picks_the_lowest_validation_error():
    feats, labels = _two_split_problem()
    grid = [1e-4, 1e-2, 1.0]
    res = solve(feats, labels=labels, l2=grid, tol=1e-6)
    assert {"layer", "l2", "objective", "valid_top1_error", "valid_loss"} <= set(res.grid.columns)
    assert len(res.grid) == 2 * len(grid)
    for layer in ("a", "b"):
        g = res.grid[res.grid.layer == layer]
        assert sorted(g.l2) == grid
        # lowest valid top-1 error, then lowest valid loss, then the larger lambda
        best = min(g.itertuples(), key=lambda r: (r.valid_top1_error, r.valid_loss, -r.l2))
        rows = res.table[res.table.layer == layer]
        assert set(rows.l2) == {best.l2}
        valid = rows[rows.split == "valid"].iloc[0]
        assert valid.top1_error == best.valid_top1_error and valid.loss == best.valid_loss
        # the kept weights are that lambda's: their validation error is the table's
        w, b = res.weights[layer]
        xv = feats["valid"][layer].astype(np.float64)
        err = np.mean((xv @ w + b).argmax(1) != labels["valid"])
        assert err == pytest.approx(valid.top1_error, abs=1.5 / len(xv))
        # every lambda of the grid is the optimum a single-lambda solve finds
        xt, yt = feats["train"][layer], labels["train"]
        for r in g.itertuples():
            alone = solve({layer: xt}, labels=yt, l2=r.l2, tol=1e-6)
            assert r.objective == pytest.approx(
                objective(xt, yt, *alone.weights[layer], r.l2), rel=1e-5)


def test_auto_lambda_uses_the_default_grid():
    feats, labels = _two_split_problem(seed=8)
    res = solve({s: {"a": f["a"]} for s, f in feats.items()}, labels=labels, tol=1e-5)
    assert res.config["l2"] == list(DEFAULT_L2_GRID)
    assert sorted(res.grid.l2) == sorted(DEFAULT_L2_GRID)
    g = res.grid
    best = min(g.itertuples(), key=lambda r: (r.valid_top1_error, r.valid_loss, -r.l2))
    assert set(res.table.l2) == {best.l2}


def test_several_lambdas_need_a_valid_split():
    x, y = blobs(200, 4, 3, seed=0)
    for l2 in ("auto", [1e-3, 1e-2]):
        with pytest.raises(engine.SplitNotFoundError, match="'valid' split") as e:
            solve({"a": x}, labels=y, l2=l2)
        assert isinstance(e.value, KeyError)
    res = solve({"a": x}, labels=y, l2=[1e-2])  # one lambda: no choice to make
    assert list(res.table.split) == ["train"]


# -- 5. results --------------------------------------------------------------------------
def _metrics(x, y, w, b):
    z = torch.from_numpy(x.astype(np.float64) @ w.astype(np.float64) + b)
    yt = torch.from_numpy(y)
    loss = float(F.cross_entropy(z, yt))
    top1 = float((z.argmax(1) != yt).double().mean())
    top5 = float((~(z.topk(5, dim=1).indices == yt[:, None]).any(1)).double().mean())
    return loss, top1, top5


def test_results_table_weights_and_store_layout(store):
    res = solve(store, l2=1e-3, tol=1e-5)
    t = res.table
    scores = ["top1_error_low", "top1_error_high", "top5_error_low", "top5_error_high",
              "balanced_accuracy", "macro_f1", "ece"]
    assert list(t.columns) == COLUMNS + scores
    assert list(zip(t.layer, t.split, strict=True)) == [
        (layer, split) for layer in store.layers for split in store.splits]
    assert list(t.dim) == [20] * 6 + [10] * 3
    assert set(t.site) == {"output"} and set(t.l2) == {1e-3}
    assert t.top5_error.notna().all()  # 10 classes
    for row in t.itertuples():
        w, b = res.weights[row.layer]
        x, y = store.read(row.split, row.layer), store.labels(row.split)
        loss, top1, top5 = _metrics(x, y, w, b)
        assert row.loss == pytest.approx(loss, rel=1e-5)
        assert row.top1_error == pytest.approx(top1, abs=1.5 / len(y))
        assert row.top5_error == pytest.approx(top5, abs=1.5 / len(y))
        if row.split == "train":  # per-row outputs, hence scores, of valid / test only
            assert np.isnan(row.balanced_accuracy) and np.isnan(row.top1_error_low)
            continue
        pred = (x.astype(np.float64) @ w + b).argmax(axis=1)
        assert row.balanced_accuracy == pytest.approx(balanced_accuracy_score(y, pred))
        assert row.macro_f1 == pytest.approx(f1_score(y, pred, average="macro"))
        assert row.top1_error_low <= row.top1_error <= row.top1_error_high
        assert 0 <= row.ece <= 1
    assert res.error("test").index.tolist() == store.layers
    sig = res.significance("test")
    assert list(zip(sig.layer, sig.next, strict=True)) == list(zip(
        store.layers, store.layers[1:], strict=False))
    e = res.error("test")
    np.testing.assert_allclose(sig.difference, np.diff(e.to_numpy()), atol=1e-12)
    assert ((sig.low <= sig.difference) & (sig.difference <= sig.high)).all()
    assert engine.load_results(store.path).table.equals(t)  # scored again from the saved outputs

    # saved: float32 zarr arrays and JSON attributes, readable with plain zarr
    root = zarr.open_group(store.path, mode="r")
    for layer in store.layers:
        w, b = res.weights[layer]
        for name, want in (("W", w), ("b", b)):
            arr = root[f"probes/default/{layer}/{name}"]
            assert arr.dtype == np.float32 and arr.shape == want.shape
            np.testing.assert_array_equal(arr[:], want)
    probes = os.path.join(store.path, "probes")
    for dirpath, _, names in os.walk(probes):
        for name in names:
            full = os.path.join(dirpath, name)
            if name == "zarr.json":
                with open(full) as f:
                    json.load(f)  # plain JSON
            else:  # nothing but chunks of W, b and the per-row outputs
                rel = os.path.relpath(full, probes).split(os.sep)
                assert (rel[2] in ("W", "b") and rel[3] == "c") or (
                    rel[2] == "outputs" and rel[3] in ("valid", "test")), rel
    with open(os.path.join(probes, "default", "1", "zarr.json")) as f:
        attrs = json.load(f)["attributes"]["probe_engine"]
    assert attrs["l2"] == 1e-3 and attrs["complete"] is True
    assert set(attrs["metrics"]) == set(store.splits)

    # read back: store.results() and load_results(path) give the same table and weights
    for back in (store.results(), engine.load_results(store.path),
                 engine.open_store(store.path).results("default")):
        pd.testing.assert_frame_equal(without_seconds(back.table), without_seconds(t))
        assert list(back.weights) == list(res.weights)
        for layer, (w, b) in res.weights.items():
            np.testing.assert_array_equal(back.weights[layer][0], w)
            np.testing.assert_array_equal(back.weights[layer][1], b)
        assert back.run == "default"

    with pytest.raises(engine.RunNotFoundError, match=r"\['default'\]") as e:
        store.results("nope")
    assert isinstance(e.value, KeyError)
    with pytest.raises(KeyError):
        engine.load_results(store.path, run="nope")


def test_top5_is_nan_up_to_five_classes_and_survives_the_store(store):
    res = solve(store, label="coarse", layers=["3"], l2=1e-3, tol=1e-5)
    assert res.config["num_classes"] == 4
    assert res.table.top5_error.isna().all()
    assert res.grid.filter(like="top5").isna().all().all()
    assert res.table.top1_error.notna().all()
    back = store.results()
    assert back.table.top5_error.isna().all()
    pd.testing.assert_frame_equal(without_seconds(back.table), without_seconds(res.table))
    x, _ = blobs(120, 3, 5, seed=1)
    five = solve({"a": x}, labels=np.arange(120) % 5, l2=1e-2)
    assert five.table.top5_error.isna().all()
    six = solve({"a": x}, labels=np.arange(120) % 6, l2=1e-2)
    assert six.table.top5_error.notna().all()


# -- 6. resume ---------------------------------------------------------------------------
def test_interrupted_run_resumes_and_equals_an_uninterrupted_one(store, base_store, tmp_path,
                                                                 monkeypatch, refits):
    kw = dict(l2=1e-3, tol=1e-5)
    other = tmp_path / "other.zarr"
    shutil.copytree(base_store.path, other)
    full = solve(engine.open_store(other), **kw)

    real_save = engine.format.save_probe
    saved: list[str] = []

    def interrupted_save(path, run, layer, record):
        if len(saved) == 2:  # killed in the middle of the third layer's save
            g = zarr.open_group(path, mode="r+").require_group(f"probes/{run}/{layer}")
            g.create_array("W", shape=record["W"].shape, dtype="float32")
            raise KeyboardInterrupt
        real_save(path, run, layer, record)
        saved.append(layer)

    monkeypatch.setattr(engine.format, "save_probe", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        solve(store, **kw)
    assert len(saved) == 2
    monkeypatch.setattr(engine.format, "save_probe", real_save)

    refits.clear()  # the batches of the resumed solve only
    again = solve(store, **kw)
    assert refits == [[layer for layer in store.layers if layer not in saved]]
    pd.testing.assert_frame_equal(without_seconds(again.table), without_seconds(full.table))
    for layer, (w, b) in full.weights.items():
        np.testing.assert_allclose(again.weights[layer][0], w, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(again.weights[layer][1], b, rtol=1e-6, atol=1e-7)
    pd.testing.assert_frame_equal(without_seconds(store.results().table),
                                  without_seconds(full.table))

    solve(store, **kw)  # everything saved: nothing to solve
    assert len(refits) == 1

    before = files_outside_probes(store.path)
    with pytest.raises(engine.StoreMismatchError, match="another run="):
        solve(store, l2=1e-2, tol=1e-5)
    with pytest.raises(engine.StoreMismatchError):
        solve(store, l2=1e-3, tol=1e-6)
    assert files_outside_probes(store.path) == before
    other_run = solve(store, l2=1e-2, tol=1e-5, run="strong", layers=["3"])
    assert set(other_run.table.l2) == {1e-2}
    assert set(store.results("strong").table.layer) == {"3"}
    assert set(store.results().table.l2) == {1e-3}  # the first run is untouched


# -- 7. bad input ------------------------------------------------------------------------
def test_one_class_in_train_is_refused():
    x, _ = blobs(50, 3, 2, seed=0)
    with pytest.raises(engine.DataError, match="one class"):
        solve({"a": x}, labels=np.full(50, 3), l2=1e-2)


def test_class_unseen_in_train_warns_and_counts_as_errors():
    x, y = blobs(300, 4, 3, seed=4, noise=0.5)
    yv = y[200:].copy()
    yv[::10] = 3  # a class train never has
    with pytest.warns(engine.ProbeEngineWarning, match=r"never seen in train: \[3\]"):
        res = solve({"train": {"a": x[:200]}, "valid": {"a": x[200:]}},
                    labels={"train": y[:200], "valid": yv}, l2=1e-2, max_iter=100)
    w, b = res.weights["a"]
    pred = (x[200:].astype(np.float64) @ w + b).argmax(1)
    assert not (pred[::10] == 3).any()
    valid = res.table[res.table.split == "valid"].iloc[0]
    assert valid.top1_error >= 0.1 - 1e-12  # at least the unseen-class rows
    assert valid.top1_error == pytest.approx(np.mean(pred != yv), abs=1.5 / len(yv))


def test_non_finite_features_name_layer_split_and_row():
    x, y = blobs(100, 4, 3, seed=0)
    bad = x.copy()
    bad[37, 2] = np.nan
    with pytest.raises(engine.NonFiniteError, match=r"layer 'b', split 'train', row 37"):
        solve({"a": x, "b": bad}, labels=y, l2=1e-2)
    bad[37, 2] = np.inf
    with pytest.raises(engine.NonFiniteError, match=r"layer 'a', split 'valid', row 37"):
        solve({"train": {"a": x}, "valid": {"a": bad}}, labels={"train": y, "valid": y},
              l2=1e-2)


def test_bad_labels_are_data_errors():
    x, y = blobs(100, 4, 3, seed=0)
    neg = y.copy()
    neg[41] = -1
    with pytest.raises(engine.DataError, match=r"split 'valid', row 41"):
        solve({"train": {"a": x}, "valid": {"a": x}}, labels={"train": y, "valid": neg},
              l2=1e-2)
    with pytest.raises(engine.DataError, match=r"split 'train', row 41"):
        solve({"a": x}, labels=neg, l2=1e-2)
    with pytest.raises(engine.DataError, match="integers"):
        solve({"a": x}, labels=y.astype(np.float32), l2=1e-2)
    with pytest.raises(engine.DataError, match="do not match"):
        solve({"a": x}, labels=y[:99], l2=1e-2)
    with pytest.raises(engine.DataError, match="do not match"):
        solve({"train": {"a": x}, "valid": {"a": x[:50]}}, labels={"train": y, "valid": y},
              l2=1e-2)
    with pytest.raises(engine.DataError):
        solve({"a": x}, labels={"train": y, "valid": y}, l2=1e-2)
    with pytest.raises(engine.LayerNotFoundError):
        solve({"train": {"a": x, "b": x}, "valid": {"a": x}}, labels={"train": y, "valid": y},
              l2=1e-2)


def test_bad_arguments_are_value_errors():
    x, y = blobs(100, 4, 3, seed=0)
    missing = f"cuda:{max(7, torch.cuda.device_count())}"
    with pytest.raises(ValueError, match="does not exist"):
        solve({"a": x}, labels=y, l2=1e-2, device=missing)
    with pytest.raises(ValueError, match="newton"):
        solve({"a": x}, labels=y, l2=1e-2, solver="newton")
    for l2 in ("none", -1.0, float("nan"), []):
        with pytest.raises(ValueError):
            solve({"a": x}, labels=y, l2=l2)
    with pytest.raises(ValueError):
        solve({"a": x}, labels=y, l2=1e-2, dtype="float16")
    with pytest.raises(TypeError):
        solve([x], labels=y, l2=1e-2)


def _edit(store, fn) -> None:
    """Change the store's files with plain zarr (before the snapshot of a test)."""
    fn(zarr.open_group(store.path, mode="r+"))


def test_failed_solves_on_a_store_change_nothing_outside_probes(store):
    def fails(exc, match=None, **kw):
        before = files_outside_probes(store.path)
        with pytest.raises(exc, match=match) as e:
            solve(store, **kw)
        assert files_outside_probes(store.path) == before
        return e.value

    e = fails(engine.LayerNotFoundError, r"'1'.*'2'.*'3'", layers=["1", "fc9"], l2=1e-3)
    assert isinstance(e, KeyError)
    e = fails(engine.LabelNotFoundError, r"\['coarse', 'y'\]", label="fine", l2=1e-3)
    assert isinstance(e, KeyError)
    fails(ValueError, "does not exist", device=f"cuda:{max(7, torch.cuda.device_count())}",
          l2=1e-3)
    fails(ValueError, "newton", solver="newton", l2=1e-3)
    fails(ValueError, "labels=", labels=np.zeros(540, dtype=np.int64), l2=1e-3)
    assert not os.path.exists(os.path.join(store.path, "probes"))

    def relabel(split, row, value):
        def fn(group):
            group[f"{split}/labels/y"][row] = value
        return fn

    was = int(store.labels("train")[5]), int(store.labels("test")[3])
    _edit(store, relabel("train", 5, 10))  # 10 classes: 0..9
    fails(engine.DataError, r"split 'train', row 5: label 10", layers=["3"], l2=1e-3)
    _edit(store, relabel("train", 5, was[0]))
    _edit(store, relabel("test", 3, -2))
    fails(engine.DataError, r"split 'test', row 3: label -2", layers=["3"], l2=1e-3)
    _edit(store, relabel("test", 3, was[1]))

    def poison(split, row):
        def fn(group):
            group[f"{split}/features/2"][row, 4] = np.nan
        return fn

    _edit(store, poison("train", 7))
    fails(engine.NonFiniteError, r"layer '2', split 'train', row 7", layers=["2"], l2=1e-3,
          run="nan-train")
    _edit(store, lambda group: group["train/features/2"].__setitem__((7, 4), 0.0))
    _edit(store, poison("test", 11))
    fails(engine.NonFiniteError, r"layer '2', split 'test', row 11", layers=["2"], l2=1e-3,
          run="nan-test")


def test_incomplete_store_needs_allow_partial(store):
    group = zarr.open_group(store.path, mode="r+")
    meta = dict(group.attrs["probe_engine"])
    meta["splits"]["test"]["rows_committed"] = 64
    group.attrs["probe_engine"] = meta
    partial = engine.open_store(store.path)
    assert not partial.complete

    before = files_outside_probes(store.path)
    with pytest.raises(engine.StoreError, match="allow_partial") as e:
        solve(partial, l2=1e-3, layers=["3"])
    assert isinstance(e.value, OSError)
    assert files_outside_probes(store.path) == before

    res = solve(partial, l2=1e-3, layers=["3"], tol=1e-5, allow_partial=True)
    assert files_outside_probes(store.path) == before
    feats = {s: {"3": partial.read(s, "3")} for s in partial.splits}
    labels = {s: partial.labels(s) for s in partial.splits}
    assert len(labels["test"]) == 64
    ref = solve(feats, labels=labels, l2=1e-3, tol=1e-5)
    np.testing.assert_allclose(res.weights["3"][0], ref.weights["3"][0], rtol=1e-6, atol=1e-7)
    w, b = res.weights["3"]
    test = res.table[res.table.split == "test"].iloc[0]
    _, top1, _ = _metrics(feats["test"]["3"], labels["test"], w, b)
    assert test.top1_error == pytest.approx(top1, abs=1.5 / 64)
    assert test.top1_error == ref.table[ref.table.split == "test"].iloc[0].top1_error


# -- 8. input types ----------------------------------------------------------------------
def test_numpy_torch_and_zarr_inputs_give_the_same_probe():
    x, y = blobs(300, 6, 4, seed=9)
    xv, yv = blobs(80, 6, 4, seed=10)

    def as_zarr(a):
        return zarr.create_array(store={}, data=a)

    results = []
    for conv in (np.asarray, torch.from_numpy, as_zarr):
        results.append(solve({"train": {"a": conv(x)}, "valid": {"a": conv(xv)}},
                             labels={"train": conv(y), "valid": conv(yv)}, l2=1e-2, tol=1e-6))
    # mixed, and the one-split form
    results.append(solve({"a": torch.from_numpy(x)}, labels=as_zarr(y), l2=1e-2, tol=1e-6))
    w0, b0 = results[0].weights["a"]
    for res in results[1:]:
        np.testing.assert_allclose(res.weights["a"][0], w0, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(res.weights["a"][1], b0, rtol=1e-6, atol=1e-7)
    for res in results[1:3]:
        pd.testing.assert_frame_equal(without_seconds(res.table),
                                      without_seconds(results[0].table))


def test_empty_split_numpy_scalar_l2_and_read_only_arrays(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 6)).astype(np.float32)
    y = rng.integers(0, 3, 300)
    with pytest.raises(engine.DataError, match="split 'valid' has no rows"):
        engine.solve({"train": {"a": x}, "valid": {"a": x[:0]}},
                     labels={"train": y, "valid": y[:0]}, l2=1e-2, progress=False)
    a = engine.solve({"a": x}, labels=y, l2=np.float32(1e-2), progress=False)
    np.save(tmp_path / "x.npy", x)
    ro = np.load(tmp_path / "x.npy", mmap_mode="r")
    b = engine.solve({"a": ro}, labels=y, l2=1e-2, progress=False)
    np.testing.assert_array_equal(a.weights["a"][0], b.weights["a"][0])


def test_sgd_with_early_stopping_gets_close_to_lbfgs():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3000, 20)).astype(np.float32)
    y = (x @ rng.standard_normal((20, 4)) + rng.gumbel(size=(3000, 4))).argmax(1)
    feats = {"train": {"a": x[:2400]}, "valid": {"a": x[2400:]}}
    labels = {"train": y[:2400], "valid": y[2400:]}
    exact = engine.solve(feats, labels=labels, l2=1e-3, progress=False)
    sgd = engine.solve(feats, labels=labels, l2=1e-3, solver="sgd", epochs=40, progress=False)
    e_exact = exact.error("valid").iloc[0]
    e_sgd = sgd.error("valid").iloc[0]
    assert e_sgd <= e_exact + 0.02
    row = sgd.table.iloc[0]
    assert row.iterations <= 40 and sgd.config["solver"] == "sgd"
    with pytest.raises(engine.SplitNotFoundError, match="early_stopping=False"):
        engine.solve({"a": x}, labels=y, l2=1e-3, solver="sgd", progress=False)
    free = engine.solve({"a": x}, labels=y, l2=1e-3, solver="sgd", epochs=3,
                        early_stopping=False, progress=False)
    assert free.table.iterations.iloc[0] == 3 and not free.table.converged.iloc[0]


def test_sgd_with_bfloat16_products_matches_float32_and_says_so(monkeypatch):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3000, 40)).astype(np.float32)
    y = (x @ rng.standard_normal((40, 6)) + rng.gumbel(size=(3000, 6))).argmax(1)
    feats = {"train": {"a": x[:2400]}, "valid": {"a": x[2400:]}}
    labels = {"train": y[:2400], "valid": y[2400:]}
    products = []
    mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b: products.append(a.dtype) or mm(a, b))
    kw = dict(labels=labels, l2=1e-3, solver="sgd", epochs=5, progress=False)
    full = engine.solve(feats, dtype="float32", **kw)
    assert set(products) == {torch.float32}
    products.clear()
    low = engine.solve(feats, dtype="bfloat16", **kw)
    assert set(products) == {torch.bfloat16}  # the minibatch gradients' products
    assert low.backends["a"] == {"device": "cpu", "kernel": "torch", "matmul": "bfloat16",
                                 "features": "streamed"}
    assert low.weights["a"][0].dtype == np.float32
    assert not np.array_equal(low.weights["a"][0], full.weights["a"][0])
    np.testing.assert_allclose(low.weights["a"][0], full.weights["a"][0], atol=0.05)
    assert abs(low.error("valid").iloc[0] - full.error("valid").iloc[0]) <= 0.02
    with pytest.raises(engine.InvalidArgumentError, match="solver='sgd'.*dtype='tf32'"):
        engine.solve(feats, labels=labels, l2=1e-3, dtype="bfloat16", progress=False)
