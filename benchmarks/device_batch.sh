#!/usr/bin/env bash
# Several device scripts in one call, at once (accuracy runs and CUDA tests, which need no quiet GPU; never timings;
# and not several trainings, which share the GPU by turns and gain nothing from running at once):
#   DEADLINE=540 bash benchmarks/device_batch.sh "tests=bash benchmarks/device_cuda_tests.sh" \
#     "fp8=bash benchmarks/device_fp8.sh"
# Each NAME=COMMAND runs with OUT=/tmp/r/NAME and its output in /tmp/r/NAME.log; at DEADLINE seconds the unfinished
# ones are stopped. Everything under /tmp/r (and the CUDA tests' group logs) comes back as one file, $OUT/results.tgz
# (a call returns at most 8 files), packed every minute too, so a call cut short still returns what was done.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/r
pack() {
  cp /tmp/cuda-tests-*.log /tmp/r/ 2>/dev/null
  tar czf "$OUT/.results.tgz" -C /tmp r && mv "$OUT/.results.tgz" "$OUT/results.tgz"
}
( while sleep 60; do pack; done ) & packer=$!
for job in "$@"; do
  name=${job%%=*}; mkdir -p /tmp/r/$name
  OUT=/tmp/r/$name timeout -k 10 "${DEADLINE:-540}" bash -c "${job#*=}" > /tmp/r/$name.log 2>&1 &
done
wait $(jobs -p | grep -vx $packer)
kill $packer; pack
for job in "$@"; do name=${job%%=*}; echo "=== $name"; tail -n "${TAIL:-25}" /tmp/r/$name.log; done
