#!/usr/bin/env bash
# The GPU measurements behind BENCHMARKS.md, in one device call: accuracy (FP16 model, INT8 engines on the full
# dev set), calibration timing, and the CUDA tests. Expects the model in .carry/minilm and gzipped SQuAD files in
# .carry/squad (see BENCHMARKS.md); writes logs and tables under $OUT.
set -uo pipefail
. "$(dirname "$0")/device_env.sh"

step() { echo; echo "=== $*"; }
step "CUDA tests"
timeout 300 python3 -m pytest -q -p no:cacheprovider -m cuda 2>&1 | tail -4

step "FP16 reference model, full dev"
python3 cli.py eval --squad $DEV --model $M --precision fp16 -o $OUT/pred_fp16.json --metrics-json $OUT/m_fp16.json --no-progress

if [ "${SKIP_CALIB_BENCH:-0}" != 1 ]; then
  step "calibration benchmark"
  timeout 300 python3 -m benchmarks.bench_calibration --squad $TRAIN --model $M --out $OUT/calibration.md
fi

step "INT8 engines: calibrate (entropy, 500 train questions), build, evaluate on the full dev set"
python3 cli.py calibrate --squad $TRAIN --model $M --method entropy --calib-num 500 -o /tmp/calib_entropy.json \
  --trt-cache $OUT/trt_calib.cache --eval-squad $DEV --no-progress
mkdir -p /tmp/eng
python3 cli.py build --model $M --fp16 -b 64 -s 384 -o /tmp/eng/fp16.engine
python3 cli.py build --model $M --int8 --fp16 -b 64 -s 384 --calib-cache /tmp/calib_entropy.json -o /tmp/eng/int8.engine
python3 cli.py build --model $M --int8 --fp16 -iln -b 64 -s 384 --calib-cache /tmp/calib_entropy.json -o /tmp/eng/int8_iln.engine
python3 cli.py build --model $M --int8 --fp16 -imh -b 64 -s 384 --calib-cache /tmp/calib_entropy.json -o /tmp/eng/int8_imh.engine
python3 cli.py build --model $M --int8 --fp16 -iln -imh -b 64 -s 384 --calib-cache /tmp/calib_entropy.json -o /tmp/eng/int8_iln_imh.engine
for e in fp16 int8 int8_iln int8_imh int8_iln_imh; do
  echo "--- $e"
  python3 cli.py eval --squad $DEV /tmp/eng/$e.engine -o $OUT/pred_$e.json --metrics-json $OUT/m_$e.json --no-progress 2>&1 | grep -v "^wrote"
done
date -u
