"""Build, save and load the DualLoopModel (random presets, local checkpoints, saved directories; ZeRO-3 aware).

ZeRO-3: with a ds_config of stage 3, an `HfDeepSpeedConfig` is created first (and kept on the model) so transformers'
`_from_config`/`from_pretrained` construct inside `deepspeed.zero.Init` and parameters are partitioned at
construction. Our own modules (text_hidden_fcs, new-token rows) are built inside `zero.Init` too; LoRA adapters are
injected as ordinary tensors (PEFT initialises them: B = 0) and then converted to ZeRO parameters with
`zero.Init(module=...)`, which broadcasts rank 0's values. The few weights that SAM2 modules read from child
modules without calling them are registered as external parameters of the reading module.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from ..config import ModelConfig, from_dict, to_dict
from .composite import DualLoopModel
from .presets import PRESETS, RANDOM_PRESETS, RANDOM_REINIT, pretrained_parts, random_preset, vlm_classes
from .token_rows import EmbeddingWithNewRows, LMHeadWithNewRows, NewTokenRows
from .tokenizer import NEW_SPECIAL_TOKENS, add_new_special_tokens
from .trainable import apply_lora, set_trainable
from .zero3_params import gathered

SAVE_FORMAT = 1  # META + tokenizer/ + one safetensors file holding every weight
HF_LAYOUT_FORMAT = 2  # META naming the transformers directories below, which hold the weights (written once)
META_FILE = "dualloop_model.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
HF_PARTS = {"vlm": "vlm", "sam2": "sam2", "seg_projection": "seg_projection.safetensors"}  # relative: movable


def is_zero3(ds_config: dict | None) -> bool:
    return bool(ds_config) and int((ds_config.get("zero_optimization") or {}).get("stage", 0) or 0) == 3


def resolve_dtype(name: str, ds_config: dict | None) -> torch.dtype:
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if name == "auto":
        bf16 = (ds_config or {}).get("bf16") or {}
        return torch.bfloat16 if bf16.get("enabled") is True else torch.float32
    raise ValueError(f"model.dtype must be auto, float32 or bfloat16, got {name!r}")


def select_attention_backends(cudnn: bool) -> None:
    """Process-wide: whether torch's scaled_dot_product_attention may pick its cuDNN kernel (`model.cudnn_attention`).

    Off by default. On Hopper, torch 2.11 picks cuDNN for masked (left-padded) batches, and measured on an H200
    (benchmarks/bench_sdpa_shapes.py, bf16, 4 x 14 heads x ~300 tokens, forward + backward): cuDNN builds a graph for
    every new sequence length, 115-130 ms each, and takes 0.9 ms for a length seen before, against 0.46 ms for the
    memory-efficient kernel whatever the length. Caption and prompt lengths change from step to step. Its backward
    also returns NaN gradients for masked batches 64 (mod 128) tokens long with padding rows (pytorch#196678, torch
    2.11): with prompts padded to 320 tokens, every sa2va-1b-shape step on the H200 skipped its update. Without cuDNN,
    SDPA takes flash attention (no mask), else the memory-efficient kernel, else math."""
    if hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
        torch.backends.cuda.enable_cudnn_sdp(bool(cudnn))


def build_model(cfg: ModelConfig, *, ds_config: dict | None = None) -> DualLoopModel:
    """The composite model of `cfg.preset`, with LoRA and trainable flags applied. Never downloads anything."""
    if cfg.preset not in PRESETS:
        raise ValueError(f"model.preset: unknown preset {cfg.preset!r}; valid: {', '.join(PRESETS)}")
    with _construction_context(ds_config):
        return _build(cfg, ds_config)


def _build(cfg: ModelConfig, ds_config: dict | None) -> DualLoopModel:
    dtype = resolve_dtype(cfg.dtype, ds_config)
    hf_ds = _hf_ds_config(ds_config)
    from transformers import Sam2Model

    if cfg.preset == "pretrained":
        vlm, sam2, tokenizer = pretrained_parts(cfg.vlm_path, cfg.sam2_path, dtype)
        vocab = tokenizer.get_vocab()
        # tokens the checkpoint already has (a Sa2VA-style or exported model): their trained rows are kept
        kept = {vocab[t] for t in NEW_SPECIAL_TOKENS if t in vocab}
        add_new_special_tokens(tokenizer)
        if len(tokenizer) > vlm.get_input_embeddings().num_embeddings:
            vlm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        rows_init = ("mean", kept)
    else:
        assert cfg.preset in RANDOM_PRESETS
        vlm_config, sam2_config, tokenizer = random_preset(cfg.preset)
        vlm = vlm_classes(vlm_config.model_type)[1]._from_config(vlm_config, dtype=dtype)
        sam2 = Sam2Model._from_config(sam2_config, dtype=dtype)
        rows_init = ("random", set())
        _reinit(vlm, RANDOM_REINIT.get(cfg.preset, {}))
    return _assemble(vlm, sam2, tokenizer, cfg, dtype, ds_config, hf_ds, rows_init)


@contextlib.contextmanager
def _no_global_zero3():
    """Build with plain tensors even while another model's HfDeepSpeedConfig (ZeRO-3) is alive in this process
    (transformers reads it from a module-level weakref)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def _construction_context(ds_config):
    return contextlib.nullcontext() if is_zero3(ds_config) else _no_global_zero3()


