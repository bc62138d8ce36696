"""`model.preset: pretrained` on directories shaped as the real hub checkpoints users download (tiny sizes, the real
config.json conventions): InternVL3-*-hf written by transformers 4.5x (no top-level `tie_word_embeddings`, text
config without it: an untied LM head), the facebook/sam2.1-hiera-* repos (`"model_type": "sam2_video"`), InternLM2-based
"-hf" tokenizers that begin texts with BOS, and the look-alike directories users may point at by mistake."""
import json
from pathlib import Path

import pytest
import torch

from dualloop.config import ModelConfig
from dualloop.model import build_model, load_model
from dualloop.model.presets import random_preset
from dualloop.model.prompts import PromptBuilder
from dualloop.model.tokenizer import IMG_CONTEXT, IMG_START, add_new_special_tokens, build_word_tokenizer

torch.set_num_threads(1)


def _internvl_hf_dir(root: Path, *, vision: dict | None = None, **top) -> tuple[Path, torch.Tensor]:
    """A tiny InternVL "-hf" checkpoint as transformers 4.5x's conversion wrote InternVL3-1B-hf: bf16 weights with a
    separate (untied) lm_head, config.json with neither a top-level nor a text-config `tie_word_embeddings`."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    vlm_config, _, _ = random_preset("tiny")
    tokenizer = build_word_tokenizer(add_new=False)
    d = vlm_config.to_dict()
    d["text_config"]["vocab_size"] = len(tokenizer)
    d["vision_config"].update(vision or {})
    d.update(top)
    d["tie_word_embeddings"] = False
    torch.manual_seed(0)
    vlm = InternVLForConditionalGeneration(InternVLConfig.from_dict(d)).to(torch.bfloat16)
    with torch.no_grad():
        vlm.lm_head.weight.normal_(0.0, 1.0)  # a trained head differs from the embedding
    out = root / "InternVL3-1B-hf"
    vlm.save_pretrained(out)
    tokenizer.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.pop("tie_word_embeddings", None)
    cfg["text_config"].pop("tie_word_embeddings", None)
    (out / "config.json").write_text(json.dumps(cfg))
    return out, vlm.lm_head.weight.detach().float().clone()


def _sam2_hub_dir(root: Path, video: bool = True) -> tuple[Path, torch.Tensor]:
    """A tiny SAM2 checkpoint as the facebook/sam2.1-hiera-* repos ship it: a Sam2VideoModel (model_type
    "sam2_video") whose image part Sam2Model loads; `video=False`: a plain Sam2Model ("sam2")."""
    from transformers import Sam2Model, Sam2VideoConfig, Sam2VideoModel

    _, sam2_config, _ = random_preset("tiny")
    d = sam2_config.to_dict()
    torch.manual_seed(1)
    if video:
        model = Sam2VideoModel(Sam2VideoConfig(vision_config=d["vision_config"],
                                               prompt_encoder_config=d["prompt_encoder_config"],
                                               mask_decoder_config=d["mask_decoder_config"]))
    else:
        model = Sam2Model(sam2_config)
    out = root / ("sam2.1-hiera-tiny" if video else "sam2-image")
    model.save_pretrained(out)
    assert json.loads((out / "config.json").read_text())["model_type"] == ("sam2_video" if video else "sam2")
    return out, model.mask_decoder.iou_token.weight.detach().clone()


def _inputs():
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 40, 48), generator=g, dtype=torch.uint8) for _ in range(2)]
    masks = [torch.zeros(40, 48, dtype=torch.uint8) for _ in range(2)]
    masks[0][5:20, 10:30] = 1
    masks[1][30:, :8] = 1
    return images, masks


def test_untied_lm_head_of_an_internvl_hf_checkpoint_survives_the_new_tokens(tmp_path):
    """Adding [SEG], <vp>, </vp> resizes the vocabulary; the checkpoint's own LM head must stay (not be re-tied to the
    embedding), its new rows start at the mean of the head's rows, and a saved model reloads untied."""
    vlm_dir, head = _internvl_hf_dir(tmp_path)
    sam2_dir, _ = _sam2_hub_dir(tmp_path, video=False)
    model = build_model(ModelConfig(preset="pretrained", vlm_path=str(vlm_dir), sam2_path=str(sam2_dir)))
    lm_head, embed = model.vlm.lm_head, model.vlm.model.language_model.embed_tokens
    assert lm_head.base.weight is not embed.base.weight and not lm_head.rows.tied
    n = head.shape[0]
    assert torch.equal(lm_head.base.weight[:n].float(), head)
    new_rows = lm_head.rows.head.detach().float()
    assert torch.allclose(new_rows, head.mean(0, keepdim=True).expand_as(new_rows), atol=1e-5)
    images, masks = _inputs()
    ids, lengths = model.encode_captions(["the red circle", "a blue square"])
    with torch.no_grad():
        logits = model.caption_logits(images, masks, ids, lengths)
    model.save_pretrained(tmp_path / "saved")
    again = load_model(tmp_path / "saved")
    assert not again.vlm.lm_head.rows.tied
    with torch.no_grad():
        assert torch.equal(again.caption_logits(images, masks, ids, lengths), logits)


