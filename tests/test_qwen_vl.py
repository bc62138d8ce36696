"""The Qwen2.5-VL and Qwen3-VL families (vision_families.QwenVLImages, Qwen3VLImages) against transformers' own
models: image patches, tower tokens + merger(s), multimodal RoPE positions and the LLM's hidden states of whole
prompts (with Qwen3-VL's DeepStack features)."""
import inspect

import pytest
import torch

from dualloop.config import ModelConfig, TrainablePartsConfig
from dualloop.model import build_model
from dualloop.model.build import load_model, save_pretrained
from dualloop.model.trainable import component_of
from dualloop.model.vision_families import CLIP_MEAN, CLIP_STD, smart_resize

BUDGET = dict(min_pixels=56 * 56, max_pixels=112 * 112)  # 4 to 16 merged tokens per image (Qwen2.5-VL's 28 px)
PRESETS = ["tiny-qwen2_5_vl", "tiny-qwen3_vl"]


@pytest.fixture(scope="module", params=PRESETS)
def model(request):
    torch.manual_seed(0)
    return build_model(ModelConfig(preset=request.param, dtype="float32", **BUDGET)).eval()


def _images():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (3, 96, 160), dtype=torch.uint8, generator=g),
            torch.randint(0, 256, (3, 130, 70), dtype=torch.uint8, generator=g)]


def test_smart_resize_follows_qwen2_vl_rule():
    assert smart_resize(96, 160, 28, 56 * 56, 112 * 112) == (84, 140)  # over the budget: scaled down, floored
    assert smart_resize(20, 30, 28, 56 * 56, 112 * 112) == (56, 84)  # under: scaled up, ceiled
    assert smart_resize(448, 448, 28, 56 * 56, 1024 * 1024) == (448, 448)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 3000, 28, 56 * 56, 112 * 112)


