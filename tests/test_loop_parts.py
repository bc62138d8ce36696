"""Pieces of the dual loop: loss presets and multimask selection, straight-through Gumbel, REINFORCE advantages
and log-probs, the EOS append."""
from __future__ import annotations

import pytest
import torch

from dualloop.config import ConfigError, LossConfig


def test_loss_presets_and_errors():
    from dualloop.loop.losses import resolve_loss

    s = resolve_loss(LossConfig(preset="sa2va"))
    assert (s.bce, s.focal, s.dice, s.multimask) == (2.0, 0.0, 0.5, "best")
    s = resolve_loss(LossConfig(preset="sam2"))
    assert (s.bce, s.focal, s.dice, s.multimask) == (0.0, 20.0, 1.0, "argmin")
    s = resolve_loss(LossConfig(preset="custom", bce=1.0, focal=2.0, dice=3.0, multimask="argmin"))
    assert (s.bce, s.focal, s.dice, s.multimask) == (1.0, 2.0, 3.0, "argmin")
    for bad, match in [(LossConfig(preset="sa3va"), "preset"), (LossConfig(preset="sam2", dice=0.3), "custom"),
                       (LossConfig(preset="custom", bce=0, focal=0, dice=0), "not all zero"),
                       (LossConfig(multimask="worst"), "multimask"), (LossConfig(resize="none"), "resize")]:
        with pytest.raises(ConfigError, match=match):
            resolve_loss(bad)


def test_mask_losses_weights_and_argmin_selection():
    from dualloop.kernels import mask_loss

    from dualloop.loop.losses import mask_losses, resolve_loss

    torch.manual_seed(0)
    targets = [torch.zeros(12, 10, dtype=torch.uint8), torch.ones(20, 16, dtype=torch.uint8)]
    targets[0][3:8, 2:6] = 1
    logits = torch.randn(2, 3, 6, 6, requires_grad=True)
    spec = resolve_loss(LossConfig(preset="sam2"))
    out = mask_losses(logits, targets, spec)
    ref = mask_loss(logits.detach().reshape(6, 6, 6), [t for t in targets for _ in range(3)], backend="torch")
    total = (20 * ref.focal + ref.dice).view(2, 3)
    assert torch.equal(out.choice, total.argmin(1))
    torch.testing.assert_close(out.total.detach(), total.min(1).values)
    out.total.sum().backward()
    grad_per_mask = logits.grad.abs().sum((-1, -2))  # only the chosen mask of each sample gets gradient
    for b in range(2):
        assert (grad_per_mask[b] > 0).tolist() == [k == int(out.choice[b]) for k in range(3)]
    spec = resolve_loss(LossConfig(preset="sa2va"))
    one = mask_losses(logits.detach()[:, 0], targets, spec)
    ref = mask_loss(logits.detach()[:, 0], targets, backend="torch")
    torch.testing.assert_close(one.total, 2 * ref.bce + 0.5 * ref.dice)
    with pytest.raises(ValueError, match="target masks"):
        mask_losses(logits[:, 0], targets[:1], spec)


