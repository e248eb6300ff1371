#!/usr/bin/env bash
# GPU calls for the "cutlass" INT8 GEMM family (plugins/cutlass_int8.{cu,py}, issue 20), one STEP a call (each under
# 8 minutes), with the library built on the CPU machine and carried in .cprobe/ (benchmarks/README.md says how), as
# cutlass_int8.so or, to leave room for another carried file, gzipped as cutlass_int8.so.gz (a fifth of the size):
#   STEP=tests       its CUDA tests in full (every configuration x epilogue x shape, a CUDA graph, two engines),
#                    then benchmarks.cutlass_int8_probe (each family's best at BERT-large's four GEMMs)
#   STEP=latency     BERT-large `int8 -iln` at 1x128 and 128x384 (benchmarks.bench_engines), with the library and
#                    without it (WORKBENCH_CUTLASS_LIB naming no file), one after the other on the same machine
#   STEP=throughput  BERT-large over every dev window, padded / bucketed / packed and HF eager, with --profile
#   bash benchmarks/device_cutlass.sh     (results under $OUT)
set -uo pipefail
. "$(dirname "$0")/device_env.sh"
lib=$PWD/.cprobe/cutlass_int8.so
if [ ! -f "$lib" ] && [ -f "$lib.gz" ]; then gunzip -c "$lib.gz" > /tmp/cutlass_int8.so.$$ && \
  mv /tmp/cutlass_int8.so.$$ /tmp/cutlass_int8.so; lib=/tmp/cutlass_int8.so; fi
export WORKBENCH_CUTLASS_LIB=${WORKBENCH_CUTLASS_LIB:-$lib}
python3 -m plugins.cutlass_int8 status | tee $OUT/status.txt
case "${STEP:-tests}" in
  tests)
    timeout 200 python3 -m pytest -q -m cuda tests/test_plugins_cutlass.py -p no:cacheprovider 2>&1 | tail -15 \
      | tee $OUT/cutlass-tests.txt
    timeout 150 python3 -m benchmarks.cutlass_int8_probe --out $OUT/probe.md 2>&1 | grep "^|" ;;
  latency)
    for lib in "$WORKBENCH_CUTLASS_LIB" /nonexistent/cutlass.so; do
      tag=$([ -f "$lib" ] && echo cutlass || echo triton)
      WORKBENCH_CUTLASS_LIB=$lib timeout 200 python3 -m benchmarks.bench_engines --presets bert-large \
        --shapes 1x128 128x384 --variants "int8 -iln" --fuse off --baselines --out $OUT/latency-$tag.md 2>&1 \
        | grep -vE "^\s*$" | tail -12
    done ;;
  throughput)
    timeout 420 python3 -m benchmarks.device_throughput --squad $DEV --presets bert-large --variants "int8 -iln" \
      --batch 128 --buckets 16 --varlen --profile --out $OUT/throughput.md 2>&1 | grep -vE "^\s*$" | tail -70 ;;
  *) echo "STEP must be tests, latency or throughput" >&2; exit 2 ;;
esac
