"""`dualloop export` on real checkpoints of tiny trainings (ZeRO-3, bf16, LoRA, a caption EMA): the exported model
holds the checkpoint's weights with LoRA merged as PEFT merges it (and the engine's own weights, for a checkpoint of
2 ranks exported by one process), each weight written once (the transformers directories are what load_model reads;
--no-hf: one file), and exports of the earlier layout (both) still load; bfloat16 exports say so; the output
directory is only ever a whole export (an earlier export is replaced only when asked, a full disk leaves nothing),
the room check counts what is written, the consolidated weights are not held while writing, and a damaged
checkpoint or a config whose pretrained directories moved is an error naming it."""
from __future__ import annotations

import dataclasses
import errno
import gc
import json
import os
import shutil
import sys
import weakref
from pathlib import Path

import pytest
import torch
import yaml
from test_train_dist import fixed_inputs, torchrun
from test_train_robustness import _config, _run

from dualloop.config import ConfigError, load_config
from dualloop.train import export as ex

STEP = "step_00000001"
EMBED, HEAD = "vlm.model.language_model.embed_tokens.", "vlm.lm_head."


def _write_config(config: Path, corpus: dict, out: Path, steps: int) -> Path:
    """A tiny ZeRO-3 run in bf16 with LoRA and a caption EMA; a large lr, so that the adapters move away from 0."""
    _config(config, corpus, out, precision="bf16", lr=0.01, steps=steps)
    tree = yaml.safe_load(config.read_text())
    tree["loop"]["caption"]["ema_decay"] = 0.5
    config.write_text(yaml.safe_dump(tree))
    return config


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory) -> Path:
    """One optimizer step of one process: checkpoint step_00000001."""
    root = tmp_path_factory.mktemp("run")
    config = _write_config(root / "c.yaml", corpus, root / "run", steps=1)
    code, log = _run([sys.executable, "-m", "dualloop.train", "--config", str(config)])
    assert code == 0, log[-4000:]
    return root / "run"


def _outputs(model) -> tuple[torch.Tensor, torch.Tensor]:
    images, masks, ids, lengths = fixed_inputs(model)
    model.eval()
    with torch.no_grad():
        return (model.ground(images, caption_ids=ids, caption_lengths=lengths).logits.float(),
                model.caption_logits(images, masks, ids, lengths).float())


def _reference(ckpt: Path, weights: dict):
    """The checkpoint's model as trained (fp32, LoRA adapters unmerged) holding `weights`."""
    from dualloop.model import build_model

    model = build_model(dataclasses.replace(load_config(ckpt / "config.yaml").model, dtype="float32"))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and not [k for k in missing if k in dict(model.named_parameters())]
    return model.eval()


def _rows_in_base(weights: dict, ids: torch.Tensor) -> dict:
    """`weights` (state-dict names) with the new tokens' rows written into the base embedding / LM head, as the
    transformers directories hold them: the base values there are never read (the rows replace them both ways)."""
    out = dict(weights)
    rows = {k.rpartition(".")[2]: v for k, v in weights.items() if ".rows." in k}  # embed (and head, untied)
    for prefix, kind in ((EMBED, "embed"), (HEAD, "head" if "head" in rows else "embed")):
        if prefix + "base.weight" in out:
            base = out[prefix + "base.weight"].detach().clone()
            base[ids] = rows[kind].detach().to(base.dtype)
            out[prefix + "base.weight"] = base
    return out


def _token_ids(model) -> torch.Tensor:
    return model.language_model.embed_tokens.rows.token_ids


def _safetensors(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*.safetensors"))}


def _peft_merge(model) -> int:
    """PEFT's own merge of every LoRA layer, the layer then replaced by its base linear."""
    from peft.tuners.lora import LoraLayer

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    for name, layer in layers:
        layer.merge(safe_merge=True)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.get_base_layer())
    return len(layers)


