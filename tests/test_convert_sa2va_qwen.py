"""`dualloop convert-sa2va` on Sa2VA releases built on Qwen2.5-VL (ByteDance/Sa2VA-Qwen2_5-VL-3B, -7B).

Such a release is `Sa2VAChatModelQwen` (bytedance/Sa2VA@9832e1a, projects/sa2va/hf/models_qwen2_5_vl): `model`, a
Qwen2_5_VLForConditionalGeneration; `grounding_encoder.sam2_model` (SAM2, as in the InternVL releases);
`text_hidden_fcs` (Linear, ReLU, Linear, Dropout). Its config is a Qwen2_5_VLConfig with model_type sa2va_chat and
Sa2VA's `template`, saved by transformers 4.x (tools/convert_to_hf.py writes text_config.vocab_size = len(tokenizer)
and tie_word_embeddings false). The fake releases here have that shape in the two weight layouts transformers saved
Qwen2_5_VLForConditionalGeneration in (< 4.52: model.visual / model.model / model.lm_head; >= 4.52:
model.model.visual / model.model.language_model / model.lm_head) and the two config layouts (text settings at the
top level, or in text_config beside stale top-level copies of the base model's), with a tiny Qwen2.5-VL whose every
tensor is random, the SAM2 of the SAM2 golden and a Qwen2 byte-level BPE tokenizer holding Qwen's and Sa2VA's tokens.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from golden_weights import make_weights
from test_convert_sa2va import FIXTURES, _tiny_sam2_variant

from dualloop.config import ConfigError
from dualloop.model.convert_sa2va import (
    SA2VA_MODEL,
    SA2VA_QWEN_MODEL,
    convert,
    convert_qwen_state,
    qwen2_5_vl_config,
    split_state,
    vlm_family,
)

MROPE = [2, 3, 3]  # head_dim 16 = 2 * 8
TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
            max_position_embeddings=512, rms_norm_eps=1e-6, hidden_act="silu", use_sliding_window=False,
            sliding_window=512, max_window_layers=2, attention_dropout=0.0)
THETA = 5000.0  # not transformers' default (1e6): a setting lost in the conversion shows in the logits
# window 56 px = 2 merged patches and full attention in block 1 only: both differ from the defaults
VISION = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, patch_size=14,
              spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
              tokens_per_second=2, hidden_act="silu", in_channels=3)
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
SA2VA_TOKENS = ["[SEG]", "<p>", "</p>", "<vp>", "</vp>"]  # sa2va_qwen25_3b.py's special_tokens


def _tokenizer(sa2va_tokens=SA2VA_TOKENS):
    """A byte-level BPE Qwen2Tokenizer (256 byte pieces, no merges), Qwen's special tokens, then Sa2VA's."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL})
    tok.add_tokens(list(sa2va_tokens), special_tokens=True)
    return tok


def _token_ids(tok) -> dict[str, int]:
    return {"image_token_id": tok.convert_tokens_to_ids("<|image_pad|>"),
            "video_token_id": tok.convert_tokens_to_ids("<|video_pad|>"),
            "vision_start_token_id": tok.convert_tokens_to_ids("<|vision_start|>"),
            "vision_end_token_id": tok.convert_tokens_to_ids("<|vision_end|>")}


def _reference_config(vocab_size: int, ids: dict, tie: bool = False):
    """The tiny model's config, built directly in the installed transformers (not through the converter)."""
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(TEXT, vocab_size=vocab_size, bos_token_id=None, eos_token_id=ids["image_token_id"] - 10,
                         rope_parameters={"rope_type": "default", "mrope_section": MROPE, "rope_theta": THETA}),
        vision_config=VISION, tie_word_embeddings=tie, **ids)


