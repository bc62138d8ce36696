"""Save/load round trip, the `pretrained` preset from local dirs, ZeRO-3 (subprocess), and `dualloop inspect`."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dualloop.config import LoraConfig, ModelConfig, TrainablePartsConfig
from dualloop.model import build_model, load_model
from dualloop.model.presets import random_preset
from dualloop.model.tokenizer import build_word_tokenizer

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.randint(0, 256, (3, 64, 72), generator=g, dtype=torch.uint8) for _ in range(2)]
    masks = [torch.zeros(64, 72, dtype=torch.uint8) for _ in range(2)]
    masks[0][5:30, 10:50] = 1
    masks[1][40, 60] = 1
    return images, masks


def _outputs(model, images, masks):
    ids, lengths = model.encode_captions(["the red circle", "a small blue square on the left"])
    with torch.no_grad():
        g = model.ground(images, caption_ids=ids, caption_lengths=lengths, multimask="all")
        lg = model.caption_logits(images, masks, ids, lengths)
    return model.caption(images, masks, max_new_tokens=6), g, lg


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny", lora=LoraConfig(r=4, alpha=8, dropout=0.0)))
    with torch.no_grad():  # make LoRA and the new rows non-trivial so that losing them would show
        for name, p in model.named_parameters():
            if "lora_B" in name or ".rows." in name:
                p.normal_(0, 0.05)
    model.eval()
    images, masks = _inputs()
    cap_a, g_a, lg_a = _outputs(model, images, masks)
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "dualloop_model.json").is_file()
    loaded = load_model(tmp_path / "m").eval()
    cap_b, g_b, lg_b = _outputs(loaded, images, masks)
    assert torch.equal(cap_a.ids, cap_b.ids) and cap_a.texts == cap_b.texts
    assert torch.equal(g_a.logits, g_b.logits) and torch.equal(g_a.iou_pred, g_b.iou_pred)
    assert torch.equal(lg_a, lg_b)
    assert loaded.seg_token_id == model.seg_token_id
    sd_a, sd_b = model.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    # trainable switches can be overridden at load time
    frozen = load_model(tmp_path / "m", train=TrainablePartsConfig(mask_decoder=False))
    assert not any(p.requires_grad for p in frozen.sam2.mask_decoder.parameters())


@pytest.mark.parametrize("tied", [True, False])
def test_save_pretrained_in_the_transformers_layout(tmp_path, tied):
    """hf_layout (what `dualloop export` writes): the weights once, in vlm/ + sam2/ + seg_projection.safetensors,
    which transformers loads as they are (the new-token rows written into the embedding / LM head) and load_model
    rebuilds the model from without the original directories: the same outputs and every weight the forward reads;
    only the base rows that the new rows replace are not kept. The saved model is left as it was."""
    import shutil

    from transformers import InternVLForConditionalGeneration, Sam2Model

    from dualloop.model.build import save_pretrained

    vlm_dir, sam2_dir = _write_checkpoints(tmp_path / "orig", tied=tied)
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="pretrained", vlm_path=str(vlm_dir), sam2_path=str(sam2_dir),
                                    lora=LoraConfig(enabled=False)))
    rows = model.language_model.embed_tokens.rows
    assert (rows.head is None) is tied
    with torch.no_grad():  # trained-looking rows and projection, so that losing them would show
        for name, p in model.named_parameters():
            if ".rows." in name or name.startswith("text_hidden_fcs."):
                p.normal_(0, 0.05)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, masks = _inputs()
    cap_a, g_a, lg_a = _outputs(model, images, masks)
    save_pretrained(model, tmp_path / "m", hf_layout=True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["dualloop_model.json", "sam2",
                                                                  "seg_projection.safetensors", "vlm"]
    vlm, info = InternVLForConditionalGeneration.from_pretrained(tmp_path / "m" / "vlm", output_loading_info=True)
    assert not any(info.values()), info
    assert torch.equal(vlm.get_input_embeddings().weight[rows.token_ids], rows.embed)
    assert torch.equal(vlm.lm_head.weight[rows.token_ids], rows.embed if tied else rows.head)
    sam2 = Sam2Model.from_pretrained(tmp_path / "m" / "sam2")
    assert all(torch.equal(v, model.sam2.state_dict()[k]) for k, v in sam2.state_dict().items())

    shutil.rmtree(tmp_path / "orig")
    loaded = load_model(tmp_path / "m")
    assert loaded.training and loaded.dtype == torch.float32
    cap_b, g_b, lg_b = _outputs(loaded.eval(), images, masks)
    assert torch.equal(cap_a.ids, cap_b.ids) and torch.equal(g_a.logits, g_b.logits) and torch.equal(lg_a, lg_b)
    got = loaded.state_dict()
    assert got.keys() == before.keys()
    live = torch.ones(len(rows.slot_of_id), dtype=torch.bool)
    live[rows.token_ids] = False
    for name, value in before.items():
        if name.endswith(("embed_tokens.base.weight", "lm_head.base.weight")):
            got[name], value = got[name][live], value[live]
        assert torch.equal(got[name], value), name
    (tmp_path / "m" / "sam2").rename(tmp_path / "m" / "elsewhere")
    with pytest.raises(ValueError, match=r"dualloop_model.json keeps the weights in vlm, sam2, .*missing: .*m/sam2"):
        load_model(tmp_path / "m")


def test_the_transformers_layout_refuses_unmerged_lora(tmp_path):
    from dualloop.model.build import save_pretrained

    model = build_model(ModelConfig(preset="tiny", lora=LoraConfig(r=4, alpha=8)))
    with pytest.raises(ValueError, match="merge the LoRA adapters first"):
        save_pretrained(model, tmp_path / "m", hf_layout=True)
    assert not (tmp_path / "m").exists()


def test_load_model_errors(tmp_path):
    with pytest.raises(ValueError, match="not a dualloop model directory"):
        load_model(tmp_path)


def _write_checkpoints(root: Path, tied: bool = True) -> tuple[Path, Path]:
    """Tiny transformers checkpoints as `save_pretrained` writes them (tokenizer without the new tokens)."""
    from transformers import InternVLForConditionalGeneration, Sam2Model

    vlm_config, sam2_config, _ = random_preset("tiny")
    tokenizer = build_word_tokenizer(add_new=False)
    vlm_config.text_config.vocab_size = len(tokenizer)
    vlm_config.tie_word_embeddings = vlm_config.text_config.tie_word_embeddings = tied
    torch.manual_seed(0)
    vlm_dir, sam2_dir = root / "internvl", root / "sam2"
    InternVLForConditionalGeneration(vlm_config).save_pretrained(vlm_dir)
    tokenizer.save_pretrained(vlm_dir)
    Sam2Model(sam2_config).save_pretrained(sam2_dir)
    return vlm_dir, sam2_dir


def test_pretrained_preset_keeps_the_rows_of_special_tokens_the_checkpoint_has(tmp_path):
    """A checkpoint whose tokenizer already holds [SEG] (Sa2VA-style, or an export): its trained row is kept, not
    replaced by the mean embedding; tokens it lacks still start at the mean."""
    from transformers import AutoTokenizer, InternVLForConditionalGeneration

    from dualloop.model.tokenizer import SEG_TOKEN

    vlm_dir, sam2_dir = _write_checkpoints(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(vlm_dir)
    tokenizer.add_tokens([SEG_TOKEN], special_tokens=True)
    vlm = InternVLForConditionalGeneration.from_pretrained(vlm_dir)
    vlm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    seg = tokenizer.convert_tokens_to_ids(SEG_TOKEN)
    trained = torch.randn(vlm.get_input_embeddings().weight.shape[1])
    with torch.no_grad():
        vlm.get_input_embeddings().weight[seg] = trained
    vlm.save_pretrained(vlm_dir)
    tokenizer.save_pretrained(vlm_dir)

    model = build_model(ModelConfig(preset="pretrained", vlm_path=str(vlm_dir), sam2_path=str(sam2_dir)))
    assert model.seg_token_id == seg
    assert torch.allclose(model.embed_tokens(torch.tensor([seg]))[0].float(), trained, atol=1e-6)
    base = model.vlm.model.language_model.embed_tokens.base.weight
    mean = base[[i for i in range(seg)]].float().mean(0)  # the ids after [SEG] are the two added now
    assert torch.allclose(model.embed_tokens(torch.tensor([model.vp_start_id]))[0].float(), mean, atol=1e-5)


def test_pretrained_preset_from_local_dirs(tmp_path):
    vlm_dir, sam2_dir = _write_checkpoints(tmp_path)
    from transformers import Sam2Model

    cfg = ModelConfig(preset="pretrained", vlm_path=str(vlm_dir), sam2_path=str(sam2_dir),
                      lora=LoraConfig(r=4, alpha=8, dropout=0.0))
    model = build_model(cfg).eval()
    vocab_before = len(build_word_tokenizer(add_new=False))
    assert model.vlm.config.text_config.vocab_size == vocab_before + 3  # resized for [SEG], <vp>, </vp>
    assert model.seg_token_id >= vocab_before
    # the new rows start at the mean of the checkpoint's rows
    base = model.vlm.model.language_model.embed_tokens.base.weight
    assert torch.allclose(model.embed_tokens(torch.tensor([model.seg_token_id]))[0], base[:vocab_before].mean(0),
                          atol=1e-6)
    ref = Sam2Model.from_pretrained(sam2_dir)
    assert torch.equal(ref.mask_decoder.iou_token.weight, model.sam2.mask_decoder.iou_token.weight)
    images, masks = _inputs()
    cap, g, _ = _outputs(model, images, masks)
    assert len(cap.texts) == 2 and g.logits.shape == (2, 3, 32, 32)
    # and a saved model of it reloads without the original directories
    model.save_pretrained(tmp_path / "saved")
    again = load_model(tmp_path / "saved").eval()
    assert torch.equal(_outputs(again, images, masks)[1].logits, g.logits)


@pytest.mark.parametrize("broken", ["missing_vlm", "missing_sam2", "swapped", "none"])
def test_pretrained_preset_bad_dirs(tmp_path, broken):
    vlm_dir, sam2_dir = _write_checkpoints(tmp_path)
    paths = {"missing_vlm": (tmp_path / "nope", sam2_dir), "missing_sam2": (vlm_dir, tmp_path / "gone"),
             "swapped": (sam2_dir, vlm_dir), "none": (None, sam2_dir)}[broken]
    cfg = ModelConfig(preset="pretrained", vlm_path=None if paths[0] is None else str(paths[0]),
                      sam2_path=str(paths[1]))
    with pytest.raises(ValueError) as e:
        build_model(cfg)
    msg = str(e.value)
    assert "vlm_path" in msg or "sam2_path" in msg
    if broken.startswith("missing"):
        assert ("nope" in msg) or ("gone" in msg)


def _env():
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.parametrize("precision,preset", [("fp32", "tiny"), ("bf16", "tiny"), ("fp32", "pretrained")])
def test_zero3_forward_backward(tmp_path, precision, preset):
    """Build partitioned under ZeRO-3, caption (synced_gpus), ground (ids and soft tokens), 2 optimizer steps, save,
    reload; every parameter stays partitioned (persistence threshold 0), so a weight read outside its module's
    forward would fail. Runs in a subprocess: DeepSpeed's process group and config are global."""
    port = str(29500 + (os.getpid() % 1000) + {"bf16": 7, "fp32": 0}[precision] + (13 if preset != "tiny" else 0))
    dirs = [str(d) for d in _write_checkpoints(tmp_path)] if preset == "pretrained" else []
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "zero3_model_worker.py"), str(tmp_path / "m"),
                           precision, *dirs], env=dict(_env(), MASTER_PORT=port), capture_output=True, text=True,
                          timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(lines[-1][len("RESULT "):])
    assert r["partitioned"] and r["empty_outside_forward"]
    assert r["loaded_ok"] is (True if preset == "pretrained" else None)
    assert r["logits_shape"] == [2, 32, 32] and all(0 <= n <= 4 for n in r["caption_lengths"])
    assert all(torch.isfinite(torch.tensor(r["losses"])))
    assert r["changed"] == ["sam2:mask_decoder", "text_hidden_fcs:seg_projection", "vlm:llm_lora",
                            "vlm:new_token_rows", "vlm:projector"]
    assert r["frozen_changed"] == []
    assert r["reloaded_params"] == r["params"]
    assert r["reload_max_diff"] < (1e-5 if precision == "fp32" else 0.05)
    assert r["dtype"] == ("torch.float32" if precision == "fp32" else "torch.bfloat16")


