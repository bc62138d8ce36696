"""Straight-through top-k Gumbel-softmax: the caption as soft token embeddings, so the grounding loss reaches the
captioning path.

Forward: each caption position is one hard token - the argmax of (top-k logits + Gumbel noise) / tau, or, with
probability `replace_prob`, a uniformly random one of its top-k candidates. Backward: the gradient of the soft
distribution over the k candidates (y = y_hard - y_soft.detach() + y_soft), so the embedding fed to grounding is
exactly a token embedding while d(loss)/d(logits) is the Gumbel-softmax relaxation's. Restricting to the top k
keeps the [B, T, k, hidden] embedding gather small whatever the vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

_EPS = 1e-10


@dataclass
class GumbelSample:
    candidates: torch.Tensor  # [B, T, k] token ids of the top-k logits
    weights: torch.Tensor  # [B, T, k] straight-through weights (one-hot forward, soft backward)
    tokens: torch.Tensor  # [B, T] the hard token at each position


def topk_gumbel_straight_through(logits: torch.Tensor, *, tau: float, k: int, replace_prob: float = 0.0,
                                 generator: torch.Generator | None = None) -> GumbelSample:
    if tau <= 0:
        raise ValueError(f"loop.gumbel_tau must be > 0, got {tau}")
    if k < 1:
        raise ValueError(f"loop.gumbel_topk must be >= 1, got {k}")
    if not 0.0 <= replace_prob <= 1.0:
        raise ValueError(f"loop.gumbel_replace_prob must be in [0, 1], got {replace_prob}")
    k = min(k, logits.shape[-1])
    values, candidates = logits.float().topk(k, dim=-1)
    noise_device = generator.device if generator is not None else values.device
    u = torch.rand(values.shape, generator=generator, device=noise_device).to(values.device)
    gumbel = -torch.log(-torch.log(u.clamp(_EPS, 1.0 - _EPS)))
    y_soft = torch.softmax((values + gumbel) / tau, dim=-1)
    choice = y_soft.detach().argmax(dim=-1)
    if replace_prob > 0:
        flip = torch.rand(choice.shape, generator=generator, device=noise_device).to(choice.device) < replace_prob
        random_choice = torch.randint(0, k, choice.shape, generator=generator, device=noise_device).to(choice.device)
        choice = torch.where(flip, random_choice, choice)
    y_hard = F.one_hot(choice, k).to(y_soft.dtype)
    weights = y_hard - y_soft.detach() + y_soft
    tokens = candidates.gather(-1, choice[..., None]).squeeze(-1)
    return GumbelSample(candidates=candidates, weights=weights, tokens=tokens)


def soft_caption_embeddings(model, logits: torch.Tensor, *, tau: float, k: int, replace_prob: float = 0.0,
                            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced caption logits [B, T, V] -> (embeddings [B, T, hidden] for `ground(caption_embeds=...)`,
    the hard tokens [B, T]). Embeddings go through the model's input-embedding module (ZeRO-3 safe)."""
    sample = topk_gumbel_straight_through(logits, tau=tau, k=k, replace_prob=replace_prob, generator=generator)
    table = model.embed_tokens(sample.candidates)  # [B, T, k, hidden]
    emb = (sample.weights.to(table.dtype)[..., None] * table).sum(dim=-2)
    return emb, sample.tokens
