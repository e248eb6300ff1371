#!/usr/bin/env bash
# GPU call: CUDA tests, then --smooth strengths (entropy, 100 train questions; LayerNorm and GELU outputs smoothed)
# against the FP16 engine on the full dev set in one `eval` table, then the sensitivity analysis (issue 5).
set -uo pipefail
. "$(dirname "$0")/device_env.sh"
echo "=== CUDA tests"; timeout 200 python3 -m pytest -q -m cuda -p no:cacheprovider tests/ 2>&1 | tail -12
echo "=== smoothing strengths"
python3 cli.py build --model $M --fp16 -b 64 -s 384 -o /tmp/eng/fp16.engine 2>&1 | tail -1
engines=(/tmp/eng/fp16.engine)
for alpha in none 0.5 0.8 1.0; do
  smooth=$([ $alpha = none ] || echo "--smooth $alpha")
  python3 cli.py calibrate --squad $TRAIN --model $M --calib-num 100 --method entropy $smooth -o /tmp/c.$alpha.json \
    --no-progress 2>&1 | grep -iE "^entropy|error" | head -1
  python3 cli.py build --model $M --int8 --fp16 -b 64 -s 384 --calib-cache /tmp/c.$alpha.json \
    -o /tmp/eng/int8-entropy-sm$alpha.engine 2>&1 | grep -iE "error" | head -2
  engines+=(/tmp/eng/int8-entropy-sm$alpha.engine)
done
python3 cli.py eval --squad $DEV --no-progress --report-dir /tmp/smooth-report "${engines[@]}" 2>&1 | tail -12
cp /tmp/smooth-report/*.md $OUT/ 2>/dev/null
echo "=== sensitivity"
python3 cli.py calibrate --squad assets/squad/train-v1.1-calib-first-paragraphs.json.gz --model $M --calib-num 100 \
  --method entropy -o /tmp/entropy.json --no-progress 2>&1 | tail -1
start=$(date +%s); timeout 300 python3 cli.py sensitivity --calib-cache /tmp/entropy.json --report-dir /tmp/sens \
  --no-progress 2>&1 | tail -25
echo "sensitivity wall: $(( $(date +%s) - start )) s"
mkdir -p $OUT/sens; cp /tmp/sens/* $OUT/sens/ 2>/dev/null
