#!/usr/bin/env bash
# GPU call for issue 5's figures: the default sweep twice (the second reuses every cache); with SENSITIVITY=1 also
# the sensitivity analysis of the vendored MiniLM on the full dev set (SWEEP=0 skips the sweep). SWEEP_ARGS narrow
# the grid; WORKERS=N (issue 24; Ray from benchmarks/device_ray_pieces.sh in /tmp/site) then times the same sweep
# twice more, every row measured anew (--force) with the caches as the first run left them: in one process, then
# on N Ray workers, so the two wall times compare like with like. Logs and reports (not engines) go to $OUT as they
# are written, so a run cut short still returns what it finished.
set -uo pipefail
. "$(dirname "$0")/device_env.sh"
if [ "${CUDA_TESTS:-0}" = 1 ]; then
  timeout 150 python3 -m pytest -q -m cuda -p no:cacheprovider tests/ > $OUT/cuda-tests.log 2>&1; tail -3 $OUT/cuda-tests.log
fi
if [ "${SWEEP:-1}" = 1 ]; then
  start=$(date +%s); python3 cli.py sweep ${SWEEP_ARGS:-} --report-dir /tmp/sweep --no-progress > $OUT/sweep.log 2>&1
  echo "sweep wall: $(( $(date +%s) - start )) s" | tee -a $OUT/sweep.log
  cp /tmp/sweep/report.md $OUT/sweep.md; cp /tmp/sweep/pareto.png $OUT/sweep-pareto.png
  start=$(date +%s); python3 cli.py sweep ${SWEEP_ARGS:-} --report-dir /tmp/sweep --no-progress \
    > $OUT/sweep-rerun.log 2>&1
  echo "sweep rerun wall: $(( $(date +%s) - start )) s" | tee -a $OUT/sweep-rerun.log
fi
if [ -n "${WORKERS:-}" ]; then
  start=$(date +%s); python3 cli.py sweep ${SWEEP_ARGS:-} --force --report-dir /tmp/sweep-one --no-progress \
    > $OUT/sweep-one.log 2>&1
  echo "sweep --force wall (one process): $(( $(date +%s) - start )) s" | tee -a $OUT/sweep-one.log
  start=$(date +%s)
  PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} python3 cli.py sweep ${SWEEP_ARGS:-} --workers $WORKERS --force \
    --report-dir /tmp/sweep-workers --no-progress > $OUT/sweep-workers.log 2>&1
  echo "sweep --workers $WORKERS wall: $(( $(date +%s) - start )) s" | tee -a $OUT/sweep-workers.log
  cp /tmp/sweep-workers/report.md $OUT/sweep-workers.md
fi
if [ "${SENSITIVITY:-0}" = 1 ]; then
  python3 cli.py calibrate --squad assets/squad/train-v1.1-calib-first-paragraphs.json.gz --model $M --calib-num 100 \
    --method entropy -o minilm.entropy.json --no-progress 2>&1 | tail -1
  # the cache under the repository (not /tmp), so the report's commands name it as a reader would
  start=$(date +%s); python3 cli.py sensitivity --calib-cache minilm.entropy.json --report-dir /tmp/sens --no-progress \
    > $OUT/sensitivity.log 2>&1
  echo "sensitivity wall: $(( $(date +%s) - start )) s" | tee -a $OUT/sensitivity.log
  mkdir -p $OUT/sens; cp /tmp/sens/sensitivity.* $OUT/sens/
fi