def _reinit(vlm, stds: dict) -> None:
    """Redraw some tensors of a random preset (see presets.RANDOM_REINIT); rank 0's draw under ZeRO-3."""
    targets = []
    if "embed" in stds:
        targets.append((vlm.get_input_embeddings().weight, stds["embed"]))
        vlm.config.text_config.initializer_range_embeddings = stds["embed"]  # for the new-token rows
    positions = getattr(getattr(getattr(vlm.model, "vision_tower", None), "embeddings", None), "position_embeddings",
                        None)  # InternViT's (Qwen-VL towers have rotary positions)
    if "vision_pos" in stds and positions is not None:
        targets.append((positions, stds["vision_pos"]))
    for weight, std in targets:
        ctx = contextlib.nullcontext()
        if hasattr(weight, "ds_id"):
            import deepspeed

            ctx = deepspeed.zero.GatheredParameters([weight], modifier_rank=0)
        with ctx, torch.no_grad():
            if weight.device.type != "meta":
                weight.normal_(0.0, std)


def _hf_ds_config(ds_config):
    if not is_zero3(ds_config):
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


def _zero_init(ds_config):
    if not is_zero3(ds_config):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.Init(config_dict_or_path=ds_config)


def _assemble(vlm, sam2, tokenizer, cfg: ModelConfig, dtype, ds_config, hf_ds,
              rows_init: tuple[str, set[int]]) -> DualLoopModel:
    """rows_init: ("mean" | "random", ids whose rows are copied from the checkpoint's matrices instead)."""
    select_attention_backends(cfg.cudnn_attention)
    new_ids = add_new_special_tokens(tokenizer)
    lm = vlm.model.language_model
    base_embed, base_head = lm.embed_tokens, vlm.lm_head
    if isinstance(base_embed, EmbeddingWithNewRows):
        raise ValueError("the VLM already carries new-token rows")
    vocab = base_embed.num_embeddings
    if len(tokenizer) > vocab:
        raise ValueError(f"tokenizer has {len(tokenizer)} ids but the VLM's embedding only {vocab}")
    tied = base_head.weight is base_embed.weight
    hidden = int(vlm.config.text_config.hidden_size)
    n = len(new_ids)
    init_mode, kept = rows_init
    if init_mode == "mean":  # new rows start at the mean of the checkpoint's other rows (usual resize init)
        old = torch.ones(vocab, dtype=torch.bool)
        old[torch.tensor(new_ids)] = False
        with gathered([base_embed.weight, base_head.weight]):
            def init_from(weight):
                rows = weight.detach().float()[old].mean(0, keepdim=True).repeat(n, 1)
                for k, i in enumerate(new_ids):
                    if i in kept:
                        rows[k] = weight.detach()[i].float()
                return rows

            embed_init = init_from(base_embed.weight)
            head_init = None if tied else init_from(base_head.weight)
    else:
        tc = vlm.config.text_config
        std = float(getattr(tc, "initializer_range_embeddings", getattr(tc, "initializer_range", 0.02)))
        embed_init = torch.randn(n, hidden) * std
        head_init = None if tied else torch.randn(n, hidden) * std
    if cfg.lora.enabled:
        apply_lora(lm, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout)
    prompt_dim = int(sam2.config.prompt_encoder_config.hidden_size)
    with _zero_init(ds_config):
        rows = NewTokenRows(new_ids, vocab, embed_init.to(dtype), None if head_init is None else head_init.to(dtype))
        text_hidden_fcs = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
                                        nn.Linear(hidden, prompt_dim)).to(dtype)
    lm.embed_tokens = EmbeddingWithNewRows(base_embed, rows)
    vlm.lm_head = LMHeadWithNewRows(base_head, rows)
    if hf_ds is not None:
        import deepspeed

        deepspeed.zero.Init(module=vlm, config_dict_or_path=ds_config)  # LoRA tensors -> ZeRO params
        _register_external_parameters(sam2)
    model = DualLoopModel(vlm, sam2, tokenizer, text_hidden_fcs, cfg, hf_ds_config=hf_ds)
    if hf_ds is None:
        model.to(dtype)
    else:
        _buffers_to_local_device(model)
    set_trainable(model, cfg.train)
    return model


