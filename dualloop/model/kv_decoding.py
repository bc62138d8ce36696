"""The LLM side of caption decoding: prefill the prompt, then one forward per generated token, on a KV cache.

Two steppers with one interface (`prefill(embeds, attention_mask, position_ids) -> scores`, `next(token) -> scores`,
scores being the float32 [B, V] logits of the next token; after each call `hidden` holds the LLM's last hidden state
[B, H] at the token just fed, which a grounding reply's [SEG] prompts SAM2 with):

- `DynamicSteps`: transformers' DynamicCache, the attention mask grown by one column per token (what `generate` does).
- `StaticSteps`: a StaticCache sized for prompt + new tokens and an attention mask computed on the device from fixed
  buffers, so a decoding step reads and writes only tensors whose addresses never change. On CUDA that step is
  recorded once as a CUDA graph and replayed for every further token: one launch instead of the few hundred small
  kernels (and their host time) of an LLM forward. Decoding a small LLM on a GPU is bound by that host time.

A graph holds the weights' addresses, so it is only valid while they stay put: the caller asks for one only when the
weights are whole for the whole phase (ZeRO-3 gathered once with its hooks hidden, or not partitioned). The graph
is recorded per call, because ZeRO-3 gathers the weights into new storage at every phase; recording costs about one
eager step. Anything the static path cannot serve (sliding-window layers, attention without additive masks) falls
back to `DynamicSteps`.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

# attention implementations that take a prepared additive [B, 1, q, kv] mask as it is
STATIC_MASK_ATTENTION = ("sdpa", "eager")


class DynamicSteps:
    """Decoding steps on a DynamicCache, the attention mask grown per token."""

    mode = "dynamic"

    def __init__(self, lm, lm_head, embed, cache_arg: str):
        self.lm, self.lm_head, self.embed, self.cache_arg = lm, lm_head, embed, cache_arg

    def _forward(self, x: torch.Tensor, **prompt_inputs) -> torch.Tensor:
        hidden = self.lm(inputs_embeds=x, attention_mask=self.mask, position_ids=self.positions, use_cache=True,
                         return_dict=True, **{self.cache_arg: self.cache}, **prompt_inputs).last_hidden_state
        self.hidden = hidden[:, -1]
        return self.lm_head(self.hidden).float()

    def prefill(self, embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                **prompt_inputs) -> torch.Tensor:
        """position_ids: the prompt's, [B, P] or [3, B, P] (multimodal RoPE; a prompt ends with text, whose three
        coordinates are equal, so each next token is one further in all three); prompt_inputs: more inputs of the
        LLM's forward over the prompt only (Qwen3-VL's DeepStack features)."""
        from transformers import DynamicCache

        self.dtype = embeds.dtype
        self.cache = DynamicCache(config=self.lm.config)
        self.mask = attention_mask
        self.positions = position_ids
        self.ones = attention_mask.new_ones(attention_mask.shape[0], 1)
        return self._forward(embeds, **prompt_inputs)

    def next(self, token: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.ones], dim=1)
        self.positions = self.positions[..., -1:] + 1
        return self._forward(self.embed(token[:, None]).to(self.dtype))


def allowed_keys(keep: torch.Tensor, num_queries: int) -> torch.Tensor:
    """[B, Q, K] bool for a left-padded batch whose query i sits at slot i: it sees the slots <= i that are not
    padding (`keep` [B, K]), and a padding query also sees itself. No attention row is empty: an empty row is NaN in
    a plain softmax, and torch 2.11's cuDNN attention backward turns such rows into NaN gradients (pytorch#196678)."""
    slots = torch.arange(keep.shape[1], device=keep.device)
    query = slots[:num_queries, None]
    allowed = (slots[None, None, :] <= query) & keep[:, None, :]
    return allowed | (slots[None, None, :] == query)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where allowed, the dtype's lowest value elsewhere (what eager and SDPA attention add to the scores)."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.full((), torch.finfo(dtype).min, dtype=dtype, device=allowed.device))


def prepared_mask_unsupported(lm) -> str | None:
    """Why this LLM cannot take a prepared additive [B, 1, q, kv] mask (None when it can): `StaticSteps` needs one,
    and the training forwards use one for padded batches."""
    cfg = lm.config
    impl = getattr(cfg, "_attn_implementation", None) or "eager"
    if impl not in STATIC_MASK_ATTENTION:
        return f"attention implementation {impl!r} (needs one of {STATIC_MASK_ATTENTION})"
    layer_types = getattr(cfg, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types) or getattr(cfg, "use_sliding_window", False):
        return "sliding-window attention layers"
    return None


