"""Torch reference of the fused softmax-cross-entropy gradient kernel.

The CUDA kernel (``softmax_xent.cu``, loaded by :mod:`engine.kernels.cuda`) has this exact
signature; CPU solves run this reference, and the kernel tests compare against it.
"""

from __future__ import annotations

import torch

from ..errors import InvalidArgumentError

__all__ = ["softmax_xent"]

#: floor of exp's argument ``z - max``. Below e^-87 float32's exp returns denormals, and x86
#: cores without flush-to-zero (torch sets it for one thread at most) compute those, and the
#: gradient's GEMM over them, tens of times slower: a pass of two ImageNet-sized probes
#: with logits as wide as at an L-BFGS trial point took 17.8 s against 0.39 s. Floored, a term
#: is at least e^-60 (8.7e-27 of the row's largest: nothing in a sum of them), and its
#: gradient, scaled by 1 / (N sum), stays a normal number for any N x C below 1e11.
EXP_FLOOR = -60.0


def softmax_xent(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    scale: float = 1.0,
    grad: bool = True,
    ignore_index: int = -1,
    hits: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One pass over the logits of K probes sharing their labels.

    Args:
        logits: (K, B, C) float32 or float64 (any strides; float16 / bfloat16 are read in
            float32).
            With ``grad=True`` it is overwritten with the gradient, which is also returned.
        labels: (B,) int64 class indices in [0, C); rows labelled ``ignore_index`` count for
            nothing (no loss, no hit, zero gradient).
        scale: the gradient is ``(softmax(logits) - onehot(labels)) * scale``.
        hits: count the top-1 / top-5 hits; without, both are None (an optimiser's passes
            need only the loss and gradient, and here the counts cost more than both).

    Returns:
        ``(grad or None, loss_sum (K,), top1_hits (K,) int64, top5_hits (K,) int64)``, the
        loss in the arithmetic dtype:
        the summed cross-entropy (natural log) and hit counts over the counted rows. With
        C <= 5 every counted row is a top-5 hit.
    """
    if logits.ndim != 3:
        raise InvalidArgumentError(f"logits must be (K, B, C), got shape {tuple(logits.shape)}")
    k, b, c = logits.shape
    if labels.shape != (b,):
        raise InvalidArgumentError(f"labels must be ({b},), got {tuple(labels.shape)}")
    keep = labels != ignore_index
    loss, top1, top5 = softmax_rows(logits, torch.where(keep, labels, 0), keep, scale,
                                    grad=grad, hits=hits)
    loss = loss.masked_fill_(~keep, 0.0).sum(dim=1)
    if hits:
        top1, top5 = (t.logical_and_(keep).sum(dim=1) for t in (top1, top5))
    return (logits if grad else None), loss, top1, top5


def softmax_rows(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
                 scale: float, *, grad: bool, hits: bool) -> tuple[torch.Tensor, ...]:
    """The per-row pass under :func:`softmax_xent` (and the row-weighted kernel of
    :mod:`engine.objective`): logits (K, B, C), labels (B,) in [0, C), weight (B,) each
    row's weight (0: not counted). Returns, per probe and row (K, B), the cross-entropy and,
    with ``hits``, the top-1 and top-5 hit masks (else None); with ``grad`` the logits are
    overwritten with ``(softmax - onehot) * weight * scale``."""
    k, b, c = logits.shape
    # float32 and float64 are kept as they are; half precisions are read in float32
    z = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    at = labels.view(1, b, 1).expand(k, b, 1)
    picked = z.gather(2, at)  # (K, B, 1)
    # one read gives the row max and the first index of it (argmax's tie rule); a bool
    # summed as uint8 counts about 1.7x faster than as bool: every pass reads K x B x C
    top1 = top5 = None
    if hits:
        m, top = z.max(dim=2, keepdim=True)
        top1 = top.squeeze(2) == labels
        if c > 5:  # fewer than 5 classes strictly above the label's
            top5 = torch.gt(z, picked).view(torch.uint8).sum(dim=2, dtype=torch.int32) < 5
        else:
            top5 = torch.ones_like(top1)
    else:
        m = z.amax(dim=2, keepdim=True)
    # exp once, over the logits themselves when they get the gradient (no K x B x C
    # temporary), normalised by its row sum: each row of the gradient then sums to zero to
    # rounding, which exp(z - lse) with lse rounded does not (lse's rounding in every entry)
    e = z.sub_(m) if grad and z.data_ptr() == logits.data_ptr() else z - m
    e = e.clamp_(min=EXP_FLOOR).exp_()
    s = e.sum(dim=2, keepdim=True)
    loss = s.log().add_(m).sub_(picked).squeeze(2)
    if grad:
        w = weight.to(e.dtype).view(1, b, 1) * scale
        e.mul_(w / s).scatter_add_(2, at, (-w).expand(k, b, 1))
        if e.data_ptr() != logits.data_ptr():
            logits.copy_(e)
    return loss, top1, top5
