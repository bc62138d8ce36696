"""The model's inputs follow what the real checkpoints were trained with (InternVL "-hf" / Sa2VA / SAM2), also where
the tiny word-level test tokenizer would not notice: image resizing, prompt text under a byte-level BPE tokenizer
(Qwen2's, as in InternVL3-*-hf), and the chat turn's end token."""
import numpy as np
import pytest
import torch
from PIL import Image

from dualloop.config import LoraConfig, ModelConfig
from dualloop.model import build_model
from dualloop.model.build import _assemble
from dualloop.model.composite import IMAGENET_MEAN, IMAGENET_STD
from dualloop.model.presets import random_preset
from dualloop.model.prompts import PromptBuilder
from dualloop.model.tokenizer import IMG_CONTEXT, IMG_END, IMG_START, add_new_special_tokens

torch.set_num_threads(1)


def _byte_level_tokenizer(eos_token: str):
    """A small Qwen2 tokenizer (Qwen's pre-tokenizer regex + byte-level BPE, a few merges such as " the"), with the
    chat markers and InternVL's image tokens as in InternVL3-*-hf, and the given eos token."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2TokenizerFast

    merges = [("Ġ", "t"), ("Ġt", "h"), ("Ġth", "e"), ("Ġ", "i"), ("Ġi", "s"), ("Ġ", "r"), ("Ġr", "e"), ("Ġre", "d")]
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Qwen2TokenizerFast(vocab=vocab, merges=merges, unk_token=None, eos_token="<|endoftext|>",
                             pad_token="<|endoftext|>")
    tok.add_tokens(["<|im_start|>", "<|im_end|>", IMG_START, IMG_END, IMG_CONTEXT], special_tokens=True)
    tok.eos_token = eos_token
    tok.padding_side = "left"
    return tok


def _unpadded(batch, row: int) -> list[int]:
    return batch.ids[row][batch.attention_mask[row].bool()].tolist()


def test_ground_prompt_reads_as_sa2va_text_with_a_byte_level_tokenizer():
    """Caption ids carry no leading space (generated after "assistant\\n" or encoded alone): the prompt must still
    read "Please segment the red circle." (not "segmentthe"), and the answer must be tokenized as Sa2VA's text
    "It is [SEG]." is (with a " " piece before [SEG])."""
    tok = _byte_level_tokenizer("<|im_end|>")
    add_new_special_tokens(tok)
    prompts = PromptBuilder(tok, num_image_tokens=2)
    spans = [tok.encode(c, add_special_tokens=False) for c in ("the red circle", "a red dot")]
    batch = prompts.ground_prompts(spans)
    for row, caption in enumerate(("the red circle", "a red dot")):
        ids = _unpadded(batch, row)
        want = (f"<|im_start|>user\n{IMG_START}{IMG_CONTEXT * 2}{IMG_END}\nPlease segment {caption}.<|im_end|>\n"
                f"<|im_start|>assistant\nIt is [SEG].")
        assert tok.decode(ids) == want
        answer = tok.encode("It is [SEG].", add_special_tokens=False)
        assert ids[-len(answer):] == answer
        assert batch.ids[row, batch.seg_pos[row]] == tok.convert_tokens_to_ids("[SEG]")


def test_sa2va_prompt_style_reads_as_sa2va_training_text():
    """`model.prompt_style: sa2va`: the caption and grounding prompts are the text Sa2VA was trained with (its Osprey
    region prompt and SEG_QUESTIONS / ANSWER_LIST entries); the caption prompt token for token as its tokenizer
    encodes that text."""
    tok = _byte_level_tokenizer("<|im_end|>")
    add_new_special_tokens(tok)
    prompts = PromptBuilder(tok, num_image_tokens=2, style="sa2va")
    image = f"{IMG_START}{IMG_CONTEXT * 2}{IMG_END}"
    batch = prompts.ground_prompts([tok.encode("the red circle", add_special_tokens=False)])
    want = (f"<|im_start|>user\n{image}\nPlease segment the red circle in this image.<|im_end|>\n"
            "<|im_start|>assistant\nIt is [SEG].")
    assert tok.decode(_unpadded(batch, 0)) == want  # the caption's ids stay as generated (no merged " the")
    batch = prompts.caption_prompts([3])
    want = (f"<|im_start|>user\n{image}\nThere are 1 part regions in the picture: region1<vp>{IMG_CONTEXT * 3}</vp>."
            "\nPlease give me a short description of region1.<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(_unpadded(batch, 0)) == want
    assert _unpadded(batch, 0) == tok.encode(want, add_special_tokens=False)
    assert (batch.ids[0, batch.region_pos[0]] == tok.convert_tokens_to_ids(IMG_CONTEXT)).all()
    with pytest.raises(ValueError, match="model.prompt_style"):
        PromptBuilder(tok, num_image_tokens=2, style="llava")


def test_sa2va_text_queries_are_tokenized_as_sa2va_encodes_the_sentence():
    """A text query (a referring expression) with the sa2va style: the grounding prompt is, token for token, what
    Sa2VA's tokenizer makes of "<image>\nPlease segment the red circle in this image." (" segment", " the"), not
    " segment", " ", "the"; a caption's ids (as generated) keep the prompt as it was, whatever their first token."""
    tok = _byte_level_tokenizer("<|im_end|>")
    add_new_special_tokens(tok)
    prompts = PromptBuilder(tok, num_image_tokens=2, style="sa2va")
    image = f"{IMG_START}{IMG_CONTEXT * 2}{IMG_END}"
    turn = "<|im_start|>user\n{}\nPlease segment {} in this image.<|im_end|>\n<|im_start|>assistant\nIt is [SEG]."
    queries = ("the red circle", "red circle", "2 red circles.", "the  red circle ", " the red circle", "\tred", "")
    for query in queries:
        ids = _unpadded(prompts.ground_prompts([prompts.query_span(query)], queries=[True]), 0)
        assert ids == tok.encode(turn.format(image, query), add_special_tokens=False), repr(query)
    # a caption's ids as generated: " " + "the" (the dual loop's captions, as trained), also one that begins with
    # a space piece (the head keeps its space: the same prompt as the caption's embeddings get)
    for caption in ("the red circle", " the red circle"):
        span = tok.encode(caption, add_special_tokens=False)
        with_ids, with_placeholders = prompts.ground_prompts([span]), prompts.ground_prompts([[0] * len(span)])
        assert torch.equal(with_ids.span_pos[0], with_placeholders.span_pos[0])
        with_ids.ids[0, with_ids.span_pos[0]] = 0
        assert torch.equal(with_ids.ids, with_placeholders.ids)
        ids = _unpadded(prompts.ground_prompts([span]), 0)
        assert tok.decode(ids) == turn.format(image, caption)
    assert _unpadded(prompts.ground_prompts([span]), 0) != tok.encode(turn.format(image, "the red circle"),
                                                                      add_special_tokens=False)
    # Sa2VA's RefCOCO evaluation text (a space after the newline), token for token
    evaluation = PromptBuilder(tok, num_image_tokens=2, style="sa2va_eval")
    ids = _unpadded(evaluation.ground_prompts([evaluation.query_span("the red circle")], queries=[True]), 0)
    want = turn.replace("\nPlease", "\n Please").format(image, "the red circle")
    assert ids == tok.encode(want, add_special_tokens=False)
    assert evaluation.caption_prompts([3]).ids.tolist() == prompts.caption_prompts([3]).ids.tolist()
    # the dualloop style reads a query as a caption: its models ground generated captions in training
    plain = PromptBuilder(tok, num_image_tokens=2)
    caption = tok.encode("the red circle", add_special_tokens=False)
    assert plain.query_span("the red circle") == caption
    assert plain.ground_prompts([caption], queries=[True]).ids.tolist() == plain.ground_prompts([caption]).ids.tolist()


