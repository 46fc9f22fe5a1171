"""kernels/softmax_xent.cu and its CuPy loader.

Everywhere (CI has no GPU): every .cu compiles with NVRTC for sm_80 and sm_90 with an empty
log, and the loader refuses bad arguments before any launch. On a GPU (``gpu`` marker): the
kernel against the torch reference on fresh random inputs.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch

import kernels
from kernels import cuda, nvrtc, reference

SOURCES = nvrtc.sources()


def test_the_kernel_sources_ship_as_package_data():
    assert cuda.SOURCE in SOURCES and cuda.SOURCE.name == "softmax_xent.cu"
    text = cuda.SOURCE.read_text()
    for name in cuda.KERNELS.values():
        assert f"DEFINE_KERNEL({name}," in text


@pytest.mark.parametrize("arch", nvrtc.ARCHITECTURES)
@pytest.mark.parametrize("source", SOURCES, ids=[p.name for p in SOURCES])
def test_compiles_with_nvrtc_without_a_warning(source, arch):
    cubin, log = nvrtc.compile_cubin(source, arch)
    assert log == "", log
    assert cubin[:4] == b"\x7fELF"  # a cubin is an ELF image
    for name in cuda.KERNELS.values():
        assert name.encode() in cubin  # extern "C": the names CuPy looks up


def test_compiling_leaves_the_interpreter_intact(tmp_path):
    """An empty log is one byte: NVRTC must not write it into CPython's shared b" "."""
    nvrtc.compile_cubin(SOURCES[0], "sm_90")
    assert bytes([32]) == b" " and b" "[0] == 32
    torch.save({"w": torch.arange(32.0)}, tmp_path / "w.pt")  # what broke, before the fix
    torch.testing.assert_close(torch.load(tmp_path / "w.pt", weights_only=True)["w"],
                               torch.arange(32.0))


def test_a_compile_error_or_warning_shows_in_the_log(tmp_path):
    warn = tmp_path / "warn.cu"
    warn.write_text('extern "C" __global__ void f(int* x) { int unused; x[0] = 1; }\n')
    _, log = nvrtc.compile_cubin(warn)
    assert "unused" in log and "warning" in log
    bad = tmp_path / "bad.cu"
    bad.write_text('extern "C" __global__ void f(int* x) { x[0] = y; }\n')
    with pytest.raises(nvrtc.CompileError, match=r"bad\.cu does not compile for sm_90"):
        nvrtc.compile_cubin(bad)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", nvrtc.ARCHITECTURES)
