# Sourced by the eval/device_*.sh scripts: environment, inputs unpacked from .carry, and where results go.
export PYTHONUNBUFFERED=1 WORKBENCH_CACHE_DIR=/tmp/wbc
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/sq /tmp/eng
M=.carry/minilm; DEV=/tmp/sq/dev-v1.1.json; TRAIN=/tmp/sq/train.json
gunzip -c .carry/squad/dev-v1.1.json.gz > $DEV
[ -f .carry/squad/train.json.gz ] && gunzip -c .carry/squad/train.json.gz > $TRAIN
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
date -u
