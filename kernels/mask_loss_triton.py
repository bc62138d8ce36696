"""Triton forward/backward of the fused mask losses (see reference.py for the math).

Forward: one program per (output tile, mask) computes the resized logit of each loss-grid pixel on the fly (bilinear
gather of the 4 low-res neighbours, or a nearest gather of the target), the per-pixel terms, and writes the tile's
NUM_SUMS partial sums; torch adds the partials in float64 (deterministic, no atomics).

Backward, resize="logits": one program per low-res tile. The gradient of low-res pixel (i, j) is
    sum_{Y, X} wy(Y, i) wx(X, j) g(Y, X)
over the output pixels it contributes to, with g the pixel gradient and w the bilinear weights. The program walks the
output rows/cols whose source interval can touch its tile (a superset computed from the resize formula; the exact
weights are recomputed with the forward formula and vanish outside), evaluates g on chunks of that region and
contracts them with two small dense weight matrices (tl.dot). Every gradient value is written by exactly one program:
deterministic, no atomics, no full-resolution buffer. resize="targets"/"none": pointwise at the logits grid.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from . import _fused
from ._fused import MAX_MASKS_PER_LAUNCH, FusedOps, FusedPlan, fused_mask_loss, make_plan
from ._inputs import LossParams, MaskBatch
from .reference import DICE_EPS, NUM_SUMS, SUM_CE, SUM_FOCAL, SUM_INTER, SUM_P, SUM_PT, SUM_T, SUM_UNION, TINY

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Block shapes. The interpreter runs ~1 ms per program whatever its size: one big block per mask there.
if _INTERPRET:
    FWD_BY, FWD_BX, FWD_WARPS = 64, 64, 4
    BWD_LY, BWD_LX, BWD_RY, BWD_RX, BWD_WARPS = 32, 32, 64, 64, 4
    PW_BY, PW_BX = 64, 64
else:
    # Forward 8 px/thread (~128 registers). Backward: 16x16 low-res tiles, 4 warps (num_stages=1: its loops mostly
    # run once). Measured on an H200 (benchmarks/results/bench_mask_loss.csv, N=64 256^2 -> 1024^2, GPU kernel
    # time): backward 0.64 ms with these tiles vs 0.78 ms with 32x32 tiles / 8 warps, 1.21 ms with 32-row chunks;
    # forward 0.33 ms at 8x256 vs 0.44 ms at 16x128.
    FWD_BY, FWD_BX, FWD_WARPS = 8, 256, 8
    BWD_LY, BWD_LX, BWD_RY, BWD_RX, BWD_WARPS = 16, 16, 16, 64, 4
    PW_BY, PW_BX = 8, 256
# Region budget (output rows) a backward tile may touch along y: several BWD_RY chunks.
BWD_REGION_Y = 128
# Exact power-of-two upsampling (H = f_y*h, W = f_x*w, f in {2,4,8,16}; SAM2's 256 -> 1024) in blocks of f_y x f_x
# pixels that share their four low-res sources: the forward reads each block's corners once, the backward reduces
# by block sums instead of a dense contraction (see _fwd_even_kernel, _bwd_even_kernel). Opt-in until timed on a
# GPU (`triton@even` in benchmarks/bench_mask_loss.py); DUALLOOP_TRITON_EVEN=1 turns it on.
EVEN_PATH = os.environ.get("DUALLOOP_TRITON_EVEN", "0") == "1"
EVEN_BA, EVEN_BB, EVEN_WARPS = 16, 16, 4  # blocks per program (rows, columns)
FINALIZE_BP = 128  # forward partials per step of _finalize_kernel's loop (up to ~1000 per mask at N = 1)
# "ieee": the fp32 gradient contraction rounds like float32; "tf32x3": tensor cores at near-fp32 accuracy.
DOT_PRECISION = os.environ.get("DUALLOOP_TRITON_DOT_PRECISION", "ieee")
_TINY = tl.constexpr(TINY)  # jit code may only read constexpr globals
_DICE_EPS = tl.constexpr(DICE_EPS)
# On the GPU, log, exp and 1/x straight from the hardware's approximate units (rel. error ~2^-22) with denormals
# flushed: LLVM's log is a ~15-instruction polynomial, tl.exp and fp32 division add a rescaling for denormal and
# huge values (4-5 instructions each) that the loss's arguments never need: exp(-|x|) in (0, 1], 1/(1 + e) with
# 1 + e in [1, 2]. The interpreter has no inline PTX.
_FAST_MATH = tl.constexpr(not _INTERPRET)
_LN2 = tl.constexpr(0.6931471805599453)
_LOG2E = tl.constexpr(1.4426950408889634)
# _mask_geometry, the bilinear backward and _finalize_kernel read meta rows and sums with these literal columns
assert (SUM_FOCAL, SUM_CE, SUM_PT, SUM_P, SUM_T, SUM_INTER, SUM_UNION) == tuple(range(7))
assert (_fused.META_I, _fused.META_F, _fused.META_H, _fused.META_W, _fused.META_OFF, _fused.META_TH,
        _fused.META_TW) == (5, 2, 0, 1, 2, 3, 4)


def _gamma_mode(gamma: float) -> int:
    return int(gamma) if gamma in (0.0, 1.0, 2.0) else -1


@triton.jit
def _log(x):
    if _FAST_MATH:
        y = tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                      pack=1)
        return y * _LN2
    else:
        return tl.log(x)


@triton.jit
def _exp(x):
    """exp(x); on the GPU results below float32's normal range are 0 (the loss's exp(-|x|) then rounds
    sigmoid(x) to exactly 0 or 1 for |x| > 87, where it is within 1e-38 anyway)."""
    if _FAST_MATH:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x * _LOG2E], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.exp(x)


@triton.jit
def _rcp(x):
    """1/x for x in [1, 2] (1 + exp(-|x|))."""
    if _FAST_MATH:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return 1.0 / x


@triton.jit
def _terms(x, t, alpha, gamma, USE_ALPHA: tl.constexpr, GAMMA_MODE: tl.constexpr):
    """Per-pixel (p, 1-p, bce, 1-p_t raw, modulating factor, alpha factor, focal), all float32."""
    e = _exp(-tl.abs(x))
    r = _rcp(1.0 + e)
    pos = x >= 0
    p = tl.where(pos, r, e * r)
    q = tl.where(pos, e * r, r)
    ce = tl.maximum(x, 0.0) - x * t + _log(1.0 + e)
    raw = p * (1.0 - t) + q * t
    base = tl.maximum(raw, _TINY)
    if GAMMA_MODE == 0:
        mod = tl.full(base.shape, 1.0, tl.float32)
    elif GAMMA_MODE == 1:
        mod = base
    elif GAMMA_MODE == 2:
        mod = base * base
    else:
        mod = _exp(gamma * _log(base))
    if USE_ALPHA:
        at = alpha * t + (1.0 - alpha) * (1.0 - t)
    else:
        at = tl.full(base.shape, 1.0, tl.float32)
    return p, q, ce, raw, base, mod, at, ce * mod * at


@triton.jit
def _pixel_grad(x, t, cf, cb, ca, cbb, alpha, gamma, USE_ALPHA: tl.constexpr, GAMMA_MODE: tl.constexpr):
    """d(cf*focal + cb*bce + dice-part)/dx per pixel (see loss_grad_coefficients)."""
    p, q, ce, raw, base, mod, at, focal = _terms(x, t, alpha, gamma, USE_ALPHA, GAMMA_MODE)
    pq = p * q
    dce = p - t
    dbase = pq * (1.0 - 2.0 * t)
    if GAMMA_MODE == 0:
        dmod = tl.zeros(base.shape, tl.float32)
    elif GAMMA_MODE == 1:
        dmod = dbase
    elif GAMMA_MODE == 2:
        dmod = 2.0 * base * dbase
    else:
        dmod = gamma * mod / base * dbase
    dmod = tl.where(raw > _TINY, dmod, 0.0)
    dfocal = at * (dce * mod + ce * dmod)
    return cf * dfocal + cb * dce + pq * (ca * t + cbb)


@triton.jit
def _add_pixel_sums(s_focal, s_ce, s_pt, s_p, s_t, s_inter, s_union, s_bad, x, t, m, alpha, gamma,
                    USE_ALPHA: tl.constexpr, GAMMA_MODE: tl.constexpr, CHECK_T: tl.constexpr):
    """Per-pixel accumulators of the forward's NUM_SUMS sums (masked pixels add nothing). CHECK_T: count targets
    outside [0, 1]."""
    p, _, ce, _, _, _, _, focal = _terms(x, t, alpha, gamma, USE_ALPHA, GAMMA_MODE)
    pred = x > 0.0
    tb = t > 0.5
    s_focal += tl.where(m, focal, 0.0)
    s_ce += tl.where(m, ce, 0.0)
    s_pt += tl.where(m, p * t, 0.0)
    s_p += tl.where(m, p, 0.0)
    s_t += tl.where(m, t, 0.0)
    s_inter += tl.where(m & pred & tb, 1.0, 0.0)
    s_union += tl.where(m & (pred | tb), 1.0, 0.0)
    if CHECK_T:
        s_bad += tl.where(m & ((t < 0.0) | (t > 1.0) | (t != t)), 1.0, 0.0)
    return s_focal, s_ce, s_pt, s_p, s_t, s_inter, s_union, s_bad


@triton.jit
def _store_sums(out, s_focal, s_ce, s_pt, s_p, s_t, s_inter, s_union, s_bad):
    """A program's NUM_SUMS partial sums (2-D accumulators) in reference.py's SUM_* order."""
    tl.store(out + 0, tl.sum(tl.sum(s_focal, axis=1), axis=0))
    tl.store(out + 1, tl.sum(tl.sum(s_ce, axis=1), axis=0))
    tl.store(out + 2, tl.sum(tl.sum(s_pt, axis=1), axis=0))
    tl.store(out + 3, tl.sum(tl.sum(s_p, axis=1), axis=0))
    tl.store(out + 4, tl.sum(tl.sum(s_t, axis=1), axis=0))
    tl.store(out + 5, tl.sum(tl.sum(s_inter, axis=1), axis=0))
    tl.store(out + 6, tl.sum(tl.sum(s_union, axis=1), axis=0))
    tl.store(out + 7, tl.sum(tl.sum(s_bad, axis=1), axis=0))


@triton.jit
def _linear_src(dst, scale, n_in):
    """ATen bilinear (align_corners=False) source indices and weights of destination indices `dst`."""
    src = tl.maximum(scale * (dst.to(tl.float32) + 0.5) - 0.5, 0.0)
    i0 = tl.minimum(src.to(tl.int32), n_in - 1)
    l1 = tl.minimum(tl.maximum(src - i0.to(tl.float32), 0.0), 1.0)
    i1 = tl.where(i0 < n_in - 1, i0 + 1, i0)
    return i0, i1, 1.0 - l1, l1


@triton.jit
def _bilinear_sample(lbase, i0, i1, j0, j1, l0y, l1y, l0x, l1x, w, m):
    """[rows, cols] of the resized logits: the four low-res neighbours blended in fp32 (ATen's formula)."""
    r0 = (i0 * w)[:, None]
    r1 = (i1 * w)[:, None]
    x00 = tl.load(lbase + r0 + j0[None, :], mask=m, other=0.0).to(tl.float32)
    x01 = tl.load(lbase + r0 + j1[None, :], mask=m, other=0.0).to(tl.float32)
    x10 = tl.load(lbase + r1 + j0[None, :], mask=m, other=0.0).to(tl.float32)
    x11 = tl.load(lbase + r1 + j1[None, :], mask=m, other=0.0).to(tl.float32)
    return (l0y[:, None] * (l0x[None, :] * x00 + l1x[None, :] * x01)
            + l1y[:, None] * (l0x[None, :] * x10 + l1x[None, :] * x11))


@triton.jit
def _nearest_src(dst, scale, n_in):
    """ATen nearest source index: min(floor(dst * scale), n_in - 1)."""
    return tl.minimum((dst.to(tl.float32) * scale).to(tl.int32), n_in - 1)


@triton.jit
def _mask_geometry(meta_i_ptr, meta_f_ptr, n, H, W, scale_y, scale_x, RAGGED: tl.constexpr):
    """(H, W, target offset, scale_y, scale_x) of mask n: kernel arguments, or the mask's meta row when ragged."""
    if RAGGED:
        H = tl.load(meta_i_ptr + n * 5 + 0).to(tl.int32)
        W = tl.load(meta_i_ptr + n * 5 + 1).to(tl.int32)
        t_off = tl.load(meta_i_ptr + n * 5 + 2)
        scale_y = tl.load(meta_f_ptr + n * 2 + 0)
        scale_x = tl.load(meta_f_ptr + n * 2 + 1)
    else:
        t_off = n * H * W
    return H, W, t_off, scale_y, scale_x


@triton.jit
def _mask_coefs(gf_ptr, gb_ptr, gd_ptr, sf, sb, sd, scales_ptr, n):
    """Mask n's pixel-gradient coefficients (cf, cb, A, B) of _pixel_grad: the upstream gradients of its focal, bce
    and dice (any strides: a mean's backward hands in expanded scalars) times the forward's `grad_scales`."""
    g_dice = tl.load(gd_ptr + n * sd)
    return (tl.load(gf_ptr + n * sf) * tl.load(scales_ptr + n * 4 + 0),
            tl.load(gb_ptr + n * sb) * tl.load(scales_ptr + n * 4 + 1),
            g_dice * tl.load(scales_ptr + n * 4 + 2),
            g_dice * tl.load(scales_ptr + n * 4 + 3))


@triton.jit
def _pick(v, cols, k: tl.constexpr):
    return tl.sum(tl.where(cols == k, v, 0.0), axis=0)


@triton.jit
def _finalize_kernel(partial_ptr, n_partials, meta_i_ptr, npix, smooth, sums_ptr, focal_ptr, bce_ptr, dice_ptr,
                     iou_ptr, scales_ptr, NPIX_FROM_META: tl.constexpr, NSUM: tl.constexpr,
                     BP: tl.constexpr):
    """One program per mask: adds its forward partials [n_partials, NSUM] in float64 (fixed order: deterministic)
    and writes its sums, its four losses and its `grad_scales` (reference.py: losses_from_sums, grad_scales)."""
    n = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, NSUM)
    rows = tl.arange(0, BP)
    acc = tl.zeros([NSUM], tl.float64)
    base = partial_ptr + n * n_partials * NSUM
    for p0 in range(0, n_partials, BP):
        r = p0 + rows
        part = tl.load(base + (r * NSUM)[:, None] + cols[None, :], mask=(r < n_partials)[:, None], other=0.0)
        acc += tl.sum(part.to(tl.float64), axis=0)
    tl.store(sums_ptr + n * NSUM + cols, acc)
    if NPIX_FROM_META:  # ragged bilinear: each mask's loss grid is its target's
        m_pix = (tl.load(meta_i_ptr + n * 5 + 0) * tl.load(meta_i_ptr + n * 5 + 1)).to(tl.float64)
    else:
        m_pix = tl.cast(npix, tl.float64)
    smooth = tl.cast(smooth, tl.float64)  # a float32 argument: dice_smooth's float64 tail is below the losses' rounding
    s_pt = _pick(acc, cols, 2)
    raw_d = _pick(acc, cols, 3) + _pick(acc, cols, 4) + smooth
    d = tl.maximum(raw_d, _DICE_EPS)
    tl.store(focal_ptr + n, (_pick(acc, cols, 0) / m_pix).to(tl.float32))
    tl.store(bce_ptr + n, (_pick(acc, cols, 1) / m_pix).to(tl.float32))
    tl.store(dice_ptr + n, (1.0 - (2.0 * s_pt + smooth) / d).to(tl.float32))
    tl.store(iou_ptr + n, (_pick(acc, cols, 5) / tl.maximum(_pick(acc, cols, 6), 1.0)).to(tl.float32))
    tl.store(scales_ptr + n * 4 + 0, (1.0 / m_pix).to(tl.float32))
    tl.store(scales_ptr + n * 4 + 1, (1.0 / m_pix).to(tl.float32))
    tl.store(scales_ptr + n * 4 + 2, (-2.0 / d).to(tl.float32))
    tl.store(scales_ptr + n * 4 + 3, tl.where(raw_d > _DICE_EPS, (2.0 * s_pt + smooth) / (d * d), 0.0).to(tl.float32))


