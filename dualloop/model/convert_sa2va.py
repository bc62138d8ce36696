"""`dualloop convert-sa2va --checkpoint DIR --out DIR`: a released Sa2VA checkpoint (the Hugging Face format of
ByteDance's Sa2VA: `Sa2VAChatModel`, InternViT + an LLM + SAM2, or `Sa2VAChatModelQwen`, Qwen2.5-VL or Qwen3-VL +
SAM2) -> the directories `model.preset: pretrained` loads:

    OUT/vlm/                        transformers InternVL ("-hf" layout), Qwen2_5_VLForConditionalGeneration or
                                    Qwen3VLForConditionalGeneration with Sa2VA's tokenizer ([SEG], <vp>, </vp>
                                    already in it, so their trained rows are kept)  -> model.vlm_path
    OUT/sam2/                       transformers Sam2Model (image encoder, prompt encoder, mask decoder)
                                                                                     -> model.sam2_path
    OUT/seg_projection.safetensors  Sa2VA's trained [SEG] projection (text_hidden_fcs), adopted by the preset
    OUT/export.json                 what was written (vlm_family: "internvl" | "qwen2_5_vl" | "qwen3_vl"), the SAM2
                                    memory weights left out, the overrides to train with (the model settings of
                                    Sa2VA's training and inference: SA2VA_MODEL, its prompt text, 12 tiles, bicubic
                                    SAM2 input, no object-score gate; SA2VA_QWEN_MODEL / SA2VA_QWEN3_MODEL for
                                    Qwen2.5-VL / Qwen3-VL: one image, no tiles, within Sa2VA's pixel budget
                                    min_pixels/max_pixels)

Supported, InternVL-based (config.json with `llm_config` + `vision_config`): Sa2VA models whose LLM is a transformers
class with the standard layout (Qwen2/Qwen2.5, Qwen3, Llama: Sa2VA-1B, -4B, the InternVL3-based ones) or InternLM2
(Sa2VA-8B, -26B). transformers has no InternLM2 class, but InternLM2 is Llama with fused weights, so it becomes
`LlamaForCausalLM` (as transformers' own InternVL conversion and InternLM's tools/convert2llama.py do): wqkv split per
KV-head group, w1/w3/w2 -> gate/up/down, same rotate-half RoPE. Its tokenizer is remote code over sentencepiece; it
is rebuilt from `tokenizer.model` with the `tokenizers` library (`internlm2.rebuild_tokenizer`), or taken from
`--tokenizer DIR`. Phi3-based releases raise an error naming the architecture.
The vision renames follow the InternVL -> InternVL-hf layout (InternViT's fused qkv split into q/k/v; InternViT-6B's
q_norm/k_norm keep their names).

Supported, Qwen2.5-VL-based (Sa2VA-Qwen2_5-VL-3B, -7B: `model_type` sa2va_chat, a Qwen2_5_VLConfig with a
Qwen2.5-VL `vision_config`, no `llm_config`): the weights of its `model` (a Qwen2_5_VLForConditionalGeneration) keep
their names but for the prefix, in either layout a release may have been saved with (`qwen_layout`): transformers
< 4.52 (`model.visual.*`, `model.model.*` = the LLM, `model.lm_head.weight`) or >= 4.52 (`model.model.visual.*`,
`model.model.language_model.*`, `model.lm_head.weight`); its text settings are read from `text_config` where the
config has one, else from its top level (older Qwen2_5_VLConfig). The LM head is tied to the embedding where the
config ties them or the checkpoint holds no head; a stored head that differs from the embedding stays separate.

Supported, Qwen3-VL-based (Sa2VA-Qwen3-VL-4B: `model_type` sa2va_chat, Sa2VAChatConfigQwen over a Qwen3VLConfig,
told by its DeepStack vision_config (`deepstack_visual_indexes`) or a `qwen3_vl*` text_config): as the Qwen2.5-VL
releases, its `model` a Qwen3VLForConditionalGeneration (DeepStack mergers `deepstack_merger_list.*` beside
`merger.*`), saved by transformers >= 4.57 in the >= 4.52 layout only (`model.model.visual.*`,
`model.model.language_model.*`, `model.lm_head.weight`; Qwen3-VL had no other); its text settings (a Qwen3 LLM
with q/k norms, explicit head_dim, interleaved multimodal RoPE: `mrope_section`, `mrope_interleaved`) only in
`text_config`. Qwen3-VL-MoE-based configs raise an error naming the architecture. A Qwen-VL config's errors name the
file and the family; its settings are checked before the weights are read.
Nothing is downloaded; the checkpoint's remote code is not run.
"""
from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from dualloop.config import ConfigError, pretrained_overrides
from dualloop.files import check_new_output, staged_directory

from . import internlm2
from .internlm2 import to_llama_weights as internlm2_weights

