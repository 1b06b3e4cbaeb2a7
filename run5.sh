python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1
S=$(date +%s)
timeout 110 python3 benchmarks/probes/constant_variants.py --lengths 8192,32768,131072 \
  --vary prism.optimized.estimator_path:VS_AFTER_POOLING=False \
  --out $OUT/h200_vs_after_pooling_$C.json --commit $C 2>&1 | tail -c 200
echo wall $(( $(date +%s) - S ))
T=$(date +%s)
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_estimator_fused.py tests/test_estimator_cascade_kernel.py tests/test_call_plan_gpu.py tests/test_compile_gpu.py -n 8 -o junit_family=legacy --junitxml=$OUT/tests.xml 2>&1 | tail -3
python3 benchmarks/summarize_gpu_tests.py $OUT/tests.xml $OUT/h200_gpu_tests_estimators_$C.json --command "python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_estimator_fused.py tests/test_estimator_cascade_kernel.py tests/test_call_plan_gpu.py tests/test_compile_gpu.py -n 8" --gpu "NVIDIA H200" --commit $C --wall-seconds $(( $(date +%s) - T )) | head -5
echo wall $(( $(date +%s) - S ))
