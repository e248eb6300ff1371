#!/usr/bin/env bash
# GPU call behind BENCHMARKS.md's offline-throughput section (issue 20): random-weight BERT-large and BERT-base over
# every window of the official dev set, bucketed against padded to 384 and HF eager FP16 (benchmarks/
# device_throughput.py, with --varlen: packed too); then the shared MiniLM's full-dev eval padded, with --buckets and
# with --buckets --varlen and a 192 x 128 budget profile (EM/F1 and wall time). PRESETS=none: the MiniLM part
# alone; VARIANTS ('|'-separated, default "int8 -iln|fp16"), BUCKETS (steps, default "64 16": a build per step) and
# BENCH_TIMEOUT (s) for the first part.
set -uo pipefail
. "$(dirname "$0")/device_env.sh"
IFS='|' read -ra variants <<< "${VARIANTS:-int8 -iln|fp16}"
[ "${PRESETS:-bert-large bert-base}" = none ] || timeout ${BENCH_TIMEOUT:-330} python3 -m benchmarks.device_throughput \
  --squad $DEV --presets ${PRESETS:-bert-large bert-base} --variants "${variants[@]}" --batch 128 \
  --buckets ${BUCKETS:-64 16} --varlen --out $OUT/throughput.md 2>&1 | grep -vE "^\s*$"
python3 cli.py calibrate --squad assets/squad/train-v1.1-calib-first-paragraphs.json.gz --model $M --calib-num 100 \
  --method entropy --smooth -o /tmp/c.json --no-progress 2>&1 | grep -iE "^entropy|error"
for b in "" "--buckets 64" "-b 192 -s 128 --buckets 64 --varlen"; do
  tag=$(case "$b" in "") echo padded ;; *varlen) echo packed ;; *) echo buckets ;; esac)
  python3 cli.py build --model $M --int8 --fp16 -b 64 -s 384 $b --calib-cache /tmp/c.json -o /tmp/eng/int8-$tag.engine \
    2>&1 | grep -iE "^built|error"
  start=$(date +%s%N)
  python3 cli.py eval --squad $DEV --no-progress /tmp/eng/int8-$tag.engine 2>&1 | grep -E "^EM|^model|error"
  echo "eval $tag wall: $(( ($(date +%s%N) - start) / 1000000 )) ms"
done
