#!/usr/bin/env bash
# The device check, one call: install the carried wheels, run the `gpu` tests, then the GPU
# capture, kernel and solve benchmarks. Figures and logs land in $OUT.
#   run: bash benchmarks/gpu.sh      (carry: .whl)
# .whl: ../shared/scripts/offline-wheels.sh scikit-learn==1.9.1 scipy==1.17.1 joblib==1.6.0 \
#       threadpoolctl==3.8.0 hypothesis==6.170.17 attrs tqdm==4.70.1 fsspec==2026.9.0
#       (the engine imports tqdm, the tests sklearn and hypothesis; about 60 MB)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv \
    | tee "$OUT/gpu.txt"
python3 -c "import torch, zarr; print('torch', torch.__version__, 'zarr', zarr.__version__)"
# only the files that hold gpu tests, and on past a module whose imports this machine lacks
# (torchvision, lightning): the gpu tests of the other files still run
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts="" \
    -W default::DeprecationWarning --continue-on-collection-errors \
    tests/test_kernels_cuda.py tests/test_solve.py tests/test_build.py 2>&1 \
    | tee "$OUT/gpu-tests.log"
timeout 200 python3 -m benchmarks.capture --device cuda ${QUICK:+--quick} --repeats 3 \
    --json "$OUT/capture-cuda.json" 2>&1 | tee "$OUT/capture-cuda.log"
timeout 120 python3 -m benchmarks.solve --device cuda ${QUICK:+--quick} \
    --json "$OUT/solve-cuda.json" 2>&1 | tee "$OUT/solve-cuda.log"
timeout 90 python3 -m benchmarks.kernel ${QUICK:+--quick} \
    --json "$OUT/kernel-cuda.json" 2>&1 | tee "$OUT/kernel-cuda.log"
