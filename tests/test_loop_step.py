"""The dual-loop step on the tiny model (plain torch, no DeepSpeed): one step per gradient mode on the synthetic
corpus, where the mask loss's gradient goes in each mode, the supervised caption loss, and equal work whatever the
data."""
from __future__ import annotations

import collections
import math

import pytest
import torch

from dualloop.config import ConfigError, LoopConfig

MAX_NEW = 4


@pytest.fixture(scope="module")
def corpus_batches(tmp_path_factory):
    """Two micro-batches of 2 from the synthetic corpus's mixture (all four formats)."""
    import yaml

    from dualloop.data import build_mixture, collate_samples, write_synthetic_corpus

    paths = write_synthetic_corpus(tmp_path_factory.mktemp("corpus"), seed=0)
    data = yaml.safe_load(open(paths["config"]))
    mix = build_mixture(data["data"]["datasets"], seed=0)
    # one sample per format, so the batches mix sources, pairing, captions and no captions
    firsts = {}
    for i in range(len(mix)):
        d, _ = mix.locate(i)
        firsts.setdefault(d, i)
    items = [mix[i] for i in sorted(firsts.values())]
    return [collate_samples(items[:2]), collate_samples(items[2:4])]


def _loop_cfg(mode: str, caption_weight: float = 0.0) -> LoopConfig:
    cfg = LoopConfig(caption_grad=mode)
    cfg.caption.max_new_tokens = MAX_NEW
    cfg.loss.caption = caption_weight
    cfg.loss.backend = "torch"
    cfg.reinforce_samples = 2
    cfg.gumbel_topk = 8
    return cfg


def _rows(model):
    return model.language_model.embed_tokens.rows


def _vp_grad(model, generated: set[int] = frozenset()) -> float:
    """|grad| of the <vp>/</vp> embedding rows: these tokens belong to the caption prompt. An untrained captioner
    may also emit them (then they reach grounding as caption tokens): such ids are left out via `generated`."""
    rows = _rows(model)
    g = rows.embed.grad
    ids = [i for i in (model.vp_start_id, model.vp_end_id) if i not in generated]
    assert ids, "both region tokens were generated; pick another seed"
    if g is None:
        return 0.0
    return float(g[rows.slot_of_id[torch.tensor(ids)]].abs().sum())


def _generated_ids(model, fn) -> tuple[object, set[int]]:
    ids: set[int] = set()
    original = model.caption

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        for row, n in zip(out.ids.tolist(), out.lengths.tolist()):
            ids.update(row[:n])
        return out

    model.caption = spy
    try:
        return fn(), ids
    finally:
        del model.caption


def _decoder_grad(model) -> float:
    return sum(float(p.grad.abs().sum()) for p in model.sam2.mask_decoder.parameters() if p.grad is not None)


@pytest.mark.parametrize("mode", ["none", "gumbel", "reinforce"])
def test_one_step_per_mode(model, corpus_batches, mode):
    from dualloop.loop.step import DualLoopStep

    model.zero_grad(set_to_none=True)
    step = DualLoopStep(model, _loop_cfg(mode), device="cpu")
    out, generated = _generated_ids(model, lambda: step(corpus_batches[0], torch.Generator().manual_seed(0)))
    assert out.loss.dim() == 0 and math.isfinite(out.loss.item())
    B = len(corpus_batches[0]["image1"])
    for name in ("loss", "mask_loss", "bce", "dice", "cycle_iou", "caption_len"):
        assert out.values[name].shape == (B,) and torch.isfinite(out.values[name]).all(), name
    assert ((out.values["cycle_iou"] >= 0) & (out.values["cycle_iou"] <= 1)).all()
    assert (out.values["caption_len"] <= MAX_NEW).all()
    assert len(out.captions) == B and out.sources == corpus_batches[0]["source"]
    out.loss.backward()
    assert _decoder_grad(model) > 0  # grounding always learns
    if mode == "none":
        assert _vp_grad(model, generated) == 0.0  # stop-gradient: the captioning path gets nothing
    else:
        assert _vp_grad(model) > 0  # gumbel / policy gradient: the mask loss reaches the captioning path
    if mode == "reinforce":
        assert "reward" in out.values and "pg_loss" in out.values


