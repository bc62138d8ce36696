#!/usr/bin/env bash
# The full run: 8 GPUs on one node, or several nodes with a hostfile (see scripts/hostfile.example):
#   bash scripts/run_dual_loop_full.sh                              # one node, 8 GPUs (NUM_GPUS=N for another count)
#   HOSTFILE=scripts/hostfile MASTER_ADDR=node1 bash scripts/run_dual_loop_full.sh   # every node in the hostfile
# Extra arguments are config overrides (train.steps=..., loop.caption_grad=gumbel, ...). With several nodes the
# global batch grows with the GPU count (micro 2 x accum 4 x GPUs); lower train.grad_accum to keep it at 64.
# Resuming is automatic (train.resume=auto picks up runs/full_8gpu/checkpoints/latest).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/launch_common.sh
CONFIG=${CONFIG:-configs/full_8gpu.yaml}
if [ -n "${HOSTFILE:-}" ]; then
  # deepspeed runs on this node alone, with a warning only, when the hostfile is missing
  [ -f "$HOSTFILE" ] || { echo "HOSTFILE=$HOSTFILE: no such file (copy scripts/hostfile.example)" >&2; exit 2; }
  # deepspeed checks ssh to the first host only; an unreachable other host would leave the job waiting at start-up
  hosts=($(awk '!/^[[:space:]]*(#|$)/ {print $1}' "$HOSTFILE"))
  for host in "${hosts[@]}"; do
    ssh -o PasswordAuthentication=no -o BatchMode=yes -o ConnectTimeout=10 "$host" true </dev/null \
      || { echo "host $host (in $HOSTFILE) is not reachable by passwordless ssh from here" >&2; exit 2; }
  done
  QUOTED=(--config "$CONFIG" "$@")
  # several hosts go through pdsh and each node's shell; one host is started locally, with no shell in between
  if [ "${#hosts[@]}" -gt 1 ]; then pdsh_quote "${QUOTED[@]}"; fi
  exec deepspeed --hostfile "$HOSTFILE" --master_addr "${MASTER_ADDR:?set MASTER_ADDR to the first host}" \
    --master_port "${MASTER_PORT:-29500}" --module dualloop.train "${QUOTED[@]}"
fi
gpu_args 8
exec deepspeed "${GPUS[@]}" --master_port "${MASTER_PORT:-$(free_port)}" --module dualloop.train --config "$CONFIG" "$@"
