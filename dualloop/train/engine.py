"""DeepSpeed engine setup: the JSON config with its "auto" fields filled from the training config, the optimizer
(DeepSpeed's fused AdamW on GPU, a client torch AdamW on CPU), the warmup + cosine schedule, distributed init.

"auto" fields take their value from `train.*`; a field set explicitly in the JSON must agree with the training
config, otherwise a ConfigError names both (a batch size set in two places that disagree is a classic silent bug).
"""
from __future__ import annotations

import atexit
import contextlib
import copy
import json
import math
import os
import socket
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import torch

from dualloop.config import Config, ConfigError, TrainConfig
from dualloop.distributed import leave_process_group
from dualloop.train.zero3_host import (
    fast_backward_hook_functions,
    mark_zero3_leaves,
    per_parameter_grad_reduction,
    set_deepspeed_nvtx,
    zero3_offload,
)

DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"
T = TypeVar("T")
AUTO = "auto"


# ---------------------------------------------------------------------------------------------------- device / dist
def device_type() -> str:
    """'cuda' or 'cpu', as DeepSpeed's accelerator sees it (DS_ACCELERATOR=cpu forces the CPU)."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def resolve_precision(precision: str, device: str) -> str:
    if precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"train.precision must be auto, bf16 or fp32, got {precision!r}")
    if precision == "auto":
        return "bf16" if device == "cuda" else "fp32"
    return precision


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# (rank, world size, local rank) variables of launchers that do not set torch's: OpenMPI's mpirun (deepspeed
# --launcher openmpi) and a SLURM job step (srun; the batch script itself has no SLURM_STEP_NUM_TASKS)
SCHEDULER_ENVS = (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
                  ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"))


def env_from_scheduler(env=os.environ) -> None:
    """Set RANK/WORLD_SIZE/LOCAL_RANK (and MASTER_PORT 29500) from mpirun's or srun's variables when a launcher left
    them unset: otherwise each of its N processes would train alone as a world of one, all into one output_dir."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return
    for rank, size, local in SCHEDULER_ENVS:
        if int(env.get(size, "1")) > 1:
            if not env.get("MASTER_ADDR"):
                launcher = "srun" if size.startswith("SLURM") else "mpirun"
                raise ConfigError(f"this process is one of {env[size]} that {launcher} started, but MASTER_ADDR is not "
                                  f"set: export the first node's address to every process (with deepspeed --launcher "
                                  f"openmpi: in .deepspeed_env), or launch with deepspeed (pdsh) or torchrun")
            env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = env[rank], env[size], env.get(local, "0")
            env.setdefault("MASTER_PORT", "29500")
            return


def init_distributed(device: str) -> tuple[int, int]:
    """Initialize torch.distributed through DeepSpeed; a plain `python`/`dualloop train` run becomes world size 1.

    Returns (rank, world_size). Launchers (deepspeed, torchrun) set RANK/WORLD_SIZE/MASTER_*; mpirun's and srun's
    own variables stand in for them (env_from_scheduler); without any we set single-process defaults instead of
    letting DeepSpeed go looking for MPI.
    """
    import deepspeed
    import torch.distributed as dist

    env_from_scheduler()
    if device == "cuda":  # bind this process to its GPU before NCCL is set up
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:  # DeepSpeed's CPU accelerator runs `numactl` for its device count (~100 times per ZeRO-3 step) unless told
        os.environ.setdefault("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("LOCAL_RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else None, auto_mpi_discovery=False)
        atexit.register(leave_process_group)
        if device == "cpu":
            _unlink_cpu_shm_buffer()
    return dist.get_rank(), dist.get_world_size()


def _unlink_cpu_shm_buffer() -> None:
    """Remove the name of DeepSpeed's CPU all-reduce buffer (/dev/shm, ~66 MB per rank) once every rank has mapped
    the others'. DeepSpeed creates it when all ranks are local (LOCAL_SIZE = world size) and never unlinks it, so
    each CPU run would leave 66 MB of RAM behind until reboot; unlinked, the memory goes when the processes exit."""
    import torch.distributed as dist

    if os.environ.get("LOCAL_SIZE") != str(dist.get_world_size()):  # DeepSpeed's own condition, same on all ranks
        return
    dist.barrier()  # DeepSpeed's init maps every other rank's buffer before returning: after this, all have
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name)


