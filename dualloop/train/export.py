"""`dualloop export --checkpoint DIR --out DIR`: a training checkpoint (ZeRO shards) -> one consolidated model with
LoRA merged, in safetensors, each weight written once.

Consolidation runs offline with DeepSpeed's `zero_to_fp32` (no GPUs, no process group, any number of ranks wrote the
checkpoint): the trainable weights' fp32 master copies, the frozen ones as trained (bf16 under bf16 training). LoRA
is folded into the base weights in fp32 on the consolidated state dict (W + alpha/r * B A, PEFT's merge), and the
model is built without adapters in the export dtype, so no fp32 copy of a bf16 export is ever held. Written:

    OUT/vlm/    transformers InternVL directory (merged LoRA, new-token rows written into the embedding/LM head,
                tokenizer with [SEG] <vp> </vp>)                  -> model.preset=pretrained, model.vlm_path
    OUT/sam2/   transformers SAM2 directory (trained mask decoder) -> model.sam2_path
    OUT/seg_projection.safetensors   the [SEG] projection (text_hidden_fcs)
    OUT/dualloop_model.json          the model config, naming the three above as its weights (load_model(OUT))
    OUT/export.json                  what was written, from which step, and how to train on from it

With --no-hf, instead of vlm/ sam2/ seg_projection: OUT/model.safetensors + tokenizer/ (the single-file form of
save_pretrained). Exports written before the weights were kept once hold both; load_model reads their single file.

The weights are the live ones of the checkpoint's step; a caption EMA (`loop.caption.ema_decay`) is a training-time
teacher of the captioner only and is not exported (export.json says so). Everything is written into a hidden
sibling directory that is renamed to OUT at the end: a failure (a full disk) or a kill leaves no OUT that looks
complete, and an earlier export in OUT stays as it was until the new one is whole.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import torch

from dualloop.config import MODEL_CONVENTIONS, Config, ConfigError, load_config, pretrained_overrides
from dualloop.files import check_new_output, staged_directory
from dualloop.train import checkpoint as ckpt_io
from dualloop.train.checkpoint_layout import shard_ranks

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def consolidated_state_dict(ckpt: Path, lazy: bool = False) -> dict:
    """Full weights of a DeepSpeed checkpoint directory (ZeRO-2 or ZeRO-3, written by any number of ranks): the
    trainable ones' fp32 masters, the frozen ones in their trained dtype. `lazy`: the trainable entries are
    DeepSpeed's GatheredTensor over the memory-mapped optimizer shards, each made a tensor by `.contiguous()` (a
    full fine-tune's fp32 weights are then never all in memory at once). A missing or damaged shard is a ConfigError
    naming the checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    _check_shards(ckpt)
    try:
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name,
                                                        exclude_frozen_parameters=False, lazy_mode=lazy)
    except (ValueError, RuntimeError, OSError, EOFError, KeyError) as e:  # zip/pickle errors of a damaged file
        raise ConfigError(f"{ckpt}: its ZeRO shards cannot be consolidated ({type(e).__name__}: {e})") from e


def _check_shards(ckpt: Path) -> None:
    """Every rank's shard files are there (a checkpoint copied in part, or one rank's files lost): DeepSpeed itself
    fails on a missing model-state shard with a shape error deep in the consolidation."""
    ranks = shard_ranks(ckpt)
    state_file = ckpt / "trainer_state.json"
    world = json.loads(state_file.read_text()).get("world_size") if state_file.is_file() else None
    for kind, pattern in (("optimizer", "*_optim_states.pt"), ("model-state", "*model_states.pt")):
        if not any(ckpt.glob(pattern)):
            raise ConfigError(f"{ckpt}: no {kind} files ({pattern}) in it: not a DeepSpeed ZeRO checkpoint, or its "
                              "files were not copied")
    world = int(world or max(ranks["optim"] | ranks["model"]) + 1)
    lacking = [f"rank {r}'s {kind} shard" for kind in ("optim", "model")
               for r in range(world) if ranks[kind] and r not in ranks[kind]]  # ZeRO-2: one model file, unranked
    if lacking:
        raise ConfigError(f"{ckpt} was written by {world} ranks but lacks {', '.join(lacking)} "
                          "(*_states.pt; copied in part?)")
    beyond = sorted({r for kind in ranks.values() for r in kind if r >= world})
    if beyond:
        raise ConfigError(f"{ckpt} was written by {world} ranks but also holds shards of rank(s) "
                          f"{', '.join(map(str, beyond))} (*_states.pt of an earlier save of this step on more ranks?)")


