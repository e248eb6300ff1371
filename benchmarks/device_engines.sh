#!/usr/bin/env bash
# GPU call for issue 4: engine latency first, on a quiet GPU (random-weight BERT-large/base, FP16 and INT8 engines,
# HF eager and torch.compile baselines, same run), then every CUDA test (benchmarks/device_cuda_tests.sh, parallel
# pytest processes). Results under $OUT as they are written: engines.md, bench.log, timing.json, cuda-tests-N.log.
# BENCH_TIMEOUT / TEST_TIMEOUT in s.
set -uo pipefail
. "$(dirname "$0")/device_env.sh"
echo "=== engine latency"
timeout "${BENCH_TIMEOUT:-330}" python3 -m benchmarks.bench_engines --presets bert-large bert-base \
  --shapes 1x128 128x384 --variants "fp16 fused" int8 --fuse off --iterations 100 --warmup 10 \
  --baselines hf-eager hf-compile --timing-cache /tmp/timing.json --out $OUT/engines.md > $OUT/bench.log 2>&1
echo "bench rc=$?"; cp /tmp/timing.json $OUT/ 2>/dev/null; grep -E "^\|" $OUT/engines.md
echo "=== CUDA tests"
bash "$(dirname "$0")/device_cuda_tests.sh"
date -u
