"""`eval.answer=generated`: the model generates its reply to the grounding prompt and is segmented from the reply's
[SEG] (Sa2VA's RefCOCO evaluation: predict_forward generates, the mask comes from each generated [SEG]'s hidden
state, a reply without [SEG] is an empty prediction), instead of the given answer "It is [SEG]." (the default).

The tiny model's replies are scripted: during `ground_reply` the LM head's scores are replaced so that greedy
decoding (the real decoding loop, with whatever logits processors it applies) picks the scripted tokens."""
import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dualloop.config import LoraConfig, ModelConfig, load_config
from dualloop.eval import evaluate as ev
from dualloop.eval.metrics import NO_OBJECT_LOGIT, predict_mask
from dualloop.model import build_model
from dualloop.model.build import save_pretrained
from dualloop.model.composite import EMPTY_MASK_LOGIT, DualLoopModel


def with_seg(p):  # "it is [SEG] ." (the tiny word-level tokenizer's "It is [SEG].")
    return p.answer + [p.seg] + p.period


def without_seg(p):  # "it is."
    return p.answer + p.period


REAL_GROUND_REPLY = DualLoopModel.ground_reply


def script_replies(monkeypatch, *scripts):
    """Every ground_reply call (on any DualLoopModel) generates row i's reply as scripts[i % len(scripts)], then the
    end-of-turn token (a later call replaces an earlier script)."""
    real = REAL_GROUND_REPLY

    def ground_reply(self, images, **kw):
        p = self.prompts
        rows = [scripts[i % len(scripts)](p) + [p.end_of_turn] for i in range(len(images))]
        step = [0]

        def force(module, args, out):
            if out.dim() != 2:  # a decoding step scores [B, V]
                return None
            t = step[0]
            step[0] += 1
            forced = torch.full_like(out, -100.0)
            for i, row in enumerate(rows):
                forced[i, row[min(t, len(row) - 1)]] = 100.0
            return forced

        handle = self.vlm.lm_head.register_forward_hook(force)
        try:
            return real(self, images, **kw)
        finally:
            handle.remove()

    monkeypatch.setattr(DualLoopModel, "ground_reply", ground_reply)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model(ModelConfig(preset="tiny", lora=LoraConfig(enabled=False))).eval()


@pytest.fixture(scope="module")
def inputs(tiny):
    g = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in ((40, 50), (64, 64),
                                                                                             (30, 70))]
    ids, lengths = tiny.encode_captions(["the red car", "a dog", "the circle on the left of the square"])
    return images, ids, lengths


def _replies(model, images, ids, lengths):
    reply = model.ground_reply(images, caption_ids=ids, caption_lengths=lengths)
    return reply, {"reply_ids": reply.ids, "reply_lengths": reply.lengths}


@torch.no_grad()
def test_a_generated_it_is_seg_grounds_exactly_as_the_given_answer(tiny, inputs, monkeypatch):
    images, ids, lengths = inputs
    script_replies(monkeypatch, with_seg)
    reply, given_reply = _replies(tiny, images, ids, lengths)
    # [SEG] is generated: the reply is not decoded with caption()'s suppression of special tokens
    assert reply.texts == ["it is [SEG]."] * 3 and reply.lengths.tolist() == [4, 4, 4]
    for multimask in ("best", "all"):
        given = tiny.ground(images, caption_ids=ids, caption_lengths=lengths, multimask=multimask)
        generated = tiny.ground(images, caption_ids=ids, caption_lengths=lengths, multimask=multimask, **given_reply)
        assert given.seg_count is None and generated.seg_count.tolist() == [1, 1, 1]
        # the hidden state at the reply's [SEG] (as its input token) is the given answer's: the same logits
        assert torch.equal(generated.logits, given.logits)
        assert torch.equal(generated.iou_pred, given.iou_pred)
        assert torch.equal(generated.object_score, given.object_score)


