#!/usr/bin/env bash
# One-GPU smoke run: synthetic corpus -> `small` model -> dual loop under DeepSpeed ZeRO-3 (configs/test_1gpu.yaml).
# Extra arguments are config overrides, e.g.  bash scripts/test_dual_loop.sh train.output_dir=runs/test_gumbel \
#   loop.caption_grad=gumbel  (a run of its own: in the same output_dir it would resume this one's checkpoint)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/launch_common.sh
[ -f runs/synth/data.yaml ] || dualloop synth-data --out runs/synth --scale 2
gpu_args 1
exec deepspeed "${GPUS[@]}" --master_port "${MASTER_PORT:-$(free_port)}" --module dualloop.train \
  --config configs/test_1gpu.yaml "$@"
