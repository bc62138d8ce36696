"""Exact torch reference of the mask losses (runs anywhere; the fused kernels are tested against it).

Memory: the forward keeps only per-mask sums; the backward recomputes one mask at a time (checkpoint style), so at
most one mask's full-resolution tensors exist at any moment and large N fits in memory.

Per pixel, with x the (resized) logit and t the target in [0, 1], all in float32:
    ce = BCE-with-logits(x, t),  p = sigmoid(x),  1 - p_t = p(1 - t) + (1 - p)t
    focal = ce * (1 - p_t)^gamma * (alpha t + (1 - alpha)(1 - t))     (no alpha factor when alpha < 0)
Per mask: focal and bce are means over the mask's pixels; dice = 1 - (2 sum(p t) + s) / (sum p + sum t + s);
iou = |x > 0 and t > 0.5| / max(|x > 0 or t > 0.5|, 1).
(1 - p_t) is clamped below at the smallest normal float32 so that gamma < 1 never meets 0^(gamma-1) in the gradient;
the dice denominator is clamped at DICE_EPS (only reachable with dice_smooth = 0 and empty masks).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ._inputs import LossParams, MaskBatch, raise_for_overflow

TINY = float(torch.finfo(torch.float32).tiny)
DICE_EPS = 1e-12
# Channels of the per-mask sums every backend produces (then turned into losses by `losses_from_sums`).
SUM_FOCAL, SUM_CE, SUM_PT, SUM_P, SUM_T, SUM_INTER, SUM_UNION, SUM_BAD = range(8)
NUM_SUMS = 8


def resized_pair(x: torch.Tensor, t: torch.Tensor, resize: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One mask's logits [h, w] and target [H, W] brought to the grid the loss is computed on, as float32."""
    x = x.float()
    if resize == "logits" and tuple(t.shape) != tuple(x.shape):
        x = F.interpolate(x[None, None], size=tuple(t.shape), mode="bilinear", align_corners=False)[0, 0]
    t = t.float()
    if resize == "targets" and tuple(t.shape) != tuple(x.shape):
        t = F.interpolate(t[None, None], size=tuple(x.shape), mode="nearest")[0, 0]
    return x, t


def pixel_losses(x: torch.Tensor, t: torch.Tensor, params: LossParams) -> tuple[torch.Tensor, torch.Tensor,
                                                                               torch.Tensor]:
    """Per-pixel (focal, bce, p) in float32, differentiable in x."""
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p = torch.sigmoid(x)
    one_minus_pt = (p * (1 - t) + torch.sigmoid(-x) * t).clamp_min(TINY)
    focal = ce * one_minus_pt.pow(params.gamma)
    if params.alpha >= 0:
        focal = focal * (params.alpha * t + (1 - params.alpha) * (1 - t))
    return focal, ce, p


def mask_sums(x: torch.Tensor, t: torch.Tensor, params: LossParams) -> torch.Tensor:
    """The NUM_SUMS per-mask sums (float64) of one resized pair."""
    with torch.no_grad():
        focal, ce, p = pixel_losses(x, t, params)
        pred, tb = x > 0, t > 0.5
        vals = [focal.sum(), ce.sum(), (p * t).sum(), p.sum(), t.sum(), (pred & tb).sum(), (pred | tb).sum()]
        out = torch.stack([v.double() for v in vals] + [torch.zeros((), dtype=torch.float64, device=x.device)])
    return out


def dice_from_sums(s_pt, s_p, s_t, smooth: float):
    """Works on torch tensors (differentiable) and numpy arrays alike."""
    denom = (s_p + s_t + smooth).clip(min=DICE_EPS)
    return 1 - (2 * s_pt + smooth) / denom


def losses_from_sums(sums: np.ndarray, npix: np.ndarray, params: LossParams) -> np.ndarray:
    """Host float64 sums [N, NUM_SUMS] and pixel counts [N] -> float32 [4, N]: focal, bce, dice, iou."""
    focal = sums[:, SUM_FOCAL] / npix
    bce = sums[:, SUM_CE] / npix
    dice = dice_from_sums(sums[:, SUM_PT], sums[:, SUM_P], sums[:, SUM_T], params.dice_smooth)
    iou = sums[:, SUM_INTER] / np.maximum(sums[:, SUM_UNION], 1)
    return np.stack([focal, bce, dice, iou]).astype(np.float32)


def grad_scales(sums: np.ndarray, npix: np.ndarray, params: LossParams) -> np.ndarray:
    """Host float32 [N, 4] per-mask factors s such that the fused backward's coefficients are
    (cf, cb, A, B) = (g_focal, g_bce, g_dice, g_dice) * s, in the pixel gradient

        dL/dx = cf * dfocal/dx + cb * (p - t) + p (1 - p) (A t + B)

    i.e. s = (1/M, 1/M, -2/D, (2I + smooth)/D^2): d dice / d p = -2t/D + (2I + smooth)/D^2, D = sum p + sum t + smooth.
    """
    raw_d = sums[:, SUM_P] + sums[:, SUM_T] + params.dice_smooth
    d = np.maximum(raw_d, DICE_EPS)
    b = np.where(raw_d > DICE_EPS, (2 * sums[:, SUM_PT] + params.dice_smooth) / (d * d), 0.0)
    return np.stack([1 / npix, 1 / npix, -2 / d, b], axis=1).astype(np.float32)


class _ReferenceMaskLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, batch: MaskBatch):
        sums, npix = [], []
        for x, t in zip(logits.detach().unbind(0), batch.targets):
            xr, tr = resized_pair(x, t, batch.resize)
            sums.append(mask_sums(xr, tr, batch.params))
            npix.append(xr.numel())
        sums = torch.stack(sums).cpu().numpy() if sums else np.zeros((0, NUM_SUMS))
        raise_for_overflow(sums, logits)
        losses = torch.from_numpy(losses_from_sums(sums, np.asarray(npix, dtype=np.float64), batch.params))
        focal, bce, dice, iou = (v.to(logits.device, copy=True) for v in losses)  # separate tensors
        ctx.mark_non_differentiable(iou)
        ctx.batch = batch
        ctx.save_for_backward(logits)
        return focal, bce, dice, iou

    @staticmethod
    def backward(ctx, g_focal, g_bce, g_dice, _g_iou):
        (logits,) = ctx.saved_tensors
        batch: MaskBatch = ctx.batch
        grad = torch.empty_like(logits)
        zero = torch.zeros((), device=logits.device)
        for n, (x, t) in enumerate(zip(logits.detach().unbind(0), batch.targets)):
            with torch.enable_grad():
                x32 = x.float().requires_grad_(True)
                xr, tr = resized_pair(x32, t, batch.resize)
                focal, ce, p = pixel_losses(xr, tr, batch.params)
                dice = dice_from_sums((p * tr).sum(), p.sum(), tr.sum(), batch.params.dice_smooth)
                total = (focal.mean() * (zero if g_focal is None else g_focal[n])
                         + ce.mean() * (zero if g_bce is None else g_bce[n])
                         + dice * (zero if g_dice is None else g_dice[n]))
                (gx,) = torch.autograd.grad(total, x32)
            grad[n] = gx.to(grad.dtype)
        return grad, None


def mask_loss_reference(batch: MaskBatch):
    """(focal, bce, dice, iou) float32 [N] computed mask by mask with torch ops."""
    return _ReferenceMaskLoss.apply(batch.logits, batch)
