"""engine._ridge: ridge-regression probes (``solve(..., solver="ridge")``) in closed form.

Per probe, with Y the one-hot labels mapped to {-1, +1}::

    R(W, b) = (1/(2N)) ||Y - X W - 1 b||_F^2 + (lambda / 2) ||W||_F^2

is scikit-learn's ``RidgeClassifier(alpha=lambda N)``: W, b equal its ``coef_.T``,
``intercept_`` for every lambda of one solve. With two classes scikit-learn fits one column w
(+1 for class 1, -1 for class 0); our two targets are each other's negatives, so
W[:, 1] = -W[:, 0] = w and the predictions agree.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import RidgeClassifier
from test_solve import _one_thread  # noqa: F401  (fixture: one thread for tiny problems)
from torch import nn
from torch.utils.data import TensorDataset

import engine
from engine import _fit, _ridge, cli
from engine._sources import ProbeData
from engine.errors import InvalidArgumentError, MemoryBudgetError
from engine.options import SolveOptions, from_args

GRID = [1e-4, 1e-2, 1.0]




def blobs(n: int, d: int, c: int, *, seed: int, noise: float = 1.0, shift: float = 0.0,
          dtype=np.float64):
    """Every class present, in random order; Gaussian clusters around random means, all
    features offset by ``shift`` (far from zero, like post-ReLU activations)."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % c)
    centres = rng.normal(size=(c, d))
    x = shift + centres[y] + noise * rng.normal(size=(n, d))
    return x.astype(dtype), y