def adopt_exported_parts(model, vlm_path: str | Path | None) -> bool:
    """For `model.preset: pretrained` built from an export's vlm/ + sam2/: the [SEG] projection from
    seg_projection.safetensors next to vlm/ (the preset starts it at random, right for an original checkpoint), and
    the trained [SEG]/<vp>/</vp> rows from the base embedding / LM head where export wrote them (the preset keeps
    those already, as the export's tokenizer holds the tokens; copied again here for exports of any age).
    Returns False, changing nothing, when vlm_path is not inside an export. Under ZeRO-3 every rank must call it."""
    from dualloop.model.build import adopt_rows_and_projection

    if vlm_path is None:
        return False
    root = Path(vlm_path).resolve().parent
    seg_file = root / "seg_projection.safetensors"
    if not ((root / "export.json").is_file() and seg_file.is_file()):
        return False
    try:
        adopt_rows_and_projection(model, seg_file)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    return True


def load_trained_model(checkpoint: str | Path, cfg: Config | None = None):
    """A model to evaluate, from an exported directory (`dualloop export` output: `load_model`), the vlm/ + sam2/
    directories of `dualloop convert-sa2va` (a released Sa2VA model, before any training), or a training checkpoint
    (a step_* directory, or a run / checkpoints directory: its latest), consolidated offline.

    The architecture comes from the checkpoint's own config.yaml (a checkpoint only fits the model it was trained
    with); `cfg.model` is the fallback when that file is missing. Returned on the CPU in eval mode, fp32.
    """
    from dualloop.model import build_model, load_model
    from dualloop.model.build import META_FILE

    path = Path(checkpoint)
    if (path / META_FILE).is_file():
        model = load_model(path).float()  # a bfloat16 export is evaluated in fp32 like everything else
    elif (path / "export.json").is_file() and (path / "vlm").is_dir() and (path / "sam2").is_dir():
        from dualloop.config import LoraConfig, ModelConfig
        from dualloop.model.convert_sa2va import SA2VA_MODEL, SA2VA_QWEN3_MODEL, SA2VA_QWEN_MODEL

        info = json.loads((path / "export.json").read_text())
        # settings an older export.json lacks: Sa2VA's for a conversion (of its family), the defaults for an export
        sa2va = info.get("converted_from") == "sa2va"
        released = {"qwen2_5_vl": SA2VA_QWEN_MODEL, "qwen3_vl": SA2VA_QWEN3_MODEL}.get(info.get("vlm_family"),
                                                                                   SA2VA_MODEL)
        settings = {k: info.get(k, released[k] if sa2va else getattr(ModelConfig, k)) for k in MODEL_CONVENTIONS}
        model = build_model(ModelConfig(preset="pretrained", vlm_path=str(path / "vlm"), sam2_path=str(path / "sam2"),
                                        dtype="float32", lora=LoraConfig(enabled=False), **settings))
        adopt_exported_parts(model, path / "vlm")
    else:
        source = training_checkpoint(path, cfg)
        if source is None:
            raise ConfigError(f"--checkpoint {checkpoint}: export.json without the vlm/ and sam2/ directories")
        ckpt, model_cfg = source
        model = model_from_state(model_cfg, consolidated_state_dict(ckpt), ckpt)
    return model.eval()


