#!/usr/bin/env bash
# GPU call: what the engines' tanh-form GELU (quant.policy.PrecisionPolicy.gelu_tanh) does to accuracy. The vendored
# MiniLM on the full dev set: the reference model in FP16 (BERT's erf GELU) against the FP16 engine and INT8 engines
# (entropy, and entropy --smooth 0.8) calibrated on 100 questions of the vendored train subset, as the default sweep
# and the sensitivity analysis calibrate (their earlier rows, with the erf GELU, are in BENCHMARKS.md).
# OPTIONS="plain iln" builds each INT8 engine with the option sets named (plain: --int8 --fp16; iln: also -iln;
# imh: also -imh; iln-imh: both).
set -uo pipefail
. "$(dirname "$0")/device_env.sh"
CAL=assets/squad/train-v1.1-calib-first-paragraphs.json.gz
OPTIONS=${OPTIONS:-plain}
python3 cli.py build --model $M --fp16 -b 64 -s 384 -o /tmp/eng/fp16.engine 2>&1 | tail -1
names=(fp16)
for variant in "entropy" "entropy --smooth 0.8"; do
  name=$(echo "$variant" | sed 's/--smooth /smooth/; s/ /-/g')
  python3 cli.py calibrate --squad $CAL --model $M --calib-num 100 --method $variant -o /tmp/c.$name.json \
    --no-progress 2>&1 | grep -iE "error" | head -1
  for opt in $OPTIONS; do
    flags=""; [ "$opt" = plain ] || flags="-${opt/-/ -}"; tag=$name; [ "$opt" = plain ] || tag=$name-$opt
    python3 cli.py build --model $M --int8 --fp16 $flags -b 64 -s 384 --calib-cache /tmp/c.$name.json \
      -o /tmp/eng/int8-$tag.engine 2>&1 | grep -iE "error" | head -2
    names+=(int8-$tag)
  done
done
echo "== model fp16 (erf GELU)"
python3 cli.py eval --squad $DEV --model $M --precision fp16 --no-progress -o /tmp/p.model.json 2>&1 | grep -E "^EM|rror"
for e in "${names[@]}"; do
  echo "== $e"; python3 cli.py eval --squad $DEV --no-progress -o /tmp/p.$e.json /tmp/eng/$e.engine 2>&1 | grep -E "^EM|rror"
done
