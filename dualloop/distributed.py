"""Decisions every rank must take together (a rank that alone gathers, skips or stops would hang the others)."""
from __future__ import annotations

import torch


def _reduced(value: int, device: torch.device, op: str) -> int:
    """`value` reduced over the ranks with ReduceOp `op` (MIN, MAX); no communication without a group of 2+."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], device=device, dtype=torch.int64)
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
    return int(t.item())


def every_rank(obj) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank; [obj] without a group of 2+."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_ranks(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is true on every rank."""
    return bool(_reduced(int(bool(flag)), device, "MIN"))


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any rank."""
    return not all_ranks(not flag, device)


def max_over_ranks(value: int, device: torch.device) -> int:
    """The largest of every rank's `value` (e.g. a signal number, 0 for none), on every rank."""
    return _reduced(int(value), device, "MAX")


def leave_process_group() -> None:
    """Destroy this process's default process group, if it has one (registered with `atexit` where the trainer
    joins one, so the group is not left to the interpreter's shutdown)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def leave_together() -> None:
    """The normal end of a multi-rank command: a barrier, then leave the group. A rank that exits while another is
    still in the group can die at exit: in CI 2-rank CPU runs aborted with "terminate called without an active
    exception" (exit -6), which a launcher reports as a failed job, both when the other rank still had collective
    traffic in flight and when it was only computing alone. Only for the path every rank reaches: after an error on
    one rank a barrier would hang."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_after_leaving(code: int, world: int | None = None) -> int:
    """The end of a finished multi-rank command, after `leave_together` and with everything written: exit without
    the interpreter's teardown, where torch's distributed state has aborted a rank ("terminate called without an
    active exception", exit -6, seen in CI after the group was destroyed), which a launcher reports as a failed job
    and answers by killing the other ranks. One process: returns `code`. world: the launcher's WORLD_SIZE when
    not given."""
    import os

    if world is None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return code
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
