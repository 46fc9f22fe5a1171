"""L-BFGS with a strong-Wolfe line search, one state machine per probe, and the batched
driver that runs them.

Every probe keeps its own parameters, history, step and convergence test
(:class:`LBFGSState`); the driver (:func:`fit`) evaluates the objective of every probe that
asks for a point in one pass over the data. That is the whole trick of the batched solver:
the arithmetic per probe is cheap (vectors of (D+1)*C numbers), the data pass is what costs,
and it is shared. Every pass serves each unfinished probe's next request, a line-search trial
or the first step of its next iteration, so no probe waits for another's line search: a
solve costs about as many passes as its slowest probe needs evaluations (a pass over row
shards on Dask workers is a round trip, and an out-of-core pass a read of the store).

The line search follows Nocedal & Wright, *Numerical Optimization* (2nd ed.), algorithms 3.5
(bracketing) and 3.6 (zoom), with safeguarded cubic interpolation. Near the optimum a step's
decrease of the objective falls below the rounding of its float32 sums, and the Armijo test
reads noise (a search then spent up to MAX_EVALS passes on it). Where f is within rounding
of the start, the search ranks points by their directional derivative instead (secant
steps) and accepts Hager & Zhang's approximate Wolfe point (SIAM J. Optim. 16(1), 2005):
the curvature condition and ``g.d <= (2 delta - 1) g0.d``, which for a quadratic is the
Armijo test read off the derivatives.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ._precond import LowRankPreconditioner, top_eigenpairs
from .objective import Point, ProbeObjective, Solution
from .options import LBFGSOptions

__all__ = ["LBFGSState", "WolfeSearch", "fit"]

C1, C2 = 1e-4, 0.9  # sufficient decrease, curvature (strong Wolfe)
DELTA = 0.1  # approximate Wolfe: g.d at the step <= (2 DELTA - 1) g.d at the start (Hager-Zhang)
ROUNDING_EPS = 8  # objective changes below this many epsilons of the arithmetic dtype
# (relative) are taken as rounding, not signal: float32 sums of the probe objective were
# seen to scatter by 0.4 epsilon (5e-8 of f = 6.3, 8,000 rows x 1,000 classes)
MAX_EVALS = 25  # per line search


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a.reshape(-1), b.reshape(-1)))


def _cubic_min(a: float, fa: float, ga: float, b: float, fb: float, gb: float) -> float:
    """Minimiser of the cubic through (a, fa, ga) and (b, fb, gb), kept inside [a, b] and
    away from its ends; bisection when the cubic has no minimum there."""
    lo, hi = min(a, b), max(a, b)
    d1 = ga + gb - 3 * (fa - fb) / (a - b)
    sq = d1 * d1 - ga * gb
    if sq >= 0:
        d2 = math.copysign(math.sqrt(sq), b - a)
        t = b - (b - a) * ((gb + d2 - d1) / (gb - ga + 2 * d2))
        if math.isfinite(t):
            margin = 0.1 * (hi - lo)
            return min(max(t, lo + margin), hi - margin)
    return (lo + hi) / 2


def _secant_zero(a: float, ga: float, b: float, gb: float) -> float:
    """Zero of the line through (a, ga) and (b, gb), kept inside [a, b] and away from its
    ends; bisection when the derivatives do not differ."""
    lo, hi = min(a, b), max(a, b)
    if gb != ga:
        t = a - ga * (b - a) / (gb - ga)
        if math.isfinite(t):
            margin = 0.1 * (hi - lo)
            return min(max(t, lo + margin), hi - margin)
    return (lo + hi) / 2


@dataclass
class _Point:
    alpha: float
    f: float
    gd: float  # directional derivative g . d
    g: torch.Tensor | None


class WolfeSearch:
    """Strong-Wolfe line search along ``d`` from (f0, g0 . d); ``propose`` gives the next
    step, ``observe`` takes its value and returns "accept", "continue" or "fail".
    ``rounding``: the relative change of f below which f cannot rank points (then the
    directional derivative does, see the module docs); 0: f ranks them all."""

    def __init__(self, f0: float, gd0: float, alpha0: float, rounding: float = 0.0):
        self.start = _Point(0.0, f0, gd0, None)
        self.rounding = rounding  # relative: f this close to f0 is f0 to working precision
        self.prev = self.start
        self.alpha = alpha0
        self.lo: _Point | None = None
        self.hi: _Point | None = None
        self.evals = 0
        self.best: _Point | None = None  # the lowest point seen, for a failed search
        self.accepted: _Point | None = None
        self.gave_up = False  # accepted the lowest point without the Wolfe conditions
        self.approximate = False  # accepted an approximate Wolfe point (f at its rounding)

    def propose(self) -> float:
        return self.alpha

    def observe(self, f: float, gd: float, g: torch.Tensor) -> str:
        pt = _Point(self.alpha, f, gd, g)
        self.evals += 1
        if math.isfinite(f) and (self.best is None or f < self.best.f):
            self.best = pt
        f0, gd0 = self.start.f, self.start.gd
        armijo = math.isfinite(f) and f <= f0 + C1 * pt.alpha * gd0
        curvature = abs(gd) <= -C2 * gd0
        if math.isfinite(f) and abs(f - f0) <= self.rounding * abs(f0):
            return self._by_derivative(pt, armijo, curvature)
        if self.lo is None:  # bracketing
            if not armijo or (self.evals > 1 and f >= self.prev.f):
                self.lo, self.hi = self.prev, pt
            elif curvature:
                self.accepted = pt
                return "accept"
            elif gd >= 0:
                self.lo, self.hi = pt, self.prev
            else:
                self.prev = pt
                self.alpha = pt.alpha * 2.0
                return self._budget()
        else:  # zoom
            if not armijo or f >= self.lo.f:
                self.hi = pt
            else:
                if curvature:
                    self.accepted = pt
                    return "accept"
                if gd * (self.hi.alpha - self.lo.alpha) >= 0:
                    self.hi = self.lo
                self.lo = pt
        return self._next_in_bracket()

    def _by_derivative(self, pt: _Point, armijo: bool, curvature: bool) -> str:
        """A point whose f is within rounding of the start's: f cannot rank it, so its
        directional derivative does. It is accepted when it meets the curvature condition
        and approximate Wolfe's ``g.d <= (2 DELTA - 1) g0.d`` (Armijo's test read off the
        derivatives, exact for a quadratic); else it extends the bracket (still
        descending) or bounds it (past the minimum along d)."""
        gd0 = self.start.gd
        if curvature and pt.gd <= (2 * DELTA - 1) * gd0:
            self.accepted, self.approximate = pt, not armijo
            return "accept"
        if self.lo is None:
            if pt.gd < 0:
                self.prev = pt
                self.alpha = pt.alpha * 2.0
                return self._budget()
            self.lo, self.hi = self.prev, pt
        elif pt.gd * (self.hi.alpha - pt.alpha) < 0:  # the minimum lies towards hi
            self.lo = pt
        else:
            self.hi = pt
        return self._next_in_bracket()

    def _next_in_bracket(self) -> str:
        """The next trial inside [lo, hi]: the cubic's minimiser, or where f cannot tell
        the two ends apart, the secant's zero of the directional derivative."""
        lo, hi = self.lo, self.hi
        if abs(hi.alpha - lo.alpha) * 1e6 < max(lo.alpha, hi.alpha, 1e-30):
            return self._give_up()
        if not math.isfinite(hi.f):
            self.alpha = (lo.alpha + hi.alpha) / 2
        elif abs(hi.f - lo.f) <= self.rounding * abs(self.start.f):
            self.alpha = _secant_zero(lo.alpha, lo.gd, hi.alpha, hi.gd)
        else:
            self.alpha = _cubic_min(lo.alpha, lo.f, lo.gd, hi.alpha, hi.f, hi.gd)
        return self._budget()

    def _budget(self) -> str:
        return "continue" if self.evals < MAX_EVALS else self._give_up()

    def _give_up(self) -> str:
        """Keep the lowest point if it decreased the objective at all, else fail."""
        if self.best is not None and self.best.f < self.start.f and self.best.g is not None:
            self.accepted, self.gave_up = self.best, True
            return "accept"
        return "fail"


