#!/usr/bin/env bash
# GPU call for issue 5's figures: the default sweep twice (the second reuses every cache), then the sensitivity
# analysis of the vendored MiniLM on the full dev set. Copies the reports (not the engines) to $OUT.
set -uo pipefail
. "$(dirname "$0")/device_env.sh"
start=$(date +%s); python3 cli.py sweep --report-dir /tmp/sweep --no-progress 2>&1 | tail -30
echo "sweep wall: $(( $(date +%s) - start )) s"
start=$(date +%s); python3 cli.py sweep --report-dir /tmp/sweep --no-progress 2>&1 | tail -3
echo "sweep rerun wall: $(( $(date +%s) - start )) s"
cp /tmp/sweep/report.md $OUT/sweep.md; cp /tmp/sweep/pareto.png $OUT/sweep-pareto.png
python3 cli.py calibrate --squad assets/squad/train-v1.1-calib-first-paragraphs.json.gz --model $M --calib-num 100 \
  --method entropy -o /tmp/entropy.json --no-progress 2>&1 | tail -1
start=$(date +%s); python3 cli.py sensitivity --calib-cache /tmp/entropy.json --report-dir /tmp/sens --no-progress 2>&1 | tail -25
echo "sensitivity wall: $(( $(date +%s) - start )) s"
cp /tmp/sens/sensitivity.md $OUT/; cp /tmp/sens/sensitivity.png $OUT/