@torch.no_grad()
def test_a_reply_without_seg_is_an_empty_prediction(tiny, inputs, monkeypatch):
    images, ids, lengths = inputs
    script_replies(monkeypatch, with_seg, without_seg)  # rows 0 and 2 say [SEG], row 1 does not
    reply, given_reply = _replies(tiny, images, ids, lengths)
    assert reply.texts == ["it is [SEG].", "it is.", "it is [SEG]."]
    out = tiny.ground(images, caption_ids=ids, caption_lengths=lengths, **given_reply)
    given = tiny.ground(images, caption_ids=ids, caption_lengths=lengths)
    assert out.seg_count.tolist() == [1, 0, 1]
    assert EMPTY_MASK_LOGIT == NO_OBJECT_LOGIT and bool((out.logits[1] == EMPTY_MASK_LOGIT).all())
    assert out.object_score[1] == EMPTY_MASK_LOGIT
    assert not predict_mask(out.logits[1], (40, 50)).any() and predict_mask(given.logits[1], (40, 50)).any()
    # the others are segmented from their own [SEG] (row 1's shorter reply pads the batch differently)
    torch.testing.assert_close(out.logits[[0, 2]], given.logits[[0, 2]], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_several_seg_unite_their_masks_and_no_seg_needs_no_mask(tiny, inputs):
    images, ids, lengths = inputs
    p = tiny.prompts
    # row 0: "[SEG] it is [SEG]"; row 1: "it is"; row 2: "[SEG]"
    replies = torch.tensor([[p.seg] + p.answer + [p.seg], p.answer + [p.pad, p.pad], [p.seg, p.pad, p.pad, p.pad]])
    out = tiny.ground(images, caption_ids=ids, caption_lengths=lengths, reply_ids=replies,
                      reply_lengths=torch.tensor([4, 2, 1]))
    assert out.seg_count.tolist() == [2, 0, 1] and out.logits.shape[0] == 3
    one = tiny.ground(images[:1], caption_ids=ids[:1], caption_lengths=lengths[:1], reply_ids=replies[:1, :1],
                      reply_lengths=torch.tensor([1]))
    assert bool((out.logits[0] >= one.logits[0] - 1e-4).all())  # the union holds the first [SEG]'s mask
    assert bool((out.logits[1] == EMPTY_MASK_LOGIT).all())


def _seg_both_ends(p):  # "[SEG] it is [SEG]" then the end of turn
    return [p.seg] + p.answer + [p.seg]


def _seg_at_the_cap(p):  # five tokens, the fifth [SEG]: a reply cut by max_new_tokens=5 ends on it
    return p.answer + p.period + p.answer[:1] + [p.seg]


@torch.no_grad()
@pytest.mark.parametrize("cuda_graph", [False, True])  # the dynamic and the static KV cache (CPU: no graph)
def test_segment_replies_segments_from_the_states_decoding_computed(tiny, inputs, monkeypatch, cuda_graph):
    """segment_replies reads each generated [SEG]'s hidden state from the decoding (Sa2VA reads generate's hidden
    states) and gives what teacher-forcing prompt + reply gives: several [SEG]s, none, and a [SEG] that is the last
    token allowed (its state takes one more decoding step)."""
    images, ids, lengths = inputs
    script_replies(monkeypatch, _seg_both_ends, without_seg, _seg_at_the_cap)
    reply = tiny.ground_reply(images, caption_ids=ids, caption_lengths=lengths, max_new_tokens=5,
                              cuda_graph=cuda_graph)
    assert reply.texts == ["[SEG] it is [SEG]", "it is.", "it is. it [SEG]"]
    assert reply.seg_count.tolist() == [2, 0, 1] and reply.seg_hidden.shape == (3, tiny.hidden_size)
    for multimask in ("best", "all"):
        decoded = tiny.segment_replies(images, reply, multimask=multimask)
        forced = tiny.ground(images, caption_ids=ids, caption_lengths=lengths, multimask=multimask,
                             reply_ids=reply.ids, reply_lengths=reply.lengths)
        assert decoded.seg_count.tolist() == forced.seg_count.tolist() == [2, 0, 1]
        torch.testing.assert_close(decoded.logits, forced.logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(decoded.iou_pred, forced.iou_pred, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(decoded.object_score, forced.object_score, atol=1e-4, rtol=1e-4)
        assert bool((decoded.logits[1] == EMPTY_MASK_LOGIT).all())


@torch.no_grad()
def test_segment_replies_does_not_run_the_llm_again(tiny, inputs, monkeypatch):
    images, ids, lengths = inputs
    script_replies(monkeypatch, with_seg)
    reply = tiny.ground_reply(images, caption_ids=ids, caption_lengths=lengths)
    calls = []
    handle = tiny.language_model.register_forward_hook(lambda *a: calls.append(1))
    try:
        out = tiny.segment_replies(images, reply)
    finally:
        handle.remove()
    assert calls == [] and out.seg_count.tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="ground_reply's output for these 2 images"):
        tiny.segment_replies(images[:2], reply)

def _eval_datasets(corpus):
    return ev.open_eval_datasets(corpus["eval_datasets"], None)


def test_evaluate_counts_the_replies_without_seg(tiny, corpus, monkeypatch):
    datasets = _eval_datasets(corpus)
    script_replies(monkeypatch, without_seg)
    res = ev.evaluate_model(tiny, datasets, samples=2, batch_size=2, max_new_tokens=3, answer="generated")
    assert res["answer"] == "generated"
    for metric in ("cycle", "grounding"):
        s = res[metric]
        assert s["samples"] > 0 and s["no_seg"] == s["samples"]  # every reply: no [SEG]
        assert s["ciou"] == 0.0  # empty predictions of non-empty targets
        for scores in s["per_dataset"].values():
            assert scores["no_seg"] == scores["samples"]
    # with [SEG] in every reply none is counted, and the figures are the given answer's
    script_replies(monkeypatch, with_seg)
    res = ev.evaluate_model(tiny, datasets, samples=2, batch_size=2, max_new_tokens=3, answer="generated")
    given = ev.evaluate_model(tiny, datasets, samples=2, batch_size=2, max_new_tokens=3)
    for metric in ("cycle", "grounding"):
        assert res[metric].pop("no_seg") == 0
        for scores in res[metric]["per_dataset"].values():
            assert scores.pop("no_seg") == 0
        assert res[metric] == given[metric]


def test_evaluate_counts_only_the_scored_samples_of_a_lockstep_rank(tiny, monkeypatch):
    """A lockstep rank short of samples re-runs one unscored: its reply is not counted either."""
    from dualloop.data.base import make_item

    # no process group here: the gathers return this rank's own counts
    script_replies(monkeypatch, without_seg)
    rng = np.random.default_rng(0)
    mask = np.zeros((32, 32), np.uint8)
    mask[4:20, 6:24] = 1
    items = [make_item(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), mask, source="refcoco", key=f"r{k}",
                       captions=["a red circle"]) for k in range(3)]
    res = ev.evaluate_model(tiny, {"d": items}, samples=None, batch_size=4, max_new_tokens=2, rank=1, world_size=2,
                            lockstep=True, answer="generated")
    # rank 1 of 2 scores sample 1 and re-runs it as filler for the other rank's second
    assert res["cycle"]["samples"] == 1 and res["cycle"]["no_seg"] == 1
    assert res["grounding"]["samples"] == 1 and res["grounding"]["no_seg"] == 1


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory, corpus):
    d = tmp_path_factory.mktemp("generated")
    save_pretrained(tiny, d / "model")
    cfg = d / "config.yaml"
    cfg.write_text(yaml.safe_dump({"data": corpus, "eval": {"samples": 2, "batch_size": 2},
                                   "loop": {"caption": {"max_new_tokens": 3}}}))
    return d