def _native_state(config, seed: int = 0, model_cls=None) -> dict[str, torch.Tensor]:
    """Every tensor of model_cls(config) (default Qwen2_5_VLForConditionalGeneration) random (norms near 1), in its
    installed layout."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        keys = {k: v.shape for k, v in (model_cls or Qwen2_5_VLForConditionalGeneration)(config).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in keys.items():
        x = torch.randn(shape, generator=g)
        out[k] = 1.0 + 0.1 * x if ("norm" in k or "ln_q" in k) and k.endswith("weight") else 0.05 * x
    return out


def _release_key(native: str, layout: str) -> str:
    """An installed-layout key -> its name in a Sa2VAChatModelQwen checkpoint saved by transformers `layout`."""
    if native == "lm_head.weight":
        return "model.lm_head.weight"
    if layout == "new":  # >= 4.52: Qwen2_5_VLForConditionalGeneration.model = Qwen2_5_VLModel(visual, language_model)
        return "model." + native
    if native.startswith("model.visual."):  # < 4.52: visual, model (the LLM), lm_head side by side
        return native
    assert native.startswith("model.language_model.")
    return "model.model." + native[len("model.language_model."):]


def _config_json(text: dict, ids: dict, tie: bool, layout: str) -> dict:
    """config.json of a Sa2VA-Qwen2_5-VL release: `nested` as transformers >= 4.52 saves Sa2VAChatConfigQwen
    (text_config, and the base model's flat settings still at the top level, its vocab_size stale), `flat` as
    transformers < 4.52 does (the text settings at the top level)."""
    common = {"architectures": ["Sa2VAChatModelQwen"], "model_type": "sa2va_chat",
              "auto_map": {"AutoConfig": "configuration_sa2va_chat.Sa2VAChatConfigQwen",
                           "AutoModel": "modeling_sa2va_qwen.Sa2VAChatModelQwen",
                           "AutoModelForCausalLM": "modeling_sa2va_qwen.Sa2VAChatModelQwen"},
              "template": "{% for message in messages %}...{% endfor %}", "vision_token_id": ids["image_token_id"] - 1,
              "vision_config": dict({k: v for k, v in VISION.items() if k != "in_channels"}, in_chans=3,
                                    spatial_patch_size=14, model_type="qwen2_5_vl", torch_dtype="bfloat16",
                                    initializer_range=0.02),
              "torch_dtype": "bfloat16", **ids}
    rope = {"rope_theta": THETA}
    if layout == "flat":
        return dict(common, **text, **rope, rope_scaling={"type": "mrope", "mrope_section": MROPE},
                    tie_word_embeddings=tie, transformers_version="4.49.0", _attn_implementation_autoset=True,
                    use_cache=True)
    stale = dict(TEXT, vocab_size=151936, rope_theta=1000000.0, rope_scaling={"type": "mrope", "mrope_section": [16,
                 24, 24]})
    nested = dict(text, **rope, model_type="qwen2_5_vl_text", tie_word_embeddings=tie, torch_dtype="bfloat16",
                  rope_scaling={"type": "default", "mrope_section": MROPE, "rope_type": "default"},
                  layer_types=["full_attention"] * TEXT["num_hidden_layers"], use_cache=True,
                  architectures=["Qwen2_5_VLForConditionalGeneration"], _name_or_path="Qwen/Qwen2.5-VL-3B-Instruct")
    return dict(common, **stale, text_config=nested, tie_word_embeddings=tie, transformers_version="4.57.0",
                output_hidden_states=False, return_dict=True)


def write_weights(root: Path, state: dict, width: int, extra: dict | None = None) -> tuple[dict, dict]:
    """A release's weights in two safetensors shards: its VLM's (`state`, in the release's names), the SAM2 of the
    SAM2 golden, a random [SEG] projection from the LLM's `width`, and `extra` (all added to `state`); returns (the
    golden, the projection)."""
    from safetensors.torch import save_file

    sam = json.loads((FIXTURES / "sam2_golden_tiny.json").read_text())
    state.update({"grounding_encoder.sam2_model." + k: v
                  for k, v in make_weights(sam["keys"], sam["seeds"]["weights"]).items()})
    g = torch.Generator().manual_seed(1)
    prompt = sam["config"]["d_model"]
    seg = {"0.weight": torch.randn(width, width, generator=g) * 0.1, "0.bias": torch.randn(width, generator=g) * 0.1,
           "2.weight": torch.randn(prompt, width, generator=g) * 0.1, "2.bias": torch.randn(prompt, generator=g) * 0.1}
    state.update({"text_hidden_fcs." + k: v for k, v in seg.items()})
    state.update(extra or {})
    names = sorted(state)
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        save_file({k: state[k].contiguous() for k in part}, str(root / f"model-0000{i + 1}-of-00002.safetensors"))
    return sam, seg


def with_head(native: dict, head: str) -> None:
    """A release's LM head in `native` (transformers names): "separate" (as built: trained, differing from the
    embedding), "embedding" (stored, equal to the embedding) or "absent" (not stored)."""
    if head == "embedding":
        native["lm_head.weight"] = native["model.language_model.embed_tokens.weight"].clone()
    elif head == "absent":
        del native["lm_head.weight"]


def _qwen_release(root: Path, layout: str = "new", config_layout: str = "nested", head: str = "separate",
                  tie: bool = False, tokenizer=None, extra: dict | None = None) -> dict:
    """A Sa2VA-Qwen2_5-VL release directory: config.json, two safetensors shards, tokenizer, preprocessor config.
    `head`: "separate" (a trained head differing from the embedding), "embedding" (the head stored, equal to the
    embedding) or "absent" (not stored); `tie`: the config's tie_word_embeddings; `extra`: more weights."""

    root.mkdir(parents=True)
    tok = tokenizer if tokenizer is not None else _tokenizer()
    tok.save_pretrained(str(root))
    ids = {**_token_ids(_tokenizer()), **_token_ids(tok)} if tokenizer is not None else _token_ids(tok)
    vocab_size = max(len(tok), len(_tokenizer()))
    reference = _reference_config(vocab_size, ids)
    native = _native_state(reference)
    with_head(native, head)
    state = {_release_key(k, layout): v for k, v in native.items()}
    sam, seg = write_weights(root, state, TEXT["hidden_size"], extra)
    text = dict(TEXT, vocab_size=vocab_size, bos_token_id=None, eos_token_id=reference.text_config.eos_token_id)
    (root / "config.json").write_text(json.dumps(_config_json(text, ids, tie, config_layout)))
    (root / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor", "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2,
        "min_pixels": 3136, "max_pixels": 12845056, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "do_resize": True, "do_normalize": True}))
    return {"dir": root, "native": native, "seg": seg, "tokenizer": tok, "ids": ids, "reference": reference,
            "sam": sam, "state": state}


