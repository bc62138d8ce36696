#!/usr/bin/env bash
# `make gpu-check`: on a machine with a GPU, with its system python3 (no venv, no network):
# install carried wheels (.whl/) and the project, run the GPU tests and the benchmarks, and write results under
# benchmarks/results/ (plus one bundle gpu_results.tgz under $OUT when set, for the device tool).
#   GPU_CHECK_PARTS="tests kernels step sdpa"  which parts, in which order (default: these four, in this order;
#                                          "tiles" adds the step with Sa2VA's 12 tiles, results/tiles/; "qwen" the
#                                          step of the Qwen Sa2VA shapes (Qwen2.5-VL-3B, Qwen3-VL-4B) after
#                                          bench_vision_tower.py, results/qwen/)
#   QWEN_ARGS="--variants ours"            extra arguments of the qwen part's bench_train_step.py; QWEN_SECONDS caps it
#   STEP_ARGS="--steps 3 ..."             extra arguments of bench_train_step.py; STEP_SECONDS caps that part
#   GPU_CHECK_SECONDS=N                    wall-clock budget for the whole script: each part gets what is left
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
# DeepSpeed's op builder (and older torch builders) crash on arch entries like 9.0a.
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST//a/}"
export MAX_JOBS=${MAX_JOBS:-16}
PY=${PYTHON:-python3}
RESULTS=benchmarks/results
mkdir -p "$RESULTS/logs"
T0=$SECONDS
BUDGET=${GPU_CHECK_SECONDS:-0}

bundle() {  # the device tool brings back few files: one archive of everything, refreshed after each part
  [ -n "${OUT:-}" ] && tar czf "$OUT/gpu_results.tgz" -C benchmarks results 2>/dev/null || true
}
left() {  # seconds left of GPU_CHECK_SECONDS (a large number when unset)
  if [ "$BUDGET" -gt 0 ]; then echo $(( BUDGET - (SECONDS - T0) )); else echo 100000; fi
}

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
echo "=== install ($(( SECONDS - T0 )) s)"
# The CUDA extension is JIT-built below in the background (a setup.py build would hold up everything else for ~1 min);
# DUALLOOP_BUILD_CUDA=1 builds it at install time instead.
DUALLOOP_BUILD_CUDA=${DUALLOOP_BUILD_CUDA:-0} $PY -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
$PY - <<'PY' 2>&1 | tee "$RESULTS/logs/env.log"
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__,
      "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
try:
    import dualloop.kernels._mask_loss_cuda  # noqa: F401
    print("cuda extension: prebuilt by setup.py")
except ImportError as e:
    print("cuda extension: not prebuilt (JIT on first use):", e)
PY
echo "=== installed ($(( SECONDS - T0 )) s)"

# DeepSpeed's FusedAdam JIT-builds (~40 s) on its first use, and CPU Adam too: build them in the background while the
# tests run.
$PY -c "from deepspeed.ops.op_builder import FusedAdamBuilder; FusedAdamBuilder().load()" \
  >"$RESULTS/logs/fused_adam_build.log" 2>&1 &
ADAM_PID=$!
# zero3_offload_bf16's optimizer (tests/test_train_gpu.py); the benchmarks do not wait for it
$PY -c "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()" \
  >"$RESULTS/logs/cpu_adam_build.log" 2>&1 &
CPU_ADAM_PID=$!
# Likewise the mask-loss extension (torch's build lock makes a test or benchmark that needs it wait for this build).
$PY -c "from dualloop.kernels.cuda_ext import load_extension; load_extension()" \
  >"$RESULTS/logs/cuda_ext_build.log" 2>&1 &
EXT_PID=$!

status=0
step() {  # step NAME CAP CMD...: run with at most CAP s (and what the budget leaves), tee the log, bundle
  local name=$1 cap=$2; shift 2
  local t; t=$(left); [ "$t" -lt "$cap" ] && cap=$t
  if [ "$cap" -lt 20 ]; then echo "=== $name SKIPPED: GPU_CHECK_SECONDS spent"; status=1; return; fi
  echo "=== $name (limit ${cap} s, at $(( SECONDS - T0 )) s): $*"
  timeout --kill-after=10 "$cap" "$@" 2>&1 | tee "$RESULTS/logs/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "=== $name FAILED (rc=$rc$( [ "$rc" -eq 124 ] && echo ', timed out'))"; status=1; }
  echo "=== $name done at $(( SECONDS - T0 )) s"
  bundle
}

# GPU_CHECK_PARTS picks the parts and their order (default: tests kernels step sdpa).
for part in ${GPU_CHECK_PARTS:-tests kernels step sdpa}; do
  case $part in
    tests) step gpu_tests 360 $PY -m pytest -q -m gpu -p no:cacheprovider tests ;;
    kernels) step bench_mask_loss 300 $PY benchmarks/bench_mask_loss.py --out "$RESULTS" ;;
    step)
      wait "$ADAM_PID" || echo "=== FusedAdam prebuild failed (see logs/fused_adam_build.log); workers will retry"
      t=$(left); cap=${STEP_SECONDS:-600}; [ "$t" -gt "$cap" ] && t=$cap
      # shellcheck disable=SC2086  # STEP_ARGS: extra arguments, split on purpose
      step bench_train_step $(( t > 20 ? t : 20 )) $PY benchmarks/bench_train_step.py --out "$RESULTS" --profile ${STEP_ARGS:-} \
        --budget $(( t > 60 ? t - 30 : 30 )) ;;
    sdpa) step bench_sdpa_shapes 90 $PY benchmarks/bench_sdpa_shapes.py --out "$RESULTS" ;;
    tiles)  # not in the default parts: the step of `ours` with Sa2VA's tiling (model.max_tiles=12), its own CSV
      wait "$ADAM_PID" 2>/dev/null
      t=$(left); [ "$t" -gt 300 ] && t=300
      step bench_train_step_tiles $(( t > 20 ? t : 20 )) $PY benchmarks/bench_train_step.py --out "$RESULTS/tiles" \
        --variants ours --max-tiles 12 --steps 4 --warmup 2 --budget $(( t > 60 ? t - 30 : 30 )) ;;
    qwen)  # not in the default parts: the Qwen2.5-VL-3B tower's chunked attention, then naive and ours on the
           # Qwen2.5-VL-3B and Qwen3-VL-4B shapes, their own CSVs
      step bench_vision_tower 120 $PY benchmarks/bench_vision_tower.py --out "$RESULTS/qwen"
      wait "$ADAM_PID" 2>/dev/null
      t=$(left); cap=${QWEN_SECONDS:-540}; [ "$t" -gt "$cap" ] && t=$cap
      # shellcheck disable=SC2086  # QWEN_ARGS: extra arguments, split on purpose
      step bench_train_step_qwen $(( t > 20 ? t : 20 )) $PY benchmarks/bench_train_step.py --out "$RESULTS/qwen" \
        --presets sa2va-qwen2_5-3b-shape sa2va-qwen3-4b-shape --steps 4 --warmup 2 --timeout 240 ${QWEN_ARGS:-} \
        --budget $(( t > 60 ? t - 30 : 30 )) ;;
    *) echo "=== unknown part '$part' in GPU_CHECK_PARTS (tests, kernels, step, sdpa, tiles, qwen)"; status=1 ;;
  esac
done
wait "$ADAM_PID" "$CPU_ADAM_PID" "$EXT_PID" 2>/dev/null
bundle
echo "=== gpu-check finished in $(( SECONDS - T0 )) s, status $status"
exit $status