def _buffers_to_local_device(model: nn.Module) -> None:
    """zero.Init places what is created inside it on this rank's accelerator, and DeepSpeed does not move a ZeRO-3
    model afterwards: buffers made outside it (the composite's pixel mean/std) would stay on the CPU."""
    from deepspeed.accelerator import get_accelerator

    dev = torch.device(get_accelerator().current_device_name())
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.device != dev:
                module._buffers[name] = buf.to(dev)


def _register_external_parameters(sam2) -> None:
    """SAM2's prompt encoder and mask decoder read child embeddings' `.weight` without calling them."""
    import deepspeed

    register_external_parameter = deepspeed.zero.register_external_parameter
    md, pe = sam2.mask_decoder, sam2.prompt_encoder
    for p in (md.iou_token.weight, md.mask_tokens.weight, md.obj_score_token.weight):
        register_external_parameter(md, p)
    for p in (pe.not_a_point_embed.weight, pe.no_mask_embed.weight, pe.point_embed.weight):
        register_external_parameter(pe, p)


# ------------------------------------------------------------------------------------------------ save / load
def storage_key(t: torch.Tensor) -> tuple:
    """Equal for the tensors that are one weight (tied embeddings and heads): stored, and counted, once."""
    return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)


def save_pretrained(model: DualLoopModel, directory: str | Path, *, hf_layout: bool = False) -> Path:
    """Write config + tokenizer + all weights (LoRA adapters and new-token rows included) to `directory`.

    `hf_layout`: the weights go into transformers directories instead of one file (see `_save_hf_layout`).
    Under ZeRO-3 the parameters are gathered (all ranks must call this); rank 0 writes.
    """
    if hf_layout:
        return _save_hf_layout(model, Path(directory))
    from safetensors.torch import save_file

    out = Path(directory)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    params = list(model.parameters())
    zero3 = any(hasattr(p, "ds_id") for p in params)
    with gathered(params):
        state, aliases, seen = {}, {}, {}
        if rank == 0:
            for name, t in model.state_dict().items():
                key = storage_key(t)
                if key in seen:  # tied weights are stored once
                    aliases[name] = seen[key]
                    continue
                seen[key] = name
                cpu = t.detach().to("cpu").contiguous()
                # a gathered ZeRO-3 weight is released after the context: keep a copy of it. Others are written as
                # they are (a 26B model in fp32 is 100 GB: no second copy of it)
                state[name] = cpu.clone() if zero3 and cpu.data_ptr() == t.data_ptr() else cpu
    if rank != 0:
        return out
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    model.tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
    meta = {
        "format": SAVE_FORMAT,
        "model_config": to_dict(model.model_cfg),
        "vlm_config": model.vlm.config.to_dict(),
        "sam2_config": model.sam2.config.to_dict(),
        "aliases": aliases,
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=1, default=str))
    return out