def test_sam2_checkpoint_of_the_official_repos_loads(tmp_path):
    """facebook/sam2.1-hiera-*'s config.json says "sam2_video" / Sam2VideoModel: the image part loads as is."""
    vlm_dir, _ = _internvl_hf_dir(tmp_path)
    sam2_dir, iou_token = _sam2_hub_dir(tmp_path)
    model = build_model(ModelConfig(preset="pretrained", vlm_path=str(vlm_dir), sam2_path=str(sam2_dir))).eval()
    assert torch.equal(model.sam2.mask_decoder.iou_token.weight, iou_token)
    images, _ = _inputs()
    ids, lengths = model.encode_captions(["the red circle", "a blue square"])
    with torch.no_grad():
        out = model.ground(images, caption_ids=ids, caption_lengths=lengths)
    assert out.logits.shape == (2, 32, 32) and torch.isfinite(out.logits).all()
    model.save_pretrained(tmp_path / "saved")
    with torch.no_grad():
        again = load_model(tmp_path / "saved").eval().ground(images, caption_ids=ids, caption_lengths=lengths)
    assert torch.equal(again.logits, out.logits)


def test_image_tokens_follow_the_checkpoint_geometry(tmp_path):
    """InternVL3-*-hf: 448 px tile, patch 14, downsample 0.5 -> 256 image tokens (config image_seq_length), and the
    features equal transformers' own get_image_features on the same pixels."""
    vlm_dir, _ = _internvl_hf_dir(tmp_path, vision=dict(image_size=[448, 448], patch_size=[14, 14],
                                                        num_hidden_layers=1), image_seq_length=256)
    sam2_dir, _ = _sam2_hub_dir(tmp_path, video=False)
    model = build_model(ModelConfig(preset="pretrained", vlm_path=str(vlm_dir), sam2_path=str(sam2_dir))).eval()
    assert model.num_image_tokens == 256 == model.vlm.config.image_seq_length and model.grid == 16
    images, _ = _inputs()
    with torch.no_grad():
        ours = model.image_features(images)
        px = model._pixels(images, 448, "bicubic")
        ref = model.vlm.model.get_image_features(pixel_values=px, return_dict=True).pooler_output
    assert torch.equal(ours, ref)


def _llama_style_tokenizer():
    """A tokenizer that begins every encoded text with BOS, as the InternLM2-based "-hf" tokenizers (Llama type,
    add_bos_token) do, with the chat markers and image tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "please", "segment", "give", "me", "a", "short", "description", "of",
             "region1", "it", "is", "the", "red", "circle", ".", "\n"]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")
    fast.add_tokens(["<|im_start|>", "<|im_end|>", IMG_START, "</img>", IMG_CONTEXT], special_tokens=True)
    add_new_special_tokens(fast)
    return fast


def test_prompts_begin_with_bos_when_the_tokenizer_adds_one():
    tok = _llama_style_tokenizer()
    prompts = PromptBuilder(tok, num_image_tokens=3)
    for batch in (prompts.caption_prompts([2, 1]), prompts.ground_prompts([[14, 15], [16]])):
        for row in range(2):
            ids = batch.ids[row][batch.attention_mask[row].bool()].tolist()
            assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
            assert ids[1] == tok.convert_tokens_to_ids("<|im_start|>")
        for row, pos in enumerate(batch.image_pos):
            assert (batch.ids[row, pos] == tok.convert_tokens_to_ids(IMG_CONTEXT)).all()
            assert batch.ids[row, pos[0] - 1] == tok.convert_tokens_to_ids(IMG_START)
    # a tokenizer without BOS (Qwen2's, the word-level one) is unchanged
    plain = PromptBuilder(build_word_tokenizer(), num_image_tokens=3).caption_prompts([1])
    assert plain.ids[0, 0].item() == build_word_tokenizer().convert_tokens_to_ids(IMG_START)


def _write_config(d: Path, **fields) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(fields))
    return d


@pytest.mark.parametrize("case", ["internvl_remote_code", "sa2va_release", "sam2_original_dir", "sam2_pt_file"])
def test_look_alike_directories_say_what_to_do(tmp_path, case):
    vlm_dir, _ = _internvl_hf_dir(tmp_path)
    sam2_dir, _ = _sam2_hub_dir(tmp_path)
    original = tmp_path / "sam2.1-hiera-large-original"
    original.mkdir()
    (original / "sam2.1_hiera_large.pt").write_bytes(b"")
    (original / "sam2.1_hiera_l.yaml").write_text("model: {}\n")
    vlm, sam2, key, want = {
        "internvl_remote_code": (_write_config(tmp_path / "InternVL3-1B", model_type="internvl_chat"), sam2_dir,
                                 "vlm_path", "convert_internvl_weights_to_hf"),
        "sa2va_release": (_write_config(tmp_path / "Sa2VA-1B", model_type="sa2va_chat"), sam2_dir, "vlm_path",
                          "dualloop convert-sa2va"),
        "sam2_original_dir": (vlm_dir, original, "sam2_path", "convert_sam2_to_hf"),
        "sam2_pt_file": (vlm_dir, original / "sam2.1_hiera_large.pt", "sam2_path", "convert_sam2_to_hf"),
    }[case]
    with pytest.raises(ValueError) as e:
        build_model(ModelConfig(preset="pretrained", vlm_path=str(vlm), sam2_path=str(sam2)))
    msg = str(e.value)
    assert f"model.{key}" in msg and want in msg and str(vlm if key == "vlm_path" else sam2) in msg