def sklearn_ridge(x, y, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """RidgeClassifier's (coef_.T (D, C or 1), intercept_) at alpha = lambda N, in float64."""
    clf = RidgeClassifier(alpha=lam * len(y)).fit(np.asarray(x, dtype=np.float64), y)
    # with two classes coef_ may be (D,) and intercept_ a scalar, by version
    return (np.reshape(clf.coef_, (-1, x.shape[1])).T,
            np.reshape(clf.intercept_, (-1,)))


def assert_close(got, want, rel: float) -> None:
    """Entries within ``rel`` of the largest entry of ``want``."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=rel, atol=rel * np.abs(want).max())


def solutions(x, y, grid, dtype: str = "float64") -> dict[float, tuple[np.ndarray, ...]]:
    """Every lambda's (W, b) of one ridge fit of layer "a" (features ``x``, labels ``y``)."""
    data = ProbeData.from_arrays({"a": x}, y, None)
    options = SolveOptions.from_kwargs(solver="ridge", l2=grid, device="cpu", dtype=dtype)
    objective = _fit.objective_for(data, ["a"], options)
    out: dict = {}

    def on_layer(layer: str, sols) -> None:
        assert layer == "a" and [s.l2 for s in sols] == sorted(grid)
        for s in sols:
            assert s.theta.dtype == objective.dtype and s.theta.shape == (x.shape[1] + 1,
                                                                           len(set(y)))
            assert (s.iterations, s.evaluations, s.converged, s.reason) == (
                1, 1, True, "closed form")
            out[s.l2] = (s.theta[:-1].numpy(), s.theta[-1].numpy())

    _ridge.fit(objective, ["a"], options.grid, on_layer)
    return out


def solve(source, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("device", "cpu")
    return engine.solve(source, solver="ridge", **kw)


# -- the optimum -----------------------------------------------------------------------
@pytest.mark.parametrize("shift", [0.0, 100.0])
def test_every_lambda_of_one_solve_matches_sklearn_ridge_classifier(shift):
    x, y = blobs(300, 20, 4, seed=0, shift=shift)
    got = solutions(x, y, GRID)
    assert sorted(got) == GRID
    for lam in GRID:
        w, b = got[lam]
        coef, intercept = sklearn_ridge(x, y, lam)
        assert_close(w, coef, 1e-6)
        assert_close(b, intercept, 1e-6)


def test_the_public_solve_returns_the_ridge_weights_and_says_how():
    x, y = blobs(300, 20, 4, seed=1)
    res = solve({"a": x}, labels=y, l2=1e-2)
    w, b = res.weights["a"]
    coef, intercept = sklearn_ridge(x, y, 1e-2)
    assert_close(w, coef, 1e-6)  # float32 weights of a float64 solve
    assert_close(b, intercept, 1e-6)
    row = res.table.iloc[0]
    assert (row.iterations, row.converged) == (1, True)
    assert res.config["solver"] == "ridge"
    assert res.backends["a"]["features"] == "resident"


def test_two_classes_are_scikit_learns_one_column_and_its_negative():
    x, y = blobs(300, 20, 2, seed=2)
    for lam in GRID:
        w, b = solutions(x, y, [lam])[lam]
        coef, intercept = sklearn_ridge(x, y, lam)  # (D, 1): +1 for class 1
        assert coef.shape == (20, 1)
        assert_close(w[:, 1:], coef, 1e-6)
        assert_close(w[:, 0], -w[:, 1], 1e-12)
        assert_close(w[:, 1] - w[:, 0], 2 * coef[:, 0], 1e-6)
        assert_close(b, [-intercept[0], intercept[0]], 1e-6)
        clf = RidgeClassifier(alpha=lam * len(y)).fit(x, y)
        assert np.array_equal((x @ w + b).argmax(axis=1), clf.predict(x))


def test_float16_features_match_sklearn_on_their_float64_values():
    """The Gram is summed in float64: float16 features solved in float32 lose nothing but
    the final rounding of W to float32."""
    x, y = blobs(300, 20, 4, seed=3, shift=3.0, dtype=np.float16)
    res = solve({"a": x}, labels=y, l2=1e-3)  # dtype="float32"
    w, b = res.weights["a"]
    coef, intercept = sklearn_ridge(x.astype(np.float64), y, 1e-3)
    assert_close(w, coef, 1e-6)
    assert_close(b, intercept, 1e-6)


def test_lambda_zero_with_a_singular_gram_is_the_pseudo_inverse_solution():
    """A duplicated feature and a constant one: X^T X is singular. At lambda = 0 the W is
    the minimum-norm least-squares one, which splits the duplicate's weight in two."""
    x, y = blobs(200, 6, 3, seed=4)
    x = np.hstack([x, x[:, :1], np.full((200, 1), 2.5)])
    w, b = solutions(x, y, [0.0])[0.0]
    targets = 2.0 * np.eye(3)[y] - 1.0
    xc, yc = x - x.mean(axis=0), targets - targets.mean(axis=0)
    want = np.linalg.pinv(xc) @ yc
    assert_close(w, want, 1e-8)
    assert_close(w[0], w[6], 1e-8)
    # no weight along a feature without variance (up to eigh's roundoff)
    assert np.abs(w[7]).max() <= 1e-12 * np.abs(w).max()
    assert_close(b, targets.mean(axis=0) - x.mean(axis=0) @ want, 1e-8)
    # and ridge approaches it from above
    w_small = solutions(x, y, [1e-9])[1e-9][0]
    assert_close(w_small, want, 1e-5)


# -- choosing lambda -------------------------------------------------------------------
def test_lambda_is_chosen_by_validation_top1_error_of_the_outputs_as_logits():
    x, y = blobs(360, 20, 4, seed=5, noise=2.5)
    train, valid = slice(0, 60), slice(60, 360)  # few train rows: lambda matters
    res = solve({"train": {"a": x[train]}, "valid": {"a": x[valid]}},
                labels={"train": y[train], "valid": y[valid]}, l2=GRID, dtype="float64")
    grid = res.grid.set_index("l2")
    assert grid.valid_top1_error.nunique() > 1  # a choice that matters
    for lam in GRID:
        coef, intercept = sklearn_ridge(x[train], y[train], lam)
        z = x[valid] @ coef + intercept
        assert grid.loc[lam, "valid_top1_error"] == pytest.approx(
            np.mean(z.argmax(axis=1) != y[valid]))
        lse = np.log(np.exp(z - z.max(axis=1, keepdims=True)).sum(axis=1)) + z.max(axis=1)
        assert grid.loc[lam, "valid_loss"] == pytest.approx(
            np.mean(lse - z[np.arange(len(z)), y[valid]]), rel=1e-6)
    best = min(GRID, key=lambda lam: (grid.loc[lam, "valid_top1_error"],
                                      grid.loc[lam, "valid_loss"], -lam))
    assert res.table.l2.unique().tolist() == [best]


# -- streamed features -----------------------------------------------------------------
@pytest.fixture(scope="module")
def blob_store(tmp_path_factory):
    """A float32 store of Gaussian class clusters (1,500 / 400 / 400 rows, 5 classes): layer
    "0" (the 40 inputs) and "2" (tanh of a random projection); chunks of a few hundred rows,
    so that a stream crosses many."""
    rng = np.random.default_rng(0)
    means = rng.normal(size=(5, 40)).astype(np.float32)

    def split(rows: int) -> TensorDataset:
        y = rng.permutation(np.arange(rows) % 5)
        x = means[y] + 1.5 * rng.normal(size=(rows, 40)).astype(np.float32)
        return TensorDataset(torch.from_numpy(x), torch.from_numpy(y))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Identity(), nn.Linear(40, 40), nn.Tanh())
    return engine.build_store(
        model, {"train": split(1500), "valid": split(400), "test": split(400)},
        tmp_path_factory.mktemp("ridge") / "s.zarr", layers=["0", "2"], reduce="none",
        dtype="float32", batch_size=64, block_bytes=1 << 16, progress=False)


def test_a_streamed_layer_gives_the_resident_probe(blob_store):
    kw = {"l2": GRID}
    memory = solve(blob_store, run="memory", **kw)
    ooc = solve(blob_store, run="ooc", max_memory="200k", **kw)
    assert {b["features"] for b in memory.backends.values()} == {"resident"}
    assert {b["features"] for b in ooc.backends.values()} == {"streamed"}
    y = blob_store.labels("train")
    for layer in ["0", "2"]:
        (w, b), (w0, b0) = ooc.weights[layer], memory.weights[layer]
        assert_close(w, w0, 1e-6)
        assert_close(b, b0, 1e-6)
        lam = float(ooc.table.query("layer == @layer").l2.iloc[0])
        coef, intercept = sklearn_ridge(blob_store.read("train", layer), y, lam)
        assert_close(w, coef, 1e-5)
        assert_close(b, intercept, 1e-5)
    cols = ["layer", "split", "l2", "top1_error"]
    assert ooc.table[cols].equals(memory.table[cols])
    assert blob_store.results(run="ooc").table[cols].equals(ooc.table[cols])


# -- refusals --------------------------------------------------------------------------
def test_a_gram_too_large_is_refused_by_layer(monkeypatch):
    monkeypatch.setattr(_ridge, "MAX_GRAM_BYTES", 1000)
    x, y = blobs(50, 20, 3, seed=6)
    with pytest.raises(MemoryBudgetError, match=r"layer 'a' of split 'train' has 20 features"
                       r".*20 x 20 float64\) needs 3,200 bytes.*subsample:K.*solver='lbfgs'"):
        solve({"a": x}, labels=y, l2=1e-3)


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"shard": "rows"}, "ridge sums each layer's rows in one pass already: use "
                        "shard='layers'"),
    ({"dtype": "bfloat16"}, "ridge sums its Gram matrix in float64"),
    ({"solver": "newton"}, "'lbfgs', 'sgd' or 'ridge'"),
])
def test_what_ridge_cannot_do_is_refused_by_name(kwargs, words):
    with pytest.raises(InvalidArgumentError, match=words):
        SolveOptions.from_kwargs(**{"solver": "ridge", **kwargs})


def test_the_command_line_takes_the_ridge_solver():
    args = cli.parser().parse_args(["solve", "s.zarr", "--solver", "ridge", "--l2", "1e-3"])
    kwargs = from_args(SolveOptions, args, args.parser)
    assert kwargs == {"solver": "ridge", "l2": [1e-3]}
    assert SolveOptions.from_kwargs(**kwargs).config(4)["solver"] == "ridge"