@pytest.fixture
def sam2_tiny(monkeypatch):
    sam = json.loads((FIXTURES / "sam2_golden_tiny.json").read_text())
    _tiny_sam2_variant(monkeypatch, sam)


def _image_inputs(ids: dict, tok) -> dict:
    """One 56x56 image (4x4 patches of 14, 2x2 merged: 4 image tokens) in a chat prompt."""
    g = torch.Generator().manual_seed(3)
    text = [tok.convert_tokens_to_ids("<|im_start|>")] + tok.encode("user\n", add_special_tokens=False)
    prompt = text + [ids["vision_start_token_id"]] + [ids["image_token_id"]] * 4 + [ids["vision_end_token_id"]] \
        + tok.encode("Please segment the cat.", add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")]
    return {"input_ids": torch.tensor([prompt]), "attention_mask": torch.ones(1, len(prompt), dtype=torch.long),
            "pixel_values": torch.randn(16, 3 * 2 * 14 * 14, generator=g), "image_grid_thw": torch.tensor([[1, 4, 4]])}


def check_tokenizer_sam2_projection(out: Path, made: dict) -> None:
    """What a conversion writes besides the VLM's weights: the release's tokenizer (Qwen's and Sa2VA's tokens at its
    ids), SAM2 and the [SEG] projection, as the release holds them."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, Sam2Model

    tok = AutoTokenizer.from_pretrained(str(out / "vlm"), local_files_only=True)
    names = QWEN_SPECIAL + SA2VA_TOKENS
    assert tok.convert_tokens_to_ids(names) == made["tokenizer"].convert_tokens_to_ids(names)
    assert len(tok) == len(made["tokenizer"]) and tok.encode("[SEG]", add_special_tokens=False) == \
        [made["tokenizer"].convert_tokens_to_ids("[SEG]")]
    sam2 = Sam2Model.from_pretrained(str(out / "sam2"), local_files_only=True)
    assert torch.equal(sam2.mask_decoder.iou_token.weight,
                       made["state"]["grounding_encoder.sam2_model.sam_mask_decoder.iou_token.weight"])
    seg = load_file(str(out / "seg_projection.safetensors"))
    assert seg.keys() == made["seg"].keys() and all(torch.equal(seg[k], v) for k, v in made["seg"].items())


def check_export_json(out: Path, made: dict, written: dict, family: dict) -> None:
    """export.json as the converter returned it (`written`) and as both Qwen families write it: their shared fields,
    Sa2VA-Qwen's conventions and `family`'s own (vlm_family, llm, weight_layout)."""
    info = json.loads((out / "export.json").read_text())
    assert info == written
    expected = {"source": str(made["dir"]), "converted_from": "sa2va", "vlm_path": str(out / "vlm"),
                "sam2_path": str(out / "sam2"), "seg_projection": str(out / "seg_projection.safetensors"),
                "lm_head": "separate", "lm_head_stored": True, "sam2_variant": "tiny", "prompt_style": "sa2va",
                "max_tiles": 1, "sam2_resize": "bicubic", "object_gate": False, "min_pixels": 401408,
                "max_pixels": 1605632, **family}
    assert {k: info[k] for k in expected} == expected
    assert set(info) == set(expected) | {"sam2_memory_weights_left_out", "train_with"}
    assert info["sam2_memory_weights_left_out"] > 0
    assert info["train_with"].startswith(f"model.preset=pretrained model.vlm_path={out / 'vlm'} "
                                         f"model.sam2_path={out / 'sam2'} model.prompt_style=sa2va model.max_tiles=1 "
                                         "model.sam2_resize=bicubic model.object_gate=false")


@pytest.mark.parametrize("layout,config_layout", [("new", "nested"), ("old", "flat"), ("old", "nested"),
                                                  ("new", "flat")])
def test_qwen_release_converts_bit_for_bit_in_either_layout(tmp_path, sam2_tiny, capsys, layout, config_layout):
    """`dualloop convert-sa2va` on a release in either weight layout and either config layout: OUT/vlm loads with
    Qwen2_5_VLForConditionalGeneration.from_pretrained and AutoTokenizer; every tensor is the release's, bit for bit;
    its config is the model's (the logits on an image prompt equal those of the reference model built directly);
    SAM2, the [SEG] projection and export.json as for the InternVL releases, with Sa2VA-Qwen's conventions."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from dualloop.cli import main

    made = _qwen_release(tmp_path / "Sa2VA-Qwen2_5-VL-tiny", layout, config_layout)
    out = tmp_path / "converted"
    assert main(["convert-sa2va", "--checkpoint", str(made["dir"]), "--out", str(out)]) == 0
    written = json.loads(capsys.readouterr().out)

    vlm = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(out / "vlm"), local_files_only=True).eval()
    loaded = vlm.state_dict()
    assert set(loaded) == set(made["native"])
    for k, v in made["native"].items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    assert not torch.equal(vlm.lm_head.weight, vlm.model.language_model.embed_tokens.weight)  # the trained head

    c, ref = vlm.config, made["reference"]
    assert c.model_type == "qwen2_5_vl" and c.tie_word_embeddings is False
    assert {k: getattr(c, k) for k in made["ids"]} == made["ids"]
    assert c.text_config.vocab_size == len(made["tokenizer"]) == ref.text_config.vocab_size  # not the stale 151936
    assert c.text_config.rope_parameters["mrope_section"] == MROPE and c.text_config.rope_parameters["rope_theta"] == \
        THETA
    for key in TEXT:
        assert getattr(c.text_config, key) == getattr(ref.text_config, key), key
    for key in VISION:
        assert getattr(c.vision_config, key) == getattr(ref.vision_config, key), key
    assert not hasattr(c, "template") and "auto_map" not in c.to_dict()
    with torch.no_grad():
        reference = Qwen2_5_VLForConditionalGeneration(ref).eval()
        reference.load_state_dict(made["native"])
        inputs = _image_inputs(made["ids"], made["tokenizer"])
        torch.testing.assert_close(vlm(**inputs).logits, reference(**inputs).logits, rtol=0, atol=0)

    check_tokenizer_sam2_projection(out, made)
    assert json.loads((out / "vlm" / "preprocessor_config.json").read_text())["merge_size"] == 2

    check_export_json(out, made, written, {
        "vlm_family": "qwen2_5_vl", "llm": "Qwen2_5_VLTextModel",
        "weight_layout": {"old": "transformers<4.52", "new": "transformers>=4.52"}[layout]})


