"""`dualloop export --checkpoint DIR --out DIR`: a training checkpoint (ZeRO shards) -> one consolidated model with
LoRA merged, in safetensors.

Consolidation runs offline with DeepSpeed's `get_fp32_state_dict_from_zero_checkpoint` (no GPUs, no process
group); LoRA is merged on the whole, unsharded weights (PEFT's merge cannot run on ZeRO-3 shards). Written:

    OUT/model.safetensors + dualloop_model.json + tokenizer/   the full model, LoRA merged (load_model(OUT))
    OUT/vlm/    transformers InternVL directory (merged LoRA, new-token rows written into the embedding/LM head,
                tokenizer with [SEG] <vp> </vp>)                  -> model.preset=pretrained, model.vlm_path
    OUT/sam2/   transformers SAM2 directory (trained mask decoder) -> model.sam2_path
    OUT/seg_projection.safetensors   the [SEG] projection (text_hidden_fcs)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from dualloop.config import Config, ConfigError, load_config
from dualloop.train import checkpoint as ckpt_io

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """fp32 full weights of a DeepSpeed checkpoint directory (ZeRO-2 or ZeRO-3), trainable and frozen."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name, exclude_frozen_parameters=False)


def adopt_exported_parts(model, vlm_path: str | Path | None) -> bool:
    """For `model.preset: pretrained` built from an export's vlm/ + sam2/: the [SEG] projection from
    seg_projection.safetensors next to vlm/ (the preset starts it at random, right for an original checkpoint), and
    the trained [SEG]/<vp>/</vp> rows from the base embedding / LM head where export wrote them (the preset keeps
    those already, as the export's tokenizer holds the tokens; copied again here for exports of any age).
    Returns False, changing nothing, when vlm_path is not inside an export. Under ZeRO-3 every rank must call it."""
    import contextlib

    from safetensors.torch import load_file

    if vlm_path is None:
        return False
    root = Path(vlm_path).resolve().parent
    seg_file = root / "seg_projection.safetensors"
    if not ((root / "export.json").is_file() and seg_file.is_file()):
        return False
    seg = load_file(str(seg_file))
    embed, head = model.language_model.embed_tokens, model.vlm.lm_head
    rows = embed.rows
    fcs = dict(model.text_hidden_fcs.named_parameters())
    if set(seg) != set(fcs):
        raise ConfigError(f"{seg_file} does not fit the model's [SEG] projection ({sorted(seg)} vs {sorted(fcs)})")
    params = [rows.embed, embed.base.weight, head.base.weight, *fcs.values()]
    if rows.head is not None:
        params.append(rows.head)
    zero3 = [q for q in params if hasattr(q, "ds_id")]
    ctx = contextlib.nullcontext()
    if zero3:
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(zero3, modifier_rank=0)  # rank 0 writes, all ranks get it
    with ctx, torch.no_grad():
        ids = rows.token_ids.to(embed.base.weight.device)
        rows.embed.copy_(embed.base.weight[ids].to(rows.embed.dtype))
        if rows.head is not None:
            rows.head.copy_(head.base.weight[ids].to(rows.head.dtype))
        for name, q in fcs.items():
            q.copy_(seg[name].to(q.dtype))
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
        model = load_model(path)
    elif (path / "export.json").is_file() and (path / "vlm").is_dir() and (path / "sam2").is_dir():
        from dualloop.config import LoraConfig, ModelConfig

        origin = json.loads((path / "export.json").read_text()).get("converted_from")
        model = build_model(ModelConfig(preset="pretrained", vlm_path=str(path / "vlm"), sam2_path=str(path / "sam2"),
                                        dtype="float32", lora=LoraConfig(enabled=False),
                                        prompt_style="sa2va" if origin == "sa2va" else "dualloop"))
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
    """The fp32 model of `model_cfg` holding a consolidated state dict (of checkpoint `ckpt`), in eval mode."""
    from dualloop.model import build_model

    model = build_model(dataclasses.replace(model_cfg, dtype="float32"))
    _load_consolidated(model, state, ckpt)
    return model.eval()


def _load_consolidated(model: torch.nn.Module, state: dict, ckpt: Path) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ConfigError(f"{ckpt}: weights not in the model built from its config: {unexpected[:5]}")
    params = {n for n, _ in model.named_parameters()}
    missing_params = [k for k in missing if k in params]
    if missing_params:
        raise ConfigError(f"{ckpt}: the checkpoint lacks weights of the model: {missing_params[:5]}")


def merge_lora(module: torch.nn.Module) -> int:
    """Fold every PEFT LoRA layer into its base linear and put the base layer back in its place; returns the count."""
    from peft.tuners.lora import LoraLayer

    targets = [(name, m) for name, m in module.named_modules() if isinstance(m, LoraLayer)]
    for name, layer in targets:
        layer.merge(safe_merge=True)  # raises on non-finite merged weights
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, layer.get_base_layer())
    return len(targets)


def _unwrap_new_token_rows(model) -> None:
    """Write the trained new-token rows into the base embedding / LM head and restore the plain HF modules."""
    lm = model.language_model
    embed, head = lm.embed_tokens, model.vlm.lm_head
    rows = embed.rows
    with torch.no_grad():
        embed.base.weight[rows.token_ids] = rows.embed.to(embed.base.weight.dtype)
        if rows.head is not None:
            head.base.weight[rows.token_ids] = rows.head.to(head.base.weight.dtype)
    lm.embed_tokens = embed.base
    model.vlm.lm_head = head.base


def export(checkpoint: str | Path, out: str | Path, *, dtype: str = "float32", hf: bool = True) -> dict:
    from safetensors.torch import save_file

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
    state = consolidated_state_dict(ckpt)

    model_cfg = dataclasses.replace(cfg.model, dtype="float32")
    model = build_model(model_cfg)
    _load_consolidated(model, state, ckpt)
    merged = merge_lora(model.language_model) if cfg.model.lora.enabled else 0
    model.model_cfg = dataclasses.replace(model.model_cfg, lora=dataclasses.replace(model.model_cfg.lora,
                                                                                    enabled=False))
    model.to(DTYPES[dtype])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_pretrained(model, out)
    written = {"model": str(out), "lora_layers_merged": merged, "checkpoint": str(ckpt), "dtype": dtype}
    if hf:
        seg = {k: v.detach().contiguous() for k, v in model.text_hidden_fcs.state_dict().items()}
        save_file(seg, str(out / "seg_projection.safetensors"))
        _unwrap_new_token_rows(model)
        model.vlm.save_pretrained(str(out / "vlm"), safe_serialization=True)
        model.tokenizer.save_pretrained(str(out / "vlm"))
        model.sam2.save_pretrained(str(out / "sam2"), safe_serialization=True)
        written.update(vlm_path=str(out / "vlm"), sam2_path=str(out / "sam2"),
                       seg_projection=str(out / "seg_projection.safetensors"))
    (out / "export.json").write_text(json.dumps(written, indent=1))
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dualloop export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint step_* directory, or a run / checkpoints directory (its latest)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--no-hf", action="store_true", help="skip the transformers-format vlm/ and sam2/ directories")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        written = export(args.checkpoint, args.out, dtype=args.dtype, hf=not args.no_hf)
    except ConfigError as e:
        print(f"dualloop export: {e}", file=sys.stderr)
        return 2
    print(json.dumps(written, indent=1))
    return 0