def test_inspect_cli_json(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model:\n  preset: tiny\n")
    out = tmp_path / "groups.json"
    from dualloop.cli import main

    assert main(["inspect", "--config", str(cfg), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    names = [g["name"] for g in data["groups"]]
    assert names == ["vision_encoder", "projector", "llm_base", "llm_lora", "new_token_rows", "seg_projection",
                     "sam2_image_encoder", "prompt_encoder", "mask_decoder"]
    by = {g["name"]: g for g in data["groups"]}
    assert by["llm_lora"]["trainable"] and not by["vision_encoder"]["trainable"]
    assert data["trainable"] == sum(g["params"] for g in data["groups"] if g["trainable"])
    assert data["frozen"] == sum(g["params"] for g in data["groups"] if not g["trainable"])
    # the 1B-shape preset is counted on the meta device: InternViT-300M + Qwen2.5-0.5B + SAM2-L encoder sizes
    assert main(["inspect", "--config", str(cfg), "--json", str(out), "model.preset=sa2va-1b-shape"]) == 0
    by = {g["name"]: g["params"] for g in json.loads(out.read_text())["groups"]}
    assert 300e6 < by["vision_encoder"] < 310e6 and 490e6 < by["llm_base"] < 500e6
    assert 200e6 < by["sam2_image_encoder"] < 230e6
    assert main(["inspect", "--config", str(cfg), "--json", str(out), "model.preset=small"]) == 0
    assert 50e6 < sum(g["params"] for g in json.loads(out.read_text())["groups"]) < 100e6
    # Sa2VA's tiling on the 1B shape: 12 tiles + the thumbnail of 256 tokens each
    assert main(["inspect", "--config", str(cfg), "--json", str(out), "model.preset=sa2va-1b-shape",
                 "model.max_tiles=12"]) == 0
    data = json.loads(out.read_text())
    assert (data["image_tokens_per_tile"], data["image_tokens_max"]) == (256, 3328)
    assert data["conventions"] == {"prompt_style": "dualloop", "max_tiles": 12, "sam2_resize": "bilinear",
                                   "object_gate": False, "min_pixels": 401408, "max_pixels": 1605632}
    assert data["vlm_family"] == "internvl"
    # Qwen2.5-VL: its token count follows the image's area, within the pixel budget (28 x 28 px per token)
    assert main(["inspect", "--config", str(cfg), "--json", str(out), "model.preset=tiny-qwen2_5_vl",
                 "model.min_pixels=3136", "model.max_pixels=12544"]) == 0
    data = json.loads(out.read_text())
    assert data["vlm_family"] == "qwen2_5_vl" and data["image_tokens_max"] == 16
    by = {g["name"]: g["params"] for g in data["groups"]}
    assert by["vision_encoder"] > 0 and by["projector"] > 0


def test_inspect_cli_bad_config(tmp_path, capsys):
    from dualloop.cli import main

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model:\n  presett: tiny\n")
    assert main(["inspect", "--config", str(cfg)]) == 2
    assert "preset" in capsys.readouterr().err
