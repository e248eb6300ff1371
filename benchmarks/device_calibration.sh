#!/usr/bin/env bash
# GPU call behind BENCHMARKS.md's calibration and INT8-accuracy tables: calibration time and amax drift per method
# and question count, then INT8 engines (one per method, 500 train questions) on the full dev set, FP16 engine beside.
set -uo pipefail
. "$(dirname "$0")/device_env.sh"
timeout 240 python3 -m benchmarks.bench_calibration --squad $TRAIN --model $M --out $OUT/calibration.md 2>&1 | grep -v "it/s\|q/s"
ev() { python3 cli.py eval --squad $DEV --no-progress -o /tmp/pred.json --metrics-json $OUT/m_$1.json "${@:2}" 2>&1 | grep -E "^EM"; }
python3 cli.py build --model $M --fp16 -b 64 -s 384 -o /tmp/eng/fp16.engine >/dev/null
echo "--- fp16 engine"; ev fp16 /tmp/eng/fp16.engine
for spec in "entropy" "percentile 99.99" "percentile 99.999" "mse" "max"; do
  set -- $spec; name=$1${2:+_$2}
  python3 cli.py calibrate --squad $TRAIN --model $M --method $1 ${2:+--percentile $2} --calib-num 500 \
    -o /tmp/c_$name.json --no-progress 2>&1 | head -1
  python3 cli.py build --model $M --int8 --fp16 -b 64 -s 384 --calib-cache /tmp/c_$name.json -o /tmp/eng/i_$name.engine >/dev/null
  echo "--- int8 $name"; ev int8_$name /tmp/eng/i_$name.engine
done
date -u
