"""`dualloop predict` on a saved tiny model: caption a given region and segment it back, segment texts; the files,
the JSON, and clear errors for unusable inputs."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dualloop.cli import main
from dualloop.config import LoraConfig, ModelConfig
from dualloop.eval.predict import predict
from dualloop.model import build_model
from dualloop.model.build import save_pretrained

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("predict")
    model = build_model(ModelConfig(preset="tiny", lora=LoraConfig(enabled=False))).eval()
    save_pretrained(model, d / "model")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
    Image.fromarray(image).save(d / "image.png")
    mask = np.zeros((60, 90), np.uint8)
    mask[10:40, 20:60] = 255
    Image.fromarray(mask).save(d / "mask.png")
    Image.fromarray(mask[:50]).save(d / "small_mask.png")
    Image.fromarray(np.zeros_like(mask)).save(d / "empty_mask.png")
    return {"dir": d, "model": model, "image": image, "mask": mask > 0}


def test_predict_captions_the_region_and_segments_the_caption_and_the_texts(saved, tmp_path, capsys):
    d = saved["dir"]
    out = tmp_path / "out"
    rc = main(["predict", "--checkpoint", str(d / "model"), "--image", str(d / "image.png"), "--mask",
               str(d / "mask.png"), "--text", "the red circle", "--text", "a blue square", "--out", str(out),
               "--device", "cpu", "--max-new-tokens", "4"])
    assert rc == 0, capsys.readouterr().err
    record = json.loads((out / "prediction.json").read_text())
    rows = {r["name"]: r for r in record["predictions"]}
    assert list(rows) == ["cycle", "text1", "text2"] and rows["text2"]["text"] == "a blue square"
    assert rows["cycle"]["text"] == record["caption"] and 0.0 <= rows["cycle"]["iou_with_mask"] <= 1.0
    for name, row in rows.items():
        png = np.asarray(Image.open(out / f"{name}.png"))
        assert png.shape == (60, 90) and set(np.unique(png)) <= {0, 255}
        assert int((png > 0).sum()) == row["pixels"] and isinstance(row["object_score"], float)
    assert np.asarray(Image.open(out / "overlay.png")).shape == (60, 90, 3)
    assert f"caption: {record['caption']}" in capsys.readouterr().out

    # the same as the model's own calls
    model, image = saved["model"], torch.from_numpy(saved["image"]).permute(2, 0, 1).contiguous()
    mask = torch.from_numpy(saved["mask"].astype(np.uint8))
    with torch.no_grad():
        cap = model.caption([image], [mask], max_new_tokens=4).texts[0]
        ids, lengths = model.encode_captions(["a blue square"])
        logits = model.ground([image], caption_ids=ids, caption_lengths=lengths).logits[0]
    assert cap == record["caption"]
    up = torch.nn.functional.interpolate(logits[None, None].float(), size=(60, 90), mode="bilinear")[0, 0]
    assert np.array_equal(np.asarray(Image.open(out / "text2.png")) > 0, (up > 0).numpy())


def test_predict_with_the_object_gate_empties_a_mask_sam2_calls_absent(saved):
    model = saved["model"]
    image = torch.from_numpy(saved["image"]).permute(2, 0, 1).contiguous()
    with torch.no_grad():
        head = model.sam2.mask_decoder.pred_obj_score_head
        layer = getattr(head, "proj_out", head)  # the MLP's last projection (a plain Linear without the MLP)
        kept = layer.bias.clone()
        layer.bias.fill_(-1e4)  # SAM2 now says "no object" for every prompt
        try:
            plain = predict(model, image, texts=["the red circle"])
            model.model_cfg.object_gate = True
            gated = predict(model, image, texts=["the red circle"])
        finally:
            model.model_cfg.object_gate = False
            layer.bias.copy_(kept)
    assert plain["rows"][0]["object_score"] < 0 and gated["rows"][0]["pixels"] == 0
    assert plain["rows"][0]["pixels"] > 0  # without the gate the logits decide alone


@pytest.mark.parametrize("args, message", [
    ([], "give --mask"),
    (["--mask", "small_mask.png"], "is 90x50 but --image"),
    (["--mask", "empty_mask.png"], "is empty"),
    (["--text", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["--text", "x", "train.steps=3"], "model conventions only"),
    (["--text", "x", "model.max_tiles=0"], "model.max_tiles must be >= 1"),
])
def test_predict_refuses_unusable_inputs_naming_them(saved, tmp_path, capsys, args, message):
    d = saved["dir"]
    args = [str(d / a) if a.endswith(".png") else a for a in args]
    rc = main(["predict", "--checkpoint", str(d / "model"), "--image", str(d / "image.png"), "--out",
               str(tmp_path / "o"), "--device", "cpu", *args])
    assert rc == 2 and message in capsys.readouterr().err


def test_predict_names_a_missing_image(saved, tmp_path, capsys):
    d = saved["dir"]
    rc = main(["predict", "--checkpoint", str(d / "model"), "--image", str(tmp_path / "nope.jpg"), "--text", "x",
               "--device", "cpu"])
    assert rc == 2 and "nope.jpg" in capsys.readouterr().err


def test_predict_takes_conventions_from_the_command_line(saved, tmp_path, monkeypatch):
    from dualloop.model.composite import DualLoopModel

    used = []
    real = DualLoopModel.use_conventions
    monkeypatch.setattr(DualLoopModel, "use_conventions", lambda self, **kw: used.append(kw) or real(self, **kw))
    d = saved["dir"]
    assert main(["predict", "--checkpoint", str(d / "model"), "--image", str(d / "image.png"), "--text", "x",
                 "--out", str(tmp_path / "o"), "--device", "cpu", "model.max_tiles=4", "model.object_gate=true"]) == 0
    assert used == [{"max_tiles": 4, "object_gate": True}]


def test_predict_runs_the_vision_tower_once(saved):
    model = saved["model"]
    image = torch.from_numpy(saved["image"]).permute(2, 0, 1).contiguous()
    calls = []
    hook = model.vlm.model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    try:
        result = predict(model, image, mask=torch.from_numpy(saved["mask"].astype(np.uint8)), texts=["a", "b c"])
    finally:
        hook.remove()
    assert len(calls) == 1 and len(result["rows"]) == 3