def test_gumbel_gradient_reaches_caption_logits(model, corpus_batches):
    """The tensor-level statement: d(mask loss)/d(caption logits) is nonzero in gumbel mode."""
    from dualloop.loop.step import DualLoopStep

    seen = []
    original = model.caption_logits

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        out.retain_grad()
        seen.append(out)
        return out

    model.caption_logits = spy
    try:
        model.zero_grad(set_to_none=True)
        step = DualLoopStep(model, _loop_cfg("gumbel"), device="cpu")
        out = step(corpus_batches[1], torch.Generator().manual_seed(1))
        out.loss.backward()
    finally:
        del model.caption_logits
    assert len(seen) == 1 and seen[0].grad is not None and seen[0].grad.abs().sum() > 0
    # in `none` with no caption loss the caption logits are never computed at all
    seen.clear()
    model.caption_logits = spy
    try:
        DualLoopStep(model, _loop_cfg("none"), device="cpu")(corpus_batches[1], torch.Generator().manual_seed(1))
    finally:
        del model.caption_logits
    assert seen == []


def test_supervised_caption_loss_only_where_captions_exist(model, corpus_batches):
    from dualloop.loop.step import DualLoopStep

    batch = dict(corpus_batches[0])
    batch["captions"] = [["the red circle on the left"], []]
    model.zero_grad(set_to_none=True)
    out = DualLoopStep(model, _loop_cfg("none", caption_weight=1.0), device="cpu")(batch, torch.Generator())
    assert out.valid["caption_loss"].tolist() == [True, False]
    assert math.isfinite(out.values["caption_loss"][0].item()) and out.values["caption_loss"][0] > 0
    out.loss.backward()
    assert _vp_grad(model) > 0  # the supervised loss teaches the captioner (region prompt rows)

    batch["captions"] = [[], []]  # no caption anywhere: same calls, zero weight, finite
    out = DualLoopStep(model, _loop_cfg("none", caption_weight=1.0), device="cpu")(batch, torch.Generator())
    assert math.isfinite(out.loss.item()) and out.valid["caption_loss"].tolist() == [False, False]


def _crafted_batch(kind: int) -> dict:
    """Deliberately different micro-batches: sources, sizes, captions, empty/full masks, pairing."""
    g = torch.Generator().manual_seed(kind)
    if kind == 0:
        sizes, src, caps = [(64, 64), (64, 64)], ["refcoco", "refcoco"], [["the red circle"], ["a blue square"]]
    else:
        sizes, src, caps = [(40, 56), (72, 48)], ["sav", "sa1b"], [[], []]
    b = {"image1": [], "mask1": [], "image2": [], "mask2": [], "captions": caps, "source": src,
         "key": [f"k{i}" for i in range(2)], "paired": torch.tensor([kind == 1, False])}
    for i, (h, w) in enumerate(sizes):
        img = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
        m = torch.zeros(h, w, dtype=torch.uint8)
        if kind == 0:
            m[h // 4: h // 2, w // 4: w // 2] = 1
            m2 = torch.zeros_like(m) if i == 0 else m  # an empty target
        else:
            m[0, 0] = 1  # a single pixel: the smallest region prompt
            m2 = torch.ones_like(m)
        b["image1"].append(img)
        b["mask1"].append(m)
        b["image2"].append(img if i == 1 else torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g))
        b["mask2"].append(m2)
    return b


def _count_calls(model, fn):
    """Module calls during fn(), outside the caption phase (generation's steps are equalized by synced_gpus,
    tested with 2 processes), plus the number of caption() calls."""
    counts = collections.Counter()
    active = [True]
    names = {m: n for n, m in model.named_modules()}
    handles = [m.register_forward_pre_hook(lambda mod, args: counts.update([names[mod]]) if active[0] else None)
               for m in model.modules()]
    original = model.caption

    def caption(*a, **k):
        counts.update(["<caption>"])
        active[0] = False
        try:
            return original(*a, **k)
        finally:
            active[0] = True

    model.caption = caption
    try:
        fn()
    finally:
        del model.caption
        for h in handles:
            h.remove()
    return counts


@pytest.mark.parametrize("mode", ["none", "gumbel", "reinforce"])
def test_equal_work_whatever_the_data(model, mode):
    from dualloop.loop.step import DualLoopStep

    cfg = _loop_cfg(mode, caption_weight=1.0)
    if mode == "reinforce":
        cfg.reinforce_baseline = "greedy"
    step = DualLoopStep(model, cfg, device="cpu")
    counts = []
    for kind in (0, 1):
        batch = _crafted_batch(kind)
        run = lambda b=batch, k=kind: step(b, torch.Generator().manual_seed(k)).loss.backward()
        counts.append(_count_calls(model, run))
    assert counts[0] == counts[1]
    assert counts[0]["<caption>"] == (2 if mode == "reinforce" else 1)


