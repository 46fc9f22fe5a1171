"""kernels/softmax_xent.cu and its CuPy loader.

Everywhere (CI has no GPU): every .cu compiles with NVRTC for sm_80 and sm_90 with an empty
log, and the loader refuses bad arguments before any launch. The kernel against the torch
reference on fresh random inputs: one test body, run on the kernel's source compiled for
the host (``tests/cuda_emulation``: fibers for threads, deterministic) everywhere, and on a
GPU (``gpu`` marker) with the real thing.
"""

from __future__ import annotations

import ctypes
import dataclasses
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import _fit, _tasks, kernels
from engine._features import FeatureCache
from engine._sources import ProbeData
from engine.errors import InvalidArgumentError
from engine.kernels import cuda, nvrtc, reference
from engine.objective import Point, ProbeObjective
from engine.options import SolveOptions

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
    with pytest.raises(InvalidArgumentError, match=match):
        cuda.softmax_xent(logits, labels)


def test_a_wrong_output_buffer_is_refused():
    logits, labels = _args()
    with pytest.raises(InvalidArgumentError, match="out must be 2 x"):
        cuda.softmax_xent(logits, labels, out=torch.zeros(2, 5, 3))
    with pytest.raises(InvalidArgumentError, match="out must be 2 x"):
        cuda.softmax_xent(logits, labels, out=torch.zeros(2, 5, 4, dtype=torch.bfloat16))


def test_cpu_tensors_are_sent_to_the_reference():
    logits, labels = _args()
    with pytest.raises(InvalidArgumentError, match="needs CUDA tensors"):
        cuda.softmax_xent(logits, labels)
    assert not kernels.uses_cuda_kernel(torch.device("cpu"), torch.float32)
    g, loss, top1, _ = kernels.softmax_xent(torch.zeros(1, 3, 4), torch.tensor([0, 1, 2]))
    assert float(loss[0]) == pytest.approx(3 * np.log(4), rel=1e-6)
    torch.testing.assert_close(g[0, 0], torch.tensor([-0.75, 0.25, 0.25, 0.25]))


# -- the kernel against its reference: emulated on the host everywhere, on a GPU too -------
EMULATION = Path(__file__).with_name("cuda_emulation")
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@pytest.fixture(scope="module")
def host_kernel(tmp_path_factory):
    """kernels/softmax_xent.cu compiled for the host (tests/cuda_emulation), behind
    cuda.softmax_xent's signature and argument checks (``cuda.plan``)."""
    lib = tmp_path_factory.mktemp("emulation") / "softmax_xent_host.so"
    build = subprocess.run(
        ["g++", "-std=c++20", "-O2", "-fPIC", "-shared", "-Wall", "-Wextra", "-Werror",
         "-Wno-unknown-pragmas", "-o", str(lib), str(EMULATION / "softmax_xent_host.cpp")],
        capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    fn = ctypes.CDLL(str(lib)).launch_softmax_xent
    fn.restype = None
    fn.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int,
                   ctypes.c_longlong, ctypes.c_longlong, ctypes.c_int, ctypes.c_float,
                   ctypes.c_longlong, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]

    def softmax_xent(logits, labels, *, scale=1.0, grad=True, ignore_index=-1, out=None,
                     hits=True, rows_per_warp=None):
        launch = cuda.plan(logits, labels, grad=grad, out=out)
        if rows_per_warp is not None:  # another layout than plan's, on the same arguments
            launch = dataclasses.replace(launch, rows_per_warp=rows_per_warp)
        k = len(launch.logits)
        loss = torch.zeros(k, dtype=torch.float64)
        top1, top5 = torch.zeros(k, dtype=torch.int64), torch.zeros(k, dtype=torch.int64)
        src = np.array([v.data_ptr() for v in launch.logits], dtype=np.int64)
        dst = np.array([v.data_ptr() for v in launch.grad], dtype=np.int64) if grad else None
        if launch.rows and launch.classes:
            fn(_DTYPE_CODES[launch.logits[0].dtype], *launch.grid, src.ctypes.data,
               None if dst is None else dst.ctypes.data, launch.labels.data_ptr(),
               launch.rows, launch.classes, *launch.row_strides, launch.rows_per_warp, scale,
               ignore_index, loss.data_ptr(), top1.data_ptr(), top5.data_ptr())
        result = (logits if out is None else out) if grad else None
        return (result, loss, top1, top5) if hits else (result, loss, None, None)

    return softmax_xent


@dataclass
class Backend:
    name: str
    device: str
    softmax_xent: Callable

    def rows(self, gpu: int, host: int) -> int:
        """A GPU takes full-size problems; the emulation, the same shapes with fewer rows."""
        return gpu if self.device == "cuda" else host


