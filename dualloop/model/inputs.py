"""Checks of the model's inputs, with errors that say which argument and which element is wrong."""
from __future__ import annotations

import torch


def check_images(images, arg: str = "images") -> int:
    """The number of images; a list of uint8 [3, H, W] tensors, or a ValueError naming what is wrong."""
    if not isinstance(images, (list, tuple)):
        raise ValueError(f"{arg} must be a list of uint8 tensors [3, H, W], got {type(images).__name__}")
    if len(images) == 0:
        raise ValueError(f"{arg} is empty: need at least one image")
    for i, img in enumerate(images):
        if not isinstance(img, torch.Tensor) or img.dtype != torch.uint8:
            got = img.dtype if isinstance(img, torch.Tensor) else type(img).__name__
            raise ValueError(f"{arg}[{i}] must be a uint8 tensor, got {got}")
        if img.dim() != 3 or img.shape[0] != 3 or img.shape[1] < 1 or img.shape[2] < 1:
            raise ValueError(f"{arg}[{i}] must have shape [3, H, W], got {tuple(img.shape)}")
    return len(images)


def check_masks(masks, images) -> None:
    """One uint8/bool mask per image, of its size, with 0/1 values; else a ValueError naming the mask."""
    if not isinstance(masks, (list, tuple)) or len(masks) != len(images):
        n = len(masks) if isinstance(masks, (list, tuple)) else type(masks).__name__
        raise ValueError(f"masks must be a list with one mask per image ({len(images)}), got {n}")
    for i, (m, img) in enumerate(zip(masks, images)):
        if not isinstance(m, torch.Tensor) or m.dtype not in (torch.uint8, torch.bool):
            got = m.dtype if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"masks[{i}] must be a uint8 tensor with values in {{0, 1}}, got {got}")
        if tuple(m.shape) != tuple(img.shape[1:]):
            raise ValueError(f"masks[{i}] has shape {tuple(m.shape)} but images[{i}] is "
                             f"{tuple(img.shape[1:])}: a mask must match its image's size")
    # one host sync for the whole batch (a GPU wait per mask adds up over a step's calls); bool is always 0/1
    tops = [m.amax() for m in masks if m.dtype == torch.uint8 and m.numel()]
    if tops and int(torch.stack(tops).max()) > 1:
        i = next(i for i, m in enumerate(masks) if m.dtype == torch.uint8 and m.numel() and int(m.max()) > 1)
        raise ValueError(f"masks[{i}] must hold 0/1 values, found {int(masks[i].max())}")


def check_caption(ids, lengths, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, lengths) on the CPU: a LongTensor [B, T] and [B] lengths in [0, T] (default: T)."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.long:
        raise ValueError("caption_ids must be a LongTensor [B, T]")
    if ids.shape[0] != batch_size:
        raise ValueError(f"caption_ids has batch size {ids.shape[0]}, images {batch_size}")
    if lengths is None:
        lengths = torch.full((batch_size,), ids.shape[1], dtype=torch.long)
    lengths = torch.as_tensor(lengths).long().cpu()
    if lengths.shape != (batch_size,) or (lengths < 0).any() or (lengths > ids.shape[1]).any():
        raise ValueError(f"caption_lengths must be [B] with values in [0, {ids.shape[1]}], got {lengths.tolist()}")
    return ids.cpu(), lengths
