# Sourced by the launch scripts: which GPUs deepspeed starts on this node, a free port, quoting for pdsh.

# GPUS: deepspeed's GPU arguments for this node. Its --num_gpus ignores CUDA_VISIBLE_DEVICES and starts from GPU 0,
# so visible GPUs are named with --include instead. $1: the GPU count when NUM_GPUS is unset.
gpu_args() {
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    GPUS=(--include "localhost:$(cut -d, -f"1-${NUM_GPUS:-$1}" <<< "$CUDA_VISIBLE_DEVICES")")
  else
    GPUS=(--num_gpus "${NUM_GPUS:-$1}")
  fi
}

# A TCP port free on this node: two runs on one node must not both take deepspeed's default 29500.
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
}

# QUOTED: the arguments, protected for the remote shell. pdsh hands each node's shell one command line; deepspeed
# wraps only arguments with a space (in double quotes, where $ ` \ still act) and leaves [ ] { } * ' as they are.
pdsh_quote() {
  local arg
  QUOTED=()
  for arg in "$@"; do
    if [[ "$arg" == *" "* ]]; then  # deepspeed adds the double quotes (and escapes ")
      arg=${arg//\\/\\\\}
      arg=${arg//\$/\\\$}
      QUOTED+=("${arg//\`/\\\`}")
    else
      QUOTED+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
}
