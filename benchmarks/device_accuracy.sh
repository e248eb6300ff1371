#!/usr/bin/env bash
# GPU call behind BENCHMARKS.md's INT8 accuracy tables: the MiniLM calibrated on train questions (100 and 500),
# with and without --smooth, every build evaluated on the full dev set in one run against the FP16 engine.
set -uo pipefail
. "$(dirname "$0")/device_env.sh"
python3 cli.py build --model $M --fp16 -b 64 -s 384 -o /tmp/eng/fp16.engine 2>&1 | tail -1
names=(fp16)
variants100=("entropy" "entropy --smooth 0.5" "entropy --smooth 0.8" "percentile --percentile 99.99"
             "percentile --percentile 99.99 --smooth 0.5" "percentile --percentile 99.999" "mse")
variants500=("entropy" "entropy --smooth 0.5")
for n in 100 500; do
  declare -n variants=variants$n
  for variant in "${variants[@]}"; do
    name=$(echo "$variant" | sed 's/--percentile //; s/--smooth /smooth/; s/ /-/g')-$n
    python3 cli.py calibrate --squad $TRAIN --model $M --calib-num $n --method $variant -o /tmp/c.$name.json \
      --no-progress 2>&1 | grep -iE "^(entropy|percentile|mse)|error" | head -1
    python3 cli.py build --model $M --int8 --fp16 -b 64 -s 384 --calib-cache /tmp/c.$name.json \
      -o /tmp/eng/int8-$name.engine 2>&1 | grep -iE "error" | head -2
    names+=(int8-$name)
  done
done
for e in "${names[@]}"; do
  echo "== $e"; python3 cli.py eval --squad $DEV --no-progress -o /tmp/p.$e.json /tmp/eng/$e.engine 2>&1 | grep -E "^EM|error|Error"
done
