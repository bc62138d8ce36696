"""Real-user inputs of `dualloop predict` / `dualloop eval` on a saved tiny model: image and mask file formats, EXIF
orientation, a reused --out, unusable checkpoints, devices and texts; and the object gate in evaluation examples."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from dualloop.cli import main
from dualloop.config import LoraConfig, ModelConfig
from dualloop.eval import evaluate as ev
from dualloop.eval.metrics import NO_OBJECT_LOGIT, predict_mask
from dualloop.model import build_model
from dualloop.model.build import save_pretrained

torch.set_num_threads(1)
H, W = 60, 90


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("audit")
    save_pretrained(build_model(ModelConfig(preset="tiny", lora=LoraConfig(enabled=False))).eval(), d / "model")
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(d / "rgb.png")
    gray = rgb[..., 0]
    Image.fromarray(gray).save(d / "gray.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(d / "gray16.png")  # 16-bit: the same picture
    Image.fromarray(rgb).convert("RGBA").save(d / "rgba.png")
    Image.fromarray(rgb).convert("P").save(d / "palette.png")
    Image.fromarray(rgb).convert("CMYK").save(d / "cmyk.jpg")
    region = np.zeros((H, W), bool)
    region[10:40, 20:60] = True
    Image.fromarray(region.astype(np.uint8) * 255).save(d / "mask255.png")
    return {"dir": d, "region": region, "gray": gray}


def _predict(files, out, *args):
    d = files["dir"]
    args = [str(d / a) if a.endswith((".png", ".jpg")) else a for a in args]
    return main(["predict", "--checkpoint", str(d / "model"), "--out", str(out), "--device", "cpu",
                 "--max-new-tokens", "2", *args])


def _pngs(out):
    return {p.name: np.asarray(Image.open(p)) for p in sorted(out.glob("*.png"))}


@pytest.mark.parametrize("image", ["gray.png", "rgba.png", "palette.png", "cmyk.jpg"])
def test_predict_reads_other_image_modes(files, tmp_path, capsys, image):
    assert _predict(files, tmp_path, "--image", image, "--mask", "mask255.png", "--text", "x") == 0, \
        capsys.readouterr().err
    for name, png in _pngs(tmp_path).items():
        assert png.shape[:2] == (H, W), name


def test_a_16bit_grayscale_image_is_the_same_picture_as_its_8bit_copy(files, tmp_path, capsys):
    # PIL's RGB conversion of a 16-bit (I;16) image clips at 255: nearly white without the scaling
    assert _predict(files, tmp_path / "8", "--image", "gray.png", "--text", "the object") == 0
    assert _predict(files, tmp_path / "16", "--image", "gray16.png", "--text", "the object") == 0, \
        capsys.readouterr().err
    eight, sixteen = _pngs(tmp_path / "8"), _pngs(tmp_path / "16")
    for name in eight:
        assert np.array_equal(eight[name], sixteen[name]), name


def _mask_files(d, region):
    m = region.astype(np.uint8)
    Image.fromarray(m).save(d / "m01.png")  # 0/1
    Image.fromarray(m * 255).convert("1").save(d / "m1bit.png")
    sav = Image.fromarray(m * 3, "P")  # SA-V style index mask: the object is index 3, colours from the palette
    sav.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [0] * 744)
    sav.save(d / "msav.png")
    Image.fromarray(np.stack([m * 255, m * 0, m * 128], -1)).save(d / "mrgb.png")
    Image.fromarray(m.astype(np.uint16) * 65535).save(d / "m16.png")
    Image.fromarray(m.astype(np.uint16)).save(d / "m16_01.png")
    # an editor's cut-out: the region opaque (black here), the rest transparent with white left under it
    cut = np.full((*region.shape, 4), 255, np.uint8)
    cut[region, :3] = 0
    cut[~region, 3] = 0
    Image.fromarray(cut).save(d / "mcutout.png")
    Image.fromarray(np.stack([m * 255, np.full_like(m, 255)], -1), "LA").save(d / "mla_opaque.png")


MASKS = ["m01.png", "m1bit.png", "msav.png", "mrgb.png", "m16.png", "m16_01.png", "mcutout.png", "mla_opaque.png"]


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory):
    _mask_files(files["dir"], files["region"])
    out = tmp_path_factory.mktemp("ref")
    assert _predict(files, out, "--image", "rgb.png", "--mask", "mask255.png") == 0
    return json.loads((out / "prediction.json").read_text()), _pngs(out)


@pytest.mark.parametrize("mask", MASKS)
def test_every_mask_format_gives_the_region_of_the_0_255_mask(files, reference, tmp_path, capsys, mask):
    assert _predict(files, tmp_path, "--image", "rgb.png", "--mask", mask) == 0, capsys.readouterr().err
    record, pngs = json.loads((tmp_path / "prediction.json").read_text()), _pngs(tmp_path)
    assert record["predictions"] == reference[0]["predictions"]
    for name in pngs:  # overlay.png outlines the region that was read
        assert np.array_equal(pngs[name], reference[1][name]), name


def _exif_jpeg(path, array, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(array).save(path, exif=exif, quality=95)


def test_exif_orientation_is_not_applied_and_is_said(files, tmp_path, capsys):
    d = files["dir"]
    _exif_jpeg(d / "rotated.jpg", np.asarray(Image.open(d / "rgb.png")), 6)  # viewers show it 60 wide, 90 tall
    assert _predict(files, tmp_path / "o", "--image", "rotated.jpg", "--mask", "mask255.png") == 0
    err = capsys.readouterr().err
    assert "EXIF orientation 6" in err and "stored pixel grid" in err
    assert np.asarray(Image.open(tmp_path / "o" / "cycle.png")).shape == (H, W)
    assert json.loads((tmp_path / "o" / "prediction.json").read_text())["exif_orientation"] == 6
    # a mask drawn on the image as viewers show it: the size error says why
    Image.fromarray(files["region"].T.astype(np.uint8) * 255).save(d / "mask_shown.png")
    assert _predict(files, tmp_path / "p", "--image", "rotated.jpg", "--mask", "mask_shown.png") == 2
    err = capsys.readouterr().err
    assert "is 60x90 but --image" in err and "EXIF orientation 6" in err


def test_a_reused_out_keeps_no_earlier_mask_files(files, tmp_path):
    out = tmp_path / "o"
    assert _predict(files, out, "--image", "rgb.png", "--mask", "mask255.png", "--text", "a", "--text", "b") == 0
    (out / "notes.txt").write_text("mine")
    assert _predict(files, out, "--image", "rgb.png", "--text", "a") == 0
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "overlay.png", "prediction.json", "text1.png"]


def test_an_out_that_is_a_file_is_an_error_before_loading(files, tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    assert _predict(files, tmp_path / "taken", "--image", "rgb.png", "--text", "a") == 2
    assert "--out" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["", "   "])
def test_an_empty_text_is_an_error(files, tmp_path, capsys, text):
    assert _predict(files, tmp_path, "--image", "rgb.png", "--text", "ok", "--text", text) == 2
    assert "--text" in capsys.readouterr().err and not list(tmp_path.glob("*.png"))


def test_a_missing_checkpoint_is_said_to_be_missing(files, tmp_path, capsys):
    rc = main(["predict", "--checkpoint", str(tmp_path / "nope"), "--image", str(files["dir"] / "rgb.png"),
               "--text", "x", "--device", "cpu", "--out", str(tmp_path / "o")])
    assert rc == 2 and "nope does not exist" in capsys.readouterr().err


def _broken_models(src, d):
    import shutil

    truncated = d / "truncated"
    shutil.copytree(src, truncated)
    data = (src / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[:1000])
    bad_json = d / "bad_json"
    shutil.copytree(src, bad_json)
    (bad_json / "dualloop_model.json").write_text("{not json")
    return [truncated, bad_json]


def test_an_unloadable_checkpoint_is_an_error_naming_it(files, tmp_path, capsys):
    for broken in _broken_models(files["dir"] / "model", tmp_path):
        rc = main(["predict", "--checkpoint", str(broken), "--image", str(files["dir"] / "rgb.png"), "--text", "x",
                   "--device", "cpu", "--out", str(tmp_path / "o")])
        assert rc == 2 and f"--checkpoint {broken}" in capsys.readouterr().err, broken
        cfg = tmp_path / "c.yaml"
        cfg.write_text("data: {datasets: [{name: x, kind: sa1b, root: /nonexistent}]}\n")
        rc = main(["eval", "--checkpoint", str(broken), "--config", str(cfg), "--device", "cpu"])
        assert rc == 2 and f"--checkpoint {broken}" in capsys.readouterr().err, broken


def test_a_cuda_index_past_the_machine_s_gpus_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert ev._eval_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="--device cuda:1: .*1 CUDA device"):
        ev._eval_device("cuda:1")
    monkeypatch.setenv("LOCAL_RANK", "1")  # a launcher with more ranks than GPUs
    with pytest.raises(ValueError, match="LOCAL_RANK 1"):
        ev._eval_device("cuda", world_size=2)


class AbsentStub(torch.nn.Module):
    """Grounds everything with positive logits but SAM2's object score says "absent"."""

    pad_token_id = 0

    def __init__(self, object_gate):
        super().__init__()
        self.model_cfg = SimpleNamespace(object_gate=object_gate)

    def caption(self, images, masks, max_new_tokens=16, **_):
        n = len(images)
        return SimpleNamespace(ids=torch.ones(n, 1, dtype=torch.long), lengths=torch.ones(n, dtype=torch.long),
                               texts=["it"] * n)

    def encode_queries(self, captions):
        return torch.ones(len(captions), 1, dtype=torch.long), torch.ones(len(captions), dtype=torch.long)

    def ground(self, images, caption_ids, caption_lengths, **_):
        n = len(images)
        return SimpleNamespace(logits=torch.full((n, 4, 4), 5.0), object_score=torch.full((n,), -1.0))


@pytest.mark.parametrize("object_gate", [False, True])
def test_evaluation_examples_show_the_mask_that_was_scored(object_gate):
    # the demo's examples.png draws predict_mask(example["logits2"]): the gated logits when the gate is on
    from dualloop.data.base import make_item

    ds = [make_item(np.zeros((8, 8, 3), np.uint8), np.ones((8, 8), np.uint8), source="refcoco", key="r0",
                    captions=["the thing"])]
    res = ev.evaluate_model(AbsentStub(object_gate), {"refcoco_val": ds}, samples=None, keep_examples=1)
    (ex,) = res["examples"]
    shown = predict_mask(ex["logits2"], tuple(ex["mask2"].shape))
    assert ex["iou"] == (0.0 if object_gate else 1.0) == res["cycle"]["giou"]
    assert bool(shown.any()) is not object_gate
    if object_gate:
        assert bool((ex["logits2"] == NO_OBJECT_LOGIT).all())
