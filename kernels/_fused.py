"""Host side shared by the fused backends (Triton, CUDA extension): packing, value checks, autograd.

A fused backend provides two launches per pass, each one launch for the whole (possibly ragged) batch:
  forward_sums(plan) -> float64 [N, NUM_SUMS]   per-mask sums, incl. the count of targets outside [0, 1]
  backward(plan, coefs) -> gradient of the logits (logits' dtype), coefs from `loss_grad_coefficients`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ._inputs import MaskBatch, count_bad_targets, count_nonfinite, raise_for_bad_values
from .reference import SUM_BAD, loss_grad_coefficients, losses_from_sums

# meta_i columns (int64 [N, META_I]): target H, W, flat offset, backward tile rows/cols (low-res pixels)
META_H, META_W, META_OFF, META_TH, META_TW = range(5)
META_I = 5
# meta_f columns (float32 [N, 2]): source/destination scales of the loss grid's y and x (ATen's float32 ratio)
META_F = 2


@dataclass
class FusedPlan:
    logits: torch.Tensor  # contiguous [N, h, w]
    targets: torch.Tensor  # contiguous; [N, H, W] when uniform, flat concatenation when ragged
    bilinear: bool  # True: loss grid = target grid (logits upsampled); False: loss grid = logits grid
    ragged: bool
    H: int  # uniform target size (0 when ragged)
    W: int
    scale_y: float  # uniform scales (see META_F)
    scale_x: float
    th: int  # uniform backward tile (low-res rows/cols per program)
    tw: int
    meta_i: torch.Tensor | None  # ragged only
    meta_f: torch.Tensor | None
    npix: torch.Tensor  # float64 [N] pixels of each mask's loss grid
    max_grid: tuple[int, int]  # largest loss grid (rows, cols)
    max_bwd_tiles: int  # largest number of backward tiles of one mask
    needs_target_check: bool  # forward kernel does not read every target pixel (nearest downsampling)
    alpha: float
    gamma: float
    grids: list[tuple[int, int]]  # each mask's loss grid (rows, cols)
    check_targets: bool  # targets may hold values outside [0, 1] (not bool)

    @property
    def n(self) -> int:
        return self.logits.shape[0]


def _f32_ratio(a: int, b: int) -> float:
    """ATen's `(float)a / b` (a correctly rounded float32 quotient)."""
    return float(np.float32(a) / np.float32(b))


def backward_tile(n_in: int, n_out: int, block: int, region: int) -> int:
    """Low-res pixels per backward program along one axis so that the output rows/cols touching them (plus the
    kernel's safety margin of 6) fit `region`; at least 1 and at most `block`."""
    per_in = n_in / n_out  # low-res pixels per output pixel
    return max(1, min(block, int(math.floor((region - 6) * per_in)) - 1))