# ---------------------------------------------------------------------------------------------------- ds config
def load_ds_config(name_or_path: str) -> dict:
    """`zero3_bf16` (a file in ds_configs/) or a path to a JSON file."""
    candidates = [Path(name_or_path)]
    if not name_or_path.endswith(".json"):
        candidates.append(DS_CONFIG_DIR / f"{name_or_path}.json")
    for path in candidates:
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"train.ds_config: {path} is not valid JSON: {e}") from e
    known = sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json")) if DS_CONFIG_DIR.is_dir() else []
    raise ConfigError(f"train.ds_config: no file {name_or_path!r} (looked in {DS_CONFIG_DIR}); known: {known}")


def _fill(section: dict, key: str, value: Any, where: str, *, same=lambda a, b: a == b) -> None:
    """Set an "auto" (or missing) field; an explicit one must agree with the training config."""
    current = section.get(key, AUTO)
    if current == AUTO:
        section[key] = value
    elif not same(current, value):
        raise ConfigError(f"ds_config field {where}={current!r} disagrees with the training config ({value!r}); "
                          f"set it to \"auto\" or make them agree")


def _close(a, b) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    except (TypeError, ValueError):
        return False


def _find_auto(node: Any, path: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _find_auto(v, f"{path}.{k}" if path else str(k))]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _find_auto(v, f"{path}[{i}]")]
    return [path] if node == AUTO else []


def fill_ds_config(ds: dict, train: TrainConfig, *, world_size: int, device: str,
                   hidden_size: int | None = None) -> dict:
    """Return a copy of `ds` with every "auto" filled and checked against `train`; raises ConfigError."""
    ds = copy.deepcopy(ds)
    if train.micro_batch_size < 1 or train.grad_accum < 1:
        raise ConfigError(f"train.micro_batch_size and train.grad_accum must be >= 1, got "
                          f"{train.micro_batch_size} and {train.grad_accum}")
    if "scheduler" in ds:
        raise ConfigError("ds_config has a 'scheduler' section; dualloop sets warmup + cosine from train.lr, "
                          "train.warmup_ratio and train.min_lr_ratio - remove the section")
    if ds.get("fp16", {}).get("enabled") in (True, AUTO):
        raise ConfigError("ds_config enables fp16; dualloop trains in bf16 or fp32 (train.precision)")
    if "zero_optimization" not in ds or "stage" not in ds["zero_optimization"]:
        raise ConfigError("ds_config needs zero_optimization.stage")

    _fill(ds, "train_micro_batch_size_per_gpu", train.micro_batch_size, "train_micro_batch_size_per_gpu")
    _fill(ds, "gradient_accumulation_steps", train.grad_accum, "gradient_accumulation_steps")
    _fill(ds, "train_batch_size", train.micro_batch_size * train.grad_accum * world_size,
          f"train_batch_size (micro {train.micro_batch_size} x accum {train.grad_accum} x world {world_size})")
    _fill(ds, "gradient_clipping", train.grad_clip, "gradient_clipping", same=_close)

    precision = resolve_precision(train.precision, device)
    bf16 = ds.setdefault("bf16", {})
    _fill(bf16, "enabled", precision == "bf16", "bf16.enabled")

    betas = [float(b) for b in train.adam_betas]
    if len(betas) != 2:
        raise ConfigError(f"train.adam_betas must hold two numbers, got {train.adam_betas!r}")
    # out-of-range schedule values would train silently with a schedule nobody asked for (HF rejects them too)
    for name, value in (("warmup_ratio", train.warmup_ratio), ("min_lr_ratio", train.min_lr_ratio)):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"train.{name} must lie in [0, 1], got {value}")
    if train.lr <= 0 or train.weight_decay < 0:
        raise ConfigError(f"train.lr must be > 0 and train.weight_decay >= 0, got {train.lr} and "
                          f"{train.weight_decay}")
    if "optimizer" in ds:
        params = ds["optimizer"].setdefault("params", {})
        _fill(params, "lr", train.lr, "optimizer.params.lr", same=_close)
        _fill(params, "weight_decay", train.weight_decay, "optimizer.params.weight_decay", same=_close)
        _fill(params, "betas", betas, "optimizer.params.betas",
              same=lambda a, b: len(a) == 2 and all(_close(x, y) for x, y in zip(a, b)))

    zero = ds["zero_optimization"]
    sizes = {}
    if hidden_size:  # the sizes HF's DeepSpeed integration derives from the hidden size
        sizes = {"reduce_bucket_size": hidden_size * hidden_size,
                 "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
                 "stage3_param_persistence_threshold": 10 * hidden_size,
                 # About one transformer layer. DeepSpeed scans the module trace ahead of every release until it
                 # has seen this many parameters: its default (1e9) covers a whole <= 1B model, so each release
                 # walks the rest of our long trace (generation + grounding + backward) -- 40 s per step measured.
                 "stage3_max_reuse_distance": 12 * hidden_size * hidden_size}
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
                "stage3_max_reuse_distance"):
        if zero.get(key) == AUTO:
            if key in sizes:
                zero[key] = sizes[key]
            else:
                del zero[key]  # DeepSpeed's default

    if device == "cpu":
        # No fused/CPU Adam JIT build on CPU: the optimizer becomes a client torch Adam(W) with the section's
        # hyper-parameters (see client_adam); checked here so a section torch cannot honour fails before the model
        client_adam(ds.pop("optimizer", None), train)
        ds["zero_allow_untested_optimizer"] = True
        zero.pop("offload_optimizer", None)  # offloading to the CPU from the CPU is a no-op
        zero.pop("offload_param", None)
    left = _find_auto(ds)
    if left:
        raise ConfigError(f"ds_config fields still \"auto\" that dualloop cannot fill: {left}")
    return ds


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


