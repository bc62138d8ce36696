"""Trainable embedding / LM-head rows for the added tokens ([SEG], <vp>, </vp>), separate from the base matrices.

The base embedding and LM head stay as they are (frozen with the LLM base by default); the rows of the new tokens
live in a small `NewTokenRows` parameter that replaces those rows on the way in (embedding) and out (logits). So the
optimizer holds a few rows instead of the vocabulary, weight decay never touches frozen rows, and under ZeRO-3 every
weight is read inside the forward of the module that owns it (the wrappers own no parameters, they call modules).
With tied word embeddings the LM-head rows are the embedding rows (one parameter), as in the base model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NewTokenRows(nn.Module):
    def __init__(self, token_ids: list[int], vocab_size: int, embed_init: torch.Tensor,
                 head_init: torch.Tensor | None):
        super().__init__()
        if not token_ids or max(token_ids) >= vocab_size or min(token_ids) < 0:
            raise ValueError(f"new token ids {token_ids} must lie in [0, {vocab_size})")
        ids = torch.tensor(token_ids, dtype=torch.long)
        slot = torch.full((vocab_size,), -1, dtype=torch.long)
        slot[ids] = torch.arange(len(token_ids))
        self.register_buffer("token_ids", ids, persistent=False)
        self.register_buffer("slot_of_id", slot, persistent=False)
        self.embed = nn.Parameter(embed_init.detach().clone())
        self.head = None if head_init is None else nn.Parameter(head_init.detach().clone())

    @property
    def tied(self) -> bool:
        return self.head is None

    def forward(self, ids: torch.Tensor | None = None, base_embeds: torch.Tensor | None = None,
                hidden: torch.Tensor | None = None, base_logits: torch.Tensor | None = None) -> torch.Tensor:
        """Either (ids, base_embeds) -> embeddings with new rows, or (hidden, base_logits) -> logits with new rows."""
        if ids is not None:
            slot = self.slot_of_id[ids]
            new = F.embedding(slot.clamp(min=0), self.embed).to(base_embeds.dtype)
            return torch.where((slot >= 0).unsqueeze(-1), new, base_embeds)
        weight = self.embed if self.head is None else self.head
        new_logits = F.linear(hidden, weight.to(hidden.dtype)).to(base_logits.dtype)
        return base_logits.index_copy(-1, self.token_ids, new_logits)


class EmbeddingWithNewRows(nn.Module):
    """Drop-in for the LLM's `embed_tokens`: base embedding, new-token rows overwritten."""

    def __init__(self, base: nn.Embedding, rows: NewTokenRows):
        super().__init__()
        self.base = base
        self.rows = rows

    @property
    def weight(self):  # a few HF utilities read `.weight` (dtype/device); the base matrix answers
        return self.base.weight

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    @property
    def padding_idx(self):
        return self.base.padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows(ids=ids, base_embeds=self.base(ids))


class LMHeadWithNewRows(nn.Module):
    """Drop-in for `lm_head`: base logits, the new tokens' logits from the new rows."""

    def __init__(self, base: nn.Linear, rows: NewTokenRows):
        super().__init__()
        self.base = base
        self.rows = rows

    @property
    def weight(self):
        return self.base.weight

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def in_features(self) -> int:
        return self.base.in_features

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.rows(hidden=hidden, base_logits=self.base(hidden))