def test_export_holds_the_checkpoint_with_lora_merged_as_peft_merges_it(run, tmp_path):
    from dualloop.model import load_model

    ckpt = run / "checkpoints" / STEP
    state = ex.consolidated_state_dict(ckpt)
    assert max(float(v.detach().abs().max()) for k, v in state.items() if k.endswith(ex.LORA_B)) > 1e-3  # LoRA moved
    reference = _reference(ckpt, state)
    want = _outputs(reference)
    assert _peft_merge(reference) == 14
    info = ex.export(run, tmp_path / "out")
    exported = load_model(tmp_path / "out")
    got = dict(exported.state_dict())
    for name, value in _rows_in_base(reference.state_dict(), _token_ids(exported)).items():
        assert got[name].dtype == torch.float32 and torch.equal(got[name], value), name
    assert set(got) == set(reference.state_dict())
    for a, b in zip(_outputs(exported), want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert info["lora_layers_merged"] == 14 and info["step"] == 1 and info["world_size"] == 1
    assert "not exported" in info["caption_ema"]  # the EMA option: the live weights are, and it is said
    assert info["train_with"] == (f"model.preset=pretrained model.vlm_path={tmp_path / 'out' / 'vlm'} "
                                  f"model.sam2_path={tmp_path / 'out' / 'sam2'} model.prompt_style=dualloop "
                                  "model.max_tiles=1 model.sam2_resize=bilinear model.object_gate=false "
                                  "model.min_pixels=401408 model.max_pixels=1605632")
    assert json.loads((tmp_path / "out" / "export.json").read_text()) == info
    assert not list(tmp_path.glob(".out.*"))  # no staging directory left behind


def test_a_bfloat16_export_is_the_fp32_one_rounded_and_says_so(run, tmp_path):
    """Its dualloop_model.json names bfloat16 (load_model gives what the file holds), eval still runs in fp32."""
    from safetensors.torch import load_file

    from dualloop.model import load_model

    ex.export(run, tmp_path / "f32", hf=False)
    ex.export(run, tmp_path / "bf16", dtype="bfloat16")
    full = load_file(str(tmp_path / "f32" / "model.safetensors"))
    half = load_model(tmp_path / "bf16")
    assert half.dtype == torch.bfloat16
    got = half.state_dict()
    assert set(full) <= set(got)
    for k, v in _rows_in_base(full, _token_ids(half)).items():
        want = v.to(torch.bfloat16) if v.is_floating_point() else v
        assert got[k].dtype == want.dtype and torch.equal(got[k], want), k
    meta = json.loads((tmp_path / "bf16" / "dualloop_model.json").read_text())
    assert meta["model_config"]["dtype"] == "bfloat16"
    assert ex.load_trained_model(tmp_path / "bf16").dtype == torch.float32
    vlm = json.loads((tmp_path / "bf16" / "vlm" / "config.json").read_text())
    assert vlm.get("dtype", vlm.get("torch_dtype")) == "bfloat16"


def test_files_are_readable_as_the_umask_allows(run, tmp_path):
    """safetensors writes 0600: an export shared with colleagues had unreadable weights next to readable configs."""
    old = os.umask(0o022)
    try:
        ex.export(run, tmp_path / "out")
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert len([p for p in files if p.suffix == ".safetensors"]) == 3  # vlm/, sam2/, seg_projection
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o644)}


