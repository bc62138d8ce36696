"""Pieces of the dual loop: loss presets and multimask selection, straight-through Gumbel, REINFORCE advantages
and log-probs, the EOS append."""
from __future__ import annotations

import pytest
import torch

from dualloop.config import ConfigError, LossConfig


def test_loss_presets_and_errors():
    from dualloop.loop.losses import resolve_loss

    s = resolve_loss(LossConfig(preset="sa2va"))
    assert (s.bce, s.focal, s.dice, s.iou_head, s.multimask) == (2.0, 0.0, 0.5, 0.0, "best")
    s = resolve_loss(LossConfig(preset="sam2"))
    assert (s.bce, s.focal, s.dice, s.iou_head, s.multimask) == (0.0, 20.0, 1.0, 1.0, "argmin")
    s = resolve_loss(LossConfig(preset="custom", bce=1.0, focal=2.0, dice=3.0, iou_head=0.5, multimask="argmin"))
    assert (s.bce, s.focal, s.dice, s.iou_head, s.multimask) == (1.0, 2.0, 3.0, 0.5, "argmin")
    for bad, match in [(LossConfig(preset="sa3va"), "preset"), (LossConfig(preset="sam2", dice=0.3), "custom"),
                       (LossConfig(preset="sa2va", iou_head=1.0), "custom"),
                       (LossConfig(preset="custom", bce=0, focal=0, dice=0), "not all zero"),
                       (LossConfig(preset="custom", bce=0, focal=0, dice=0, iou_head=1.0), "not all zero"),
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


def test_iou_head_loss_is_sam2s_l1_on_every_mask_and_trains_only_the_head():
    """SAM2's loss_iou (supervise_all_iou, iou_use_l1_loss): |predicted - actual IoU of logits > 0| averaged over
    the M masks, nothing for an empty target; the actual IoU is a constant (no gradient into the mask logits)."""
    from dualloop.loop.losses import mask_losses, resolve_loss

    torch.manual_seed(0)
    targets = [torch.zeros(8, 8, dtype=torch.uint8), torch.zeros(8, 8, dtype=torch.uint8)]
    targets[0][2:6, 1:7] = 1  # the second target is empty: the object left the frame
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)  # at the target's size: no resize in the IoU
    iou_pred = torch.rand(2, 3, requires_grad=True)
    out = mask_losses(logits, targets, resolve_loss(LossConfig(preset="sam2")), iou_pred)
    pred = logits.detach() > 0
    t = torch.stack(targets).bool()[:, None]
    actual = (pred & t).sum((-1, -2)) / (pred | t).sum((-1, -2)).clamp_min(1)
    expected = (iou_pred.detach() - actual).abs().mean(1) * torch.tensor([1.0, 0.0])
    torch.testing.assert_close(out.iou_head, expected)
    out.iou_head.sum().backward()
    assert logits.grad is None
    torch.testing.assert_close(iou_pred.grad[0], (iou_pred.detach()[0] - actual[0]).sign() / 3)
    assert torch.equal(iou_pred.grad[1], torch.zeros(3))
    # without the weight (sa2va) or without predictions: no IoU-head loss
    assert mask_losses(logits, targets, resolve_loss(LossConfig(preset="sa2va")), iou_pred).iou_head is None
    assert mask_losses(logits, targets, resolve_loss(LossConfig(preset="sam2"))).iou_head is None
    with pytest.raises(ValueError, match="IoU predictions"):
        mask_losses(logits, targets, resolve_loss(LossConfig(preset="sam2")), iou_pred[:, :2])


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
    torch.testing.assert_close(advantages(r, "mean"), torch.tensor([[-0.4, 0.4], [0.0, 0.0]]))  # leave-one-out
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


def test_mean_baseline_is_leave_one_out():
    """Each sample's baseline is the mean of the *other* K-1 rewards of its region (RLOO): independent of the sample's
    own reward, so E[A * grad log pi] is exactly grad E[r]. With the mean of all K (own reward included) the estimate
    is (K-1)/K of it."""
    from dualloop.loop.reinforce import advantages

    r = torch.tensor([[0.2, 0.6, 0.1], [0.5, 0.5, 0.5]])
    adv = advantages(r, "mean")
    for j in range(3):  # baseline_j = r_j - A_j must not move when r_j does
        bumped = r.clone()
        bumped[:, j] += 0.3
        torch.testing.assert_close(bumped[:, j] - advantages(bumped, "mean")[:, j], r[:, j] - adv[:, j])
    torch.testing.assert_close(adv[0], torch.tensor([0.2 - 0.35, 0.6 - 0.15, 0.1 - 0.4]))
    assert adv[1].abs().max() == 0


@pytest.mark.parametrize("baseline", ["mean", "greedy"])
def test_policy_gradient_is_unbiased_exact_expectation(baseline):
    """Independent check of the REINFORCE estimator on a one-token categorical policy: the exact expectation over
    all V^K sample tuples of grad(-policy_gradient_loss) equals grad E_pi[r]."""
    import itertools

    from dualloop.loop.losses import token_log_probs
    from dualloop.loop.reinforce import advantages, policy_gradient_loss

    torch.manual_seed(0)
    V, K = 4, 3
    theta = torch.randn(1, 1, V, dtype=torch.float64, requires_grad=True)
    reward = torch.tensor([0.1, 0.9, 0.4, 0.0], dtype=torch.float64)
    greedy = reward[theta.detach().argmax(-1).flatten()]  # a baseline independent of the samples
    p = torch.softmax(theta.detach().flatten(), -1)
    expected = torch.zeros(V, dtype=torch.float64)
    for tup in itertools.product(range(V), repeat=K):
        ids = torch.tensor(tup).view(K, 1)
        logp, _ = token_log_probs(theta.expand(K, 1, V), ids, torch.ones(K, dtype=torch.long))
        adv = advantages(reward[ids.flatten()].view(1, K), baseline, greedy).flatten()
        g, = torch.autograd.grad(-policy_gradient_loss(logp, adv), theta)
        expected += p[list(tup)].prod() * g.flatten()
    theta_t = theta.detach().clone().requires_grad_(True)
    true, = torch.autograd.grad((torch.softmax(theta_t.flatten(), -1) * reward).sum(), theta_t)
    torch.testing.assert_close(expected, true.flatten(), rtol=1e-5, atol=1e-7)  # log_softmax in float32