def test_compiles_with_nvcc_with_warnings_as_errors(arch, tmp_path):
    for source in SOURCES:
        run = subprocess.run(["nvcc", f"-arch={arch}", "-cubin", "-std=c++17",
                              "-Werror", "all-warnings", "-o", str(tmp_path / "k.cubin"),
                              str(source)], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert "warning" not in run.stderr


# -- argument checks: all before the launch, so they run on the CPU ----------------------
def _args(k=2, b=5, c=4, dtype=torch.float32):
    return torch.zeros(k, b, c, dtype=dtype), torch.zeros(b, dtype=torch.int64)


@pytest.mark.parametrize("bad, match", [
    (lambda: (torch.zeros(2, 5, 4, dtype=torch.float64), None), "float64 is not supported"),
    (lambda: (torch.zeros(5, 4), None), r"\(K, B, C\)"),
    (lambda: ([], None), "non-empty list"),
    (lambda: (torch.zeros(2, 4, 5).transpose(1, 2), None), "classes must be contiguous"),
    (lambda: ([torch.zeros(5, 4), torch.zeros(5, 8)[:, :4]], None), "same row stride"),
    (lambda: ([torch.zeros(5, 4), torch.zeros(5, 4, dtype=torch.float16)], None),
     "all must match"),
    (lambda: (None, torch.zeros(6, dtype=torch.int64)), r"labels must be \(5,\) int64"),
    (lambda: (None, torch.zeros(5, dtype=torch.int32)), r"labels must be \(5,\) int64"),
])
def test_bad_arguments_are_refused_before_launch(bad, match):
    logits, labels = _args()
    new_logits, new_labels = bad()
    logits = logits if new_logits is None else new_logits
    labels = labels if new_labels is None else new_labels
    with pytest.raises(ValueError, match=match):
        cuda.softmax_xent(logits, labels)


def test_a_wrong_output_buffer_is_refused():
    logits, labels = _args()
    with pytest.raises(ValueError, match="out must be 2 x"):
        cuda.softmax_xent(logits, labels, out=torch.zeros(2, 5, 3))
    with pytest.raises(ValueError, match="out must be 2 x"):
        cuda.softmax_xent(logits, labels, out=torch.zeros(2, 5, 4, dtype=torch.bfloat16))


def test_cpu_tensors_are_sent_to_the_reference():
    logits, labels = _args()
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        cuda.softmax_xent(logits, labels)
    assert not kernels.uses_cuda_kernel(torch.device("cpu"), torch.float32)
    g, loss, top1, _ = kernels.softmax_xent(torch.zeros(1, 3, 4), torch.tensor([0, 1, 2]))
    assert float(loss[0]) == pytest.approx(3 * np.log(4), rel=1e-6)
    torch.testing.assert_close(g[0, 0], torch.tensor([-0.75, 0.25, 0.25, 0.25]))


# -- on a GPU -----------------------------------------------------------------------------
def _problem(k, b, c, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(k, b, c, generator=gen)).to(dtype).cuda()
    labels = torch.randint(0, c, (b,), generator=gen).cuda()
    return logits, labels


def _poison(t: torch.Tensor) -> torch.Tensor:
    return t.fill_(float("nan"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("k", [1, 17])
@pytest.mark.parametrize("c", [2, 3, 10, 1000, 21841])
def test_kernel_matches_the_reference(dtype, k, c):
    assert cuda.available()
    b = 1000 + 37 if c < 21841 else 67  # not a multiple of the rows a block takes
    logits, labels = _problem(k, b, c, dtype, seed=c + k)
    labels[::7] = -1  # ignored rows
    scale = 1.0 / b
    want_g, want_loss, want1, want5 = reference.softmax_xent(logits.clone(), labels,
                                                             scale=scale)
    out = _poison(torch.empty_like(logits))  # every element must be written
    g, loss, top1, top5 = cuda.softmax_xent(logits, labels, scale=scale, out=out)
    assert g is out and not torch.isnan(out).any()
    rtol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(loss, want_loss.double(), rtol=rtol, atol=1e-3)
    torch.testing.assert_close(out.float(), want_g.float(), rtol=rtol,
                               atol=1e-7 if dtype == torch.float32 else 1e-5)
    assert (out[:, ::7] == 0).all()
    assert torch.equal(top1, want1) and torch.equal(top5, want5)
    # in place, and without the gradient: the same sums
    before = logits.clone()
    g2, loss2, t1, t5 = cuda.softmax_xent(logits, labels, scale=scale, grad=False)
    assert g2 is None and torch.equal(logits, before)
    assert torch.equal(t1, top1) and torch.equal(t5, top5)
    torch.testing.assert_close(loss2, loss)
    g3, _, _, _ = cuda.softmax_xent(logits, labels, scale=scale)
    assert g3 is logits and torch.equal(logits, out)


@pytest.mark.gpu
def test_strided_and_separate_buffers_match_the_reference():
    k, b, c = 3, 777, 10
    base, labels = _problem(1, b, k * c + 6, torch.float32, seed=1)
    z = base[0][:, : k * c]  # (B, K*C) inside a padded (B, K*C+6) buffer
    logits = z.view(b, k, c).transpose(0, 1)  # (K, B, C), probe stride C, row stride K*C+6
    want = reference.softmax_xent(logits.clone(), labels, scale=0.5)
    got = cuda.softmax_xent(logits, labels, scale=0.5)
    torch.testing.assert_close(got[0], want[0])
    assert torch.equal(got[2], want[2]) and torch.equal(got[3], want[3])
    separate = [torch.randn(b, c, device="cuda") for _ in range(k)]
    stacked = torch.stack(separate)
    want = reference.softmax_xent(stacked.clone(), labels)
    got = cuda.softmax_xent(separate, labels)
    torch.testing.assert_close(torch.stack(got[0]), want[0])
    torch.testing.assert_close(got[1], want[1].double())
