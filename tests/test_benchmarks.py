"""The benchmark helpers that only run in full on a GPU: their CPU path, small."""

from __future__ import annotations

import pytest
import torch

from benchmarks import solve as bench


def test_resnet50_shaped_pass_reports_time_against_the_gemm_floor():
    r = bench.resnet50_pass(torch.device("cpu"), rows=256, classes=1000, repeats=1)
    assert r["sum_D"] == 15_168 and len(bench.RESNET50_WIDTHS) == 17
    assert r["pass_s"] > 0 and r["floor_s"] > 0 and r["matmul_tflops"] > 0
    flop = 4 * 256 * 15_168 * 1000
    assert r["floor_s"] == pytest.approx(flop / (r["matmul_tflops"] * 1e12), rel=0.01)
    assert r["ratio"] == round(r["pass_s"] / r["floor_s"], 2)
