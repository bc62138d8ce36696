"""Typed configuration: dataclasses loaded from YAML plus `key.sub=value` overrides.

Unknown keys are rejected with the nearest valid name, so a typo never silently falls back to a default.
Each section belongs to one part of the system (model/, data/, loop/, train/, eval/); a section's owner adds its
fields here. `data` and `kernels` never import this module: they take plain dicts/keyword arguments.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


# ---------------------------------------------------------------------------------------------------- sections
@dataclass
class LoraConfig:
    enabled: bool = True
    r: int = 128
    alpha: int = 256
    dropout: float = 0.05


@dataclass
class TrainablePartsConfig:
    """Which parts of the composite model receive gradients (Sa2VA defaults)."""

    vision_encoder: bool = False
    projector: bool = True
    llm_lora: bool = True
    llm_base: bool = False
    new_token_rows: bool = True
    seg_projection: bool = True
    sam2_image_encoder: bool = False
    prompt_encoder: bool = False
    mask_decoder: bool = True


@dataclass
class ModelConfig:
    preset: str = "tiny"  # a random preset of model/presets.py (tiny, small, *-shape, tiny-qwen*) | pretrained
    vlm_path: str | None = None
    sam2_path: str | None = None
    dtype: str = "auto"  # auto | float32 | bfloat16
    cudnn_attention: bool = False  # let torch's SDPA pick cuDNN attention (off: see model/build.py)
    prompt_style: str = "dualloop"  # dualloop | sa2va (Sa2VA's training text, for converted Sa2VA) | sa2va_eval
    # VLM tiles per image (InternVL dynamic tiling + a thumbnail, model/tiles.py); Sa2VA's releases were trained with 12
    max_tiles: int = 1
    sam2_resize: str = "bilinear"  # bilinear (SAM2's own) | bicubic (Sa2VA's: its fine-tuned decoder saw those)
    # evaluation empties a mask whose SAM2 object score is <= 0: SAM2's own video-predictor rule (Sa2VA's override of
    # it has the rule commented out, in inference as in training)
    object_gate: bool = False
    # Qwen2.5-VL family: an image is resized (aspect kept, sides multiples of 28) so that its area lies within these
    # (Sa2VA's single-image budget: 512 to 2048 tokens of 28 x 28 px); InternVL ignores them
    min_pixels: int = 512 * 28 * 28
    max_pixels: int = 2048 * 28 * 28
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainablePartsConfig = field(default_factory=TrainablePartsConfig)


# The ModelConfig fields that say how a model reads its inputs and makes its predictions (not its weights): an export
# or a conversion records them, and evaluation of that directory uses them
MODEL_CONVENTIONS = ("prompt_style", "max_tiles", "sam2_resize", "object_gate", "min_pixels", "max_pixels")


def pretrained_overrides(directory, conventions: dict) -> str:
    """The key=value overrides that train on from an export or a conversion in `directory` (its vlm/ and sam2/)
    with the model conventions it recorded."""
    return (f"model.preset=pretrained model.vlm_path={Path(directory) / 'vlm'} "
            f"model.sam2_path={Path(directory) / 'sam2'} "
            + " ".join(f"model.{k}={str(conventions[k]).lower()}" for k in MODEL_CONVENTIONS))


@dataclass
class DataConfig:
    seed: int = 0
    datasets: list[dict] = field(default_factory=list)  # [{name, kind, root, repeats, **options}]
    eval_datasets: list[dict] = field(default_factory=list)
    num_workers: int = 2
    max_bad_fraction: float = 0.01
    # seconds a micro-batch may take to come from the DataLoader workers before the run stops naming its files (0:
    # wait forever): a worker stuck on a hung filesystem would hold every rank until the process-group timeout
    timeout: float = 600.0


@dataclass
class CaptionConfig:
    max_new_tokens: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    gather: str = "auto"  # auto | once | per_layer
    # gathered once: keep those weights whole until the optimizer step (false: release them after the phase)
    keep_gathered: bool = True
    cuda_graph: bool = True  # static KV cache + one CUDA graph replay per token, when the weights are whole
    ema_decay: float | None = None


@dataclass
class LossConfig:
    preset: str = "sa2va"  # sa2va: 2*bce + 0.5*dice; sam2: 20*focal + 1*dice + 1*iou_head; custom: the weights below
    bce: float = 2.0
    focal: float = 0.0
    dice: float = 0.5
    iou_head: float = 0.0  # SAM2's IoU-prediction loss: L1 of each mask's predicted IoU vs its actual IoU
    caption: float = 1.0  # supervised caption LM loss, where ground-truth captions exist
    resize: str = "logits"  # logits | targets
    backend: str = "auto"
    multimask: str = "auto"  # auto (sa2va: best by predicted IoU; sam2: argmin of the loss) | best | argmin
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    dice_smooth: float = 1.0


@dataclass
class LoopConfig:
    caption_grad: str = "none"  # none | gumbel | reinforce
    gumbel_tau: float = 0.7
    gumbel_topk: int = 256
    gumbel_replace_prob: float = 0.25
    reinforce_samples: int = 4
    reinforce_reward: str = "iou"  # iou | neg_loss
    reinforce_baseline: str = "mean"  # mean | greedy
    reinforce_kl: float = 0.0
    reinforce_weight: float = 1.0  # weight of the policy-gradient term
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    loss: LossConfig = field(default_factory=LossConfig)


@dataclass
class TrainConfig:
    output_dir: str = "runs/train"
    steps: int = 100
    micro_batch_size: int = 2
    grad_accum: int = 1
    lr: float = 4e-5
    weight_decay: float = 0.05
    warmup_ratio: float = 0.05
    grad_clip: float = 1.0
    ds_config: str = "zero3_bf16"  # a name in ds_configs/ or a path to a JSON file
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    activation_checkpointing: bool = True
    save_every: int = 500
    keep_last: int = 2
    resume: str = "auto"  # auto | none | <checkpoint dir>
    log_every: int = 1
    seed: int = 0
    max_consecutive_skips: int = 5
    # SIGTERM/SIGINT/SIGUSR1 (launcher, scheduler, Ctrl-C): finish the step, save a checkpoint, exit 128 + signal
    stop_on_signal: bool = True
    tensorboard: bool = True
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    checkpoint_mask_decoder: bool = False  # activation checkpointing of the SAM2 mask decoder too
    # ZeRO-3: gather the whole model once per optimizer step and run each micro-step's forward and backward without
    # ZeRO-3's module hooks (weights whole until the step; optimizer states and gradients stay partitioned)
    zero3_whole_step: bool = False
    progress_bar: bool = True
    # ZeRO-3 fetches these modules whole (DeepSpeed "leaf" modules: one hook and one gather per block instead of one
    # per linear/norm). ["auto"]: the repeated blocks of the LLM, the vision tower and SAM2's image encoder; [] none;
    # or class names. A leaf needs a single input that carries gradient.
    zero3_leaf_modules: list[str] = field(default_factory=lambda: ["auto"])
    # DeepSpeed's NVTX ranges around its ZeRO functions (for Nsight): off by default, they cost host time per call
    deepspeed_nvtx: bool = False
    debug_nan_steps: list[int] = field(default_factory=list)  # fault injection: steps whose loss is made NaN (rank 0)


@dataclass
class EvalConfig:
    samples: int = 64
    batch_size: int = 4
    split: str = "val"
    every: int = 0  # during training, evaluate after every this many optimizer steps (0: never)
    # given: the grounding prompt's answer "It is [SEG]." is given (teacher-forced, as in training); generated: the
    # model generates its reply and segments from its [SEG]s (Sa2VA's evaluation; no [SEG]: an empty prediction)
    answer: str = "given"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ---------------------------------------------------------------------------------------------------- loading
def _nearest(name: str, valid: list[str], where: str = "") -> str:
    """The valid key nearest `name` in section `where`, named as the user writes it (train.lr)."""
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    prefix = f"{where}." if where else ""
    return f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} does not fit {tp}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return list(value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 leaves "4e-5" a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def from_dict(cls, data: dict, where: str = ""):
    """Build dataclass `cls` from a (nested) dict; unknown keys raise ConfigError with the nearest valid name."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in (data or {}).items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key '{path}'{_nearest(str(key), names, where)}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _set_override(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{k}' is not a section")
    node[keys[-1]] = value


def _parse_value(raw: str) -> Any:
    # YAML 1.1 reads "1e-4" as a string; numbers are tried first.
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return yaml.safe_load(raw) if raw != "" else ""


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """`train.lr=1e-4` → ('train.lr', 1e-4); values are parsed as YAML scalars/lists."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.sub=value")
        key, raw = item.split("=", 1)
        out.append((key.strip(), _parse_value(raw)))
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None) -> Config:
    """Load a YAML config (or start from `base`), apply `key=value` overrides, validate against the schema."""
    tree: dict = dict(base or {})
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        tree.update(loaded)
    for key, value in parse_overrides(overrides or []):
        _set_override(tree, key, value)
    return from_dict(Config, tree)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
