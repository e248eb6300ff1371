#!/usr/bin/env bash
# GPU call behind BENCHMARKS.md's QAT section (issue 18): one QAT run on the shared MiniLM (train file), its wall
# time, then its engine against the FP16 engine and the calibrated build it started from, on the full dev set in
# one `eval` table. Usage: device_qat.sh [OPTIONS EPOCHS]: OPTIONS "iln-imh" (-iln -imh, from entropy --smooth)
# or "plain" (--int8 alone, from plain entropy); EPOCHS of QAT with --distill (default 1).
set -uo pipefail
. "$(dirname "$0")/device_env.sh"
options=${1:-iln-imh}; epochs=${2:-1}
if [ "$options" = plain ]; then flags=""; smooth=""; else flags="-iln -imh"; smooth="--smooth"; fi
echo "=== CUDA QAT tests"; timeout 120 python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_qat_train.py 2>&1 | tail -2
python3 cli.py calibrate --squad $TRAIN --model $M --calib-num 100 --method entropy $smooth -o /tmp/c.json \
  --no-progress 2>&1 | grep -iE "^entropy|error" | head -2
echo "=== qat $options, $epochs epoch(s), --distill"
start=$(date +%s)
timeout 390 python3 cli.py qat --model $M --squad $TRAIN --calib-cache /tmp/c.json $flags --distill --epochs $epochs \
  -o /tmp/qat --restart --checkpoint-every 100000 2>&1 | tr '\r' '\n' | awk 'NR % 50 == 1 || /wrote|error|Error/' | tee $OUT/qat.log
echo "qat wall (featurization, model load and training): $(( $(date +%s) - start )) s"
cp /tmp/qat/quant_spec.json $OUT/ 2>/dev/null
python3 cli.py build --model $M --fp16 -b 64 -s 384 -o /tmp/eng/fp16.engine 2>&1 | grep -iE "^built|error"
python3 cli.py build --model $M --int8 --fp16 $flags -b 64 -s 384 --calib-cache /tmp/c.json \
  -o /tmp/eng/int8-calibrated.engine 2>&1 | grep -iE "^built|error"
python3 cli.py build --model /tmp/qat --int8 --fp16 $flags -b 64 -s 384 -o /tmp/eng/int8-qat.engine 2>&1 \
  | grep -iE "^scales|^built|error"
python3 cli.py eval --squad $DEV --no-progress --report-dir /tmp/qat-report /tmp/eng/fp16.engine \
  /tmp/eng/int8-calibrated.engine /tmp/eng/int8-qat.engine 2>&1 | tail -8
cp /tmp/qat-report/*.md $OUT/ 2>/dev/null
