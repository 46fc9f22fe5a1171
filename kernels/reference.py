"""Torch reference of the fused softmax-cross-entropy gradient kernel.

The CUDA kernel (``softmax_xent.cu``, loaded by :mod:`engine.kernels.cuda`) has this exact
signature; CPU solves run this reference, and the kernel tests compare against it.
"""

from __future__ import annotations

import torch

from ..errors import InvalidArgumentError

__all__ = ["softmax_xent"]


def softmax_xent(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    scale: float = 1.0,
    grad: bool = True,
    ignore_index: int = -1,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass over the logits of K probes sharing their labels.

    Args:
        logits: (K, B, C) float32 or float64 (any strides; float16 / bfloat16 are read in
            float32).
            With ``grad=True`` it is overwritten with the gradient, which is also returned.
        labels: (B,) int64 class indices in [0, C); rows labelled ``ignore_index`` count for
            nothing (no loss, no hit, zero gradient).
        scale: the gradient is ``(softmax(logits) - onehot(labels)) * scale``.

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
    # float32 and float64 are kept as they are; half precisions are read in float32
    z = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    keep = labels != ignore_index
    y = torch.where(keep, labels, 0)
    m = z.amax(dim=2, keepdim=True)
    lse = (z - m).exp_().sum(dim=2, keepdim=True).log_().add_(m)  # (K, B, 1)
    picked = z.gather(2, y.view(1, b, 1).expand(k, b, 1))  # (K, B, 1)
    loss = (lse - picked).squeeze(2).masked_fill_(~keep, 0.0).sum(dim=1)
    top1 = (z.argmax(dim=2) == y).logical_and_(keep).sum(dim=1)
    if c > 5:
        rank = (z > picked).sum(dim=2)  # classes strictly above the true one
        top5 = (rank < 5).logical_and_(keep).sum(dim=1)
    else:
        top5 = keep.sum().expand(k).clone()
    if not grad:
        return None, loss, top1, top5
    g = z.sub_(lse).exp_() if z.data_ptr() == logits.data_ptr() else (z - lse).exp_()
    g.scatter_add_(2, y.view(1, b, 1).expand(k, b, 1),
                   torch.full((k, b, 1), -1.0, dtype=g.dtype, device=g.device))
    g.mul_(keep.view(1, b, 1).to(g.dtype) * scale)
    if g.data_ptr() != logits.data_ptr():
        logits.copy_(g)
        g = logits
    return g, loss, top1, top5
