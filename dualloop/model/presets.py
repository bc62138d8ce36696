"""Model presets: transformers configs of the VLM (InternVL) and SAM2 parts, or local checkpoint directories.

- tiny:            random weights, seconds to build on a CPU; VLM tile 64 px (patch 4 -> 8x8 region grid), SAM2 at
                   128 px (low-res mask logits 32x32); offline word-level tokenizer.
- small:           random weights, a GPU benchmark size (VLM tile 224, 8x8 grid, LLM 512x8; SAM2 hiera-tiny at 512).
- sa2va-1b-shape:  random weights with the layer shapes of InternVL3-1B (InternViT-300M-448px + Qwen2.5-0.5B LLM,
                   vocab 151674) and SAM2-hiera-large at 1024 px, for step-time and memory benchmarks.
- tiny-qwen2_5_vl: `tiny` with a Qwen2.5-VL VLM instead (patch 14, 2 x 2 merge, multimodal RoPE), for tests of that
                   family; give it a small pixel budget (e.g. model.min_pixels=3136 model.max_pixels=12544).
- tiny-qwen3_vl:   the same with a Qwen3-VL VLM (patch 16, DeepStack from the first vision block).
- sa2va-qwen2_5-3b-shape: random weights with the layer shapes of Qwen2.5-VL-3B-Instruct (Sa2VA-Qwen2_5-VL-3B's VLM:
                   32-block windowed ViT + Qwen2.5-3B LLM, vocab 151936) and SAM2-hiera-large at 1024 px, for step-time
                   and memory benchmarks; images follow model.min_pixels/max_pixels (default Sa2VA's budget: a 1024 x
                   1024 image is 37 x 37 = 1369 image tokens).
- sa2va-qwen3-4b-shape: the same with Qwen3-VL-4B-Instruct's shapes (Sa2VA-Qwen3-VL-4B's VLM: 24-block ViT with
                   DeepStack at blocks 5, 11, 17 + Qwen3-4B LLM); a 1024 x 1024 image is 32 x 32 = 1024 image tokens.
- pretrained:      `vlm_path` (an InternVL "-hf", Qwen2.5-VL or Qwen3-VL checkpoint with its tokenizer) and
                   `sam2_path` (a transformers SAM2 checkpoint), both local directories; nothing is downloaded.
"""
from __future__ import annotations

import json
from pathlib import Path

from transformers import InternVLConfig, Qwen2_5_VLConfig, Qwen3VLConfig, Sam2Config

from .tokenizer import build_word_tokenizer
from .vision_families import FAMILIES, QWEN_MARKERS, QWEN_VIDEO

RANDOM_PRESETS = ("tiny", "small", "sa2va-1b-shape", "tiny-qwen2_5_vl", "tiny-qwen3_vl", "sa2va-qwen2_5-3b-shape",
                  "sa2va-qwen3-4b-shape")
# the random presets with a Qwen-VL VLM, and their family (the VLM's model_type)
QWEN_PRESETS = {"tiny-qwen2_5_vl": "qwen2_5_vl", "tiny-qwen3_vl": "qwen3_vl",
                "sa2va-qwen2_5-3b-shape": "qwen2_5_vl", "sa2va-qwen3-4b-shape": "qwen3_vl"}
# Re-initialisation of a few tensors of a random preset after construction (std of a normal):
# - embed: the tiny LLM's (tied) embedding/LM head is frozen by default and its final RMSNorm fixes
#   |h| = sqrt(hidden) = 8, so with std 0.02 the largest reachable logit is ~1.3 and LoRA alone cannot make a
#   confident prediction (caption loss plateaus near log(vocab)); 0.15 leaves headroom.
# - vision_pos: InternViT's position embeddings are zero at init; a frozen random ViT would then give features
#   without any location, and region tokens could not tell "on the left" from "on the right".
RANDOM_REINIT = {"tiny": {"embed": 0.15, "vision_pos": 1.0}, "tiny-qwen2_5_vl": {"embed": 0.15},
                 "tiny-qwen3_vl": {"embed": 0.15}}
PRESETS = (*RANDOM_PRESETS, "pretrained")

