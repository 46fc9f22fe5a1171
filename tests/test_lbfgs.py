"""engine._lbfgs: the per-probe L-BFGS state machine on small closed-form problems."""

from __future__ import annotations

import torch

from engine._lbfgs import LBFGSState, WolfeSearch

F_ROUNDING = 1e-6  # float32 sums' (8 epsilons), given to these float64 problems


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
    reach: a line search either gives up after MAX_EVALS tries on a slightly lower point, or
    takes an approximate Wolfe step that does not shrink the gradient. The first such
    search restarts from H0, the second stops the probe, so it costs a few searches, not
    max_iter of them (each try is a pass over the data)."""
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


def test_a_step_whose_change_in_f_is_rounding_is_taken_on_the_gradients_word():
    """Hager-Zhang's approximate Wolfe point: f no lower than rounding allows, but the
    directional derivative shows the decrease (its Armijo test for a quadratic)."""
    f0, gd0 = 2.0, -1e-7
    up = 2.0 + 0.1 * F_ROUNDING * f0  # above the start by rounding only
    for f, gd, want in [(up, 0.5 * gd0, "accept"),  # derivative still descending
                        (up, -0.5 * gd0, "accept"),  # past the minimum, within (2d - 1) g0
                        (up, -0.85 * gd0, "continue"),  # too far past: a real overshoot
                        (2.0 + 10 * F_ROUNDING * f0, 0.5 * gd0, "continue")]:  # f really rose
        search = WolfeSearch(f0, gd0, 1.0, F_ROUNDING)
        assert search.observe(f, gd, torch.zeros(1)) == want, (f, gd)
        assert search.approximate == (want == "accept")


def test_at_the_rounding_of_f_the_derivatives_lead_the_search_on():
    """With the objective noisy at its rounding and exact gradients, a search that ranks
    points by f reads noise: it gave up after MAX_EVALS passes, twice, 6e-4 from the
    optimum here. Ranking them by the directional derivative there (and taking approximate
    Wolfe points) goes on to within 3e-5, at the noise-free run's passes per iteration."""
    a = ill_conditioned()
    f, opt = quadratic(a)
    noise = torch.Generator().manual_seed(1)
    calls = []

    def noisy(x):  # relative noise at F_ROUNDING's scale on f (about -1 near the optimum)
        calls.append(1)
        fx, g = f(x)
        return fx + 0.5 * F_ROUNDING * float(torch.rand(1, generator=noise,
                                                        dtype=torch.float64)), g

    st = minimise(LBFGSState(torch.zeros(30, 1, dtype=torch.float64), rounding=F_ROUNDING),
                  noisy, tol=1e-12)
    assert float((st.x - opt).abs().max()) < 1e-4
    assert len(calls) <= 1.5 * st.iterations, (len(calls), st.iterations)  # 1.35 noise-free
