"""Compile the kernel sources with NVRTC (``cuda.bindings.nvrtc``), no GPU needed.

CuPy compiles the same sources with NVRTC at run time; this is the check that they compile
for the target architectures on any machine (CI has no GPU), with the compiler's log.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ProbeEngineError

__all__ = ["sources", "compile_cubin", "CompileError", "ARCHITECTURES"]

ARCHITECTURES = ("sm_80", "sm_90")  # A100, H100 / H200
OPTIONS = ("--std=c++17",)


class CompileError(ProbeEngineError, RuntimeError):
    """NVRTC rejected a source; the message holds its log."""


def sources() -> list[Path]:
    """Every ``.cu`` file shipped in ``kernels/``."""
    return sorted(Path(__file__).parent.glob("*.cu"))


def compile_cubin(path: str | Path, arch: str = "sm_90") -> tuple[bytes, str]:
    """Compile ``path`` for ``arch``; returns the cubin and NVRTC's log (warnings), and raises
    :class:`CompileError` with the log when compilation fails."""
    from cuda.bindings import nvrtc

    path = Path(path)

    def check(result, what: str):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise CompileError(f"{path.name}: {what} failed: {err!r}")
        return rest[0] if len(rest) == 1 else rest

    prog = check(nvrtc.nvrtcCreateProgram(path.read_bytes(), path.name.encode(), 0, [], []),
                 "nvrtcCreateProgram")
    try:
        opts = [f"--gpu-architecture={arch}".encode(), *(o.encode() for o in OPTIONS)]
        (status,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        # NVRTC writes into the buffers it is given: they must be fresh mutable memory. A
        # `b" " * size` of size 1 (an empty log) is CPython's shared one-byte b" ", and
        # writing into it breaks every later user of b" " in the process (torch.save's
        # reader, for one)
        size = check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
        log = bytearray(size)
        check(nvrtc.nvrtcGetProgramLog(prog, log), "nvrtcGetProgramLog")
        text = bytes(log).rstrip(b"\0").decode(errors="replace").strip()
        if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise CompileError(f"{path.name} does not compile for {arch}:\n{text}")
        size = check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
        cubin = bytearray(size)
        check(nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        return bytes(cubin), text
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