def test_loop_config_errors(model):
    from dualloop.loop.step import DualLoopStep

    bad = [("caption_grad", "gradient"), ("reinforce_samples", 1), ("gumbel_tau", 0.0)]
    for key, value in bad:
        cfg = _loop_cfg("reinforce" if key == "reinforce_samples" else "gumbel" if key == "gumbel_tau" else "none")
        setattr(cfg, key, value)
        with pytest.raises(ConfigError, match=key):
            DualLoopStep(model, cfg, device="cpu")
    cfg = _loop_cfg("none")
    cfg.caption.gather = "twice"
    with pytest.raises(ConfigError, match="gather"):
        DualLoopStep(model, cfg, device="cpu")
    cfg = _loop_cfg("none")
    cfg.loss.focal = 3.0  # changed a weight while a preset is selected
    with pytest.raises(ConfigError, match="preset=custom"):
        DualLoopStep(model, cfg, device="cpu")
    with pytest.raises(ValueError, match="missing 'mask2'"):
        DualLoopStep(model, _loop_cfg("none"), device="cpu")({"image1": [], "mask1": [], "image2": [],
                                                              "captions": [], "source": []})


def test_sam2_loss_preset_uses_all_masks_and_argmin(model, corpus_batches):
    """preset sam2: 20·focal + dice on every multimask output, the argmin per sample back-propagated."""
    from dualloop.loop.step import DualLoopStep

    cfg = _loop_cfg("none")
    cfg.loss.preset = "sam2"
    cfg.loss.bce, cfg.loss.dice = 0.0, 1.0  # the preset's own values are accepted
    step = DualLoopStep(model, cfg, device="cpu")
    assert step._multimask == "all"
    seen = []
    original = model.ground

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(out.logits)
        return out

    model.ground = spy
    try:
        out = step(corpus_batches[0], torch.Generator())
    finally:
        del model.ground
    assert seen[0].dim() == 4 and seen[0].shape[1] > 1  # [B, M, h, w]
    torch.testing.assert_close(out.values["mask_loss"], 20 * out.values["focal"] + out.values["dice"])
    assert math.isfinite(out.loss.item())
    # SAM2 also trains its IoU head (weight 1, every mask): in the loss, and the head gets gradient
    torch.testing.assert_close(out.values["loss"], out.values["mask_loss"] + out.values["iou_head"])
    head = list(model.sam2.mask_decoder.iou_prediction_head.parameters())
    for p in head:
        p.grad = None
    out.loss.backward()
    assert sum(float(p.grad.abs().sum()) for p in head if p.grad is not None) > 0
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("mode,saved", [("none", 2), ("gumbel", 3), ("reinforce", 6)])
@pytest.mark.parametrize("which", [0, 1])
def test_frozen_vision_tower_runs_once_per_step(model, corpus_batches, mode, saved, which):
    """With the vision tower frozen, it runs once per step, in the caption phase, on images1 and the images2 that
    are not their image1 (video pairs); every later call reuses those tokens (supervised caption, gumbel/reinforce
    logits, the greedy baseline, grounding): the same losses and gradients as running the tower in each call, with
    `saved` fewer tower forwards."""
    from dualloop.loop.step import DualLoopStep

    assert model.vision_frozen
    batch = corpus_batches[which]
    pairs = [a is not b for a, b in zip(batch["image1"], batch["image2"])]
    cfg = _loop_cfg(mode, caption_weight=1.0)
    if mode == "reinforce":
        cfg.reinforce_baseline, cfg.reinforce_kl = "greedy", 0.1
    runs = {}
    for reuse in (False, True):
        model.zero_grad(set_to_none=True)
        step = DualLoopStep(model, cfg, device="cpu")
        step.reuse_vision_tokens = reuse
        calls = []
        hook = model.vlm.model.vision_tower.register_forward_hook(
            lambda mod, args, kwargs, out, calls=calls: calls.append(kwargs["pixel_values"].shape[0]),
            with_kwargs=True)
        try:
            torch.manual_seed(0)  # LoRA dropout draws from the global generator
            out = step(batch, torch.Generator().manual_seed(3))
            out.loss.backward()
        finally:
            hook.remove()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        runs[reuse] = (out, grads, calls)
    (a, ga, ca), (b, gb, cb) = runs[False], runs[True]
    assert len(ca) - len(cb) == saved and cb == [len(pairs) + sum(pairs)]  # one call: images1 + distinct images2
    assert a.captions == b.captions
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.values["mask_loss"], a.values["mask_loss"], rtol=1e-5, atol=1e-6)
    assert ga.keys() == gb.keys() and any("multi_modal_projector" in n for n in ga)  # the projector still learns
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-4, atol=1e-9, msg=n)


def test_corpus_batches_mix_pairs_and_single_images(corpus_batches):
    """The vision-reuse test above covers both kinds of samples: video pairs and image2 = image1."""
    kinds = {a is b for batch in corpus_batches for a, b in zip(batch["image1"], batch["image2"])}
    assert kinds == {True, False}