@dataclass
class LBFGSState:
    """One probe's optimiser state: parameters ``x`` ((D+1, C) float), objective ``f``,
    gradient ``g``, the last ``history`` curvature pairs, and optionally ``precond``, a
    symmetric positive definite map M applied as the initial inverse Hessian."""

    x: torch.Tensor
    precond: Callable[[torch.Tensor], torch.Tensor] | None = None
    f: float = math.inf
    g: torch.Tensor | None = None
    history: int = 10
    s: deque = field(default_factory=deque)
    y: deque = field(default_factory=deque)
    rho: deque = field(default_factory=deque)
    iterations: int = 0
    evaluations: int = 0
    done: bool = False
    converged: bool = False
    reason: str = ""
    d: torch.Tensor | None = None
    search: WolfeSearch | None = None
    stalled: bool = False  # the last iteration made no progress; the next one restarts
    rounding: float | None = None  # the searches' (WolfeSearch); None: from x's dtype
    gmax: float = math.inf  # max |g| at x after the last iteration

    def direction(self) -> torch.Tensor:
        """-H g by the two-loop recursion; H0 = (s.y / y.y) I, or with a preconditioner M,
        H0 = (s.y / y.M y) M (M alone before the first step)."""
        q = -self.g.clone()
        alphas = []
        for s, y, rho in zip(reversed(self.s), reversed(self.y), reversed(self.rho),
                             strict=True):
            a = rho * _dot(s, q)
            alphas.append(a)
            q.add_(y, alpha=-a)
        if self.precond is not None:
            q = self.precond(q)
            if self.s:
                y = self.y[-1]
                q.mul_(_dot(self.s[-1], y) / _dot(y, self.precond(y)))
        elif self.s:
            q.mul_(_dot(self.s[-1], self.y[-1]) / _dot(self.y[-1], self.y[-1]))
        for (s, y, rho), a in zip(zip(self.s, self.y, self.rho, strict=True),
                                  reversed(alphas), strict=True):
            b = rho * _dot(y, q)
            q.add_(s, alpha=a - b)
        return q

    def start_iteration(self) -> None:
        self.d = self.direction()
        gd = _dot(self.g, self.d)
        if not gd < 0:  # not a descent direction (lost curvature): restart from -g
            self.s.clear(), self.y.clear(), self.rho.clear()
            self.d = -self.g
            gd = _dot(self.g, self.d)
        if self.s or self.precond is not None:  # a scaled direction: try the full step
            first = 1.0
        else:
            first = min(1.0, 1.0 / max(float(self.g.abs().sum()), 1e-30))
        rounding = self.rounding if self.rounding is not None else \
            ROUNDING_EPS * torch.finfo(self.x.dtype).eps
        self.search = WolfeSearch(self.f, gd, first, rounding)

    def trial(self) -> torch.Tensor:
        return self.x + self.search.propose() * self.d

    def finish_iteration(self, point: _Point, tol: float, max_iter: int) -> None:
        step = point.alpha * self.d
        y = point.g - self.g
        ys = _dot(y, step)
        if ys > 1e-10 * max(1.0, _dot(y, y)):
            if len(self.s) == self.history:
                self.s.popleft(), self.y.popleft(), self.rho.popleft()
            self.s.append(step), self.y.append(y), self.rho.append(1.0 / ys)
        f_old, gmax_old = self.f, self.gmax
        self.x = self.x + step
        self.f, self.g = point.f, point.g
        self.iterations += 1
        gave_up, approximate = self.search.gave_up, self.search.approximate
        self.search = None
        self.gmax = gmax = float(self.g.abs().max())
        if gmax <= tol:
            self.done, self.converged, self.reason = True, True, "gradient below tol"
        elif abs(f_old - self.f) <= 1e-12 * max(abs(f_old), abs(self.f), 1.0):
            self._stall(True, "objective stopped changing")
        elif approximate and gmax >= gmax_old:  # f is rounding, and the gradient, which
            # let the step through, did not shrink: it too may be at its precision
            self._stall(gmax <= 10 * tol, "objective at its rounding and the gradient not "
                        "shrinking (at the precision limit)")
        elif gave_up:  # a decrease, but no Wolfe point in MAX_EVALS tries: at the precision
            # limit such searches repeat every iteration, each costing MAX_EVALS passes
            self._stall(gmax <= 10 * tol,
                        "line search found no Wolfe point (at the precision limit)")
        else:
            self.stalled = False
        if not self.done and self.iterations >= max_iter:
            self.done, self.reason = True, "max_iter reached"

    def fail(self, tol: float) -> None:
        """No step decreased the objective: at the optimum to working precision, or stuck."""
        self.search = None
        self._stall(float(self.g.abs().max()) <= 10 * tol,
                    "line search found no decrease (at the precision limit)")

    def _stall(self, converged: bool, reason: str) -> None:
        """No progress: the curvature pairs may be stale, so the first time, forget them and
        go on from H0 (as L-BFGS-B does); twice in a row, stop."""
        if self.s and not self.stalled:
            self.s.clear(), self.y.clear(), self.rho.clear()
            self.stalled = True
            return
        self.done, self.converged, self.reason = True, converged, reason


