"""Ridge-regression probes: each layer's least-squares classifier in closed form, every
lambda of the grid from one eigendecomposition.

Per probe k, with features X (N, D_k), targets Y (N, C) the one-hot labels mapped to
{-1, +1} (scikit-learn's ``RidgeClassifier`` encoding) and L2 strength lambda::

    R_k(W, b) = (1/(2N)) ||Y - X W - 1 b||_F^2 + (lambda / 2) ||W||_F^2

(b is not penalised): the per-row scale of the rest of probe-engine, so its minimum is
scikit-learn's ``Ridge`` / ``RidgeClassifier(alpha=lambda*N)``. With mu, ybar the column
means and Xc = X - 1 mu^T, Yc = Y - 1 ybar^T (centring takes the unpenalised intercept out)::

    (Xc^T Xc + N lambda I) W = Xc^T Yc,    b = ybar - mu W

One pass over train accumulates the column sums, X^T X (D, D) and X^T Y (D, C) in float64;
one ``eigh`` of the centred Gram, Xc^T Xc = V diag(e) V^T, then gives every lambda's
W = V diag(1 / (e + N lambda)) V^T Xc^T Yc with one (D, D) x (D, K*C) product.

Directions with e <= :data:`RCOND` * max(e) are taken as exactly singular, and W gets no
component along them, for every lambda: the ridge solution lies in the row space of Xc, and
at lambda = 0 this is the pseudo-inverse's (the minimum-norm least-squares W, the limit of
ridge as lambda -> 0) instead of a division by roundoff.

The (D, D) float64 Gram is solver state, not features: ``max_memory`` does not count it, and
a layer wider than :data:`MAX_GRAM_BYTES` allows is refused (:func:`check`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .errors import MemoryBudgetError
from .objective import BLOCK_BYTES, ProbeObjective, Solution

__all__ = ["MAX_GRAM_BYTES", "RCOND", "check", "fit", "solve_sums", "sums"]

#: the largest Gram matrix a ridge solve builds, bytes (D^2 float64: D <= 16,384);
#: ``eigh`` needs about as much again for the eigenvectors and its workspace
MAX_GRAM_BYTES = 2 << 30
#: eigenvalues at or below this times the largest are exact zeros (float64 ``eigh`` is
#: accurate to about 1e-16 times the largest, so this is roundoff with a wide margin)
RCOND = 1e-12


def check(dims: dict[str, int], layers: Sequence[str]) -> None:
    """Raise :class:`MemoryBudgetError` for the first of ``layers`` whose Gram matrix is
    larger than :data:`MAX_GRAM_BYTES` (before anything is read)."""
    for layer in layers:
        d = dims[layer]
        need = d * d * 8
        if need > MAX_GRAM_BYTES:
            raise MemoryBudgetError(
                f"layer {layer!r} of split 'train' has {d:,} features: its ridge Gram matrix "
                f"X^T X ({d:,} x {d:,} float64) needs {need:,} bytes, above the "
                f"{MAX_GRAM_BYTES:,} a ridge solve allows (and eigh needs as much again). "
                f"Build the store with fewer features for it (reduce='subsample:K' or "
                f"'pool'), or use solver='lbfgs', whose state is (D+1) x C per probe")


def sums(objective: ProbeObjective, layer: str
         ) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass over ``layer``'s train rows: ``(N, mu (D,), ybar (C,), Xc^T Xc (D, D),
    Xc^T Yc (D, C))``, all float64 on the objective's device, Y the {-1, +1} targets.

    float64 whatever the features: a Gram is a sum of N products, and its small eigenvalues
    (the ones lambda competes with) are differences of its large entries; float32's 7 digits
    lose them (a Gram's condition number is the square of X's). float16 / float32 features
    are exact in float64, so these sums are as good as the features. The rows are shifted by
    the first block's means before summing, so that centring (X^T X - N mu mu^T) does not
    cancel the leading digits of features far from zero (post-ReLU activations are).
    """
    d, c = objective.dims[layer], objective.num_classes
    dev, f64 = objective.device, torch.float64
    y = objective.features.labels("train")
    n = objective.rows("train")
    gram = torch.zeros(d, d, dtype=f64, device=dev)
    cross = torch.zeros(d, c, dtype=f64, device=dev)
    total = torch.zeros(d, dtype=f64, device=dev)
    shift = None
    rows = max(256, BLOCK_BYTES // (8 * (d + c)))  # the float64 block and its targets
    for r0, xb in objective.features.blocks("train", [layer], rows):  # xb (1, B, D)
        x = xb[0].to(f64)
        if shift is None:
            shift = x.mean(dim=0)
        x = x - shift  # a new tensor: xb may be a view of the resident features
        t = torch.full((x.shape[0], c), -1.0, dtype=f64, device=dev)
        t.scatter_(1, y[r0 : r0 + x.shape[0], None], 1.0)  # one-hot as {-1, +1}
        gram.addmm_(x.T, x)
        cross.addmm_(x.T, t)  # a GEMM, not index_add: deterministic on CUDA as well
        total += x.sum(dim=0)
    ybar = 2.0 * torch.bincount(y, minlength=c).to(f64) / n - 1.0
    m = total / n  # the mean of the shifted rows
    gram.sub_(torch.outer(m, m), alpha=n)  # Xc^T Xc: centring is shift-invariant
    cross.sub_(torch.outer(m, ybar), alpha=n)  # Xc^T Yc = (X - s)^T Y - N m ybar^T
    return n, shift + m, ybar, gram, cross


def solve_sums(n: int, mu: torch.Tensor, ybar: torch.Tensor, gram: torch.Tensor,
               cross: torch.Tensor, grid: Sequence[float]) -> torch.Tensor:
    """Every lambda's ``theta`` ((D+1, K, C) float64: W rows, then b) from the centred sums
    of :func:`sums`: one ``eigh`` of the Gram, one product for all K lambdas."""
    d, c = cross.shape
    e, v = torch.linalg.eigh(gram)
    null = e <= RCOND * e.max().clamp(min=0)
    alphas = torch.tensor([n * l2 for l2 in grid], dtype=e.dtype, device=e.device)
    # the singular directions get 1 / inf = 0 for every lambda (pseudo-inverse at lambda = 0)
    denom = torch.where(null[:, None], torch.inf, e[:, None] + alphas[None, :])  # (D, K)
    p = v.T @ cross  # (D, C)
    k = len(grid)
    w = (v @ (p[:, None, :] / denom[:, :, None]).reshape(d, k * c)).view(d, k, c)
    b = ybar[None, :] - torch.einsum("d,dkc->kc", mu, w)  # (K, C)
    return torch.cat([w, b[None]], dim=0)


def fit(objective: ProbeObjective, layers: Sequence[str], grid: Sequence[float],
        on_layer: Callable[[str, list[Solution]], None], *, progress: bool = False) -> None:
    """The ridge probes of ``layers`` for every lambda of ``grid`` (see the module docs):
    one pass over each layer's train rows, then ``on_layer(layer, solutions)`` with
    ``theta`` (D+1, C) in the objective's dtype, 1 iteration and 1 evaluation (the pass),
    converged, reason "closed form". Every layer's Gram is checked (:func:`check`) before
    any is summed."""
    check(objective.dims, layers)
    bar = tqdm(total=len(layers), unit="layer", disable=not progress, desc="solve (ridge)")
    for layer in layers:
        theta = solve_sums(*sums(objective, layer), grid).to(objective.dtype)
        on_layer(layer, [Solution(layer, l2, theta[:, i].contiguous(), 1, 1, True,
                                  "closed form") for i, l2 in enumerate(grid)])
        bar.update()
    bar.close()
