"""Qwen-VL vision towers' chunked attention as one SDPA call per chunk length.

The Qwen2.5-VL and Qwen3-VL towers attend within chunks of their packed token sequence (`cu_seqlens`): images, and
in Qwen2.5-VL's window layers 112 px windows, 100 of them in a 1024² image. Outside flash attention, transformers
calls attention once per chunk (11 200 calls for 4 such images in Qwen2.5-VL's 28 window layers), and on a GPU that
host work is most of the tower's time. Chunks of equal length (all the inner windows, equally sized images) are
independent attentions of the same shape: stacked, they are one batched SDPA call, with the same result.
"""
from __future__ import annotations

import contextlib
import sys
from collections import defaultdict

import torch
import torch.nn.functional as F


@contextlib.contextmanager
def batched_chunk_attention(tower):
    """While the tower runs, its blocks' SDPA attention batches equal-length chunks (module hooks still run: the
    instance's `forward` is replaced, not `__call__`). Towers on another attention implementation are left alone."""
    swapped = []
    plans: dict = {}  # id(cu_seqlens) -> (cu_seqlens, plan): every layer of one tower call passes the same tensors
    for block in getattr(tower, "blocks", ()):
        attn = getattr(block, "attn", None)
        if _batchable(attn):
            attn.forward = _batched_forward(attn, plans)
            swapped.append(attn)
    try:
        yield
    finally:
        for attn in swapped:
            del attn.forward
        plans.clear()


def _batchable(attn) -> bool:
    rotary = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb_vision", None)
    return (rotary is not None and all(hasattr(attn, a) for a in ("qkv", "proj", "num_heads", "scaling", "config"))
            and getattr(attn.config, "_attn_implementation", None) == "sdpa")


def _batched_forward(attn, plans: dict):
    original = type(attn).forward
    rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision

    def forward(hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
        if position_embeddings is None:  # another calling convention than transformers 5's: its own code
            return original(attn, hidden_states, cu_seqlens, position_embeddings=position_embeddings, **kwargs)
        n = hidden_states.shape[0]
        groups, restore, total = _plan(plans, cu_seqlens)
        if total != n:  # chunks that do not cover the sequence from 0: not the layout this batching assumes
            return original(attn, hidden_states, cu_seqlens, position_embeddings=position_embeddings, **kwargs)
        q, k, v = attn.qkv(hidden_states).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = rotary(q, k, *position_embeddings)
        outs = []
        for rows, count, length in groups:  # rows: the group's token rows, chunk after chunk
            q_, k_, v_ = (t.index_select(0, rows).view(count, length, attn.num_heads, -1).transpose(1, 2)
                          for t in (q, k, v))
            o = F.scaled_dot_product_attention(q_, k_, v_, scale=attn.scaling)  # [count, heads, length, head_dim]
            outs.append(o.transpose(1, 2).reshape(count * length, -1))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        if restore is not None:
            out = out.index_select(0, restore)
        return attn.proj(out)

    return forward


def _plan(plans: dict, cu_seqlens: torch.Tensor):
    """([(token rows, chunk count, chunk length)] per distinct length, the permutation back to token order or None
    when the groups are already in it, the tokens covered from 0 or -1), computed once per `cu_seqlens` tensor (one
    host read)."""
    hit = plans.get(id(cu_seqlens))
    if hit is not None and hit[0] is cu_seqlens:  # the tensor is held there, so its id is not reused meanwhile
        return hit[1]
    bounds = cu_seqlens.tolist()
    if not bounds or bounds[0] != 0 or any(b < a for a, b in zip(bounds[:-1], bounds[1:])):
        plans[id(cu_seqlens)] = (cu_seqlens, ([], None, -1))
        return plans[id(cu_seqlens)][1]
    starts_by_length: dict[int, list[int]] = defaultdict(list)
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            starts_by_length[end - start].append(start)
    dev = cu_seqlens.device
    groups, order = [], []
    for length, starts in starts_by_length.items():
        rows = (torch.tensor(starts)[:, None] + torch.arange(length)).reshape(-1)
        order.append(rows)
        groups.append((rows.to(dev), len(starts), length))
    order = torch.cat(order) if order else torch.zeros(0, dtype=torch.long)
    in_order = bool(torch.equal(order, torch.arange(order.numel())))
    restore = None if in_order else torch.argsort(order).to(dev)
    plans[id(cu_seqlens)] = (cu_seqlens, (groups, restore, bounds[-1]))
    return groups, restore, bounds[-1]