def _save_hf_layout(model: DualLoopModel, out: Path) -> Path:
    """The weights once, in the form users load with transformers: vlm/ (the VLM with its tokenizer; the new-token
    rows written into the embedding / LM head), sam2/, seg_projection.safetensors (text_hidden_fcs), and a META
    that names them, so `load_model` builds from the same files. One process, a whole model without LoRA adapters
    (`dualloop export` merges them): a transformers directory cannot hold unmerged adapters."""
    from safetensors.torch import save_file

    if any(hasattr(p, "ds_id") for p in model.parameters()):
        raise ValueError("save_pretrained(hf_layout=True) needs a whole model, not a ZeRO-3 partitioned one")
    adapters = [n for n, _ in model.named_parameters() if ".lora_" in n]
    if adapters:
        raise ValueError(f"save_pretrained(hf_layout=True): merge the LoRA adapters first ({adapters[0]}, ...)")
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return out
    out.mkdir(parents=True, exist_ok=True)
    seg = {k: v.detach().contiguous() for k, v in model.text_hidden_fcs.state_dict().items()}
    save_file(seg, str(out / HF_PARTS["seg_projection"]), metadata={"format": "pt"})
    with _rows_in_base(model):
        model.vlm.save_pretrained(str(out / HF_PARTS["vlm"]), safe_serialization=True)
    model.tokenizer.save_pretrained(str(out / HF_PARTS["vlm"]))
    model.sam2.save_pretrained(str(out / HF_PARTS["sam2"]), safe_serialization=True)
    meta = {"format": HF_LAYOUT_FORMAT, "model_config": to_dict(model.model_cfg), "weights": dict(HF_PARTS)}
    (out / META_FILE).write_text(json.dumps(meta, indent=1, default=str))
    return out


@contextlib.contextmanager
def _rows_in_base(model: DualLoopModel):
    """For a transformers save: the plain embedding / LM head, holding the new tokens' trained rows where the rows
    module would put them in the forward. Restored after (module and base values; those base values are never
    read, which is why the transformers form can do without them)."""
    lm, vlm = model.language_model, model.vlm
    embed, head = lm.embed_tokens, vlm.lm_head
    rows = embed.rows
    pairs = [(embed.base.weight, rows.embed)] + ([] if rows.head is None else [(head.base.weight, rows.head)])
    earlier = [w[rows.token_ids].clone() for w, _ in pairs]
    with torch.no_grad():
        for weight, new in pairs:
            weight[rows.token_ids] = new.to(weight.dtype)
    lm.embed_tokens, vlm.lm_head = embed.base, head.base
    try:
        yield
    finally:
        lm.embed_tokens, vlm.lm_head = embed, head
        with torch.no_grad():
            for (weight, _), old in zip(pairs, earlier):
                weight[rows.token_ids] = old


def adopt_rows_and_projection(model: DualLoopModel, seg_file: Path) -> None:
    """Into a model built from transformers directories that a dualloop save wrote: the new-token rows from the
    base embedding / LM head (where the save wrote them) and the [SEG] projection from `seg_file`. Under ZeRO-3
    every rank must call it."""
    from safetensors.torch import load_file

    seg = load_file(str(seg_file))
    embed, head = model.language_model.embed_tokens, model.vlm.lm_head
    rows = embed.rows
    fcs = dict(model.text_hidden_fcs.named_parameters())
    if set(seg) != set(fcs):
        raise ValueError(f"{seg_file} does not fit the model's [SEG] projection ({sorted(seg)} vs {sorted(fcs)})")
    params = [rows.embed, embed.base.weight, head.base.weight, *fcs.values()]
    if rows.head is not None:
        params.append(rows.head)
    zero3 = [q for q in params if hasattr(q, "ds_id")]
    ctx = contextlib.nullcontext()
    if zero3:
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(zero3, modifier_rank=0)  # rank 0 writes, all ranks get it
    with ctx, torch.no_grad():
        ids = rows.token_ids.to(embed.base.weight.device)
        rows.embed.copy_(embed.base.weight[ids].to(rows.embed.dtype))
        if rows.head is not None:
            rows.head.copy_(head.base.weight[ids].to(rows.head.dtype))
        for name, q in fcs.items():
            if tuple(q.shape) != tuple(seg[name].shape):
                raise ValueError(f"{seg_file}: {name} has shape {tuple(seg[name].shape)}, model {tuple(q.shape)}")
            q.copy_(seg[name].to(q.dtype))


def load_model(directory: str | Path, *, ds_config: dict | None = None, train=None) -> DualLoopModel:
    """Rebuild a model written by `save_pretrained`, either layout (no access to the original checkpoint dirs needed).

    `train` (a TrainablePartsConfig) overrides the saved trainable switches.
    """
    with _construction_context(ds_config):
        return _load(Path(directory), ds_config, train)


