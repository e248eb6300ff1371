#!/usr/bin/env bash
# GPU call: FP16 engines with FP16 accumulation in cuBLAS (torch.backends.cuda.matmul.allow_fp16_accumulation).
# 1. BERT-large's 96 GEMMs in one graph, both modes alternating, with power and clock
#    (benchmarks/device_fp16_accumulate.py);
# 2. the FP16 fused BERT-large engine at 1x128 and 128x384, flag off/on/off/on in separate processes;
# 3. the vendored MiniLM's FP16 engine on the full dev set, flag off and on. Results under $OUT.
set -uo pipefail
. "$(dirname "$0")/device_env.sh"
# python3 -c "$WITH_FLAG" 0|1 MODULE ARGS...: a module's main(ARGS) with the flag set
WITH_FLAG='import importlib, sys, torch
torch.backends.cuda.matmul.allow_fp16_accumulation = sys.argv[1] == "1"
sys.exit(importlib.import_module(sys.argv[2]).main(sys.argv[3:]))'

echo "=== GEMMs"
timeout 150 python3 -m benchmarks.device_fp16_accumulate --out $OUT/fp16acc.md 2>&1 | tail -12
echo "=== engines"
i=0
for flag in ${FLAGS:-0 1 0 1}; do
  i=$((i + 1))
  timeout 150 python3 -c "$WITH_FLAG" $flag benchmarks.bench_engines --presets ${PRESETS:-bert-large} \
    --shapes 1x128 128x384 --variants "fp16 fused" --fuse on --iterations 100 --warmup 10 --baselines \
    --out $OUT/eng-$i-acc$flag.md 2>&1 | grep -E "^\|" | sed "s/^/acc16=$flag /"
done
echo "=== MiniLM accuracy"
python3 cli.py build --model $M --fp16 -b 64 -s 384 -o /tmp/eng/fp16.engine 2>&1 | tail -1
for flag in 0 1; do
  echo "== allow_fp16_accumulation=$flag"
  python3 -c "$WITH_FLAG" $flag cli eval --squad $DEV --no-progress -o /tmp/p.$flag.json /tmp/eng/fp16.engine \
    2>&1 | grep -E "^EM|rror"
done
date -u
