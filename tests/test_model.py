"""Tiny-preset tests of the Sa2VA-style composite (CPU): captioning, grounding, trainable parts, tokens, inputs."""
import pytest
import torch

from dualloop.config import LoraConfig, ModelConfig, TrainablePartsConfig
from dualloop.model import CaptionOutput, GroundOutput, build_model
from dualloop.model.composite import END_CHECK_EVERY
from dualloop.model.region import region_cells
from dualloop.model.trainable import COMPONENTS, component_of
from dualloop.model.vision_families import positions_from_mask

torch.set_num_threads(1)


def _cfg(**train) -> ModelConfig:
    return ModelConfig(preset="tiny", lora=LoraConfig(r=8, alpha=16, dropout=0.0),
                       train=TrainablePartsConfig(**train))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model(_cfg())
    m.eval()
    return m


def _batch(sizes=((64, 80), (96, 96), (70, 64)), seed=0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in sizes]
    masks = []
    for i, (h, w) in enumerate(sizes):
        m = torch.zeros(h, w, dtype=torch.uint8)
        m[h // 4: h // 4 + h // (2 + i), w // 5: w // 5 + w // 3] = 1
        masks.append(m)
    return images, masks


def test_build_groups_follow_config(model):
    groups = {g["name"]: g for g in model.parameter_groups()}
    assert list(groups) == list(COMPONENTS)
    defaults = TrainablePartsConfig()
    for name, g in groups.items():
        assert g["params"] > 0, name
        assert g["trainable"] == getattr(defaults, name), name
    for name, p in model.named_parameters():
        assert p.requires_grad == getattr(defaults, component_of(name)), name
    assert model.hidden_size == model.vlm.config.text_config.hidden_size


def test_zero3_leaf_classes_are_the_repeated_single_input_blocks(model):
    # LLM decoder layers, ViT layers, SAM2 Hiera blocks; not SAM2's two-way blocks (queries and keys carry gradient)
    assert [c.__name__ for c in model.zero3_leaf_classes()] == ["Qwen2DecoderLayer", "InternVLVisionLayer",
                                                                 "Sam2MultiScaleBlock"]


def test_special_tokens_are_single_ids(model):
    tok = model.tokenizer
    for token, tid in (("[SEG]", model.seg_token_id), ("<vp>", model.vp_start_id), ("</vp>", model.vp_end_id)):
        assert tok.encode(token, add_special_tokens=False) == [tid]
        assert tid != tok.unk_token_id
    assert len({model.seg_token_id, model.vp_start_id, model.vp_end_id, model.pad_token_id,
                model.eos_token_id}) == 5
    # the grounding prompt holds exactly one [SEG] id, the caption prompt one <vp> ... </vp> pair
    ids, lengths = model.encode_captions(["the red circle"])
    batch = model.prompts.ground_prompts([ids[0, : lengths[0]].tolist()])
    assert (batch.ids == model.seg_token_id).sum() == 1
    assert batch.ids[0, batch.seg_pos[0]] == model.seg_token_id
    cap = model.prompts.caption_prompts([3])
    assert (cap.ids == model.vp_start_id).sum() == 1 and (cap.ids == model.vp_end_id).sum() == 1
    start = (cap.ids[0] == model.vp_start_id).nonzero().item()
    assert cap.region_pos[0].tolist() == [start + 1, start + 2, start + 3]
    assert cap.ids[0, start + 4] == model.vp_end_id


def test_synthetic_vocabulary_known(model):
    words = ("the a small large red green blue yellow circle square triangle on at in left right top bottom "
             "middle").split()
    ids, lengths = model.encode_captions(words + ["Red circle.", "zebra"])
    unk = model.tokenizer.unk_token_id
    assert (ids[: len(words), 0] != unk).all() and (lengths[: len(words)] == 1).all()
    assert ids[len(words)].tolist()[:3] != [unk] * 3 and lengths[len(words)] == 3  # "red", "circle", "."
    assert ids[-1, 0] == unk


def test_caption_batch(model):
    images, masks = _batch()
    out = model.caption(images, masks, max_new_tokens=6)
    assert isinstance(out, CaptionOutput) and len(out.texts) == 3
    assert out.ids.dtype == torch.long and out.ids.shape[0] == 3 and out.ids.shape[1] <= 6
    assert ((out.lengths >= 0) & (out.lengths <= 6)).all()
    for i in range(3):
        assert (out.ids[i, out.lengths[i]:] == model.pad_token_id).all()
        assert not (out.ids[i, : out.lengths[i]] == model.eos_token_id).any()
    assert all(isinstance(t, str) for t in out.texts)
    # greedy decoding agrees with teacher forcing on its own output (left padding, positions, KV cache), with the
    # special ids that generation suppresses masked the same way
    logits = model.caption_logits(images, masks, out.ids, out.lengths)
    assert logits.shape == (3, out.ids.shape[1], model.vlm.config.text_config.vocab_size)
    suppress = model._suppress_special()
    for i in range(3):
        n = int(out.lengths[i])
        assert torch.equal(suppress(None, logits[i, :n].detach()).argmax(-1), out.ids[i, :n])


def _hf_generate_ids(model, images, masks, max_new_tokens, sample_seed=None, top_k=0):
    """The ids transformers' generate gives for caption()'s prompt and processors (the reference decoder)."""
    from transformers import LogitsProcessorList

    from dualloop.model.sampling import GumbelSampler

    _, batch, embeds = model._caption_prompt(images, masks)
    processors = LogitsProcessorList([model._suppress_special()])
    if sample_seed is not None:
        processors.append(GumbelSampler(1.0, top_k, torch.Generator().manual_seed(sample_seed)))
    with torch.no_grad():
        out = model.vlm.generate(inputs_embeds=embeds, attention_mask=batch.attention_mask.to(model.device),
                                 generation_config=model.generation_config(max_new_tokens), logits_processor=processors)
    ids = out if isinstance(out, torch.Tensor) else out.sequences
    return model._finish_captions(ids[:, :max_new_tokens])


@pytest.mark.parametrize("static", [False, True], ids=["dynamic_cache", "static_cache"])
@pytest.mark.parametrize("sample_seed", [None, 5, 11])
def test_caption_decoding_matches_transformers_generate(model, sample_seed, static, monkeypatch):
    """caption()'s own decoding loop gives transformers' generate ids: greedy and Gumbel sampling, left-padded
    prompts of different lengths, rows that end early, and stopping once every row has ended. Both KV caches: the
    dynamic one and the static one that CUDA graphs replay (run eagerly here)."""
    images, masks = _batch(sizes=((64, 80), (96, 96), (70, 64), (50, 90)))
    masks[3].zero_()
    masks[3][0:4, 0:4] = 1  # a one-cell region: a shorter prompt, so the batch is left-padded
    for max_new in (3, 9):
        ref = _hf_generate_ids(model, images, masks, max_new, sample_seed, top_k=20)
        out = model.caption(images, masks, max_new_tokens=max_new, do_sample=sample_seed is not None, top_k=20,
                            generator=torch.Generator().manual_seed(sample_seed) if sample_seed is not None else None,
                            cuda_graph=static)
        assert model.last_decoding == ("static" if static else "dynamic")
        assert torch.equal(out.ids, ref.ids) and torch.equal(out.lengths, ref.lengths) and out.texts == ref.texts
    # every row ends after its first token (EOS is then the only allowed id): same ids, and the loop stops at its
    # first end check instead of running all 12 tokens
    real = model._suppress_special

    def eos_after_first():
        proc = real()

        def call(input_ids, scores):
            scores = proc(input_ids, scores)
            if input_ids.shape[1] >= 1:
                eos = scores[:, model.eos_token_id].clone()
                scores[:] = float("-inf")
                scores[:, model.eos_token_id] = eos
            return scores
        return call
    monkeypatch.setattr(model, "_suppress_special", eos_after_first)
    ref = _hf_generate_ids(model, images, masks, 12, sample_seed)
    forwards = []
    hook = model.language_model.register_forward_hook(lambda *a: forwards.append(1))
    try:
        out = model.caption(images, masks, max_new_tokens=12, do_sample=sample_seed is not None,
                            generator=torch.Generator().manual_seed(sample_seed) if sample_seed is not None else None,
                            cuda_graph=static)
    finally:
        hook.remove()
    assert torch.equal(out.ids, ref.ids) and (out.lengths == 1).all() and out.texts == ref.texts
    assert len(forwards) == END_CHECK_EVERY


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_caption_decoding_matches_transformers_generate_on_cuda(dtype):
    torch.manual_seed(0)
    m = build_model(_cfg()).to("cuda", dtype).eval()
    images, masks = _batch()
    for seed in (None, 5):
        ref = _hf_generate_ids(m, images, masks, 8, seed, top_k=20)
        out = m.caption(images, masks, max_new_tokens=8, do_sample=seed is not None, top_k=20,
                        generator=torch.Generator().manual_seed(seed) if seed is not None else None)
        assert torch.equal(out.ids, ref.ids) and out.texts == ref.texts


def test_static_cache_scores_match_dynamic(model):
    """The static steps' next-token logits equal the dynamic cache's at every step (left-padded batch), and an
    LLM the static path cannot serve falls back to the dynamic cache."""
    from dualloop.model.kv_decoding import DynamicSteps, StaticSteps, make_steps

    images, masks = _batch(sizes=((64, 80), (50, 90)))
    masks[1].zero_()
    masks[1][0:4, 0:4] = 1
    _, batch, embeds = model._caption_prompt(images, masks)
    mask = batch.attention_mask
    assert (mask == 0).any()  # really left-padded
    args = (model.language_model, model.vlm.lm_head, model.embed_tokens, model._cache_kwarg())
    dyn, sta = DynamicSteps(*args), StaticSteps(*args, max_new_tokens=6)
    with torch.no_grad():
        pos = positions_from_mask(mask)
        a, b = dyn.prefill(embeds, mask, pos), sta.prefill(embeds, mask, pos)
        for _ in range(5):
            assert torch.isfinite(b).all()
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
            token = a.argmax(-1)
            a, b = dyn.next(token), sta.next(token)
    cfg = model.language_model.config
    saved = cfg._attn_implementation
    try:
        cfg._attn_implementation = "flash_attention_2"  # takes no prepared additive mask
        assert isinstance(make_steps(*args, 4, static=True, graph=False), DynamicSteps)
    finally:
        cfg._attn_implementation = saved
    assert isinstance(make_steps(*args, 4, static=True, graph=False), StaticSteps)


def test_cuda_graph_sequencing_with_an_emulated_graph(model, monkeypatch, caplog):
    """The graph path's order of work on CPU, with a stand-in for CUDA graphs that behaves like one: recording
    runs nothing (the static buffers are left as they were), replaying runs the recorded step. Prefill, one
    warm-up step, record, then a replay per token: the ids equal the dynamic cache's."""
    import contextlib

    from dualloop.model import kv_decoding

    recorded = []

    class FakeGraph:
        def capture_begin(self, capture_error_mode="global"):
            steps = recorded[-1]
            self.state = [steps.position, steps.slot, *(t for layer in steps.cache.layers
                                                        for t in (layer.keys, layer.values, layer.cumulative_length))]
            self.saved = [t.clone() for t in self.state]

        def capture_end(self):
            for t, v in zip(self.state, self.saved):  # a recording leaves the buffers untouched
                t.copy_(v)

        def replay(self):
            recorded[-1]._step()

    class Recording(kv_decoding.StaticSteps):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            recorded.append(self)

    monkeypatch.setattr(kv_decoding, "StaticSteps", Recording)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    stream = type("Stream", (), {"wait_stream": lambda self, other: None})
    monkeypatch.setattr(torch.cuda, "Stream", stream)
    monkeypatch.setattr(torch.cuda, "current_stream", stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # the caller's "on a GPU" check
    images, masks = _batch(sizes=((64, 80), (96, 96), (50, 90)))
    masks[2].zero_()
    masks[2][0:4, 0:4] = 1
    for max_new in (1, 2, 3, 9):
        ref = _hf_generate_ids(model, images, masks, max_new)
        out = model.caption(images, masks, max_new_tokens=max_new, cuda_graph=True)
        steps = recorded[-1]
        assert torch.equal(out.ids, ref.ids) and out.texts == ref.texts
        # prefill gives token 1; warm-up (eager) token 2; then one replay per further token
        assert steps.replays == max(0, max_new - 2) and steps._eager_steps == min(1, max_new - 1)
        assert model.last_decoding == ("graph" if max_new > 2 else "static")

    # a recording that fails (here: in the middle of the step) leaves the buffers as they were: decoding goes on
    # eagerly with the same ids, and says so
    def failing_end(self):
        FakeGraph.capture_end(self)
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(torch.cuda, "CUDAGraph", type("FailingGraph", (FakeGraph,), {"capture_end": failing_end}))
    ref = _hf_generate_ids(model, images, masks, 9)
    with caplog.at_level("WARNING", logger="dualloop.model.kv_decoding"):
        out = model.caption(images, masks, max_new_tokens=9, cuda_graph=True)
    assert torch.equal(out.ids, ref.ids) and model.last_decoding == "static"
    assert recorded[-1].replays == 0 and recorded[-1]._eager_steps == 8
    assert "CUDA graph capture failed" in caplog.text


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_caption_cuda_graph_decoding_on_cuda(dtype, monkeypatch):
    """On a GPU, cuda_graph=True records a decoding step once and replays it: the ids equal the eager static
    steps' (same kernels), and in fp32 transformers' generate's."""
    from dualloop.model import kv_decoding

    torch.manual_seed(0)
    m = build_model(_cfg()).to("cuda", dtype).eval()
    images, masks = _batch(sizes=((64, 80), (96, 96), (70, 64), (50, 90)))
    masks[3].zero_()
    masks[3][0:4, 0:4] = 1
    made, allow_graph = [], [True]

    class Recorded(kv_decoding.StaticSteps):
        def __init__(self, *args, graph=False, **kwargs):
            super().__init__(*args, graph=graph and allow_graph[0], **kwargs)
            made.append(self)
    monkeypatch.setattr(kv_decoding, "StaticSteps", Recorded)
    for seed in (None, 5):
        def gen(seed=seed):
            return torch.Generator().manual_seed(seed) if seed is not None else None
        kw = dict(max_new_tokens=10, do_sample=seed is not None, top_k=20, cuda_graph=True)
        allow_graph[0] = True
        graphed = m.caption(images, masks, generator=gen(), **kw)
        assert m.last_decoding == "graph" and made[-1].replays >= 4
        allow_graph[0] = False  # the same static steps without a graph
        eager = m.caption(images, masks, generator=gen(), **kw)
        assert m.last_decoding == "static" and made[-1].replays == 0
        assert torch.equal(graphed.ids, eager.ids) and graphed.texts == eager.texts
        if dtype == torch.float32:
            ref = _hf_generate_ids(m, images, masks, 10, seed, top_k=20)
            assert torch.equal(graphed.ids, ref.ids) and graphed.texts == ref.texts


def test_caption_sampling_reproducible(model):
    images, masks = _batch()
    a = model.caption(images, masks, max_new_tokens=5, do_sample=True, top_k=10,
                      generator=torch.Generator().manual_seed(3))
    b = model.caption(images, masks, max_new_tokens=5, do_sample=True, top_k=10,
                      generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.ids, b.ids) and a.texts == b.texts


def test_caption_never_emits_special_tokens(model):
    images, masks = _batch()
    g = torch.Generator().manual_seed(0)
    # hot sampling from random weights reaches every id the head allows
    out = model.caption(images, masks, max_new_tokens=16, do_sample=True, temperature=20.0, generator=g)
    banned = set(model.tokenizer.all_special_ids) - {model.eos_token_id}
    banned |= {model.seg_token_id, model.vp_start_id, model.vp_end_id, model.pad_token_id}
    for i in range(len(images)):
        row = set(out.ids[i, : int(out.lengths[i])].tolist())
        assert not row & banned, f"special ids generated: {row & banned}"
        assert max(row, default=0) < len(model.tokenizer)
        assert "[SEG]" not in out.texts[i] and "<vp>" not in out.texts[i]


def test_ground_shapes_and_gradients():
    torch.manual_seed(0)
    m = build_model(_cfg())
    images, _ = _batch()
    ids, lengths = m.encode_captions(["the red circle", "blue square on the left", "a"])
    out = m.ground(images, caption_ids=ids, caption_lengths=lengths)
    assert isinstance(out, GroundOutput)
    assert out.logits.shape == (3, 32, 32) and out.iou_pred.shape == (3,)
    all_out = m.ground(images, caption_ids=ids, caption_lengths=lengths, multimask="all")
    assert all_out.logits.shape == (3, 3, 32, 32) and all_out.iou_pred.shape == (3, 3)
    best = all_out.iou_pred.argmax(-1)
    assert torch.allclose(out.logits, all_out.logits[torch.arange(3), best], atol=1e-5)
    target = torch.zeros(3, 32, 32)
    target[:, 8:20, 8:20] = 1
    loss = torch.nn.functional.binary_cross_entropy_with_logits(out.logits, target)
    loss = loss + m.caption_loss(images, _batch()[1], ["the red circle", "a", "green"]).mean()
    loss.backward()
    reached = {c: False for c in COMPONENTS}
    for name, p in m.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, f"frozen {name} got a gradient"
        elif p.grad is not None and p.grad.abs().sum() > 0:
            reached[component_of(name)] = True
    trainable = {g["name"] for g in m.parameter_groups() if g["trainable"]}
    assert {c for c, r in reached.items() if r} == trainable


def test_ground_depends_on_caption(model):
    """The [SEG] prompt carries the caption: two captions of one image give clearly different masks even at init
    (the tiny preset's init is chosen so; a near-constant prompt makes the decoder learn to ignore it)."""
    images, _ = _batch()
    ids, lengths = model.encode_captions(["the red circle on the left", "the blue square at the bottom"])
    with torch.no_grad():
        g = model.ground([images[0], images[0]], caption_ids=ids, caption_lengths=lengths, multimask="all")
    assert (g.logits[0] - g.logits[1]).abs().mean() > 0.02 * g.logits.abs().mean()


def test_activation_checkpointing_same_gradients():
    """Non-reentrant checkpointing of the LLM layers (as the trainer enables it) changes no gradient."""
    torch.manual_seed(0)
    m = build_model(_cfg())
    m.train()
    images, masks = _batch()
    ids, lengths = m.encode_captions(["the red circle", "blue square on the left", "a"])

    def grads():
        m.zero_grad()
        out = m.ground(images, caption_ids=ids, caption_lengths=lengths)
        (out.logits.sigmoid().mean() + m.caption_loss(images, masks, ["a", "b", "c"]).mean()).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    plain = grads()
    lm = m.language_model
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.2x name
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert lm.gradient_checkpointing
    ckpt = grads()
    assert plain.keys() == ckpt.keys()
    for n in plain:
        assert torch.allclose(plain[n], ckpt[n], atol=1e-6, rtol=1e-4), n


def test_single_pixel_and_empty_masks(model):
    grid = model.grid
    m = torch.zeros(90, 70, dtype=torch.uint8)
    m[44, 33] = 1  # hits no nearest-sampled pixel
    cells = region_cells(m, grid)
    assert cells.tolist() == [(44 * grid // 90) * grid + 33 * grid // 70]
    assert region_cells(torch.zeros(10, 10, dtype=torch.uint8), grid).numel() == 1
    full = region_cells(torch.ones(10, 10, dtype=torch.uint8), grid)
    assert full.tolist() == list(range(grid * grid))
    block = torch.zeros(64, 64, dtype=torch.uint8)
    block[:32, 32:] = 1  # top-right quadrant
    rows, cols = region_cells(block, grid) // grid, region_cells(block, grid) % grid
    assert (rows < grid // 2).all() and (cols >= grid // 2).all() and rows.numel() == (grid // 2) ** 2
    images, _ = _batch(sizes=((90, 70),))
    out = model.caption(images, [m], max_new_tokens=3)
    assert out.ids.shape[0] == 1 and out.lengths[0] <= 3


def test_region_grid_matches_vision_token_layout(model):
    """Pixel shuffle keeps the tokens row-major: cell (i, j) pools patches rows 2i..2i+1, cols 2j..2j+1."""
    side = 2 * model.grid
    r = torch.arange(side).view(side, 1, 1).expand(side, side, 1).float()
    c = torch.arange(side).view(1, side, 1).expand(side, side, 1).float()
    x = torch.cat([r, c], -1)[None]
    y = model.vlm.model.pixel_shuffle(x, scale_factor=0.5).reshape(1, -1, 8)[0]
    for cell in (0, 1, model.grid, model.grid * model.grid - 1):
        i, j = divmod(cell, model.grid)
        rows, cols = set(y[cell, 0::2].tolist()), set(y[cell, 1::2].tolist())
        assert rows == {2 * i, 2 * i + 1} and cols == {2 * j, 2 * j + 1}


def test_inputs_embeds_path_equals_ids_path(model):
    images, _ = _batch()
    ids, lengths = model.encode_captions(["the red circle", "blue square on the left", "a"])
    vocab = model.vlm.config.text_config.vocab_size
    onehot = torch.nn.functional.one_hot(ids, vocab).float()
    table = model.embed_tokens(torch.arange(vocab))
    soft = onehot @ table
    with torch.no_grad():
        a = model.ground(images, caption_ids=ids, caption_lengths=lengths)
        b = model.ground(images, caption_embeds=soft, caption_lengths=lengths)
    assert torch.allclose(a.logits, b.logits, atol=1e-4), (a.logits - b.logits).abs().max()
    assert torch.allclose(a.iou_pred, b.iou_pred, atol=1e-5)
    # new-token rows take part in the embedding table
    assert torch.equal(table[model.seg_token_id], model.vlm.model.language_model.embed_tokens.rows.embed[0])


def test_caption_loss_trains():
    """Memorize two captions (one empty: EOS first); greedy captioning then returns them exactly."""
    torch.manual_seed(0)
    m = build_model(_cfg(llm_base=True))
    m.train()
    images, masks = _batch(sizes=((64, 64), (64, 64)))
    captions = ["the red circle on the left", ""]  # the empty one: EOS first
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for _ in range(40):
        loss = m.caption_loss(images, masks, captions).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first
    out = m.caption(images, masks, max_new_tokens=10)  # generation runs in eval mode, then restores train mode
    assert m.training and m.vlm.training
    assert out.texts == captions and out.lengths.tolist() == [6, 0] and out.ids.shape == (2, 6)
    assert (out.ids[1] == m.pad_token_id).all()


@pytest.mark.parametrize("what", ["empty", "size", "dtype", "shape", "masks_len", "values", "values_2", "embeds_no_len",
                                  "both", "multimask", "caption_batch"])
def test_bad_input_raises(model, what):
    images, masks = _batch()
    ids, lengths = model.encode_captions(["a", "b", "c"])
    with pytest.raises(ValueError) as e:
        if what == "empty":
            model.caption([], [])
        elif what == "size":
            model.caption(images, [masks[0], masks[0], masks[2]])
        elif what == "dtype":
            model.ground([images[0].float()] + images[1:], caption_ids=ids, caption_lengths=lengths)
        elif what == "shape":
            model.caption([images[0][0]] + images[1:], masks)
        elif what == "masks_len":
            model.caption(images, masks[:2])
        elif what == "values":
            model.caption(images, [masks[0] * 2] + masks[1:])
        elif what == "values_2":  # the one bad mask among good ones is named
            model.caption(images, [masks[0], masks[1] * 3, masks[2]])
        elif what == "embeds_no_len":
            model.ground(images, caption_embeds=torch.zeros(3, 2, model.hidden_size))
        elif what == "both":
            model.ground(images, caption_ids=ids, caption_embeds=torch.zeros(3, 1, model.hidden_size),
                         caption_lengths=lengths)
        elif what == "multimask":
            model.ground(images, caption_ids=ids, caption_lengths=lengths, multimask="some")
        elif what == "caption_batch":
            model.caption_logits(images, masks, ids[:2], lengths[:2])
    msg = str(e.value)
    if what == "values_2":
        assert "masks[1]" in msg and "found 3" in msg
    assert msg and ("images" in msg or "masks" in msg or "caption" in msg or "multimask" in msg)


def test_trainable_switches_and_no_lora():
    cfg = ModelConfig(preset="tiny", lora=LoraConfig(enabled=False),
                      train=TrainablePartsConfig(vision_encoder=True, mask_decoder=False, llm_base=True))
    m = build_model(cfg)
    groups = {g["name"]: g for g in m.parameter_groups()}
    assert groups["llm_lora"]["params"] == 0
    assert groups["vision_encoder"]["trainable"] and groups["llm_base"]["trainable"]
    assert not groups["mask_decoder"]["trainable"]


def test_unknown_preset_rejected():
    with pytest.raises(ValueError, match="preset"):
        build_model(ModelConfig(preset="huge"))


def test_repeated_images_run_the_encoders_once(model):
    """Reinforce grounds each image K times in a row (the same tensor): the VLM tower and SAM2's image encoder run
    once per distinct image, with the outputs, and gradients, of running them on every copy."""
    images, _ = _batch()
    ids, lengths = model.encode_captions(["a red circle", "the blue square", "a green star", "a red circle",
                                          "left", "right"])
    repeated = [images[0], images[0], images[1], images[1], images[2], images[2]]  # the same objects
    copies = [img.clone() for img in repeated]  # equal values, distinct tensors
    calls = {"tower": [], "sam2": []}
    hooks = [model.vlm.model.vision_tower.register_forward_hook(
                 lambda m, a, kw, o: calls["tower"].append(kw["pixel_values"].shape[0]), with_kwargs=True),
             model.sam2.vision_encoder.register_forward_hook(lambda m, a, o: calls["sam2"].append(a[0].shape[0]))]
    try:
        outs = []
        for imgs in (repeated, copies):
            model.zero_grad(set_to_none=True)
            out = model.ground(imgs, caption_ids=ids, caption_lengths=lengths)
            out.logits.float().square().mean().backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            outs.append((out.logits.detach(), grads))
    finally:
        for h in hooks:
            h.remove()
    assert calls == {"tower": [3, 6], "sam2": [3, 6]}
    torch.testing.assert_close(outs[0][0], outs[1][0])
    assert outs[0][1].keys() == outs[1][1].keys() and outs[0][1]
    for n in outs[0][1]:
        torch.testing.assert_close(outs[0][1][n], outs[1][1][n], rtol=1e-4, atol=1e-7, msg=n)