def test_conventions_of_both_families_name_the_same_keys():
    """pretrained_overrides reads config.MODEL_CONVENTIONS from either dict (min/max_pixels included)."""
    from dualloop.config import MODEL_CONVENTIONS

    assert set(SA2VA_MODEL) == set(SA2VA_QWEN_MODEL) >= set(MODEL_CONVENTIONS)
    assert (SA2VA_QWEN_MODEL["min_pixels"], SA2VA_QWEN_MODEL["max_pixels"]) == (512 * 28 * 28, 2048 * 28 * 28)
    assert {k: SA2VA_MODEL[k] for k in ("min_pixels", "max_pixels")} == {"min_pixels": 401408, "max_pixels": 1605632}


def _qwen3_vl_config() -> dict:
    """A sketch of Sa2VA-Qwen3-VL-4B's config.json (Sa2VAChatConfigQwen over Qwen3VLConfig), incomplete: its family is
    recognized, and its missing settings are named (tests/test_convert_sa2va_qwen3.py converts a whole one)."""
    return {"architectures": ["Sa2VAChatModelQwen"], "model_type": "sa2va_chat", "template": "...",
            "text_config": {"model_type": "qwen3_vl_text", "hidden_size": 2560, "num_hidden_layers": 36,
                            "vocab_size": 151679, "rope_scaling": {"mrope_section": [24, 20, 20],
                                                                   "mrope_interleaved": True}},
            "vision_config": {"model_type": "qwen3_vl", "depth": 24, "hidden_size": 1024, "out_hidden_size": 2560,
                              "spatial_merge_size": 2, "deepstack_visual_indexes": [5, 11, 17],
                              "num_position_embeddings": 2304, "patch_size": 16},
            "image_token_id": 151655, "tie_word_embeddings": False}


