# Sourced by the benchmarks/device_*.sh scripts: environment, inputs unpacked, and where results go.
# The MiniLM and the dev set travel in assets/ (vendored); the full train file is carried as .carry/squad/train.json.gz.
export PYTHONUNBUFFERED=1 WORKBENCH_CACHE_DIR=/tmp/wbc
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/sq /tmp/eng
M=assets/minilm-l6-h384-squad11; DEV=/tmp/sq/dev-v1.1.json; TRAIN=/tmp/sq/train.json
# Unpacked once, through a temporary name: scripts run at once (device_batch.sh) must not read a half-written file.
[ -f $DEV ] || { gunzip -c assets/squad/dev-v1.1.json.gz > $DEV.$$ && mv $DEV.$$ $DEV; }
[ -f $TRAIN ] || [ ! -f .carry/squad/train.json.gz ] || \
  { gunzip -c .carry/squad/train.json.gz > $TRAIN.$$ && mv $TRAIN.$$ $TRAIN; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
date -u
