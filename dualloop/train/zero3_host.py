"""ZeRO-3's per-module host work, made smaller; the results are DeepSpeed's.

- Leaf modules: DeepSpeed fetches a flagged block (a decoder layer, a ViT layer, a Hiera block) whole, with one hook
  and one gather, instead of one per linear and norm (`train.zero3_leaf_modules`). Their gradients are still
  reduced per parameter, as for any other parameter (`per_parameter_grad_reduction`): DeepSpeed's leaf mode reduces
  a leaf's gradients from a backward hook of the module, which runs once per call of the module and may run before
  all of that call's parameter gradients are accumulated. A block called twice in one step (our LLM layers: the
  supervised caption and grounding passes) then loses gradient (measured on a toy block: its output bias's gradient
  came out zero), and with a reduce bucket large enough to hold both calls DeepSpeed asserts a parameter is in the
  bucket twice.
- Backward-hook Functions without per-call signature binding: on every module forward, ZeRO-3 wraps the inputs and
  outputs in tiny autograd Functions (to fetch weights before the module's backward and release them after). They
  define `setup_context`, so torch's `Function.apply` re-reads `forward`'s signature with `inspect` on every call:
  ~70 us each, 350 calls per step of the tiny model (a tenth of its CPU step). Their `forward(x)` takes one
  argument without default, so that binding changes nothing and is skipped.
- DeepSpeed's NVTX ranges: every ZeRO function call pushes and pops one, after two `torch.compiler.is_compiling()`
  calls (~4700 wrapped calls per tiny step). Off unless `train.deepspeed_nvtx` (Nsight users want them); DeepSpeed
  turns them off itself under torch.compile, through the same module flag.
"""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import torch

from dualloop.config import ConfigError


def zero3_offload(engine):
    """The DeepSpeedZeRoOffload that owns the module hooks of a ZeRO-3 engine (None otherwise)."""
    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    return offload if hasattr(offload, "forward_hooks") else None


def zero3_leaf_classes(model: torch.nn.Module, spec: list[str]) -> list:
    """Resolve `train.zero3_leaf_modules`: ["auto"] -> the model's own choice (`zero3_leaf_classes()`), [] -> none,
    else class names, each of which must name a module class of the model."""
    if list(spec) == ["auto"]:
        return list(model.zero3_leaf_classes()) if hasattr(model, "zero3_leaf_classes") else []
    names = {type(m).__name__ for m in model.modules()}
    unknown = [n for n in spec if n == "auto" or n not in names]
    if unknown:
        raise ConfigError(f"train.zero3_leaf_modules: {unknown} are not module classes of this model (use [\"auto\"] "
                          f"alone, [] for none, or class names such as {sorted(names)[:6]} ...)")
    return list(spec)


def _input_carries_grad(module: torch.nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of a ZeRO-3 leaf with trainable weights: make its hidden-state input carry gradient.
    DeepSpeed releases a module's weights when the gradient reaches its inputs - at once when no input needs one,
    before the leaf's own weight gradients are computed (a crash in backward, e.g. a trainable first decoder layer
    fed by frozen embeddings). Registered before DeepSpeed's hooks, so theirs see the new input."""
    x = args[0] if args else kwargs.get("hidden_states")
    if not (torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.is_floating_point()) or x.requires_grad \
            or not any(p.requires_grad for p in module.parameters()):
        return None
    x = x.detach().requires_grad_(True)
    return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})


def mark_zero3_leaves(model: torch.nn.Module, spec: list[str]) -> list:
    """Flag the modules ZeRO-3 fetches whole, before deepspeed.initialize registers its hooks. Measured on the
    tiny preset, one CPU process: a third less time per step, the same losses."""
    from deepspeed.utils import set_z3_leaf_modules

    classes = zero3_leaf_classes(model, spec)
    if classes:
        for leaf in set_z3_leaf_modules(model, classes):
            leaf.register_forward_pre_hook(_input_carries_grad, with_kwargs=True)
    return classes


_ONE_ARG = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _without_signature_binding(fn_cls: type) -> type:
    """`fn_cls` (an autograd.Function) with an apply that skips torch's per-call default-argument binding; `fn_cls`
    itself when its forward is not a single argument without default (binding would then matter)."""
    params = list(inspect.signature(fn_cls.forward).parameters.values())
    if len(params) != 1 or params[0].kind not in _ONE_ARG or params[0].default is not inspect.Parameter.empty:
        return fn_cls
    from torch._functorch.utils import unwrap_dead_wrappers

    class Unbound(fn_cls):
        @classmethod
        def apply(cls, *args, **kwargs):
            if kwargs or len(args) != 1 or torch._C._are_functorch_transforms_active():
                return super().apply(*args, **kwargs)  # torch's own path
            # what torch.autograd.Function.apply does after binding, minus the binding
            return super(torch.autograd.Function, cls).apply(*unwrap_dead_wrappers(args))

    Unbound.__name__ = Unbound.__qualname__ = f"{fn_cls.__name__}Unbound"
    return Unbound


def fast_backward_hook_functions(model: torch.nn.Module) -> int:
    """Swap ZeRO-3's per-module backward-hook Functions (`pre_bwd_fn`, `post_bwd_fn`, set by deepspeed.initialize)
    for ones without per-call signature binding. Returns how many were swapped."""
    swapped = 0
    for m in model.modules():
        for attr in ("pre_bwd_fn", "post_bwd_fn"):
            fn = m.__dict__.get(attr)
            if isinstance(fn, type) and issubclass(fn, torch.autograd.Function) \
                    and not fn.__name__.endswith("Unbound"):
                fast = _without_signature_binding(fn)
                if fast is not fn:
                    m.__dict__[attr] = fast
                    swapped += 1
    return swapped


def set_deepspeed_nvtx(enabled: bool) -> None:
    """DeepSpeed's NVTX ranges around its ZeRO functions on or off (a process-wide DeepSpeed flag)."""
    import deepspeed.utils.nvtx

    deepspeed.utils.nvtx.enable_nvtx = bool(enabled)


@contextlib.contextmanager
def per_parameter_grad_reduction() -> Iterator[None]:
    """Around deepspeed.initialize: ZeRO-3 registers its per-parameter gradient hooks (reduce once the gradient is
    accumulated, whatever the number of calls) also for the parameters of leaf modules, instead of one backward
    hook per leaf module. Fetching stays per block: that reads the module's flag, not the parameters'."""
    import deepspeed.runtime.zero.stage3 as stage3

    original = stage3.z3_leaf_parameter
    stage3.z3_leaf_parameter = lambda param: False  # read only while the optimizer registers its hooks
    try:
        yield
    finally:
        stage3.z3_leaf_parameter = original