_QWEN25_05B = dict(
    model_type="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
    intermediate_size=4864, vocab_size=151674, max_position_embeddings=32768, rope_theta=1000000.0,
    rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu",
)
_INTERNVIT_300M = dict(
    hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, image_size=448,
    patch_size=14, norm_type="layer_norm", use_qk_norm=False, layer_scale_init_value=0.1,
)
# Qwen/Qwen2.5-VL-3B-Instruct's config.json (its vision_config names only hidden_size, out_hidden_size, the patch and
# tokens_per_second: the rest are Qwen2_5_VLVisionConfig's defaults, listed here so a change of defaults cannot move
# them). Text: Qwen2.5-3B with 3-D multimodal RoPE (64 rotary pairs per head: 16 temporal, 24 height, 24 width).
_QWEN25_VL_3B_VISION = dict(
    depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, hidden_act="silu", patch_size=14,
    spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
    out_hidden_size=2048, tokens_per_second=2,
)
_QWEN25_VL_3B_TEXT = dict(
    hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2, intermediate_size=11008,
    vocab_size=151936, max_position_embeddings=128000, rope_theta=1000000.0, mrope_section=[16, 24, 24],
    rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu",
)
# Qwen/Qwen3-VL-4B-Instruct's config.json. Text: Qwen3-4B (head_dim 128 with 32 heads of a 2560-wide model) with
# interleaved multimodal RoPE (24 temporal, 20 height, 20 width pairs).
_QWEN3_VL_4B_VISION = dict(
    depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, hidden_act="gelu_pytorch_tanh", patch_size=16,
    spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17],
    out_hidden_size=2560,
)
_QWEN3_VL_4B_TEXT = dict(
    hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    intermediate_size=9728, vocab_size=151936, max_position_embeddings=262144, rope_theta=5000000.0,
    mrope_section=[24, 20, 20], rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu",
)


def _hiera(image: int, dims: list[int], heads: list[int], blocks: list[int], windows: list[int], glob: list[int],
           fpn: int, win_bg: list[int]) -> dict:
    s = image // 4  # patch embedding stride 4; stages halve
    return dict(
        model_type="sam2_vision_model",
        backbone_config=dict(
            model_type="sam2_hiera_det_model", hidden_size=dims[0], num_attention_heads=heads[0],
            image_size=[image, image], blocks_per_stage=blocks, embed_dim_per_stage=dims,
            num_attention_heads_per_stage=heads, window_size_per_stage=windows, global_attention_blocks=glob,
            window_positional_embedding_background_size=win_bg,
        ),
        backbone_channel_list=list(reversed(dims)),
        backbone_feature_sizes=[[s, s], [s // 2, s // 2], [s // 4, s // 4]],
        fpn_hidden_size=fpn,
    )


def _sam2_hiera_large() -> dict:
    """SAM2-hiera-large at 1024 px (the SAM2 of every Sa2VA release)."""
    return dict(
        vision_config=_hiera(1024, [144, 288, 576, 1152], [2, 4, 8, 16], [2, 6, 36, 4], [8, 4, 16, 8], [23, 33, 43],
                             256, [7, 7]),
        prompt_encoder_config=dict(hidden_size=256, image_size=1024, patch_size=16),
        mask_decoder_config=dict(hidden_size=256),
    )


def _tiny_qwen_vision(text: dict, qwen3: bool) -> dict:
    """The tiny Qwen presets' vision tower: 2 blocks of width 64 (Qwen2.5-VL: 14 px patches, window attention in the
    first block, full in the last; Qwen3-VL: 16 px patches, a learned 8 x 8 position grid, DeepStack from the first
    block)."""
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=text["hidden_size"],
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                  fullatt_block_indexes=[1], initializer_range=0.25)
    if qwen3:
        vision = dict(vision, patch_size=16, num_position_embeddings=64, deepstack_visual_indexes=[0])
        for key in ("window_size", "fullatt_block_indexes"):
            vision.pop(key)
    return vision


def _random_specs(preset: str) -> tuple[dict, dict, dict]:
    """(vision_config, text_config, sam2 config kwargs) for a random preset; text vocab filled in by the caller.

    For a Qwen preset (QWEN_PRESETS) the vision config is its family's and the text config holds `mrope_section`
    (`_qwen_config` turns it into the family's RoPE parameters)."""
    if preset in ("tiny", "tiny-qwen2_5_vl", "tiny-qwen3_vl"):
        # initializer_range 0.25 (HF default 0.02 is scaled for widths of ~1000): at width 64 with 0.02 the
        # attention/MLP outputs are so small that the [SEG] state is ~99.5 % the [SEG] embedding whatever the
        # caption, and the mask decoder learns to ignore its prompt before the LLM learns to fill it.
        vision = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                      image_size=64, patch_size=4, initializer_range=0.25)
        text = dict(model_type="qwen2", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=128, max_position_embeddings=1024,
                    tie_word_embeddings=True, initializer_range=0.25)
        # Mask decoder width 64: its per-pixel mask features have hidden/8 channels (8 here; 4 at width 32 were
        # too few to pick one object out of several by colour, shape and place).
        sam2 = dict(
            vision_config=_hiera(128, [16, 32, 64, 128], [1, 1, 2, 4], [1, 1, 2, 1], [8, 4, 4, 4], [3], 64, [4, 4]),
            prompt_encoder_config=dict(hidden_size=64, image_size=128, patch_size=16),
            mask_decoder_config=dict(hidden_size=64, mlp_dim=128, num_attention_heads=2, iou_head_hidden_dim=64),
        )
        if preset in QWEN_PRESETS:
            qwen3 = QWEN_PRESETS[preset] == "qwen3_vl"
            vision = _tiny_qwen_vision(text, qwen3)
            # multimodal RoPE: the rotary half of each head split into temporal, height and width sections
            half = text["hidden_size"] // text["num_attention_heads"] // 2
            third = half // 3
            text.update(mrope_section=[half - 2 * third, third, third])
            if qwen3:
                text.update(head_dim=2 * half)
    elif preset == "small":
        vision = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536,
                      image_size=224, patch_size=14)
        text = dict(model_type="qwen2", hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                    num_key_value_heads=2, intermediate_size=1408, max_position_embeddings=2048,
                    tie_word_embeddings=True)
        sam2 = dict(
            vision_config=_hiera(512, [96, 192, 384, 768], [1, 2, 4, 8], [1, 2, 7, 2], [8, 4, 14, 7], [5, 7, 9],
                                 256, [7, 7]),
            prompt_encoder_config=dict(hidden_size=256, image_size=512, patch_size=16),
            mask_decoder_config=dict(hidden_size=256),
        )
    elif preset == "sa2va-1b-shape":
        vision, text, sam2 = dict(_INTERNVIT_300M), dict(_QWEN25_05B), _sam2_hiera_large()
    elif preset == "sa2va-qwen2_5-3b-shape":
        vision, text, sam2 = dict(_QWEN25_VL_3B_VISION), dict(_QWEN25_VL_3B_TEXT), _sam2_hiera_large()
    elif preset == "sa2va-qwen3-4b-shape":
        vision, text, sam2 = dict(_QWEN3_VL_4B_VISION), dict(_QWEN3_VL_4B_TEXT), _sam2_hiera_large()
    else:
        raise ValueError(f"model.preset: unknown preset {preset!r}; valid: {', '.join(PRESETS)}")
    return vision, text, sam2