class StaticSteps:
    """Decoding steps on a StaticCache; with `graph=True` on CUDA, steps after the first are one CUDA graph replay.

    Cache slot s holds prompt position s (left pads included) for s < P, then generated token s - P. A query at
    slot s sees the slots <= s that are not padding; a padding query also sees itself, so that no attention row is
    empty (it would be NaN, and NaN keys poison every row through the additive mask)."""

    mode = "static"

    def __init__(self, lm, lm_head, embed, cache_arg: str, max_new_tokens: int, graph: bool = False):
        self.lm, self.lm_head, self.embed, self.cache_arg = lm, lm_head, embed, cache_arg
        self.max_new_tokens = max_new_tokens
        self.want_graph = graph
        self.graph: torch.cuda.CUDAGraph | None = None
        self.replays = 0
        self._eager_steps = 0

    def _allowed_to_additive(self, allowed: torch.Tensor) -> torch.Tensor:
        return torch.where(allowed, self.zero, self.neg)

    def prefill(self, embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                **prompt_inputs) -> torch.Tensor:
        from transformers import StaticCache

        b, p = attention_mask.shape
        dev, self.dtype = embeds.device, embeds.dtype
        length = p + self.max_new_tokens
        self.cache = StaticCache(config=self.lm.config, max_cache_len=length)
        self.zero = torch.zeros((), dtype=self.dtype, device=dev)
        self.neg = torch.full((), torch.finfo(self.dtype).min, dtype=self.dtype, device=dev)
        self.keep = torch.ones(b, length, dtype=torch.bool, device=dev)  # not a padding slot
        self.keep[:, :p] = attention_mask.bool()
        self.slot_index = torch.arange(length, device=dev)
        allowed = allowed_keys(self.keep, p)  # [B, P, L]
        hidden = self.lm(inputs_embeds=embeds, attention_mask=self._allowed_to_additive(allowed)[:, None],
                         position_ids=position_ids, use_cache=True, return_dict=True,
                         **{self.cache_arg: self.cache}, **prompt_inputs).last_hidden_state
        # the step's fixed inputs: next token, its position, its cache slot
        self.token = torch.zeros(b, dtype=torch.long, device=dev)
        self.position = position_ids[..., -1:] + 1
        self.slot = torch.full((), p, dtype=torch.long, device=dev)
        self.hidden = hidden[:, -1]
        return self.lm_head(self.hidden).float()

    def _step(self) -> None:
        """One token: reads self.token/position/slot and the cache, writes self.scores and self.hidden, advances
        position and slot in place (so a recorded graph advances itself)."""
        allowed = (self.slot_index[None, :] <= self.slot) & self.keep  # [B, L]
        mask = self._allowed_to_additive(allowed)[:, None, None, :]
        x = self.embed(self.token[:, None]).to(self.dtype)
        hidden = self.lm(inputs_embeds=x, attention_mask=mask, position_ids=self.position, use_cache=True,
                         return_dict=True, **{self.cache_arg: self.cache}).last_hidden_state
        self.hidden = hidden[:, -1]
        self.scores = self.lm_head(self.hidden).float()
        self.position.add_(1)
        self.slot.add_(1)

    def _record(self) -> None:
        """Record `_step` as a CUDA graph (nothing runs while recording). On failure, decode on eagerly.

        capture_begin/end on a side stream rather than `torch.cuda.graph`, whose entry synchronizes the device and
        empties the allocator's cache: the training step's next forward would then allocate from the driver again.
        thread_local: the DataLoader's pin-memory thread may call CUDA while this thread records."""
        graph = torch.cuda.CUDAGraph()
        self.side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(self.side):
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    self._step()
                finally:
                    graph.capture_end()
        except Exception as err:  # noqa: BLE001 - any capture failure: the eager static steps still decode
            log.warning("caption decoding: CUDA graph capture failed (%s: %s); decoding without a graph",
                        type(err).__name__, err)
            self.want_graph = False
            return
        finally:
            torch.cuda.current_stream().wait_stream(self.side)
        self.graph = graph
        self.mode = "graph"

    def next(self, token: torch.Tensor) -> torch.Tensor:
        self.token.copy_(token)
        if self.graph is None and self.want_graph and self._eager_steps > 0:
            self._record()
        if self.graph is not None:
            self.graph.replay()
            self.replays += 1
            return self.scores
        if self.want_graph:  # warm-up before recording, on a side stream as CUDA graphs ask
            self.side = torch.cuda.Stream()
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                self._step()
            torch.cuda.current_stream().wait_stream(self.side)
        else:
            self._step()
        self._eager_steps += 1
        return self.scores


def make_steps(lm, lm_head, embed, cache_arg: str, max_new_tokens: int, *, static: bool, graph: bool):
    """The stepper for one caption call: static (`graph`: recorded as a CUDA graph, CUDA only) when asked for and
    the LLM allows it, else dynamic."""
    if static:
        why = prepared_mask_unsupported(lm)
        if why is None:
            return StaticSteps(lm, lm_head, embed, cache_arg, max_new_tokens, graph=graph)
        log.info("caption decoding: static KV cache not used (%s)", why)
    return DynamicSteps(lm, lm_head, embed, cache_arg)
