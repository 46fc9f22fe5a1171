"""Run every benchmark in its quick mode and print one table of ratios.

    python -m benchmarks [--device cuda]     (cuda adds the kernel benchmark; cpu the
                                              precision one)
"""

from __future__ import annotations

import argparse

from . import baselines, capture, imagenet_scale, kernel, precision, scaling, solve, text_capture

BENCHMARKS = {"capture": capture, "solve": solve, "scaling": scaling, "imagenet": imagenet_scale,
              "baselines": baselines}
GPU_ONLY = {"kernel": kernel}  # its own --quick sizes; no --device
CPU_ONLY = {"precision": precision, "text": text_capture}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    rows = []
    runs = [(name, module, ["--quick", "--device", args.device])
            for name, module in BENCHMARKS.items()]
    extra = GPU_ONLY if args.device != "cpu" else CPU_ONLY
    runs += [(name, module, ["--quick"]) for name, module in extra.items()]
    for name, module, argv in runs:
        for r in module.main(argv):
            if "speedup" in r:  # peer time / ours
                rows.append((name, r["case"], r["speedup"], r["target"], "speedup"))
            elif "ratio" in r:
                rows.append((name, r["case"], r["ratio"], r["target"],
                             r.get("kind") or "ours/peer"))
            elif "slope" in r:
                rows.append((name, r["case"], r["slope"], r["target"], "slope"))
    print(f"\n{'benchmark':<10} {'case':<45} {'figure':>14}  target")
    for name, case, value, target, kind in rows:
        if target is None or isinstance(target, str):
            verdict = ""
        elif kind in ("speedup", "efficiency"):  # higher is better
            verdict = "ok" if value >= target else "MISSED"
        else:
            verdict = "ok" if value <= target else "MISSED"
        shown = f"{kind} {value:.2f}"
        goal = "" if target is None else (f">= {target}" if kind in ("speedup", "efficiency") else
                                          f"{target}" if isinstance(target, str) else
                                          f"<= {target}")
        print(f"{name:<10} {case:<45} {shown:>14}  {goal}  {verdict}")


if __name__ == "__main__":
    main()