@pytest.fixture(params=["host", pytest.param("cuda", marks=pytest.mark.gpu)])
def kernel(request) -> Backend:
    if request.param == "cuda":
        assert cuda.available()
        return Backend("cuda", "cuda", cuda.softmax_xent)
    return Backend("host", "cpu", request.getfixturevalue("host_kernel"))


def _problem(k, b, c, dtype, seed, device):
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(k, b, c, generator=gen)).to(dtype).to(device)
    labels = torch.randint(0, c, (b,), generator=gen).to(device)
    return logits, labels


def _poison(t: torch.Tensor) -> torch.Tensor:
    return t.fill_(float("nan"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("k", [1, 17])
@pytest.mark.parametrize("c", [2, 3, 10, 1000, 21841])
def test_kernel_matches_the_reference(kernel, dtype, k, c):
    # not a multiple of the rows a block takes
    b = kernel.rows(1000 + 37, 37) if c < 21841 else kernel.rows(67, 9)
    logits, labels = _problem(k, b, c, dtype, seed=c + k, device=kernel.device)
    labels[::7] = -1  # ignored rows
    scale = 1.0 / b
    want_g, want_loss, want1, want5 = reference.softmax_xent(logits.clone(), labels,
                                                             scale=scale)
    out = _poison(torch.empty_like(logits))  # every element must be written
    g, loss, top1, top5 = kernel.softmax_xent(logits, labels, scale=scale, out=out)
    assert g is out and not torch.isnan(out).any()
    rtol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(loss, want_loss.double(), rtol=rtol, atol=1e-3)
    torch.testing.assert_close(out.float(), want_g.float(), rtol=rtol,
                               atol=1e-7 if dtype == torch.float32 else 1e-5)
    assert (out[:, ::7] == 0).all()
    assert torch.equal(top1, want1) and torch.equal(top5, want5)
    # in place, and without the gradient: the same sums
    before = logits.clone()
    g2, loss2, t1, t5 = kernel.softmax_xent(logits, labels, scale=scale, grad=False)
    assert g2 is None and torch.equal(logits, before)
    assert torch.equal(t1, top1) and torch.equal(t5, top5)
    torch.testing.assert_close(loss2, loss)
    g3, _, _, _ = kernel.softmax_xent(logits, labels, scale=scale)
    assert g3 is logits and torch.equal(logits, out)


def test_strided_and_separate_buffers_match_the_reference(kernel):
    k, b, c = 3, kernel.rows(777, 77), 10
    base, labels = _problem(1, b, k * c + 6, torch.float32, seed=1, device=kernel.device)
    labels %= c
    z = base[0][:, : k * c]  # (B, K*C) inside a padded (B, K*C+6) buffer
    logits = z.view(b, k, c).transpose(0, 1)  # (K, B, C), probe stride C, row stride K*C+6
    pad = base[0][:, k * c :].clone()
    want = reference.softmax_xent(logits.clone(), labels, scale=0.5)
    got = kernel.softmax_xent(logits, labels, scale=0.5)
    torch.testing.assert_close(got[0], want[0])
    assert torch.equal(got[2], want[2]) and torch.equal(got[3], want[3])
    assert torch.equal(base[0][:, k * c :], pad)  # the padding columns are not touched
    separate = [torch.randn(b, c, device=kernel.device) for _ in range(k)]
    stacked = torch.stack(separate)
    want = reference.softmax_xent(stacked.clone(), labels)
    got = kernel.softmax_xent(separate, labels)
    torch.testing.assert_close(torch.stack(got[0]), want[0])
    torch.testing.assert_close(got[1], want[1].double())


def test_ties_count_as_argmax_does(kernel):
    """Top-1: the label's class is the first maximum; top-5: fewer than five classes above."""
    c = 12
    logits = torch.tensor([[
        [1.0] * c,  # all tied: only class 0 is the argmax
        [1.0] * c,
        [0.0, 2.0, 2.0] + [0.0] * (c - 3),  # a tie at the top between 1 and 2
        [0.0, 2.0, 2.0] + [0.0] * (c - 3),
        [5.0, 4.0, 3.0, 2.0, 1.0, 1.0] + [0.0] * (c - 6),  # label 5 ties with 4: 4 above
        [5.0, 4.0, 3.0, 2.0, 1.0, 0.5] + [0.0] * (c - 6),  # label 6: 6 above
    ]], device=kernel.device)
    labels = torch.tensor([0, 3, 1, 2, 5, 6], device=kernel.device)
    want = reference.softmax_xent(logits.clone(), labels, grad=False)
    got = kernel.softmax_xent(logits, labels, grad=False)
    assert want[2].tolist() == [2] and want[3].tolist() == [5]  # rows 0, 2; all but row 5
    assert torch.equal(got[2], want[2]) and torch.equal(got[3], want[3])


def test_extreme_logits_stay_finite(kernel):
    logits = torch.tensor([[[1e30, -1e30, 0.0], [-1e30, -1e30, -1e30], [80.0, -80.0, 0.0]]],
                          device=kernel.device)  # exp() of any of them overflows
    labels = torch.tensor([1, 2, 0], device=kernel.device)
    g, loss, _, _ = kernel.softmax_xent(logits, labels)
    assert torch.isfinite(g).all() and torch.isfinite(loss).all()
    torch.testing.assert_close(g[0, 1], torch.tensor([1 / 3, 1 / 3, -2 / 3],
                                                     device=kernel.device))


def test_several_rows_per_warp_cover_every_row(host_kernel):
    """The layout of large launches (4 rows per warp), on a small emulated one."""
    logits, labels = _problem(3, 37, 10, torch.float32, seed=4, device="cpu")
    labels[::5] = -1
    want = reference.softmax_xent(logits.clone(), labels, scale=0.1)
    out = _poison(torch.empty_like(logits))
    got = host_kernel(logits, labels, scale=0.1, out=out, rows_per_warp=4)
    torch.testing.assert_close(out, want[0])
    torch.testing.assert_close(got[1], want[1].double())
    assert torch.equal(got[2], want[2]) and torch.equal(got[3], want[3])


def test_the_solvers_own_calls_run_through_the_kernel(host_kernel):
    """The solver's calls as they come on a GPU: logits of stacked layers in a (B, K*C)
    buffer seen as (K, B, C), the gradient in place, scale 1/N; through the kernel's checks
    and its code (emulated), against the reference."""
    rng = np.random.default_rng(12)
    y = rng.permutation(np.arange(120) % 3)
    xs = {name: rng.normal(size=(120, d)).astype(np.float32)
          for name, d in (("a", 6), ("b", 7), ("c", 3))}
    data = ProbeData.from_arrays(xs, y, None)
    objectives = {}
    for name, kernel in (("emulated", host_kernel), ("reference", "torch")):
        cache = FeatureCache(data, torch.device("cpu"), torch.float32, group=True)
        cache.load("train", data.layers)
        objectives[name] = ProbeObjective(cache, kernel=kernel)
    assert objectives["emulated"].features.runs(
        "train", {"a": [0, 1], "b": [2, 3], "c": [4, 5]}) == [["c"], ["a", "b"]]
    gen = torch.Generator().manual_seed(2)
    points = [Point(layer, lam, torch.randn(xs[layer].shape[1] + 1, 3, generator=gen))
              for layer in xs for lam in (1e-3, 1e-1)]
    for grad in (True, False):
        got = objectives["emulated"].evaluate("train", points, grad=grad)
        want = objectives["reference"].evaluate("train", points, grad=grad)
        for v1, v2 in zip(got, want, strict=True):
            assert v1.loss == pytest.approx(v2.loss, rel=1e-6)
            assert v1.objective == pytest.approx(v2.objective, rel=1e-6)
            assert (v1.top1_error, v1.top5_error) == (v2.top1_error, v2.top5_error)
            if grad:
                torch.testing.assert_close(v1.gradient, v2.gradient, rtol=1e-5, atol=1e-7)
    # SGD's minibatch gradient of a layer's probes, with float32 and with bfloat16 products;
    # with a control task beside them: two label rows, a kernel call per segment of probes
    theta = torch.randn(7 + 1, 4, 3, generator=gen)
    l2 = torch.tensor([1e-3, 1e-1, 1e-3, 1e-1])
    xb = torch.from_numpy(xs["b"][:50])
    y = data.labels["train"][:50]
    for low, labels in ((None, y), (torch.bfloat16, y), (None, torch.stack([y, y.flip(0)]))):
        got, want = (ProbeObjective(objectives[name].features, kernel=objectives[name].kernel,
                                    low=low).minibatch_gradient(xb, labels, theta, l2)
                     for name in ("emulated", "reference"))
        assert got.dtype == torch.float32
        tol = dict(rtol=1e-5, atol=1e-7) if low is None else dict(rtol=1e-2, atol=1e-4)
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("solver, dtype", [("sgd", "float32"), ("sgd", "bfloat16"),
                                           ("lbfgs", "float32")])
def test_whole_solves_run_through_the_kernel(host_kernel, solver, dtype):
    """Every call of a solve as it comes on a GPU: SGD's minibatch steps (in bfloat16: the
    kernel's bfloat16 variant on the bfloat16 logits), L-BFGS's passes, the metrics passes;
    through the kernel's checks and its code (emulated): the same probes as with the
    reference."""
    rng = np.random.default_rng(13)
    # unbalanced classes: no gradient entry is zero but for rounding, which Adam would turn
    # into steps of about lr, of either sign
    y = rng.choice(5, size=320, p=[0.4, 0.25, 0.15, 0.12, 0.08])
    x = (rng.normal(size=(5, 6))[y] + 2 * rng.normal(size=(320, 6))).astype(np.float32)
    data = ProbeData.from_arrays({"train": {"a": x[:240]}, "valid": {"a": x[240:]}},
                                 {"train": y[:240], "valid": y[240:]}, None)
    options = SolveOptions.from_kwargs(solver=solver, l2=[1e-4, 1e-2] if solver == "lbfgs"
                                       else 1e-3, epochs=2, early_stopping=False,
                                       batch_size=80, max_iter=3, dtype=dtype, device="cpu")
    seen = []

    def emulated(logits, labels, **kw):
        seen.append((logits.dtype, logits.shape[1]))
        return host_kernel(logits, labels, **kw)

    records = {}
    for name, kernel in (("emulated", emulated), ("reference", "torch")):
        _fit.fit_layers(data, ["a"], options, lambda layer, rec, name=name:
                        records.update({name: rec}), kernel=kernel)
    # SGD: minibatches of 80 rows in the product dtype; L-BFGS: passes over the 240 train
    # rows; both: metrics passes over the 80 valid rows in float32
    rows = 80 if solver == "sgd" else 240
    assert {(getattr(torch, dtype), rows), (torch.float32, 80)} <= set(seen)
    got, want = records["emulated"], records["reference"]
    rtol, atol = 1e-5, 1e-6 if solver == "lbfgs" else 1e-7
    assert (got["l2"], got["iterations"], got["converged"]) == (
        want["l2"], want["iterations"], want["converged"])
    assert got["objective"] == pytest.approx(want["objective"], rel=rtol)
    np.testing.assert_allclose(got["W"], want["W"], rtol=rtol, atol=atol)
    np.testing.assert_allclose(got["b"], want["b"], rtol=rtol, atol=atol)
    for split in ("train", "valid"):
        assert got["metrics"][split]["loss"] == pytest.approx(
            want["metrics"][split]["loss"], rel=rtol)



@pytest.mark.parametrize("group", [False, True], ids=["alone", "stacked"])
def test_the_tasks_passes_run_through_the_kernel(kernel, group):
    """The tasks' calls as they come on a GPU: tasks over every row take their probes'
    logits at a column offset of the shared (B, width) buffer, rows they leave out labelled
    -1; MDL blocks and few-shot draws run on their own gathered rows; through the kernel
    (emulated, or on a GPU), against the reference."""
    rng = np.random.default_rng(14)
    y = rng.permutation(np.arange(300) % 4)
    xs = {"a": rng.normal(size=(300, 8)).astype(np.float32)}
    xs["b"] = xs["a"][:, :5] * 0.5
    yt = torch.from_numpy(y)
    fit, score = _tasks.mdl_tasks(yt, [6, 60, 200, 300], seed=1)  # 200 of 300: every row
    tasks = [*fit, *score, *_tasks.few_shot_tasks({"train": yt}, 4, 3, 1, seed=2),
             _tasks.shuffled_task({"train": yt}, seed=3)]
    data = ProbeData.from_arrays(xs, y, None)
    options = SolveOptions.from_kwargs(device=kernel.device)
    objectives = {}
    for name, fn in (("kernel", kernel.softmax_xent), ("reference", "torch")):
        objectives[name] = _fit.objective_for(data, ["a", "b"], options, kernel=fn,
                                              group=group)
        objectives[name].add_tasks(tasks)
    obj = objectives["kernel"]
    assert obj.sparse_rows("mdl:1", "train") is not None  # gathered rows
    assert obj.sparse_rows("mdl:3", "train") is None  # at an offset, rows left out: -1
    gen = torch.Generator().manual_seed(4)
    names = {"a": ["", "mdl:3", "shuffled", "mdl:1", "shots:3:0"],
             "b": ["mdl:1:next", "", "mdl:3", "shuffled", "mdl:2"]}
    points = [Point(layer, lam, torch.randn(xs[layer].shape[1] + 1, 4, generator=gen)
                    .to(kernel.device), task)
              for layer, of in names.items()
              for lam, task in zip([1e-3, 1e-2, 1e-1, 1.0, 0.5], of, strict=True)]
    for grad in (True, False):
        got = objectives["kernel"].evaluate("train", points, grad=grad)
        want = objectives["reference"].evaluate("train", points, grad=grad)
        for p, v1, v2 in zip(points, got, want, strict=True):
            assert v1.objective == pytest.approx(v2.objective, rel=1e-6), p.task
            assert (v1.top1_error, v1.top5_error) == (v2.top1_error, v2.top5_error), p.task
            if grad:
                torch.testing.assert_close(v1.gradient, v2.gradient, rtol=1e-5, atol=1e-7)
