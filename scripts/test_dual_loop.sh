#!/usr/bin/env bash
# One-GPU smoke run: synthetic corpus -> `small` model -> dual loop under DeepSpeed ZeRO-3 (configs/test_1gpu.yaml).
# Extra arguments are config overrides, e.g.  bash scripts/test_dual_loop.sh train.steps=20 loop.caption_grad=gumbel
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/launch_common.sh
[ -f runs/synth/data.yaml ] || dualloop synth-data --out runs/synth --scale 2
gpu_args 1
exec deepspeed "${GPUS[@]}" --master_port "${MASTER_PORT:-$(free_port)}" --module dualloop.train \
  --config configs/test_1gpu.yaml "$@"
