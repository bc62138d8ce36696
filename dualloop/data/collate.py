"""Batches of mixed samples: pairing is per sample, images and masks stay at their native sizes (lists).

Single-image samples carry image2 is image1 (the same tensor); a batch may mix SA-V pairs with single images, so
consumers use `paired[b]` per sample rather than asking whether the batch has a second view.
"""
from __future__ import annotations

import torch

FIELDS = ("image1", "mask1", "image2", "mask2")


def collate_samples(items: list[dict]) -> dict:
    """list of items → {"image1": [uint8 [3,H,W]], "mask1": [uint8 [H,W]], "image2": [...], "mask2": [...],
    "paired": BoolTensor [B], "captions": list[list[str]], "source": list[str], "key": list[str]}."""
    if not items:
        raise ValueError("collate_samples: empty batch")
    batch = {f: [it[f] for it in items] for f in FIELDS}
    batch["paired"] = torch.tensor([bool(it["paired"]) for it in items], dtype=torch.bool)
    batch["captions"] = [list(it["captions"]) for it in items]
    batch["source"] = [it["source"] for it in items]
    batch["key"] = [it["key"] for it in items]
    return batch
