#!/usr/bin/env bash
# GPU call for issue 21's speed target (written on the CPU, not yet run): random-weight BERT-large at 1x128 and
# 128x384, FP8 (our FP8 Triton kernels, timed against cuBLASLt per GEMM) beside INT8 -iln, FP16 and the FP8 build as
# it ran before those kernels ("fp8 unfused": cuBLASLt with the epilogue, the LayerNorms' and the context's E4M3
# codes in torch ops), one run on a quiet GPU; the target: FP8 <= 33 ms at 128x384 and >= 1.2x faster than INT8
# -iln. Then the FP8 CUDA tests (TESTS=0: not). Results under $OUT: fp8-speed.md, fp8-speed.log, cuda-fp8-tests.log.
# BENCH_TIMEOUT / TEST_TIMEOUT in s; PRESETS (default bert-large), VARIANTS
# (default "fp16|int8 -iln|fp8|fp8 unfused").
set -uo pipefail
. "$(dirname "$0")/device_env.sh"
echo "=== FP8 speed"
IFS='|' read -ra variants <<< "${VARIANTS:-fp16|int8 -iln|fp8|fp8 unfused}"
timeout "${BENCH_TIMEOUT:-360}" python3 -m benchmarks.bench_engines --presets ${PRESETS:-bert-large} --shapes 1x128 \
  128x384 --variants "${variants[@]}" --fuse off --iterations 100 --warmup 10 --baselines \
  --timing-cache /tmp/timing.json --out $OUT/fp8-speed.md > $OUT/fp8-speed.log 2>&1
echo "bench rc=$?"; grep -E "^\|" $OUT/fp8-speed.md; grep -A6 "bert-large fp8: built" $OUT/fp8-speed.log
[ "${TESTS:-1}" = 0 ] && exit
echo "=== FP8 CUDA tests"
timeout "${TEST_TIMEOUT:-220}" python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_fp8.py \
  tests/test_plugins_fp8.py -k "not every_config" > $OUT/cuda-fp8-tests.log 2>&1
tail -3 $OUT/cuda-fp8-tests.log
date -u
