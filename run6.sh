python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1
T0=$(date +%s)
python3 benchmarks/probes/estimator_head_dims.py --cases 8192:64,8192:256,32768:64,32768:96,32768:128,32768:256 --commit $C --out $OUT/h200_estimator_head_dims_$C.json 2>&1 | tail -7
echo T $(( $(date +%s) - T0 ))
