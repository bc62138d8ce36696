"""`dualloop convert-sa2va`: a Sa2VA release (HF format) -> vlm/ + sam2/ + seg_projection for `preset: pretrained`.

The vision golden (tests/fixtures/internvit_golden_tiny.json) was made once with Sa2VA's own code,
bytedance/Sa2VA@9832e1a (projects/sa2va/hf/models/modeling_intern_vit.py, InternVisionModel, and
Sa2VAChatModel.extract_feature: drop CLS, pixel shuffle v2, mlp1), on a tiny InternViT whose weights come from
`golden_weights.weights_from_keys(fixture keys, seed)`; the fixture holds the original key names and shapes and the
projected features of two fixed images. No foreign code is in this repository.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from golden_weights import make_weights, weights_from_keys

from dualloop.config import ConfigError
from dualloop.model.convert_sa2va import _materialize, convert_vlm_state, internvl_config, split_state

FIXTURES = Path(__file__).parent / "fixtures"
LLM = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=48, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, vocab_size=64,
           max_position_embeddings=256, tie_word_embeddings=False, rms_norm_eps=1e-6)


def _vision_golden() -> dict:
    return json.loads((FIXTURES / "internvit_golden_tiny.json").read_text())


def _sa2va_config(golden: dict, llm: dict = LLM) -> dict:
    return {"model_type": "sa2va_chat", "architectures": ["Sa2VAChatModel"], "vision_config": golden["vision_config"],
            "llm_config": llm, "downsample_ratio": golden["downsample_ratio"], "force_image_size": 56,
            "select_layer": -1, "ps_version": "v2", "template": "qwen_chat"}


def _llm_state(llm: dict) -> dict[str, torch.Tensor]:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(llm["model_type"], **{k: v for k, v in llm.items() if k != "model_type"})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    return {"language_model." + k: v for k, v in model.state_dict().items()}


def test_vision_tower_and_projector_match_sa2va_original_code():
    from transformers import InternVLForConditionalGeneration

    golden = _vision_golden()
    weights = weights_from_keys([(k, s) for k, s in golden["keys"]], golden["seed"])
    weights.update(_llm_state(LLM))
    config = internvl_config(_sa2va_config(golden), image_token_id=5)
    model = _materialize(InternVLForConditionalGeneration, config,
                         convert_vlm_state(weights, config.vision_config.hidden_size), "test").eval()
    pixels = torch.from_numpy(np.random.RandomState(golden["pixels_seed"]).standard_normal(golden["pixels_shape"])
                              .astype(np.float32))
    vm = model.model
    with torch.no_grad():  # the same calls as DualLoopModel._tower_tokens + image_features
        feats = vm.vision_tower(pixel_values=pixels, return_dict=True).last_hidden_state[:, 1:]
        b, n, c = feats.shape
        side = int(n ** 0.5)
        feats = vm.pixel_shuffle(feats.reshape(b, side, side, c), scale_factor=config.downsample_ratio)
        feats = vm.multi_modal_projector(feats.reshape(b, -1, feats.shape[-1]))
    expected = torch.tensor(golden["features"])
    assert feats.shape == expected.shape
    torch.testing.assert_close(feats, expected, atol=2e-6, rtol=1e-4)
    assert config.image_seq_length == expected.shape[1]


def test_the_fused_qkv_is_split_into_query_key_value_in_that_order():
    hidden = 4
    qkv = torch.arange(3 * hidden * hidden, dtype=torch.float32).reshape(3 * hidden, hidden)
    out = convert_vlm_state({"vision_model.encoder.layers.0.attn.qkv.weight": qkv}, hidden)
    base = "model.vision_tower.encoder.layer.0.attention."
    assert torch.equal(out[base + "q_proj.weight"], qkv[:hidden])
    assert torch.equal(out[base + "k_proj.weight"], qkv[hidden:2 * hidden])
    assert torch.equal(out[base + "v_proj.weight"], qkv[2 * hidden:])


def test_unknown_weights_and_llms_are_errors_naming_them():
    golden = _vision_golden()
    with pytest.raises(ConfigError, match="model.something_else"):
        split_state({"model.something_else.weight": torch.zeros(1)})
    with pytest.raises(ConfigError, match="language-model weight"):
        convert_vlm_state({"language_model.extra.weight": torch.zeros(1)}, 4)
    with pytest.raises(ConfigError, match="InternLM2ForCausalLM"):
        internvl_config(_sa2va_config(golden, dict(LLM, architectures=["InternLM2ForCausalLM"])), 5)
    with pytest.raises(ConfigError, match="ps_version"):
        internvl_config(dict(_sa2va_config(golden), ps_version="v1"), 5)


def _fake_release(root: Path) -> dict:
    """A Sa2VA release directory in the real layout (config.json, two safetensors shards, its tokenizer) of a tiny
    model: the InternViT of the vision golden, a random Qwen2, the SAM2 of the SAM2 golden, a [SEG] projection."""
    from safetensors.torch import save_file

    from dualloop.model.tokenizer import build_word_tokenizer

    root.mkdir(parents=True)
    tokenizer = build_word_tokenizer()  # <img> </img> <IMG_CONTEXT> [SEG] <vp> </vp>, as Sa2VA's has
    tokenizer.save_pretrained(str(root))
    golden, sam = _vision_golden(), json.loads((FIXTURES / "sam2_golden_tiny.json").read_text())
    llm = dict(LLM, vocab_size=len(tokenizer))
    state = weights_from_keys([(k, s) for k, s in golden["keys"]], golden["seed"])
    state.update(_llm_state(llm))
    state.update({"grounding_encoder.sam2_model." + k: v
                  for k, v in make_weights(sam["keys"], sam["seeds"]["weights"]).items()})
    g = torch.Generator().manual_seed(1)
    width, prompt = llm["hidden_size"], sam["config"]["d_model"]
    seg = {"0.weight": torch.randn(width, width, generator=g) * 0.1, "0.bias": torch.randn(width, generator=g) * 0.1,
           "2.weight": torch.randn(prompt, width, generator=g) * 0.1, "2.bias": torch.randn(prompt, generator=g) * 0.1}
    state.update({"text_hidden_fcs." + k: v for k, v in seg.items()})
    names = sorted(state)
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        save_file({k: state[k].contiguous() for k in part}, str(root / f"model-0000{i + 1}-of-00002.safetensors"))
    (root / "config.json").write_text(json.dumps(_sa2va_config(golden, llm)))
    return {"state": state, "seg": seg, "tokenizer": tokenizer, "sam": sam}


@pytest.fixture
def release(tmp_path, monkeypatch) -> dict:
    """A tiny release in tmp_path; SAM2's variant lookup answers with the golden's tiny hiera (the variant table
    holds the real sizes only)."""
    import dualloop.model.convert_sam2 as convert_sam2

    made = _fake_release(tmp_path / "Sa2VA-tiny")
    tiny = convert_sam2.hiera_sam2_config(**made["sam"]["config"])
    monkeypatch.setattr(convert_sam2, "detect_variant", lambda state: "tiny")
    monkeypatch.setattr(convert_sam2, "sam2_config", lambda variant: tiny)
    return dict(made, dir=tmp_path / "Sa2VA-tiny")


def test_convert_cli_then_evaluation_loading_keeps_every_trained_part(release, tmp_path, capsys):
    """`dualloop convert-sa2va` on a release-shaped directory, then the model `dualloop eval --checkpoint OUT` loads:
    Sa2VA's [SEG] projection, [SEG]/<vp>/</vp> rows, vision tower, LLM and SAM2 weights all arrive unchanged, and
    the model captions and segments."""
    from dualloop.cli import main
    from dualloop.train.export import load_trained_model

    out = tmp_path / "converted"
    assert main(["convert-sa2va", "--checkpoint", str(release["dir"]), "--out", str(out)]) == 0
    written = json.loads(capsys.readouterr().out)
    assert written["sam2_memory_weights_left_out"] > 0 and written["llm"] == "Qwen2ForCausalLM"

    model = load_trained_model(out)
    assert model.model_cfg.prompt_style == "sa2va" and "model.prompt_style=sa2va" in written["train_with"]
    src = release["state"]
    for name, value in release["seg"].items():
        assert torch.equal(model.text_hidden_fcs.state_dict()[name], value), name
    ids = [release["tokenizer"].convert_tokens_to_ids(t) for t in ("[SEG]", "<vp>", "</vp>")]
    rows = model.language_model.embed_tokens.rows
    assert torch.equal(rows.embed, src["language_model.model.embed_tokens.weight"][ids])
    assert torch.equal(rows.head, src["language_model.lm_head.weight"][ids])
    assert torch.equal(model.vlm.model.vision_tower.embeddings.cls_token,
                       src["vision_model.embeddings.class_embedding"])
    assert torch.equal(model.sam2.mask_decoder.iou_token.weight,
                       src["grounding_encoder.sam2_model.sam_mask_decoder.iou_token.weight"])
    layer = model.language_model.layers[1].mlp.down_proj
    assert torch.equal(layer.weight, src["language_model.model.layers.1.mlp.down_proj.weight"])

    images = [torch.randint(0, 256, (3, 80, 96), dtype=torch.uint8) for _ in range(2)]
    masks = [torch.zeros(80, 96, dtype=torch.bool) for _ in range(2)]
    for m in masks:
        m[20:50, 30:70] = True
    with torch.no_grad():
        cap = model.caption(images, masks, max_new_tokens=3)
        ground = model.ground(images, caption_ids=cap.ids, caption_lengths=cap.lengths)
    assert ground.logits.shape == (2, 32, 32) and torch.isfinite(ground.logits).all()


def test_convert_errors_name_the_problem(tmp_path):
    from dualloop.model.convert_sa2va import main

    assert main(["--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({"model_type": "internvl_chat"}))
    with pytest.raises(ConfigError, match="not a Sa2VA config"):
        from dualloop.model.convert_sa2va import convert

        convert(tmp_path / "ckpt", tmp_path / "o")


def test_convert_to_bfloat16_writes_bfloat16_weights(release, tmp_path):
    """Releases are stored in bf16; --dtype casts every floating weight (and the configs say so)."""
    from safetensors import safe_open

    from dualloop.model.convert_sa2va import main

    out = tmp_path / "converted"
    assert main(["--checkpoint", str(release["dir"]), "--out", str(out), "--dtype", "bfloat16"]) == 0
    for part in ("vlm", "sam2"):
        files = list((out / part).glob("*.safetensors"))
        assert files
        for f in files:
            with safe_open(str(f), "pt") as st:
                assert {st.get_slice(k).get_dtype() for k in st.keys()} == {"BF16"}, f
        assert json.loads((out / part / "config.json").read_text()).get("dtype") == "bfloat16"
    with safe_open(str(out / "seg_projection.safetensors"), "pt") as st:
        assert {st.get_slice(k).get_dtype() for k in st.keys()} == {"BF16"}
