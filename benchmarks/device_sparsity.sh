#!/usr/bin/env bash
# GPU call behind BENCHMARKS.md's 2:4 sparsity section (issue 19): the shared MiniLM pruned 2:4 (prune's default
# method, SparseGPT), before and after one epoch of fine-tuning with --distill (wall times), and 2:4 + INT8
# (entropy --smooth), in one `eval` table on the full dev set against the dense FP16 engine; then the
# sparse-versus-dense GEMM table on random-weight BERT-large (benchmarks/device_sparse_speed.py; SPEED=0 leaves it
# out, for a call where the GPU is shared).
# PRUNE_TIMEOUT (s, default 300) bounds each prune; EPOCHS (default 1) of fine-tuning; STAGES="finetuned" skips the
# pruned-only engine; PRUNE_ARGS are added to every prune (e.g. "--method magnitude --lr 5e-5"), DISTILL_ARGS to the
# fine-tuning one (e.g. "--distill-alpha 1"). Checkpoints every 500 steps: with RESUME=1 a later call on the same
# warm machine (its /tmp persists) continues a prune that PRUNE_TIMEOUT cut short, so several epochs can span calls.
set -uo pipefail
. "$(dirname "$0")/device_env.sh"
for stage in ${STAGES:-pruned finetuned}; do
  steps=$([ $stage = pruned ] && echo "--max-steps 0" || echo "--epochs ${EPOCHS:-1} --distill ${DISTILL_ARGS:-}")
  tag=$stage
  start=$(date +%s)
  timeout ${PRUNE_TIMEOUT:-300} python3 cli.py prune --model $M --squad $TRAIN $steps ${PRUNE_ARGS:-} -o /tmp/$tag \
    $([ "${RESUME:-0}" = 1 ] || echo --restart) --checkpoint-every 500 --no-progress 2>&1 | tail -1
  echo "prune $tag wall: $(( $(date +%s) - start )) s"
  python3 cli.py build --model /tmp/$tag --fp16 --sparse -b 64 -s 384 -o /tmp/eng/$tag-fp16.engine 2>&1 \
    | grep -iE "^built|^kernels|2:4|error"
done
python3 cli.py calibrate --squad $TRAIN --model /tmp/finetuned --calib-num 100 --method entropy --smooth \
  -o /tmp/c.sparse.json --no-progress 2>&1 | grep -iE "^entropy|error"
python3 cli.py build --model /tmp/finetuned --int8 --fp16 --sparse -b 64 -s 384 --calib-cache /tmp/c.sparse.json \
  -o /tmp/eng/finetuned-int8.engine 2>&1 | grep -iE "^built|^kernels|2:4|error"
python3 cli.py build --model $M --fp16 -b 64 -s 384 -o /tmp/eng/fp16.engine 2>&1 | grep -iE "^built|error"
python3 cli.py eval --squad $DEV --no-progress --report-dir /tmp/sparse-report --baseline /tmp/eng/fp16.engine \
  /tmp/eng/fp16.engine \
  $(ls /tmp/eng/pruned-fp16.engine 2>/dev/null) /tmp/eng/finetuned-fp16.engine /tmp/eng/finetuned-int8.engine 2>&1 \
  | tail -9
cp /tmp/sparse-report/report.md $OUT/sparse-accuracy.md 2>/dev/null
[ "${SPEED:-1}" = 0 ] || timeout 200 python3 -m benchmarks.device_sparse_speed --out $OUT/sparse-speed.md
