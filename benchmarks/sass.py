"""Static cost of the fused kernel: SASS instructions per logit in its two inner loops.

The kernel reads every logit twice (the max / sum-of-exponentials sweep, then the gradient
sweep), so its time is the larger of its bytes over the memory bandwidth and its
instructions over the issue rate. This compiles ``kernels/softmax_xent.cu`` for a target
with ``nvcc -cubin``, disassembles it with ``cuobjdump --dump-sass`` and, for each entry
point, counts the instructions of every loop (a backward branch and the code it jumps back
over) per logit load in it. No GPU needed: nvcc and a cuobjdump (on PATH, or the one that
Triton's wheel carries) are.

    python -m benchmarks.sass [--arch sm_90] [--source FILE] [--json FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from engine.kernels import cuda, nvrtc

_INSTRUCTION = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BACK_BRANCH = re.compile(r"BRA (?:!?U?P\d, )?0x([0-9a-f]+)")


def cuobjdump() -> str | None:
    """A cuobjdump: on PATH, else the one in an installed Triton package."""
    found = shutil.which("cuobjdump")
    spec = importlib.util.find_spec("triton")
    if found is None and spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        found = str(candidate) if candidate.exists() else None
    return found


def loops(sass: str) -> list[dict]:
    """Every loop of one function's SASS: instructions, logit loads, MUFU operations."""
    code = [(int(m.group(1), 16), m.group(2)) for m in map(_INSTRUCTION.match,
                                                          sass.splitlines()) if m]
    index = {address: i for i, (address, _) in enumerate(code)}
    out = []
    for i, (address, text) in enumerate(code):
        m = _BACK_BRANCH.search(text)
        target = int(m.group(1), 16) if m else None
        if target is None or target >= address or target not in index:
            continue
        body = [re.sub(r"^@!?U?P\d+\s+", "", t).split()[0] for _, t in code[index[target]:i + 1]]
        ops = [op.split(".")[0] for op in body]
        loads = sum(op in ("LD", "LDG") for op in ops)
        out.append({"start": hex(target), "instructions": len(body), "loads": loads,
                    "mufu": ops.count("MUFU"),
                    "per_load": round(len(body) / loads, 1) if loads else None})
    return out


def measure(source: Path, arch: str) -> dict:
    tool = cuobjdump()
    if tool is None or shutil.which("nvcc") is None:
        sys.exit("benchmarks.sass needs nvcc and cuobjdump (pip install triton carries one)")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        build = subprocess.run(["nvcc", f"-arch={arch}", "-cubin", *nvrtc.OPTIONS,
                                "--resource-usage", "-o", str(cubin), str(source)],
                               capture_output=True, text=True, check=True)
        registers = dict(re.findall(r"Compiling entry function '(\w+)'.*?Used (\d+) registers",
                                    build.stderr, flags=re.S))
        result = {}
        for name in cuda.KERNELS.values():
            sass = subprocess.run([tool, "--dump-sass", "-fun", name, str(cubin)],
                                  capture_output=True, text=True, check=True).stdout
            # the two sweeps are the first two loops with a logit load each, unrolled 4x
            sweeps = [lp for lp in loops(sass) if lp["loads"] == 4][:2]
            result[name] = {"registers": int(registers.get(name, 0)), "sweeps": sweeps,
                            "per_logit": round(sum(s["per_load"] for s in sweeps), 1)}
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--source", type=Path, default=cuda.SOURCE)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    result = measure(args.source, args.arch)
    print(f"{'kernel':<20} {'registers':>9} {'sweep 1':>8} {'sweep 2':>8} {'per logit':>10}")
    for name, r in result.items():
        s1, s2 = (s["per_load"] for s in r["sweeps"])
        print(f"{name:<20} {r['registers']:>9} {s1:>8} {s2:>8} {r['per_logit']:>10}")
    if args.json:
        Path(args.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"),
                                               "arch": args.arch, "source": str(args.source),
                                               "kernels": result}, indent=2))
    return result


if __name__ == "__main__":
    main()
