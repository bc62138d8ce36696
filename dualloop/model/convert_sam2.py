"""SAM2 weights in the original facebookresearch layout (as stored in Sa2VA's checkpoints under
`grounding_encoder.sam2_model.`, prefix removed) -> transformers `Sam2Model` (image model: vision encoder, prompt
encoder, mask decoder, no-memory embedding).

- `convert_sam2_state_dict(state)` -> (converted, dropped): every key is renamed, or dropped when it belongs to the
  video/memory part the image model has no place for; any other key is an error (nothing is dropped silently).
- `sam2_config(variant)`: the transformers config of a SAM2 (2.0) hiera variant, `hiera_sam2_config(...)` the same
  for any hiera shape (the values of the original yaml configs + the settings Sa2VA builds its SAM2 with:
  high-res features, object-score MLP, sigmoid IoU, dynamic multimask via stability 0.05 / 0.98).
- `detect_variant(state)`: the variant of an original state dict, from its patch embedding width and stage lengths.

Layout facts (checked against transformers' modeling_sam2 by a strict load and a golden forward, see
tests/test_convert_sam2.py): the only change of shape is the prompt encoder's four (1, C) point embeddings, which
become one (4, C) table; the random-Fourier matrix of the prompt encoder is also the model's
`shared_image_embedding`; MLPs `layers.0 .. layers.{n-1}` become `proj_in`, `layers.0 .. layers.{n-3}`, `proj_out`.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from transformers import Sam2Config

# (embed_dim, num_heads, stages, global_att_blocks, window_spec, window_pos_embed_bkg_spatial_size) of the SAM2 2.0
# yaml configs (sam2_hiera_{t,s,b+,l}.yaml); b+ uses the Hiera defaults.
VARIANTS: dict[str, tuple[int, int, list[int], list[int], list[int], list[int]]] = {
    "hiera_t": (96, 1, [1, 2, 7, 2], [5, 7, 9], [8, 4, 14, 7], [7, 7]),
    "hiera_s": (96, 1, [1, 2, 11, 2], [7, 10, 13], [8, 4, 14, 7], [7, 7]),
    "hiera_b+": (112, 2, [2, 3, 16, 3], [12, 16, 20], [8, 4, 14, 7], [14, 14]),
    "hiera_l": (144, 2, [2, 6, 36, 4], [23, 33, 43], [8, 4, 16, 8], [7, 7]),
}

# Video-only parts of the original SAM2Base (memory attention/encoder, object pointers, temporal encodings;
# `no_obj_embed_spatial` exists in SAM2.1 checkpoints).
VIDEO_ONLY_PREFIXES = ("memory_attention.", "memory_encoder.", "mask_downsample.", "obj_ptr_proj.",
                       "obj_ptr_tpos_proj.")
VIDEO_ONLY_KEYS = frozenset({"maskmem_tpos_enc", "no_mem_pos_enc", "no_obj_ptr", "no_obj_embed_spatial"})

_PE = "sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
_POINT = re.compile(r"sam_prompt_encoder\.point_embeddings\.(\d+)\.weight")
# an MLP's linear layers: `<mlp>.layers.<i>.<param>`
_MLP = re.compile(r"(?P<mlp>.*(?:\.mlp|output_hypernetworks_mlps\.\d+|_head))\.layers\.(?P<i>\d+)\.(?P<p>weight|bias)")
_SEQUENTIALS = {  # nn.Sequential indices -> named modules
    "sam_prompt_encoder.mask_downscaling": ("prompt_encoder.mask_embed",
                                            {0: "conv1", 1: "layer_norm1", 3: "conv2", 4: "layer_norm2", 6: "conv3"}),
    "sam_mask_decoder.output_upscaling": ("mask_decoder", {0: "upscale_conv1", 1: "upscale_layer_norm",
                                                           3: "upscale_conv2"}),
}
_SEQ = re.compile(r"(?P<seq>.*)\.(?P<i>\d+)\.(?P<p>weight|bias)")
# whole-key renames, anchored; applied after the MLP/Sequential/point-embedding cases
_TRUNK, _BACKBONE = r"image_encoder\.trunk\.", "vision_encoder.backbone."
_ATTN = (r"sam_mask_decoder\.transformer\.((?:layers\.\d+\.)?"
         r"(?:self_attn|cross_attn_token_to_image|cross_attn_image_to_token|final_attn_token_to_image))")
_RENAMES = [(re.compile(pattern), repl) for pattern, repl in [
    (r"no_mem_embed", "no_memory_embedding"),
    (_TRUNK + r"(pos_embed|pos_embed_window)", _BACKBONE + r"\1"),
    (_TRUNK + r"patch_embed\.proj\.(weight|bias)", _BACKBONE + r"patch_embed.projection.\1"),
    (_TRUNK + r"blocks\.(\d+)\.norm([12])\.(weight|bias)", _BACKBONE + r"blocks.\1.layer_norm\2.\3"),
    (_TRUNK + r"blocks\.(\d+)\.(attn\.qkv|attn\.proj|proj)\.(weight|bias)", _BACKBONE + r"blocks.\1.\2.\3"),
    (r"image_encoder\.neck\.convs\.(\d+)\.conv\.(weight|bias)", r"vision_encoder.neck.convs.\1.\2"),
    (r"sam_prompt_encoder\.(not_a_point_embed|no_mask_embed)\.weight", r"prompt_encoder.\1.weight"),
    (r"sam_mask_decoder\.(iou_token|mask_tokens|obj_score_token)\.weight", r"mask_decoder.\1.weight"),
    (r"sam_mask_decoder\.(conv_s0|conv_s1)\.(weight|bias)", r"mask_decoder.\1.\2"),
    (_ATTN + r"\.([qkv]_proj)\.(weight|bias)", r"mask_decoder.transformer.\1.\2.\3"),
    (_ATTN + r"\.out_proj\.(weight|bias)", r"mask_decoder.transformer.\1.o_proj.\2"),
    (r"sam_mask_decoder\.transformer\.layers\.(\d+)\.norm([1-4])\.(weight|bias)",
     r"mask_decoder.transformer.layers.\1.layer_norm\2.\3"),
    (r"sam_mask_decoder\.transformer\.norm_final_attn\.(weight|bias)",
     r"mask_decoder.transformer.layer_norm_final_attn.\1"),
]]
_MODULE_PREFIXES = [("image_encoder.trunk.", "vision_encoder.backbone."), ("sam_mask_decoder.", "mask_decoder.")]


def is_video_only(key: str) -> bool:
    return key in VIDEO_ONLY_KEYS or key.startswith(VIDEO_ONLY_PREFIXES)


def _rename_module(name: str) -> str | None:
    for old, new in _MODULE_PREFIXES:
        if name.startswith(old):
            return new + name[len(old):]
    return None


def _rename(key: str, mlp_depth: Mapping[str, int]) -> str | None:
    """The transformers name of one original key (None: not a known image-model key)."""
    m = _MLP.fullmatch(key)
    if m and m["mlp"] in mlp_depth:
        mlp, i, n = _rename_module(m["mlp"]), int(m["i"]), mlp_depth[m["mlp"]]
        if mlp is None or n < 2:
            return None
        layer = "proj_in" if i == 0 else "proj_out" if i == n - 1 else f"layers.{i - 1}"
        return f"{mlp}.{layer}.{m['p']}"
    m = _SEQ.fullmatch(key)
    if m and m["seq"] in _SEQUENTIALS:
        module, names = _SEQUENTIALS[m["seq"]]
        name = names.get(int(m["i"]))
        return None if name is None else f"{module}.{name}.{m['p']}"
    for pattern, repl in _RENAMES:
        if pattern.fullmatch(key):
            return pattern.sub(repl, key)
    return None


def convert_sam2_state_dict(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(transformers `Sam2Model` state dict, the original keys dropped as video-only). Raises ValueError naming
    any key that is neither."""
    mlp_depth: dict[str, int] = {}
    for key in state:
        m = _MLP.fullmatch(key)
        if m and not is_video_only(key):
            mlp_depth[m["mlp"]] = max(mlp_depth.get(m["mlp"], 0), int(m["i"]) + 1)

    converted: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    points: dict[int, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        if is_video_only(key):
            dropped.append(key)
        elif key == _PE:
            converted["prompt_encoder.shared_embedding.positional_embedding"] = value
            # the model keeps a second copy for the image-wide positional encoding (not tied)
            converted["shared_image_embedding.positional_embedding"] = value.clone()
        elif m := _POINT.fullmatch(key):
            points[int(m[1])] = value
        elif (new := _rename(key, mlp_depth)) is not None:
            converted[new] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"SAM2 weights: {len(unknown)} key(s) neither in the image model nor a known video-only "
                         f"part: {unknown[:10]}")
    if points:
        if sorted(points) != [0, 1, 2, 3] or any(p.shape[0] != 1 for p in points.values()):
            raise ValueError(f"SAM2 weights: point embeddings {sorted(points)} with shapes "
                             f"{[tuple(p.shape) for p in points.values()]}; expected 0..3 of shape (1, C)")
        converted["prompt_encoder.point_embed.weight"] = torch.cat([points[i] for i in range(4)])
    return converted, sorted(dropped)