def test_patches_in_the_processors_order(model):
    """Each row is one 14 x 14 patch (channels, then the frame repeated twice, then pixels), rows ordered by merge
    group (2 x 2 patches in a row) and the groups row-major: what Qwen2VLImageProcessor writes."""
    img = _images()[0]
    rows, (t, gh, gw) = model.vision._patches(img)
    h, w = model.vision.resized(img)
    p = 14 if model.vision.name == "qwen2_5_vl" else 16
    assert (t, gh, gw) == (1, h // p, w // p) and rows.shape == (gh * gw, 3 * 2 * p * p)
    x = torch.nn.functional.interpolate(img[None].float() / 255, size=(h, w), mode="bicubic", align_corners=False,
                                        antialias=True).clamp(0, 1)[0]
    mean, std = (CLIP_MEAN, CLIP_STD) if model.vision.name == "qwen2_5_vl" else ((0.5,) * 3, (0.5,) * 3)
    x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    k = 0
    for i in range(gh // 2):
        for j in range(gw // 2):
            for a in range(2):
                for b in range(2):
                    r, c = (2 * i + a) * p, (2 * j + b) * p
                    patch = x[:, r:r + p, c:c + p]
                    want = torch.stack([patch, patch], dim=1).flatten()  # [3, 2 frames, 14, 14]
                    torch.testing.assert_close(rows[k], want)
                    k += 1


def test_tower_tokens_and_merger_equal_transformers_image_features(model):
    imgs = _images()
    ours, deepstack = model._features(imgs, None)
    patches, grids = zip(*(model.vision._patches(img) for img in imgs))
    with torch.no_grad():
        out = model.vlm.model.get_image_features(torch.cat(patches), torch.tensor(grids))
    theirs = out.pooler_output if hasattr(out, "pooler_output") else out
    counts = model.vision.token_counts(imgs)
    assert [t.shape[0] for t in theirs] == counts
    for i, n in enumerate(counts):
        torch.testing.assert_close(ours[i, :n], theirs[i], rtol=1e-5, atol=1e-5)
    if model.vision.name == "qwen3_vl":  # and each DeepStack merger's features
        assert len(deepstack) == len(out.deepstack_features) == 1
        for layer, their_layer in zip(deepstack, out.deepstack_features):
            for i, n in enumerate(counts):
                torch.testing.assert_close(layer[i, :n], their_layer[i], rtol=1e-5, atol=1e-5)
    else:
        assert deepstack is None


def _rope_index(vlm_model, ids, image_token, grids, mask):
    params = inspect.signature(vlm_model.get_rope_index).parameters
    extra = {"mm_token_type_ids": (ids == image_token).int()} if "mm_token_type_ids" in params else {}
    return vlm_model.get_rope_index(ids, image_grid_thw=grids, attention_mask=mask, **extra)[0]


def test_positions_equal_transformers_rope_index(model):
    imgs = _images()
    ids, lengths = model.encode_captions(["a red circle", "the blue square on the left of the picture"])
    batch, _ = model._ground_prompt(imgs, ids, lengths, None, None)
    ours = model._llm_inputs(batch.attention_mask, batch, imgs)["position_ids"]
    grids = torch.tensor([[1, 2 * r, 2 * c] for r, c in model.vision.grids(imgs)])
    theirs = _rope_index(model.vlm.model, batch.ids, model.prompts.img_context, grids, batch.attention_mask)
    real = batch.attention_mask.bool()
    assert torch.equal(ours[:, real], theirs[:, real])


def test_prompt_hidden_states_equal_transformers_forward(model):
    """The LLM's last hidden state over whole grounding prompts (left-padded batch of two image sizes): ours
    (features scattered, our positions and mask) against transformers' Qwen2_5_VLModel forward on the ids."""
    imgs = _images()
    ids, lengths = model.encode_captions(["a red circle", "the blue square on the left of the picture"])
    with torch.no_grad():
        batch, embeds = model._ground_prompt(imgs, ids, lengths, None, None)
        ours = model._run_llm(embeds, batch.attention_mask, model._llm_inputs(batch.attention_mask, batch, imgs))
        patches, grids = zip(*(model.vision._patches(img) for img in imgs))
        kwargs = dict(input_ids=batch.ids, attention_mask=batch.attention_mask, pixel_values=torch.cat(patches),
                      image_grid_thw=torch.tensor(grids))
        if "mm_token_type_ids" in inspect.signature(model.vlm.model.forward).parameters:
            kwargs["mm_token_type_ids"] = (batch.ids == model.prompts.img_context).int()
        theirs = model.vlm.model(**kwargs).last_hidden_state
    real = batch.attention_mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], rtol=1e-4, atol=1e-4)


def test_caption_decoding_paths_and_vision_tokens_agree(model):
    imgs = _images()
    masks = [torch.zeros(96, 160, dtype=torch.uint8), torch.zeros(130, 70, dtype=torch.uint8)]
    masks[0][10:50, 20:80] = 1
    masks[1][60:, 30:] = 1
    dynamic = model.caption(imgs, masks, max_new_tokens=6)
    static = model.caption(imgs, masks, max_new_tokens=6, cuda_graph=True)
    assert model.last_decoding == "static"
    cached = model.caption(imgs, masks, max_new_tokens=6, vision_tokens=model.vision_tokens(imgs))
    assert torch.equal(dynamic.ids, static.ids) and torch.equal(dynamic.ids, cached.ids)
    # greedy decoding = the teacher-forced logits' argmax over the same prompt
    logits = model.caption_logits(imgs, masks, dynamic.ids, dynamic.lengths)
    scores, _ = model.caption_scores(logits)
    for i, n in enumerate(dynamic.lengths.tolist()):
        assert torch.equal(scores[i, :n].argmax(-1), dynamic.ids[i, :n])


def test_region_tokens_follow_the_merged_grid(model):
    f = model.vision.factor  # 28 px per merged cell (Qwen3-VL: 32)
    img = torch.zeros(3, 2 * f, 3 * f, dtype=torch.uint8)  # 2 x 3 merged cells, within the budget
    mask = torch.zeros(2 * f, 3 * f, dtype=torch.uint8)
    mask[f:, 2 * f:] = 1  # the cell in row 1, column 2
    assert model.vision.grids([img]) == [(2, 3)]
    assert model.vision.region(mask, img).tolist() == [1 * 3 + 2]


@pytest.mark.parametrize("preset", PRESETS)
def test_components_and_frozen_tower(preset):
    torch.manual_seed(0)
    train = TrainablePartsConfig(vision_encoder=False, projector=True)
    m = build_model(ModelConfig(preset=preset, train=train, **BUDGET))
    assert component_of("vlm.model.visual.merger.mlp.0.weight") == "projector"
    assert component_of("vlm.model.visual.deepstack_merger_list.0.linear_fc1.weight") == "projector"
    assert component_of("vlm.model.visual.blocks.0.attn.qkv.weight") == "vision_encoder"
    assert m.vision_frozen  # the merger(s) train, the tower before them does not
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert any(".visual.merger." in n for n in trainable)
    assert (preset == "tiny-qwen3_vl") == any(".visual.deepstack_merger_list." in n for n in trainable)
    assert not any(".visual.blocks." in n or ".visual.patch_embed." in n for n in trainable)


def test_save_and_load_round_trip(tmp_path, model):
    save_pretrained(model, tmp_path / "m")
    again = load_model(tmp_path / "m").eval()
    assert type(again.vlm) is type(model.vlm)
    assert again.model_cfg.max_pixels == BUDGET["max_pixels"]
    imgs = _images()
    ids, lengths = model.encode_captions(["a red circle", "the blue square"])
    with torch.no_grad():
        a = model.ground(imgs, caption_ids=ids, caption_lengths=lengths).logits
        b = again.ground(imgs, caption_ids=ids, caption_lengths=lengths).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize("preset", PRESETS)
def test_train_export_and_evaluate_a_qwen_model(tmp_path, preset):
    """The whole path with the Qwen2.5-VL family, as a user runs it (subprocesses): the dual loop under DeepSpeed
    ZeRO-3, its checkpoint exported (LoRA merged, vlm/ as a transformers Qwen2.5-VL directory), the export loaded
    as the `pretrained` preset and evaluated."""
    import json
    import os
    import subprocess
    import sys

    from dualloop.cli import main

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    qwen = [f"model.preset={preset}", f"model.min_pixels={BUDGET['min_pixels']}",
            f"model.max_pixels={BUDGET['max_pixels']}"]
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "dualloop.cli", "demo", "--steps", "2", "--out", str(run),
                           "eval.samples=2", "eval.batch_size=2", *qwen], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert torch.isfinite(torch.tensor(summary["loss_last"]))
    proc = subprocess.run([sys.executable, "-m", "dualloop.cli", "export", "--checkpoint", str(run / "checkpoints"),
                           "--out", str(tmp_path / "export")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    vlm_config = json.loads((tmp_path / "export" / "vlm" / "config.json").read_text())
    assert vlm_config["model_type"] == preset.removeprefix("tiny-")
    info = json.loads((tmp_path / "export" / "export.json").read_text())
    assert "model.max_pixels=12544" in info["train_with"]
    report = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(tmp_path / "export"), "--config", str(run / "config.yaml"), "--json",
                 str(report), "--samples", "2", "--split", "val", "--device", "cpu"]) == 0
    result = json.loads(report.read_text())
    assert result["conventions"]["max_pixels"] == 12544
    assert 0.0 <= result["cycle"]["giou"] <= 1.0 and 0.0 <= result["grounding"]["giou"] <= 1.0


