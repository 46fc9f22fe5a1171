#!/usr/bin/env bash
# The device check, one call: install the carried wheels, run the `gpu` tests, then the GPU
# capture, solve, kernel and ImageNet-scale benchmarks. Figures and logs land in $OUT.
#   run: bash benchmarks/gpu.sh [STEP ...]      (carry: .whl)
# STEP: tests capture solve kernel imagenet (default: all, about 9 minutes at most). A call
# cut short by the device's 10-minute limit is rerun with the steps it did not reach.
# .whl: ../shared/scripts/offline-wheels.sh   (zarr, numcodecs, dask, distributed and their
#       dependencies, about 12 MB: what the device image lacks. Its image holds torch, CuPy,
#       torchvision, scikit-learn, tqdm, fsspec and pandas (.library/device/KINDS.md,
#       2026-11-17); the versions line below shows what this run found.)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STEPS=" ${*:-tests capture solve kernel imagenet} "
step() { [[ $STEPS == *" $1 "* ]]; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
# engine.kernels is the top-level kernels/ folder (pyproject's package-dir); this tree is not
# installed, so a link stands in for the mapping
[ -e engine/kernels ] || ln -s ../kernels engine/kernels
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv \
    | tee "$OUT/gpu.txt"
python3 - <<'PY' 2>&1 | tee "$OUT/versions.txt"
import importlib
for name in ("torch", "cupy", "torchvision", "zarr", "numcodecs", "dask", "sklearn", "tqdm",
             "fsspec", "numpy"):
    try:
        print(name, importlib.import_module(name).__version__)
    except ImportError as e:
        print(name, "MISSING:", e)
PY
# only the files that hold gpu tests, and on past a module whose imports this machine lacks
# (should the image lose one): the gpu tests of the other files still run
step tests && timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts="" \
    -W default::DeprecationWarning --continue-on-collection-errors \
    tests/test_kernels_cuda.py tests/test_solve.py tests/test_build.py tests/test_features.py 2>&1 \
    | tee "$OUT/gpu-tests.log"
step capture && timeout 150 python3 -m benchmarks.capture --device cuda ${QUICK:+--quick} \
    --repeats 3 --json "$OUT/capture-cuda.json" 2>&1 | tee "$OUT/capture-cuda.log"
step solve && timeout 120 python3 -m benchmarks.solve --device cuda ${QUICK:+--quick} \
    --json "$OUT/solve-cuda.json" 2>&1 | tee "$OUT/solve-cuda.log"
step kernel && timeout 90 python3 -m benchmarks.kernel ${QUICK:+--quick} \
    --json "$OUT/kernel-cuda.json" 2>&1 | tee "$OUT/kernel-cuda.log"
# ours and the torch loop on the GPU at 50,000 rows; scikit-learn on this machine's CPU on
# 4,000 rows, scaled to 50,000 (cyanure is not in the image)
rows=${QUICK:+5000}
step imagenet && timeout 150 python3 -m benchmarks.imagenet_scale --device cuda \
    ${QUICK:+--quick} --rows "${rows:-50000}" --peer-rows 4000 \
    --peers sklearn-lbfgs torch-lbfgs \
    --json "$OUT/imagenet-cuda.json" 2>&1 | tee "$OUT/imagenet-cuda.log"
true
