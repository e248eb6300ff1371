#!/usr/bin/env bash
# GPU call for issue 21's FP8 rows: the FP8 tests on CUDA; the sweep's max and mse rows, INT8 and FP8 (FP8's mse
# on its own grid: mse-fp8), plain and -iln (OPTIONS; FP8 -iln: the residual stream as E4M3 codes), on the shared
# MiniLM and all 10,570 dev questions against the FP16 engine (the issue's bar: FP8 within 0.3 F1 of FP16 without
# smoothing); then the per-GEMM FP8 sensitivity from an mse-fp8 cache of the sweep's calibration data.
set -uo pipefail
. "$(dirname "$0")/device_env.sh"
python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_fp8.py tests/test_sweep_fp8.py > $OUT/fp8-tests.log 2>&1
tail -3 $OUT/fp8-tests.log
python3 cli.py sweep --methods max mse --options ${OPTIONS:-plain iln} --report-dir /tmp/fp8-sweep \
  --no-progress 2>&1 | tail -18
cp /tmp/fp8-sweep/report.md /tmp/fp8-sweep/pareto.png $OUT/ 2>/dev/null
python3 cli.py calibrate --squad assets/squad/train-v1.1-calib-first-paragraphs.json.gz --model $M --calib-num 100 \
  --method mse-fp8 -o /tmp/c.mse-fp8.json --no-progress 2>&1 | head -1
python3 cli.py sensitivity --fp8 --calib-cache /tmp/c.mse-fp8.json --report-dir /tmp/fp8-sensitivity \
  --no-progress 2>&1 | tail -30
cp -r /tmp/fp8-sensitivity $OUT/ 2>/dev/null