PREFIX_VISION = "vision_model."
PREFIX_LLM = "language_model."
PREFIX_PROJECTOR = "mlp1."
PREFIX_SAM2 = "grounding_encoder.sam2_model."
PREFIX_SEG = "text_hidden_fcs."
PREFIX_QWEN = "model."  # Sa2VAChatModelQwen.model, a Qwen2_5_VL- / Qwen3VLForConditionalGeneration
# The model settings of Sa2VA's own training and inference (`model.*`): its prompt text; its predict_forward tiles every
# image into at most 12 tiles + a thumbnail (max_dynamic_patch, whatever the config says), as its training data did;
# its DirectResize to SAM2's 1024 is PIL's default, bicubic; its `_forward_sam_heads` override has SAM2's "no object ->
# logits -1024" rule commented out, so no mask is emptied by the object score.
# min_pixels/max_pixels: Sa2VA's single-image pixel budget of its Qwen-VL image processor (read by the Qwen-VL
# families only; here so that the conventions of all families name the same keys).
SA2VA_PIXELS = {"min_pixels": 512 * 28 * 28, "max_pixels": 2048 * 28 * 28}
SA2VA_MODEL = {"prompt_style": "sa2va", "max_tiles": 12, "sam2_resize": "bicubic", "object_gate": False,
               **SA2VA_PIXELS}
# Sa2VA-Qwen2_5-VL: the same prompt text, SAM2 input and gate; one image per prompt (no tiles: Qwen2.5-VL reads the
# image at its own resolution), resized by the image processor into 512..2048 patches of 28x28 (Sa2VAChatModelQwen's
# min_pixels/max_pixels, those of its training data, projects/sa2va/datasets/base.py's single-image budget).
SA2VA_QWEN_MODEL = {"prompt_style": "sa2va", "max_tiles": 1, "sam2_resize": "bicubic", "object_gate": False,
                    **SA2VA_PIXELS}
# Sa2VA-Qwen3-VL: as Sa2VA-Qwen2_5-VL. Its Sa2VAChatModelQwen (projects/sa2va/hf/models_qwen3vl) passes the same
# min_pixels=512*28*28, max_pixels=2048*28*28 to its Qwen3-VL processor: pixel counts, kept as given although
# Qwen3-VL's tokens are 32x32 px (16 px patches, 2x2 merged), so the budget is about 392..1568 tokens.
SA2VA_QWEN3_MODEL = {"prompt_style": "sa2va", "max_tiles": 1, "sam2_resize": "bicubic", "object_gate": False,
                     **SA2VA_PIXELS}
INTERNVL, QWEN2_5_VL, QWEN3_VL = "internvl", "qwen2_5_vl", "qwen3_vl"  # export.json's vlm_family
INTERNLM2 = "InternLM2ForCausalLM"
# InternLM2 has no transformers class: its weights are renamed into Llama's (convert_vlm_state)
SUPPORTED_LLMS = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", "LlamaForCausalLM": "llama",
                  INTERNLM2: "llama"}

# a Qwen2.5-VL vision config (Qwen2_5_VLVisionConfig) has these; Qwen2-VL's lacks the first two, Qwen3-VL's the first
QWEN2_5_VL_VISION_KEYS = frozenset({"fullatt_block_indexes", "window_size", "out_hidden_size", "spatial_merge_size"})
# tokens Sa2VA-Qwen2_5-VL / -Qwen3-VL prompt with (besides [SEG], <vp>, </vp>): the Qwen chat and image markers
QWEN_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>")
# Qwen2_5_VLConfig's / Qwen3VLConfig's token ids (top level) and the token each must be, where the tokenizer has it
QWEN_TOKEN_IDS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                  "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}
# Sa2VAChatModelQwen.model (a Qwen2_5_VLForConditionalGeneration or Qwen3VLForConditionalGeneration) as saved by
# transformers < 4.52 / >= 4.52 -> the installed class: (source prefix, target prefix) of the vision tower, the LLM
# body, the LM head
QWEN_LAYOUTS = {
    "transformers<4.52": (("model.visual.", "model.visual."), ("model.model.", "model.language_model."),
                          ("model.lm_head.", "lm_head.")),
    "transformers>=4.52": (("model.model.visual.", "model.visual."),
                           ("model.model.language_model.", "model.language_model."), ("model.lm_head.", "lm_head.")),
}
QWEN_LLM_PARTS = ("embed_tokens.", "layers.", "norm.")


@dataclass(frozen=True)
class QwenFamily:
    """What differs between the Qwen-VL-based releases: the name errors use, the releases, the transformers
    classes (`cls`: Qwen2_5_VL / Qwen3VL + ForConditionalGeneration, Config), export.json's `llm`, the QWEN_LAYOUTS its
    weights may be in, whether the text settings must be nested (`text_config`), tie_word_embeddings where the config
    does not say (the transformers 4.x default of its config class), whether transformers' multimodal RoPE of it
    interleaves (Qwen3-VL always does, whatever mrope_interleaved says; Qwen2.5-VL never), its conventions."""
    name: str
    release: str
    examples: str
    cls: str
    llm: str
    layouts: tuple[str, ...]
    nested_only: bool
    tied_default: bool
    interleaved: bool
    conventions: dict