def test_gumbel_gradient_is_the_relaxation_gradient():
    """Independent formulation of the straight-through backward: with the same Gumbel noise g, d(loss)/d(logits) on
    the top-k candidates is that of sum_j softmax((v + g)/tau)_j * E_j, zero elsewhere; the embedding table's
    gradient reaches only the chosen (hard) rows."""
    from dualloop.loop.gumbel import soft_caption_embeddings

    torch.manual_seed(0)
    B, T, V, H, k, tau = 2, 3, 20, 5, 6, 0.7
    logits = torch.randn(B, T, V, requires_grad=True)
    table = torch.nn.Embedding(V, H)
    R = torch.randn(B, T, H)

    class M:
        def embed_tokens(self, ids):
            return table(ids)

    emb, tokens = soft_caption_embeddings(M(), logits, tau=tau, k=k, generator=torch.Generator().manual_seed(5))
    assert torch.equal(emb, table(tokens))  # forward: exactly the hard tokens' embeddings
    (emb * R).sum().backward()
    values, cand = logits.detach().topk(k, -1)
    u = torch.rand(values.shape, generator=torch.Generator().manual_seed(5))
    g = -torch.log(-torch.log(u.clamp(1e-10, 1 - 1e-10)))
    v = values.clone().requires_grad_(True)
    y = torch.softmax((v + g) / tau, -1)
    soft = (y[..., None] * table.weight.detach()[cand]).sum(-2)
    gv, = torch.autograd.grad((soft * R).sum(), v)
    expected = torch.zeros(B, T, V).scatter(-1, cand, gv)
    torch.testing.assert_close(logits.grad, expected, rtol=1e-5, atol=1e-7)
    rows = table.weight.grad.abs().sum(-1) > 0
    assert set(rows.nonzero().flatten().tolist()) == set(tokens.flatten().tolist())


def test_mask_loss_normalization_matches_sam2_and_sa2va_formulas():
    """Independent formulas (SAM2 training/loss_fns.py, Sa2VA's mmdet losses), on targets of the logits' size (no
    resize): SAM2 = sum over objects of [20 * mean-over-pixels focal + dice(smooth 1)] / num_objects; Sa2VA = 2 * BCE
    (mean over pixels) + 0.5 * naive dice (eps 1), mean over masks. Each sample's value does not depend on what else is
    in the batch (per-mask means, whatever the mask sizes), and an empty target gives a finite loss whose gradient
    lowers every logit."""
    import torch.nn.functional as F

    from dualloop.loop.losses import mask_losses, resolve_loss

    torch.manual_seed(0)
    sizes = [(8, 8), (8, 8), (8, 8)]
    targets = [torch.zeros(s, dtype=torch.uint8) for s in sizes]
    targets[0][2:6, 1:5] = 1
    targets[1][:, :] = 1  # full;  targets[2] stays empty (the object left the frame)
    logits = torch.randn(3, 8, 8, dtype=torch.float32)

    def sam2_ref(x, t):  # [N, H, W] each
        p = x.sigmoid()
        ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
        p_t = p * t + (1 - p) * (1 - t)
        focal = (ce * (1 - p_t) ** 2 * (0.25 * t + 0.75 * (1 - t))).flatten(1).mean(-1)
        dice = 1 - (2 * (p * t).flatten(1).sum(-1) + 1) / (p.flatten(1).sum(-1) + t.flatten(1).sum(-1) + 1)
        return 20 * focal + dice, ce.flatten(1).mean(-1), dice

    t = torch.stack(targets).float()
    sam2, bce, dice = sam2_ref(logits, t)
    out = mask_losses(logits, targets, resolve_loss(LossConfig(preset="sam2", multimask="best")))
    torch.testing.assert_close(out.total, sam2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.total.mean(), sam2.sum() / 3, rtol=1e-5, atol=1e-6)  # / num_objects
    sa2va = mask_losses(logits, targets, resolve_loss(LossConfig(preset="sa2va")))
    torch.testing.assert_close(sa2va.total, 2 * bce + 0.5 * dice, rtol=1e-5, atol=1e-6)

    # batch-composition independence: a sample's loss alone == its loss among others of other sizes
    big = torch.zeros(40, 24, dtype=torch.uint8)
    big[5:30, 3:20] = 1
    spec = resolve_loss(LossConfig(preset="sa2va"))
    alone = mask_losses(logits[:1], targets[:1], spec).total
    mixed = mask_losses(torch.cat([logits[:1], torch.randn(1, 8, 8)]), [targets[0], big], spec).total
    torch.testing.assert_close(mixed[0], alone[0])

    # empty target: finite, and descent lowers every logit
    x = logits[2:].clone().requires_grad_(True)
    e = mask_losses(x, targets[2:], spec)
    assert torch.isfinite(e.total).all() and e.iou.item() == 0.0
    e.total.sum().backward()
    assert (x.grad > 0).all()
