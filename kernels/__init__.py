"""Fused mask losses for low-resolution mask logits: bilinear/nearest resize + sigmoid focal + BCE + dice + IoU.

    from dualloop.kernels import mask_loss
    out = mask_loss(logits, targets, resize="logits", alpha=0.25, gamma=2.0, dice_smooth=1.0, backend="auto")
    loss = (20 * out.focal + out.dice).mean()

Backends: "torch" (exact reference, any device), "triton" (CUDA; on CPU only under TRITON_INTERPRET=1),
"cuda" (the compiled C++/CUDA extension), "auto" (triton on CUDA tensors, falling back to the CUDA extension and then
torch when triton is missing; torch on CPU). The fused backends make one host sync per call (the value checks:
non-finite logits, targets outside [0, 1]); their backward is deterministic. This package imports nothing else of
dualloop.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch

from ._inputs import (
    BACKENDS,
    RESIZE_MODES,
    BackendUnavailableError,
    MaskBatch,
    count_bad_targets,
    count_nonfinite,
    prepare,
    raise_for_bad_values,
)
from .reference import mask_loss_reference

__all__ = ["mask_loss", "MaskLossOutput", "BackendUnavailableError", "RESIZE_MODES", "BACKENDS"]


class MaskLossOutput(NamedTuple):
    """Per-mask losses, float32 [N]. focal/bce/dice are differentiable w.r.t. the logits; iou is not."""

    focal: torch.Tensor
    bce: torch.Tensor
    dice: torch.Tensor
    iou: torch.Tensor


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        if _triton_available():
            return "triton"
        from .cuda_ext import extension_available

        return "cuda" if extension_available() else "torch"
    if backend == "triton":
        if not _triton_available():
            raise BackendUnavailableError("backend='triton' needs the `triton` package: pip install 'triton>=3.6'")
        if device.type != "cuda" and not _interpreting():
            raise BackendUnavailableError(
                f"backend='triton' needs CUDA tensors (got {device}); on CPU use backend='torch', or set "
                "TRITON_INTERPRET=1 before triton is imported to run the kernels in Triton's (slow) interpreter")
    if backend == "cuda" and device.type != "cuda":
        raise BackendUnavailableError(f"backend='cuda' needs CUDA tensors (got {device}); use backend='torch' on CPU")
    return backend


def _check_values_torch(batch: MaskBatch) -> None:
    counts = torch.stack([count_nonfinite(batch.logits)] + [count_bad_targets(t) for t in batch.target_tensors])
    counts = counts.tolist()
    raise_for_bad_values(counts[0], sum(counts[1:]))


def mask_loss(logits, targets, *, resize: str = "logits", alpha: float = 0.25, gamma: float = 2.0,
              dice_smooth: float = 1.0, backend: str = "auto") -> MaskLossOutput:
    """Per-mask sigmoid focal, BCE, dice and IoU of low-res logits [N, h, w] against targets.

    targets: [N, H, W] (bool, uint8 in {0, 1} or float in [0, 1]) or a list of N [H_i, W_i] tensors.
    resize: "logits" (bilinear upsample of the logits to each target, align_corners=False), "targets" (nearest
    resize of the targets to (h, w)) or "none" (sizes must match). Raises ValueError naming the bad argument.
    """
    batch = prepare(logits, targets, resize=resize, alpha=alpha, gamma=gamma, dice_smooth=dice_smooth,
                    backend=backend)
    chosen = _resolve_backend(backend, batch.logits.device)
    if chosen == "torch":
        _check_values_torch(batch)
        out = mask_loss_reference(batch)
    elif chosen == "triton":
        from .mask_loss_triton import mask_loss_triton

        out = mask_loss_triton(batch)
    else:
        from .cuda_ext import mask_loss_cuda

        out = mask_loss_cuda(batch)
    return MaskLossOutput(*out)