def training_checkpoint(checkpoint: str | Path, cfg: Config | None = None):
    """(checkpoint directory, ModelConfig) of a training checkpoint given as a step_* directory or a run /
    checkpoints directory (its latest); None for an exported or converted model directory."""
    from dualloop.model.build import META_FILE

    path = Path(checkpoint)
    if (path / META_FILE).is_file() or (path / "export.json").is_file():
        return None
    ckpt = ckpt_io.resolve_resume(str(path), path, "--checkpoint")
    if ckpt is None:
        raise ConfigError(f"--checkpoint {checkpoint}: neither an exported model nor a training checkpoint")
    if (ckpt / "config.yaml").is_file():
        return ckpt, load_config(ckpt / "config.yaml").model
    if cfg is not None:
        return ckpt, cfg.model
    raise ConfigError(f"{ckpt} has no config.yaml; pass the training config")


def model_from_state(model_cfg, state: dict, ckpt: Path):
    """The fp32 model of `model_cfg` holding a consolidated state dict (of checkpoint `ckpt`), in eval mode.
    `state` is emptied as its tensors are copied in."""
    from dualloop.model import build_model

    model = build_model(dataclasses.replace(model_cfg, dtype="float32"))
    _load_consolidated(model, state, ckpt)
    return model.eval()


def _load_consolidated(model: torch.nn.Module, state: dict, ckpt: Path) -> None:
    """Copy `state` (tensors, or lazy GatheredTensors) into the model, popping each entry once copied: the
    consolidated weights and the model's are not both held whole. Every parameter must be in `state`; buffers
    may be left out (non-persistent ones are not saved)."""
    own = model.state_dict(keep_vars=True)
    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise ConfigError(f"{ckpt}: weights not in the model built from its config: {unexpected[:5]}")
    missing = [n for n, _ in model.named_parameters() if n not in state]
    if missing:
        raise ConfigError(f"{ckpt}: the checkpoint lacks weights of the model: {missing[:5]}")
    with torch.no_grad():
        for name in list(state):
            src, dst = state.pop(name).contiguous(), own[name]
            if tuple(src.shape) != tuple(dst.shape):
                raise ConfigError(f"{ckpt}: {name} has shape {tuple(src.shape)}, the model {tuple(dst.shape)}")
            dst.copy_(src)


LORA_A, LORA_B, LORA_BASE = ".lora_A.default.weight", ".lora_B.default.weight", ".base_layer."


@torch.no_grad()  # the masters are saved as parameters (requires_grad): no graph holding A and B
def merge_lora_state(state: dict, scaling: float) -> int:
    """Fold PEFT's LoRA adapters of a state dict into their base linears, in fp32: W <- W + scaling * B @ A (what
    `LoraLayer.merge` computes; dualloop's adapters are plain LoRA, scaling = alpha / r), under the plain linear's
    names. In place; returns the number of layers merged. Non-finite merged weights are an error."""
    prefixes = [k[: -len(LORA_A)] for k in state if k.endswith(LORA_A)]
    for prefix in prefixes:
        a, b = state.pop(prefix + LORA_A).contiguous(), state.pop(prefix + LORA_B).contiguous()
        weight = state.pop(prefix + LORA_BASE + "weight").contiguous()
        merged = weight.float() + (b.float() @ a.float()) * scaling
        if not torch.isfinite(merged).all():
            raise ConfigError(f"{prefix}: the LoRA-merged weight is not finite")
        state[prefix + ".weight"] = merged
        for key in [k for k in state if k.startswith(prefix + LORA_BASE)]:  # the bias
            state[prefix + "." + key[len(prefix + LORA_BASE):]] = state.pop(key)
    left = [k for k in state if ".lora_" in k or LORA_BASE in k]
    if left:
        raise ConfigError(f"LoRA weights that are not plain A/B pairs of the 'default' adapter: {left[:5]}")
    return len(prefixes)


