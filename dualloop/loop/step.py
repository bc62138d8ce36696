"""One dual-loop micro-step: caption phase -> grounding phase -> losses, in one of three gradient modes.

    image1 + mask1 --caption (no grad)--> caption --ground(image2 + caption)--> mask2' ; loss vs mask2

`loop.caption_grad`:
  none       the caption is a constant (stop-gradient); only grounding learns from the cycle.
  gumbel     the trainable model's teacher-forced logits over the generated caption -> straight-through top-k
             Gumbel-softmax -> soft token embeddings into grounding: the mask loss reaches the captioning path.
  reinforce  K sampled captions per region, reward from grounding each (IoU or -loss), advantage against the mean
             of the region's other K-1 (leave-one-out) or the greedy caption, policy gradient on the caption tokens'
             log-probs (+ optional KL).
Plus, where a sample has ground-truth captions, a supervised teacher-forced caption loss.

Equal work on every rank: the number and kind of model calls depend only on the config and the micro-batch size,
never on the data (sources, empty masks, caption lengths, image sizes): ZeRO-3 ranks gather weights in lockstep.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ContextManager

import torch

from dualloop.config import ConfigError, LoopConfig
from dualloop.loop.gumbel import soft_caption_embeddings
from dualloop.loop.losses import MaskLossSpec, caption_ce, mask_losses, resolve_loss, token_log_probs
from dualloop.loop.reinforce import (
    adapters_disabled,
    advantages,
    kl_per_sample,
    policy_gradient_loss,
    rewards_from,
    sampling_logits,
)

CAPTION_GRAD_MODES = ("none", "gumbel", "reinforce")


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar to back-propagate
    sources: list[str]  # [B] dataset of each sample
    values: dict[str, torch.Tensor]  # per-sample [B] float metrics, detached ("loss": the sample's share)
    valid: dict[str, torch.Tensor] = field(default_factory=dict)  # [B] bool where a metric applies (else: all)
    captions: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds: caption, ground (forward + loss)


def validate_loop_config(cfg: LoopConfig) -> MaskLossSpec:
    if cfg.caption_grad not in CAPTION_GRAD_MODES:
        raise ConfigError(f"loop.caption_grad must be one of {CAPTION_GRAD_MODES}, got {cfg.caption_grad!r}")
    cc = cfg.caption
    if cc.max_new_tokens < 1:
        raise ConfigError(f"loop.caption.max_new_tokens must be >= 1, got {cc.max_new_tokens}")
    if cc.temperature <= 0:
        raise ConfigError(f"loop.caption.temperature must be > 0, got {cc.temperature}")
    if cc.gather not in ("auto", "once", "per_layer"):
        raise ConfigError(f"loop.caption.gather must be auto, once or per_layer, got {cc.gather!r}")
    if cc.ema_decay is not None and not 0.0 < cc.ema_decay < 1.0:
        raise ConfigError(f"loop.caption.ema_decay must be in (0, 1) or null, got {cc.ema_decay}")
    if cfg.caption_grad == "gumbel":
        if cfg.gumbel_tau <= 0 or cfg.gumbel_topk < 1 or not 0 <= cfg.gumbel_replace_prob <= 1:
            raise ConfigError("loop.gumbel_tau must be > 0, loop.gumbel_topk >= 1, loop.gumbel_replace_prob in [0, 1]")
    if cfg.caption_grad == "reinforce":
        if cfg.reinforce_baseline not in ("mean", "greedy"):
            raise ConfigError(f"loop.reinforce_baseline must be mean or greedy, got {cfg.reinforce_baseline!r}")
        if cfg.reinforce_reward not in ("iou", "neg_loss"):
            raise ConfigError(f"loop.reinforce_reward must be iou or neg_loss, got {cfg.reinforce_reward!r}")
        need = 2 if cfg.reinforce_baseline == "mean" else 1
        if cfg.reinforce_samples < need:
            raise ConfigError(f"loop.reinforce_samples must be >= {need} with the {cfg.reinforce_baseline} "
                              f"baseline, got {cfg.reinforce_samples}")
        if cfg.reinforce_kl < 0:
            raise ConfigError(f"loop.reinforce_kl must be >= 0, got {cfg.reinforce_kl}")
    return resolve_loss(cfg.loss)


def reinforce_dropout_note(loop: LoopConfig, lora) -> str | None:
    """What is off about REINFORCE in this config (None when nothing is): captions are sampled with the model in eval
    mode (no dropout) and their log-probabilities computed in train mode, so with LoRA dropout the gradient is that
    of a policy other than the sampling one. TRL's RL trainers turn dropout off for the same reason."""
    if loop.caption_grad == "reinforce" and lora.enabled and lora.dropout > 0:
        return (f"loop.caption_grad=reinforce with model.lora.dropout={lora.dropout}: captions are sampled without "
                "dropout but their log-probabilities are computed with it, which biases the policy gradient; "
                "model.lora.dropout=0 makes them agree")
    return None