QWEN_FAMILIES = {
    QWEN2_5_VL: QwenFamily("Qwen2.5-VL", "Sa2VA-Qwen2_5-VL", "Sa2VA-Qwen2_5-VL-3B/-7B", "Qwen2_5_VL",
                           "Qwen2_5_VLTextModel", ("transformers<4.52", "transformers>=4.52"), False, True, False,
                           SA2VA_QWEN_MODEL),
    # Qwen3-VL shipped with transformers 4.57: only ever saved in the >= 4.52 layout
    QWEN3_VL: QwenFamily("Qwen3-VL", "Sa2VA-Qwen3-VL", "Sa2VA-Qwen3-VL-4B", "Qwen3VL", "Qwen3VLTextModel",
                         ("transformers>=4.52",), True, False, True, SA2VA_QWEN3_MODEL),
}

# InternViT (original) -> InternVLVisionModel, applied in order on the key after "vision_model."
_VISION_RENAMES = [
    (r"^embeddings\.class_embedding$", "embeddings.cls_token"),
    (r"^embeddings\.patch_embedding\.", "embeddings.patch_embeddings.projection."),
    (r"^embeddings\.position_embedding$", "embeddings.position_embeddings"),
    (r"^encoder\.layers\.", "encoder.layer."),
    (r"\.attn\.proj\.", ".attention.projection_layer."),
    (r"\.attn\.", ".attention."),
    (r"\.ls(\d)$", r".lambda_\1"),
    (r"\.norm1\.", ".layernorm_before."),
    (r"\.norm2\.", ".layernorm_after."),
]
# mlp1 = Sequential(LayerNorm, Linear, GELU, Linear)
_PROJECTOR_RENAMES = {"0": "layer_norm", "1": "linear_1", "3": "linear_2"}


