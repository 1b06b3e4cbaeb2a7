#!/usr/bin/env bash
# One call on the H200: install, GPU tests, benchmarks; results under $OUT.
# Usage: bash benchmarks/run_h200.sh STEPS   (STEPS: comma list of
#   compile, gpu, optimized, overhead, selection, e2e, tune, matrix)
# Each step has its own time limit so that a slow step leaves the others' files.
set -u
STEPS=",${1:-compile,gpu},"
OUT=${OUT:-/tmp/out}
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
    || { echo "install failed"; tail -5 "$OUT/install.log"; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv,noheader
on() { [[ "$STEPS" == *",$1,"* ]]; }
if on compile; then
    timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_compile_gpu.py \
        -o junit_family=legacy --junitxml="$OUT/compile_tests.xml" 2>&1 | tail -25
fi
if on optimized; then
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_optimized.py \
        tests/test_compile.py -x 2>&1 | tail -8
fi
if on gpu; then
    timeout "${GPU_TESTS_S:-280}" python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py \
        -o junit_family=legacy --junitxml="$OUT/gpu_tests.xml" ${GPU_TESTS_K:+-k "$GPU_TESTS_K"} \
        2>&1 | tail -15
fi
PARTS=""
for part in overhead selection e2e tune matrix; do
    on "$part" && PARTS="$PARTS,$part"
done
if [ -n "$PARTS" ]; then
    timeout "${BENCH_S:-300}" python3 benchmarks/bench_matrix.py --parts "${PARTS#,}" \
        --commit "$COMMIT" --out "$OUT/h200_matrix_$COMMIT.json" \
        --budget-s "${BENCH_BUDGET_S:-240}" ${BENCH_ARGS:-} 2>&1 | tail -40
fi