@pytest.mark.gpu
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qwen_cuda_graph_decoding_on_cuda(dtype, preset):
    """On a GPU the multimodal-RoPE positions ([3, B, 1], advanced in place) replay inside the CUDA graph: the
    graph's captions and reply [SEG] states equal the eager static steps'."""
    torch.manual_seed(0)
    m = build_model(ModelConfig(preset=preset, dtype="float32", **BUDGET)).to("cuda", dtype).eval()
    imgs = [torch.randint(0, 256, (3, 96, 160), dtype=torch.uint8), torch.randint(0, 256, (3, 130, 70),
                                                                                 dtype=torch.uint8)]
    masks = [torch.ones(96, 160, dtype=torch.uint8), torch.ones(130, 70, dtype=torch.uint8)]
    graphed = m.caption(imgs, masks, max_new_tokens=10, cuda_graph=True)
    assert m.last_decoding == "graph"
    dynamic = m.caption(imgs, masks, max_new_tokens=10)
    assert m.last_decoding == "dynamic"
    if dtype == torch.float32:
        assert torch.equal(graphed.ids, dynamic.ids)
    ids, lengths = m.encode_captions(["a red circle", "the blue square"])
    a = m.ground_reply(imgs, caption_ids=ids, caption_lengths=lengths, max_new_tokens=6, cuda_graph=True)
    b = m.ground_reply(imgs, caption_ids=ids, caption_lengths=lengths, max_new_tokens=6)
    assert torch.equal(a.ids, b.ids) or dtype == torch.bfloat16


def test_captions_hold_no_image_markers_and_tiling_is_refused(model):
    """A caption never holds an image or video marker of any family (the tiny presets' word-level tokenizer keeps
    InternVL's beside Qwen's as plain added tokens); `model.max_tiles` is InternVL's alone."""
    scores, allowed = model.caption_scores(torch.zeros(1, len(model.tokenizer)))
    vocab = model.tokenizer.get_vocab()
    for token in ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>", "<img>", "<IMG_CONTEXT>",
                  "</img>"):
        assert scores[0, vocab[token]] == float("-inf"), token
    assert allowed == int(torch.isfinite(scores).sum())
    with pytest.raises(ValueError, match="model.max_tiles=12: tiling is InternVL's"):
        model.use_conventions(max_tiles=12)
    assert model.max_tiles == 1  # the conventions before stay