def read_checkpoint(src: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json as a dict, all weights) of a Sa2VA checkpoint directory (safetensors, one file or shards)."""
    from safetensors.torch import load_file

    cfg_file = src / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"--checkpoint {src}: no config.json (expected a Sa2VA checkpoint directory)")
    cfg = json.loads(cfg_file.read_text())
    family = vlm_family(cfg, cfg_file)  # an unknown or unsupported config fails before the weights are read
    if family in QWEN_FAMILIES:
        qwen_vl_config(cfg, cfg_file, family)  # and so does a Qwen-VL config transformers would not read as given
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"--checkpoint {src}: no *.safetensors files (only safetensors checkpoints are read)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return cfg, state


def vlm_family(cfg: dict, cfg_file: Path | str = "config.json") -> str:
    """INTERNVL (`llm_config` + `vision_config`: Sa2VAChatConfig), QWEN2_5_VL (`model_type` sa2va_chat, no
    llm_config, a Qwen2.5-VL vision_config: Sa2VAChatConfigQwen, a Qwen2_5_VLConfig) or QWEN3_VL (the same with a
    Qwen3-VL vision_config, `deepstack_visual_indexes`, or a `qwen3_vl*` text_config: Sa2VAChatConfigQwen over a
    Qwen3VLConfig); a ConfigError naming `cfg_file` and what it is for anything else (Qwen3-VL-MoE included)."""
    if "llm_config" in cfg and "vision_config" in cfg:
        return INTERNVL
    vision, text = cfg.get("vision_config"), cfg.get("text_config")
    text = text if isinstance(text, dict) else {}
    if "llm_config" not in cfg and cfg.get("model_type") == "sa2va_chat" and isinstance(vision, dict):
        arch = (cfg.get("architectures") or ["?"])[0]
        text_type = str(text.get("model_type", ""))
        if "deepstack_visual_indexes" in vision or text_type.startswith("qwen3_vl"):
            if "moe" in text_type or "moe" in str(vision.get("model_type", "")) or "num_experts" in text:
                raise ConfigError(f"{cfg_file}: a Sa2VA model on Qwen3-VL-MoE ({arch}; text_config model_type "
                                  f"{text_type!r}) is not supported (supported: the dense Qwen3-VL, e.g. "
                                  "Sa2VA-Qwen3-VL-4B, Sa2VA-Qwen2_5-VL-3B/-7B and the InternVL-based releases)")
            return QWEN3_VL
        if QWEN2_5_VL_VISION_KEYS <= set(vision):
            return QWEN2_5_VL
        raise ConfigError(f"{cfg_file}: a Sa2VA ({arch}) config with neither llm_config (InternVL-based) nor a "
                          f"Qwen2.5-VL vision_config (keys {sorted(QWEN2_5_VL_VISION_KEYS)}) or a Qwen3-VL one "
                          f"(deepstack_visual_indexes; it has {sorted(vision)}): an unsupported architecture")
    raise ConfigError(f"{cfg_file}: not a Sa2VA config (model_type {cfg.get('model_type')!r}; expected "
                      "'sa2va_chat' with llm_config and vision_config, or a Qwen2.5-VL or Qwen3-VL config)")


def llm_model_type(cfg: dict) -> str:
    arch = (cfg["llm_config"].get("architectures") or ["?"])[0]
    if arch not in SUPPORTED_LLMS:
        raise ConfigError(f"Sa2VA with a {arch} language model is not supported (supported: "
                          f"{', '.join(SUPPORTED_LLMS)}; e.g. Sa2VA-1B, -4B and the InternVL3-based releases)")
    return SUPPORTED_LLMS[arch]


def internvl_config(cfg: dict, image_token_id: int):
    """The transformers InternVLConfig equivalent to a Sa2VA config."""
    from transformers import AutoConfig, InternVLConfig, InternVLVisionConfig

    if cfg.get("ps_version", "v2") != "v2":
        raise ConfigError(f"ps_version {cfg.get('ps_version')!r}: only 'v2' pixel shuffle matches InternVL-hf")
    v = cfg["vision_config"]
    size = cfg.get("force_image_size") or v["image_size"]
    vision = InternVLVisionConfig(
        hidden_size=v["hidden_size"], num_hidden_layers=v["num_hidden_layers"],
        num_attention_heads=v["num_attention_heads"], intermediate_size=v["intermediate_size"],
        hidden_act=v.get("hidden_act", "gelu"), norm_type=v.get("norm_type", "rms_norm"),
        layer_norm_eps=v.get("layer_norm_eps", 1e-6), use_qk_norm=v.get("qk_normalization", False),
        attention_bias=v.get("qkv_bias", False), image_size=[size, size], patch_size=[v["patch_size"]] * 2,
        num_channels=v.get("num_channels", 3), layer_scale_init_value=v.get("initializer_factor", 0.1),
        use_absolute_position_embeddings=True,
    )
    if vision.use_qk_norm and vision.layer_norm_eps != 1e-6:  # InternVLVisionModel's q_norm/k_norm eps is fixed
        raise ConfigError(f"vision_config.layer_norm_eps {vision.layer_norm_eps} with qk_normalization: "
                          "transformers' InternVL vision q_norm/k_norm use 1e-6")
    kind = llm_model_type(cfg)
    if cfg["llm_config"]["architectures"][0] == INTERNLM2:
        text = internlm2.llama_config(cfg["llm_config"])
    else:
        llm = {k: x for k, x in cfg["llm_config"].items()
               if k not in ("_name_or_path", "auto_map", "architectures", "model_type", "transformers_version",
                            "_attn_implementation", "attn_implementation", "use_flash_attn", "torch_dtype")}
        text = AutoConfig.for_model(kind, **llm)
    ratio = cfg.get("downsample_ratio", 0.5)
    grid = int(size // v["patch_size"] * ratio)
    return InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=image_token_id, image_seq_length=grid * grid,
        downsample_ratio=ratio, projector_hidden_act="gelu", vision_feature_layer=cfg.get("select_layer", -1),
        vision_feature_select_strategy="default",
        tie_word_embeddings=bool(cfg["llm_config"].get("tie_word_embeddings", False)),
    )


def convert_vlm_state(state: dict[str, torch.Tensor], vision_hidden: int,
                      internlm2_config=None) -> dict[str, torch.Tensor]:
    """Sa2VA's vision_model.* / language_model.* / mlp1.* -> InternVLForConditionalGeneration keys.
    `internlm2_config`: the text config (LlamaConfig) when the LLM is InternLM2, whose weights are then renamed and
    split into Llama's."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(PREFIX_VISION):
            name = key[len(PREFIX_VISION):]
            for pattern, repl in _VISION_RENAMES:
                name = re.sub(pattern, repl, name)
            name = "model.vision_tower." + name
            if ".attention.qkv." in name:  # fused [q; k; v] rows
                if value.shape[0] != 3 * vision_hidden:
                    raise ConfigError(f"{key}: {tuple(value.shape)} is not a fused qkv of width {vision_hidden}")
                for part, chunk in zip("qkv", value.split(vision_hidden, dim=0)):
                    out[name.replace(".qkv.", f".{part}_proj.")] = chunk.contiguous()
                continue
            out[name] = value
        elif key.startswith(PREFIX_LLM):
            name = key[len(PREFIX_LLM):]
            renamed = ({name: value} if internlm2_config is None
                       else internlm2_weights(key, name, value, internlm2_config))
            for new, tensor in renamed.items():
                if new.startswith("model."):
                    out["model.language_model." + new[len("model."):]] = tensor
                elif new.startswith("lm_head."):
                    out[new] = tensor
                else:
                    raise ConfigError(f"{key}: unexpected language-model weight")
        elif key.startswith(PREFIX_PROJECTOR):
            index, _, rest = key[len(PREFIX_PROJECTOR):].partition(".")
            if index not in _PROJECTOR_RENAMES:
                raise ConfigError(f"{key}: unexpected projector weight")
            out[f"model.multi_modal_projector.{_PROJECTOR_RENAMES[index]}.{rest}"] = value
    return out


