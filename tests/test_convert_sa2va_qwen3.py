"""`dualloop convert-sa2va` on the Sa2VA release built on Qwen3-VL (ByteDance/Sa2VA-Qwen3-VL-4B), and what both Qwen
families share (LM head, bfloat16, loading for evaluation; the Qwen2.5-VL release: test_convert_sa2va_qwen.py).

Such a release is `Sa2VAChatModelQwen` (bytedance/Sa2VA@9832e1a, projects/sa2va/hf/models_qwen3vl): `model`, a
Qwen3VLForConditionalGeneration (vision tower with DeepStack mergers, a Qwen3 LLM with q/k norms and interleaved
multimodal RoPE); `grounding_encoder.sam2_model` and `text_hidden_fcs` as in the other releases. Its config is
Sa2VAChatConfigQwen, a Qwen3VLConfig with model_type sa2va_chat and Sa2VA's `template`, saved by transformers 4.57
(tools/convert_to_hf.py: text_config.vocab_size = len(tokenizer), tie_word_embeddings false), so its weights are
model.model.visual / model.model.language_model / model.lm_head. The fake release here has that shape, with a tiny
Qwen3-VL whose every tensor is random (an explicit head_dim unlike hidden/heads, two DeepStack layers, an
mrope_section in Qwen3-VL's proportions, a rope_theta not transformers' default), the SAM2 of the SAM2 golden and
the Qwen2 byte-level BPE tokenizer of the Qwen2.5-VL test holding Qwen's and Sa2VA's tokens.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_convert_sa2va import FIXTURES, _tiny_sam2_variant
from test_convert_sa2va_qwen import (
    _native_state as qwen2_5_native_state,
)
from test_convert_sa2va_qwen import (
    _qwen_release,
    _token_ids,
    _tokenizer,
    check_export_json,
    check_tokenizer_sam2_projection,
    with_head,
    write_weights,
)

from dualloop.config import ConfigError
from dualloop.model.convert_sa2va import (
    SA2VA_QWEN3_MODEL,
    SA2VA_QWEN_MODEL,
    convert,
    convert_qwen_state,
    qwen3_vl_config,
    split_state,
    vlm_family,
)

HEAD_DIM = 32  # != hidden_size / num_attention_heads (16): the explicit head_dim must survive
MROPE = [6, 5, 5]  # 2 * 16 = HEAD_DIM; T > H = W as Qwen3-VL-4B's [24, 20, 20]
THETA = 5000.0  # neither Qwen3-VL's 5e6 nor transformers' default: a setting lost in the conversion shows in the logits
TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=HEAD_DIM,
            intermediate_size=96, max_position_embeddings=512, rms_norm_eps=1e-6, hidden_act="silu",
            attention_bias=False, attention_dropout=0.0)
# 16 px patches, 2x2 merged; DeepStack features of both blocks (LLM layers 0 and 1); a 4x4 learned position grid
VISION = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, patch_size=16,
              spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16, deepstack_visual_indexes=[0, 1],
              hidden_act="gelu_pytorch_tanh", in_channels=3)


@pytest.fixture
def sam2_tiny(monkeypatch):
    _tiny_sam2_variant(monkeypatch, json.loads((FIXTURES / "sam2_golden_tiny.json").read_text()))


def _reference_config(vocab_size: int, ids: dict, tie: bool = False, vision: dict | None = None):
    """The tiny model's config, built directly in the installed transformers (not through the converter)."""
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(
        text_config=dict(TEXT, vocab_size=vocab_size, bos_token_id=None, eos_token_id=ids["image_token_id"] - 10,
                         rope_parameters={"rope_type": "default", "mrope_section": MROPE, "mrope_interleaved": True,
                                          "rope_theta": THETA}),
        vision_config=vision or VISION, tie_word_embeddings=tie, **ids)


