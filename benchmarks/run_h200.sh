#!/usr/bin/env bash
# One call on the H200: install, GPU tests, benchmarks; results under $OUT.
# Usage: bash benchmarks/run_h200.sh STEPS   (STEPS: comma list of
#   compile, gpu, gpuall, optimized, ncu, estimators, extents, chunked, graph, overhead,
#   selection, e2e, tune, matrix; gpuall: the GPU-marked tests of every file but
#   test_gpu.py; estimators: the paper's default and the accurate preset, select_blocks
#   and prism_attention, graph replays and a profile, 4K-128K; chunked: one 4K chunk of
#   the accurate preset over 32K and 128K prefixes, with and without the pooled-key cache;
#   extents: benchmarks/probes/scratch_extents_ab.py)
# ncu: Nsight Compute on our attention kernel (and cuDNN's at density 1.0) for each
#   D,hq,hkv,tokens,tile,batch:density in NCU_CELLS; one CSV per cell under $OUT.
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
    timeout "${COMPILE_S:-240}" python3 -m pytest -q -p no:cacheprovider tests/test_compile_gpu.py \
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
if on gpuall; then
    # Every other file's GPU-marked tests (test_gpu.py is the "gpu" step).
    timeout "${GPU_ALL_S:-280}" python3 -m pytest -q -p no:cacheprovider -m gpu tests \
        --ignore=tests/test_gpu.py -n 4 -o junit_family=legacy \
        --junitxml="$OUT/gpu_all_tests.xml" 2>&1 | tail -15
fi
if on ncu; then
    ncu --version | tail -1
    for spec in ${NCU_CELLS:-128,32,8,8192,128,1:0.05 128,32,8,16384,128,1:1.0}; do
        name="ncu_$(echo "$spec" | tr ',:.' '__p').csv"
        timeout "${NCU_S:-90}" ncu --clock-control none --launch-skip 1 --launch-count 2 \
            -k 'regex:sparse_attention|sdpa|fmha|flash' --section SpeedOfLight \
            --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \
            --section ComputeWorkloadAnalysis --csv --page details --log-file "$OUT/$name" \
            python3 benchmarks/bench_matrix.py --parts ncu --ncu-cell "$spec" 2>&1 | tail -4
        grep -E '"(Duration|DRAM Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Memory Throughput|Registers Per Thread)"' \
            "$OUT/$name" | cut -d, -f5,12- | head -16
    done
fi
if on estimators; then
    timeout "${ESTIMATORS_S:-300}" python3 benchmarks/bench_estimators.py --graph --attention \
        --profile --no-reference --only "prism (paper,(the accurate preset)" \
        --lengths "${ESTIMATOR_LENGTHS:-4096,8192,16384,32768,131072}" --commit "$COMMIT" \
        --out "$OUT/h200_estimators_$COMMIT.json" 2>&1 | tail -40
fi
if on extents; then
    timeout "${EXTENTS_S:-240}" python3 benchmarks/probes/scratch_extents_ab.py \
        --lengths "${EXTENTS_LENGTHS:-32768,131072,262144}" --commit "$COMMIT" \
        --out "$OUT/h200_scratch_extents_$COMMIT.json" 2>&1 | tail -6
fi
if on chunked; then
    for prefix in ${CHUNK_PREFIXES:-32768 131072}; do
        timeout "${CHUNKED_S:-120}" python3 benchmarks/bench_chunked.py --preset accurate \
            --prefix "$prefix" --chunk 4096 --commit "$COMMIT" \
            --out "$OUT/h200_chunked_accurate_${prefix}_$COMMIT.json" 2>&1 | tail -12
    done
fi
PARTS=""
for part in graph overhead selection e2e tune matrix; do
    on "$part" && PARTS="$PARTS,$part"
done
if [ -n "$PARTS" ]; then
    timeout "${BENCH_S:-300}" python3 benchmarks/bench_matrix.py --parts "${PARTS#,}" \
        --commit "$COMMIT" --out "$OUT/h200_matrix_$COMMIT.json" \
        --budget-s "${BENCH_BUDGET_S:-240}" ${BENCH_ARGS:-} 2>&1 | tail -40
fi