def random_preset(preset: str):
    """(VLM config, Sam2Config, tokenizer) of a random-weight preset."""
    vision, text, sam2 = _random_specs(preset)
    # The shape presets keep the real vocabulary size (embedding/LM-head memory); ids past the word-level
    # tokenizer are never produced by it and decode as <unk>.
    if preset in QWEN_PRESETS:
        tokenizer = build_word_tokenizer(extra_special=(*QWEN_MARKERS, QWEN_VIDEO))
        return _qwen_config(vision, text, tokenizer, QWEN_PRESETS[preset]), Sam2Config(**sam2), tokenizer
    tokenizer = build_word_tokenizer()
    text["vocab_size"] = max(text.get("vocab_size", 0), len(tokenizer))
    grid = (vision["image_size"] // vision["patch_size"]) // 2
    vlm_config = InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=grid * grid, downsample_ratio=0.5, tie_word_embeddings=text["tie_word_embeddings"],
    )
    return vlm_config, Sam2Config(**sam2), tokenizer


def _qwen_config(vision: dict, text: dict, tokenizer, family: str) -> Qwen2_5_VLConfig | Qwen3VLConfig:
    """The Qwen2.5-VL (`family` "qwen2_5_vl") or Qwen3-VL ("qwen3_vl") config of a random preset: its image markers
    are the word-level tokenizer's, the vocabulary the larger of the preset's and the tokenizer's."""
    start, image, end, video = (tokenizer.convert_tokens_to_ids(t) for t in (*QWEN_MARKERS, QWEN_VIDEO))
    text = {k: v for k, v in text.items() if k != "model_type"}
    section = text.pop("mrope_section")
    text.update(vocab_size=max(text.get("vocab_size", 0), len(tokenizer)), bos_token_id=None,
                eos_token_id=tokenizer.eos_token_id)
    if family == "qwen3_vl":  # Qwen3-VL interleaves the three sections over the rotary pairs
        config_cls = Qwen3VLConfig
        text.update(rope_scaling={"rope_type": "default", "mrope_interleaved": True, "mrope_section": section})
    else:
        config_cls = Qwen2_5_VLConfig
        text.update(rope_scaling={"type": "mrope", "mrope_section": section})
    return config_cls(vision_config=dict(vision), text_config=text, image_token_id=image, video_token_id=video,
                      vision_start_token_id=start, vision_end_token_id=end,
                      tie_word_embeddings=text["tie_word_embeddings"])


