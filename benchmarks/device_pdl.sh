#!/usr/bin/env bash
# Programmatic dependent launch (plugins/common.py), measured in one device call: BERT-large INT8 engines with
# BERTQA_PDL=0 and =1 (separate processes, one after the other; each times its own kernel choice, since the
# timing cache keys timings by launch mode), the FP16 engine beside the PDL run for scale, then CUDA test groups
# of benchmarks/device_cuda_tests.sh (TEST_GROUPS, default the plugin groups; SKIP_TESTS=1 leaves them out).
#     SHAPES="1x128 128x384" bash benchmarks/device_pdl.sh
set -uo pipefail
source benchmarks/device_env.sh
for pdl in 0 1; do
  variants=(int8); [ $pdl = 1 ] && variants+=("fp16 fused")
  BERTQA_PDL=$pdl timeout 300 python3 -m benchmarks.bench_engines --presets bert-large --shapes ${SHAPES:-1x128} \
    --variants "${variants[@]}" --fuse off --iterations 200 --warmup 20 --baselines \
    --timing-cache /tmp/timing.json --out "$OUT/bench_pdl$pdl.md" > "$OUT/bench_pdl$pdl.log" 2>&1
  echo "--- BERTQA_PDL=$pdl"; grep -E "^\||chosen" "$OUT/bench_pdl$pdl.log" || tail -20 "$OUT/bench_pdl$pdl.log"
done
if [ "${SKIP_TESTS:-0}" = 0 ]; then
  ONLY="${TEST_GROUPS:-0 1 2}" TEST_TIMEOUT=${TEST_TIMEOUT:-230} bash benchmarks/device_cuda_tests.sh
fi
