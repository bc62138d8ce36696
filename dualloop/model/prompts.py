"""Prompt building with ids: text pieces are tokenized once, special tokens and slots are inserted as ids.

Never tokenize " [SEG]" or "<vp>" as text: they are inserted by id. Slots (image tokens, region tokens, the caption
span) are runs of placeholder ids whose embeddings the model overwrites; their positions are returned so the model
can scatter features into them. With a checkpoint tokenizer that has Qwen chat markers (InternVL3), the user turn
and the assistant turn are wrapped in `<|im_start|>`/`<|im_end|>` as the checkpoint was trained.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .tokenizer import IMG_CONTEXT, IMG_END, IMG_START, SEG_TOKEN, VP_END, VP_START, special_id

# The texts around the slots, per `model.prompt_style`: (before the region tokens, after them) of the caption
# prompt, (before the caption span, after it) of the grounding prompt.
# - "dualloop": "<image>\nPlease give me a short description of region1<vp>…</vp>." / "<image>\nPlease segment {}."
# - "sa2va": the text Sa2VA was trained with (bytedance/Sa2VA, projects/sa2va/datasets: the Osprey region prompt
#   "There are 1 part regions in the picture: region1<vp>…</vp>.\n" + question, SEG_QUESTIONS "Please segment {} in
#   this image."), for models converted from a Sa2VA release.
# The trailing spaces matter with byte-level BPE / SentencePiece tokenizers (Qwen2, InternLM2), where a space is part
# of the next piece: a caption's ids start without one (generated right after "assistant\n", or encoded alone), so
# without it the model would read "Please segmentthe ...".
# "queries_in_sentence": a text query (a ground-truth referring expression, `predict --text`) is tokenized as part
# of the grounding sentence, as Sa2VA's training and evaluation encode "Please segment the cat in this image." in
# one piece (" segment", " the", " cat"), rather than alone after the prompt's trailing space (" segment", " ",
# "the", " cat": token pairs a Sa2VA model never saw). A dualloop model grounds generated captions, which follow
# that space as their own tokens, in training: its queries are read the same way.
PROMPT_STYLES = {
    "dualloop": {"caption": ("\nPlease give me a short description of region1", "."),
                 "ground": ("\nPlease segment ", "."), "queries_in_sentence": False},
    "sa2va": {"caption": ("\nThere are 1 part regions in the picture: region1",
                          ".\nPlease give me a short description of region1."),
              "ground": ("\nPlease segment ", " in this image."), "queries_in_sentence": True},
}
# "sa2va_eval": Sa2VA's RefCOCO evaluation asks "<image>\n Please segment {} in this image." (evaluation/dataset/
# RES.py: a space after the newline, unlike its training text); with eval.answer=generated its protocol exactly.
PROMPT_STYLES["sa2va_eval"] = dict(PROMPT_STYLES["sa2va"], ground=("\n Please segment ", " in this image."))
# Sa2VA's answer "It is [SEG]." tokenizes to "It", " is", " ", "[SEG]", "."; a word-level tokenizer drops the spaces.
GROUND_ANSWER = "It is "


@dataclass
class PromptBatch:
    """Left-padded prompts: ids [B, L], attention_mask [B, L], and absolute slot positions per sample."""

    ids: torch.Tensor
    attention_mask: torch.Tensor
    image_pos: list[torch.Tensor]  # per sample [N_b] positions of the image tokens (N_b: its tiles x tokens per tile)
    region_pos: list[torch.Tensor]  # per sample [K_b] positions of the region tokens (captioning)
    span_pos: list[torch.Tensor]  # per sample [T_b] positions of the caption span (grounding)
    seg_pos: torch.Tensor | None  # [B] position of [SEG] (grounding, with the given answer)
    # grounding with replies in place of the given answer: per sample the positions of the [SEG]s of its reply
    reply_seg_pos: list[torch.Tensor] | None = None
    # what else the LLM's forward takes over these prompts, set by the model with the image features (Qwen3-VL's
    # DeepStack features and their places)
    llm_inputs: dict = field(default_factory=dict)


class PromptBuilder:
    def __init__(self, tokenizer, num_image_tokens: int, style: str = "dualloop",
                 image_markers: tuple[str, str, str] = (IMG_START, IMG_CONTEXT, IMG_END), system: str | None = None):
        """image_markers: the VLM's (start, image token, end) around an image's tokens: InternVL's <img>,
        <IMG_CONTEXT>, </img>; Qwen-VL's <|vision_start|>, <|image_pad|>, <|vision_end|>. system: a system turn
        before the user's (chat tokenizers only)."""
        if style not in PROMPT_STYLES:
            raise ValueError(f"model.prompt_style must be one of {', '.join(PROMPT_STYLES)}, got {style!r}")
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens  # of one tile: the default per image
        self.img_start, self.img_context, self.img_end = (special_id(tokenizer, t) for t in image_markers)
        self.seg = special_id(tokenizer, SEG_TOKEN)
        self.vp_start = special_id(tokenizer, VP_START)
        self.vp_end = special_id(tokenizer, VP_END)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        vocab = tokenizer.get_vocab()
        chat = "<|im_start|>" in vocab and "<|im_end|>" in vocab
        # Llama-type tokenizers (the InternLM2-based "-hf" checkpoints: InternVL2_5-2B/8B/26B-hf) begin every text
        # with BOS, as those checkpoints were trained (their processor encodes with special tokens); Qwen2's has none.
        turns = (f"<|im_start|>system\n{system}<|im_end|>\n" if system else "") + "<|im_start|>user\n"
        self.user_open = self._leading_bos() + (self._text(turns) if chat else [])
        self.user_close = self._text("<|im_end|>\n<|im_start|>assistant\n") if chat else []
        # The assistant turn ends with <|im_end|> in the chat format (Sa2VA's template: SUFFIX_AS_EOS, stop word; the
        # InternVL "-hf" conversion sets it as the generation eos): the tokenizer's own eos may be another token
        # (InternLM2-based checkpoints: "</s>"; a Qwen2 tokenizer's class default: "<|endoftext|>").
        self.end_of_turn = vocab["<|im_end|>"] if chat else tokenizer.eos_token_id
        texts = PROMPT_STYLES[style]
        self.before_region, self.after_region = (self._text(t) for t in texts["caption"])
        self.before_span, self.after_span = (self._text(t) for t in texts["ground"])
        self.ground_texts = texts["ground"]
        # The grounding head without its trailing space, for a query read in its sentence (`query_span`); only
        # where dropping that space leaves the other tokens as they were.
        self.tight_before_span = None
        if texts["queries_in_sentence"] and texts["ground"][0].endswith(" "):
            tight = self._text(texts["ground"][0].rstrip(" "))
            if self.before_span[:len(tight)] == tight and len(tight) < len(self.before_span):
                self.tight_before_span = tight
        self.period = self._text(".")
        self.answer = self._text(GROUND_ANSWER)

    def _leading_bos(self) -> list[int]:
        bos = self.tokenizer.bos_token_id
        with_special = self.tokenizer.encode("a", add_special_tokens=True)
        return [bos] if bos is not None and with_special[:1] == [bos] else []

    def _text(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def query_span(self, text: str) -> list[int]:
        """The ids of a text query as the grounding sentence holds it, for `ground_prompts(..., queries=)`: with
        `queries_in_sentence` (the sa2va styles) the tokens of "{head}{text}{tail}" encoded whole, between those of
        the head without its trailing space and the tail (" the", " cat" after "segment"); where the sentence does
        not split so (e.g. a query ending in "." that merges with a tail "."), the head's space tokens + the text
        encoded alone (the prompt a caption gets). Otherwise the text encoded alone, as a caption's ids."""
        alone = self._text(text)
        if self.tight_before_span is None:
            return alone
        head, tail = self.ground_texts
        whole = self._text(head + text + tail)
        tight, after = self.tight_before_span, self.after_span
        if whole[:len(tight)] == tight and whole[len(whole) - len(after):] == after \
                and len(whole) >= len(tight) + len(after):
            return whole[len(tight):len(whole) - len(after)]
        return self.before_span[len(tight):] + alone

    def _image(self, n: int) -> list[int]:
        # one <img>…</img> run for all tiles of the image, as Sa2VA's predict_forward writes it (Qwen-VL: its
        # <|vision_start|>…<|vision_end|>, as Sa2VA's datasets write it for arch_type "qwen")
        return [self.img_start] + [self.img_context] * n + [self.img_end]

    def _image_counts(self, num_image_tokens: list[int] | None, batch: int) -> list[int]:
        if num_image_tokens is None:
            return [self.num_image_tokens] * batch
        if len(num_image_tokens) != batch:
            raise ValueError(f"num_image_tokens has {len(num_image_tokens)} entries for {batch} prompts")
        return [int(n) for n in num_image_tokens]

    def caption_prompts(self, num_region_tokens: list[int], num_image_tokens: list[int] | None = None) -> PromptBatch:
        """"<image>\\nPlease give me a short description of region1<vp>{K region tokens}</vp>." per sample (in the
        "dualloop" style); num_image_tokens: per sample (default: one tile's)."""
        seqs, regions = [], []
        counts = self._image_counts(num_image_tokens, len(num_region_tokens))
        for k, n in zip(num_region_tokens, counts):
            if k < 1:
                raise ValueError(f"a region prompt needs at least one region token, got {k}")
            head = self.user_open + self._image(n) + self.before_region + [self.vp_start]
            regions.append((len(head), k))
            seqs.append(head + [self.img_context] * k + [self.vp_end] + self.after_region + self.user_close)
        batch = self._left_pad(seqs, counts)
        offs = batch.pop("offsets")
        region_pos = [torch.arange(s, s + k) + o for (s, k), o in zip(regions, offs)]
        return PromptBatch(region_pos=region_pos, span_pos=[torch.empty(0, dtype=torch.long)] * len(seqs),
                           seg_pos=None, **batch)

    def ground_prompts(self, span_ids: list[list[int]], num_image_tokens: list[int] | None = None,
                       replies: list[list[int]] | None = None, queries: list[bool] | None = None) -> PromptBatch:
        """"<image>\\nPlease segment {caption}." + answer "It is [SEG]." per sample; the span ids are placed as given
        (placeholders when the caption comes as embeddings); queries: per sample, whether its span is a text query's
        `query_span` (it then follows the head without its trailing space: the sentence's own tokens, with the
        sa2va styles); num_image_tokens: per sample (default: one tile's).
        replies: per sample the ids of the assistant's reply in place of the given answer (`eval.answer=generated`):
        [] ends the prompt where the reply begins (to generate it); seg_pos is then None and reply_seg_pos lists
        the positions of each reply's [SEG]s (none: an empty tensor)."""
        for name, rows in (("replies", replies), ("queries", queries)):
            if rows is not None and len(rows) != len(span_ids):
                raise ValueError(f"{name} has {len(rows)} entries for {len(span_ids)} prompts")
        seqs, spans, segs = [], [], []
        counts = self._image_counts(num_image_tokens, len(span_ids))
        for b, (span, n) in enumerate(zip(span_ids, counts)):
            in_sentence = self.tight_before_span is not None and queries is not None and bool(queries[b])
            head = self.user_open + self._image(n) + (self.tight_before_span if in_sentence else self.before_span)
            spans.append((len(head), len(span)))
            body = head + list(span) + self.after_span + self.user_close
            if replies is not None:
                reply = [int(t) for t in replies[b]]
                segs.append([len(body) + k for k, t in enumerate(reply) if t == self.seg])
                seqs.append(body + reply)
                continue
            body = body + self.answer
            segs.append(len(body))
            seqs.append(body + [self.seg] + self.period)
        batch = self._left_pad(seqs, counts)
        offs = batch.pop("offsets")
        span_pos = [torch.arange(s, s + t) + o for (s, t), o in zip(spans, offs)]
        regions = [torch.empty(0, dtype=torch.long)] * len(seqs)
        if replies is not None:
            reply_seg_pos = [torch.tensor(s, dtype=torch.long) + o for s, o in zip(segs, offs)]
            return PromptBatch(region_pos=regions, span_pos=span_pos, seg_pos=None, reply_seg_pos=reply_seg_pos,
                               **batch)
        seg_pos = torch.tensor([s + o for s, o in zip(segs, offs)], dtype=torch.long)
        return PromptBatch(region_pos=regions, span_pos=span_pos, seg_pos=seg_pos, **batch)

    def _left_pad(self, seqs: list[list[int]], image_counts: list[int]) -> dict:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        offsets = []
        for b, s in enumerate(seqs):
            o = width - len(s)
            ids[b, o:] = torch.tensor(s, dtype=torch.long)
            mask[b, o:] = 1
            offsets.append(o)
        # Image tokens sit at the same place in every prompt (after the optional BOS and chat opener).
        start = len(self.user_open) + 1
        image_pos = [torch.arange(start, start + n) + o for n, o in zip(image_counts, offsets)]
        return dict(ids=ids, attention_mask=mask, image_pos=image_pos, offsets=offsets)
