#!/usr/bin/env bash
# GPU call behind BENCHMARKS.md's QAT sweep tables (issue 18): QAT runs on the shared MiniLM (train file, --distill,
# EPOCHS each), at once (though trainings at once take about as long as one after another: on an H100 one epoch
# took 151 s alone, and two beside a prune had not finished in 390 s; BENCHMARKS.md), by default plain --int8 from
# entropy and from percentile 99.999 and -iln -imh from entropy --smooth; then one sweep on the full dev set: FP16,
# the calibrated entropy rows (plain and smoothed, plain and -iln -imh) and a row per QAT. Usage:
# device_qat_sweep.sh [EPOCHS] (default 1); QATS="from-entropy iln-imh" trains only those (also from-mse: plain
# from mse; NAME-kd: NAME taught by the unquantized model alone), QAT_TIMEOUT s each (default 330), QAT_ARGS added to
# every QAT; the sweep takes the QATs that finished, with SWEEP_ARGS (default: the methods and options above).
# Each QAT's log is $OUT/qat-NAME.log; the sweep's $OUT/sweep.log and sweep.md.
set -uo pipefail
. "$(dirname "$0")/device_env.sh"
epochs=${1:-1}
declare -A method=([from-entropy]="entropy" [from-p99.999]="percentile --percentile 99.999" [from-mse]="mse"
                   [iln-imh]="entropy --smooth")
declare -A flags=([from-entropy]="" [from-p99.999]="" [from-mse]="" [iln-imh]="-iln -imh")
# NAME-kd: NAME taught by the unquantized model alone (--distill-alpha 1: the rebuilt train file's labels are ~2% wrong)
for name in "${!method[@]}"; do method[$name-kd]=${method[$name]}; flags[$name-kd]="${flags[$name]} --distill-alpha 1"
done
start=$(date +%s)
for name in ${QATS:-from-entropy from-p99.999 iln-imh}; do
  python3 cli.py calibrate --squad $TRAIN --model $M --calib-num 100 --method ${method[$name]} -o /tmp/c.$name.json \
    --no-progress 2>&1 | grep -iE "^(entropy|percentile|mse)|error" | head -1
  timeout ${QAT_TIMEOUT:-330} python3 cli.py qat --model $M --squad $TRAIN --calib-cache /tmp/c.$name.json \
    ${flags[$name]} --distill ${QAT_ARGS:-} --epochs $epochs -o /tmp/qat/$name --restart --checkpoint-every 100000 \
    --no-progress \
    > $OUT/qat-$name.log 2>&1 &
done
wait; tail -qn 1 $OUT/qat-*.log; echo "QATs at once, wall: $(( $(date +%s) - start )) s"
done_qats=$(for d in /tmp/qat/*; do [ -f $d/config.json ] && echo $d; done)
python3 cli.py sweep --model $M --calib-squad $TRAIN --eval-squad $DEV \
  ${SWEEP_ARGS:---methods entropy entropy-sm --options plain iln-imh} --qat $done_qats -b 64 -s 384 \
  --report-dir /tmp/sweep --no-progress 2>&1 | tee $OUT/sweep.log | grep -vE "^  calibration"
cp /tmp/sweep/report.md $OUT/sweep.md; cp /tmp/sweep/pareto.png $OUT/ 2>/dev/null
