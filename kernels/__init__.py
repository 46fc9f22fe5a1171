"""Kernels of the solver: CUDA sources (``.cu``, package data), their CuPy loaders, and the
torch references with the same signatures.

``softmax_xent`` picks the fused CUDA kernel for CUDA tensors of a supported dtype when CuPy is
installed, and the torch reference otherwise (CPU runs, float64, no CuPy).

This folder installs as ``engine.kernels``. Imported as a top-level ``kernels`` (a checkout's
root on ``sys.path``, as ``python -m pytest`` and ``python -m benchmarks`` put it), it would
shadow PyPI's ``kernels``, which ``transformers`` imports: that import is handed over to the
installed distribution (:mod:`._shadow`).
"""

from __future__ import annotations

if __name__ == "kernels":
    from ._shadow import hand_over

    hand_over()
else:
    from . import cuda, reference
    from ._api import softmax_xent, uses_cuda_kernel

__all__ = ["softmax_xent", "uses_cuda_kernel", "cuda", "reference"]
