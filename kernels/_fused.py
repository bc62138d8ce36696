"""Host side shared by the fused backends (Triton, CUDA extension): packing, value checks, autograd.

A fused backend (a FusedOps) provides launches for the whole (possibly ragged) batch:
  forward_sums(plan) -> float64 [N, NUM_SUMS]   per-mask sums, incl. the count of targets outside [0, 1]
  backward(plan, coefs) -> gradient of the logits (logits' dtype), coefs [N, 4] as in `grad_scales`.
It may also turn the sums into losses on the device (`forward_losses`) and read the upstream gradients in its backward
kernel (`backward_from_grads`): after the forward's host sync the GPU is idle, so every host-to-device copy and small
op there adds to the call's wall time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ._inputs import LossParams, MaskBatch, count_bad_targets, count_nonfinite, raise_for_bad_values, raise_for_overflow
from .reference import SUM_BAD, grad_scales, losses_from_sums

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
    npix: np.ndarray  # float64 [N] pixels of each mask's loss grid (host)
    max_grid: tuple[int, int]  # largest loss grid (rows, cols)
    max_bwd_tiles: int  # largest number of backward tiles of one mask
    needs_target_check: bool  # forward kernel does not read every target pixel (nearest downsampling)
    skips_logits: bool  # forward kernel does not read every logit (bilinear downsampling)
    alpha: float
    gamma: float
    grids: list[tuple[int, int]]  # the masks' loss grids (rows, cols); one entry when uniform
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
    dev = logits.device

    def scales(H, W):
        return (_f32_ratio(h, H), _f32_ratio(w, W)) if bilinear else (_f32_ratio(H, h), _f32_ratio(W, w))

    def tiles(H, W):
        if not bilinear:
            return 1, 1
        return backward_tile(h, H, block_y, region_y), backward_tile(w, W, block_x, region_x)

    def common(sizes, grids, bwd_tiles, npix: np.ndarray, non_bool: bool):
        return dict(
            npix=npix,
            max_grid=(max(g[0] for g in grids), max(g[1] for g in grids)),
            max_bwd_tiles=max(math.ceil(h / a) * math.ceil(w / b) for a, b in bwd_tiles),
            # nearest downsampling of the targets skips target pixels; bilinear downsampling skips logits
            needs_target_check=non_bool and not bilinear and any(H > h or W > w for H, W in sizes),
            skips_logits=bilinear and any(H < h or W < w for H, W in sizes),
            alpha=batch.params.alpha, gamma=batch.params.gamma, grids=grids, check_targets=non_bool)

    if not batch.ragged:  # O(1) in N: one geometry for every mask
        H, W = batch.stacked.shape[1:]
        sy, sx = scales(H, W)
        th, tw = tiles(H, W)
        grid = (H, W) if bilinear else (h, w)
        extra = common([(H, W)], [grid], [(th, tw)], np.full(n, float(grid[0] * grid[1])),
                       batch.stacked.dtype != torch.bool)
        return FusedPlan(logits, _target_storage(batch.stacked).contiguous(), bilinear, False, H, W, sy, sx, th, tw,
                         None, None, **extra)
    sizes = batch.sizes
    grids = [(H, W) if bilinear else (h, w) for H, W in sizes]
    tile_hw = [tiles(H, W) for H, W in sizes]
    stores = [_target_storage(t) for t in batch.target_list]
    if len({s.dtype for s in stores}) > 1:
        common_dtype = torch.float32 if any(s.is_floating_point() for s in stores) else torch.uint8
        stores = [s.to(common_dtype) for s in stores]
    flat = torch.cat([s.reshape(-1) for s in stores])
    offsets = np.cumsum([0] + [a * b for a, b in sizes[:-1]])
    meta_i = _to_device(torch.tensor([[H, W, int(o), th, tw] for (H, W), o, (th, tw) in
                                      zip(sizes, offsets, tile_hw)], dtype=torch.int64), dev)
    meta_f = _to_device(torch.tensor([scales(H, W) for H, W in sizes], dtype=torch.float32), dev)
    extra = common(sizes, grids, tile_hw, np.array([float(a * b) for a, b in grids]),
                   any(t.dtype != torch.bool for t in batch.target_list))
    return FusedPlan(logits, flat, bilinear, True, 0, 0, 0.0, 0.0, 1, 1, meta_i, meta_f, **extra)


def check_values(sums: np.ndarray, plan: FusedPlan, batch: MaskBatch) -> None:
    """Raise ValueError for non-finite logits or targets outside [0, 1], from the forward's sums (host float64).

    Every logit the loss reads reaches the sums, and finite logits give finite per-pixel terms, so finite sums mean
    finite logits, except for logits the loss never reads (bilinear downsampling): those are counted on the device.
    The slow diagnosis runs only when something is wrong."""
    bad_targets = int(sums[:, SUM_BAD].sum())
    if plan.needs_target_check:
        bad_targets += sum(int(count_bad_targets(t)) for t in batch.target_tensors)
    nonfinite = 0
    if plan.skips_logits or not np.isfinite(sums[:, :SUM_BAD]).all():
        nonfinite = int(count_nonfinite(plan.logits))
    raise_for_bad_values(nonfinite, bad_targets)
    raise_for_overflow(sums[:, :SUM_BAD], plan.logits)


class FusedOps:
    """Defaults of the optional fused-backend methods: losses from the sums on the host, coefficients by torch."""

    def forward_losses(self, plan: FusedPlan, params: LossParams):
        """(float64 sums [N, NUM_SUMS], losses (focal, bce, dice, iou) or None, grad scales [N, 4] or None), all
        on the device; None: the caller makes them on the host from the sums."""
        return self.forward_sums(plan), None, None

    def backward_from_grads(self, plan: FusedPlan, g_focal, g_bce, g_dice, scales: torch.Tensor) -> torch.Tensor:
        """g_*: float32 [N] upstream gradients, None for a loss that got none."""
        g = [scales.new_zeros(plan.n) if v is None else v for v in (g_focal, g_bce, g_dice)]
        coefs = torch.stack([g[0], g[1], g[2], g[2]], dim=1).float() * scales
        return self.backward(plan, coefs)


class _FusedMaskLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, batch: MaskBatch, ops: FusedOps):
        plan = ops.make_plan(batch)
        sums_dev, losses, scales = ops.forward_losses(plan, batch.params)
        sums = sums_dev.cpu().numpy()  # the one host sync of the call: the value checks need it
        check_values(sums, plan, batch)
        if losses is None:  # the losses and the backward's per-mask factors from the host's sums, one copy each
            dev = plan.logits.device
            losses = [torch.from_numpy(v).to(dev) for v in losses_from_sums(sums, plan.npix, batch.params)]
            scales = torch.from_numpy(grad_scales(sums, plan.npix, batch.params)).to(dev)
        ctx.mark_non_differentiable(losses[3])
        ctx.set_materialize_grads(False)  # a loss left out of the objective costs no zeros kernel in the backward
        ctx.plan, ctx.ops, ctx.scales = plan, ops, scales
        return tuple(losses)

    @staticmethod
    def backward(ctx, g_focal, g_bce, g_dice, _g_iou):
        return ctx.ops.backward_from_grads(ctx.plan, g_focal, g_bce, g_dice, ctx.scales), None, None


# CUDA grids allow 65535 blocks along y, the masks' axis: larger batches run in slices.
MAX_MASKS_PER_LAUNCH = 65535


def _slices(batch: MaskBatch, size: int):
    for s in range(0, batch.n, size):
        yield batch.slice(s, min(s + size, batch.n))


def fused_mask_loss(batch: MaskBatch, ops):
    if batch.n > MAX_MASKS_PER_LAUNCH:
        parts = [fused_mask_loss(sub, ops) for sub in _slices(batch, MAX_MASKS_PER_LAUNCH)]
        return tuple(torch.cat(p) for p in zip(*parts))
    if batch.n == 0:
        z = batch.logits.new_zeros(0, dtype=torch.float32)
        return z + batch.logits.sum() * 0, z.clone(), z.clone(), z.clone()
    return _FusedMaskLoss.apply(batch.logits, batch, ops)
