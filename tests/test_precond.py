"""engine._precond: the randomized eigenpairs of the feature second moment, the L-BFGS
initial inverse Hessian built from them, and what it buys on ill-conditioned probes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import engine
from engine import _fit
from engine._precond import RANK, LowRankPreconditioner, moment_of, top_eigenpairs
from engine._sources import ProbeData
from engine.options import SolveOptions


def second_moment(x: torch.Tensor) -> torch.Tensor:
    xa = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    return xa.T @ xa / len(x)


def correlated(n: int, d: int, *, seed: int, decay: float = 0.9) -> torch.Tensor:
    """Features like a feature map's: a few strong shared directions, a decaying tail, a
    large common offset."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64)).Q
    spectrum = decay ** torch.arange(d, dtype=torch.float64) * 10
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * spectrum.sqrt() @ basis.T
    return (x + 3.0).float()


def eig(x: torch.Tensor, dtype: torch.dtype = torch.float32, **kw):
    """top_eigenpairs of features x in memory."""
    return top_eigenpairs(moment_of(x, dtype), x.shape[1], dtype=dtype, **kw)


def test_small_layers_get_the_exact_eigendecomposition():
    x = correlated(500, 40, seed=0)
    u, ev = eig(x, dtype=torch.float64)
    ref_ev, ref_u = torch.linalg.eigh(second_moment(x))
    assert u.shape == (41, 41) and ev.shape == (41,)
    assert torch.all(ev[:-1] >= ev[1:])  # descending
    torch.testing.assert_close(ev, ref_ev.flip(0).clamp(min=0), rtol=1e-8, atol=1e-10)
    # same vectors up to sign: u^T ref_u is a signed permutation (eigenvalues are distinct)
    overlap = (u.T @ ref_u.flip(1)).abs()
    torch.testing.assert_close(overlap.diagonal(), torch.ones(41, dtype=torch.float64))


def test_wide_layers_get_the_top_of_the_spectrum_by_sketching():
    x = correlated(2000, 400, seed=1, decay=0.8)
    u, ev = eig(x, rank=20)
    assert u.shape == (401, 20) and ev.shape == (20,)
    ref = torch.linalg.eigvalsh(second_moment(x)).flip(0)[:20]
    torch.testing.assert_close(ev.double(), ref, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(u.T @ u, torch.eye(20), atol=1e-4, rtol=0)
    # the same seed gives the same preconditioner
    u2, ev2 = eig(x, rank=20)
    assert torch.equal(u, u2) and torch.equal(ev, ev2)


def test_half_precision_features_are_upcast_block_by_block():
    x = correlated(300, 200, seed=2)
    _, ev32 = eig(x, rank=10)
    _, ev16 = eig(x.half(), rank=10)
    torch.testing.assert_close(ev16, ev32, rtol=2e-3, atol=1e-5)


@pytest.mark.parametrize("rank", [5, 41])  # a tail, and the whole space
def test_the_preconditioner_is_the_documented_matrix(rank):
    x = correlated(400, 40, seed=3)
    u, ev = eig(x, rank=rank, dtype=torch.float64)
    lam, classes = 1e-3, 7
    pre = LowRankPreconditioner(u, ev, lam, classes)
    h = (1 / classes) * (1 - 1 / classes)
    curv = h * ev + lam
    dense = u @ torch.diag(1 / curv) @ u.T
    if rank < 41:
        dense += (torch.eye(41, dtype=torch.float64) - u @ u.T) / curv[-1]
    q = torch.randn(41, classes, dtype=torch.float64)
    torch.testing.assert_close(pre(q), dense @ q)
    # symmetric positive definite: what L-BFGS needs of H0
    assert torch.linalg.eigvalsh(0.5 * (dense + dense.T)).min() > 0
    p2 = torch.randn(41, classes, dtype=torch.float64)
    assert float((p2 * pre(q)).sum()) == pytest.approx(float((q * pre(p2)).sum()), rel=1e-10)


def test_no_penalty_on_low_rank_features_stays_bounded():
    x = torch.zeros(50, 30)
    x[:, :3] = torch.randn(50, 3)  # rank 3 (4 with the bias column) in 31 dimensions
    u, ev = eig(x, rank=31)
    pre = LowRankPreconditioner(u, ev, 0.0, 5)
    out = pre(torch.randn(31, 5))
    assert torch.isfinite(out).all()
    assert float(out.abs().max()) < 1e9


def fit(x: np.ndarray, y: np.ndarray, *, lam: float, tol: float, precondition: bool,
        max_iter: int = 1000) -> dict:
    options = SolveOptions.from_kwargs(l2=lam, tol=tol, max_iter=max_iter, dtype="float64",
                                       device="cpu")
    out = {}
    _fit.fit_layers(ProbeData.from_arrays({"a": x}, y, None), ["a"], options,
                    lambda layer, rec: out.update(rec), precondition=precondition)
    return out


def test_preconditioning_reaches_a_lower_objective_in_a_tenth_of_the_iterations():
    x = correlated(600, 60, seed=4, decay=0.95).numpy()
    rng = np.random.default_rng(4)
    scores = x @ rng.normal(size=(60, 5))
    y = (scores / scores.std() + rng.gumbel(size=scores.shape)).argmax(axis=1)  # noisy
    plain = fit(x, y, lam=1e-4, tol=1e-7, precondition=False)
    pre = fit(x, y, lam=1e-4, tol=1e-7, precondition=True)
    assert pre["converged"]
    assert pre["objective"] <= plain["objective"] + 1e-12
    assert pre["iterations"] * 10 <= plain["iterations"], (pre["iterations"],
                                                            plain["iterations"])


def test_the_rank_is_recorded_in_the_run_config():
    rng = np.random.default_rng(0)
    res = engine.solve({"a": rng.normal(size=(60, 4)).astype(np.float32)},
                       labels=np.arange(60) % 3, l2=1e-2, progress=False, device="cpu")
    assert res.config["preconditioner"] == f"low-rank curvature, rank {RANK}"
