#!/bin/bash
cd "$(dirname "$0")"
python3 -m pip install -q --no-deps --no-build-isolation -e . > $OUT/log.txt 2>&1
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -k "padded" -o junit_family=legacy --junitxml=$OUT/tests.xml >> $OUT/log.txt 2>&1
tail -15 $OUT/log.txt