def _target_storage(t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.bool:
        return t.view(torch.uint8) if t.is_contiguous() else t.contiguous().view(torch.uint8)
    if t.dtype == torch.float64:
        return t.float()
    return t


def _to_device(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """Host -> device copy that does not wait for the GPU queue (pinned staging, non_blocking)."""
    if dev.type != "cuda":
        return t
    return t.pin_memory().to(dev, non_blocking=True)


def make_plan(batch: MaskBatch, *, block_y: int, block_x: int, region_y: int, region_x: int) -> FusedPlan:
    logits = batch.logits.contiguous()
    n, h, w = logits.shape
    bilinear = batch.resize == "logits"
    sizes = batch.sizes
    dev = logits.device

    def scales(H, W):
        return (_f32_ratio(h, H), _f32_ratio(w, W)) if bilinear else (_f32_ratio(H, h), _f32_ratio(W, w))

    def tiles(H, W):
        if not bilinear:
            return 1, 1
        return backward_tile(h, H, block_y, region_y), backward_tile(w, W, block_x, region_x)

    grids = [(H, W) if bilinear else (h, w) for H, W in sizes]
    tile_hw = [tiles(H, W) for H, W in sizes]
    max_bwd = max([math.ceil(h / a) * math.ceil(w / b) for a, b in tile_hw], default=1)
    needs_check = (not bilinear) and any(H > h or W > w for H, W in sizes)
    check = any(t.dtype != torch.bool for t in batch.targets)
    max_grid = (max([g[0] for g in grids], default=1), max([g[1] for g in grids], default=1))
    if not batch.ragged:
        H, W = (sizes[0] if sizes else (h, w))
        sy, sx = scales(H, W)
        th, tw = tiles(H, W)
        npix = torch.full((n,), float(grids[0][0] * grids[0][1]) if grids else 1.0, dtype=torch.float64, device=dev)
        return FusedPlan(logits, _target_storage(batch.stacked).contiguous(), bilinear, False, H, W, sy, sx, th, tw,
                         None, None, npix, max_grid, max_bwd, needs_check, batch.params.alpha, batch.params.gamma,
                         grids, check)
    stores = [_target_storage(t) for t in batch.targets]
    if len({s.dtype for s in stores}) > 1:
        common = torch.float32 if any(s.is_floating_point() for s in stores) else torch.uint8
        stores = [s.to(common) for s in stores]
    flat = torch.cat([s.reshape(-1) for s in stores])
    offsets = np.cumsum([0] + [a * b for a, b in sizes[:-1]])
    meta_i = _to_device(torch.tensor([[H, W, int(o), th, tw] for (H, W), o, (th, tw) in
                                      zip(sizes, offsets, tile_hw)], dtype=torch.int64), dev)
    meta_f = _to_device(torch.tensor([scales(H, W) for H, W in sizes], dtype=torch.float32), dev)
    npix = _to_device(torch.tensor([float(a * b) for a, b in grids], dtype=torch.float64), dev)
    return FusedPlan(logits, flat, bilinear, True, 0, 0, 0.0, 0.0, 1, 1, meta_i, meta_f, npix, max_grid, max_bwd,
                     needs_check, batch.params.alpha, batch.params.gamma, grids, check)


class _FusedMaskLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, batch: MaskBatch, ops):
        plan = ops.make_plan(batch)
        sums = ops.forward_sums(plan)
        checks = [count_nonfinite(plan.logits), sums[:, SUM_BAD].sum().to(torch.int64)]
        if plan.needs_target_check:
            checks += [count_bad_targets(t) for t in batch.targets]
        counts = torch.stack(checks).tolist()  # the one host sync of the call
        raise_for_bad_values(counts[0], sum(counts[1:]))
        focal, bce, dice, iou = losses_from_sums(sums, plan.npix, batch.params)
        ctx.mark_non_differentiable(iou)
        ctx.plan, ctx.ops, ctx.params = plan, ops, batch.params
        ctx.save_for_backward(sums)
        return focal, bce, dice, iou

    @staticmethod
    def backward(ctx, g_focal, g_bce, g_dice, _g_iou):
        (sums,) = ctx.saved_tensors
        coefs = loss_grad_coefficients(sums, ctx.plan.npix, ctx.params, g_focal, g_bce, g_dice)
        return ctx.ops.backward(ctx.plan, coefs), None, None


# CUDA grids allow 65535 blocks along y, the masks' axis: larger batches run in slices.
MAX_MASKS_PER_LAUNCH = 65535


def _slices(batch: MaskBatch, size: int):
    for s in range(0, batch.n, size):
        e = min(s + size, batch.n)
        yield MaskBatch(logits=batch.logits[s:e], targets=batch.targets[s:e],
                        stacked=None if batch.stacked is None else batch.stacked[s:e], resize=batch.resize,
                        params=batch.params)


def fused_mask_loss(batch: MaskBatch, ops):
    if batch.n > MAX_MASKS_PER_LAUNCH:
        parts = [fused_mask_loss(sub, ops) for sub in _slices(batch, MAX_MASKS_PER_LAUNCH)]
        return tuple(torch.cat(p) for p in zip(*parts))
    if batch.n == 0:
        z = batch.logits.new_zeros(0, dtype=torch.float32)
        return z + batch.logits.sum() * 0, z.clone(), z.clone(), z.clone()
    return _FusedMaskLoss.apply(batch.logits, batch, ops)