def _eval_cli(saved, out, *overrides):
    return ev.main(["--checkpoint", str(saved / "model"), "--config", str(saved / "config.yaml"), "--device", "cpu",
                    "--json", str(out), *overrides])


def test_eval_cli_generated_records_the_answer_and_the_replies_without_seg(saved, tmp_path, monkeypatch, capsys):
    script_replies(monkeypatch, without_seg)
    assert _eval_cli(saved, tmp_path / "none.json", "eval.answer=generated") == 0
    printed = capsys.readouterr().out
    none = json.loads((tmp_path / "none.json").read_text())
    assert none["answer"] == "generated"
    for metric in ("cycle", "grounding"):
        assert none[metric]["samples"] > 0 and none[metric]["no_seg"] == none[metric]["samples"]
        assert set(none[metric]["per_dataset"]) and all(s["no_seg"] == s["samples"]
                                                        for s in none[metric]["per_dataset"].values())
    assert "no [SEG]" in printed and "eval.answer=generated" in printed

    script_replies(monkeypatch, with_seg)
    assert _eval_cli(saved, tmp_path / "seg.json", "eval.answer=generated") == 0
    assert _eval_cli(saved, tmp_path / "given.json") == 0
    seg = json.loads((tmp_path / "seg.json").read_text())
    given = json.loads((tmp_path / "given.json").read_text())
    assert given["answer"] == "given" and "no_seg" not in given["grounding"]
    for metric in ("cycle", "grounding"):
        assert seg[metric]["no_seg"] == 0
        for name, s in seg[metric]["per_dataset"].items():
            assert s["no_seg"] == 0 and {k: v for k, v in s.items() if k != "no_seg"} == \
                given[metric]["per_dataset"][name]


