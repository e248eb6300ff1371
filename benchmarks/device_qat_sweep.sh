#!/usr/bin/env bash
# GPU call behind BENCHMARKS.md's QAT sweep table (issue 18): two QAT runs on the shared MiniLM (train file,
# --distill, EPOCHS each): plain --int8 from entropy, -iln -imh from entropy --smooth; then one sweep on the full dev
# set: FP16, the calibrated rows those QATs started from (and their counterparts) and the two QAT rows.
# Usage: device_qat_sweep.sh [EPOCHS] (default 0.5).
set -uo pipefail
. "$(dirname "$0")/device_env.sh"
epochs=${1:-0.5}
for options in plain iln-imh; do
  if [ $options = plain ]; then flags=""; smooth=""; else flags="-iln -imh"; smooth="--smooth"; fi
  python3 cli.py calibrate --squad $TRAIN --model $M --calib-num 100 --method entropy $smooth -o /tmp/c.$options.json \
    --no-progress 2>&1 | grep -iE "^entropy|error" | head -2
  start=$(date +%s)
  timeout 200 python3 cli.py qat --model $M --squad $TRAIN --calib-cache /tmp/c.$options.json $flags --distill \
    --epochs $epochs -o /tmp/qat-$options --restart --checkpoint-every 100000 --no-progress 2>&1 | tail -2
  echo "qat $options wall (featurization, model load and training): $(( $(date +%s) - start )) s"
done
python3 cli.py sweep --model $M --calib-squad $TRAIN --eval-squad $DEV --methods entropy entropy-sm \
  --options plain iln-imh --qat /tmp/qat-plain /tmp/qat-iln-imh -b 64 -s 384 --report-dir /tmp/sweep \
  --no-progress 2>&1 | tee $OUT/sweep.log | grep -vE "^  calibration"
cp /tmp/sweep/report.md $OUT/sweep.md; cp /tmp/sweep/pareto.png $OUT/ 2>/dev/null