def test_eval_and_predict_ground_text_queries_as_queries(monkeypatch):
    """`dualloop eval`'s ground-truth captions and `predict --text` go through encode_queries (the sentence's
    tokens with the sa2va style); the tiny model's word-level tokenizer has no spaces, so its ids are a caption's."""
    from dualloop.eval.predict import predict

    model = build_model(ModelConfig(preset="tiny", prompt_style="sa2va", lora=LoraConfig(enabled=False))).eval()
    seen = []
    encode = model.encode_queries
    monkeypatch.setattr(model, "encode_queries", lambda texts: seen.append(list(texts)) or encode(texts))
    assert encode(["red circle"])[0].tolist() == model.encode_captions(["red circle"])[0].tolist()
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    mask = torch.zeros(64, 64, dtype=torch.uint8)
    mask[10:30, 10:30] = 1
    flags = []
    ground = model.ground
    monkeypatch.setattr(model, "ground", lambda *a, **kw: flags.append(kw.get("queries")) or ground(*a, **kw))
    out = predict(model, image, mask=mask, texts=["red circle", "blue square"], max_new_tokens=3)
    assert seen == [["red circle", "blue square"]] and flags == [[False, True, True]]
    assert [r["name"] for r in out["rows"]] == ["cycle", "text1", "text2"]


