#!/usr/bin/env bash
# GPU call behind BENCHMARKS.md's plain-INT8 QAT rows (issue 18): two plain --int8 QAT runs of EPOCHS (default 1)
# on the shared MiniLM at once (the GPU is far from busy with one), from entropy and from percentile 99.999 (the
# best unsmoothed calibration), then one `eval` table on the full dev set with FP16 and the calibrated builds.
# While they train, benchmarks/device_attention_check.py looks at why -imh builds leave out every INT8 attention kernel.
set -uo pipefail
. "$(dirname "$0")/device_env.sh"
epochs=${1:-1}
declare -A method=([entropy]="entropy" [p99.999]="percentile --percentile 99.999")
for tag in entropy p99.999; do
  python3 cli.py calibrate --squad $TRAIN --model $M --calib-num 100 --method ${method[$tag]} -o /tmp/c.$tag.json \
    --no-progress 2>&1 | grep -iE "^(entropy|percentile)|error" | head -1
done
start=$(date +%s)
for tag in entropy p99.999; do
  timeout 250 python3 cli.py qat --model $M --squad $TRAIN --calib-cache /tmp/c.$tag.json --distill --epochs $epochs \
    -o /tmp/qat-$tag --restart --checkpoint-every 100000 --no-progress > $OUT/qat-$tag.log 2>&1 &
done
echo "=== INT8 attention candidates at the MiniLM's layer-0 scales (entropy), while the QATs run"
timeout 120 python3 -m benchmarks.device_attention_check /tmp/c.entropy.json --shape 64x384 2>&1 | tee $OUT/attention.log
wait; tail -n 2 $OUT/qat-*.log; echo "two QATs at once, wall: $(( $(date +%s) - start )) s"
engines=()
for tag in entropy p99.999; do
  python3 cli.py build --model $M --int8 --fp16 -b 64 -s 384 --calib-cache /tmp/c.$tag.json \
    -o /tmp/eng/int8-$tag.engine 2>&1 | grep -iE "^built|error"
  python3 cli.py build --model /tmp/qat-$tag --int8 --fp16 -b 64 -s 384 -o /tmp/eng/int8-qat-from-$tag.engine 2>&1 \
    | grep -iE "^built|error"
  engines+=(/tmp/eng/int8-$tag.engine /tmp/eng/int8-qat-from-$tag.engine)
done
python3 cli.py build --model $M --fp16 -b 64 -s 384 -o /tmp/eng/fp16.engine 2>&1 | grep -iE "^built|error"
python3 cli.py eval --squad $DEV --no-progress --report-dir /tmp/plain-report /tmp/eng/fp16.engine "${engines[@]}" \
  2>&1 | tail -9
cp /tmp/plain-report/report.md $OUT/plain.md 2>/dev/null