def vlm_classes(model_type: str):
    """(config class, model class) of a VLM family's transformers model."""
    from transformers import (
        InternVLForConditionalGeneration,
        Qwen2_5_VLForConditionalGeneration,
        Qwen3VLForConditionalGeneration,
    )

    classes = {"internvl": (InternVLConfig, InternVLForConditionalGeneration),
               "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
               "qwen3_vl": (Qwen3VLConfig, Qwen3VLForConditionalGeneration)}
    if model_type not in classes:
        raise ValueError(f"VLM model_type {model_type!r} is not supported (supported: {', '.join(classes)})")
    return classes[model_type]


# model_type values of a part's config.json that load, and what to do with look-alikes users may point at.
# The official facebook/sam2*-hiera-* repos declare "sam2_video" (Sam2VideoModel); Sam2Model loads their image part.
ACCEPTED_MODEL_TYPES = {"vlm_path": tuple(FAMILIES), "sam2_path": ("sam2", "sam2_video")}
_CONVERT_HINTS = {
    "internvl_chat": "an original InternVL checkpoint (remote code): use its transformers release (the '-hf' repo, "
                     "e.g. OpenGVLab/InternVL3-1B-hf) or convert it with transformers' "
                     "models/internvl/convert_internvl_weights_to_hf.py",
    "sa2va_chat": "a Sa2VA release: convert it with `dualloop convert-sa2va --checkpoint DIR --out OUT` and use "
                  "model.vlm_path=OUT/vlm model.sam2_path=OUT/sam2",
}
_SAM2_ORIGINAL_HINT = ("an original SAM2 checkpoint (*.pt): use the transformers files of the facebook/sam2.1-hiera-* "
                       "repos (config.json + model.safetensors) or convert it with transformers' "
                       "models/sam2/convert_sam2_to_hf.py")


def _check_dir(path: str | None, key: str) -> Path:
    if not path:
        raise ValueError(f"model.{key} is required for preset 'pretrained' (a local transformers checkpoint dir)")
    p = Path(path).expanduser()
    if p.is_file():
        hint = f"; {_SAM2_ORIGINAL_HINT}" if p.suffix in (".pt", ".pth") else ""
        raise ValueError(f"model.{key}: {p} is a file; expected a transformers checkpoint directory{hint}")
    if not p.is_dir():
        raise ValueError(f"model.{key}: directory not found: {p}")
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        hint = f"; it holds {_SAM2_ORIGINAL_HINT}" if any(p.glob("*.pt")) or any(p.glob("*.pth")) else ""
        raise ValueError(f"model.{key}: {p} has no config.json (expected a transformers checkpoint directory){hint}")
    try:
        model_type = json.loads(cfg_file.read_text()).get("model_type")
    except json.JSONDecodeError as e:
        raise ValueError(f"model.{key}: {cfg_file} is not valid JSON: {e}") from e
    want = ACCEPTED_MODEL_TYPES[key]
    if model_type not in want:
        hint = f"; this is {_CONVERT_HINTS[model_type]}" if model_type in _CONVERT_HINTS else ""
        raise ValueError(f"model.{key}: {p} holds a '{model_type}' checkpoint; expected model_type "
                         f"{' or '.join(repr(t) for t in want)}{hint}")
    return p


def _untie_if_checkpoint_is_untied(vlm) -> None:
    """InternVL "-hf" configs written by transformers 4.x leave the top-level `tie_word_embeddings` out (so it reads
    True in 5.x) while the LLM's head is untied (InternVL3-1B-hf: text_config without it, i.e. Qwen2's False, and a
    separate lm_head in the weights). from_pretrained keeps the two matrices apart (their values differ), but
    resize_token_embeddings would re-tie them and drop the trained head: make the config say what the weights are."""
    if vlm.lm_head.weight is not vlm.get_input_embeddings().weight:
        vlm.config.tie_word_embeddings = False
        vlm.config.get_text_config().tie_word_embeddings = False


def pretrained_parts(vlm_path: str | None, sam2_path: str | None, dtype):
    """Load (the VLM: InternVL or Qwen2.5-VL, Sam2Model, tokenizer) from local directories only."""
    from transformers import AutoTokenizer, Sam2Model

    vlm_dir = _check_dir(vlm_path, "vlm_path")
    sam2_dir = _check_dir(sam2_path, "sam2_path")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(vlm_dir), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the directory named
        raise ValueError(f"model.vlm_path: cannot load a tokenizer from {vlm_dir}: {e}") from e
    model_type = json.loads((vlm_dir / "config.json").read_text())["model_type"]
    vlm = vlm_classes(model_type)[1].from_pretrained(str(vlm_dir), dtype=dtype, local_files_only=True)
    _untie_if_checkpoint_is_untied(vlm)
    sam2 = Sam2Model.from_pretrained(str(sam2_dir), dtype=dtype, local_files_only=True)
    return vlm, sam2, tokenizer
