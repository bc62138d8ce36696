#!/usr/bin/env bash
# One-GPU smoke run: synthetic corpus -> `small` model -> dual loop under DeepSpeed ZeRO-3 (configs/test_1gpu.yaml).
# Extra arguments are config overrides, e.g.  bash scripts/test_dual_loop.sh train.steps=20 loop.caption_grad=gumbel
set -euo pipefail
cd "$(dirname "$0")/.."
# DeepSpeed's op builder rejects arch entries like 9.0a
if [ -n "${TORCH_CUDA_ARCH_LIST:-}" ]; then export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST//a/}"; fi
[ -f runs/synth/data.yaml ] || dualloop synth-data --out runs/synth --scale 2
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then  # deepspeed's --num_gpus would ignore it and run on GPU 0
  GPUS=(--include "localhost:$(cut -d, -f"1-${NUM_GPUS:-1}" <<< "$CUDA_VISIBLE_DEVICES")")
else
  GPUS=(--num_gpus "${NUM_GPUS:-1}")
fi
exec deepspeed "${GPUS[@]}" --module dualloop.train --config configs/test_1gpu.yaml "$@"
