#!/usr/bin/env bash
# Issue 17's check that the architecture change kept engine speed: BERT-large (random weights) `--int8 -iln` and
# FP16 fused (TorchInductor + CUDA graph) engines, built and timed by the code before the change ($BEFORE: a
# `git archive 7eeb2d6` of the code folders) and after it ($AFTER: a `git archive` of the commit under test), one
# after the other in the order of $SIDES, sharing one timing cache. Results: $OUT/SIDE-ROUND.md and .log.
# Usage: BEFORE=.carry/before AFTER=.carry/after SIDES="before after" ROUND=1 [SHAPES="1x128"] [ITERATIONS=100] \
#        bash benchmarks/device_refactor_ab.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WORKBENCH_CACHE_DIR=/tmp/wbc
nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader | tee "$OUT/gpu.txt"
args=(--presets bert-large --shapes ${SHAPES:-1x128 128x384} --variants "int8 -iln" "fp16 fused" --fuse off
      --iterations ${ITERATIONS:-100} --warmup 10 --baselines --timing-cache /tmp/timing.json)
n=0
for side in ${SIDES:-before after}; do
  n=$((n + 1))
  if [ "$side" = before ]; then dir=$BEFORE mod=eval.bench_engines; else dir=$AFTER mod=benchmarks.bench_engines; fi
  (cd "$dir" && timeout "${T:-240}" python3 -m $mod "${args[@]}" --out "$OUT/$side-${ROUND:-1}-$n.md") \
    > "$OUT/$side-${ROUND:-1}-$n.log" 2>&1
  echo "$side round ${ROUND:-1}.$n rc=$?"; grep -E "^\| bert" "$OUT/$side-${ROUND:-1}-$n.md"
done
date -u