def _append_eos(ids: torch.Tensor, lengths: torch.Tensor, eos_id: int, add: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Write EOS right after the caption where `add` [B] is true: the log-prob / CE then includes stopping."""
    B, T = ids.shape
    out = torch.cat([ids, ids.new_full((B, 1), eos_id)], dim=1)
    rows = torch.arange(B, device=ids.device)
    at = lengths.clamp_max(T)
    out[rows, at] = torch.where(add, torch.full_like(lengths, eos_id), out[rows, at])
    return out, lengths + add.long()


def _without_eos(scores: torch.Tensor, eos_id: int, allowed: int) -> tuple[torch.Tensor, int]:
    """Caption scores [..., V] (`caption_scores`, which always leaves EOS allowed) with EOS at -inf too, and the count
    of ids still allowed. No host sync: decided from the ids alone."""
    if not 0 <= eos_id < scores.shape[-1]:
        raise ValueError(f"eos_token_id {eos_id} is outside the caption scores' {scores.shape[-1]} ids")
    banned = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
    banned[eos_id] = True
    return scores.masked_fill(banned, float("-inf")), allowed - 1


def _repeated(x: torch.Tensor | None, k: int) -> torch.Tensor | None:
    """Rows repeated k times in a row (sample-major), as the images they belong to; None stays None."""
    return x if x is None or k == 1 else x.repeat_interleave(k, dim=0)


def _fixed_width(ids: torch.Tensor, width: int, pad_id: int) -> torch.Tensor:
    """Right-pad caption ids to the fixed generation budget: the same shapes on every rank and step."""
    if ids.shape[1] >= width:
        return ids[:, :width]
    return torch.cat([ids, ids.new_full((ids.shape[0], width - ids.shape[1]), pad_id)], dim=1)


def _graph_anchor(*tensors: torch.Tensor) -> torch.Tensor:
    """0 x sum: keeps each tensor's producers in the backward graph even when the loss does not use them on this
    rank (e.g. every caption of the micro-batch ended at once, so no soft token reaches grounding). ZeRO-3 needs the
    same modules in every rank's backward, or the ranks' gathers and reduce-scatters go out of step and hang."""
    return sum(t.float().sum() * 0.0 for t in tensors)


class DualLoopStep:
    """Callable: `step(batch, generator) -> StepOutput` for one micro-batch (a `collate_samples` dict).

    caption_context: a zero-argument callable returning the context manager for the caption phase (the trainer
    passes the ZeRO-3 gather-once/hook-removal context); it yields None when the weights are whole, or a dict whose
    "whole" says whether they stay in place for the phase (`loop.caption.cuda_graph` needs that);
    synced_gpus: keep generating until every rank is done.
    """

    def __init__(self, model, cfg: LoopConfig, *, caption_context: Callable[[], ContextManager] | None = None,
                 synced_gpus: bool = False, device: torch.device | str | None = None):
        self.model = model
        self.cfg = cfg
        self.spec = validate_loop_config(cfg)
        self.caption_context = caption_context or contextlib.nullcontext
        self.synced_gpus = synced_gpus
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.reuse_vision_tokens = True  # False: run the vision tower in every call (for comparisons)

    # ------------------------------------------------------------------------------------------------ helpers
    @property
    def reuse_vision(self) -> bool:
        """A frozen vision tower's tokens of the step's images are computed once per step. Which parts train is the
        same on every rank, so every rank makes the same module calls."""
        return self.reuse_vision_tokens and bool(getattr(self.model, "vision_frozen", False))

    @property
    def _multimask(self) -> str:
        return "all" if self.spec.multimask == "argmin" else "best"

    def _generate(self, images, masks, *, do_sample: bool, generator, vision=None, repeat: int = 1, images2=None):
        """The caption phase: (captions, the vision tokens of images[::repeat], those of images2), tokens None
        unless the tower is frozen.

        With a frozen vision tower its tokens are computed here once (weights gathered), in one tower call for the
        step's images1 and those images2 that are not their image1 (video pairs; single-image samples carry the
        same tensor), and reused by every later call: supervised caption, gumbel/reinforce logits, grounding, a
        second caption phase (`vision` passes them back in). One call whatever the data, so every rank makes the
        same module calls. `repeat`: images are each repeated that many times in a row."""
        cc = self.cfg.caption
        vision2 = None
        with torch.no_grad(), self.caption_context() as phase:
            if vision is None and self.reuse_vision:
                # one tower call; images2 that are their image1 (single-image samples) cost nothing more
                groups = [list(images[::repeat])] + ([list(images2)] if images2 is not None else [])
                vision, *rest = self.model.vision_tokens_of(*groups)
                vision2 = rest[0] if rest else None
            # a CUDA graph holds the weights' addresses: only when they stay put for the phase
            whole = phase is None or bool(phase.get("whole"))
            cap = self.model.caption(images, masks, max_new_tokens=cc.max_new_tokens, do_sample=do_sample,
                                     temperature=cc.temperature, top_k=cc.top_k, synced_gpus=self.synced_gpus,
                                     generator=generator, cuda_graph=cc.cuda_graph and whole,
                                     vision_tokens=_repeated(vision, repeat))
        return cap, vision, vision2

    def _supervised_caption(self, images1, masks1, captions: list[list[str]], generator, vision=None):
        """Teacher-forced CE (+EOS) on one ground-truth caption per sample that has any; one model call whatever
        the data (samples without a caption get an empty target and weight 0)."""
        B = len(images1)
        has = torch.tensor([len(c) > 0 for c in captions], device=self.device)
        picks = []
        for c in captions:
            j = int(torch.randint(len(c), (1,), generator=generator).item()) if len(c) > 1 else 0
            picks.append(c[j] if c else None)
        ids = torch.full((B, 1), self.model.pad_token_id, dtype=torch.long, device=self.device)
        lengths = torch.zeros(B, dtype=torch.long, device=self.device)
        rows = [i for i, t in enumerate(picks) if t is not None]
        if rows:
            enc_ids, enc_len = self.model.encode_captions([picks[i] for i in rows])
            enc_ids, enc_len = enc_ids.to(self.device), enc_len.to(self.device)
            if enc_ids.shape[1] > ids.shape[1]:
                ids = torch.full((B, enc_ids.shape[1]), self.model.pad_token_id, dtype=torch.long, device=self.device)
            index = torch.tensor(rows, device=self.device)
            ids[index, : enc_ids.shape[1]] = enc_ids
            lengths[index] = enc_len
        ids, lengths = _append_eos(ids, lengths, self.model.eos_token_id, has)
        logits = self.model.caption_logits(images1, masks1, ids, lengths, vision_tokens=vision)
        ce = caption_ce(logits, ids, lengths)
        # a per-sample share of the micro-batch (losses.py): divided by B, not by the number of captioned samples,
        # so a sample weighs the same whatever the rest of its micro-batch holds, and the logged "loss" shares
        # (w * ce * has per sample) average to the loss that is back-propagated
        loss = (ce * has).sum() / B
        return loss, ce.detach(), has

    # ------------------------------------------------------------------------------------------------ step
    def __call__(self, batch: dict, generator: torch.Generator | None = None) -> StepOutput:
        for key in ("image1", "mask1", "image2", "mask2", "captions", "source"):
            if key not in batch:
                raise ValueError(f"batch is missing '{key}' (expected a collate_samples dict)")
        moved: dict[int, torch.Tensor] = {}  # single-image samples carry image2 is image1: move each tensor once

        def to_dev(xs: list[torch.Tensor]) -> list[torch.Tensor]:
            for t in xs:
                if id(t) not in moved:
                    moved[id(t)] = t.to(self.device, non_blocking=True)
            return [moved[id(t)] for t in xs]

        images1, masks1 = to_dev(batch["image1"]), to_dev(batch["mask1"])
        images2, masks2 = to_dev(batch["image2"]), to_dev(batch["mask2"])
        B = len(images1)
        if B == 0 or not (len(masks1) == len(images2) == len(masks2) == B):
            raise ValueError(f"batch has {B} image1, {len(masks1)} mask1, {len(images2)} image2, {len(masks2)} mask2")

        if self.cfg.caption_grad == "reinforce":
            out, vision1 = self._reinforce(images1, masks1, images2, masks2, generator)
        else:
            out, vision1 = self._caption_then_ground(images1, masks1, images2, masks2, generator)
        out.sources = list(batch["source"])

        w = self.cfg.loss.caption
        if w > 0:
            t0 = time.perf_counter()
            cap_loss, ce, has = self._supervised_caption(images1, masks1, batch["captions"], generator, vision1)
            out.loss = out.loss + w * cap_loss
            out.values["caption_loss"] = ce
            out.valid["caption_loss"] = has
            out.values["loss"] = out.values["loss"] + w * ce * has
            out.timings["ground"] += time.perf_counter() - t0
        return out

    def _caption_then_ground(self, images1, masks1, images2, masks2, generator):
        cc, mode = self.cfg.caption, self.cfg.caption_grad
        t0 = time.perf_counter()
        cap, vision1, vision2 = self._generate(images1, masks1, do_sample=cc.do_sample, generator=generator,
                                               images2=images2)
        ids = _fixed_width(cap.ids, cc.max_new_tokens, self.model.pad_token_id).to(self.device)
        lengths = cap.lengths.to(self.device)
        t1 = time.perf_counter()
        anchor = 0.0
        if mode == "none":
            g = self.model.ground(images2, caption_ids=ids, caption_lengths=lengths, multimask=self._multimask,
                                  vision_tokens=vision2)
        else:  # gumbel
            logits = self.model.caption_logits(images1, masks1, ids, lengths, vision_tokens=vision1)
            # only ids caption() may generate inside a caption: no [SEG]/<vp>/image/pad token, and no EOS either
            # (EOS ends a caption: generation never puts one inside the span grounding reads, whose length is fixed)
            scores, allowed = self.model.caption_scores(logits)
            scores, allowed = _without_eos(scores, self.model.eos_token_id, allowed)
            emb, _ = soft_caption_embeddings(self.model, scores, tau=self.cfg.gumbel_tau,
                                             k=min(self.cfg.gumbel_topk, allowed),
                                             replace_prob=self.cfg.gumbel_replace_prob, generator=generator)
            g = self.model.ground(images2, caption_embeds=emb, caption_lengths=lengths, multimask=self._multimask,
                                  vision_tokens=vision2)
            anchor = _graph_anchor(logits, emb)
        ml = mask_losses(g.logits, masks2, self.spec, g.iou_pred)
        sample_loss = ml.total if ml.iou_head is None else ml.total + ml.iou_head
        loss = sample_loss.mean() + anchor
        t2 = time.perf_counter()
        values = {"loss": sample_loss.detach().float(), "mask_loss": ml.total.detach().float(), "bce": ml.bce,
                  "focal": ml.focal, "dice": ml.dice,
                  "cycle_iou": ml.iou, "caption_len": cap.lengths.float().to(self.device)}
        if ml.iou_head is not None:
            values["iou_head"] = ml.iou_head.detach().float()
        return StepOutput(loss=loss, sources=[], values=values, captions=list(cap.texts),
                          timings={"caption": t1 - t0, "ground": t2 - t1}), vision1

    def _reinforce(self, images1, masks1, images2, masks2, generator):
        cfg, K = self.cfg, self.cfg.reinforce_samples
        B = len(images1)
        rep = lambda xs: [x for x in xs for _ in range(K)]  # sample-major: row b*K + j
        images1k, masks1k, images2k, masks2k = rep(images1), rep(masks1), rep(images2), rep(masks2)
        t0 = time.perf_counter()
        sampled, vision1, vision2 = self._generate(images1k, masks1k, do_sample=True, generator=generator,
                                                   repeat=K, images2=images2)
        greedy = None
        if cfg.reinforce_baseline == "greedy":
            greedy, _, _ = self._generate(images1, masks1, do_sample=False, generator=generator, vision=vision1)
        t1 = time.perf_counter()

        ids = _fixed_width(sampled.ids, cfg.caption.max_new_tokens, self.model.pad_token_id).to(self.device)
        lengths = sampled.lengths.to(self.device)
        g = self.model.ground(images2k, caption_ids=ids, caption_lengths=lengths, multimask=self._multimask,
                              vision_tokens=_repeated(vision2, K))
        ml = mask_losses(g.logits, masks2k, self.spec, g.iou_pred)
        rewards = rewards_from(ml.iou, ml.total, cfg.reinforce_reward).view(B, K)
        greedy_rewards = greedy_iou = None
        if greedy is not None:
            with torch.no_grad():
                gg = self.model.ground(images2, caption_ids=greedy.ids.to(self.device),
                                       caption_lengths=greedy.lengths.to(self.device), multimask=self._multimask,
                                       vision_tokens=vision2)
                mlg = mask_losses(gg.logits, masks2, self.spec)
            greedy_rewards = rewards_from(mlg.iou, mlg.total, cfg.reinforce_reward)
            greedy_iou = mlg.iou
        adv = advantages(rewards, cfg.reinforce_baseline, greedy_rewards).flatten()

        # log pi(caption): the caption tokens and, for captions that stopped, the EOS that ended them
        ended = lengths < cfg.caption.max_new_tokens
        ids_e, lengths_e = _append_eos(ids, lengths, self.model.eos_token_id, ended)
        vision1k = _repeated(vision1, K)
        logits = self.model.caption_logits(images1k, masks1k, ids_e, lengths_e, vision_tokens=vision1k)
        # log pi under the policy that sampled: suppressed special ids, temperature, top-k (as caption() sampled)
        policy = sampling_logits(self.model.caption_scores(logits)[0], cfg.caption.temperature, cfg.caption.top_k)
        logp, valid = token_log_probs(policy, ids_e, lengths_e)
        pg = policy_gradient_loss(logp, adv)
        head = ml.iou_head if ml.iou_head is not None else torch.zeros_like(ml.total)
        loss = (ml.total + head).mean() + cfg.reinforce_weight * pg
        kl = None
        if cfg.reinforce_kl > 0:
            with torch.no_grad(), adapters_disabled(self.model):
                ref_logits = self.model.caption_logits(images1k, masks1k, ids_e, lengths_e, vision_tokens=vision1k)
            kl = kl_per_sample(logits, ref_logits, valid)
            loss = loss + cfg.reinforce_kl * kl.mean()
        t2 = time.perf_counter()

        per_region = lambda v: v.detach().float().view(B, K).mean(dim=1)
        sample_loss = (ml.total + head).detach().float() + cfg.reinforce_weight * -(adv * logp.sum(1)).detach()
        if kl is not None:
            sample_loss = sample_loss + cfg.reinforce_kl * kl.detach()
        values = {"loss": per_region(sample_loss), "mask_loss": per_region(ml.total), "bce": per_region(ml.bce),
                  "focal": per_region(ml.focal),
                  "dice": per_region(ml.dice), "reward": per_region(rewards.flatten()),
                  "cycle_iou": greedy_iou if greedy_iou is not None else per_region(ml.iou),
                  "caption_len": per_region(sampled.lengths.float().to(self.device)),
                  "pg_loss": per_region(-(adv * logp.sum(1)))}
        if kl is not None:
            values["kl"] = per_region(kl)
        if ml.iou_head is not None:
            values["iou_head"] = per_region(ml.iou_head)
        texts = list(greedy.texts) if greedy is not None else list(sampled.texts[::K])
        return StepOutput(loss=loss, sources=[], values=values, captions=texts,
                          timings={"caption": t1 - t0, "ground": t2 - t1}), vision1