def qwen_layout(state: dict[str, torch.Tensor], family: str = QWEN2_5_VL) -> str:
    """Which QWEN_LAYOUTS key the VLM weights of a Sa2VA-Qwen2_5-VL / -Qwen3-VL checkpoint (`model.*`) are saved in,
    told by where the vision tower is: `model.visual.` (transformers < 4.52) or `model.model.visual.` (>= 4.52); one
    the family was never saved in (Qwen3-VL: < 4.52) is an error."""
    name = QWEN_FAMILIES[family].name
    old = any(k.startswith("model.visual.") for k in state)
    new = any(k.startswith(("model.model.visual.", "model.model.language_model.")) for k in state)
    if old and new:
        raise ConfigError(f"the {name} weights mix two layouts: model.visual.* (transformers < 4.52) and "
                          "model.model.visual.* / model.model.language_model.* (>= 4.52)")
    if not (old or new):
        raise ConfigError(f"no {name} vision weights (model.visual.* or model.model.visual.*) in the checkpoint")
    layout = "transformers<4.52" if old else "transformers>=4.52"
    if layout not in QWEN_FAMILIES[family].layouts:
        raise ConfigError(f"the {name} weights are in the {layout} layout (model.visual.*, model.model.* = the "
                          f"LLM), which {name} was never saved in (expected model.model.visual.*, "
                          "model.model.language_model.*, model.lm_head.weight)")
    return layout


def convert_qwen_state(state: dict[str, torch.Tensor],
                       family: str = QWEN2_5_VL) -> tuple[dict[str, torch.Tensor], str]:
    """Sa2VAChatModelQwen's `model.*` weights -> the installed Qwen2_5_VLForConditionalGeneration's /
    Qwen3VLForConditionalGeneration's keys (`model.visual.*`, `model.language_model.*`, `lm_head.weight`), the
    tensors unchanged; and the source layout. A key outside the layout's vision tower, LLM body (embed_tokens,
    layers, norm) and LM head is an error."""
    layout = qwen_layout(state, family)
    (vision_from, vision_to), (llm_from, llm_to), (head_from, head_to) = QWEN_LAYOUTS[layout]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(vision_from):
            out[vision_to + key[len(vision_from):]] = value
        elif key.startswith(llm_from) and key[len(llm_from):].startswith(QWEN_LLM_PARTS):
            out[llm_to + key[len(llm_from):]] = value
        elif key == head_from + "weight":
            out[head_to + "weight"] = value
        else:
            raise ConfigError(f"{key}: unexpected {QWEN_FAMILIES[family].name} weight (the checkpoint's layout is "
                              f"{layout}: {vision_from}*, {llm_from}{{embed_tokens,layers,norm}}.*, {head_from}weight)")
    return out, layout


def _fields(config_cls) -> set[str]:
    """The settings a transformers config class declares itself (not PreTrainedConfig's generic ones)."""
    return set(inspect.get_annotations(config_cls))


def qwen_vl_config(cfg: dict, cfg_file: Path | str = "config.json", family: str = QWEN2_5_VL):
    """The transformers Qwen2_5_VLConfig / Qwen3VLConfig of a Sa2VA-Qwen2_5-VL / -Qwen3-VL config
    (Sa2VAChatConfigQwen over that config class, saved by transformers 4.x): its architecture settings only (Sa2VA's
    `template`, auto_map, dtype, attention implementation and PreTrainedConfig's generic keys are left out, bos/eos
    kept). The text settings are `text_config`'s where there is one (then stale top-level copies, e.g. the base
    model's vocab_size, are ignored), else the top level's (older Qwen2_5_VLConfig; a Qwen3VLConfig always nests
    them); RoPE (rope_theta, rope_scaling with mrope_section and Qwen3-VL's mrope_interleaved, or rope_parameters) as
    given and checked after transformers read it. `tie_word_embeddings` absent is the transformers 4.x default of the
    family's config (Qwen2.5-VL tied, Qwen3-VL not). Errors name the file and the family."""
    import transformers

    fam = QWEN_FAMILIES[family]
    config_cls = getattr(transformers, f"{fam.cls}Config")
    text_cls, vision_cls = config_cls.sub_configs["text_config"], config_cls.sub_configs["vision_config"]
    where = f"{cfg_file}: a Sa2VA model on {fam.name} ({(cfg.get('architectures') or ['?'])[0]}, as {fam.examples})"
    nested = isinstance(cfg.get("text_config"), dict)
    if fam.nested_only and not nested:
        raise ConfigError(f"{where}: no text_config (a {fam.cls}Config holds the text settings in text_config)")
    source = cfg["text_config"] if nested else cfg
    text = {k: v for k, v in source.items()
            if k in _fields(text_cls) | {"rope_scaling", "rope_theta", "bos_token_id", "eos_token_id"}}
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size") if k not in text]
    if missing:
        raise ConfigError(f"{where}: the text settings ({'text_config' if nested else 'top level'}) lack {missing}")
    rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    if "mrope_section" not in rope:
        raise ConfigError(f"{where}: no mrope_section in the text settings' rope_scaling / rope_parameters "
                          f"({fam.name}'s multimodal RoPE)")
    if "mrope_interleaved" in rope and bool(rope["mrope_interleaved"]) != fam.interleaved:
        raise ConfigError(f"{where}: mrope_interleaved {rope['mrope_interleaved']}, but transformers' {fam.name} "
                          f"{'always' if fam.interleaved else 'never'} interleaves its multimodal RoPE")
    v = dict(cfg["vision_config"])
    for old, new in (("in_chans", "in_channels"), ("spatial_patch_size", "patch_size")):  # older configs' names
        if old in v:
            v.setdefault(new, v[old])
            if v[new] != v[old]:
                raise ConfigError(f"{where}: vision_config {old} {v[old]} != {new} {v[new]}")
    vision = {k: x for k, x in v.items() if k in _fields(vision_cls)}
    tied = source.get("tie_word_embeddings", cfg.get("tie_word_embeddings", fam.tied_default))
    ids = {k: cfg.get(k, source.get(k)) for k in QWEN_TOKEN_IDS if cfg.get(k, source.get(k)) is not None}
    config = config_cls(text_config=text, vision_config=vision, tie_word_embeddings=bool(tied), **ids)
    got = config.text_config.rope_parameters
    want_theta = rope.get("rope_theta", text.get("rope_theta"))
    if list(got.get("mrope_section", [])) != list(rope["mrope_section"]) or \
            ("mrope_interleaved" in rope and got.get("mrope_interleaved") != rope["mrope_interleaved"]) or \
            (want_theta is not None and float(got["rope_theta"]) != float(want_theta)):
        raise ConfigError(f"{where}: transformers read the RoPE settings as {got} (given {rope}, rope_theta "
                          f"{want_theta})")
    t = config.text_config
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads  # Qwen3: explicit head_dim
    if 2 * sum(got["mrope_section"]) != head_dim:
        raise ConfigError(f"{where}: mrope_section {got['mrope_section']} does not split the head dimension "
                          f"{head_dim} (twice its sum must be it)")
    return config


