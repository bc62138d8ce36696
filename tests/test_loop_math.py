"""The dual loop's math checked against independent computations on the tiny model: the supervised caption loss's
normalization (the logged per-sample shares average to the back-propagated loss), REINFORCE's log-prob under the
policy that actually sampled the captions, and the Gumbel caption's tokens drawn from what generation may emit."""
from __future__ import annotations

import pytest
import torch
from test_loop_step import _crafted_batch

from dualloop.config import LoopConfig


def _cfg(mode: str, caption_weight: float = 0.0, max_new: int = 4) -> LoopConfig:
    cfg = LoopConfig(caption_grad=mode)
    cfg.caption.max_new_tokens = max_new
    cfg.loss.caption = caption_weight
    cfg.loss.backend = "torch"
    cfg.reinforce_samples = 2
    cfg.gumbel_topk = 16
    return cfg


def _banned(model) -> set[int]:
    """The ids caption generation never emits (its suppression processor)."""
    sup = model._suppress_special()
    return set(sup.banned.tolist()) | set(range(sup.vocab, model.vlm.lm_head.out_features))


def test_supervised_caption_loss_is_a_per_sample_share_of_the_micro_batch(model):
    """Every loss is a per-sample value averaged over the micro-batch's B samples (losses.py): a sample without a
    ground-truth caption contributes 0 to the caption term, it does not shrink the denominator. So the back-propagated
    loss equals the mean of the logged per-sample "loss" shares, and the trainer's metric equals the loss."""
    from dualloop.loop.step import DualLoopStep
    from dualloop.train.metrics import StepMetrics

    step = DualLoopStep(model, _cfg("none", caption_weight=1.0), device="cpu")
    losses, metrics = [], StepMetrics(["refcoco"], torch.device("cpu"))
    for caps in ([["the red circle"], []], [["the red circle"], ["a blue square"]]):
        batch = _crafted_batch(0)
        batch["captions"] = caps
        torch.manual_seed(0)
        out = step(batch, torch.Generator().manual_seed(0))
        B = len(caps)
        has = torch.tensor([len(c) > 0 for c in caps])
        expected = out.values["mask_loss"].mean() + (out.values["caption_loss"] * has).sum() / B
        torch.testing.assert_close(out.loss.detach(), expected)
        torch.testing.assert_close(out.loss.detach(), out.values["loss"].mean())
        losses.append(out.loss.item())
        metrics.add(out.sources, out.values, out.valid)
    # two micro-steps of one optimizer step: the logged loss is what was back-propagated (averaged over micro-steps)
    assert metrics.reduce()["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-6)


def _policy_log_probs(model, logits, ids, lengths, temperature: float, top_k: int) -> torch.Tensor:
    """Independent: log-prob of each caption under caption()'s sampler (special ids suppressed, then /temperature,
    then top-k), summed over the caption's tokens (+ EOS where it stopped)."""
    s = logits.detach().float().clone()
    s[..., sorted(_banned(model))] = float("-inf")
    s = s / temperature
    kth = s.topk(top_k, dim=-1).values[..., -1:]
    s = s.masked_fill(s < kth, float("-inf"))
    logp = torch.log_softmax(s, -1).gather(-1, ids[..., None]).squeeze(-1)
    valid = torch.arange(ids.shape[1])[None] < lengths[:, None]
    return torch.where(valid, logp, torch.zeros_like(logp)).sum(1)


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (2.0, 5)])
def test_reinforce_log_prob_is_that_of_the_sampling_policy(model, monkeypatch, temperature, top_k):
    """REINFORCE's gradient is A * grad log pi(caption) for the pi that sampled the caption: caption() samples from the
    logits with special ids suppressed, divided by the temperature and cut to the top k. The log-prob of the plain
    softmax of the raw logits is another distribution (the tiny model puts 5-30 % of its mass on suppressed ids)."""
    import dualloop.loop.step as step_mod

    seen = {}
    original_pg, original_logits = step_mod.policy_gradient_loss, model.caption_logits

    def pg_spy(token_logp, adv):
        seen["logp"], seen["adv"] = token_logp, adv
        return original_pg(token_logp, adv)

    def logits_spy(images, masks, ids, lengths, **kw):
        out = original_logits(images, masks, ids, lengths, **kw)
        seen["logits"], seen["ids"], seen["lengths"] = out, ids, lengths
        return out

    monkeypatch.setattr(step_mod, "policy_gradient_loss", pg_spy)
    monkeypatch.setattr(model, "caption_logits", logits_spy)
    cfg = _cfg("reinforce", max_new=5)
    cfg.caption.temperature, cfg.caption.top_k = temperature, top_k
    out = step_mod.DualLoopStep(model, cfg, device="cpu")(_crafted_batch(1), torch.Generator().manual_seed(2))
    k = top_k if top_k > 0 else seen["logits"].shape[-1]
    expected = _policy_log_probs(model, seen["logits"], seen["ids"], seen["lengths"].cpu(), temperature, k)
    assert torch.isfinite(expected).all()  # every sampled token lies in the support of that policy
    torch.testing.assert_close(seen["logp"].sum(1).detach(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.values["pg_loss"],
                               (-(seen["adv"] * expected)).view(-1, cfg.reinforce_samples).mean(1),
                               rtol=1e-5, atol=1e-5)
    # gradient: d(pg)/d(logits) is that of -(A * log pi).mean() with the sampler's pi
    logits = seen["logits"]
    g_loop, = torch.autograd.grad(seen["logp"].sum(1).mul(seen["adv"]).sum(), logits, retain_graph=True)
    ref_in = logits.detach().clone().requires_grad_(True)
    s = ref_in.float().clone()
    s[..., sorted(_banned(model))] = float("-inf")
    s = s / temperature
    s = s.masked_fill(s < s.topk(k, dim=-1).values[..., -1:].detach(), float("-inf"))
    lp = torch.log_softmax(s, -1).gather(-1, seen["ids"][..., None]).squeeze(-1)
    valid = torch.arange(seen["ids"].shape[1])[None] < seen["lengths"].cpu()[:, None]
    g_ref, = torch.autograd.grad((torch.where(valid, lp, 0.0).sum(1) * seen["adv"]).sum(), ref_in)
    assert torch.isfinite(g_loop).all()
    torch.testing.assert_close(g_loop, g_ref, rtol=1e-4, atol=1e-6)


def test_gumbel_caption_never_feeds_tokens_generation_suppresses(model, monkeypatch):
    """The Gumbel caption's hard tokens (what grounding reads) come from the same vocabulary the caption sampler may
    emit: no [SEG], <vp>, image-context or pad token inside the caption span."""
    import dualloop.loop.step as step_mod

    seen = []
    original = step_mod.soft_caption_embeddings

    def spy(*args, **kwargs):
        emb, tokens = original(*args, **kwargs)
        seen.append(tokens)
        return emb, tokens

    monkeypatch.setattr(step_mod, "soft_caption_embeddings", spy)
    cfg = _cfg("gumbel", max_new=8)
    banned = _banned(model)
    fed = []
    for seed in range(3):
        for kind in (0, 1):
            step = step_mod.DualLoopStep(model, cfg, device="cpu")
            out = step(_crafted_batch(kind), torch.Generator().manual_seed(seed))
            for row, n in zip(seen[-1].tolist(), out.values["caption_len"].long().tolist()):
                fed += row[:n]
            out.loss.backward()
    assert len(fed) > 20
    assert not banned & set(fed), sorted(banned & set(fed))


def test_reinforce_with_lora_dropout_is_flagged():
    """Sampling runs without dropout, log pi with it: the trainer warns unless LoRA dropout is 0 (or not REINFORCE)."""
    from dualloop.config import LoraConfig
    from dualloop.loop.step import reinforce_dropout_note

    note = reinforce_dropout_note(LoopConfig(caption_grad="reinforce"), LoraConfig(dropout=0.05))
    assert note and "model.lora.dropout=0.05" in note
    assert reinforce_dropout_note(LoopConfig(caption_grad="reinforce"), LoraConfig(dropout=0.0)) is None
    assert reinforce_dropout_note(LoopConfig(caption_grad="reinforce"), LoraConfig(enabled=False)) is None
    assert reinforce_dropout_note(LoopConfig(caption_grad="gumbel"), LoraConfig(dropout=0.05)) is None


def test_gumbel_caption_has_no_eos_inside_its_span(model, monkeypatch):
    """Grounding reads the Gumbel caption for the generated caption's length; generation never emits EOS inside that
    span (EOS ends it), so neither may the Gumbel sample - even where the teacher-forced logits favour stopping."""
    import dualloop.loop.step as step_mod

    seen = []
    original_emb, original_logits = step_mod.soft_caption_embeddings, model.caption_logits

    def emb_spy(*args, **kwargs):
        emb, tokens = original_emb(*args, **kwargs)
        seen.append(tokens)
        return emb, tokens

    def eos_heavy(*args, **kwargs):  # the captioner wants to stop everywhere
        out = original_logits(*args, **kwargs)
        return out + 50.0 * torch.nn.functional.one_hot(torch.tensor(model.eos_token_id), out.shape[-1])

    monkeypatch.setattr(step_mod, "soft_caption_embeddings", emb_spy)
    monkeypatch.setattr(model, "caption_logits", eos_heavy)
    cfg = _cfg("gumbel", max_new=8)
    cfg.gumbel_replace_prob = 0.0
    out = step_mod.DualLoopStep(model, cfg, device="cpu")(_crafted_batch(0), torch.Generator().manual_seed(0))
    fed = [t for row, n in zip(seen[-1].tolist(), out.values["caption_len"].long().tolist()) for t in row[:n]]
    assert fed and model.eos_token_id not in fed
    out.loss.backward()


def test_teacher_forced_logits_are_those_generation_sampled_from(model):
    """Label shift of caption_logits (used by the caption CE, REINFORCE's log pi and the Gumbel caption): logits[:, t]
    predicts caption token t. Greedy captions are reproduced exactly by the argmax of the teacher-forced scores,
    including the EOS that ended them."""
    from dualloop.loop.step import _append_eos, _fixed_width

    batch = _crafted_batch(0)
    was = model.training
    model.eval()  # no dropout: generation runs in eval mode
    try:
        cap = model.caption(batch["image1"], batch["mask1"], max_new_tokens=8)
        ids = _fixed_width(cap.ids, 8, model.pad_token_id)
        ids_e, lengths_e = _append_eos(ids, cap.lengths, model.eos_token_id, cap.lengths < 8)
        with torch.no_grad():
            scores, _ = model.caption_scores(model.caption_logits(batch["image1"], batch["mask1"], ids_e, lengths_e))
    finally:
        model.train(was)
    pred = scores.argmax(-1)
    for i, n in enumerate(lengths_e.tolist()):
        assert pred[i, :n].tolist() == ids_e[i, :n].tolist()