@triton.jit(do_not_specialize=["H", "W"])
def _fwd_kernel(logits_ptr, targets_ptr, meta_i_ptr, meta_f_ptr, partial_ptr,
                h, w, H, W, scale_y, scale_x, alpha, gamma,
                RAGGED: tl.constexpr, BILINEAR: tl.constexpr, USE_ALPHA: tl.constexpr, GAMMA_MODE: tl.constexpr,
                EVEN: tl.constexpr, CHECK_T: tl.constexpr, NSUM: tl.constexpr, BY: tl.constexpr, BX: tl.constexpr):
    """Program (p, n) adds up tiles p, p + P, p + 2P, ... of mask n's loss grid (P = programs per mask) in
    per-pixel accumulators and reduces them once at the end: the block reductions are paid once per program.
    EVEN: every loss grid is a whole number of tiles (no bounds masks). CHECK_T: count targets outside [0, 1]."""
    pid = tl.program_id(0)
    n_progs = tl.num_programs(0)
    n = tl.program_id(1).to(tl.int64)
    H, W, t_off, scale_y, scale_x = _mask_geometry(meta_i_ptr, meta_f_ptr, n, H, W, scale_y, scale_x, RAGGED)
    if BILINEAR:
        OH = H
        OW = W
    else:
        OH = h
        OW = w
    n_tx = tl.cdiv(OW, BX)
    n_tiles = tl.cdiv(OH, BY) * n_tx
    lbase = logits_ptr + n * h * w
    s_focal = tl.zeros([BY, BX], tl.float32)
    s_ce = tl.zeros([BY, BX], tl.float32)
    s_pt = tl.zeros([BY, BX], tl.float32)
    s_p = tl.zeros([BY, BX], tl.float32)
    s_t = tl.zeros([BY, BX], tl.float32)
    s_inter = tl.zeros([BY, BX], tl.float32)
    s_union = tl.zeros([BY, BX], tl.float32)
    s_bad = tl.zeros([BY, BX], tl.float32)
    for tile in range(pid, n_tiles, n_progs):
        rows = (tile // n_tx) * BY + tl.arange(0, BY)
        cols = (tile % n_tx) * BX + tl.arange(0, BX)
        if EVEN:
            m = tl.full([BY, BX], 1, tl.int1)
        else:
            m = (rows < OH)[:, None] & (cols < OW)[None, :]
        if BILINEAR:
            i0, i1, l0y, l1y = _linear_src(rows, scale_y, h)
            j0, j1, l0x, l1x = _linear_src(cols, scale_x, w)
            x = _bilinear_sample(lbase, i0, i1, j0, j1, l0y, l1y, l0x, l1x, w, m)
            t = tl.load(targets_ptr + t_off + (rows * W)[:, None] + cols[None, :], mask=m, other=0).to(tl.float32)
        else:
            x = tl.load(lbase + (rows * w)[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
            sr = _nearest_src(rows, scale_y, H)
            sc = _nearest_src(cols, scale_x, W)
            t = tl.load(targets_ptr + t_off + (sr * W)[:, None] + sc[None, :], mask=m, other=0).to(tl.float32)
        s_focal, s_ce, s_pt, s_p, s_t, s_inter, s_union, s_bad = _add_pixel_sums(
            s_focal, s_ce, s_pt, s_p, s_t, s_inter, s_union, s_bad, x, t, m, alpha, gamma, USE_ALPHA, GAMMA_MODE,
            CHECK_T)
    _store_sums(partial_ptr + (n * n_progs + pid) * NSUM, s_focal, s_ce, s_pt, s_p, s_t, s_inter, s_union, s_bad)


@triton.jit(do_not_specialize=["H", "W"])
def _bwd_pointwise_kernel(logits_ptr, targets_ptr, meta_i_ptr, meta_f_ptr, gf_ptr, gb_ptr, gd_ptr, sf, sb, sd,
                          scales_ptr, grad_ptr,
                          h, w, H, W, scale_y, scale_x, alpha, gamma,
                          RAGGED: tl.constexpr, USE_ALPHA: tl.constexpr, GAMMA_MODE: tl.constexpr,
                          BY: tl.constexpr, BX: tl.constexpr):
    tile = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    H, W, t_off, scale_y, scale_x = _mask_geometry(meta_i_ptr, meta_f_ptr, n, H, W, scale_y, scale_x, RAGGED)
    n_tx = tl.cdiv(w, BX)
    rows = (tile // n_tx) * BY + tl.arange(0, BY)
    cols = (tile % n_tx) * BX + tl.arange(0, BX)
    m = (rows < h)[:, None] & (cols < w)[None, :]
    offs = n * h * w + (rows * w)[:, None] + cols[None, :]
    x = tl.load(logits_ptr + offs, mask=m, other=0.0).to(tl.float32)
    sr = _nearest_src(rows, scale_y, H)
    sc = _nearest_src(cols, scale_x, W)
    t = tl.load(targets_ptr + t_off + (sr * W)[:, None] + sc[None, :], mask=m, other=0).to(tl.float32)
    cf, cb, ca, cbb = _mask_coefs(gf_ptr, gb_ptr, gd_ptr, sf, sb, sd, scales_ptr, n)
    g = _pixel_grad(x, t, cf, cb, ca, cbb, alpha, gamma, USE_ALPHA, GAMMA_MODE)
    tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=m)


@triton.jit
def _region(lo, count, n_in, n_out, scale):
    """Output indices [first, last) whose bilinear sources can touch input indices [lo, lo + count): a superset
    (margin of >= 1 output index each side), exact weights are recomputed by the caller."""
    inv = 1.0 / scale
    a = tl.maximum((lo.to(tl.float32) - 0.5) * inv - 0.5, -1.0)
    first = tl.maximum((a + 2.0).to(tl.int32) - 4, 0)
    b = ((lo + count).to(tl.float32) + 0.5) * inv - 0.5
    last = tl.minimum(b.to(tl.int32) + 2, n_out)
    return first, last


@triton.jit(do_not_specialize=["H", "W", "th", "tw"])
def _bwd_bilinear_kernel(logits_ptr, targets_ptr, meta_i_ptr, meta_f_ptr, gf_ptr, gb_ptr, gd_ptr, sf, sb, sd,
                         scales_ptr, grad_ptr,
                         h, w, H, W, scale_y, scale_x, th, tw, alpha, gamma,
                         RAGGED: tl.constexpr, USE_ALPHA: tl.constexpr, GAMMA_MODE: tl.constexpr,
                         LY: tl.constexpr, LX: tl.constexpr, RY: tl.constexpr, RX: tl.constexpr,
                         DOT_PREC: tl.constexpr):
    tile = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    H, W, t_off, scale_y, scale_x = _mask_geometry(meta_i_ptr, meta_f_ptr, n, H, W, scale_y, scale_x, RAGGED)
    if RAGGED:
        th = tl.load(meta_i_ptr + n * 5 + 3).to(tl.int32)
        tw = tl.load(meta_i_ptr + n * 5 + 4).to(tl.int32)
    n_tx = tl.cdiv(w, tw)
    i_lo = (tile // n_tx) * th
    j_lo = (tile % n_tx) * tw
    ii = i_lo + tl.arange(0, LY)
    jj = j_lo + tl.arange(0, LX)
    vi = (tl.arange(0, LY) < th) & (ii < h)
    vj = (tl.arange(0, LX) < tw) & (jj < w)
    y_first, y_last = _region(i_lo, th, h, H, scale_y)
    x_first, x_last = _region(j_lo, tw, w, W, scale_x)
    y_last = tl.where(i_lo < h, y_last, 0)  # programs past this mask's tiles (ragged grid) do nothing
    cf, cb, ca, cbb = _mask_coefs(gf_ptr, gb_ptr, gd_ptr, sf, sb, sd, scales_ptr, n)
    lbase = logits_ptr + n * h * w
    acc = tl.zeros([LY, LX], tl.float32)
    # x chunks outside (usually one): the column weights are built once; row chunks inside. Every (row, col) chunk
    # adds wy^T (g wx) to the tile's gradient. Out-of-region pixels have zero weights (loads stay in bounds).
    for x0 in range(x_first, x_last, RX):
        xs = x0 + tl.arange(0, RX)
        vx = xs < x_last
        j0, j1, l0x, l1x = _linear_src(xs, scale_x, w)
        # wx[c, b]: weight of output col xs[c] on low-res col jj[b] (j0 == j1 at the last col: weights add to 1)
        wx = (tl.where(j0[:, None] == jj[None, :], l0x[:, None], 0.0)
              + tl.where(j1[:, None] == jj[None, :], l1x[:, None], 0.0))
        wx = tl.where(vx[:, None] & vj[None, :], wx, 0.0)
        for y0 in range(y_first, y_last, RY):
            ys = y0 + tl.arange(0, RY)
            vy = ys < y_last
            i0, i1, l0y, l1y = _linear_src(ys, scale_y, h)
            wyt = (tl.where(ii[:, None] == i0[None, :], l0y[None, :], 0.0)
                   + tl.where(ii[:, None] == i1[None, :], l1y[None, :], 0.0))
            wyt = tl.where(vy[None, :] & vi[:, None], wyt, 0.0)
            m = vy[:, None] & vx[None, :]
            xv = _bilinear_sample(lbase, i0, i1, j0, j1, l0y, l1y, l0x, l1x, w, m)
            t = tl.load(targets_ptr + t_off + (ys * W)[:, None] + xs[None, :], mask=m, other=0).to(tl.float32)
            g = _pixel_grad(xv, t, cf, cb, ca, cbb, alpha, gamma, USE_ALPHA, GAMMA_MODE)  # finite: masked loads
            gx = tl.dot(g, wx, input_precision=DOT_PREC)
            acc += tl.dot(wyt, gx, input_precision=DOT_PREC)
    offs = n * h * w + (ii * w)[:, None] + jj[None, :]
    tl.store(grad_ptr + offs, acc.to(grad_ptr.dtype.element_ty), mask=vi[:, None] & vj[None, :])


@triton.jit
def _shift_left(t, BB: tl.constexpr):
    """u[r, c] = t[r, c + 1] (0 past the edge), by a masked sum: exact, and no tl.dot size limits."""
    cc = tl.arange(0, BB)
    pick = (cc[:, None] + 1) == cc[None, :]  # [c, c']
    return tl.sum(tl.where(pick[None, :, :], t[:, None, :], 0.0), axis=2)


@triton.jit
def _shift_up(t, BA: tl.constexpr):
    """u[r, c] = t[r + 1, c] (0 past the edge)."""
    rr = tl.arange(0, BA)
    pick = (rr[:, None] + 1) == rr[None, :]  # [r, r']
    return tl.sum(tl.where(pick[:, :, None], t[None, :, :], 0.0), axis=1)


@triton.jit
def _even_blocks(lbase, a0, b0, h, w, W, FY: tl.constexpr, FX: tl.constexpr, BA: tl.constexpr, BB: tl.constexpr):
    """Geometry of blocks [a0, a0+BA) x [b0, b0+BB) (see _bwd_even_kernel): block rows, output columns [BB, FX],
    the weight of each column towards its block's own low-res column, the column mask, and the blocks' low-res
    corners blended along x ([BA, BB, FX], top = row a-1, bottom = row a)."""
    aa = a0 + tl.arange(0, BA)
    bb = b0 + tl.arange(0, BB)
    rx = tl.arange(0, FX)
    xs = (bb * FX - FX // 2)[:, None] + rx[None, :]
    v = (rx.to(tl.float32) + 0.5) / FX
    first_b = bb[:, None] == 0
    wrx = tl.where(first_b, 1.0, tl.where(bb[:, None] == w, 0.0, v[None, :]))[None, :, :]
    lx = tl.where(first_b, 0.0, v[None, :])[None, :, :]  # ATen's interpolation weight of column j1
    vx = ((xs >= 0) & (xs < W))[None, :, :]
    j0 = tl.minimum(tl.maximum(bb - 1, 0), w - 1)[None, :]
    j1 = tl.minimum(bb, w - 1)[None, :]
    r0 = (tl.minimum(tl.maximum(aa - 1, 0), h - 1) * w)[:, None]
    r1 = (tl.minimum(aa, h - 1) * w)[:, None]
    top = (1.0 - lx) * tl.load(lbase + r0 + j0).to(tl.float32)[:, :, None] \
        + lx * tl.load(lbase + r0 + j1).to(tl.float32)[:, :, None]
    bot = (1.0 - lx) * tl.load(lbase + r1 + j0).to(tl.float32)[:, :, None] \
        + lx * tl.load(lbase + r1 + j1).to(tl.float32)[:, :, None]
    return aa, bb, xs, wrx, vx, top, bot


@triton.jit
def _even_rows(aa, q, h, H, vx, top, bot, FY: tl.constexpr, MASKED: tl.constexpr):
    """Row offset q of every block: output rows [BA], the weight towards row a, the pixel mask and the resized
    logits [BA, BB, FX] (ATen's values: l1 = 0 on the clamped top edge). MASKED=False: the program's blocks are
    all interior (see _even_interior), every pixel is in the image and the mask is a constant."""
    u = (q + 0.5) / FY
    first_a = aa == 0
    wry = tl.where(first_a, 1.0, tl.where(aa == h, 0.0, u))
    ly = tl.where(first_a, 0.0, u)[:, None, None]
    ys = aa * FY - FY // 2 + q
    x = (1.0 - ly) * top + ly * bot
    if MASKED:
        m = ((ys >= 0) & (ys < H))[:, None, None] & vx
    else:
        m = tl.full(x.shape, 1, tl.int1)
    return ys, wry, m, x


@triton.jit
def _even_interior(a0, b0, h, w, BA: tl.constexpr, BB: tl.constexpr):
    """Blocks 1..h-1 x 1..w-1 hold only in-image pixels (block 0 and block h are half outside): a program whose
    blocks are all such skips the bounds masks (~80 % of programs at 256 -> 1024)."""
    return (a0 > 0) & (a0 + BA <= h) & (b0 > 0) & (b0 + BB <= w)


@triton.jit
def _fwd_even_sums(tbase, aa, xs, h, H, W, vx, top, bot, alpha, gamma, USE_ALPHA: tl.constexpr,
                   GAMMA_MODE: tl.constexpr, CHECK_T: tl.constexpr, FY: tl.constexpr, BA: tl.constexpr,
                   BB: tl.constexpr, FX: tl.constexpr, MASKED: tl.constexpr):
    """The forward's per-pixel accumulators [BA, BB, FX] over the FY row offsets of the program's blocks."""
    s_focal = tl.zeros([BA, BB, FX], tl.float32)
    s_ce = tl.zeros([BA, BB, FX], tl.float32)
    s_pt = tl.zeros([BA, BB, FX], tl.float32)
    s_p = tl.zeros([BA, BB, FX], tl.float32)
    s_t = tl.zeros([BA, BB, FX], tl.float32)
    s_inter = tl.zeros([BA, BB, FX], tl.float32)
    s_union = tl.zeros([BA, BB, FX], tl.float32)
    s_bad = tl.zeros([BA, BB, FX], tl.float32)
    for q in range(FY):
        ys, wry, m, x = _even_rows(aa, q, h, H, vx, top, bot, FY, MASKED)
        t = tl.load(tbase + (ys * W)[:, None, None] + xs[None, :, :], mask=m, other=0).to(tl.float32)
        s_focal, s_ce, s_pt, s_p, s_t, s_inter, s_union, s_bad = _add_pixel_sums(
            s_focal, s_ce, s_pt, s_p, s_t, s_inter, s_union, s_bad, x, t, m, alpha, gamma, USE_ALPHA, GAMMA_MODE,
            CHECK_T)
    return s_focal, s_ce, s_pt, s_p, s_t, s_inter, s_union, s_bad


@triton.jit(do_not_specialize=["H", "W"])
def _fwd_even_kernel(logits_ptr, targets_ptr, partial_ptr, h, w, H, W, alpha, gamma,
                     USE_ALPHA: tl.constexpr, GAMMA_MODE: tl.constexpr, CHECK_T: tl.constexpr, NSUM: tl.constexpr,
                     FY: tl.constexpr, FX: tl.constexpr, BA: tl.constexpr, BB: tl.constexpr):
    """The forward sums for exact even power-of-two factors: program (tile, n) covers blocks [a0, a0+BA) x
    [b0, b0+BB) of mask n (every output pixel in exactly one block) and writes its NSUM partial sums."""
    tile = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    n_tx = tl.cdiv(w + 1, BB)
    a0 = (tile // n_tx) * BA
    b0 = (tile % n_tx) * BB
    tbase = targets_ptr + n * H * W
    aa, bb, xs, wrx, vx, top, bot = _even_blocks(logits_ptr + n * h * w, a0, b0, h, w, W, FY, FX, BA, BB)
    # per-pixel accumulators, reduced once at the end (summing over FX at every step: +42 % sm_90 instructions)
    if _even_interior(a0, b0, h, w, BA, BB):
        s_focal, s_ce, s_pt, s_p, s_t, s_inter, s_union, s_bad = _fwd_even_sums(
            tbase, aa, xs, h, H, W, vx, top, bot, alpha, gamma, USE_ALPHA, GAMMA_MODE, CHECK_T, FY, BA, BB, FX, False)
    else:
        s_focal, s_ce, s_pt, s_p, s_t, s_inter, s_union, s_bad = _fwd_even_sums(
            tbase, aa, xs, h, H, W, vx, top, bot, alpha, gamma, USE_ALPHA, GAMMA_MODE, CHECK_T, FY, BA, BB, FX, True)
    _store_sums(partial_ptr + (n * tl.num_programs(0) + tile) * NSUM, tl.sum(s_focal, axis=2),
                tl.sum(s_ce, axis=2), tl.sum(s_pt, axis=2), tl.sum(s_p, axis=2), tl.sum(s_t, axis=2),
                tl.sum(s_inter, axis=2), tl.sum(s_union, axis=2), tl.sum(s_bad, axis=2))


@triton.jit
def _bwd_even_sums(tbase, aa, xs, h, H, W, vx, wrx, top, bot, cf, cb, ca, cbb, alpha, gamma,
                   USE_ALPHA: tl.constexpr, GAMMA_MODE: tl.constexpr, FY: tl.constexpr, BA: tl.constexpr,
                   BB: tl.constexpr, MASKED: tl.constexpr):
    """The four block sums S_yx [BA, BB] of _bwd_even_kernel over the FY row offsets."""
    s_rr = tl.zeros([BA, BB], tl.float32)
    s_rl = tl.zeros([BA, BB], tl.float32)
    s_lr = tl.zeros([BA, BB], tl.float32)
    s_ll = tl.zeros([BA, BB], tl.float32)
    for q in range(FY):
        ys, wry, m, x = _even_rows(aa, q, h, H, vx, top, bot, FY, MASKED)
        t = tl.load(tbase + (ys * W)[:, None, None] + xs[None, :, :], mask=m, other=0).to(tl.float32)
        g = tl.where(m, _pixel_grad(x, t, cf, cb, ca, cbb, alpha, gamma, USE_ALPHA, GAMMA_MODE), 0.0)
        g_r = tl.sum(g * wrx, axis=2)  # [BA, BB] to column b
        g_l = tl.sum(g, axis=2) - g_r  # to column b-1
        wy = wry[:, None]
        s_rr += wy * g_r
        s_lr += (1.0 - wy) * g_r
        s_rl += wy * g_l
        s_ll += (1.0 - wy) * g_l
    return s_rr, s_rl, s_lr, s_ll


@triton.jit(do_not_specialize=["H", "W"])
def _bwd_even_kernel(logits_ptr, targets_ptr, gf_ptr, gb_ptr, gd_ptr, sf, sb, sd, scales_ptr, grad_ptr,
                     h, w, H, W, alpha, gamma,
                     USE_ALPHA: tl.constexpr, GAMMA_MODE: tl.constexpr, FY: tl.constexpr, FX: tl.constexpr,
                     BA: tl.constexpr, BB: tl.constexpr):
    """Backward of bilinear upsampling by exact even factors FY = H/h, FX = W/w (powers of two).

    Output rows split into blocks: block a holds rows FY*a - FY/2 + q (q < FY), whose bilinear sources are low-res
    rows a-1 and a with weights 1-u_q and u_q, u_q = (q + 0.5)/FY (ATen's align_corners=False formula; at a = 0
    everything goes to row 0, at a = h to row h-1: the clamped edges). Same for columns. So each output pixel
    belongs to one block (a, b) and sends its gradient to the four low-res pixels (a-1|a, b-1|b) with separable
    weights: per block four sums S_yx (y, x in {L: a-1/b-1, R: a/b}), then
        grad[i, j] = S_RR[i, j] + S_RL[i, j+1] + S_LR[i+1, j] + S_LL[i+1, j+1].
    A program owns BA x BB blocks and writes the (BA-1) x (BB-1) gradients they complete. It walks the FY rows of
    its blocks one offset q at a time ([BA, BB, FX] pixels): the column sums stay inside each thread, the row
    weights are per-q scalars, and the blocks' low-res corners are read once."""
    tile = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    n_tx = tl.cdiv(w, BB - 1)
    a0 = (tile // n_tx) * (BA - 1)
    b0 = (tile % n_tx) * (BB - 1)
    cf, cb, ca, cbb = _mask_coefs(gf_ptr, gb_ptr, gd_ptr, sf, sb, sd, scales_ptr, n)
    tbase = targets_ptr + n * H * W
    aa, bb, xs, wrx, vx, top, bot = _even_blocks(logits_ptr + n * h * w, a0, b0, h, w, W, FY, FX, BA, BB)
    if _even_interior(a0, b0, h, w, BA, BB):
        s_rr, s_rl, s_lr, s_ll = _bwd_even_sums(tbase, aa, xs, h, H, W, vx, wrx, top, bot, cf, cb, ca, cbb, alpha,
                                                gamma, USE_ALPHA, GAMMA_MODE, FY, BA, BB, False)
    else:
        s_rr, s_rl, s_lr, s_ll = _bwd_even_sums(tbase, aa, xs, h, H, W, vx, wrx, top, bot, cf, cb, ca, cbb, alpha,
                                                gamma, USE_ALPHA, GAMMA_MODE, FY, BA, BB, True)
    acc = s_rr + _shift_left(s_rl, BB) + _shift_up(s_lr + _shift_left(s_ll, BB), BA)
    ra = tl.arange(0, BA)
    cc = tl.arange(0, BB)
    jj = b0 + cc
    ok = ((ra < BA - 1) & (aa < h))[:, None] & ((cc < BB - 1) & (jj < w))[None, :]
    tl.store(grad_ptr + n * h * w + (aa * w)[:, None] + jj[None, :], acc.to(grad_ptr.dtype.element_ty), mask=ok)


def even_factors(plan: FusedPlan) -> tuple[int, int] | None:
    """(H/h, W/w) when every mask is an exact even power-of-two upsampling of the logits (uniform batch)."""
    if not plan.bilinear or plan.ragged:
        return None
    _, h, w = plan.logits.shape
    if plan.H % h or plan.W % w:
        return None
    fy, fx = plan.H // h, plan.W // w
    return (fy, fx) if fy in (2, 4, 8, 16) and fx in (2, 4, 8, 16) else None


@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _forward_programs_per_mask(max_tiles: int, n: int, device: torch.device) -> int:
    """Enough programs to fill the GPU (about 8 per SM over the batch), each looping over several tiles."""
    if device.type != "cuda":
        return 1  # interpreter: every program costs ~1 ms
    return max(1, min(max_tiles, triton.cdiv(8 * _sm_count(device), n)))


@functools.lru_cache(maxsize=16)
def _zero(device: torch.device) -> torch.Tensor:
    """The upstream gradient of a loss that got none: one float32 zero per device, expanded (stride 0) to the
    largest batch of one launch."""
    return torch.zeros(1, dtype=torch.float32, device=device).expand(MAX_MASKS_PER_LAUNCH)


def _on_device(method):
    """Run a launch with the tensors' GPU as the current device (Triton launches on the current device)."""

    def wrapper(self, plan, *args):
        if plan.logits.device.type != "cuda":
            return method(self, plan, *args)
        with torch.cuda.device(plan.logits.device):
            return method(self, plan, *args)

    return wrapper


class TritonOps(FusedOps):
    """The Triton implementation of the fused-backend interface of _fused.py."""

    def __init__(self, dot_precision: str | None = None):
        self.dot_precision = dot_precision or DOT_PRECISION

    @staticmethod
    def make_plan(batch: MaskBatch) -> FusedPlan:
        return make_plan(batch, block_y=BWD_LY, block_x=BWD_LX, region_y=BWD_REGION_Y, region_x=BWD_RX)

    @staticmethod
    def _meta(plan: FusedPlan):
        if plan.ragged:
            return plan.meta_i, plan.meta_f
        return plan.logits, plan.logits  # placeholders, never read (RAGGED=False)

    @staticmethod
    def _consts(plan: FusedPlan):
        return dict(RAGGED=plan.ragged, USE_ALPHA=plan.alpha >= 0, GAMMA_MODE=_gamma_mode(plan.gamma))

    def _partials(self, plan: FusedPlan) -> torch.Tensor:
        """The forward kernel's per-program partial sums, float32 [N, programs, NUM_SUMS]."""
        n, h, w = plan.logits.shape
        factors = even_factors(plan) if EVEN_PATH else None
        if factors is not None:
            tiles = triton.cdiv(h + 1, EVEN_BA) * triton.cdiv(w + 1, EVEN_BB)
            partial = torch.empty(n, tiles, NUM_SUMS, dtype=torch.float32, device=plan.logits.device)
            _fwd_even_kernel[(tiles, n)](
                plan.logits, plan.targets, partial, h, w, plan.H, plan.W, plan.alpha, plan.gamma,
                USE_ALPHA=plan.alpha >= 0, GAMMA_MODE=_gamma_mode(plan.gamma), CHECK_T=plan.check_targets,
                NSUM=NUM_SUMS, FY=factors[0], FX=factors[1], BA=EVEN_BA, BB=EVEN_BB, num_warps=EVEN_WARPS)
            return partial
        oh, ow = plan.max_grid
        n_progs = _forward_programs_per_mask(triton.cdiv(oh, FWD_BY) * triton.cdiv(ow, FWD_BX), n,
                                             plan.logits.device)
        partial = torch.empty(n, n_progs, NUM_SUMS, dtype=torch.float32, device=plan.logits.device)
        mi, mf = self._meta(plan)
        _fwd_kernel[(n_progs, n)](
            plan.logits, plan.targets, mi, mf, partial, h, w, plan.H, plan.W, plan.scale_y, plan.scale_x,
            plan.alpha, plan.gamma, BILINEAR=plan.bilinear, NSUM=NUM_SUMS, BY=FWD_BY, BX=FWD_BX,
            EVEN=all(a % FWD_BY == 0 and b % FWD_BX == 0 for a, b in plan.grids), CHECK_T=plan.check_targets,
            num_warps=FWD_WARPS, **self._consts(plan))
        return partial

    @_on_device
    def forward_losses(self, plan: FusedPlan, params: LossParams):
        partial = self._partials(plan)
        n, n_partials, _ = partial.shape
        dev = plan.logits.device
        sums = torch.empty(n, NUM_SUMS, dtype=torch.float64, device=dev)
        focal, bce, dice, iou = (torch.empty(n, dtype=torch.float32, device=dev) for _ in range(4))
        scales = torch.empty(n, 4, dtype=torch.float32, device=dev)
        grid = plan.grids[0]
        _finalize_kernel[(n,)](
            partial, n_partials, plan.meta_i if plan.ragged else partial, grid[0] * grid[1], params.dice_smooth,
            sums, focal, bce, dice, iou, scales, NPIX_FROM_META=plan.ragged and plan.bilinear, NSUM=NUM_SUMS,
            BP=FINALIZE_BP)
        return sums, (focal, bce, dice, iou), scales

    @_on_device
    def backward_from_grads(self, plan: FusedPlan, g_focal, g_bce, g_dice, scales: torch.Tensor) -> torch.Tensor:
        n, h, w = plan.logits.shape
        grad = torch.empty_like(plan.logits)
        g = [_zero(grad.device) if v is None else v for v in (g_focal, g_bce, g_dice)]
        grads = (*g, *(v.stride(0) for v in g), scales)
        mi, mf = self._meta(plan)
        factors = even_factors(plan) if EVEN_PATH else None
        if factors is not None:
            tiles = triton.cdiv(h, EVEN_BA - 1) * triton.cdiv(w, EVEN_BB - 1)
            _bwd_even_kernel[(tiles, n)](
                plan.logits, plan.targets, *grads, grad, h, w, plan.H, plan.W, plan.alpha, plan.gamma,
                FY=factors[0], FX=factors[1], BA=EVEN_BA, BB=EVEN_BB, num_warps=EVEN_WARPS,
                num_stages=1, USE_ALPHA=plan.alpha >= 0, GAMMA_MODE=_gamma_mode(plan.gamma))
        elif plan.bilinear:
            _bwd_bilinear_kernel[(plan.max_bwd_tiles, n)](
                plan.logits, plan.targets, mi, mf, *grads, grad, h, w, plan.H, plan.W, plan.scale_y, plan.scale_x,
                plan.th, plan.tw, plan.alpha, plan.gamma, LY=BWD_LY, LX=BWD_LX, RY=BWD_RY, RX=BWD_RX,
                DOT_PREC=self.dot_precision, num_warps=BWD_WARPS, num_stages=1, **self._consts(plan))
        else:
            n_tiles = triton.cdiv(h, PW_BY) * triton.cdiv(w, PW_BX)
            _bwd_pointwise_kernel[(n_tiles, n)](
                plan.logits, plan.targets, mi, mf, *grads, grad, h, w, plan.H, plan.W, plan.scale_y, plan.scale_x,
                plan.alpha, plan.gamma, BY=PW_BY, BX=PW_BX, num_warps=FWD_WARPS, **self._consts(plan))
        return grad


def mask_loss_triton(batch: MaskBatch, dot_precision: str | None = None):
    """(focal, bce, dice, iou) float32 [N] with the Triton kernels (CUDA tensors, or CPU under TRITON_INTERPRET=1)."""
    return fused_mask_loss(batch, TritonOps(dot_precision))