def test_sa2va_prompt_style_on_the_tiny_model_has_no_unknown_words():
    model = build_model(ModelConfig(preset="tiny", prompt_style="sa2va", lora=LoraConfig(enabled=False))).eval()
    unk = model.tokenizer.unk_token_id
    caption = model.prompts.caption_prompts([2])
    ground = model.prompts.ground_prompts([model.tokenizer.encode("red circle", add_special_tokens=False)])
    assert unk not in caption.ids.tolist()[0] and unk not in ground.ids.tolist()[0]
    images = [torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)]
    masks = [torch.zeros(64, 64, dtype=torch.bool)]
    masks[0][10:30, 10:30] = True
    with torch.no_grad():
        cap = model.caption(images, masks, max_new_tokens=3)
        out = model.ground(images, caption_ids=cap.ids, caption_lengths=cap.lengths)
    assert torch.isfinite(out.logits).all()


def _chat_model(eos_token: str):
    """The tiny model, but with a byte-level chat tokenizer whose own eos is `eos_token`."""
    tok = _byte_level_tokenizer(eos_token)
    vlm_config, sam2_config, _ = random_preset("tiny")
    vlm_config.text_config.vocab_size = len(tok) + 3  # + [SEG], <vp>, </vp>
    vlm_config.image_token_id = tok.convert_tokens_to_ids(IMG_CONTEXT)
    add_new_special_tokens(tok)
    from transformers import InternVLForConditionalGeneration, Sam2Model

    torch.manual_seed(0)
    vlm = InternVLForConditionalGeneration._from_config(vlm_config)
    sam2 = Sam2Model._from_config(sam2_config)
    cfg = ModelConfig(preset="tiny", lora=LoraConfig(r=4, alpha=8, dropout=0.0))
    return _assemble(vlm, sam2, tok, cfg, torch.float32, None, None, ("random", set())).eval(), tok


@pytest.mark.parametrize("tokenizer_eos", ["<|endoftext|>", "<|im_end|>"])
def test_captions_end_with_the_chat_turn_end(tokenizer_eos):
    """In the chat format the assistant turn ends with <|im_end|> (Sa2VA's qwen/internlm2 templates: SUFFIX
    "<|im_end|>" as EOS; InternVL "-hf" conversion: generation eos 151645 / 92542), whatever the tokenizer's own
    eos is (InternLM2-based checkpoints: "</s>"): decoding stops there, it is never suppressed, and the caption
    loss teaches it."""
    model, tok = _chat_model(tokenizer_eos)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert model.eos_token_id == im_end
    assert model.generation_config(4).eos_token_id == im_end
    scores = model._suppress_special()(None, torch.zeros(1, model.vlm.lm_head.out_features))
    assert scores[0, im_end] == 0
    word = tok.encode("the", add_special_tokens=False)[0]
    out = model._finish_captions(torch.tensor([[word, im_end, word]]))
    assert out.lengths.tolist() == [1] and out.texts == ["t"]

    seen = {}

    def spy(images, masks, ids, lengths, vision_tokens=None):
        seen["ids"], seen["lengths"] = ids, lengths
        return torch.zeros(ids.shape[0], ids.shape[1], model.vlm.lm_head.out_features)

    model.caption_logits = spy
    images = [torch.zeros(3, 32, 32, dtype=torch.uint8)]
    masks = [torch.ones(32, 32, dtype=torch.uint8)]
    model.caption_loss(images, masks, ["the red circle"])
    n = len(tok.encode("the red circle", add_special_tokens=False))
    assert seen["lengths"].tolist() == [n + 1] and seen["ids"][0, n] == im_end