def export(checkpoint: str | Path, out: str | Path, *, dtype: str = "float32", hf: bool = True,
           overwrite: bool = False) -> dict:
    from dualloop.model import build_model
    from dualloop.model.build import save_pretrained

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    ckpt = ckpt_io.resolve_resume(str(checkpoint), Path(checkpoint), "--checkpoint")
    if ckpt is None:
        raise ConfigError(f"--checkpoint {checkpoint}: no checkpoint there")
    cfg_file = ckpt / "config.yaml"
    if not cfg_file.is_file():
        raise ConfigError(f"{ckpt} has no config.yaml (not written by dualloop train?)")
    cfg = load_config(cfg_file)
    out = Path(out).absolute()
    check_new_output(out, overwrite, marker="export.json", what="an export")
    if cfg.model.preset == "pretrained":  # rebuilt from them (configs, tokenizer): fail before the consolidation
        for key in ("vlm_path", "sam2_path"):
            where = getattr(cfg.model, key)
            if not where or not Path(where).expanduser().is_dir():
                raise ConfigError(f"{cfg_file}: model.{key} {where!r} is not a directory; export rebuilds the model "
                                  "from it (its config and tokenizer): put it back there")

    state = consolidated_state_dict(ckpt, lazy=True)
    lora = cfg.model.lora
    merged = merge_lora_state(state, lora.alpha / lora.r) if lora.enabled else 0
    model_cfg = dataclasses.replace(cfg.model, dtype=dtype, lora=dataclasses.replace(lora, enabled=False))
    try:
        model = build_model(model_cfg)
    except (ValueError, OSError) as e:
        raise ConfigError(f"{cfg_file}: the model of this config cannot be built: {e}") from e
    _load_consolidated(model, state, ckpt)
    del state
    model.eval()

    trainer_state = json.loads((ckpt / "trainer_state.json").read_text()) \
        if (ckpt / "trainer_state.json").is_file() else {}
    written = {"model": str(out), "checkpoint": str(ckpt), "step": trainer_state.get("step"),
               "world_size": trainer_state.get("world_size"), "dtype": dtype, "lora_layers_merged": merged,
               **{k: getattr(cfg.model, k) for k in MODEL_CONVENTIONS}}
    if cfg.loop.caption.ema_decay is not None:
        written["caption_ema"] = ("not exported: the live weights of the step are (the EMA was the caption "
                                  "phase's teacher during training)")
    if hf:
        written.update(vlm_path=str(out / "vlm"), sam2_path=str(out / "sam2"),
                       seg_projection=str(out / "seg_projection.safetensors"),
                       train_with=pretrained_overrides(out, written))
    _check_room(out, model)
    with staged_directory(out, what="an export") as stage:
        # with hf: the transformers directories are the weights, dualloop_model.json names them; else one file
        save_pretrained(model, stage, hf_layout=hf)
        (stage / "export.json").write_text(json.dumps(written, indent=1))
    return written


def _check_room(out: Path, model: torch.nn.Module) -> None:
    """The weights are written once, in either layout: stop before writing when the disk cannot take them, rather
    than fail half-way through a large model."""
    from dualloop.model.build import storage_key

    tensors = {storage_key(t): t.numel() * t.element_size() for t in model.state_dict().values()}  # tied: once
    need = int(sum(tensors.values()) * 1.02) + (16 << 20)  # + tokenizer, configs, headers
    free = shutil.disk_usage(out.parent).free
    if free < need:
        gb = 1 << 30
        raise ConfigError(f"--out {out}: {free / gb:.2f} GB free there, the export needs about {need / gb:.2f} GB; "
                          "nothing was written")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dualloop export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint step_* directory, or a run / checkpoints directory (its latest)")
    p.add_argument("--out", required=True, help="output directory: new or empty (see --overwrite)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="of the written weights (default float32: the trainable weights' fp32 masters unrounded)")
    p.add_argument("--no-hf", action="store_true",
                   help="write the weights as one model.safetensors (load_model only) instead of the "
                        "transformers-format vlm/ + sam2/ directories")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export in --out (only once the new one is complete)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        written = export(args.checkpoint, args.out, dtype=args.dtype, hf=not args.no_hf, overwrite=args.overwrite)
    except ConfigError as e:
        print(f"dualloop export: {e}", file=sys.stderr)
        return 2
    print(json.dumps(written, indent=1))
    return 0
