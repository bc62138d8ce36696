"""Decisions every rank must take together (a rank that alone gathers, skips or stops would hang the others)."""
from __future__ import annotations

import torch


def all_ranks(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is true on every rank; no communication without a process group of 2+."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], device=device, dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any rank."""
    return not all_ranks(not flag, device)


def max_over_ranks(value: int, device: torch.device) -> int:
    """The largest of every rank's `value` (e.g. a signal number, 0 for none), on every rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], device=device, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())