def test_gumbel_straight_through_forward_is_a_token_backward_is_soft():
    from dualloop.loop.gumbel import soft_caption_embeddings, topk_gumbel_straight_through

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 30, requires_grad=True)
    s = topk_gumbel_straight_through(logits, tau=0.7, k=8, generator=torch.Generator().manual_seed(0))
    assert s.candidates.shape == (2, 5, 8) and s.weights.shape == (2, 5, 8)
    torch.testing.assert_close(s.weights.detach().sum(-1), torch.ones(2, 5))
    assert ((s.weights.detach() == 0) | (s.weights.detach() == 1)).all()  # forward: exactly one-hot
    assert (s.tokens[..., None] == s.candidates).any(-1).all()
    (s.weights * torch.arange(8.0)).sum().backward()
    assert logits.grad.abs().sum() > 0  # backward: through the soft relaxation

    emb_table = torch.nn.Embedding(30, 6)

    class M:
        def embed_tokens(self, ids):
            return emb_table(ids)

    emb, tokens = soft_caption_embeddings(M(), logits, tau=0.7, k=8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(emb, emb_table(tokens))  # the grounding input is exactly the tokens' embeddings
    # k larger than the vocabulary, and replace_prob=1: every token a random one of its candidates
    s = topk_gumbel_straight_through(logits, tau=1.0, k=1000, replace_prob=1.0)
    assert s.candidates.shape[-1] == 30
    for bad in ({"tau": 0.0, "k": 4}, {"tau": 1.0, "k": 0}, {"tau": 1.0, "k": 4, "replace_prob": 2.0}):
        with pytest.raises(ValueError):
            topk_gumbel_straight_through(logits, **bad)


def test_reinforce_advantages_and_policy_gradient():
    from dualloop.loop.losses import caption_ce, token_log_probs
    from dualloop.loop.reinforce import advantages, kl_per_sample, policy_gradient_loss, rewards_from

    r = torch.tensor([[0.2, 0.6], [0.5, 0.5]])
    torch.testing.assert_close(advantages(r, "mean"), torch.tensor([[-0.2, 0.2], [0.0, 0.0]]))
    torch.testing.assert_close(advantages(r, "greedy", torch.tensor([0.4, 0.0])), torch.tensor([[-0.2, 0.2],
                                                                                              [0.5, 0.5]]))
    with pytest.raises(ConfigError):
        advantages(r, "median")
    torch.testing.assert_close(rewards_from(torch.tensor([0.3]), torch.tensor([2.0]), "neg_loss"), torch.tensor([-2.0]))

    logits = torch.zeros(2, 3, 5, requires_grad=True)
    ids = torch.tensor([[1, 2, 3], [4, 0, 0]])
    lengths = torch.tensor([3, 1])
    logp, valid = token_log_probs(logits, ids, lengths)
    assert valid.tolist() == [[True, True, True], [True, False, False]]
    torch.testing.assert_close(logp.sum(1), torch.log(torch.tensor([0.2])) * lengths.float())
    loss = policy_gradient_loss(logp, torch.tensor([1.0, -1.0]))
    loss.backward()
    assert logits.grad[0, 0, 1] < 0 and logits.grad[1, 0, 4] > 0  # raise the rewarded, lower the punished
    assert logits.grad[1, 1:].abs().sum() == 0  # nothing past a caption's end
    torch.testing.assert_close(caption_ce(torch.zeros(1, 2, 5), torch.zeros(1, 2, dtype=torch.long),
                                          torch.tensor([0])), torch.tensor([0.0]))  # empty caption: 0, not NaN
    torch.testing.assert_close(kl_per_sample(logits, logits, valid), torch.zeros(2))


def test_append_eos():
    from dualloop.loop.step import _append_eos

    ids = torch.tensor([[5, 6, 0], [7, 7, 7]])
    out, lengths = _append_eos(ids, torch.tensor([2, 3]), eos_id=9, add=torch.tensor([True, False]))
    assert out.tolist() == [[5, 6, 9, 9], [7, 7, 7, 9]] and lengths.tolist() == [3, 3]


def test_adapters_disabled_restores_flags():
    from dualloop.config import ModelConfig
    from dualloop.loop.reinforce import adapters_disabled
    from dualloop.model import build_model

    m = build_model(ModelConfig(preset="tiny"))
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [x for x in m.modules() if isinstance(x, BaseTunerLayer)]
    assert layers
    grads = [p.requires_grad for p in m.parameters()]
    with adapters_disabled(m):
        assert all(x.disable_adapters for x in layers)
    assert not any(x.disable_adapters for x in layers)
    assert grads == [p.requires_grad for p in m.parameters()]
    with pytest.raises(ConfigError, match="LoRA"):
        with adapters_disabled(torch.nn.Linear(2, 2)):
            pass