def test_unsupported_configs_are_errors_naming_the_file_and_architecture(tmp_path):
    for name, cfg, match in [
        ("qwen3vl", _qwen3_vl_config(), r"config.json: a Sa2VA model on Qwen3-VL .*lack \['num_attention_heads'\]"),
        ("qwen3vl-flat", dict({k: v for k, v in _qwen3_vl_config().items() if k != "text_config"}),
         r"Qwen3-VL.*text_config"),
        ("qwen2vl", {"model_type": "sa2va_chat", "architectures": ["Sa2VAChatModelQwen"],
                     "vision_config": {"embed_dim": 1280, "mlp_ratio": 4, "spatial_merge_size": 2}},
         r"neither llm_config .* nor a Qwen2.5-VL vision_config.*unsupported architecture"),
        ("plain", dict(_config_json(TEXT, _token_ids(_tokenizer()), False, "nested"), model_type="qwen2_5_vl"),
         "not a Sa2VA config"),
    ]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ConfigError, match=match) as e:
            convert(tmp_path / name, tmp_path / f"{name}-out")
        assert str(tmp_path / name / "config.json") in str(e.value)
        assert not (tmp_path / f"{name}-out").exists()
    assert vlm_family(_config_json(TEXT, _token_ids(_tokenizer()), False, "flat")) == "qwen2_5_vl"


def test_config_problems_are_errors(tmp_path):
    """(Tokenizer problems, for both Qwen families: test_convert_sa2va_qwen3.py.)"""
    cfg = _config_json(dict(TEXT, vocab_size=len(_tokenizer())), _token_ids(_tokenizer()), False, "nested")
    cfg["text_config"]["rope_scaling"] = {"type": "default", "rope_type": "default"}
    with pytest.raises(ConfigError, match="no mrope_section"):
        qwen2_5_vl_config(cfg)
    cfg["text_config"]["rope_scaling"] = {"type": "default", "rope_type": "default", "mrope_section": [2, 2, 2]}
    with pytest.raises(ConfigError, match=r"mrope_section \[2, 2, 2\] does not split the head dimension 16"):
        qwen2_5_vl_config(cfg)
    cfg["vision_config"]["in_channels"] = 4
    with pytest.raises(ConfigError, match="in_chans 3 != in_channels 4"):
        qwen2_5_vl_config(cfg)


def test_unexpected_weights_are_errors_naming_them(tmp_path, sam2_tiny):
    """(An extra LLM weight and a foreign one, for both Qwen families: test_convert_sa2va_qwen3.py.)"""
    with pytest.raises(ConfigError, match="mix two layouts"):
        convert_qwen_state({"model.visual.blocks.0.norm1.weight": torch.zeros(1),
                            "model.model.language_model.norm.weight": torch.zeros(1)})
    with pytest.raises(ConfigError, match=r"model\.model\.rotary_emb\.inv_freq: unexpected .*transformers<4.52"):
        convert_qwen_state({"model.visual.blocks.0.norm1.weight": torch.zeros(1),
                            "model.model.layers.0.x": torch.zeros(1),
                            "model.model.rotary_emb.inv_freq": torch.zeros(1)})
    with pytest.raises(ConfigError, match="no Qwen2.5-VL vision weights"):
        convert_qwen_state({"model.model.layers.0.x": torch.zeros(1)})
    # a tensor of the wrong shape is named by _materialize's check
    made = _qwen_release(tmp_path / "shape", extra={"model.model.language_model.norm.weight": torch.ones(3)})
    with pytest.raises(ConfigError, match=r"shape mismatch .*model\.language_model\.norm\.weight"):
        convert(made["dir"], tmp_path / "o3")
    # InternVL's split is unchanged by the Qwen family
    with pytest.raises(ConfigError, match="not vision_model, language_model, mlp1"):
        split_state({"model.visual.x": torch.zeros(1)})