def _reference_pixels(img: torch.Tensor, size: int, resample) -> torch.Tensor:
    pil = Image.fromarray(img.permute(1, 2, 0).numpy()).resize((size, size), resample)
    return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float() / 255.0


def test_vlm_tile_is_resized_bicubic_like_internvl():
    """InternVL / Sa2VA resize the 448 tile with BICUBIC (Sa2VA: T.Resize(..., BICUBIC) on the PIL image; InternVL
    "-hf": GotOcr2 processor, resample BICUBIC); SAM2's 1024 input is a plain bilinear resize (SAM2's transforms,
    transformers' Sam2 processor: BILINEAR). Both then rescale 1/255 and normalise with ImageNet mean/std."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny", lora=LoraConfig(r=4, alpha=8, dropout=0.0))).eval()
    seen = {}
    model.vlm.model.vision_tower.register_forward_pre_hook(
        lambda m, args, kwargs: seen.__setitem__("vlm", kwargs["pixel_values"]), with_kwargs=True)
    model.sam2.vision_encoder.register_forward_pre_hook(lambda m, args: seen.__setitem__("sam2", args[0]))
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (3, 100, 130), generator=g, dtype=torch.uint8)
    with torch.no_grad():
        model.vision_tokens([img])
        ids, lengths = model.encode_captions(["the red circle"])
        model.ground([img], caption_ids=ids, caption_lengths=lengths)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    vlm = seen["vlm"][0].float() * std + mean
    ref = _reference_pixels(img, model.vision_size, Image.BICUBIC)
    # torch's antialiased bicubic vs PIL's (which rounds to uint8): ~0.3/255 apart on average; bilinear is ~6/255
    assert (vlm - ref).abs().mean() < 1.5 / 255
    sam = seen["sam2"][0].float() * std + mean
    ref = _reference_pixels(img, model.sam2_size, Image.BILINEAR)
    assert (sam - ref).abs().mean() < 1.5 / 255


def test_cudnn_attention_is_off_unless_configured():
    """model.cudnn_attention (default off) sets whether torch's SDPA may pick cuDNN: on Hopper it builds a graph per
    new sequence length and torch 2.11's backward can return NaN gradients on padded batches (model/build.py)."""
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        build_model(ModelConfig(preset="tiny"))
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        build_model(ModelConfig(preset="tiny", cudnn_attention=True))
        assert torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def test_the_presets_tokenizer_keeps_left_padding_when_saved(tmp_path):
    from transformers import AutoTokenizer

    from dualloop.model.tokenizer import build_word_tokenizer

    build_word_tokenizer().save_pretrained(str(tmp_path))
    assert AutoTokenizer.from_pretrained(str(tmp_path)).padding_side == "left"


def test_sam2_input_resized_bicubic_like_sa2va_when_configured():
    """`model.sam2_resize: bicubic`: Sa2VA's DirectResize (PIL's default filter, BICUBIC) to SAM2's 1024; the ground
    output carries SAM2's object score, which `model.object_gate` uses at evaluation."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny", sam2_resize="bicubic", lora=LoraConfig(enabled=False))).eval()
    seen = {}
    model.sam2.vision_encoder.register_forward_pre_hook(lambda m, args: seen.__setitem__("sam2", args[0]))
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (3, 50, 70), generator=g, dtype=torch.uint8)  # upscaled, as COCO images are
    with torch.no_grad():
        ids, lengths = model.encode_captions(["the red circle", "a blue square"])
        out = model.ground([img, img], caption_ids=ids, caption_lengths=lengths)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    sam = seen["sam2"][0].float() * std + mean
    assert (sam - _reference_pixels(img, model.sam2_size, Image.BICUBIC)).abs().mean() < 1.5 / 255
    assert (sam - _reference_pixels(img, model.sam2_size, Image.BILINEAR)).abs().mean() > 5 / 255  # it can tell
    assert out.object_score.shape == (2,) and torch.isfinite(out.object_score).all()
    assert not torch.equal(out.object_score[0], out.object_score[1])  # from each prompt, not a constant
    with pytest.raises(ValueError, match="model.sam2_resize"):
        build_model(ModelConfig(preset="tiny", sam2_resize="lanczos"))