def _native_state(config, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of Qwen3VLForConditionalGeneration(config) random (norms near 1), in its installed layout."""
    from transformers import Qwen3VLForConditionalGeneration

    return qwen2_5_native_state(config, seed, Qwen3VLForConditionalGeneration)


def _config_json(text: dict, ids: dict, tie: bool, style: str) -> dict:
    """config.json of a Sa2VA-Qwen3-VL release as Sa2VAChatConfigQwen.to_dict() writes it: `4.57` (the release's
    transformers: rope_scaling + rope_theta in text_config) or `5` (rope_parameters)."""
    if style == "4.57":
        rope = {"rope_scaling": {"mrope_interleaved": True, "mrope_section": MROPE, "rope_type": "default"},
                "rope_theta": THETA}
    else:
        rope = {"rope_parameters": {"mrope_interleaved": True, "mrope_section": MROPE, "rope_type": "default",
                                    "rope_theta": THETA}}
    vision = dict(VISION, model_type="qwen3_vl", initializer_range=0.02)
    return {"architectures": ["Sa2VAChatModelQwen"], "model_type": "sa2va_chat",
            "auto_map": {"AutoConfig": "configuration_sa2va_chat.Sa2VAChatConfigQwen",
                         "AutoModel": "modeling_sa2va_qwen.Sa2VAChatModelQwen",
                         "AutoModelForCausalLM": "modeling_sa2va_qwen.Sa2VAChatModelQwen"},
            "template": "{% for message in messages %}...{% endfor %}", "dtype": "bfloat16",
            "text_config": dict(text, **rope, model_type="qwen3_vl_text", tie_word_embeddings=tie, dtype="bfloat16",
                                use_cache=True, initializer_range=0.02),
            "vision_config": vision, "tie_word_embeddings": tie, "transformers_version": "4.57.1", **ids}


def _release(root: Path, style: str = "4.57", head: str = "separate", tie: bool = False, tokenizer=None,
             extra: dict | None = None, drop: str | None = None) -> dict:
    """A Sa2VA-Qwen3-VL release directory: config.json, two safetensors shards, tokenizer, preprocessor config.
    `head`: "separate" (a trained head differing from the embedding), "embedding" (stored, equal to the embedding)
    or "absent"; `tie`: the config's tie_word_embeddings; `extra`: more weights; `drop`: weights (a key prefix, in
    the release's names) left out."""

    root.mkdir(parents=True)
    tok = tokenizer if tokenizer is not None else _tokenizer()
    tok.save_pretrained(str(root))
    ids = _token_ids(_tokenizer())  # the config's ids: Qwen's, wherever the given tokenizer has them
    vocab_size = max(len(tok), len(_tokenizer()))
    reference = _reference_config(vocab_size, ids)
    native = _native_state(reference)
    with_head(native, head)
    # >= 4.52: Sa2VAChatModelQwen.model = Qwen3VLForConditionalGeneration(model = Qwen3VLModel(visual,
    # language_model), lm_head)
    state = {"model." + k: v for k, v in native.items()}
    state = {k: v for k, v in state.items() if drop is None or not k.startswith(drop)}
    sam, seg = write_weights(root, state, TEXT["hidden_size"], extra)
    text = dict(TEXT, vocab_size=vocab_size, bos_token_id=151643, eos_token_id=reference.text_config.eos_token_id)
    (root / "config.json").write_text(json.dumps(_config_json(text, ids, tie, style)))
    (root / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessorFast", "processor_class": "Qwen3VLProcessor", "patch_size": 16,
        "merge_size": 2, "temporal_patch_size": 2, "size": {"shortest_edge": 65536, "longest_edge": 16777216},
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_resize": True, "do_normalize": True}))
    return {"dir": root, "native": native, "seg": seg, "tokenizer": tok, "ids": ids, "reference": reference,
            "state": state}


def _image_inputs(ids: dict, tok, seed: int = 3) -> dict:
    """One 64x96 image (4x6 patches of 16, 2x2 merged: 6 image tokens) in a chat prompt."""
    g = torch.Generator().manual_seed(seed)
    text = [tok.convert_tokens_to_ids("<|im_start|>")] + tok.encode("user\n", add_special_tokens=False)
    prompt = text + [ids["vision_start_token_id"]] + [ids["image_token_id"]] * 6 + [ids["vision_end_token_id"]] \
        + tok.encode("Please segment the cat.", add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")]
    input_ids = torch.tensor([prompt])
    return {"input_ids": input_ids, "attention_mask": torch.ones(1, len(prompt), dtype=torch.long),
            "pixel_values": torch.randn(24, 3 * 2 * 16 * 16, generator=g), "image_grid_thw": torch.tensor([[1, 4, 6]]),
            # what the processor returns beside input_ids: 1 at image tokens (transformers 5's M-RoPE needs it)
            "mm_token_type_ids": (input_ids == ids["image_token_id"]).long()}


@pytest.mark.parametrize("style", ["4.57", "5"])
def test_qwen3_release_converts_bit_for_bit(tmp_path, sam2_tiny, capsys, style):
    """`dualloop convert-sa2va` on a Sa2VA-Qwen3-VL release: OUT/vlm loads with
    Qwen3VLForConditionalGeneration.from_pretrained and AutoTokenizer; every tensor is the release's, bit for bit;
    its config is the model's (the logits on an image prompt equal those of the reference model built directly);
    SAM2, the [SEG] projection and export.json as for the other releases, with Sa2VA-Qwen3's conventions."""
    from transformers import Qwen3VLForConditionalGeneration

    from dualloop.cli import main

    made = _release(tmp_path / "Sa2VA-Qwen3-VL-tiny", style=style)
    out = tmp_path / "converted"
    assert main(["convert-sa2va", "--checkpoint", str(made["dir"]), "--out", str(out)]) == 0
    written = json.loads(capsys.readouterr().out)

    vlm = Qwen3VLForConditionalGeneration.from_pretrained(str(out / "vlm"), local_files_only=True).eval()
    loaded = vlm.state_dict()
    assert set(loaded) == set(made["native"])
    assert any(".deepstack_merger_list.1." in k for k in loaded)
    for k, v in made["native"].items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    assert not torch.equal(vlm.lm_head.weight, vlm.model.language_model.embed_tokens.weight)  # the trained head

    c, ref = vlm.config, made["reference"]
    assert c.model_type == "qwen3_vl" and c.tie_word_embeddings is False
    assert {k: getattr(c, k) for k in made["ids"]} == made["ids"]  # the token ids: top level, as Qwen3VLConfig's
    assert c.text_config.vocab_size == len(made["tokenizer"]) == ref.text_config.vocab_size
    rope = c.text_config.rope_parameters
    assert (rope["mrope_section"], rope["mrope_interleaved"], rope["rope_theta"]) == (MROPE, True, THETA)
    for key in TEXT:
        assert getattr(c.text_config, key) == getattr(ref.text_config, key), key
    for key in VISION:
        assert getattr(c.vision_config, key) == getattr(ref.vision_config, key), key
    assert c.text_config.head_dim == HEAD_DIM and c.vision_config.deepstack_visual_indexes == [0, 1]
    assert not hasattr(c, "template") and "auto_map" not in c.to_dict()
    with torch.no_grad():
        reference = Qwen3VLForConditionalGeneration(ref).eval()
        reference.load_state_dict(made["native"])
        inputs = _image_inputs(made["ids"], made["tokenizer"])
        logits = vlm(**inputs).logits
        torch.testing.assert_close(logits, reference(**inputs).logits, rtol=0, atol=0)
        other = vlm(**dict(inputs, pixel_values=_image_inputs(made["ids"], made["tokenizer"], 4)["pixel_values"]))
        assert not torch.allclose(logits, other.logits)  # the image is read

    check_tokenizer_sam2_projection(out, made)
    preprocessor = json.loads((out / "vlm" / "preprocessor_config.json").read_text())
    assert (preprocessor["patch_size"], preprocessor["merge_size"]) == (16, 2)

    check_export_json(out, made, written, {"vlm_family": "qwen3_vl", "llm": "Qwen3VLTextModel",
                                           "weight_layout": "transformers>=4.52"})


def test_qwen3_conventions():
    """Sa2VAChatModelQwen (models_qwen3vl) passes min_pixels=512*28*28, max_pixels=2048*28*28 to its processor."""
    assert SA2VA_QWEN3_MODEL == SA2VA_QWEN_MODEL == {
        "prompt_style": "sa2va", "max_tiles": 1, "sam2_resize": "bicubic", "object_gate": False,
        "min_pixels": 512 * 28 * 28, "max_pixels": 2048 * 28 * 28}


# ---------------------------------------------- both Qwen families (the Qwen2.5-VL release: test_convert_sa2va_qwen.py)
def _made(family: str, root: Path, **kw) -> dict:
    return (_qwen_release if family == "qwen2_5_vl" else _release)(root, **kw)


def _vlm_class(family: str):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration if family == "qwen2_5_vl" else Qwen3VLForConditionalGeneration


FAMILIES = ["qwen2_5_vl", "qwen3_vl"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("head,tie,expected", [
    ("absent", False, "tied"),         # convert_to_hf.py writes tie false; a head not stored is the embedding
    ("absent", True, "tied"),
    ("embedding", True, "tied"),       # stored, equal, tied: one tensor
    ("separate", True, "separate"),    # stored, trained apart from the embedding: kept although the config ties
    ("embedding", False, "separate"),  # the config's choice where the stored head is the embedding
])
def test_lm_head_tied_or_kept(tmp_path, sam2_tiny, family, head, tie, expected):
    made = _made(family, tmp_path / "release", head=head, tie=tie)
    info = convert(made["dir"], tmp_path / "out")
    assert (info["lm_head"], info["lm_head_stored"]) == (expected, head != "absent")
    vlm = _vlm_class(family).from_pretrained(str(tmp_path / "out" / "vlm"), local_files_only=True)
    embed = made["native"]["model.language_model.embed_tokens.weight"]
    assert vlm.config.tie_word_embeddings is (expected == "tied")
    assert torch.equal(vlm.model.language_model.embed_tokens.weight, embed)
    assert torch.equal(vlm.lm_head.weight, embed if head != "separate" else made["native"]["lm_head.weight"])
    if expected == "tied":
        assert vlm.lm_head.weight is vlm.model.language_model.embed_tokens.weight


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_conversion(tmp_path, sam2_tiny, family):
    from safetensors import safe_open

    made = _made(family, tmp_path / "release")
    convert(made["dir"], tmp_path / "out", dtype="bfloat16")
    for f in (tmp_path / "out" / "vlm").glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            assert {st.get_slice(k).get_dtype() for k in st.keys()} == {"BF16"}
    assert json.loads((tmp_path / "out" / "vlm" / "config.json").read_text())["dtype"] == "bfloat16"


def test_family_detection():
    ids = _token_ids(_tokenizer())
    cfg = _config_json(dict(TEXT, vocab_size=400), ids, False, "4.57")
    assert vlm_family(cfg) == "qwen3_vl"
    # either mark alone tells Qwen3-VL: DeepStack vision, or a qwen3_vl text model
    assert vlm_family(dict(cfg, text_config={k: v for k, v in cfg["text_config"].items() if k != "model_type"})) \
        == "qwen3_vl"
    assert vlm_family(dict(cfg, vision_config={k: v for k, v in cfg["vision_config"].items()
                                               if k != "deepstack_visual_indexes"})) == "qwen3_vl"
    for moe in (dict(cfg, text_config=dict(cfg["text_config"], model_type="qwen3_vl_moe_text", num_experts=8)),
                dict(cfg, vision_config=dict(cfg["vision_config"], model_type="qwen3_vl_moe"))):
        with pytest.raises(ConfigError, match=r"a Sa2VA model on Qwen3-VL-MoE .*not supported"):
            vlm_family(moe)
    other = dict(cfg, text_config={"model_type": "llava_text"}, vision_config={"embed_dim": 1280})
    with pytest.raises(ConfigError, match=r"neither llm_config .* nor a Qwen2.5-VL vision_config .* or a Qwen3-VL "
                                          r"one .*unsupported architecture"):
        vlm_family(other)


def test_qwen3_config_problems_are_errors_before_the_weights_are_read(tmp_path):
    """A config transformers would not read as given fails, naming the file and the family, before the weights
    (here: none) are read; nothing is written."""
    ids = _token_ids(_tokenizer())
    base = _config_json(dict(TEXT, vocab_size=400), ids, False, "4.57")
    where = r"config.json: a Sa2VA model on Qwen3-VL \(Sa2VAChatModelQwen, as Sa2VA-Qwen3-VL-4B\): "
    text = base["text_config"]
    cases = [
        ("flat", dict({k: v for k, v in base.items() if k != "text_config"},
                      **{k: v for k, v in text.items() if k != "model_type"}), "no text_config"),
        ("no-heads", dict(base, text_config={k: v for k, v in text.items() if k != "num_attention_heads"}),
         r"the text settings \(text_config\) lack \['num_attention_heads'\]"),
        ("no-mrope", dict(base, text_config=dict(text, rope_scaling={"rope_type": "default"})), "no mrope_section"),
        ("not-interleaved", dict(base, text_config=dict(text, rope_scaling=dict(text["rope_scaling"],
                                                                                 mrope_interleaved=False))),
         "mrope_interleaved False, but transformers' Qwen3-VL always interleaves"),
        ("split", dict(base, text_config=dict(text, rope_scaling=dict(text["rope_scaling"], mrope_section=[4, 2, 2]))),
         r"mrope_section \[4, 2, 2\] does not split the head dimension 32"),
    ]
    for name, cfg, match in cases:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ConfigError, match=where + match) as e:
            convert(tmp_path / name, tmp_path / f"{name}-out")
        assert str(tmp_path / name / "config.json") in str(e.value)
        assert not (tmp_path / f"{name}-out").exists()
    assert qwen3_vl_config(base).text_config.head_dim == HEAD_DIM


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_and_token_id_problems_are_errors(tmp_path, sam2_tiny, family):
    made = _made(family, tmp_path / "no-vp", tokenizer=_tokenizer(["[SEG]", "<p>", "</p>"]))
    with pytest.raises(ConfigError, match=r"the tokenizer lacks \['<vp>', '</vp>'\]"):
        convert(made["dir"], tmp_path / "o1")

    made = _made(family, tmp_path / "ids")
    cfg = json.loads((made["dir"] / "config.json").read_text())
    (made["dir"] / "config.json").write_text(json.dumps(dict(cfg, image_token_id=cfg["video_token_id"])))
    with pytest.raises(ConfigError, match=r"token ids differ .*'image_token_id', \d+, '<\|image_pad\|>'"):
        convert(made["dir"], tmp_path / "o2")


@pytest.mark.parametrize("family", FAMILIES)
def test_an_extra_or_foreign_weight_is_an_error_naming_it(tmp_path, sam2_tiny, family):
    name, release = {"qwen2_5_vl": ("Qwen2.5-VL", "Qwen2_5-VL"), "qwen3_vl": ("Qwen3-VL", "Qwen3-VL")}[family]
    made = _made(family, tmp_path / "extra", extra={"model.model.language_model.extra.weight": torch.zeros(2)})
    with pytest.raises(ConfigError, match=rf"model\.model\.language_model\.extra\.weight: unexpected {name} weight "
                                          r"\(the checkpoint's layout is transformers>=4.52"):
        convert(made["dir"], tmp_path / "o1")
    made = _made(family, tmp_path / "other", extra={"mlp1.0.weight": torch.zeros(2)})
    with pytest.raises(ConfigError, match=rf"unexpected weight 'mlp1.0.weight' in the Sa2VA-{release} checkpoint"):
        convert(made["dir"], tmp_path / "o2")


def test_unexpected_or_missing_weights_are_errors_naming_them(tmp_path, sam2_tiny):
    # a DeepStack merger the config names but the checkpoint lacks
    made = _release(tmp_path / "deepstack", drop="model.model.visual.deepstack_merger_list.1.")
    with pytest.raises(ConfigError, match=r"do not fit the model \(missing \['model\.visual\.deepstack_merger_list\.1"):
        convert(made["dir"], tmp_path / "o3")
    # Qwen3-VL was never saved in the transformers < 4.52 layout
    with pytest.raises(ConfigError, match=r"Qwen3-VL weights are in the transformers<4.52 layout .*never saved in"):
        convert_qwen_state({"model.visual.blocks.0.norm1.weight": torch.zeros(1),
                            "model.model.layers.0.x": torch.zeros(1)}, "qwen3_vl")
    with pytest.raises(ConfigError, match="no Qwen3-VL vision weights"):
        convert_qwen_state({"model.lm_head.weight": torch.zeros(1)}, "qwen3_vl")
    with pytest.raises(ConfigError, match=r"unexpected weight 'x' in the Sa2VA-Qwen3-VL checkpoint"):
        split_state({"x": torch.zeros(1)}, "qwen3_vl")



@pytest.mark.parametrize("family", FAMILIES)
def test_converted_release_is_evaluated_with_its_trained_parts(tmp_path, sam2_tiny, family):
    """The conversion as `dualloop eval` loads it (load_trained_model): a DualLoopModel of the release's family with
    its [SEG] / <vp> rows, [SEG] projection and Sa2VA-Qwen's conventions, whose grounding and captioning run."""
    from dualloop.train.export import load_trained_model

    made = _made(family, tmp_path / "release")
    convert(made["dir"], tmp_path / "out")
    model = load_trained_model(tmp_path / "out")
    assert model.vision.name == family and model.prompts.img_context == made["ids"]["image_token_id"]
    cfg = model.model_cfg
    assert (cfg.prompt_style, cfg.max_tiles, cfg.sam2_resize, cfg.min_pixels, cfg.max_pixels) == \
        ("sa2va", 1, "bicubic", 401408, 1605632)
    embed = made["native"]["model.language_model.embed_tokens.weight"]
    rows = model.language_model.embed_tokens.rows
    for token in ("[SEG]", "<vp>", "</vp>"):  # the rows dualloop trains apart
        i = made["tokenizer"].convert_tokens_to_ids(token)
        assert torch.equal(rows.embed[rows.token_ids.tolist().index(i)], embed[i]), token
    fcs = dict(model.text_hidden_fcs.named_parameters())
    assert all(torch.equal(fcs[k], v) for k, v in made["seg"].items())
    model.use_conventions(min_pixels=64 * 64, max_pixels=128 * 128)
    img = torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8)
    mask = torch.zeros(64, 96, dtype=torch.uint8)
    mask[8:40, 10:60] = 1
    ids, lengths = model.encode_queries(["the cat"])
    with torch.no_grad():
        out = model.ground([img], caption_ids=ids, caption_lengths=lengths, queries=[True])
        caption = model.caption([img], [mask], max_new_tokens=3)
    assert out.logits.shape[0] == 1 and torch.isfinite(out.logits).all() and len(caption.texts) == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_prompts_of_a_converted_release(tmp_path, sam2_tiny, family):
    """The grounding prompt a converted Sa2VA-Qwen release reads: with `sa2va` its training text (Sa2VA's datasets,
    arch_type qwen: no system turn, the image markers, then the question), with `sa2va_eval` its evaluation's
    (predict_forward through the release's chat template: Qwen2.5-VL's opens with its default system turn, Qwen3-VL's
    has none; RES.py's "<image>\\n Please segment ..." with <image> taken out)."""
    from dualloop.train.export import load_trained_model

    made = _made(family, tmp_path / "release")
    convert(made["dir"], tmp_path / "out")
    model = load_trained_model(tmp_path / "out")
    model.use_conventions(min_pixels=64 * 64, max_pixels=128 * 128)
    img = torch.zeros(3, 64, 64, dtype=torch.uint8)
    n = model.vision.token_counts([img])[0]
    tok = made["tokenizer"]
    image = "<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>"
    for style, system, question in (("sa2va", "", "\nPlease segment the cat in this image."),
                                    ("sa2va_eval", "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
                                     "\n Please segment the cat in this image.")):
        model.use_conventions(prompt_style=style)
        ids, lengths = model.encode_queries(["the cat"])
        batch = model.prompts.ground_prompts([ids[0, : int(lengths[0])].tolist()], [n], queries=[True])
        text = tok.decode(batch.ids[0].tolist())
        if family == "qwen3_vl":
            system = ""
        assert text == (f"{system}<|im_start|>user\n{image}{question}<|im_end|>\n<|im_start|>assistant\n"
                        "It is [SEG]."), (style, text)
