"""Kernel benchmark: the fused softmax-cross-entropy kernel alone, on a GPU.

On K x B x C logits (default 17 x 65,536 x 1,000, float32 and bfloat16):

1. Achieved bandwidth: the fewest bytes the kernel must move (the logits read once, the
   gradient written once) over its time, against a device-to-device copy of the same bytes
   (read + write) on the same card. Target: at least 75% of the copy.
2. Against torch: ``F.cross_entropy`` forward + backward on the same logits (what a torch
   solver does for the same loss and gradient, without the hit counts). Target: at least
   1.5x faster.

Times are medians of CUDA-event-timed repeats after a warm-up; each repeat rotates between
two input buffers larger than the L2 cache.

    python -m benchmarks.kernel [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def _median_ms(fn, repeats: int) -> float:
    """Median milliseconds of ``fn(i)`` over ``repeats`` CUDA-event-timed calls."""
    fn(0)
    fn(1)
    torch.cuda.synchronize()
    times = []
    for i in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def bench(k: int, b: int, c: int, dtype: torch.dtype, repeats: int) -> dict:
    from engine.kernels import cuda, reference

    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = [(3 * torch.randn(k, b, c, device="cuda", generator=gen)).to(dtype)
              for _ in range(2)]
    labels = torch.randint(0, c, (b,), device="cuda", generator=gen)
    grads = [torch.empty_like(z) for z in logits]
    size = logits[0].numel() * logits[0].element_size()

    # correctness on these very inputs before timing them
    want = reference.softmax_xent(logits[0].clone(), labels, scale=1.0 / b)
    got = cuda.softmax_xent(logits[0], labels, scale=1.0 / b, out=grads[0].fill_(float("nan")))
    err = float((got[0].float() - want[0].float()).norm() / want[0].float().norm())
    assert err < (1e-5 if dtype == torch.float32 else 1e-2), err
    assert torch.equal(got[2], want[2]) and torch.equal(got[3], want[3])

    t_kernel = _median_ms(lambda i: cuda.softmax_xent(logits[i % 2], labels, scale=1.0 / b,
                                                      out=grads[i % 2]), repeats)
    t_copy = _median_ms(lambda i: grads[i % 2].copy_(logits[i % 2]), repeats)
    flat_y = labels.repeat(k)

    def torch_step(i):
        z = logits[i % 2].view(-1, c).detach().requires_grad_()
        F.cross_entropy(z.float() if dtype != torch.float32 else z, flat_y,
                        reduction="sum").backward()

    t_torch = _median_ms(torch_step, repeats)

    def gbps(ms: float) -> float:  # the bytes read plus the bytes written
        return 2 * size / (ms * 1e-3) / 1e9

    return {"case": f"{k} x {b} x {c} {str(dtype).removeprefix('torch.')}",
            "kernel_ms": t_kernel, "copy_ms": t_copy, "torch_ms": t_torch,
            "kernel_GBps": gbps(t_kernel), "copy_GBps": gbps(t_copy),
            "bandwidth_fraction": round(t_copy / t_kernel, 3), "target_fraction": 0.75,
            "speedup_vs_torch": round(t_torch / t_kernel, 2), "target_speedup": 1.5,
            "rel_error": err}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    from engine.kernels import cuda

    if not cuda.available():
        sys.exit("benchmarks.kernel needs a CUDA GPU and CuPy")
    k, b, c = (17, 8192, 1000) if args.quick else (17, 65_536, 1000)
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        r = bench(k, b, c, dtype, repeats=10 if args.quick else 50)
        print(r, flush=True)
        results.append({**r, "speedup": r["speedup_vs_torch"], "target": 1.5})
    print(f"\n{'case':<28} {'kernel ms':>10} {'GB/s':>8} {'of copy':>8} {'torch ms':>9} "
          f"{'speedup':>8}")
    for r in results:
        print(f"{r['case']:<28} {r['kernel_ms']:>10.3f} {r['kernel_GBps']:>8.0f} "
              f"{r['bandwidth_fraction']:>8.2f} {r['torch_ms']:>9.3f} {r['speedup']:>8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "device": torch.cuda.get_device_name(), "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
