"""REINFORCE through the caption: K sampled captions per region, reward from grounding with each, advantage
against the mean reward of the region's other K-1 captions (leave-one-out) or the greedy caption's, policy gradient
on the caption tokens' log-probs, and an optional KL penalty to the initial policy (the LLM with its LoRA adapters
disabled).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from dualloop.config import ConfigError


def rewards_from(iou: torch.Tensor, mask_loss: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sample reward, no gradient: IoU(mask2', mask2) or the negative mask loss."""
    if kind == "iou":
        return iou.detach().float()
    if kind == "neg_loss":
        return -mask_loss.detach().float()
    raise ConfigError(f"loop.reinforce_reward must be iou or neg_loss, got {kind!r}")


def advantages(rewards: torch.Tensor, baseline: str, greedy_rewards: torch.Tensor | None = None) -> torch.Tensor:
    """rewards [B, K] -> advantages [B, K]. baseline 'mean': minus the mean of the region's other K-1 rewards
    (leave-one-out, RLOO); 'greedy': minus the reward of the region's greedy caption (self-critical).

    The baseline of a sample must not depend on its own reward: E[(r_j - b_j) grad log pi_j] = grad E[r] only then.
    The mean of all K (own reward included) gives (K-1)/K of that gradient: r_j - mean_K = (K-1)/K (r_j - mean_-j)."""
    if baseline == "mean":
        K = rewards.shape[1]
        if K < 2:
            raise ValueError("the leave-one-out mean baseline needs at least 2 samples per region")
        return (rewards - rewards.mean(dim=1, keepdim=True)) * (K / (K - 1))
    if baseline == "greedy":
        if greedy_rewards is None:
            raise ValueError("greedy baseline needs the greedy captions' rewards")
        return rewards - greedy_rewards[:, None]
    raise ConfigError(f"loop.reinforce_baseline must be mean or greedy, got {baseline!r}")


def sampling_logits(scores: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    """The policy that sampled the captions, as logits: caption()'s sampler divides the (special-id-suppressed)
    scores by the temperature and keeps the top k (the same rule as the model's `_GumbelSampler`). log pi of a
    sampled caption must come from these, not from the plain softmax of the raw logits, or the policy gradient is
    that of another distribution."""
    s = scores.float() / temperature if temperature != 1.0 else scores.float()  # x / 1 is x: no [N, T, V] copy
    if 0 < top_k < s.shape[-1]:
        kth = torch.topk(s, top_k, dim=-1).values[..., -1:]
        s = s.masked_fill(s < kth, float("-inf"))
    return s


def policy_gradient_loss(token_logp: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """token_logp [N, T] (zero past each caption's length), adv [N] -> scalar -(A * log pi(caption)).mean()."""
    return -(adv.detach() * token_logp.sum(dim=1)).mean()


def kl_per_sample(logits: torch.Tensor, ref_logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over each caption's tokens of KL(pi || pi_ref) over the vocabulary; [N]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    ref = torch.log_softmax(ref_logits.float(), dim=-1)
    kl = (logp.exp() * (logp - ref)).sum(-1)
    return (kl * valid).sum(1) / valid.sum(1).clamp_min(1)


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """The reference policy: every PEFT tuner layer of the model with its adapters off."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        raise ConfigError("loop.reinforce_kl > 0 needs LoRA (model.lora.enabled): the reference policy is the "
                          "model with its adapters disabled")
    # The flag the LoRA forward reads; PEFT's enable_adapters() would also flip requires_grad of the adapter
    # weights, which must not change under a running ZeRO engine.
    previous = [m._disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = True
    try:
        yield
    finally:
        for m, flag in zip(layers, previous):
            m._disable_adapters = flag
