"""Compile the mask-loss Triton kernels ahead of time for an NVIDIA target (default sm_90) without a GPU, with the
block shapes the GPU path uses. Catches what the CPU interpreter cannot: non-constexpr globals, type errors of the
real code generator, dot/layout lowering, ptxas failures. Prints registers/spills of each kernel.

    python tests/triton_aot_compile.py [--arch 90]      (TRITON_INTERPRET must be unset)
Used by tests/test_mask_loss_triton_aot.py.
"""
import argparse
import os
import subprocess
import sys
import tempfile

import dualloop.kernels.mask_loss_triton as mlt
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

INT_ARGS = {"h", "w", "H", "W", "n_tiles", "th", "tw", "sf", "sb", "sd", "n_partials", "npix"}
FLOAT_ARGS = {"scale_y", "scale_x", "alpha", "gamma", "smooth"}
FP32_PTRS = {"meta_f_ptr", "partial_ptr", "gf_ptr", "gb_ptr", "gd_ptr", "scales_ptr", "focal_ptr", "bce_ptr",
             "dice_ptr", "iou_ptr"}


def _signature(fn, ptrs, consts):
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in INT_ARGS:
            sig[name] = "i32"
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        elif name == "meta_i_ptr":
            sig[name] = "*i64"
        elif name in FP32_PTRS:
            sig[name] = "*fp32"
        elif name == "sums_ptr":
            sig[name] = "*fp64"
        else:
            sig[name] = ptrs[name]
    return sig


def _resources(kernel) -> str:
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if "cubin" not in kernel.asm or not os.path.exists(cuobjdump):
        return "?"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(kernel.asm["cubin"])
        fh.flush()
        out = subprocess.run([cuobjdump, "-res-usage", fh.name], capture_output=True, text=True).stdout
    return " ".join(w for line in out.splitlines() if "REG:" in line for w in line.split()[:2])


def specializations():
    """(kernel, pointer dtypes, constexprs, num_warps, num_stages) covering every constexpr branch and each dtype
    kind, with the launch options mask_loss_triton uses."""
    fwd = dict(NSUM=8, BY=mlt.FWD_BY, BX=mlt.FWD_BX)
    pw = dict(BY=mlt.PW_BY, BX=mlt.PW_BX)
    bil = dict(LY=mlt.BWD_LY, LX=mlt.BWD_LX, RY=mlt.BWD_RY, RX=mlt.BWD_RX)
    out = []
    for ragged, bilinear, lt, tt, gm, use_alpha, even in [(False, True, "fp32", "u8", 2, True, True),
                                                          (False, False, "bf16", "fp32", -1, False, False),
                                                          (True, True, "fp16", "bf16", 0, True, False),
                                                          (True, False, "fp32", "u8", 1, True, True)]:
        out.append((mlt._fwd_kernel, {"logits_ptr": f"*{lt}", "targets_ptr": f"*{tt}"},
                    dict(RAGGED=ragged, BILINEAR=bilinear, USE_ALPHA=use_alpha, GAMMA_MODE=gm, EVEN=even,
                         CHECK_T=not even, **fwd), mlt.FWD_WARPS, 3))
    for ragged, lt, tt, gm in [(False, "fp32", "u8", 2), (True, "bf16", "fp32", -1)]:
        out.append((mlt._bwd_pointwise_kernel, {"logits_ptr": f"*{lt}", "targets_ptr": f"*{tt}",
                                                "grad_ptr": f"*{lt}"},
                    dict(RAGGED=ragged, USE_ALPHA=True, GAMMA_MODE=gm, **pw), mlt.FWD_WARPS, 3))
    for ragged, lt, tt, gm, prec in [(False, "fp32", "u8", 2, mlt.DOT_PRECISION), (True, "bf16", "fp16", -1, "ieee"),
                                     (False, "fp32", "u8", 2, "tf32x3")]:
        out.append((mlt._bwd_bilinear_kernel, {"logits_ptr": f"*{lt}", "targets_ptr": f"*{tt}",
                                               "grad_ptr": f"*{lt}"},
                    dict(RAGGED=ragged, USE_ALPHA=False, GAMMA_MODE=gm, DOT_PREC=prec, **bil), mlt.BWD_WARPS, 1))
    even = dict(BA=mlt.EVEN_BA, BB=mlt.EVEN_BB)
    for lt, tt, gm, fy, fx in [("fp32", "u8", 2, 4, 4), ("bf16", "fp32", -1, 2, 8)]:
        out.append((mlt._fwd_even_kernel, {"logits_ptr": f"*{lt}", "targets_ptr": f"*{tt}"},
                    dict(USE_ALPHA=gm == 2, GAMMA_MODE=gm, CHECK_T=tt != "u8", NSUM=8, FY=fy, FX=fx, **even),
                    mlt.EVEN_WARPS, 3))
        out.append((mlt._bwd_even_kernel, {"logits_ptr": f"*{lt}", "targets_ptr": f"*{tt}", "grad_ptr": f"*{lt}"},
                    dict(USE_ALPHA=gm == 2, GAMMA_MODE=gm, FY=fy, FX=fx, **even), mlt.EVEN_WARPS, 1))
    for from_meta in (False, True):
        out.append((mlt._finalize_kernel, {}, dict(NPIX_FROM_META=from_meta, NSUM=8, BP=mlt.FINALIZE_BP), 4, 3))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET to compile for a GPU target", file=sys.stderr)
        return 2
    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    for fn, ptrs, consts, warps, stages in specializations():
        jit_fn = getattr(fn, "fn", fn)
        label = f"{jit_fn.__name__} {consts.get('RAGGED')}/{consts.get('BILINEAR', '')}/{ptrs.get('logits_ptr', '')}/" \
                f"{ptrs.get('targets_ptr', '')}/{consts.get('DOT_PREC', '')}{consts.get('NPIX_FROM_META', '')}"
        try:
            src = ASTSource(fn, _signature(fn, ptrs, consts),
                            constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
            kernel = triton.compile(src, target=target, options={"num_warps": warps, "num_stages": stages})
            print(f"ok   {label}: {_resources(kernel)}", flush=True)
        except Exception as e:  # report every failing specialization, not just the first
            failures += 1
            print(f"FAIL {label}: {type(e).__name__}: {e}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
