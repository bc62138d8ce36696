"""Masks of generated grounding replies (`eval.answer=generated`, Sa2VA's evaluation): a reply may hold several
[SEG]s or none, while SAM2 decodes one mask per [SEG] row. This turns those rows back into one mask per reply."""
from __future__ import annotations

import torch

# The logit of every pixel of an empty mask: SAM2's NO_OBJ_SCORE, as eval.metrics.NO_OBJECT_LOGIT
EMPTY_MASK_LOGIT = -1024.0


def _rows_like(flags: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[R] flags viewed to broadcast over x's rows [R, ...]."""
    return flags.to(x.device).view(-1, *([1] * (x.dim() - 1)))


def per_reply(logits: torch.Tensor, iou_pred: torch.Tensor, object_score: torch.Tensor | None,
              owner: torch.Tensor, seg_count: torch.Tensor, object_gate: bool):
    """SAM2's outputs of the [SEG] rows → one per reply. owner [R]: the reply of each row (sorted; a reply without
    [SEG] has one stand-in row); seg_count [B]: its [SEG]s. Several [SEG]s: the union of their masks (the maximum
    of their logits; with `object_gate` each mask gated by its own object score first, so the union is of the
    present ones) and the highest object score; the IoU prediction of the first. No [SEG]: an empty mask (every
    logit and the object score EMPTY_MASK_LOGIT, the IoU prediction 0: nothing of the stand-in row is kept).
    Returns (logits [B, ...], iou_pred [B, ...], object_score)."""
    b = seg_count.numel()
    rows = torch.bincount(owner, minlength=b)
    first = rows.cumsum(0) - rows
    iou_pred = iou_pred[first.to(iou_pred.device)]
    if owner.numel() > b:
        if object_score is not None and object_gate:
            present = _rows_like(object_score > 0, logits)
            logits = torch.where(present, logits, torch.full_like(logits, EMPTY_MASK_LOGIT))
        index = _rows_like(owner, logits).expand_as(logits)
        logits = logits.new_full((b, *logits.shape[1:]), float("-inf")).scatter_reduce(0, index, logits, "amax")
        if object_score is not None:
            object_score = object_score.new_full((b,), float("-inf")).scatter_reduce(
                0, owner.to(object_score.device), object_score, "amax")
    empty = seg_count == 0
    if bool(empty.any()):
        logits = torch.where(_rows_like(empty, logits), torch.full_like(logits, EMPTY_MASK_LOGIT), logits)
        iou_pred = torch.where(_rows_like(empty, iou_pred), torch.zeros_like(iou_pred), iou_pred)
        if object_score is not None:
            object_score = torch.where(empty.to(object_score.device), torch.full_like(object_score, EMPTY_MASK_LOGIT),
                                       object_score)
    return logits, iou_pred, object_score
