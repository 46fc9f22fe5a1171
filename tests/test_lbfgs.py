"""engine._lbfgs: the per-probe L-BFGS state machine on small closed-form problems."""

from __future__ import annotations

import torch

from engine._lbfgs import LBFGSState


def quadratic(a: torch.Tensor):
    """f(x) = 0.5 x^T A x - 1^T x for an SPD A; minimum at A^-1 1."""
    b = torch.ones(a.shape[0], 1, dtype=a.dtype)

    def f(x):
        return float(0.5 * (x * (a @ x)).sum() - (b * x).sum()), a @ x - b
    return f, torch.linalg.solve(a, b)


def minimise(state: LBFGSState, f, tol: float = 1e-6, max_iter: int = 500) -> LBFGSState:
    state.f, state.g = f(state.x)
    while not state.done:
        state.start_iteration()
        while True:
            fx, g = f(state.trial())
            status = state.search.observe(fx, float((g * state.d).sum()), g)
            if status == "accept":
                state.finish_iteration(state.search.accepted, tol, max_iter)
                break
            if status == "fail":
                state.fail(tol)
                break
    return state


def ill_conditioned(n: int = 30) -> torch.Tensor:
    q = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(0),
                                    dtype=torch.float64)).Q
    return q @ torch.diag(torch.logspace(0, 3, n, dtype=torch.float64)) @ q.T


def test_solves_an_ill_conditioned_quadratic():
    a = ill_conditioned()
    f, opt = quadratic(a)
    st = minimise(LBFGSState(torch.zeros(30, 1, dtype=torch.float64)), f)
    assert st.converged
    torch.testing.assert_close(st.x, opt, rtol=0, atol=1e-5)


def test_the_exact_inverse_as_preconditioner_solves_in_one_step():
    a = ill_conditioned()
    f, opt = quadratic(a)
    inv = torch.linalg.inv(a)
    st = minimise(LBFGSState(torch.zeros(30, 1, dtype=torch.float64),
                             precond=lambda q: inv @ q), f)
    assert st.iterations == 1 and st.converged
    torch.testing.assert_close(st.x, opt)


def test_a_stall_first_forgets_the_history_then_stops():
    st = LBFGSState(torch.zeros(3, 1, dtype=torch.float64))
    st.g = torch.ones(3, 1, dtype=torch.float64)
    st.s.append(torch.ones(3, 1)), st.y.append(torch.ones(3, 1)), st.rho.append(1 / 3)
    st.fail(tol=1e-6)
    assert not st.done and not st.s and st.stalled  # restart from H0
    st.fail(tol=1e-6)
    assert st.done and not st.converged  # twice in a row: stuck, and the gradient is large
    assert "no decrease" in st.reason


def test_searches_that_find_no_wolfe_point_twice_in_a_row_stop_the_probe():
    """At the precision limit the objective is noise below a scale the gradient test cannot
    reach: every line search gives up after MAX_EVALS tries on a slightly lower point. The
    first such search restarts from H0, the second stops the probe, so it costs a few
    searches, not max_iter of them (each try is a pass over the data)."""
    from engine._lbfgs import MAX_EVALS

    a = ill_conditioned()
    f, opt = quadratic(a)
    noise = torch.Generator().manual_seed(1)
    calls = []

    def noisy(x):  # the true objective plus noise far above the gradient's own scale
        calls.append(1)
        fx, g = f(x)
        return fx + 1e-6 * float(torch.rand(1, generator=noise, dtype=torch.float64)), g

    st = minimise(LBFGSState(torch.zeros(30, 1, dtype=torch.float64)), noisy, tol=1e-12,
                  max_iter=500)
    assert st.done and not st.converged and "precision limit" in st.reason
    assert len(calls) <= st.iterations + 3 * MAX_EVALS, (len(calls), st.iterations)
    torch.testing.assert_close(st.x, opt, rtol=0, atol=1e-2)  # near the optimum still
