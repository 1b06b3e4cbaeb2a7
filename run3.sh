set -x
python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1
T0=$(date +%s)
python3 benchmarks/probes/large_groups.py --cases 8192:32:1,32768:32:1,32768:64:2 --commit $C --out $OUT/h200_large_groups_$C.json 2>&1 | tail -4
echo T $(( $(date +%s) - T0 ))
S0=$(date +%s)
python3 -m pytest -q -p no:cacheprovider -m gpu tests -n 8 -o junit_family=legacy --junitxml=$OUT/tests.xml > $OUT/gpu_tests.log 2>&1
tail -3 $OUT/gpu_tests.log
S=$(( $(date +%s) - S0 ))
python3 benchmarks/summarize_gpu_tests.py $OUT/tests.xml $OUT/h200_gpu_tests_$C.json --command "python3 -m pytest -q -p no:cacheprovider -m gpu tests -n 8" --gpu "NVIDIA H200" --commit $C --wall-seconds $S
echo T $(( $(date +%s) - T0 ))
