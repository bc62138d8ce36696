#!/usr/bin/env bash
# `make gpu-check`: on a machine with a GPU, with its system python3 (no venv, no network):
# install carried wheels (.whl/) and the project, run the GPU tests and the benchmarks, and write results under
# benchmarks/results/ (and $OUT when set, for the device tool).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
# DeepSpeed's op builder (and older torch builders) crash on arch entries like 9.0a.
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST//a/}"
PY=${PYTHON:-python3}
RESULTS=${OUT:-benchmarks/results}
mkdir -p "$RESULTS" benchmarks/results

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
$PY - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
PY

status=0
step() {  # step NAME CMD...: run, tee the log into $RESULTS, remember failures
  local name=$1; shift
  echo "=== $name: $*"
  "$@" 2>&1 | tee "$RESULTS/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "=== $name FAILED (rc=$rc)"; status=1; }
}

# GPU_CHECK_PARTS selects parts, so a short device lease can split the work over calls (default: all three).
PARTS=" ${GPU_CHECK_PARTS:-tests kernels step} "
[[ $PARTS == *" tests "* ]] && step gpu_tests $PY -m pytest -q -m gpu tests
[[ $PARTS == *" kernels "* ]] && step bench_mask_loss $PY benchmarks/bench_mask_loss.py --out "$RESULTS"
[[ $PARTS == *" step "* ]] && step bench_train_step $PY benchmarks/bench_train_step.py --out "$RESULTS"
exit $status