def test_the_output_directory_is_new_empty_or_an_export_replaced_on_request(run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert ex.main(["--checkpoint", str(run), "--out", str(out)]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # untouched
    with pytest.raises(ConfigError, match="something other than an export"):
        ex.export(run, out, overwrite=True)

    (out / "notes.txt").unlink()  # an empty directory is fine
    ex.export(run, out)
    with pytest.raises(ConfigError, match="--overwrite"):
        ex.export(run, out, hf=False)
    assert (out / "vlm").is_dir()
    ex.export(run, out, hf=False, overwrite=True)
    assert not (out / "vlm").exists() and "vlm_path" not in json.loads((out / "export.json").read_text())
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_disk_full_half_way_leaves_no_export_and_the_earlier_one_intact(run, tmp_path, monkeypatch):
    from transformers import Sam2Model

    def full_disk(self, directory, **kwargs):
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "out"
    monkeypatch.setattr(Sam2Model, "save_pretrained", full_disk)
    with pytest.raises(ConfigError, match="No space left") as e:
        ex.export(run, out)
    assert "nothing was left" in str(e.value)
    assert not out.exists() and os.listdir(tmp_path) == []
    monkeypatch.undo()

    ex.export(run, out, hf=False)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    monkeypatch.setattr(Sam2Model, "save_pretrained", full_disk)
    with pytest.raises(ConfigError, match="earlier export there is untouched"):
        ex.export(run, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_no_room_is_found_before_writing(run, tmp_path, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 20))
    with pytest.raises(ConfigError, match=r"GB free there, the export needs about .*nothing was written"):
        ex.export(run, tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_the_consolidated_weights_are_not_held_while_writing(run, tmp_path, monkeypatch):
    """Each consolidated tensor is dropped once copied into the model: the export of a 26B model held a full extra
    copy of the weights (52 GB in bf16) through the writing."""
    import dualloop.model.build as build

    alive = []
    real_consolidate, real_save = ex.consolidated_state_dict, build.save_pretrained

    def consolidate(ckpt, *args, **kwargs):
        state = real_consolidate(ckpt, *args, **kwargs)
        alive.extend(weakref.ref(v) for v in state.values() if isinstance(v, torch.Tensor))
        return state

    def save(model, directory, **kwargs):
        gc.collect()
        held = [r for r in alive if r() is not None]
        assert alive and not held, f"{len(held)} of {len(alive)} consolidated tensors alive while writing"
        return real_save(model, directory, **kwargs)

    monkeypatch.setattr(ex, "consolidated_state_dict", consolidate)
    monkeypatch.setattr(build, "save_pretrained", save)
    ex.export(run, tmp_path / "out", dtype="bfloat16", hf=False)


def test_the_export_holds_each_weight_once(run, tmp_path):
    """The transformers directories are the export's weights: no model.safetensors beside them (an 8B model was
    written twice); dualloop_model.json names them (relative: the export can move), and they load with transformers
    (the LLM's rows of [SEG] <vp> </vp> the trained ones, no weight missing) and with load_model, equal."""
    from transformers import InternVLForConditionalGeneration, Sam2Model

    from dualloop.model import load_model

    ex.export(run, tmp_path / "first")
    shutil.move(tmp_path / "first", tmp_path / "out")
    out = tmp_path / "out"
    files = _safetensors(out)
    assert not (out / "model.safetensors").exists() and not (out / "tokenizer").exists()
    assert {f.split("/")[0] for f in files} == {"vlm", "sam2", "seg_projection.safetensors"}
    meta = json.loads((out / "dualloop_model.json").read_text())
    assert meta["format"] == 2 and meta["weights"] == {"vlm": "vlm", "sam2": "sam2",
                                                       "seg_projection": "seg_projection.safetensors"}
    exported = load_model(out)
    weights = sum(t.numel() * t.element_size() for t in {p.untyped_storage().data_ptr(): p for p in
                                                         exported.state_dict().values()}.values())
    assert 0.95 * weights < sum(files.values()) < 1.05 * weights, (files, weights)  # was twice that

    state = _rows_in_base(exported.state_dict(), _token_ids(exported))
    vlm, info = InternVLForConditionalGeneration.from_pretrained(out / "vlm", output_loading_info=True)
    assert not any(info.values()), info
    for name, value in vlm.state_dict().items():
        ours = "vlm." + name.replace("embed_tokens.", "embed_tokens.base.").replace("lm_head.", "lm_head.base.")
        assert torch.equal(value, state[ours]), name
    sam2 = Sam2Model.from_pretrained(out / "sam2")
    assert all(torch.equal(v, state["sam2." + k]) for k, v in sam2.state_dict().items())


def test_no_hf_writes_the_single_file_form(run, tmp_path):
    from dualloop.model import load_model

    ex.export(run, tmp_path / "one", hf=False)
    ex.export(run, tmp_path / "hf")
    files = sorted(str(p.relative_to(tmp_path / "one")) for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert [f for f in files if not f.startswith("tokenizer/")] == ["dualloop_model.json", "export.json",
                                                                   "model.safetensors"]
    assert json.loads((tmp_path / "one" / "dualloop_model.json").read_text())["format"] == 1
    one, hf = load_model(tmp_path / "one"), load_model(tmp_path / "hf")
    a, b = _rows_in_base(one.state_dict(), _token_ids(one)), hf.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert abs(sum(_safetensors(tmp_path / "one").values()) - sum(_safetensors(tmp_path / "hf").values())) < 1 << 17


def _earlier_layout(run: Path, tmp_path: Path) -> Path:
    """An export as written before the weights were kept once: the single file (dualloop_model.json format 1,
    model.safetensors, tokenizer/) and the transformers directories beside it, export.json naming both."""
    old, hf = tmp_path / "old", tmp_path / "hf_parts"
    ex.export(run, old, hf=False)
    info = ex.export(run, hf)
    for part in ("vlm", "sam2", "seg_projection.safetensors"):
        shutil.move(hf / part, old / part)
    info = {**info, "model": str(old), **{k: v.replace(str(hf), str(old)) for k, v in info.items()
                                          if k in ("vlm_path", "sam2_path", "seg_projection", "train_with")}}
    (old / "export.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(hf)
    return old


def test_an_export_of_the_earlier_layout_still_loads(run, tmp_path):
    """load_model reads its single file (the base rows the new rows replace included, as before), and eval's
    load_trained_model and the pretrained preset from its vlm/ + sam2/ give the same model."""
    from dualloop.config import LoraConfig, ModelConfig
    from dualloop.model import build_model, load_model

    old = _earlier_layout(run, tmp_path)
    assert json.loads((old / "dualloop_model.json").read_text())["format"] == 1
    assert (old / "model.safetensors").is_file() and (old / "vlm").is_dir()
    ckpt = run / "checkpoints" / STEP
    reference = _reference(ckpt, ex.consolidated_state_dict(ckpt))
    _peft_merge(reference)
    loaded = load_model(old)
    got = loaded.state_dict()
    assert all(torch.equal(got[k], v) for k, v in reference.state_dict().items())
    want = _outputs(loaded)
    preset = build_model(ModelConfig(preset="pretrained", vlm_path=str(old / "vlm"), sam2_path=str(old / "sam2"),
                                     dtype="float32", lora=LoraConfig(enabled=False)))
    assert ex.adopt_exported_parts(preset, old / "vlm")
    for model in (ex.load_trained_model(old), preset):
        for a, b in zip(_outputs(model), want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_the_room_check_counts_the_weights_once(run, tmp_path, monkeypatch):
    """Room for one copy of the weights is enough for the default export (it asked for two)."""
    ex.export(run, tmp_path / "first", hf=False)
    weights = (tmp_path / "first" / "model.safetensors").stat().st_size
    real = shutil.disk_usage
    free = int(weights * 1.02) + (16 << 20) + weights // 2
    assert real(tmp_path).free > free
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=free))
    ex.export(run, tmp_path / "out")
    assert (tmp_path / "out" / "vlm").is_dir()


def _copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run / "checkpoints", copy / "checkpoints")
    return copy / "checkpoints" / STEP


def test_a_checkpoint_with_a_missing_or_damaged_shard_is_an_error_naming_it(run, tmp_path):
    ckpt = _copy(run, tmp_path)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    (ckpt / "trainer_state.json").write_text(json.dumps({**state, "world_size": 2}))
    with pytest.raises(ConfigError, match=f"{ckpt} was written by 2 ranks but lacks rank 1's optim shard, rank 1's "
                                          "model shard"):
        ex.export(ckpt, tmp_path / "out")
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    # a rank's shards beyond those that wrote the step (an earlier save of it on more ranks)
    extra = [ckpt / f.name.replace("rank_0_", "rank_1_") for f in ckpt.glob("*rank_0_mp_rank_00_*_states.pt")]
    for f in extra:
        f.write_bytes(b"old")
    with pytest.raises(ConfigError, match=f"{ckpt} was written by 1 ranks but also holds shards of rank\\(s\\) 1"):
        ex.export(ckpt, tmp_path / "out")
    for f in extra:
        f.unlink()
    model_file = next(ckpt.glob("*_model_states.pt"))
    model_file.write_bytes(model_file.read_bytes()[:1000])  # cut short
    assert ex.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "out")]) == 2
    with pytest.raises(ConfigError, match=f"{ckpt}: its ZeRO shards cannot be consolidated"):
        ex.export(ckpt, tmp_path / "out")
    model_file.unlink()
    with pytest.raises(ConfigError, match=rf"{ckpt}: no model-state files \(\*model_states.pt\)"):
        ex.export(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_config_whose_pretrained_directories_moved_is_an_error_naming_them(run, tmp_path):
    ckpt = _copy(run, tmp_path)
    tree = yaml.safe_load((ckpt / "config.yaml").read_text())
    tree["model"].update(preset="pretrained", vlm_path=str(tmp_path / "gone" / "vlm"), sam2_path=str(tmp_path))
    (ckpt / "config.yaml").write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match=r"config.yaml: model.vlm_path .*gone/vlm.* is not a directory"):
        ex.export(ckpt, tmp_path / "out")


