"""Multi-label probes: (N, C) targets of 0 / 1 fitted by a sigmoid probe per class, equal to
scikit-learn's one binary logistic regression per class, scored by mAP."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score
from test_solve import _one_thread, solve  # noqa: F401  (fixture)

import engine
from engine import metrics
from engine.errors import DataError, InvalidArgumentError
from engine.objective import sigmoid_xent

LAM = 1e-2


def _problem(n=(240, 120, 120), d=6, c=4, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(d, c))
    out = {}
    for split, rows in zip(("train", "valid", "test"), n, strict=True):
        x = rng.normal(size=(rows, d)).astype(np.float32)
        y = (x @ w + rng.normal(size=(rows, c)) > 0.5).astype(np.int64)
        out[split] = (x, y)
    return out


def test_each_class_is_scikit_learns_binary_logistic_regression():
    data = _problem()
    x, y = data["train"]
    res = solve({s: {"x": v[0]} for s, v in data.items()},
                labels={s: v[1] for s, v in data.items()}, l2=LAM, dtype="float64", tol=1e-9)
    w, b = res.weights["x"]
    for c in range(y.shape[1]):
        clf = LogisticRegression(C=1 / (LAM * len(y)), tol=1e-10, max_iter=10000).fit(
            x.astype(np.float64), y[:, c])
        np.testing.assert_allclose(w[:, c], clf.coef_[0], rtol=2e-4, atol=2e-5)
        assert b[c] == pytest.approx(clf.intercept_[0], rel=2e-4, abs=2e-5)
    t = res.table.set_index("split")
    xt, yt = data["test"]
    scores = xt @ w + b
    assert t.loc["test", "mAP"] == pytest.approx(average_precision_score(yt, scores,
                                                                          average="macro"))
    one_error = np.mean(yt[np.arange(len(yt)), scores.argmax(axis=1)] == 0)
    assert t.loc["test", "top1_error"] == pytest.approx(one_error)
    assert t.loc["test", "top1_error_low"] <= one_error <= t.loc["test", "top1_error_high"]


def test_the_kernel_matches_autograd():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(3, 7, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    y = (torch.rand(7, 5, generator=gen) > 0.5).double()
    ref = torch.nn.functional.binary_cross_entropy_with_logits(
        z, y.expand(3, 7, 5), reduction="none").sum(dim=(1, 2))
    ref.sum().backward()
    g, loss, top1, top5 = sigmoid_xent(z.detach().clone(), y, scale=1.0, grad=True)
    torch.testing.assert_close(loss, ref.detach())
    torch.testing.assert_close(g, z.grad)
    best = z.detach().argmax(dim=2)
    assert top1.tolist() == [int(y[torch.arange(7), best[k]].sum()) for k in range(3)]


def test_very_negative_logits_give_no_denormal_gradient():
    # sigmoid(z) under e^-87 is a float32 denormal (slow on x86): floored at EXP_FLOOR
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(2, 64, 50, generator=gen) * 60.0
    y = (torch.rand(64, 50, generator=gen) > 0.5).float()
    ref = torch.nn.functional.binary_cross_entropy_with_logits(
        z.double(), y.double().expand(2, 64, 50), reduction="none").sum(dim=(1, 2))
    plain = torch.sigmoid(z) * 1e-6
    tiny = torch.finfo(torch.float32).tiny
    assert ((plain != 0) & (plain < tiny)).any()  # what is avoided
    g, loss, _, _ = sigmoid_xent(z.clone(), y, scale=1e-6, grad=True, hits=False)
    assert not ((g != 0) & (g.abs() < tiny)).any()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-3)
    want = (torch.sigmoid(z.double()) - y) * 1e-6
    torch.testing.assert_close(g.double(), want, rtol=1e-5, atol=1e-12)  # float32 rounding


def test_average_precision_is_scikit_learns_with_ties():
    rng = np.random.default_rng(1)
    s = rng.integers(0, 5, 200).astype(float)  # many ties
    y = rng.integers(0, 2, 200)
    assert metrics.average_precision(s, y) == pytest.approx(average_precision_score(y, s))
    assert np.isnan(metrics.average_precision(s, np.zeros(200)))


def test_a_multi_label_set_in_a_store(tmp_path):
    from torch import nn
    from torch.utils.data import TensorDataset

    data = _problem(seed=2)
    path = tmp_path / "s.zarr"
    ds = {s: TensorDataset(torch.from_numpy(x), torch.from_numpy(y[:, 0]))
          for s, (x, y) in data.items()}
    store = engine.build_store(nn.Sequential(nn.Identity()), ds, path, layers=["0"],
                               reduce="none", dtype="float32", progress=False)
    store.add_labels("tags", {s: y for s, (_, y) in data.items()})
    assert store.labels("test", "tags").shape == data["test"][1].shape
    res = solve(store, label="tags", l2=LAM)
    arrays = solve({s: {"0": x} for s, (x, _) in data.items()},
                   labels={s: y for s, (_, y) in data.items()}, l2=LAM)
    np.testing.assert_allclose(res.weights["0"][0], arrays.weights["0"][0], rtol=1e-4,
                               atol=1e-5)
    assert engine.load_results(path).table.mAP.notna().sum() == 2  # valid and test


def test_bad_multi_label_input_is_refused():
    data = _problem()
    feats = {s: {"x": v[0]} for s, v in data.items()}
    labels = {s: v[1] for s, v in data.items()}
    bad = {**labels, "valid": labels["valid"] * 2}
    with pytest.raises(DataError, match="row 0, class|0 or 1"):
        solve(feats, labels=bad, l2=LAM)
    with pytest.raises(InvalidArgumentError, match="multi-label"):
        solve(feats, labels=labels, l2=LAM, controls=["shuffled"])
