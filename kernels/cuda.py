"""CuPy loader of the fused softmax-cross-entropy kernel (``softmax_xent.cu``).

The source ships as package data and is compiled by CuPy's ``RawModule`` (NVRTC) on first use,
once per device; nothing is compiled at import, and CuPy itself is imported only then. Tensors
stay torch tensors: the kernel reads and writes their memory in place (the small argument
arrays cross to CuPy through DLPack, without a copy), on torch's current stream.

A raw kernel trusts its pointers, so every launch first checks dtypes, devices, shapes and
strides, and says what is wrong.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InvalidArgumentError
from . import nvrtc

__all__ = ["available", "softmax_xent", "plan", "Launch", "SOURCE", "KERNELS"]

SOURCE = Path(__file__).with_name("softmax_xent.cu")
#: kernel name per logits dtype (arithmetic is float32 for all three)
KERNELS = {torch.float32: "softmax_xent_f32", torch.float16: "softmax_xent_f16",
           torch.bfloat16: "softmax_xent_bf16"}
WARPS_PER_BLOCK = 8  # as in the .cu
_MAX_PROBES = 65_535  # grid.y


@functools.cache
def available() -> bool:
    """True when CuPy imports and torch sees a CUDA device."""
    if not torch.cuda.is_available():
        return False
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _module(device: int):
    import cupy

    with cupy.cuda.Device(device):
        return cupy.RawModule(code=SOURCE.read_text(), options=nvrtc.OPTIONS)  # as tested


@functools.cache
def _function(device: int, name: str):
    import cupy

    with cupy.cuda.Device(device):
        return _module(device).get_function(name)


def _as_probes(x: torch.Tensor | Sequence[torch.Tensor], what: str) -> list[torch.Tensor]:
    """(K, B, C) tensor, or K (B, C) tensors -> K (B, C) views."""
    if isinstance(x, torch.Tensor):
        if x.ndim != 3:
            raise InvalidArgumentError(f"{what} must be (K, B, C) or a list of (B, C), got shape "
                             f"{tuple(x.shape)}")
        return list(x.unbind(0))
    views = list(x)
    if not views or any(not isinstance(v, torch.Tensor) or v.ndim != 2 for v in views):
        raise InvalidArgumentError(f"{what} must be (K, B, C) or a non-empty list of (B, C) "
                                   f"tensors")
    return views


def _check_layout(views: list[torch.Tensor], what: str) -> None:
    """Same shape, dtype and device for every probe; contiguous classes; one row stride."""
    shape, dtype, device = views[0].shape, views[0].dtype, views[0].device
    row = views[0].stride(0)
    for k, v in enumerate(views):
        if v.shape != shape or v.dtype != dtype or v.device != device:
            raise InvalidArgumentError(f"{what}[{k}] is {tuple(v.shape)} {v.dtype} on "
                                       f"{v.device}, probe 0 is {tuple(shape)} {dtype} on "
                                       f"{device}: all must match")
        if v.shape[1] > 1 and v.stride(1) != 1:
            raise InvalidArgumentError(f"{what}[{k}]: classes must be contiguous (stride 1), "
                                       f"got strides {v.stride()}; pass .contiguous()")
        if v.shape[0] > 1 and v.stride(0) != row:
            raise InvalidArgumentError(f"{what}: every probe needs the same row stride, got "
                                       f"{row} and {v.stride(0)} (probe {k})")


def _table(views: list[torch.Tensor]) -> torch.Tensor:
    """(K,) int64 array of the probes' base addresses, on their device."""
    return torch.tensor([v.data_ptr() for v in views], dtype=torch.int64,
                        device=views[0].device)


