#!/usr/bin/env bash
# Second GPU call behind BENCHMARKS.md: FP16 model vs FP16/FP32 engines, INT8 accuracy per calibration method,
# and engine latency (random-weight BERT-base/large) against HF eager and torch.compile in the same run.
set -uo pipefail
. "$(dirname "$0")/device_env.sh"
ev() { python3 cli.py eval --squad $DEV --no-progress -o /tmp/pred.json --metrics-json $OUT/m_$1.json "${@:2}" 2>&1 | grep -E "^EM|^model:"; }

echo "=== FP16 model, FP16 and FP32 engines (same run)"
echo "--- model fp16"; ev model_fp16 --model $M --precision fp16
python3 cli.py build --model $M --fp16 -b 64 -s 384 -o /tmp/eng/fp16.engine >/dev/null
python3 cli.py build --model $M -b 64 -s 384 -o /tmp/eng/fp32.engine >/dev/null
echo "--- model fp32"; ev model_fp32 --model $M --precision fp32
echo "--- engine fp16"; ev engine_fp16 /tmp/eng/fp16.engine
echo "--- engine fp32"; ev engine_fp32 /tmp/eng/fp32.engine

echo "=== INT8 (--int8 --fp16) per calibration method, 500 train questions"
for spec in "entropy" "percentile 99.99" "percentile 99.999" "mse" "max"; do
  set -- $spec; name=$1${2:+_$2}
  python3 cli.py calibrate --squad $TRAIN --model $M --method $1 ${2:+--percentile $2} --calib-num 500 \
    -o /tmp/c_$name.json --no-progress >/dev/null 2>&1
  python3 cli.py build --model $M --int8 --fp16 -b 64 -s 384 --calib-cache /tmp/c_$name.json -o /tmp/eng/i_$name.engine >/dev/null
  echo "--- int8 $name"; ev int8_$name /tmp/eng/i_$name.engine
done

echo "=== engine latency, random weights"
timeout 240 python3 -m benchmarks.bench_engines --presets bert-base bert-large --shapes 1x128 128x384 \
  --variants fp16 int8 "int8 -iln" --fuse off --iterations 100 --warmup 10 --out $OUT/engines.md 2>&1 | grep "^|"
echo "=== fused (TorchInductor) engines"
timeout 200 python3 -m benchmarks.bench_engines --presets bert-base bert-large --shapes 1x128 128x384 --baselines \
  --variants fp16 int8 --fuse on --iterations 100 --warmup 10 --out $OUT/engines_fused.md 2>&1 | grep -E "^\||Error"
date -u