WORKER = r'''
import sys
import deepspeed
import torch
from deepspeed.utils import safe_get_full_fp32_param
from dualloop.config import load_config
from dualloop.distributed import leave_together
from dualloop.train.trainer import Trainer

tr = Trainer(load_config(sys.argv[1]))
tr.fit()
weights = {}
for name, p in tr.engine.module.named_parameters():  # what the engine trains with: fp32 masters, frozen as held
    if p.requires_grad:
        weights[name] = safe_get_full_fp32_param(p).float().cpu()
    else:
        with deepspeed.zero.GatheredParameters([p]):
            weights[name] = p.detach().float().cpu().clone()
if tr.rank == 0:
    torch.save(weights, sys.argv[2])
leave_together()  # a rank leaving alone while the other is still in the group can abort at exit
from dualloop.distributed import exit_after_leaving
exit_after_leaving(0)  # no interpreter teardown, where a rank can abort ("terminate called ...")
'''


@pytest.mark.slow
def test_a_two_rank_checkpoint_exported_by_one_process_holds_the_engines_weights(corpus, tmp_path):
    """No launcher, no process group: the export equals the model the 2-rank engine ended with (its fp32 masters,
    frozen weights as trained), LoRA merged, and gives the same mask and caption logits."""
    from dualloop.model import load_model

    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    config = _write_config(tmp_path / "c.yaml", corpus, tmp_path / "run", steps=2)
    code, log = _run(torchrun(worker, config, tmp_path / "engine.pt"))
    assert code == 0, log[-4000:]
    engine = torch.load(tmp_path / "engine.pt")
    info = ex.export(tmp_path / "run", tmp_path / "out")
    assert info["world_size"] == 2 and info["step"] == 2 and "not exported" in info["caption_ema"]
    exported = load_model(tmp_path / "out")
    got = dict(exported.named_parameters())
    scaling = 256 / 128  # LoraConfig defaults: alpha / r
    for name, value in _rows_in_base(engine, _token_ids(exported)).items():
        if ".lora_" in name:
            continue
        if ".base_layer." in name:
            prefix, _, leaf = name.partition(".base_layer.")
            if leaf == "weight":
                value = value + (engine[prefix + ex.LORA_B] @ engine[prefix + ex.LORA_A]) * scaling
                torch.testing.assert_close(got[prefix + ".weight"], value, rtol=0, atol=1e-6)
                continue
            name = f"{prefix}.{leaf}"
        assert torch.equal(got[name], value), name
    reference = _reference(tmp_path / "run" / "checkpoints" / "step_00000002", engine)
    for a, b in zip(_outputs(exported), _outputs(reference)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
