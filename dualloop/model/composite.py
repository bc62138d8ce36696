"""DualLoopModel: a VLM (transformers-native InternVL, Qwen2.5-VL or Qwen3-VL) + a SAM2 mask decoder, Sa2VA-style.

caption(images, masks)  region captioning: vision tokens of the mask's grid cells go into the <vp> slot
ground(images, caption) segmentation: last hidden state at [SEG] -> text_hidden_fcs -> SAM2 sparse prompt
ground_reply(images, caption) the assistant's own reply to the grounding prompt (Sa2VA's evaluation), which
                        segment_replies(images, reply) then segments from instead of the given "It is [SEG]."

Inputs are lists of uint8 tensors (images [3, H, W], masks [H, W] in {0, 1}); the model resizes internally. Every
call runs each submodule the same number of times for a given batch size (ZeRO-3 ranks must stay in step), and no
weight is read outside its module's forward except under `GatheredParameters`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, LogitsProcessorList

from ..distributed import all_ranks
from .inputs import check_caption, check_images, check_masks
from .kv_decoding import additive_mask, allowed_keys, make_steps, prepared_mask_unsupported
from .prompts import PromptBatch, PromptBuilder
from .replies import EMPTY_MASK_LOGIT, per_reply  # noqa: F401 - EMPTY_MASK_LOGIT: part of ground()'s contract
from .sampling import GumbelSampler, SuppressTokens
from .tokenizer import SEG_TOKEN, VP_END, VP_START
from .trainable import COMPONENTS, component_of, numel, parameters_by_component
from .vision_families import IMAGENET_MEAN, IMAGENET_STD, InternVLImages, vision_family
from .zero3_params import gathered


@dataclass
class CaptionOutput:
    ids: torch.Tensor  # [B, T] right-padded with pad_token_id, EOS excluded, T <= max_new_tokens
    lengths: torch.Tensor  # [B]
    texts: list[str]


@dataclass
class ReplyOutput(CaptionOutput):
    """`ground_reply`'s replies (texts keep the special tokens) and what `segment_replies` needs to segment them
    without running the prompts through the LLM again."""
    # [R, H] the LLM's last hidden state at each [SEG] of the replies (as an input token), in reply order
    seg_hidden: torch.Tensor | None = None
    # [B] how many [SEG]s each reply holds
    seg_count: torch.Tensor | None = None


@dataclass
class GroundOutput:
    logits: torch.Tensor  # [B, h, w] (multimask="best") or [B, M, h, w] (multimask="all")
    iou_pred: torch.Tensor  # [B] or [B, M]
    # [B] SAM2's object-score logit (is the object there at all); None from a decoder without that head
    object_score: torch.Tensor | None = None
    # [B] how many [SEG]s each reply held, with replies in place of the given answer (`segment_replies`,
    # `ground(reply_ids=...)`); a reply without one has an empty mask (every logit EMPTY_MASK_LOGIT); None with the
    # given answer
    seg_count: torch.Tensor | None = None


END_CHECK_EVERY = 4  # caption decoding asks whether every sequence has ended (a host sync) every this many tokens
# The grounding reply's length limit (`ground_reply`): Sa2VA's RefCOCO replies ("Sure, [SEG].", "It is [SEG].") take
# a few tokens; a reply with no [SEG] within it gets no mask, as one without any in Sa2VA's evaluation.
GROUND_REPLY_MAX_NEW_TOKENS = 16


class DualLoopModel(nn.Module):
    def __init__(self, vlm, sam2, tokenizer, text_hidden_fcs: nn.Module, model_cfg, hf_ds_config=None):
        super().__init__()
        self.vlm = vlm
        self.sam2 = sam2
        self.text_hidden_fcs = text_hidden_fcs
        self.tokenizer = tokenizer
        self.model_cfg = model_cfg
        self.hf_ds_config = hf_ds_config  # keeps transformers' weakref to the DeepSpeed config alive (ZeRO-3)
        vcfg = vlm.config
        self.vision = vision_family(self)  # how images become LLM tokens (vision_families.py)
        internvl = isinstance(self.vision, InternVLImages)
        # InternVL's fixed tile: its size, token grid side and tokens per tile (None for other families)
        self.vision_size = self.vision.size if internvl else None
        self.grid = self.vision.grid if internvl else None
        self.num_image_tokens = self.vision.tokens_per_tile if internvl else None
        self.sam2_size = int(sam2.config.prompt_encoder_config.image_size)
        self._read_conventions()
        self.seg_token_id = tokenizer.convert_tokens_to_ids(SEG_TOKEN)
        self.vp_start_id = tokenizer.convert_tokens_to_ids(VP_START)
        self.vp_end_id = tokenizer.convert_tokens_to_ids(VP_END)
        self.pad_token_id = self.prompts.pad
        self.eos_token_id = self.prompts.end_of_turn  # stop token of captions and their loss target
        self.hidden_size = int(vcfg.text_config.hidden_size)
        self.last_decoding: str | None = None  # which decoding path the last caption() ran (kv_decoding)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def _read_conventions(self) -> None:
        """How the model reads its inputs and predicts, from `model_cfg` (config.MODEL_CONVENTIONS)."""
        cfg = self.model_cfg
        self.max_tiles = int(getattr(cfg, "max_tiles", 1))
        if self.max_tiles < 1:
            raise ValueError(f"model.max_tiles must be >= 1, got {self.max_tiles}")
        if self.max_tiles > 1 and not isinstance(self.vision, InternVLImages):
            raise ValueError(f"model.max_tiles={self.max_tiles}: tiling is InternVL's; the {self.vision.name} VLM "
                             "reads each image whole, resized within model.min_pixels and model.max_pixels")
        self.sam2_resize = str(getattr(cfg, "sam2_resize", "bilinear"))
        if self.sam2_resize not in ("bilinear", "bicubic"):
            raise ValueError(f"model.sam2_resize must be bilinear or bicubic, got {self.sam2_resize!r}")
        lo, hi = int(getattr(cfg, "min_pixels", 1)), int(getattr(cfg, "max_pixels", 1))
        if not 0 < lo <= hi:
            raise ValueError(f"model.min_pixels and model.max_pixels must satisfy 0 < min <= max, got {lo}, {hi}")
        # Sa2VA-Qwen2_5-VL's evaluation prompts through Qwen2.5-VL's chat template, which opens with its default
        # system turn (its training text has none)
        system = self.vision.eval_system if cfg.prompt_style == "sa2va_eval" else None
        self.prompts = PromptBuilder(self.tokenizer, self.num_image_tokens or 0, cfg.prompt_style,
                                     image_markers=self.vision.markers, system=system)

    def use_conventions(self, **settings) -> None:
        """Read inputs and predict with other MODEL_CONVENTIONS settings (prompt_style, max_tiles, sam2_resize,
        object_gate) than the model was built with; the weights stay as they are. E.g. `dualloop eval` of a
        converted Sa2VA with `model.max_tiles=1`, against its recorded 12."""
        from ..config import MODEL_CONVENTIONS

        unknown = sorted(set(settings) - set(MODEL_CONVENTIONS))
        if unknown:
            raise ValueError(f"not model conventions: {', '.join(unknown)} (those are {', '.join(MODEL_CONVENTIONS)})")
        before = self.model_cfg
        self.model_cfg = dataclasses.replace(before, **settings)
        try:
            self._read_conventions()
        except ValueError:
            self.model_cfg = before
            self._read_conventions()
            raise

    # ------------------------------------------------------------------------------------------ small helpers
    @property
    def device(self) -> torch.device:
        return self.text_hidden_fcs[0].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text_hidden_fcs[0].weight.dtype

    @property
    def language_model(self) -> nn.Module:
        return self.vlm.model.language_model

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """[..., hidden] through the LLM's input-embedding module (new-token rows included; ZeRO-3 safe)."""
        return self.vlm.get_input_embeddings()(ids.to(self.device))

    def save_pretrained(self, directory):
        """Config + tokenizer + weights (LoRA adapters, new-token rows included); `load_model(directory)` reloads."""
        from .build import save_pretrained

        return save_pretrained(self, directory)

    def vision_language_modules(self) -> list[nn.Module]:
        """Modules used by caption()/caption_logits(): the whole VLM (vision tower, projector, LLM, LM head,
        new-token rows)."""
        return [self.vlm]

    def zero3_leaf_classes(self) -> list[type]:
        """The repeated blocks of the LLM, the vision tower and SAM2's image encoder (decoder layers, ViT layers,
        Hiera blocks): what ZeRO-3 may fetch whole, block by block. Each takes one hidden-state input; SAM2's
        two-way attention blocks (queries and keys both carry gradient) are not among them: DeepSpeed would
        release a leaf's weights when the first of its inputs got its gradient."""
        roots = (self.language_model, self.vision.tower, self.sam2.vision_encoder)
        classes = {}
        for root in roots:
            for m in root.modules():
                if isinstance(m, nn.ModuleList) and len(m) > 1 and len({type(c) for c in m}) == 1 \
                        and any(True for _ in m[0].children()):
                    classes[type(m[0])] = None
        return list(classes)

    def parameter_groups(self) -> list[dict]:
        groups = []
        for comp, params in parameters_by_component(self).items():
            n = sum(numel(p) for _, p in params)
            trainable = sum(numel(p) for _, p in params if p.requires_grad)
            groups.append({"name": comp, "params": n, "trainable": trainable > 0, "trainable_params": trainable})
        return groups

    @staticmethod
    def distinct_images(images) -> tuple[list, torch.Tensor | None]:
        """(the distinct images, by identity, and the row of each input image among them, or None when all are
        distinct). Reinforce grounds each image K times, eval grounds an image with its generated and its
        ground-truth caption, and the tokens of a step's images1 + images2 come from one call: the encoders run
        once per distinct image."""
        rows: dict[int, int] = {}
        index = [rows.setdefault(id(img), len(rows)) for img in images]
        if len(rows) == len(images):
            return list(images), None
        firsts = {row: img for img, row in zip(images, index)}
        return [firsts[r] for r in range(len(rows))], torch.tensor(index)

    def _pixels(self, images, size: int, mode: str = "bilinear") -> torch.Tensor:
        """Plain resize to size x size (antialiased, clamped to [0, 1] as a uint8 image would be), ImageNet norm.
        mode: "bicubic" for the VLM tile (InternVL / Sa2VA: PIL BICUBIC, the "-hf" GotOcr2 processor: BICUBIC),
        "bilinear" for SAM2 (SAM2's torchvision Resize, transformers' Sam2 processor: BILINEAR; `model.sam2_resize:
        bicubic` as Sa2VA, whose DirectResize is PIL's default, BICUBIC)."""
        out = []
        for img in images:
            x = img.to(self.device, torch.float32).unsqueeze(0) / 255.0
            if tuple(x.shape[-2:]) != (size, size):
                x = F.interpolate(x, size=(size, size), mode=mode, align_corners=False, antialias=True).clamp(0, 1)
            out.append(x)
        x = torch.cat(out)
        return (x - self.pixel_mean) / self.pixel_std

    # ------------------------------------------------------------------------------------------ VLM pieces
    def tiles_of(self, images) -> list[int]:
        """How many VLM tiles each image becomes (InternVL, `model.max_tiles`; tiles.py): its image tokens are that
        many times `num_image_tokens`."""
        if not isinstance(self.vision, InternVLImages):
            raise ValueError(f"tiles: the {self.vision.name} VLM does not tile its images")
        return [self.vision._tiles(img) for img in images]

    def _tower_tokens(self, images) -> torch.Tensor:
        """[B, N, C]: each image's vision tokens before the projector in a row, zero-padded to the longest; the
        tower runs once per distinct image."""
        images, index = self.distinct_images(images)
        feats = self.vision.tower_tokens(images)
        return feats if index is None else feats[index.to(feats.device)]

    @property
    def vision_frozen(self) -> bool:
        """No vision-tower weight trains (the projector may): its tokens of an image are the same in every call of a
        step."""
        tower = self.vision.tower.named_parameters(prefix=self.vision.tower_path)
        return not any(p.requires_grad for name, p in tower if component_of(name) == "vision_encoder")

    @torch.no_grad()
    def vision_tokens(self, images) -> torch.Tensor:
        """[B, N, C] the vision tower's tokens (before the trainable projector), in eval mode and without gradient:
        computed once for a frozen tower and passed as `vision_tokens=` to caption() and caption_logits() on the
        same images, instead of running the tower in each."""
        tower = self.vision.tower
        was_training = tower.training
        tower.eval()
        try:
            return self._tower_tokens(images)
        finally:
            tower.train(was_training)

    def vision_tokens_of(self, *groups) -> tuple[torch.Tensor, ...]:
        """`vision_tokens` of several image lists from one tower call (each distinct image once), one tensor per
        list: a step's or an evaluation batch's images1 and images2 share their single-image samples."""
        tokens = self.vision_tokens([img for group in groups for img in group])
        return tuple(tokens.split([len(group) for group in groups]))

    def caption_scores(self, logits: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Logits [..., V] as caption() scores them before sampling: the ids it never generates (special tokens,
        LM-head rows past the tokenizer) at -inf; and how many ids stay allowed (fixed by the tokenizer, so the same
        on every rank). Gumbel captions and REINFORCE's policy live on that support."""
        suppress = self._suppress_special()
        V = logits.shape[-1]
        vocab = min(suppress.vocab, V)
        allowed = vocab - int((suppress.banned < vocab).sum())  # on the host: banned moves to the GPU in the call
        return suppress(None, logits.float().reshape(-1, V)).view(logits.shape), allowed

    def image_features(self, images, vision_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """[B, N, hidden] projected vision tokens of the images (InternVL: each tile row-major grid x grid, several
        tiles in a row; zero rows after an image's own); the tower is skipped when its `vision_tokens` for these
        images are given."""
        return self._features(images, vision_tokens)[0]

    def _features(self, images, vision_tokens: torch.Tensor | None):
        """(image_features, what else the LLM takes of them: the family's, e.g. Qwen3-VL's DeepStack features)."""
        if vision_tokens is None:
            vision_tokens = self._tower_tokens(images)
        elif vision_tokens.shape[0] != len(images):
            raise ValueError(f"vision_tokens has {vision_tokens.shape[0]} rows for {len(images)} images")
        return self.vision.project(vision_tokens)

    def _with_features(self, batch: PromptBatch, images, vision_tokens, regions, span_embeds) -> torch.Tensor:
        """The prompts' embeddings with the image features in place; the LLM's other inputs of them go into
        `batch.llm_inputs`."""
        feats, extra = self._features(images, vision_tokens)
        batch.llm_inputs = self.vision.llm_inputs(extra, batch.image_pos, *batch.ids.shape)
        return self._embed_prompt(batch, feats, regions, span_embeds)

    def _embed_prompt(self, batch: PromptBatch, feats: torch.Tensor, regions: list[torch.Tensor] | None,
                      span_embeds: list[torch.Tensor] | None) -> torch.Tensor:
        """Embed prompt ids once, then scatter image features, region features and caption-span embeddings."""
        dev = self.device
        emb = self.embed_tokens(batch.ids.to(dev))
        b = len(batch.image_pos)
        rows, cols, vals = [], [], []
        for i in range(b):
            rows.append(torch.full_like(batch.image_pos[i], i).to(dev))
            cols.append(batch.image_pos[i].to(dev))
            vals.append(feats[i, : batch.image_pos[i].numel()])
            if regions is not None:
                rows.append(torch.full_like(batch.region_pos[i], i).to(dev))
                cols.append(batch.region_pos[i].to(dev))
                vals.append(feats[i, regions[i].to(dev)])
            if span_embeds is not None and span_embeds[i].shape[0] > 0:
                rows.append(torch.full_like(batch.span_pos[i], i).to(dev))
                cols.append(batch.span_pos[i].to(dev))
                vals.append(span_embeds[i])
        vals = torch.cat(vals).to(emb.dtype)
        return emb.index_put((torch.cat(rows), torch.cat(cols)), vals)

    def _llm_inputs(self, attention_mask: torch.Tensor, batch: PromptBatch, images) -> dict:
        """The LLM forward's inputs over prompts (+ tokens after them) besides embeddings and mask, on the device:
        position_ids ([B, L], or [3, B, L] for Qwen's multimodal RoPE) and the family's `batch.llm_inputs`.
        attention_mask: on the CPU, where the prompts are built (no device sync)."""
        inputs = dict(batch.llm_inputs)
        where = inputs.get("visual_pos_masks")
        if where is not None and where.shape[1] < attention_mask.shape[1]:  # tokens after the prompts
            inputs["visual_pos_masks"] = F.pad(where, (0, attention_mask.shape[1] - where.shape[1]))
        inputs["position_ids"] = self.vision.positions(attention_mask, batch.image_pos, images).to(self.device)
        return inputs

    def _run_llm(self, embeds: torch.Tensor, attention_mask: torch.Tensor, inputs: dict) -> torch.Tensor:
        """Last hidden states [B, L, H] of a left-padded batch; attention_mask [B, L] (1 token, 0 padding), best on
        the CPU (checked for padding without a device sync); inputs: `_llm_inputs`. A padded batch gets a prepared
        mask in which padding queries see themselves (`allowed_keys`): their outputs are never used, and no
        attention row is empty."""
        padded = not bool(attention_mask.all())
        mask = attention_mask.to(self.device)  # the one copy; the prepared mask is made on the device
        if padded and prepared_mask_unsupported(self.language_model) is None:
            mask = additive_mask(allowed_keys(mask.bool(), mask.shape[1]), embeds.dtype)[:, None]
        out = self.language_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False, return_dict=True,
                                  **inputs)
        return out.last_hidden_state

    def _caption_prompt(self, images, masks, vision_tokens: torch.Tensor | None = None):
        n = check_images(images)
        check_masks(masks, images)
        regions = [self.vision.region(m.to(self.device), img) for m, img in zip(masks, images)]
        batch = self.prompts.caption_prompts([int(r.numel()) for r in regions], self.vision.token_counts(images))
        return n, batch, self._with_features(batch, images, vision_tokens, regions, None)

    # ------------------------------------------------------------------------------------------ captioning
    @torch.no_grad()
    def caption(self, images, masks, *, max_new_tokens: int = 16, do_sample: bool = False,
                temperature: float = 1.0, top_k: int = 0, synced_gpus: bool = False,
                generator: torch.Generator | None = None, cuda_graph: bool = False,
                vision_tokens: torch.Tensor | None = None) -> CaptionOutput:
        """Describe the masked region of each image. Generation runs in eval mode (no dropout); the previous
        train/eval mode is restored.

        cuda_graph: decode on a static KV cache, replaying each token as a CUDA graph on a GPU (elsewhere the same
        static steps run eagerly). Only when the weights stay in place for the call: not under ZeRO-3 fetching
        per layer. `last_decoding` then says which path ran: "graph", "static" or "dynamic".
        vision_tokens: `vision_tokens(images)` computed before (the tower is then not run)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
        was_training = self.vlm.training
        self.vlm.eval()
        try:
            n, batch, embeds = self._caption_prompt(images, masks, vision_tokens)
            processors = LogitsProcessorList([self._suppress_special()])
            if do_sample:
                processors.append(GumbelSampler(temperature, top_k, generator))
            inputs = self._llm_inputs(batch.attention_mask, batch, images)
            ids = self._decode(embeds, batch.attention_mask.to(self.device), inputs, max_new_tokens, processors,
                               synced_gpus, cuda_graph)
        finally:
            self.vlm.train(was_training)
        return self._finish_captions(ids)

    def generation_config(self, max_new_tokens: int) -> GenerationConfig:
        """What `caption` decodes with, as a transformers GenerationConfig (greedy; sampling is a logits processor):
        `self.vlm.generate(inputs_embeds=..., generation_config=this, logits_processor=...)` gives the same ids."""
        return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_id, bos_token_id=None,
                                use_cache=True, repetition_penalty=1.0)

    def _decode(self, embeds: torch.Tensor, attention_mask: torch.Tensor, inputs: dict,
                max_new_tokens: int, processors: LogitsProcessorList, synced_gpus: bool, cuda_graph: bool = False,
                keep_hidden: bool = False):
        """[B, T <= max_new_tokens] generated ids, each row cut by `_finish_captions` at its first EOS; with
        `keep_hidden` also [B, T, H]: the LLM's last hidden state at each generated token as the next step's input
        (what Sa2VA's evaluation reads at a generated [SEG]). The last token then takes one more LLM step, on every
        rank alike (the ranks stop together or all reach max_new_tokens).

        The decoding `transformers.generate` does (greedy over the processed scores, KV cache, left-padded prompt
        embeddings, positions from the attention mask), written straight on the LLM: without generate's per-token
        bookkeeping, and without its host sync at every token (it asks whether every sequence has ended): here
        that is asked every END_CHECK_EVERY tokens, so the host can queue tokens ahead of the GPU. With
        `synced_gpus` the ranks stop together (ZeRO-3 fetching per layer: every rank must run as many forwards).
        `cuda_graph`: static KV cache, and on CUDA each token after the second is a CUDA graph replay (see
        kv_decoding); the caller guarantees that the weights stay where they are for the call."""
        steps = make_steps(self.language_model, self.vlm.lm_head, self.embed_tokens, self._cache_kwarg(),
                           max_new_tokens, static=cuda_graph, graph=cuda_graph and embeds.is_cuda)
        b = embeds.shape[0]
        dev = embeds.device
        ids = torch.full((b, max_new_tokens), self.pad_token_id, dtype=torch.long, device=dev)
        hidden = embeds.new_zeros(b, max_new_tokens, embeds.shape[-1]) if keep_hidden else None
        ended = torch.zeros(b, dtype=torch.bool, device=dev)
        scores = steps.prefill(embeds, attention_mask, **inputs)
        try:
            for t in range(max_new_tokens):
                scores = processors(ids[:, :t], scores)
                token = torch.where(ended, self.pad_token_id, scores.argmax(-1))
                ids[:, t] = token
                ended |= token == self.eos_token_id
                if t + 1 == max_new_tokens:
                    if keep_hidden:  # the last token's own state (a reply may end on [SEG])
                        steps.next(token)
                        hidden[:, t] = steps.hidden
                    break
                if (t + 1) % END_CHECK_EVERY == 0 and self._all_ended(ended, synced_gpus):
                    # every row has ended: each kept token is followed by its EOS, whose state is never read
                    ids = ids[:, : t + 1]
                    hidden = hidden[:, : t + 1] if keep_hidden else None
                    break
                scores = steps.next(token)
                if keep_hidden:  # copied out now: a CUDA graph's replay overwrites steps.hidden
                    hidden[:, t] = steps.hidden
            return (ids, hidden) if keep_hidden else ids
        finally:
            self.last_decoding = steps.mode

    @staticmethod
    def _all_ended(ended: torch.Tensor, synced: bool) -> bool:
        done = bool(ended.all())
        return all_ranks(done, ended.device) if synced else done

    def _cache_kwarg(self) -> str:
        """The LLM forward's KV-cache argument: `cache` in newer transformers 5 releases, `past_key_values` before."""
        if not hasattr(self, "_cache_arg"):
            import inspect

            params = inspect.signature(self.language_model.forward).parameters
            self._cache_arg = "cache" if "cache" in params else "past_key_values"
        return self._cache_arg

    def _suppress_special(self) -> SuppressTokens:
        special = set(self.tokenizer.all_special_ids) | {self.seg_token_id, self.vp_start_id, self.vp_end_id,
                                                          self.pad_token_id}
        image_token = getattr(self.vlm.config, "image_token_id", None)
        if image_token is not None:
            special.add(int(image_token))
        vocab = self.tokenizer.get_vocab()
        special |= {vocab[t] for t in self.vision.never_in_captions if t in vocab}
        special.discard(self.eos_token_id)
        return SuppressTokens(torch.tensor(sorted(i for i in special if i is not None), dtype=torch.long),
                               len(self.tokenizer))

    def _finish_captions(self, gen: torch.Tensor, skip_special: bool = True) -> CaptionOutput:
        gen = gen.cpu()  # one copy: the per-token reads below would each wait on the GPU
        b, t = gen.shape
        is_eos = gen == self.eos_token_id
        first_eos = torch.where(is_eos.any(-1), is_eos.float().argmax(-1), torch.full((b,), t, device=gen.device))
        lengths = first_eos.long()
        keep = torch.arange(t, device=gen.device)[None] < lengths[:, None]
        ids = torch.where(keep, gen, torch.full_like(gen, self.pad_token_id))[:, : int(lengths.max().item())]
        vocab = len(self.tokenizer)
        texts = []
        for i in range(b):
            row = [int(x) if int(x) < vocab else self.tokenizer.unk_token_id for x in ids[i, : int(lengths[i])]]
            texts.append(self.tokenizer.decode(row, skip_special_tokens=skip_special).strip())
        return CaptionOutput(ids=ids.cpu(), lengths=lengths.cpu(), texts=texts)

    def caption_logits(self, images, masks, caption_ids: torch.Tensor, caption_lengths: torch.Tensor,
                       vision_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T, V] teacher-forced logits: logits[:, t] predicts caption token t from the prompt and tokens < t.
        vision_tokens: as in caption()."""
        caption_ids, caption_lengths = check_caption(caption_ids, caption_lengths, len(images))
        n, batch, embeds = self._caption_prompt(images, masks, vision_tokens)
        dev = self.device
        t = caption_ids.shape[1]
        cap_mask = (torch.arange(t)[None] < caption_lengths[:, None]).long()
        embeds = torch.cat([embeds, self.embed_tokens(caption_ids.to(dev)).to(embeds.dtype)], dim=1)
        mask = torch.cat([batch.attention_mask, cap_mask], dim=1)
        hidden = self._run_llm(embeds, mask, self._llm_inputs(mask, batch, images))
        p = batch.ids.shape[1]
        return self.vlm.lm_head(hidden[:, p - 1: p - 1 + t])

    def caption_loss(self, images, masks, captions: list[str]) -> torch.Tensor:
        """[B] mean token cross-entropy per sample over the caption's tokens and the closing EOS."""
        if len(captions) != len(images):
            raise ValueError(f"captions has {len(captions)} entries for {len(images)} images")
        ids, lengths = self.encode_captions(captions)
        ids = torch.cat([ids, torch.full((ids.shape[0], 1), self.pad_token_id, dtype=torch.long)], dim=1)
        ids[torch.arange(ids.shape[0]), lengths] = self.eos_token_id
        logits = self.caption_logits(images, masks, ids, lengths + 1)
        ce = F.cross_entropy(logits.float().transpose(1, 2), ids.to(logits.device), reduction="none")
        valid = (torch.arange(ids.shape[1])[None] < (lengths + 1)[:, None]).to(ce.device)
        return (ce * valid).sum(-1) / valid.sum(-1)

    def encode_captions(self, texts: list[str], max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids [B, T] (no special tokens added) and lengths [B]."""
        _check_texts(texts)
        if max_len is not None and max_len < 0:
            raise ValueError(f"max_len must be >= 0, got {max_len}")
        return self._padded_rows([list(self.tokenizer.encode(s, add_special_tokens=False)) for s in texts], max_len)

    def encode_queries(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Text queries to ground (referring expressions, `predict --text`): as `encode_captions`, but each text's
        ids as the grounding sentence holds it (`PromptBuilder.query_span`: with the sa2va prompt styles " the",
        " cat" as Sa2VA encodes "Please segment the cat in this image."; the same ids as a caption's otherwise).
        Ground them with `ground(..., queries=[True] * B)` (and `ground_reply` likewise)."""
        _check_texts(texts)
        return self._padded_rows([self.prompts.query_span(s) for s in texts])

    def _padded_rows(self, rows: list[list[int]], max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if max_len is not None:
            rows = [r[:max_len] for r in rows]
        width = max([len(r) for r in rows], default=0)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return ids, torch.tensor([len(r) for r in rows], dtype=torch.long)

    # ------------------------------------------------------------------------------------------ grounding
    def ground(self, images, *, caption_ids: torch.Tensor | None = None, caption_lengths: torch.Tensor | None = None,
               caption_embeds: torch.Tensor | None = None, multimask: str = "best",
               vision_tokens: torch.Tensor | None = None, reply_ids: torch.Tensor | None = None,
               reply_lengths: torch.Tensor | None = None, queries: list[bool] | None = None) -> GroundOutput:
        """Mask logits from SAM2's decoder prompted by the [SEG] hidden state of "Please segment {caption}.".
        vision_tokens: `vision_tokens(images)` computed before (the VLM's tower is then not run).
        queries: per sample, whether its caption_ids are a text query's (`encode_queries`; default: none are).
        reply_ids, reply_lengths: replies (right-padded [B, T] and [B]) in place of the given answer "It is [SEG].",
        teacher-forced: the hidden state at each [SEG] of a reply (over prompt + reply: the state generation computes
        with that [SEG] as its input) prompts SAM2, and a reply's masks are united (the maximum of their logits); a
        reply without [SEG] gets an empty mask (every logit EMPTY_MASK_LOGIT). `seg_count` of the output says how
        many [SEG]s each reply held. For `ground_reply`'s own replies `segment_replies` gives this without the
        second pass through the LLM."""
        b = check_images(images)
        if multimask not in ("best", "all"):
            raise ValueError(f"multimask must be 'best' or 'all', got {multimask!r}")
        if reply_ids is not None:
            return self._ground_replies(images, caption_ids, caption_lengths, caption_embeds, multimask,
                                        vision_tokens, reply_ids, reply_lengths, queries)
        batch, embeds = self._ground_prompt(images, caption_ids, caption_lengths, caption_embeds, vision_tokens,
                                            queries=queries)
        hidden = self._run_llm(embeds, batch.attention_mask, self._llm_inputs(batch.attention_mask, batch, images))
        seg_hidden = hidden[torch.arange(b, device=self.device), batch.seg_pos.to(self.device)]
        prompt = self.text_hidden_fcs(seg_hidden)
        return self._decode_masks(images, prompt, multimask)

    def _ground_prompt(self, images, caption_ids, caption_lengths, caption_embeds, vision_tokens,
                       replies: list[list[int]] | None = None,
                       queries: list[bool] | None = None) -> tuple[PromptBatch, torch.Tensor]:
        """The grounding prompts (with the given answer, or `replies`: see PromptBuilder.ground_prompts) and their
        embeddings, image features and caption spans in place."""
        spans, span_embeds = self._ground_spans(len(images), caption_ids, caption_lengths, caption_embeds)
        if queries is not None and caption_embeds is not None and any(queries):
            raise ValueError("queries: text queries come as caption_ids (encode_queries), not as embeddings")
        batch = self.prompts.ground_prompts(spans, self.vision.token_counts(images), replies=replies,
                                            queries=None if queries is None else list(queries))
        return batch, self._with_features(batch, images, vision_tokens, None, span_embeds)

    def _ground_spans(self, b: int, caption_ids, caption_lengths, caption_embeds):
        """The caption spans of b grounding prompts: (ids per sample, placeholders for embeddings; the embeddings
        per sample or None)."""
        if (caption_ids is None) == (caption_embeds is None):
            raise ValueError("give exactly one of caption_ids or caption_embeds")
        if caption_embeds is not None:
            if caption_lengths is None:
                raise ValueError("caption_lengths is required with caption_embeds")
            if caption_embeds.dim() != 3 or caption_embeds.shape[0] != b or caption_embeds.shape[2] != self.hidden_size:
                raise ValueError(f"caption_embeds must be [B={b}, T, {self.hidden_size}], "
                                 f"got {tuple(caption_embeds.shape)}")
            lengths = torch.as_tensor(caption_lengths).long().cpu()
            if lengths.shape != (b,) or (lengths < 0).any() or (lengths > caption_embeds.shape[1]).any():
                raise ValueError(f"caption_lengths must be [B] in [0, {caption_embeds.shape[1]}], got "
                                 f"{lengths.tolist()}")
            spans = [[self.pad_token_id] * int(n) for n in lengths]
            span_embeds = [caption_embeds[i, : int(lengths[i])] for i in range(b)]
        else:
            ids, lengths = check_caption(caption_ids, caption_lengths, b)
            spans = [ids[i, : int(lengths[i])].tolist() for i in range(b)]
            span_embeds = None
        return spans, span_embeds

    @torch.no_grad()
    def ground_reply(self, images, *, caption_ids: torch.Tensor | None = None,
                     caption_lengths: torch.Tensor | None = None, caption_embeds: torch.Tensor | None = None,
                     max_new_tokens: int = GROUND_REPLY_MAX_NEW_TOKENS, synced_gpus: bool = False,
                     cuda_graph: bool = False, vision_tokens: torch.Tensor | None = None,
                     queries: list[bool] | None = None) -> ReplyOutput:
        """The assistant's reply to each grounding prompt "Please segment {caption}.", generated greedily (Sa2VA's
        evaluation: its predict_forward generates the answer, "Sure, [SEG]." or "It is [SEG]."), for
        `segment_replies(images, out)`, which segments from the hidden state decoding computed at each generated
        [SEG] (as Sa2VA reads generate's hidden states; the prompt is not run through the LLM again). Unlike
        caption() no token is suppressed: the reply may (and should) hold [SEG]. It ends at the end-of-turn token
        or the tokenizer's EOS (Sa2VA stops at both; excluded) or after max_new_tokens. texts keep the special
        tokens ("it is [SEG]."). synced_gpus, cuda_graph, vision_tokens: as in caption() (with `synced_gpus` every
        rank runs as many LLM forwards); queries: as in ground()."""
        check_images(images)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        was_training = self.vlm.training
        self.vlm.eval()
        try:
            batch, embeds = self._ground_prompt(images, caption_ids, caption_lengths, caption_embeds, vision_tokens,
                                                replies=[[] for _ in images], queries=queries)
            inputs = self._llm_inputs(batch.attention_mask, batch, images)
            ids, hidden = self._decode(embeds, batch.attention_mask.to(self.device), inputs, max_new_tokens,
                                       LogitsProcessorList(), synced_gpus, cuda_graph, keep_hidden=True)
        finally:
            self.vlm.train(was_training)
        eos = self.tokenizer.eos_token_id
        if eos is not None and eos != self.eos_token_id:  # the reply ends there too
            ids = torch.where(ids == eos, self.eos_token_id, ids)
        out = self._finish_captions(ids, skip_special=False)
        kept = torch.arange(out.ids.shape[1])[None] < out.lengths[:, None]
        is_seg = (out.ids == self.seg_token_id) & kept
        rows, cols = is_seg.nonzero(as_tuple=True)  # row-major: each reply's [SEG]s in order
        return ReplyOutput(ids=out.ids, lengths=out.lengths, texts=out.texts,
                           seg_hidden=hidden[rows.to(hidden.device), cols.to(hidden.device)],
                           seg_count=is_seg.sum(-1))

    def segment_replies(self, images, reply: ReplyOutput, multimask: str = "best") -> GroundOutput:
        """Masks of `ground_reply`'s replies to the same images: each [SEG]'s hidden state → text_hidden_fcs →
        SAM2, a reply's masks united, a reply without [SEG] an empty mask (as `ground(..., reply_ids=...)`, which
        recomputes those states teacher-forced over prompt + reply: equal up to the KV cache's rounding). One
        text_hidden_fcs and one SAM2 call whatever the replies hold (ZeRO-3 ranks stay in step)."""
        b = check_images(images)
        if multimask not in ("best", "all"):
            raise ValueError(f"multimask must be 'best' or 'all', got {multimask!r}")
        if reply.seg_hidden is None or reply.seg_count is None or reply.seg_count.shape != (b,):
            raise ValueError(f"reply must be ground_reply's output for these {b} images")
        counts = reply.seg_count.long().cpu()
        hidden = reply.seg_hidden
        if bool((counts == 0).any()):  # a stand-in row for each reply without [SEG] (its mask is emptied)
            rows = hidden.split(counts.tolist())
            hidden = torch.cat([r if r.shape[0] else hidden.new_zeros(1, hidden.shape[1]) for r in rows])
        return self._segment_seg_rows(images, hidden, counts, multimask)

    def _ground_replies(self, images, caption_ids, caption_lengths, caption_embeds, multimask: str, vision_tokens,
                        reply_ids: torch.Tensor, reply_lengths: torch.Tensor | None,
                        queries: list[bool] | None) -> GroundOutput:
        """ground() from the replies' [SEG]s, teacher-forced: one LLM forward, then as segment_replies; a reply
        without [SEG] takes one stand-in row (its last token), whose mask is emptied."""
        b = len(images)
        try:
            ids, lengths = check_caption(reply_ids, reply_lengths, b)
        except ValueError as e:
            raise ValueError(f"reply_ids / reply_lengths: {e}") from None
        replies = [ids[i, : int(lengths[i])].tolist() for i in range(b)]
        batch, embeds = self._ground_prompt(images, caption_ids, caption_lengths, caption_embeds, vision_tokens,
                                            replies, queries)
        hidden = self._run_llm(embeds, batch.attention_mask, self._llm_inputs(batch.attention_mask, batch, images))
        last = batch.ids.shape[1] - 1
        counts = torch.tensor([p.numel() for p in batch.reply_seg_pos], dtype=torch.long)
        positions = [p if p.numel() else torch.tensor([last]) for p in batch.reply_seg_pos]
        owner = _owners(counts)
        seg_hidden = hidden[owner.to(self.device), torch.cat(positions).to(self.device)]
        return self._segment_seg_rows(images, seg_hidden, counts, multimask)

    def _segment_seg_rows(self, images, seg_hidden: torch.Tensor, counts: torch.Tensor,
                          multimask: str) -> GroundOutput:
        """SAM2's masks of [SEG] rows [R, H] (reply i's max(counts[i], 1) rows, in reply order), one per reply."""
        owner = _owners(counts)
        out = self._decode_masks([images[int(i)] for i in owner], self.text_hidden_fcs(seg_hidden), multimask)
        logits, iou, obj = per_reply(out.logits, out.iou_pred, out.object_score, owner, counts,
                                     bool(getattr(self.model_cfg, "object_gate", False)))
        return GroundOutput(logits=logits, iou_pred=iou, object_score=obj, seg_count=counts)

    def _decode_masks(self, images, seg_prompt: torch.Tensor, multimask: str) -> GroundOutput:
        sam2 = self.sam2
        b = seg_prompt.shape[0]
        dev = self.device
        sam_dtype = sam2.mask_decoder.iou_token.weight.dtype
        distinct, index = self.distinct_images(images)
        px = self._pixels(distinct, self.sam2_size, self.sam2_resize).to(sam_dtype)
        # SAM2 image encoder: without grad (no activations kept) unless configured trainable.
        encoder_grad = torch.is_grad_enabled() and any(p.requires_grad for p in sam2.vision_encoder.parameters())
        with torch.set_grad_enabled(encoder_grad):
            fpn = list(sam2.vision_encoder(px, return_dict=True).fpn_hidden_states)
        if index is not None:
            fpn = [f[index.to(f.device)] for f in fpn]
        with torch.no_grad(), gathered([sam2.no_memory_embedding]):  # a constant: never trained
            no_memory = sam2.no_memory_embedding.detach().reshape(1, -1, 1, 1).to(fpn[-1].dtype).clone()
        image_embed = fpn[-1] + no_memory
        # conv_s0/conv_s1 belong to the mask decoder (trainable): outside no_grad.
        high_res = [sam2.mask_decoder.conv_s0(fpn[0]), sam2.mask_decoder.conv_s1(fpn[1])]
        points = torch.zeros(b, 1, 1, 2, device=dev, dtype=sam_dtype)
        labels = -torch.ones(b, 1, 1, dtype=torch.int32, device=dev)
        # SAM2's Fourier-feature buffers stay fp32 where DeepSpeed casts only the parameters (ZeRO-1/2 bf16): what
        # they give is cast to the decoder's dtype
        sparse, dense = sam2.prompt_encoder(input_points=points, input_labels=labels, input_boxes=None,
                                            input_masks=None)
        sparse = torch.cat([sparse.to(sam_dtype), seg_prompt.to(sam_dtype)[:, None, None, :]], dim=2)
        dense = dense.to(sam_dtype)
        pos = sam2.get_image_wide_positional_embeddings().to(sam_dtype).repeat(b, 1, 1, 1)
        masks, iou, _, obj = sam2.mask_decoder(image_embeddings=image_embed, image_positional_embeddings=pos,
                                             sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                             multimask_output=True, high_resolution_features=high_res)
        masks, iou = masks[:, 0], iou[:, 0]  # one prompt per image: [B, M, h, w], [B, M]
        obj = None if obj is None else obj.reshape(b)
        if multimask == "all":
            return GroundOutput(logits=masks, iou_pred=iou, object_score=obj)
        best = iou.argmax(-1)
        idx = torch.arange(b, device=masks.device)
        return GroundOutput(logits=masks[idx, best], iou_pred=iou[idx, best], object_score=obj)


def _owners(counts: torch.Tensor) -> torch.Tensor:
    """The reply of each [SEG] row, a reply without [SEG] owning one stand-in row: [0, 0, 1, 2] for counts
    [2, 0, 1]."""
    return torch.repeat_interleave(torch.arange(counts.numel()), counts.clamp(min=1))


def _check_texts(texts) -> None:
    if not isinstance(texts, (list, tuple)) or not all(isinstance(s, str) for s in texts):
        raise ValueError("texts must be a list of strings")



__all__ = ["DualLoopModel", "CaptionOutput", "GroundOutput", "COMPONENTS"]
