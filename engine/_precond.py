"""A low-rank curvature preconditioner for softmax probes.

Features of neighbouring units are strongly correlated (pixels, channels of a feature map), so
the probe objective's Hessian has a few large eigenvalues and a long flat tail: L-BFGS from the
identity spends hundreds of iterations learning the large ones. At the start (W = 0, uniform
probabilities p = 1/C) the Hessian is exactly ``A (x) h M + lambda I`` with ``M = E[x x^T]``
the second moment of the features with a bias column, ``A = I - 1/C`` on the classes and
``h = (1/C)(1 - 1/C)``; it stays close to that in the directions that matter. We take the top
``rank`` eigenpairs of M by a randomized subspace iteration (Halko, Martinsson & Tropp, 2011,
algorithms 4.4 and 5.3: a few passes of two thin GEMMs over the features) and use

    H0 = [U diag(1 / (h lambda_i + lambda)) U^T + (I - U U^T) / (h lambda_r + lambda)]

as the initial inverse Hessian of L-BFGS (the same matrix for every class column). Only the
path changes: the objective, its optimum and the stopping test are untouched. This is the
Nystrom-preconditioning idea of Frangella, Tropp & Udell (2023) applied to L-BFGS's H0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

RANK = 100  # eigenpairs kept; what rank buys: docs/solve.md, Preconditioning
OVERSAMPLE = 28  # sketch width RANK + 28 = 128, a multiple of 16 for MKL's GEMMs
POWER_ITERATIONS = 2
_BLOCK_ROWS = 8192


def moment_of(x: torch.Tensor, dtype: torch.dtype = torch.float32
              ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``q -> E[x~ x~^T] q`` for x~ = [x, 1] of features x (N, D) in memory (any float
    dtype, upcast to ``dtype`` block by block): :func:`top_eigenpairs`' ``times``."""
    def times(q: torch.Tensor) -> torch.Tensor:
        n, d = x.shape
        out = torch.zeros_like(q)
        for r0 in range(0, n, _BLOCK_ROWS):
            xb = x[r0 : r0 + _BLOCK_ROWS].to(dtype)
            z = torch.addmm(q[d], xb, q[:d])  # (B, l)
            out[:d].addmm_(xb.T, z)  # X^T Z: MKL's fast orientation for a thin Z
            out[d] += z.sum(dim=0)
        return out.div_(n)

    return times


def top_eigenpairs(times: Callable[[torch.Tensor], torch.Tensor], d: int, rank: int = RANK,
                   *, dtype: torch.dtype = torch.float32, device: torch.device | None = None,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``rank`` largest eigenpairs of M, the second moment of ``[x, 1]``.

    ``times(q)``: ``M q`` for q (D+1, l) (a pass over the features of width ``d``, on
    ``device``, in ``dtype``). Returns ``(U (D+1, r), eigenvalues (r,))``, descending, with
    ``r = min(rank, D+1)``. Exact (one (D+1)^2 product) when D+1 is no wider than the sketch;
    else ``POWER_ITERATIONS + 2`` passes.
    """
    width = min(rank + OVERSAMPLE, d + 1)
    if width == d + 1:  # small layer: the whole matrix costs no more than a sketch
        m = times(torch.eye(d + 1, dtype=dtype, device=device))
        ev, u = torch.linalg.eigh(0.5 * (m + m.T))
    else:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        q = torch.randn(d + 1, width, generator=gen, dtype=dtype).to(device)
        for _ in range(POWER_ITERATIONS + 1):
            q = torch.linalg.qr(times(q)).Q
        t = q.T @ times(q)  # (l, l) Rayleigh-Ritz
        ev, v = torch.linalg.eigh(0.5 * (t + t.T))
        u = q @ v
    ev, u = ev.flip(0)[:rank].clamp_(min=0.0), u.flip(1)[:, :rank].contiguous()
    return u, ev


class LowRankPreconditioner:
    """H0 of L-BFGS for one probe, from the eigenpairs of its layer (see the module docs).

    Applies to (D+1, C) tensors shaped like the parameters (weights, then the bias row).
    """

    def __init__(self, u: torch.Tensor, ev: torch.Tensor, l2: float, classes: int):
        h = (1.0 / classes) * (1.0 - 1.0 / classes)
        # curvature along each kept eigenvector; floored so that lambda = 0 with features of
        # low rank (zero curvature off their span) keeps the map bounded
        curv = h * ev + l2
        curv = curv.clamp(min=float(curv.max()) * 1e-6)
        self.u = u
        # the rest of the space gets the smallest kept curvature (none when U spans it all)
        self.tail = 1.0 / float(curv[-1]) if len(ev) < u.shape[0] else 0.0
        self.coef = (1.0 / curv - self.tail).view(-1, 1)

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        return torch.addmm(q * self.tail, self.u, self.coef * (self.u.T @ q))