def qwen2_5_vl_config(cfg: dict, cfg_file: Path | str = "config.json"):
    """qwen_vl_config of a Sa2VA-Qwen2_5-VL config: a Qwen2_5_VLConfig."""
    return qwen_vl_config(cfg, cfg_file, QWEN2_5_VL)


def qwen3_vl_config(cfg: dict, cfg_file: Path | str = "config.json"):
    """qwen_vl_config of a Sa2VA-Qwen3-VL config: a Qwen3VLConfig."""
    return qwen_vl_config(cfg, cfg_file, QWEN3_VL)


def check_qwen_tokens(config, vocab: dict[str, int], where: Path) -> None:
    """The config's image/video/vision marker ids are the tokenizer's ids of those tokens (where it has them)."""
    wrong = [(k, getattr(config, k), token, vocab[token]) for k, token in QWEN_TOKEN_IDS.items()
             if token in vocab and getattr(config, k) != vocab[token]]
    if wrong:
        raise ConfigError(f"{where}: config token ids differ from the tokenizer's (setting, config, token, "
                          f"tokenizer): {wrong}")


def split_state(state: dict[str, torch.Tensor], family: str = INTERNVL) -> tuple[dict, dict, dict]:
    """(VLM weights, SAM2 weights without their prefix, [SEG] projection weights); any other key is an error.
    The VLM weights are vision_model.* / language_model.* / mlp1.* (INTERNVL) or model.* (QWEN2_5_VL, QWEN3_VL)."""
    prefixes = (PREFIX_VISION, PREFIX_LLM, PREFIX_PROJECTOR) if family == INTERNVL else (PREFIX_QWEN,)
    vlm, sam2, seg = {}, {}, {}
    for key, value in state.items():
        if key.startswith(prefixes):
            vlm[key] = value
        elif key.startswith(PREFIX_SAM2):
            sam2[key[len(PREFIX_SAM2):]] = value
        elif key.startswith(PREFIX_SEG):
            seg[key[len(PREFIX_SEG):]] = value
        elif family == INTERNVL:
            raise ConfigError(f"unexpected weight {key!r} in the Sa2VA checkpoint (not vision_model, "
                              "language_model, mlp1, grounding_encoder.sam2_model or text_hidden_fcs)")
        else:
            fam = QWEN_FAMILIES[family]
            raise ConfigError(f"unexpected weight {key!r} in the {fam.release} checkpoint (not model (the "
                              f"{fam.name}), grounding_encoder.sam2_model or text_hidden_fcs)")
    return vlm, sam2, seg


