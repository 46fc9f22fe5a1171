"""The kernels' public face (``engine.kernels``): the fused CUDA kernel where it runs, the
torch reference elsewhere."""

from __future__ import annotations

import torch

from . import cuda, reference

__all__ = ["softmax_xent", "uses_cuda_kernel"]


def uses_cuda_kernel(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :func:`softmax_xent` runs the fused CUDA kernel for logits on ``device``."""
    return device.type == "cuda" and dtype in cuda.KERNELS and cuda.available()


def softmax_xent(logits: torch.Tensor, labels: torch.Tensor, *, scale: float = 1.0,
                 grad: bool = True, ignore_index: int = -1, hits: bool = True):
    """Loss sums, hit counts and (in place) gradient of K probes' (K, B, C) logits; see
    :func:`engine.kernels.reference.softmax_xent` for the contract."""
    if uses_cuda_kernel(logits.device, logits.dtype):
        return cuda.softmax_xent(logits, labels, scale=scale, grad=grad,
                                 ignore_index=ignore_index, hits=hits)
    return reference.softmax_xent(logits, labels, scale=scale, grad=grad,
                                  ignore_index=ignore_index, hits=hits)