# -- the batched driver ------------------------------------------------------------------
@dataclass
class _Probe:
    """One probe of the batch: its layer, its lambda, its task and its optimiser state."""

    layer: str
    l2: float
    state: LBFGSState
    task: str = ""

    def point(self, theta: torch.Tensor) -> Point:
        return Point(self.layer, self.l2, theta, self.task)

    def solution(self) -> Solution:
        st = self.state
        return Solution(self.layer, self.l2, st.x, st.iterations, st.evaluations, st.converged,
                        st.reason, self.task)


#: a layer's finished probes -> more (lambda, task) probes to fit for it, or none
More = Callable[[str, list[Solution]], Sequence[tuple[float, str]]]


def fit(objective: ProbeObjective, layers: Sequence[str], grid: Sequence[float],
        options: LBFGSOptions, on_layer: Callable[[str, list[Solution]], None], *,
        precondition: bool = True, progress: bool = False, tasks: Sequence[str] = ("",),
        more: More | None = None) -> None:
    """Solve one probe per (layer, lambda of ``grid``, task of ``tasks``) from zero to
    ``max|grad| <= tol`` (or ``max_iter``), all at once; ``on_layer(layer, solutions)`` as
    soon as every probe of a layer is done. Each round, every probe that needs a point is
    evaluated in one :meth:`ProbeObjective.evaluate` on "train"; a new probe's first point
    (zero) rides the same pass. With ``more``, a layer whose probes are all done may ask for
    more (lambda, task) probes (controls, MDL blocks at the lambda its grid chose): they
    join the running batch, and ``on_layer`` comes when ``more`` asks for none.
    With ``precondition``, each probe's initial inverse Hessian is the low-rank curvature
    map of its layer (:mod:`engine._precond`)."""
    c, n = objective.num_classes, objective.rows("train")
    eigs: dict[str, tuple | None] = {}
    for layer in layers:
        eigs[layer] = None
        if precondition:
            def times(q: torch.Tensor, layer: str = layer) -> torch.Tensor:
                return objective.moment_sums("train", layer, q).div_(n)

            eigs[layer] = top_eigenpairs(times, objective.dims[layer], dtype=objective.dtype,
                                         device=objective.device)

    def start(layer: str, l2: float, task: str) -> _Probe:
        eig = eigs[layer]
        pre = LowRankPreconditioner(*eig, l2, c) if eig else None
        x0 = torch.zeros(objective.dims[layer] + 1, c, dtype=objective.dtype,
                         device=objective.device)
        return _Probe(layer, l2, LBFGSState(x0, precond=pre), task)

    probes = [start(layer, l2, task) for layer in layers for task in tasks for l2 in grid]
    pending = set(layers)
    bar = tqdm(total=len(probes), unit="probe", disable=not progress, desc="solve")
    passes = 0
    while True:
        for layer in sorted(pending - {p.layer for p in probes if not p.state.done}):
            solutions = [p.solution() for p in probes if p.layer == layer]
            extra = more(layer, solutions) if more is not None else ()
            if extra:
                probes += [start(layer, l2, t) for l2, t in extra]
                bar.total = len(probes)
                continue
            pending.discard(layer)
            on_layer(layer, solutions)
        active = [p for p in probes if not p.state.done]
        if not active:
            break
        values = objective.evaluate("train", [p.point(p.state.x if p.state.g is None
                                                      else p.state.trial()) for p in active],
                                    grad=True, hits=False)
        for p, v in zip(active, values, strict=True):
            st = p.state
            if st.g is None:  # its first point: zero
                st.f, st.g = v.objective, v.gradient
                st.start_iteration()
                continue
            st.evaluations += 1
            status = st.search.observe(v.objective, _dot(v.gradient, st.d), v.gradient)
            if status == "accept":
                st.finish_iteration(st.search.accepted, options.tol, options.max_iter)
            elif status == "fail":
                st.fail(options.tol)
            else:
                continue
            if not st.done:  # its next iteration rides the next pass: nobody waits
                st.start_iteration()
        passes += 1
        bar.n = sum(p.state.done for p in probes)
        bar.set_postfix_str(f"pass {passes}", refresh=True)
    bar.close()
