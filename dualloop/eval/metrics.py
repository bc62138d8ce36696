"""Segmentation metrics: per-sample intersection/union and the RefCOCO aggregates.

cIoU = Σ intersections / Σ unions (cumulative, favours large objects); gIoU = mean of per-sample IoU, where a sample
with an empty union (no target, nothing predicted) scores 1 (LISA's / Sa2VA's "no-object target" rule).
A prediction is `sigmoid(bilinear-upsampled logits) > 0.5`, i.e. upsampled logits > 0, at the target's size
(Sa2VA's inference convention).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def predict_mask(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Low-res logits [h, w] → bool mask [H, W] at the target size."""
    up = F.interpolate(logits[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
    return up > 0


NO_OBJECT_LOGIT = -1024.0  # SAM2's NO_OBJ_SCORE: the logit of every pixel of a mask judged absent


def gated_logits(logits: torch.Tensor, object_score: torch.Tensor | None) -> torch.Tensor:
    """Logits [B, ...] with the masks whose object score [B] is <= 0 emptied, as SAM2's own video predictor does
    (Sa2VA's override does not); unchanged without scores."""
    if object_score is None:
        return logits
    present = (object_score > 0).view(-1, *([1] * (logits.dim() - 1)))
    return torch.where(present, logits, torch.full_like(logits, NO_OBJECT_LOGIT))


def prediction_logits(model, out) -> torch.Tensor:
    """The logits a prediction is made from, of `out` = model.ground(...): gated by the object score when the
    model's `object_gate` convention says so."""
    if bool(getattr(getattr(model, "model_cfg", None), "object_gate", False)):
        return gated_logits(out.logits, out.object_score)
    return out.logits


def intersection_union(pred: torch.Tensor, target: torch.Tensor) -> tuple[int, int]:
    pred, target = pred.bool(), target.bool()
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in size")
    return int((pred & target).sum()), int((pred | target).sum())


def sample_iou(inter: int, union: int) -> float:
    """IoU of one sample; an empty union means no target and no prediction: a correct answer, IoU 1."""
    return inter / union if union > 0 else 1.0


@dataclass
class IoUMeter:
    """Accumulates intersections and unions, overall and per group (dataset name)."""

    inter: list[int] = field(default_factory=list)
    union: list[int] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    # where each sample sits in a single-process evaluation (any sortable value; None: order of adding), so that
    # meters filled by several ranks merge into that order and sum gIoU in it
    keys: list = field(default_factory=list)

    def add(self, inter: int, union: int, group: str = "all", key=None) -> None:
        self.inter.append(inter)
        self.union.append(union)
        self.groups.append(group)
        self.keys.append(key)

    def add_logits(self, logits: torch.Tensor, targets: list[torch.Tensor], groups: list[str],
                   keys: list | None = None) -> list[float]:
        """Score a batch of low-res logits [B, h, w] against native-resolution targets; returns per-sample IoU."""
        ious = []
        for n, (lg, tg, grp) in enumerate(zip(logits, targets, groups)):
            tg = tg.to(lg.device)  # the model's logits may be on the GPU, the dataset's masks are on the CPU
            i, u = intersection_union(predict_mask(lg, tuple(tg.shape[-2:])), tg > 0)
            self.add(i, u, grp, None if keys is None else keys[n])
            ious.append(sample_iou(i, u))
        return ious

    @classmethod
    def merged(cls, meters: list["IoUMeter"]) -> "IoUMeter":
        """One meter holding every sample of `meters` (e.g. one per rank), in the order of their keys."""
        rows = sorted((row for m in meters for row in zip(m.keys, m.inter, m.union, m.groups)),
                      key=lambda row: row[0])
        out = cls()
        for key, i, u, g in rows:
            out.add(i, u, g, key)
        return out

    @staticmethod
    def _summary(inter: list[int], union: list[int]) -> dict:
        n = len(inter)
        if n == 0:
            return {"samples": 0, "ciou": float("nan"), "giou": float("nan")}
        ciou = sum(inter) / max(sum(union), 1)
        giou = sum(sample_iou(i, u) for i, u in zip(inter, union)) / n
        return {"samples": n, "ciou": ciou, "giou": giou}

    def summary(self) -> dict:
        by_group: dict[str, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
        for i, u, g in zip(self.inter, self.union, self.groups):
            by_group[g][0].append(i)
            by_group[g][1].append(u)
        out = self._summary(self.inter, self.union)
        out["per_dataset"] = {g: self._summary(*iu) for g, iu in sorted(by_group.items())}
        return out