def hiera_sam2_config(embed_dim: int, num_heads: int, stages: list[int], global_att_blocks: list[int],
                      window_spec: list[int], window_pos_embed_bkg_spatial_size: list[int], image_size: int = 1024,
                      d_model: int = 256) -> Sam2Config:
    """transformers config of a SAM2 image model with a hiera backbone, from the original (yaml) parameters.
    Stage widths and heads double per stage (dim_mul = head_mul = 2); the prompt encoder and mask decoder use the
    constants of SAM2Base._build_sam_heads (mlp 2048, 8 heads, IoU head 256, mask_in_chans 16, stride 16)."""
    dims = [embed_dim * 2**i for i in range(len(stages))]
    s = image_size // 4  # patch embedding stride 4; stages halve
    return Sam2Config(
        vision_config=dict(
            model_type="sam2_vision_model",
            backbone_config=dict(
                model_type="sam2_hiera_det_model", hidden_size=embed_dim, num_attention_heads=num_heads,
                image_size=[image_size, image_size], blocks_per_stage=list(stages), embed_dim_per_stage=dims,
                num_attention_heads_per_stage=[num_heads * 2**i for i in range(len(stages))],
                window_size_per_stage=list(window_spec), global_attention_blocks=list(global_att_blocks),
                window_positional_embedding_background_size=list(window_pos_embed_bkg_spatial_size),
            ),
            backbone_channel_list=list(reversed(dims)),
            backbone_feature_sizes=[[s, s], [s // 2, s // 2], [s // 4, s // 4]],
            fpn_hidden_size=d_model, fpn_top_down_levels=[2, 3], num_feature_levels=3,
        ),
        prompt_encoder_config=dict(hidden_size=d_model, image_size=image_size, patch_size=16, mask_input_channels=16),
        mask_decoder_config=dict(
            hidden_size=d_model, mlp_dim=2048, num_hidden_layers=2, num_attention_heads=8,
            attention_downsample_rate=2, num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=256,
            dynamic_multimask_via_stability=True, dynamic_multimask_stability_delta=0.05,
            dynamic_multimask_stability_thresh=0.98,
        ),
    )


def sam2_config(variant: str) -> Sam2Config:
    """transformers config of a SAM2 (2.0) variant at 1024 px: hiera_t, hiera_s, hiera_b+, hiera_l."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown SAM2 variant {variant!r}; known: {', '.join(VARIANTS)}")
    return hiera_sam2_config(*VARIANTS[variant])


def detect_variant(state: Mapping[str, torch.Tensor]) -> str:
    """The SAM2 variant of original-layout weights: patch embedding width and blocks per stage (a stage's first
    block, after the first stage, is the one with a `proj` that widens the residual)."""
    patch = state.get("image_encoder.trunk.patch_embed.proj.weight")
    if patch is None:
        raise ValueError("SAM2 weights: no image_encoder.trunk.patch_embed.proj.weight (not the original SAM2 layout, "
                         "or the `grounding_encoder.sam2_model.` prefix was not removed)")
    blocks, stage_starts = set(), [0]
    for key in state:
        if m := re.fullmatch(r"image_encoder\.trunk\.blocks\.(\d+)\.(.*)", key):
            blocks.add(int(m[1]))
            if m[2] == "proj.weight":
                stage_starts.append(int(m[1]))
    n = max(blocks) + 1 if blocks else 0
    bounds = sorted(set(stage_starts)) + [n]
    stages = [b - a for a, b in zip(bounds, bounds[1:])]
    embed = int(patch.shape[0])
    for name, (dim, _, want, *_rest) in VARIANTS.items():
        if dim == embed and stages == want:
            return name
    raise ValueError(f"SAM2 weights: unknown hiera shape (embed dim {embed}, blocks per stage {stages}); known: "
                     + ", ".join(f"{k} ({v[0]}, {v[2]})" for k, v in VARIANTS.items()))


__all__ = ["VARIANTS", "convert_sam2_state_dict", "detect_variant", "hiera_sam2_config", "is_video_only",
           "sam2_config"]
