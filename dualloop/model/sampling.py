"""Logits processors of caption decoding: the ids a caption may hold, and reproducible sampling."""
from __future__ import annotations

import torch
from transformers import LogitsProcessor


class GumbelSampler(LogitsProcessor):
    """Sampling by Gumbel-max on top of greedy decoding, so a torch.Generator makes it reproducible."""

    def __init__(self, temperature: float, top_k: int, generator: torch.Generator | None):
        self.temperature, self.top_k, self.generator = temperature, top_k, generator
        self._device_generator: torch.Generator | None = None

    def _generator_for(self, device: torch.device) -> torch.Generator | None:
        """The given generator, or (a CPU generator with GPU scores) one on the scores' device seeded once from it:
        drawing [B, V] uniforms on the CPU and copying them over for every token costs more than the token's
        forward. Still reproducible: the seed is the given generator's next draw."""
        g = self.generator
        if g is None or g.device == device:
            return g
        if self._device_generator is None or self._device_generator.device != device:
            seed = int(torch.randint(0, 2**62, (1,), generator=g))
            self._device_generator = torch.Generator(device=device).manual_seed(seed)
        return self._device_generator

    def __call__(self, input_ids, scores):
        s = scores.float() / self.temperature
        if 0 < self.top_k < s.shape[-1]:
            kth = torch.topk(s, self.top_k, dim=-1).values[..., -1:]
            s = s.masked_fill(s < kth, float("-inf"))
        u = torch.rand(s.shape, generator=self._generator_for(s.device), device=s.device)
        return s - torch.log(-torch.log(u.clamp(1e-10, 1.0 - 1e-7)))


class SuppressTokens(LogitsProcessor):
    """Captions are plain text: special ids ([SEG], <vp>, image tokens, pad, chat markers) and the LM head's padding
    rows beyond the tokenizer are never generated; EOS stays allowed."""

    def __init__(self, banned: torch.Tensor, vocab: int):
        self.banned, self.vocab = banned, vocab

    def __call__(self, input_ids, scores):
        if self.banned.device != scores.device:  # moved once: a host-to-device copy per token syncs every token
            self.banned = self.banned.to(scores.device)
        scores = scores.clone()
        scores[:, self.banned] = float("-inf")
        scores[:, self.vocab:] = float("-inf")
        return scores
