set -x
python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
S=$(date +%s)
PRISM_VS_TUNINGS="64,64,64,4,3,256;64,64,64,4,3,512;64,64,64,4,3,1024;64,64,64,4,3,4096;128,64,64,4,3,0;32,64,64,4,3,0" \
  timeout 420 python3 benchmarks/probes/stream_priority.py --lengths 8192,32768,131072 --out $OUT/h200_stream_priority_$C.json --commit $C 2>&1 | tail -c 6000
echo wall $(( $(date +%s) - S ))
