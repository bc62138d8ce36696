"""The caption phase under ZeRO-3: gather the captioning weights once and run without ZeRO-3's module hooks.

Naive ZeRO-3 generation all-gathers every layer's weights for every new token. Gathering once is not enough by
itself: the per-module pre/post-forward hooks still run (and cost about as much as the gathering, see the loop
issue's H200 figures), so for the phase we remove them and re-register them afterwards - the approach of TRL's
unwrap-for-generation, written here for a subset of modules (only the captioning modules are gathered; SAM2 stays
partitioned) and restoring the hooks even when generation raises.

`caption.gather`: `once` (gather for the phase), `per_layer` (plain ZeRO-3: hooks fetch layer by layer, least
memory), `auto` (once when the gathered weights fit comfortably in free memory on every rank, else per_layer).
The decision is all-reduced: a rank that gathers while another does not would hang in the all-gather.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

GATHER_MODES = ("auto", "once", "per_layer")
AUTO_FRACTION = 0.5  # gather when the full weights take at most this fraction of free memory


def _unique_params(modules: Iterable[torch.nn.Module]) -> list[torch.nn.Parameter]:
    seen, out = set(), []
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def gathered_bytes(params: list[torch.nn.Parameter]) -> int:
    return sum(int(getattr(p, "ds_numel", p.numel())) * p.element_size() for p in params)


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def _all_ranks_agree(flag: bool, device: torch.device) -> bool:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], device=device, dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def decide_gather(mode: str, params: list[torch.nn.Parameter], device: torch.device) -> bool:
    """True to gather once. Collective when mode is 'auto' (every rank must call it)."""
    if mode not in GATHER_MODES:
        raise ValueError(f"caption.gather must be one of {GATHER_MODES}, got {mode!r}")
    if mode == "per_layer":
        return False
    if mode == "once":
        return True
    fits = gathered_bytes(params) <= AUTO_FRACTION * free_memory_bytes(device)
    return _all_ranks_agree(fits, device)


def _zero3_offload(engine):
    """The DeepSpeedZeRoOffload that owns the module hooks of a ZeRO-3 engine (None otherwise)."""
    opt = getattr(engine, "optimizer", None)
    offload = getattr(opt, "parameter_offload", None)
    if offload is None or not hasattr(offload, "forward_hooks"):
        return None
    return offload


@contextlib.contextmanager
def zero3_hooks_removed(engine) -> Iterator[None]:
    """Remove ZeRO-3's module forward/backward hooks for the block; re-register them after (also on error)."""
    offload = _zero3_offload(engine)
    if offload is None:
        yield
        return
    for hook in offload.forward_hooks + offload.backward_hooks:
        hook.remove()
    offload.forward_hooks, offload.backward_hooks = [], []
    try:
        yield
    finally:
        # count=[0]: module ids restart at 0 as at engine creation (the default list would keep counting up).
        offload._register_deepspeed_module(offload.module, count=[0])


@contextlib.contextmanager
def caption_phase(engine, modules: Iterable[torch.nn.Module], mode: str = "auto",
                  device: torch.device | None = None) -> Iterator[dict]:
    """Context for the caption phase. Yields a dict with {"gathered": bool, "bytes": int} for logging.

    Without a ZeRO-3 engine (ZeRO-2, or None) the weights are whole already: nothing to do.
    """
    info = {"gathered": False, "bytes": 0}
    offload = _zero3_offload(engine) if engine is not None else None
    if offload is None:
        if mode not in GATHER_MODES:
            raise ValueError(f"caption.gather must be one of {GATHER_MODES}, got {mode!r}")
        yield info
        return
    import deepspeed

    params = _unique_params(modules)
    device = device or next((p.device for p in params), torch.device("cpu"))
    if not decide_gather(mode, params, device):
        yield info
        return
    info.update(gathered=True, bytes=gathered_bytes(params))
    for p in params:  # a module left "active" from an earlier forward would refuse to release its weights
        active = getattr(p, "ds_active_sub_modules", None)
        if active is not None:
            active.clear()
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None), zero3_hooks_removed(engine):
        yield info
