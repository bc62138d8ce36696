"""The Qwen shape presets (`sa2va-qwen2_5-3b-shape`, `sa2va-qwen3-4b-shape`): random weights with the layer shapes of
Qwen2.5-VL-3B-Instruct / Qwen3-VL-4B-Instruct + SAM2-hiera-large, for step-time benchmarks on a GPU. Checked here on
the meta device only (no memory, under a second each): their config fields against the real checkpoints' config.json,
their parameter counts against the real models', and what a 1024 x 1024 image costs them in tokens."""
import importlib.util
from pathlib import Path

import pytest
import torch

from dualloop.config import ModelConfig
from dualloop.model import build_model
from dualloop.model.presets import RANDOM_PRESETS, random_preset, vlm_classes

# Parameter counts of the real checkpoints (bf16 safetensors, every tensor counted once; the LM head is tied):
# Qwen/Qwen2.5-VL-3B-Instruct 3,754,622,976 (3.75 B), Qwen/Qwen3-VL-4B-Instruct 4,437,815,808 (4.44 B).
# SAM2.1-hiera-large is 224.4 M with its video memory (memory attention + memory encoder); transformers' Sam2Model,
# the image model Sa2VA's mask decoding uses, has no memory modules and is ~3 % smaller.
REAL_VLM = {"sa2va-qwen2_5-3b-shape": 3_754_622_976, "sa2va-qwen3-4b-shape": 4_437_815_808}
SAM2_L_WITH_MEMORY = 224.4e6

# The fields of the real config.json files (the 3B's vision_config leaves most out: Qwen2_5_VLVisionConfig defaults)
EXPECTED = {
    "sa2va-qwen2_5-3b-shape": dict(
        model_type="qwen2_5_vl",
        vision=dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                    fullatt_block_indexes=[7, 15, 23, 31], out_hidden_size=2048, hidden_act="silu"),
        text=dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                  intermediate_size=11008, vocab_size=151936, rms_norm_eps=1e-6),
        rope=dict(rope_theta=1e6, mrope_section=[16, 24, 24]), head_dim=128, image_tokens_1024=37 * 37,
    ),
    "sa2va-qwen3-4b-shape": dict(
        model_type="qwen3_vl",
        vision=dict(depth=24, hidden_size=1024, num_heads=16, intermediate_size=4096, patch_size=16,
                    spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                    deepstack_visual_indexes=[5, 11, 17], out_hidden_size=2560, hidden_act="gelu_pytorch_tanh"),
        text=dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                  head_dim=128, intermediate_size=9728, vocab_size=151936, rms_norm_eps=1e-6),
        rope=dict(rope_theta=5e6, mrope_section=[24, 20, 20], mrope_interleaved=True), head_dim=128,
        image_tokens_1024=32 * 32,
    ),
}
SHAPE_PRESETS = list(EXPECTED)


def _count(module) -> int:
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())  # tied weights once


@pytest.mark.parametrize("preset", SHAPE_PRESETS)
def test_config_fields_are_the_real_models(preset):
    want = EXPECTED[preset]
    vlm_config, sam2_config, _ = random_preset(preset)
    assert vlm_config.model_type == want["model_type"]
    vision, text = vlm_config.vision_config, vlm_config.text_config
    assert {k: getattr(vision, k) for k in want["vision"]} == want["vision"]
    assert {k: getattr(text, k) for k in want["text"]} == want["text"]
    rope = text.rope_parameters
    assert {k: rope.get(k) for k in want["rope"]} == want["rope"]
    assert sum(rope["mrope_section"]) * 2 == want["head_dim"]  # the three sections cover every rotary pair
    assert vlm_config.tie_word_embeddings
    # SAM2-hiera-large at 1024 px, as the InternVL shape preset's
    assert sam2_config.to_dict() == random_preset("sa2va-1b-shape")[1].to_dict()


@pytest.mark.parametrize("preset", SHAPE_PRESETS)
def test_parameter_counts_match_the_real_models(preset):
    from transformers import Sam2Model

    vlm_config, sam2_config, _ = random_preset(preset)
    with torch.device("meta"):
        vlm = vlm_classes(vlm_config.model_type)[1]._from_config(vlm_config)
        sam2 = Sam2Model._from_config(sam2_config)
    assert vlm.lm_head.weight is vlm.get_input_embeddings().weight
    assert _count(vlm) == pytest.approx(REAL_VLM[preset], rel=0.01)
    assert 0.95 * SAM2_L_WITH_MEMORY < _count(sam2) < SAM2_L_WITH_MEMORY


@pytest.mark.parametrize("preset", SHAPE_PRESETS)
def test_composite_builds_on_meta(preset):
    """The whole DualLoopModel (LoRA, [SEG] projection, new-token rows) builds from the preset; with the default pixel
    budget (Sa2VA's) a 1024 x 1024 image is 37 x 37 tokens (Qwen2.5-VL, 28 px each) or 32 x 32 (Qwen3-VL, 32 px)."""
    with torch.device("meta"):
        model = build_model(ModelConfig(preset=preset))
    want = EXPECTED[preset]
    assert model.vision.name == want["model_type"]
    groups = {g["name"]: g["params"] for g in model.parameter_groups()}
    assert groups["vision_encoder"] + groups["projector"] + groups["llm_base"] == pytest.approx(REAL_VLM[preset],
                                                                                               rel=0.01)
    assert groups["llm_lora"] > 0 and groups["seg_projection"] > 0
    image = torch.empty(3, 1024, 1024, dtype=torch.uint8, device="meta")
    assert model.vision.token_counts([image]) == [want["image_tokens_1024"]]


def test_random_presets_but_not_benchmarked_by_default():
    """Selectable as model.preset and with bench_train_step.py --presets; the default step benchmark (GPU time is
    scarce) stays `small` + `sa2va-1b-shape` (`make gpu-check`'s `qwen` part runs these)."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train_step.py"
    spec = importlib.util.spec_from_file_location("bench_train_step", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert set(SHAPE_PRESETS) <= set(RANDOM_PRESETS)
    assert not set(SHAPE_PRESETS) & set(bench.DEFAULT_PRESETS)