# ---------------------------------------------------------------------------------------------------- schedule
def warmup_cosine(step: int, *, total: int, warmup: int, min_ratio: float) -> float:
    """LR factor: linear warmup to 1 over `warmup` steps (first step already > 0), then cosine to `min_ratio`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer, train: TrainConfig):
    warmup = math.ceil(train.warmup_ratio * train.steps)
    fn = partial(warmup_cosine, total=train.steps, warmup=warmup, min_ratio=train.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


# ---------------------------------------------------------------------------------------------------- engine
def _numel_shape(p: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", p.shape))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters: decay on matrices, none on biases/norm scales (1-D)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if len(_numel_shape(p)) >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ConfigError("the model has no trainable parameters; check model.train and model.lora")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


ADAM_TYPES = ("adam", "adamw")
ADAM_KEYS = {"lr", "betas", "eps", "weight_decay", "adam_w_mode", "torch_adam", "foreach", "fp32_optimizer_states"}


def client_adam(spec: dict | None, train: TrainConfig) -> tuple[type, dict]:
    """(torch optimizer class, keyword arguments) doing what DeepSpeed's FusedAdam/DeepSpeedCPUAdam would do with the
    ds_config "optimizer" section `spec` (None: DeepSpeed's AdamW defaults). lr, betas and weight decay come from
    `train` (fill_ds_config made any explicit value agree); eps and the decay mode from the section, as DeepSpeed
    reads them: "AdamW" always decouples weight decay, "Adam" too unless `adam_w_mode` is false (then L2, torch Adam).
    Without this a custom JSON's eps or L2 mode applied on the GPU only and the CPU silently trained differently."""
    params = dict((spec or {}).get("params", {}))
    kind = str((spec or {}).get("type", "AdamW")).lower()
    if kind not in ADAM_TYPES:
        raise ConfigError(f"ds_config optimizer type {spec.get('type')!r} cannot run here: without DeepSpeed's "
                          f"fused ops (the CPU) dualloop uses torch's Adam/AdamW; use type Adam or AdamW")
    unknown = sorted(set(params) - ADAM_KEYS)
    if unknown:
        raise ConfigError(f"ds_config optimizer.params {unknown}: torch's Adam/AdamW (used without DeepSpeed's fused "
                          f"ops, e.g. on the CPU) has no such setting; supported: {sorted(ADAM_KEYS)}")
    decoupled = kind == "adamw" or bool(params.get("adam_w_mode", True))
    kwargs = {"lr": train.lr, "betas": tuple(float(b) for b in train.adam_betas),
              "eps": float(params.get("eps", 1e-8)), "weight_decay": train.weight_decay}
    return (torch.optim.AdamW if decoupled else torch.optim.Adam), kwargs


def fused_adam_available() -> bool:
    """DeepSpeed's FusedAdam is pre-built, or can be JIT-built (ninja + a CUDA toolkit)."""
    import shutil

    try:
        from deepspeed.git_version_info import installed_ops

        if installed_ops.get("fused_adam"):
            return True
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        return False
    return CUDA_HOME is not None and shutil.which("ninja") is not None


def engine_pass(engine, run: Callable[[], T]) -> T:
    """`run()` - one dual-loop micro-step, whose result has the loss as `.loss` - with the per-pass bookkeeping that
    `engine.forward` does around its module call. The dual loop calls the model's caption()/ground() rather than the
    engine, and DeepSpeed's gradient logic relies on that bookkeeping:

    - the ZeRO optimizer's per-pass reset (`clear_backward_seen_flag`): it advances ZeRO's micro-step counter.
      Without it every accumulated micro-batch's gradient overwrote the previous ones' (train.grad_accum > 1 trained
      on the last micro-batch only), and the backward-hook counters were never reset;
    - ZeRO-3's trace restart (the root module's pre-forward hook, `reset_step`): without it the coordinator keeps
      appending to its module trace and never prefetches;
    - the backward prologue hooked to the loss (backward depth, post-backward callback, the accumulation-boundary
      flag), with DeepSpeed's own `register_output_backward_hooks`, as engine.forward registers it.
    """
    from deepspeed.runtime.utils import register_output_backward_hooks

    optimizer = getattr(engine, "optimizer", None)
    if hasattr(optimizer, "clear_backward_seen_flag"):
        optimizer.clear_backward_seen_flag()
    offload = zero3_offload(engine)
    if offload is not None:
        offload.get_param_coordinator().reset_step()
    out = run()
    register_output_backward_hooks(out.loss, preprocess_once_fn=engine._backward_prologue,
                                   preprocess_per_tensor_fn=engine._backward_prologue_per_tensor)
    return out


def build_engine(model: torch.nn.Module, cfg: Config, ds_config: dict, device: str,
                 optimizer_spec: dict | None = None):
    """deepspeed.initialize with our optimizer/scheduler choice. Returns the engine (its .optimizer and
    .lr_scheduler are the wrapped optimizer and the warmup+cosine schedule). `optimizer_spec`: the JSON's
    "optimizer" section, for the client optimizer when `ds_config` has none (fill_ds_config removes it on the CPU)."""
    import deepspeed

    train = cfg.train
    if device == "cuda":
        from dualloop.kernels.build_env import normalize_cuda_arch_list

        # DeepSpeed's op builder (FusedAdam's JIT build) fails on entries like 9.0a: the launch scripts rewrite them,
        # but `dualloop train` and the nodes that pdsh starts (it does not pass the variable on) need it here
        normalize_cuda_arch_list()
    groups = param_groups(model, train.weight_decay)
    if "optimizer" in ds_config:  # DeepSpeed builds FusedAdam (GPU) or DeepSpeedCPUAdam (optimizer offload)
        offload = "offload_optimizer" in ds_config.get("zero_optimization", {})
        if device == "cuda" and not offload and not fused_adam_available():
            import warnings

            warnings.warn("DeepSpeed FusedAdam is neither pre-built nor buildable here (needs ninja and a CUDA "
                          "toolkit): using torch's AdamW through DeepSpeed (torch_adam)", stacklevel=2)
            ds_config = copy.deepcopy(ds_config)
            ds_config["optimizer"].setdefault("params", {})["torch_adam"] = True
        optimizer, model_parameters = None, groups
    else:
        optimizer_cls, kwargs = client_adam(optimizer_spec, train)
        optimizer = optimizer_cls(groups, **kwargs)
        model_parameters = None
    zero3 = zero_stage(ds_config) == 3
    if zero3:
        mark_zero3_leaves(model, train.zero3_leaf_modules)
    with per_parameter_grad_reduction():
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=model_parameters,
                                               lr_scheduler=partial(make_scheduler, train=train), config=ds_config,
                                               dist_init_required=False)
    if zero3:
        fast_backward_hook_functions(model)
    set_deepspeed_nvtx(train.deepspeed_nvtx)
    return engine