def test_eval_cli_rejects_an_unknown_answer(saved, tmp_path, capsys):
    assert _eval_cli(saved, tmp_path / "x.json", "eval.answer=sampled") == 2
    assert "eval.answer must be one of given, generated" in capsys.readouterr().err


def test_predict_generated_reports_each_reply(saved, tiny, tmp_path, monkeypatch, capsys):
    from dualloop.cli import main

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(tmp_path / "image.png")
    base = ["predict", "--checkpoint", str(saved / "model"), "--image", str(tmp_path / "image.png"), "--text",
            "a red circle", "--text", "the square", "--device", "cpu"]
    script_replies(monkeypatch, with_seg, without_seg)
    assert main([*base, "--out", str(tmp_path / "gen"), "eval.answer=generated"]) == 0
    assert main([*base, "--out", str(tmp_path / "given")]) == 0
    printed = capsys.readouterr().out
    gen = json.loads((tmp_path / "gen" / "prediction.json").read_text())
    given = json.loads((tmp_path / "given" / "prediction.json").read_text())
    assert gen["answer"] == "generated" and given["answer"] == "given"
    first, second = gen["predictions"]
    assert first["reply"] == "it is [SEG]." and first["seg_tokens"] == 1
    assert second["reply"] == "it is." and second["seg_tokens"] == 0
    assert second["pixels"] == 0 and second["object_score"] is None and "no [SEG]: empty mask" in printed
    assert not np.asarray(Image.open(tmp_path / "gen" / "text2.png")).any()
    assert all("reply" not in row for row in given["predictions"])
    assert first["pixels"] == given["predictions"][0]["pixels"]
    # predict takes eval.answer, not the other evaluation settings
    assert main([*base, "--out", str(tmp_path / "x"), "eval.samples=3"]) == 2


def test_the_default_is_the_given_answer_unchanged(tiny, inputs, corpus, monkeypatch):
    assert load_config(None).eval.answer == "given"
    images, ids, lengths = inputs
    # the default grounding prompt ends with the given answer, and its [SEG] is where the mask comes from
    p = tiny.prompts
    batch = p.ground_prompts([ids[i, : int(lengths[i])].tolist() for i in range(3)], [tiny.num_image_tokens] * 3)
    assert batch.reply_seg_pos is None
    for row, seg in zip(batch.ids.tolist(), batch.seg_pos.tolist()):
        assert row[seg - len(p.answer):] == p.answer + [p.seg] + p.period
    with torch.no_grad():
        out = tiny.ground(images, caption_ids=ids, caption_lengths=lengths)
        hidden = tiny._run_llm(tiny._embed_prompt(batch, tiny.image_features(images), None, None),
                               batch.attention_mask, tiny._llm_inputs(batch.attention_mask, batch, images))
        by_hand = tiny._decode_masks(images, tiny.text_hidden_fcs(hidden[torch.arange(3), batch.seg_pos]), "best")
    assert torch.equal(out.logits, by_hand.logits) and out.seg_count is None
    # eval without eval.answer generates no reply
    monkeypatch.setattr(DualLoopModel, "ground_reply", lambda *a, **k: pytest.fail("a reply was generated"))
    res = ev.evaluate_model(tiny, _eval_datasets(corpus), samples=1, batch_size=2, max_new_tokens=2)
    assert res["answer"] == "given" and "no_seg" not in res["cycle"] and "no_seg" not in res["grounding"]



