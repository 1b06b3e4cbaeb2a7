set -x
python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1
T0=$(date +%s)
python3 benchmarks/probes/large_groups.py --cases 8192:32:1,32768:32:1,32768:64:2 --commit $C --out $OUT/h200_large_groups_$C.json 2>&1 | tail -4
echo T $(( $(date +%s) - T0 ))
python3 benchmarks/bench_matrix.py --parts graph --graph-lengths 4096,8192/64/32/8/1,131072,32768/256/16/2/1,8192/128/32/8/4,32768/128/32/32/1,8192/96/32/8/1,32768/80/32/8/1 --out $OUT/h200_matrix_$C.json --commit $C > $OUT/matrix.log 2>&1
tail -2 $OUT/matrix.log
echo T $(( $(date +%s) - T0 ))
python3 benchmarks/bench_estimators.py --lengths 131072,32768,8192 --only "prism (paper,the accurate preset,antidiagonal_vertical_slash stride 8" --graph --no-reference --profile --commit $C --out $OUT/h200_estimators_$C.json > $OUT/est.log 2>&1
tail -2 $OUT/est.log
echo T $(( $(date +%s) - T0 ))
