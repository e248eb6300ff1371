#!/usr/bin/env bash
# GPU call: CUDA tests, then engine latency (random-weight BERT-large/base, Triton vs library kernels, HF baselines),
# then MiniLM accuracy of FP16 and INT8 engines on the full dev set. Results under $OUT.
set -uo pipefail
. "$(dirname "$0")/device_env.sh"
echo "=== CUDA tests"; timeout 300 python3 -m pytest -q -m cuda -p no:cacheprovider tests/ 2>&1 | tail -25
echo "=== engine latency"
timeout 900 python3 -m eval.bench_engines --presets bert-large bert-base --shapes 1x128 128x384 \
  --variants "fp16 fused" fp16 int8 "int8 library" "int8 -iln" --fuse off --iterations 100 --warmup 10 \
  --timing-cache /tmp/timing.json --out $OUT/engines.md 2>&1 | grep -E "^\||built|Error|error|Traceback" | tail -40
date -u
