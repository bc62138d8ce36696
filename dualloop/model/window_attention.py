"""Qwen-VL vision towers' chunked attention as one SDPA call per chunk length.

The Qwen2.5-VL and Qwen3-VL towers attend within chunks of their packed token sequence (`cu_seqlens`): images, and
in Qwen2.5-VL's window layers 112 px windows, 100 of them in a 1024² image. Outside flash attention, transformers
calls attention once per chunk (11 216 calls for 4 such images in Qwen2.5-VL's 32 layers), and on a GPU that host
work is most of the tower's time. Chunks of equal length (all the inner windows, equally sized images) are
independent attentions of the same shape: stacked, they are one batched SDPA call, with the same result.
"""
from __future__ import annotations

import sys
import types
from collections import OrderedDict, defaultdict

import torch
import torch.nn.functional as F

# id(cu_seqlens) -> (cu_seqlens, plan). Every layer of a tower call passes the same one or two tensors, and so does
# the activation-checkpointing recompute in the backward; a few are kept (the tensor itself too, so that its id is
# not reused meanwhile), and one evicted is planned again from its values.
_PLANS: OrderedDict = OrderedDict()
_PLANS_KEPT = 8


def batch_chunk_attention(tower) -> int:
    """Installs the batched attention in the tower's blocks (idempotent; the instance's `forward` is replaced, so
    module hooks, ZeRO-3's, still run, and the activation-checkpointing recompute runs it too). Blocks on another
    attention implementation than SDPA, or of an unknown form, are left alone. Returns how many blocks use it."""
    count = 0
    for block in getattr(tower, "blocks", ()):
        attn = getattr(block, "attn", None)
        if _batchable(attn):
            if "forward" not in vars(attn):
                attn.forward = types.MethodType(_batched_forward, attn)  # deepcopy rebinds it to the copy
            count += 1
    return count


def _batchable(attn) -> bool:
    rotary = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb_vision", None)
    return (rotary is not None and all(hasattr(attn, a) for a in ("qkv", "proj", "num_heads", "scaling", "config"))
            and getattr(attn.config, "_attn_implementation", None) == "sdpa")


def _batched_forward(self, hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
    original = type(self).forward
    n = hidden_states.shape[0]
    groups, restore, total = _plan(cu_seqlens) if position_embeddings is not None else ([], None, -1)
    if total != n:  # another calling convention, or chunks that do not cover the sequence from 0: its own code
        return original(self, hidden_states, cu_seqlens, position_embeddings=position_embeddings, **kwargs)
    rotary = sys.modules[type(self).__module__].apply_rotary_pos_emb_vision
    q, k, v = self.qkv(hidden_states).reshape(n, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = rotary(q, k, *position_embeddings)
    outs = []
    for rows, count, length in groups:  # rows: the group's token rows, chunk after chunk
        q_, k_, v_ = (t.index_select(0, rows).view(count, length, self.num_heads, -1).transpose(1, 2)
                      for t in (q, k, v))
        o = F.scaled_dot_product_attention(q_, k_, v_, scale=self.scaling)  # [count, heads, length, head_dim]
        outs.append(o.transpose(1, 2).reshape(count * length, -1))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    if restore is not None:
        out = out.index_select(0, restore)
    return self.proj(out)


def _plan(cu_seqlens: torch.Tensor):
    """([(token rows, chunk count, chunk length)] per distinct length, the permutation back to token order or None
    when the groups are already in it, the tokens covered from 0 or -1), computed once per `cu_seqlens` tensor (one
    host read)."""
    key = id(cu_seqlens)
    hit = _PLANS.get(key)
    if hit is not None and hit[0] is cu_seqlens:
        _PLANS.move_to_end(key)
        return hit[1]
    plan = _make_plan(cu_seqlens)
    _PLANS[key] = (cu_seqlens, plan)
    while len(_PLANS) > _PLANS_KEPT:
        _PLANS.popitem(last=False)
    return plan


def _make_plan(cu_seqlens: torch.Tensor):
    bounds = cu_seqlens.tolist()
    if not bounds or bounds[0] != 0 or any(b < a for a, b in zip(bounds[:-1], bounds[1:])):
        return [], None, -1
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
    return groups, restore, bounds[-1]