def _tokenizer_config(src: Path) -> dict:
    f = src / "tokenizer_config.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def load_tokenizer(src: Path, override: Path | None = None):
    """The release's tokenizer without its remote code: an InternLM2Tokenizer rebuilt
    (`internlm2.rebuild_tokenizer`), any other through AutoTokenizer; `override` (--tokenizer DIR) replaces it, if
    its added tokens have the release's ids."""
    from transformers import AutoTokenizer

    tcfg = _tokenizer_config(src)
    if override is None and str(tcfg.get("tokenizer_class", "")).startswith("InternLM2Tokenizer"):
        return internlm2.rebuild_tokenizer(src, tcfg)
    where = override or src
    try:
        # trust_remote_code=False: a release's config.json names its remote code (auto_map), which AutoTokenizer would
        # otherwise offer to run (an interactive prompt); the tokenizer itself is a transformers class
        tokenizer = AutoTokenizer.from_pretrained(str(where), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - re-raised with the directory named
        raise ConfigError(f"{'--tokenizer' if override else '--checkpoint'} {where}: cannot load its tokenizer: "
                          f"{e}") from e
    if override is not None:
        wrong = [(t["content"], int(i), tokenizer.convert_tokens_to_ids(t["content"]))
                 for i, t in (tcfg.get("added_tokens_decoder") or {}).items()
                 if tokenizer.convert_tokens_to_ids(t["content"]) != int(i)]
        if wrong:
            raise ConfigError(f"--tokenizer {override}: ids differ from the release's (token, release, given): "
                              f"{wrong[:5]}")
    return tokenizer


def _materialize(model_cls, config, state: dict[str, torch.Tensor], what: str):
    """A transformers model holding exactly `state` (built on the meta device, then assigned: no second copy)."""
    with torch.device("meta"):
        model = model_cls(config)
    expected = model.state_dict()
    # a tied LM head is the embedding: a checkpoint may or may not store it
    tied = {"lm_head.weight"} & set(expected) - set(state) if getattr(config, "tie_word_embeddings", False) else set()
    missing = [k for k in expected if k not in state and k not in tied]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ConfigError(f"{what}: the converted weights do not fit the model (missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]})")
    wrong = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in state.items() if v.shape != expected[k].shape]
    if wrong:
        raise ConfigError(f"{what}: shape mismatch (key, checkpoint, model): {wrong[:5]}")
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.tie_weights()
    return model


def _internvl_vlm(src: Path, cfg: dict, vlm_state: dict[str, torch.Tensor], tokenizer, vocab: dict[str, int]):
    """(InternVLForConditionalGeneration, export.json entries) of an InternVL-based release."""
    from transformers import InternVLForConditionalGeneration

    from .tokenizer import IMG_CONTEXT

    config = internvl_config(cfg, vocab[IMG_CONTEXT])
    if len(tokenizer) > config.text_config.vocab_size:
        raise ConfigError(f"{src}: the tokenizer has {len(tokenizer)} ids, the LLM's embedding "
                          f"{config.text_config.vocab_size} rows")
    internlm2_config = config.text_config if cfg["llm_config"]["architectures"][0] == INTERNLM2 else None
    vlm_converted = convert_vlm_state(vlm_state, config.vision_config.hidden_size, internlm2_config)
    head, embed = vlm_converted.get("lm_head.weight"), vlm_converted.get("model.language_model.embed_tokens.weight")
    if config.tie_word_embeddings and head is not None and not torch.equal(head, embed):
        config.tie_word_embeddings = config.text_config.tie_word_embeddings = False  # a trained, separate head
    vlm = _materialize(InternVLForConditionalGeneration, config, vlm_converted, f"{src} (VLM)")
    return vlm, {"llm": cfg["llm_config"]["architectures"][0]}


def _qwen_vlm(src: Path, cfg: dict, vlm_state: dict[str, torch.Tensor], tokenizer, vocab: dict[str, int],
              seg: dict[str, torch.Tensor], family: str = QWEN2_5_VL):
    """(Qwen2_5_VLForConditionalGeneration / Qwen3VLForConditionalGeneration, export.json entries) of a
    Sa2VA-Qwen2_5-VL / -Qwen3-VL release. The LM head is tied to the embedding where the checkpoint stores none, or
    stores the embedding itself and the config ties them; otherwise it is the stored head (a trained head differing
    from the embedding is kept)."""
    import transformers

    fam = QWEN_FAMILIES[family]
    config = qwen_vl_config(cfg, src / "config.json", family)
    check_qwen_tokens(config, vocab, src / "config.json")
    if len(tokenizer) > config.text_config.vocab_size:
        raise ConfigError(f"{src}: the tokenizer has {len(tokenizer)} ids, the LLM's embedding "
                          f"{config.text_config.vocab_size} rows")
    if seg["0.weight"].shape[1] != config.text_config.hidden_size:
        raise ConfigError(f"{src}: the [SEG] projection's input width {seg['0.weight'].shape[1]} is not the LLM's "
                          f"hidden size {config.text_config.hidden_size}")
    converted, layout = convert_qwen_state(vlm_state, family)
    head, embed = converted.get("lm_head.weight"), converted.get("model.language_model.embed_tokens.weight")
    tied = head is None or (config.tie_word_embeddings and embed is not None and torch.equal(head, embed))
    config.tie_word_embeddings = bool(tied)
    if tied:
        converted.pop("lm_head.weight", None)  # _materialize ties lm_head to the embedding
    vlm = _materialize(getattr(transformers, f"{fam.cls}ForConditionalGeneration"), config, converted, f"{src} (VLM)")
    return vlm, {"llm": fam.llm, "weight_layout": layout, "lm_head": "tied" if tied else "separate",
                 "lm_head_stored": head is not None}


