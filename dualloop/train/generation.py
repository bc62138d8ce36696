"""The caption phase under ZeRO-3: gather the captioning weights once and run without ZeRO-3's module hooks.

Naive ZeRO-3 generation all-gathers every layer's weights for every new token. Gathering once is not enough by
itself: the per-module pre/post-forward hooks still run (and cost about as much as the gathering, see the loop
issue's H200 figures), so for the phase we hide them and put them back afterwards - the idea of TRL's
unwrap-for-generation, written here for a subset of modules (only the captioning modules are gathered; SAM2 stays
partitioned) and restoring the hooks even when generation raises.

`caption.gather`: `once` (gather for the phase), `per_layer` (plain ZeRO-3: hooks fetch layer by layer, least
memory), `auto` (once when the gathered weights fit comfortably in free memory on every rank, else per_layer).
With whole weights (gathered, or not ZeRO-3) the LoRA adapters are folded into temporary weight copies for the phase.
The decision is all-reduced: a rank that gathers while another does not would hang in the all-gather.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

from dualloop.distributed import all_ranks
from dualloop.train.zero3_host import zero3_offload

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


def decide_gather(mode: str, params: list[torch.nn.Parameter], device: torch.device, extra_bytes: int = 0) -> bool:
    """True to gather once. Collective when mode is 'auto' (every rank must call it). `extra_bytes`: what the phase
    allocates on top of the gathered weights (the LoRA-merged copies)."""
    if mode not in GATHER_MODES:
        raise ValueError(f"caption.gather must be one of {GATHER_MODES}, got {mode!r}")
    if mode == "per_layer":
        return False
    if mode == "once":
        return True
    fits = gathered_bytes(params) + extra_bytes <= AUTO_FRACTION * free_memory_bytes(device)
    return all_ranks(fits, device)


def _lora_layers(modules: Iterable[torch.nn.Module]) -> list[torch.nn.Module]:
    """PEFT LoRA Linear layers under `modules` that run plain LoRA on their active adapters (no DoRA/variants)."""
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:
        return []
    out = []
    for top in _top_modules(modules):
        for m in top.modules():
            if (isinstance(m, LoraLinear) and not m.merged and not m.disable_adapters
                    and not getattr(m, "lora_variant", None)
                    and any(a in m.lora_A for a in m.active_adapters)):
                out.append(m)
    return out


def lora_merge_bytes(modules: Iterable[torch.nn.Module], layers: list[torch.nn.Module] | None = None) -> int:
    """Bytes of the temporary merged weights; `layers`: the modules' LoRA layers when already found."""
    layers = _lora_layers(modules) if layers is None else layers
    return gathered_bytes([m.get_base_layer().weight for m in layers])


@contextlib.contextmanager
def lora_merged(layers: list[torch.nn.Module]) -> Iterator[int]:
    """Fold each LoRA adapter into a temporary copy of its (whole, gathered) base weight for the block: generation
    then runs one matmul per adapted linear instead of five ops (the per-token host work bounds decoding on a GPU).
    The original weight tensors are put back after, untouched: no merge/unmerge rounding drift in bf16.
    `layers`: from `_lora_layers`. Yields the number of merged layers. Needs whole weights: call it with ZeRO-3
    parameters gathered."""
    swapped = []
    try:
        with torch.no_grad():
            for layer in layers:
                weight = layer.get_base_layer().weight
                delta = 0
                for name in layer.active_adapters:
                    if name in layer.lora_A:
                        d = layer.lora_B[name].weight.float() @ layer.lora_A[name].weight.float()
                        delta = delta + (d.T if layer.fan_in_fan_out else d) * layer.scaling[name]
                original = weight.data
                weight.data = (original.float() + delta).to(original.dtype)
                layer.merged_adapters = [a for a in layer.active_adapters if a in layer.lora_A]  # forward: base only
                swapped.append((layer, weight, original))
        yield len(swapped)
    finally:
        for layer, weight, original in reversed(swapped):
            weight.data = original
            layer.merged_adapters = []


def _top_modules(modules: Iterable[torch.nn.Module]) -> list[torch.nn.Module]:
    """The given modules minus those inside another one's subtree."""
    modules = list(dict.fromkeys(modules))
    inner = {id(m) for top in modules for m in top.modules() if m is not top}
    return [m for m in modules if id(m) not in inner]


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks")


