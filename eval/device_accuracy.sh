#!/usr/bin/env bash
# GPU call behind BENCHMARKS.md's INT8 accuracy table: MiniLM, calibrated on 500 train questions, full dev set.
set -uo pipefail
. "$(dirname "$0")/device_env.sh"
for method in entropy "percentile --percentile 99.999" mse; do
  name=${method%% *}
  python3 cli.py calibrate --squad $TRAIN --model $M --calib-num 500 --method $method -o /tmp/c.$name.json --no-progress 2>&1 | grep -iE "calibrated|error" | head -2
  python3 cli.py build --model $M --int8 --fp16 -b 64 -s 384 --calib-cache /tmp/c.$name.json -o /tmp/eng/int8-$name.engine 2>&1 | tail -1
done
python3 cli.py build --model $M --fp16 -b 64 -s 384 -o /tmp/eng/fp16.engine 2>&1 | tail -1
for e in fp16 int8-entropy int8-percentile int8-mse; do
  echo "== $e"; python3 cli.py eval --squad $DEV --no-progress -o /tmp/p.$e.json /tmp/eng/$e.engine 2>&1 | grep -E "^EM|model|error|Error"
done