@dataclass
class Launch:
    """One checked launch of the kernel: what to read and write, and the grid."""

    kernel: str  # the entry point, per dtype
    logits: list[torch.Tensor]  # K (B, C) views
    grad: list[torch.Tensor] | None  # where the gradient goes (the logits, or out=)
    labels: torch.Tensor  # (B,) int64, contiguous
    rows: int
    classes: int
    rows_per_warp: int

    @property
    def grid(self) -> tuple[int, int]:
        """(row blocks, K): a block takes WARPS_PER_BLOCK * rows_per_warp rows."""
        return -(-self.rows // (WARPS_PER_BLOCK * self.rows_per_warp)), len(self.logits)

    @property
    def row_strides(self) -> tuple[int, int]:
        """Elements between rows of the logits, and of the gradient (0 without one)."""
        return self.logits[0].stride(0), self.grad[0].stride(0) if self.grad else 0


def plan(
    logits: torch.Tensor | Sequence[torch.Tensor],
    labels: torch.Tensor,
    *,
    grad: bool = True,
    out: torch.Tensor | Sequence[torch.Tensor] | None = None,
) -> Launch:
    """Check the arguments of :func:`softmax_xent` (anything but the device) and lay out
    its launch: one warp per (probe, row), ``rows_per_warp`` rows each on large inputs."""
    views = _as_probes(logits, "logits")
    dtype, device = views[0].dtype, views[0].device
    if dtype not in KERNELS:
        raise InvalidArgumentError(f"logits dtype {dtype} is not supported: use one of "
                                   f"{sorted(str(d) for d in KERNELS)}")
    k = len(views)
    b, c = views[0].shape
    if k > _MAX_PROBES:
        raise InvalidArgumentError(f"{k} probes in one launch; at most {_MAX_PROBES}: split "
                                   f"the call")
    if labels.shape != (b,) or labels.dtype != torch.int64 or labels.device != device:
        raise InvalidArgumentError(f"labels must be ({b},) int64 on {device}, got "
                                   f"{tuple(labels.shape)} {labels.dtype} on {labels.device}")
    _check_layout(views, "logits")
    target = None
    if grad:
        target = views if out is None else _as_probes(out, "out")
        if (len(target) != k or target[0].shape != (b, c) or target[0].dtype != dtype
                or target[0].device != device):
            raise InvalidArgumentError(f"out must be {k} x ({b}, {c}) {dtype} on {device}, "
                                       f"like logits")
        _check_layout(target, "out")
    # several rows per warp once there are enough rows to fill the card many times over:
    # fewer blocks, each reduction and atomic covering more rows
    rows_per_warp = 4 if b >= 4 * WARPS_PER_BLOCK * 1024 else 1
    return Launch(KERNELS[dtype], views, target, labels.contiguous(), b, c, rows_per_warp)


def softmax_xent(
    logits: torch.Tensor | Sequence[torch.Tensor],
    labels: torch.Tensor,
    *,
    scale: float = 1.0,
    grad: bool = True,
    ignore_index: int = -1,
    out: torch.Tensor | Sequence[torch.Tensor] | None = None,
    hits: bool = True,
) -> tuple[torch.Tensor | list[torch.Tensor] | None, torch.Tensor, torch.Tensor | None,
           torch.Tensor | None]:
    """The fused kernel; the signature of :func:`engine.kernels.reference.softmax_xent`.

    Args:
        logits: (K, B, C) CUDA tensor (any probe and row strides, classes contiguous) or K
            (B, C) tensors with a common row stride; float32, float16 or bfloat16.
        labels: (B,) int64 on the same device; ``ignore_index`` rows count for nothing.
        scale: the gradient is ``(softmax(logits) - onehot(labels)) * scale``.
        grad: write the gradient (into ``out``, else over ``logits``).
        out: where the gradient goes, shaped and typed like ``logits``.
        hits: return the hit counts (the kernel counts them in the same sweep whatever
            this says; without, both are None, as the reference's).

    Returns:
        ``(gradient or None, loss_sum (K,) float64, top1_hits (K,) int64, top5_hits (K,)
        int64)``; the gradient is ``out`` (or ``logits``) itself.
    """
    launch = plan(logits, labels, grad=grad, out=out)
    device = launch.labels.device
    if device.type != "cuda":
        raise InvalidArgumentError(f"logits are on {device}; the CUDA kernel needs CUDA "
                                   f"tensors (CPU runs use engine.kernels.reference)")
    import cupy  # only now: CPU-only installs never need it

    k = len(launch.logits)
    loss = torch.zeros(k, dtype=torch.float64, device=device)
    top1 = torch.zeros(k, dtype=torch.int64, device=device)
    top5 = torch.zeros(k, dtype=torch.int64, device=device)
    if launch.rows and launch.classes:
        src = _table(launch.logits)
        dst = _table(launch.grad) if grad else None
        src_row, dst_row = launch.row_strides
        stream = torch.cuda.current_stream(device)
        with cupy.cuda.Device(device.index), cupy.cuda.ExternalStream(stream.cuda_stream,
                                                                      device.index):
            fn = _function(device.index, launch.kernel)
            null = cupy.uint64(0)
            fn(launch.grid, (32 * WARPS_PER_BLOCK,), (
                cupy.from_dlpack(src), cupy.from_dlpack(dst) if grad else null,
                cupy.from_dlpack(launch.labels), cupy.int64(launch.rows),
                cupy.int32(launch.classes), cupy.int64(src_row), cupy.int64(dst_row),
                cupy.int32(launch.rows_per_warp), cupy.float32(scale),
                cupy.int64(ignore_index), cupy.from_dlpack(loss), cupy.from_dlpack(top1),
                cupy.from_dlpack(top5)))
    result = None
    if grad:
        result = logits if out is None else out
    return (result, loss, top1, top5) if hits else (result, loss, None, None)