def convert(src: str | Path, out: str | Path, *, dtype: str | None = None,
            tokenizer: str | Path | None = None, overwrite: bool = False) -> dict:
    import shutil

    from safetensors.torch import save_file
    from transformers import Sam2Model

    from .convert_sam2 import convert_sam2_state_dict, detect_variant, sam2_config
    from .tokenizer import IMG_CONTEXT, NEW_SPECIAL_TOKENS

    src, out = Path(src), Path(out).absolute()
    if not src.is_dir():
        raise ConfigError(f"--checkpoint {src}: directory not found")
    check_new_output(out, overwrite, marker="export.json", what="a conversion")
    cfg, state = read_checkpoint(src)
    family = vlm_family(cfg, src / "config.json")
    if family == INTERNVL:
        llm_model_type(cfg)  # an unsupported LLM fails before any work
    tokenizer = load_tokenizer(src, Path(tokenizer) if tokenizer is not None else None)
    vocab = tokenizer.get_vocab()
    required = (IMG_CONTEXT, *NEW_SPECIAL_TOKENS) if family == INTERNVL else (*NEW_SPECIAL_TOKENS, *QWEN_TOKENS)
    absent = [t for t in required if t not in vocab]
    if absent:
        raise ConfigError(f"{src}: the tokenizer lacks {absent} (not a Sa2VA tokenizer?)")
    if dtype is not None:
        cast = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        state = {k: v.to(cast) if v.is_floating_point() else v for k, v in state.items()}

    vlm_state, sam2_state, seg = split_state(state, family)
    if set(seg) != {"0.weight", "0.bias", "2.weight", "2.bias"}:
        raise ConfigError(f"{src}: text_hidden_fcs weights {sorted(seg)}; expected Linear, ReLU, Linear")
    if family == INTERNVL:
        vlm, about = _internvl_vlm(src, cfg, vlm_state, tokenizer, vocab)
        conventions = SA2VA_MODEL
    else:
        vlm, about = _qwen_vlm(src, cfg, vlm_state, tokenizer, vocab, seg, family)
        conventions = QWEN_FAMILIES[family].conventions
    sam2_converted, dropped = convert_sam2_state_dict(sam2_state)
    sam2 = _materialize(Sam2Model, sam2_config(detect_variant(sam2_state)), sam2_converted, f"{src} (SAM2)")
    if seg["2.weight"].shape[0] != sam2.config.mask_decoder_config.hidden_size:
        raise ConfigError(f"{src}: the [SEG] projection's output width {seg['2.weight'].shape[0]} is not SAM2's "
                          f"prompt width {sam2.config.mask_decoder_config.hidden_size}")

    written = {"source": str(src), "converted_from": "sa2va", "vlm_family": family, "vlm_path": str(out / "vlm"),
               "sam2_path": str(out / "sam2"), "seg_projection": str(out / "seg_projection.safetensors"),
               **about, "sam2_variant": detect_variant(sam2_state),
               "sam2_memory_weights_left_out": len(dropped), **conventions,
               "train_with": pretrained_overrides(out, conventions)}
    with staged_directory(out, what="a conversion") as stage:  # a full disk leaves nothing that looks complete
        vlm.save_pretrained(str(stage / "vlm"), safe_serialization=True)
        tokenizer.save_pretrained(str(stage / "vlm"))
        if family in QWEN_FAMILIES and (src / "preprocessor_config.json").is_file():
            # the release's Qwen-VL image processor settings (patch/merge sizes, mean/std), as it has them
            shutil.copyfile(src / "preprocessor_config.json", stage / "vlm" / "preprocessor_config.json")
        sam2.save_pretrained(str(stage / "sam2"), safe_serialization=True)
        save_file({k: v.contiguous() for k, v in seg.items()}, str(stage / "seg_projection.safetensors"))
        (stage / "export.json").write_text(json.dumps(written, indent=1))
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dualloop convert-sa2va", description=__doc__.split("\n\nSupported")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a Sa2VA checkpoint directory (config.json, *.safetensors)")
    p.add_argument("--out", required=True, help="output directory (vlm/, sam2/, seg_projection.safetensors)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: as stored")
    p.add_argument("--tokenizer", default=None,
                   help="a tokenizer directory to use instead of the release's (its added tokens must have the "
                        "release's ids), e.g. where the InternLM2 tokenizer.model has settings not rebuilt here")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier conversion in --out (only once the new one is complete)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        written = convert(args.checkpoint, args.out, dtype=args.dtype, tokenizer=args.tokenizer,
                          overwrite=args.overwrite)
    except ValueError as e:  # ConfigError, and the SAM2 converter's errors
        print(f"dualloop convert-sa2va: {e}", file=sys.stderr)
        return 2
    print(json.dumps(written, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
