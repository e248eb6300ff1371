#!/usr/bin/env bash
# GPU call behind BENCHMARKS.md's engine latency table: FP16 model on legacy windows, then engines vs HF baselines.
set -uo pipefail
. "$(dirname "$0")/device_env.sh"
echo "=== FP16 model, legacy windows"; python3 cli.py eval --squad $DEV --model $M --precision fp16 --legacy-windows --no-progress -o /tmp/p.json 2>&1 | grep -E "^EM|^featurize"
echo "=== engine latency, random weights, unfused + baselines"
timeout 420 python3 -m benchmarks.bench_engines --presets bert-base bert-large --shapes 1x128 128x384 --variants fp16 int8 "int8 -iln" --fuse off --iterations 100 --warmup 10 --out $OUT/engines.md 2>&1 | grep -E "^\||Error|error"
date -u