def _load(src: Path, ds_config: dict | None, train) -> DualLoopModel:
    from safetensors import safe_open
    from transformers import AutoTokenizer, Sam2Config, Sam2Model

    meta_file = src / META_FILE
    if not meta_file.is_file():
        raise ValueError(f"{src} is not a dualloop model directory (no {META_FILE})")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") not in (SAVE_FORMAT, HF_LAYOUT_FORMAT):
        raise ValueError(f"{meta_file}: unsupported format {meta.get('format')!r} (expected {SAVE_FORMAT} or "
                         f"{HF_LAYOUT_FORMAT})")
    cfg = from_dict(ModelConfig, meta["model_config"], "model")
    if train is not None:
        cfg = dataclasses.replace(cfg, train=train)
    dtype = resolve_dtype(cfg.dtype, ds_config)
    hf_ds = _hf_ds_config(ds_config)
    if meta["format"] == HF_LAYOUT_FORMAT:
        return _load_hf_layout(src, meta, cfg, dtype, ds_config, hf_ds)
    tokenizer = AutoTokenizer.from_pretrained(str(src / TOKENIZER_DIR), local_files_only=True)
    config_cls, vlm_cls = vlm_classes(meta["vlm_config"].get("model_type", "internvl"))
    vlm_config = _config_from_dict(config_cls, meta["vlm_config"])
    sam2_config = _config_from_dict(Sam2Config, meta["sam2_config"])
    vlm = vlm_cls._from_config(vlm_config, dtype=dtype)
    sam2 = Sam2Model._from_config(sam2_config, dtype=dtype)
    # the rows' values come from the weights file below
    model = _assemble(vlm, sam2, tokenizer, cfg, dtype, ds_config, hf_ds, rows_init=("random", set()))
    # read one tensor at a time from the memory-mapped file: never the whole file and the model in memory at once
    with safe_open(str(src / WEIGHTS_FILE), framework="pt") as f:
        stored = set(f.keys())
        names = {a: t for a, t in meta.get("aliases", {}).items() if t in stored} | {k: k for k in stored}
        _load_state(model, names, lambda name: f.get_tensor(names[name]), src / WEIGHTS_FILE)
    return model


def _load_hf_layout(src: Path, meta: dict, cfg: ModelConfig, dtype, ds_config, hf_ds) -> DualLoopModel:
    """The model of a META that names transformers directories: each part loaded as the `pretrained` preset loads
    it, the model config (prompt style, trainable switches, ...) from the META."""
    parts = {key: src / meta["weights"][key] for key in HF_PARTS}
    lacking = [str(p) for p in parts.values() if not p.exists()]
    if lacking:
        raise ValueError(f"{src / META_FILE} keeps the weights in {', '.join(HF_PARTS.values())}; missing: "
                         f"{', '.join(lacking)}")
    try:
        vlm, sam2, tokenizer = pretrained_parts(str(parts["vlm"]), str(parts["sam2"]), dtype)
    except ValueError as e:  # its messages name the preset's keys: say whose directories these are
        raise ValueError(f"{src / META_FILE}: {e}") from e
    # the rows' values are the base matrices' rows, copied in below
    model = _assemble(vlm, sam2, tokenizer, cfg, dtype, ds_config, hf_ds, rows_init=("random", set()))
    adopt_rows_and_projection(model, parts["seg_projection"])
    return model.train()  # as a model built from configs (from_pretrained leaves its parts in eval mode)


def _config_from_dict(cls, d: dict):
    d = {k: v for k, v in d.items() if k not in ("transformers_version", "dtype", "torch_dtype")}
    return cls.from_dict(d)


def _load_state(model: nn.Module, names, get, path: Path) -> None:
    """Copy the weights `names` (a collection of state-dict keys), read by `get(name)`, into the model."""
    own = model.state_dict(keep_vars=True)
    missing = sorted(set(own) - set(names))
    unexpected = sorted(set(names) - set(own))
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit the model (missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]})")
    with torch.no_grad():
        for name, t in own.items():
            src = get(name)
            if isinstance(t, nn.Parameter) and hasattr(t, "ds_id"):
                import deepspeed

                with deepspeed.zero.GatheredParameters([t], modifier_rank=0):
                    t.data.copy_(src.to(t.dtype))
            else:
                if tuple(t.shape) != tuple(src.shape):
                    raise ValueError(f"{path}: {name} has shape {tuple(src.shape)}, model {tuple(t.shape)}")
                t.data.copy_(src.to(t.dtype))
