"""Losses of the dual loop: the mask loss against mask2 at its native resolution (fused kernel), the supervised
caption loss for samples that have a ground-truth caption, and per-dataset aggregation for logging.

Normalization: every loss is a per-sample value averaged over the micro-batch's samples (a fixed count on every
rank), so ranks contribute equally and the number of model calls never depends on the data.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dualloop.config import ConfigError, LossConfig

# preset -> (bce, focal, dice, iou_head) weights; multimask selection default. Sa2VA trains no IoU head (its mask is
# the one the head ranks best); SAM2 supervises every mask's predicted IoU (supervise_all_iou, L1, weight 1).
LOSS_PRESETS = {
    "sa2va": ({"bce": 2.0, "focal": 0.0, "dice": 0.5, "iou_head": 0.0}, "best"),
    "sam2": ({"bce": 0.0, "focal": 20.0, "dice": 1.0, "iou_head": 1.0}, "argmin"),
}
WEIGHTS = ("bce", "focal", "dice", "iou_head")
_FIELD_DEFAULTS = LossConfig()


@dataclass(frozen=True)
class MaskLossSpec:
    bce: float
    focal: float
    dice: float
    iou_head: float
    multimask: str  # best | argmin
    resize: str
    backend: str
    alpha: float
    gamma: float
    dice_smooth: float


def resolve_loss(cfg: LossConfig) -> MaskLossSpec:
    """Weights from the preset (sa2va | sam2) or from the fields (custom). Changing a weight field while a
    preset is selected is an error rather than silently ignored."""
    if cfg.preset == "custom":
        weights = {k: getattr(cfg, k) for k in WEIGHTS}
        default_mm = "best"
    elif cfg.preset in LOSS_PRESETS:
        weights, default_mm = LOSS_PRESETS[cfg.preset]
        for k in WEIGHTS:
            if getattr(cfg, k) != getattr(_FIELD_DEFAULTS, k) and getattr(cfg, k) != weights[k]:
                raise ConfigError(f"loop.loss.{k}={getattr(cfg, k)} is ignored by loop.loss.preset={cfg.preset!r}; "
                                  "set loop.loss.preset=custom to use your own weights")
    else:
        raise ConfigError(f"loop.loss.preset must be sa2va, sam2 or custom, got {cfg.preset!r}")
    if min(weights.values()) < 0 or weights["bce"] + weights["focal"] + weights["dice"] <= 0:
        raise ConfigError(f"loop.loss weights must be >= 0, and bce, focal, dice not all zero, got {weights}")
    multimask = default_mm if cfg.multimask == "auto" else cfg.multimask
    if multimask not in ("best", "argmin"):
        raise ConfigError(f"loop.loss.multimask must be auto, best or argmin, got {cfg.multimask!r}")
    if cfg.resize not in ("logits", "targets"):
        raise ConfigError(f"loop.loss.resize must be logits or targets, got {cfg.resize!r}")
    if cfg.caption < 0:
        raise ConfigError(f"loop.loss.caption must be >= 0, got {cfg.caption}")
    return MaskLossSpec(multimask=multimask, resize=cfg.resize, backend=cfg.backend, alpha=cfg.focal_alpha,
                        gamma=cfg.focal_gamma, dice_smooth=cfg.dice_smooth, **weights)


@dataclass
class MaskLossOut:
    total: torch.Tensor  # [B] weighted per-sample loss (differentiable)
    bce: torch.Tensor  # [B] detached components
    focal: torch.Tensor
    dice: torch.Tensor
    iou: torch.Tensor  # [B] IoU of (logits > 0) upsampled vs the target, no grad
    choice: torch.Tensor | None = None  # [B] chosen multimask index (argmin mode)
    # [B] weighted IoU-prediction loss (differentiable; None without iou_head weight or predictions). Kept out of
    # `total`, the mask loss, which REINFORCE's neg_loss reward reads: the caption is not judged by the IoU head.
    iou_head: torch.Tensor | None = None


def mask_losses(logits: torch.Tensor, targets: list[torch.Tensor], spec: MaskLossSpec,
                iou_pred: torch.Tensor | None = None) -> MaskLossOut:
    """logits [B, h, w] (one mask per sample) or [B, M, h, w] (multimask: argmin of the weighted loss per sample,
    SAM2's rule); targets: B uint8 masks at native resolution; iou_pred [B] or [B, M], the IoU head's predictions
    for those masks (with spec.iou_head > 0: L1 to each mask's actual IoU, averaged over the M masks, as SAM2's
    supervise_all_iou; none for an empty target, where SAM2 backpropagates nothing either)."""
    from dualloop.kernels import mask_loss

    if logits.dim() not in (3, 4):
        raise ValueError(f"mask logits must be [B, h, w] or [B, M, h, w], got {tuple(logits.shape)}")
    if logits.shape[0] != len(targets):
        raise ValueError(f"{logits.shape[0]} mask logits for {len(targets)} target masks")
    B = logits.shape[0]
    M = logits.shape[1] if logits.dim() == 4 else 1
    flat = logits.reshape(B * M, *logits.shape[-2:])
    flat_targets = [t for t in targets for _ in range(M)]
    out = mask_loss(flat, flat_targets, resize=spec.resize, alpha=spec.alpha, gamma=spec.gamma,
                    dice_smooth=spec.dice_smooth, backend=spec.backend)
    total = spec.bce * out.bce + spec.focal * out.focal + spec.dice * out.dice
    iou_head = None
    if spec.iou_head > 0 and iou_pred is not None:
        if iou_pred.numel() != B * M:
            raise ValueError(f"{tuple(iou_pred.shape)} IoU predictions for {B} x {M} masks")
        present = torch.stack([t.any() for t in targets]).to(logits.device)
        l1 = (iou_pred.float().reshape(B, M) - out.iou.detach().float().view(B, M)).abs().mean(dim=1)
        iou_head = spec.iou_head * l1 * present
    parts = {"bce": out.bce, "focal": out.focal, "dice": out.dice, "iou": out.iou}
    choice = None
    if M > 1:
        total = total.view(B, M)
        choice = total.detach().argmin(dim=1)
        rows = torch.arange(B, device=total.device)
        total = total[rows, choice]
        parts = {k: v.view(B, M)[rows, choice] for k, v in parts.items()}
    return MaskLossOut(total=total, bce=parts["bce"].detach(), focal=parts["focal"].detach(),
                       dice=parts["dice"].detach(), iou=parts["iou"].detach(), choice=choice, iou_head=iou_head)


def token_log_probs(logits: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-token log p(ids) from teacher-forced logits [B, T, V]; returns (logp [B, T] zeroed past each length,
    valid mask [B, T]). Logits may hold -inf (ids the sampler excludes): the pad ids past a caption's end then
    gather -inf, which `where` zeroes (a product with the mask would give NaN)."""
    T = ids.shape[1]
    valid = torch.arange(T, device=ids.device)[None, :] < lengths[:, None].to(ids.device)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[..., None].clamp_min(0)).squeeze(-1)
    return torch.where(valid, logp, torch.zeros_like(logp)), valid


def caption_ce(logits: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[B] mean token cross-entropy over each caption's tokens (0 for an empty caption, never NaN)."""
    logp, valid = token_log_probs(logits, ids, lengths)
    return -logp.sum(1) / valid.sum(1).clamp_min(1)

