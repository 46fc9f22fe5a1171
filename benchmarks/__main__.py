"""Run every benchmark in its quick mode and print one table of ratios.

    python -m benchmarks [--device cuda]
"""

from __future__ import annotations

import argparse

from . import capture

BENCHMARKS = {"capture": capture}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    rows = []
    for name, module in BENCHMARKS.items():
        for r in module.main(["--quick", "--device", args.device]):
            rows.append((name, r["case"], r["ratio"], r["target"]))
    print(f"\n{'benchmark':<10} {'case':<45} {'ours/peer':>9}  target")
    for name, case, ratio, target in rows:
        verdict = "ok" if ratio <= target else "MISSED"
        print(f"{name:<10} {case:<45} {ratio:>9.2f}  <= {target}  {verdict}")


if __name__ == "__main__":
    main()