@contextlib.contextmanager
def zero3_hooks_removed(engine, modules: Iterable[torch.nn.Module] | None = None) -> Iterator[None]:
    """Hide ZeRO-3's module forward/backward hooks of `modules`' subtrees (all modules when None) for the block;
    put them back after, also on error.

    Each module's hook dicts are swapped for copies without DeepSpeed's entries and the originals restored after:
    the very same hook objects and handles come back, so DeepSpeed's recorded module trace (used to prefetch
    weights in the grounding forward/backward) and module ids stay valid, and nothing is re-registered (which
    costs more host time than the phase's decoding on a small model). Other hooks (transformers', PEFT's) keep
    running; one that something adds or removes during the block is carried over to the restored dicts.
    """
    offload = zero3_offload(engine)
    if offload is None:
        yield
        return
    tops = _top_modules(modules) if modules is not None else [offload.module]
    ours = {(id(d), h.id) for h in (*offload.forward_hooks, *offload.backward_hooks)
            if (d := h.hooks_dict_ref()) is not None}
    swapped = []  # (module, attribute, original dict, the copy in use during the block, that copy at the start)
    for top in tops:
        for m in top.modules():
            for attr in _HOOK_DICTS:
                original = getattr(m, attr)
                if not any((id(original), k) in ours for k in original):
                    continue
                kept = type(original)((k, v) for k, v in original.items() if (id(original), k) not in ours)
                m.__dict__[attr] = kept
                swapped.append((m, attr, original, kept, dict(kept)))
    try:
        yield
    finally:
        for m, attr, original, kept, before in swapped:
            for k in before.keys() - kept.keys():  # removed during the block
                original.pop(k, None)
            for k in kept.keys() - before.keys():  # added during the block
                original[k] = kept[k]
            m.__dict__[attr] = original


@contextlib.contextmanager
def caption_phase(engine, modules: Iterable[torch.nn.Module], mode: str = "auto",
                  device: torch.device | None = None, keep_gathered: bool = False) -> Iterator[dict]:
    """Context for the caption phase. Yields a dict with {"gathered": bool, "bytes": int, "lora_merged": int,
    "whole": bool}; "whole": the weights are whole and stay in place for the phase (a CUDA graph may hold them).

    Without a ZeRO-3 engine (ZeRO-2, or None) the weights are whole already: nothing to do.
    keep_gathered: weights gathered once stay whole until ZeRO-3 releases all at the optimizer step
    (`hold_until_step`), so the grounding forward and backward do not fetch them again; otherwise they are released
    when the phase ends. Only for the live weights: not with a caption EMA swapped into the partitions.
    """
    info = {"gathered": False, "bytes": 0, "lora_merged": 0, "whole": False}
    modules = list(modules)
    lora = _lora_layers(modules)  # found once: the module walk costs host time every step
    offload = zero3_offload(engine) if engine is not None else None
    if offload is None:  # whole weights already
        if mode not in GATHER_MODES:
            raise ValueError(f"caption.gather must be one of {GATHER_MODES}, got {mode!r}")
        with lora_merged(lora) as merged:
            info.update(lora_merged=merged, whole=True)
            yield info
        return
    params = _unique_params(modules)
    device = device or next((p.device for p in params), torch.device("cpu"))
    extra = lora_merge_bytes(modules, lora) if mode == "auto" else 0  # only 'auto' weighs memory
    if not decide_gather(mode, params, device, extra_bytes=extra):
        yield info
        return
    info.update(gathered=True, bytes=gathered_bytes(params), whole=True)
    if keep_gathered:
        gather_and_hold(modules)
        gathering = contextlib.nullcontext()
    else:  # released after the phase: only those gathered here
        from dualloop.model.zero3_params import gathered

        gathering = gathered(params)
    with gathering, zero3_hooks_removed(engine, modules), lora_merged(lora) as merged:
        info["lora_merged"] = merged
        yield info


# In a parameter's ZeRO-3 active-module set: "in use until the optimizer step". Module ids are >= 0.
HELD_FOR_STEP = -1


def hold_until_step(params: list[torch.nn.Parameter]) -> None:
    """Keep whole ZeRO-3 `params` whole until the optimizer step: ZeRO-3's coordinator releases a parameter only
    when no module is using it, and the optimizer step clears every parameter's active set and releases all
    (DeepSpeed's `release_and_reset_all`, which then checks that all are partitioned).

    Without it the coordinator released the weights after their use in the grounding forward and fetched them
    again for the activation-checkpointing recompute: on the tiny preset 125 all-gathers per step in grounding and
    backward, against none after per-layer caption gathering (whose coordinator-made fetches it keeps)."""
    for p in params:
        active = getattr(p, "ds_active_sub_modules", None)
        if active is not None:
            active.add(HELD_FOR_STEP)


@contextlib.contextmanager
def whole_model_step(engine, model: torch.nn.Module) -> Iterator[None]:
    """A micro-step's forward and backward without ZeRO-3's module hooks: the whole model gathered (what is
    partitioned now; collective) and held until the optimizer step, and the hooks hidden. Gradients are still
    reduced and partitioned by ZeRO-3's per-parameter gradient hooks, which stay."""
    gather_and_hold([model])
    with zero3_hooks_removed(engine):
        yield


def gather_and_hold(modules: Iterable[torch.nn.Module]) -> None:
    """All-gather what is partitioned now of `modules`' ZeRO-3 parameters (collective) and hold them all whole until
    the optimizer step."""
    from dualloop.model.zero3_params import partitioned_now

    params = _unique_params(modules)
    missing = partitioned_now(params)
    if missing:
        missing[0].all_gather(param_list=missing)
    hold_until_step(params)