@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_replies_decode_the_same_on_the_static_cache(device):
    """The replies' decoding with `cuda_graph` (eval's loop.caption.cuda_graph: the static KV cache, replayed as a
    CUDA graph on a GPU) gives the ids of the dynamic-cache decoding, with the tiny model's own (unscripted) logits
    and tiled images of different tile counts (prompts of different lengths)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny", max_tiles=4, lora=LoraConfig(enabled=False)))
    model = model.to(device, torch.float32).eval()  # fp32: the graph's ids equal the dynamic cache's
    g = torch.Generator().manual_seed(2)
    size = model.vision_size
    images = [torch.randint(0, 256, (3, size, 2 * size), generator=g, dtype=torch.uint8),
              torch.randint(0, 256, (3, size // 2, size // 2), generator=g, dtype=torch.uint8)]
    ids, lengths = model.encode_captions(["the red car", "a dog on the left"])
    # [SEG] made likely where a state's first feature is positive: a pure tensor function of the LM head's input,
    # so a CUDA graph records it (a Python-side script would be frozen into the graph)
    seg_bias = torch.zeros(len(model.tokenizer), device=device)
    seg_bias[model.seg_token_id] = 50.0
    handle = model.vlm.lm_head.register_forward_hook(lambda m, args, out: out + seg_bias * (args[0][..., :1] > 0))
    try:
        with torch.no_grad():
            dynamic = model.ground_reply(images, caption_ids=ids, caption_lengths=lengths, max_new_tokens=8)
            assert model.last_decoding == "dynamic"
            static = model.ground_reply(images, caption_ids=ids, caption_lengths=lengths, max_new_tokens=8,
                                        cuda_graph=True)
    finally:
        handle.remove()
    assert model.last_decoding == ("graph" if device == "cuda" else "static")
    assert torch.equal(static.ids, dynamic.ids) and torch.equal(static.lengths, dynamic.lengths)
    # the [SEG] states segment_replies reads: copied out of the graph's output after each replay
    assert int(dynamic.seg_count.sum()) > 0 and torch.equal(static.seg_count, dynamic.seg_count)
    torch.testing.assert_close(static.seg_hidden, dynamic.seg_hidden, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("object_gate", [False, True])
def test_per_reply_unites_gates_and_empties(object_gate, dtype, device):
    """Rows of 3 replies: two [SEG]s, one, none (its stand-in row). The union is the pixelwise maximum (of the masks
    SAM2 says are present, with the gate), the object score the highest, the IoU prediction the first [SEG]'s."""
    from dualloop.model.replies import per_reply

    on = dict(dtype=dtype, device=device)  # SAM2's outputs: bf16 on the GPU under training precision
    logits = torch.tensor([[[4.0, -3.0]], [[-2.0, 5.0]], [[1.0, -1.0]], [[7.0, 7.0]]], **on)  # [R=4, 1, 2]
    iou = torch.tensor([0.9, 0.1, 0.5, 0.3], device=device)
    score = torch.tensor([2.0, -1.0, 0.5, 3.0], **on)  # the second [SEG] of reply 0: SAM2 says absent
    owner, counts = torch.tensor([0, 0, 1, 2]), torch.tensor([2, 1, 0])  # CPU, as _ground_replies makes them
    out, iou_out, score_out = per_reply(logits, iou, score, owner, counts, object_gate)
    assert out.dtype == dtype and out.device.type == device
    second = -3.0 if object_gate else 5.0  # the absent mask gated out: its pixel stays the first mask's
    assert out.float().tolist() == [[[4.0, second]], [[1.0, -1.0]], [[EMPTY_MASK_LOGIT] * 2]]
    assert iou_out.tolist() == pytest.approx([0.9, 0.5, 0.0])  # nothing of the stand-in row kept
    assert score_out.float().tolist() == [2.0, 0.5, EMPTY_MASK_LOGIT]
    # one [SEG] each: the rows as they are
    same = per_reply(logits[:2], iou[:2], score[:2], torch.tensor([0, 1]), torch.tensor([1, 1]), object_gate)
    assert torch.equal(same[0], logits[:2]) and torch.equal(same[2], score[:2])
