"""SAM2 weights, original (Sa2VA) layout -> transformers `Sam2Model`: renames, dropped video-only keys, the variant
table, and a golden forward against Sa2VA's own SAM2 code.

The golden (tests/fixtures/sam2_golden_tiny.json) was made once, outside this repository, with Sa2VA's own SAM2
code: bytedance/Sa2VA@9832e1a80e74ed513e8072bf882a09bdd80566c4, projects/sa2va/hf/models/sam2.py (the file the HF
releases ship; SAM2VideoPredictor with the keyword arguments of its `SAM2.__init__`, i.e. the SAM2 2.0 settings
Sa2VA uses), on a tiny hiera built with that file's classes (Hiera, FpnNeck, ImageEncoder, MemoryAttention,
MemoryEncoder) at 128 px, decoder width 32, with weights `golden_weights.make_weights(fixture keys, seed)`. The
expected values come from Sa2VA's image path, as `SAM2.inject_language_embd` runs it: `init_state(images)`, then per
frame and object `add_language_embd` (a first-frame, memory-free step: features + no_mem_embed, one padding point,
sparse = cat(points, language_embd), multimask output), read at the mask decoder's output (all 3 low-res mask logits
and the sigmoid IoU) by a forward hook; the script also checked that the mask `add_language_embd` returns is the
argmax-IoU one and that `language_embd_inference` (the predict path, via propagate_in_video) returns it bilinearly
upsampled to the image size. The images are `RandomState(image_seed).randint(0, 256)` uint8 at 128 px, normalised as
`SAM2.preprocess_image` does (/255, ImageNet mean/std, fp32); the prompts are
`RandomState(prompt_seed).standard_normal((images, prompts, width))`, frame i / object j -> prompt [i, j]. The
fixture also lists the keys and shapes of the real hiera-L model (`SAM2()` of that file), for a shape-only check. No
foreign code is in this repository.

Our side is `DualLoopModel._decode_masks` itself, on a minimal host object (the attributes it reads), with the same
pixels (no resize at 128 px, so `_pixels` is /255 + ImageNet norm) and the 4 (image, prompt) rows batched. Sa2VA's
path and `_decode_masks` were found to compute the same thing (same padding point, language embedding appended as
the last sparse token, no_mem_embed added to the stride-16 features, conv_s0/conv_s1 on the high-res levels,
multimask output and sigmoid IoU; Sa2VA keeps the argmax-IoU mask, as multimask="best"), so the comparison is end to
end. Two of the four rows have a negative object score: Sa2VA's `_forward_sam_heads` override has SAM2's "no object
-> logits -1024" replacement commented out and `_decode_masks` has none, so their logits are compared as they are.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from golden_weights import make_weights
from transformers import Sam2Model

from dualloop.model.composite import IMAGENET_MEAN, IMAGENET_STD, DualLoopModel
from dualloop.model.convert_sam2 import (
    VARIANTS,
    convert_sam2_state_dict,
    detect_variant,
    hiera_sam2_config,
    sam2_config,
)

FIXTURE = Path(__file__).parent / "fixtures" / "sam2_golden_tiny.json"


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(FIXTURE.read_text())


class _Host:
    """What `DualLoopModel._decode_masks` (and the `_pixels` it calls) read from `self`."""

    distinct_images = staticmethod(DualLoopModel.distinct_images)
    _pixels = DualLoopModel._pixels

    def __init__(self, sam2: Sam2Model):
        self.sam2 = sam2
        self.device = torch.device("cpu")
        self.sam2_size = int(sam2.config.prompt_encoder_config.image_size)
        self.sam2_resize = "bilinear"
        self.pixel_mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.pixel_std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _meta_state(shapes: list[list]) -> dict[str, torch.Tensor]:
    return {name: torch.empty(shape, device="meta") for name, shape, *_ in shapes}


def test_golden_forward_matches_sa2va(golden):
    state = make_weights(golden["keys"], golden["seeds"]["weights"])
    converted, dropped = convert_sam2_state_dict(state)
    assert dropped and all(k not in converted for k in dropped)
    sam2 = Sam2Model(hiera_sam2_config(**golden["config"])).eval()
    sam2.load_state_dict(converted, strict=True)  # every transformers key filled, nothing left over

    inputs = golden["inputs"]
    pixels = np.random.RandomState(golden["seeds"]["images"]).randint(0, 256, size=inputs["image_shape"])
    images = [torch.from_numpy(p.astype(np.uint8)) for p in pixels]
    prompts = np.random.RandomState(golden["seeds"]["prompts"]).standard_normal(inputs["prompt_shape"])
    n_img, n_obj = prompts.shape[:2]
    rows = [images[i] for i in range(n_img) for _ in range(n_obj)]  # the same image object twice: encoded once
    seg = torch.from_numpy(prompts.reshape(n_img * n_obj, -1).astype(np.float32))
    with torch.no_grad():
        out = DualLoopModel._decode_masks(_Host(sam2), rows, seg, "all")
        best = DualLoopModel._decode_masks(_Host(sam2), rows, seg, "best")

    want_masks = torch.tensor(golden["expected"]["low_res_masks"]).flatten(0, 1)  # [4, 3, 32, 32]
    want_iou = torch.tensor(golden["expected"]["iou"]).flatten(0, 1)  # [4, 3]
    assert out.logits.shape == want_masks.shape and out.iou_pred.shape == want_iou.shape
    scale = want_masks.abs().max()
    assert scale > 1.0  # a non-degenerate golden
    object_scores = torch.tensor(golden["expected"]["object_score_logits"])
    assert object_scores.min() < 0 < object_scores.max()  # both kinds of rows; neither gets -1024
    # the object score that `model.object_gate` reads is Sa2VA's SAM2's (which does not gate: its rows stay as they are)
    torch.testing.assert_close(out.object_score, object_scores.flatten().float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(best.object_score, out.object_score)
    assert (out.logits - want_masks).abs().max() <= 1e-4 * scale
    assert (out.iou_pred - want_iou).abs().max() <= 1e-5
    idx = torch.tensor(golden["expected"]["best_index"]).flatten()
    assert torch.equal(best.logits, out.logits[torch.arange(len(idx)), idx])


def test_video_only_keys_are_dropped_and_listed(golden):
    state = _meta_state(golden["keys"])
    converted, dropped = convert_sam2_state_dict(state)
    assert dropped == sorted(dropped)
    prefixes = {k.split(".")[0] for k in dropped}
    assert prefixes == {"memory_attention", "memory_encoder", "mask_downsample", "obj_ptr_proj", "maskmem_tpos_enc",
                        "no_mem_pos_enc", "no_obj_ptr"}
    # 4 point embeddings -> 1 table; the Fourier matrix is also the shared image embedding
    assert len(converted) + len(dropped) == len(state) - 4 + 1 + 1
    assert tuple(converted["prompt_encoder.point_embed.weight"].shape) == (4, golden["config"]["d_model"])


def test_unknown_key_is_an_error(golden):
    state = _meta_state(golden["keys"])
    state["sam_mask_decoder.something_new.weight"] = torch.empty(3, device="meta")
    with pytest.raises(ValueError, match=r"sam_mask_decoder\.something_new\.weight"):
        convert_sam2_state_dict(state)
    state = _meta_state(golden["keys"])
    state["image_encoder.trunk.blocks.0.norm3.weight"] = torch.empty(3, device="meta")
    with pytest.raises(ValueError, match=r"blocks\.0\.norm3\.weight"):
        convert_sam2_state_dict(state)


def test_hiera_l_checkpoint_layout_fits_sam2_config(golden):
    """The real Sa2VA SAM2 (hiera-L) key list: detected as hiera_l, and its conversion fills sam2_config('hiera_l')
    exactly, shape for shape (all on the meta device: no allocation)."""
    state = _meta_state(golden["hiera_l_keys"])
    assert detect_variant(state) == "hiera_l"
    converted, dropped = convert_sam2_state_dict(state)
    with torch.device("meta"):
        model = Sam2Model(sam2_config("hiera_l"))
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == want
    assert len(dropped) == len(state) - (len(converted) - 1 - 1 + 4)
    dec = model.config.mask_decoder_config
    assert (dec.dynamic_multimask_via_stability, dec.dynamic_multimask_stability_delta,
            dec.dynamic_multimask_stability_thresh) == (True, 0.05, 0.98)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_detect_variant_round_trip(variant):
    """Each config's backbone shape (transformers model on meta) is detected as that variant from original names."""
    with torch.device("meta"):
        backbone = Sam2Model(sam2_config(variant)).vision_encoder.backbone
    state = {"image_encoder.trunk.patch_embed.proj.weight": backbone.patch_embed.projection.weight}
    for i, block in enumerate(backbone.blocks):
        state[f"image_encoder.trunk.blocks.{i}.norm1.weight"] = block.layer_norm1.weight
        if hasattr(block, "proj"):
            state[f"image_encoder.trunk.blocks.{i}.proj.weight"] = block.proj.weight
    assert detect_variant(state) == variant


def test_detect_variant_mismatch(golden):
    state = _meta_state(golden["hiera_l_keys"])
    state["image_encoder.trunk.patch_embed.proj.weight"] = torch.empty(128, 3, 7, 7, device="meta")
    with pytest.raises(ValueError, match="embed dim 128"):
        detect_variant(state)
    state = _meta_state(golden["hiera_l_keys"])
    for key in [k for k in state if k.startswith("image_encoder.trunk.blocks.47.")]:
        del state[key]
    with pytest.raises(ValueError, match=r"blocks per stage \[2, 6, 36, 3\]"):
        detect_variant(state)
    with pytest.raises(ValueError, match="patch_embed"):
        detect_variant({"grounding_encoder.sam2_model.image_encoder.trunk.patch_embed.proj.weight": torch.empty(1)})
    with pytest.raises(ValueError, match="unknown SAM2 variant"):
        sam2_config("hiera_h")
