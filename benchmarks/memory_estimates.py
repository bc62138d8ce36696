"""Per-GPU model-state memory of the sa2va-1b-shape and a 4B-shape model on 8 x 80 GB, from DeepSpeed's estimators.

Parameters are counted on models built on the meta device (no memory, seconds): `sa2va-1b-shape` is the preset
(InternViT-300M + Qwen2.5-0.5B + SAM2-hiera-large); the 4B shape is InternVL-4B-like (InternViT-300M + a
Qwen2.5-3B-shaped LLM: hidden 2048, 36 layers, 16 heads, 2 KV heads, MLP 11008, vocab 151674, tied embeddings) +
SAM2-hiera-large, with the same LoRA / new-token rows / trainable parts as the presets (the Sa2VA recipe: LoRA r128
on every LLM linear, projector, [SEG] rows, text->prompt projection and SAM2 mask decoder trainable).

Two figures per setting:
- "DeepSpeed estimator": `estimate_zero2_model_states_mem_needs` / `estimate_zero3_model_states_mem_needs` with the
  total parameter count, i.e. DeepSpeed's assumption that every parameter is trained (bf16 weights + grads + fp32
  master weights and Adam moments);
- "Sa2VA recipe": the same estimators applied to the trainable parameters only, plus the frozen weights in bf16
  (2 bytes each: replicated under ZeRO-2, partitioned under ZeRO-3, on the CPU with parameter offload).
Both are model states only: activations, the caption phase's gathered weights and allocator slack come on top.

    python benchmarks/memory_estimates.py [--out benchmarks/results/memory_estimates.md] [--gpus 8] [--nodes 1]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

GIB = 2**30
QWEN25_3B_SHAPE = dict(
    model_type="qwen2", hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
    intermediate_size=11008, vocab_size=151674, max_position_embeddings=32768, rope_theta=1000000.0,
    rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu",
)
# (label, stage, optimizer offload, parameter offload)
SETTINGS = [
    ("ZeRO-2", 2, False, False),
    ("ZeRO-2 + optimizer offload", 2, True, False),
    ("ZeRO-3", 3, False, False),
    ("ZeRO-3 + optimizer offload", 3, True, False),
    ("ZeRO-3 + optimizer & param offload", 3, True, True),
]


def _meta_build_preset(preset: str):
    import torch

    from dualloop.config import ModelConfig
    from dualloop.model import build_model

    with torch.device("meta"):
        return build_model(ModelConfig(preset=preset))


def _meta_build_4b():
    """InternViT-300M + Qwen2.5-3B-shaped LLM + SAM2-hiera-large, assembled like the random presets."""
    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration, Sam2Config, Sam2Model

    from dualloop.config import ModelConfig
    from dualloop.model.build import _assemble
    from dualloop.model.presets import _random_specs
    from dualloop.model.tokenizer import build_word_tokenizer

    vision, _, sam2 = _random_specs("sa2va-1b-shape")  # InternViT-300M-448px and SAM2-hiera-large at 1024 px
    text = dict(QWEN25_3B_SHAPE)
    tokenizer = build_word_tokenizer()
    grid = (vision["image_size"] // vision["patch_size"]) // 2
    vlm_config = InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=grid * grid, downsample_ratio=0.5, tie_word_embeddings=True,
    )
    with torch.device("meta"):
        vlm = InternVLForConditionalGeneration._from_config(vlm_config, dtype=torch.bfloat16)
        sam = Sam2Model._from_config(Sam2Config(**sam2), dtype=torch.bfloat16)
        return _assemble(vlm, sam, tokenizer, ModelConfig(preset="sa2va-1b-shape"), torch.bfloat16, None, None,
                         rows_init=("random", set()))


def count_params(model) -> dict:
    """Total / trainable (shared weights once, by identity: meta tensors have no data pointers) and the largest
    number of parameters owned directly by one module (what ZeRO-3 gathers at once)."""
    unique = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in unique.values())
    trainable = sum(p.numel() for p in unique.values() if p.requires_grad)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    groups = {g["name"]: (g["params"], g["trainable_params"]) for g in model.parameter_groups()}
    return {"total": total, "trainable": trainable, "largest_layer": largest, "groups": groups}


def estimates(counts: dict, gpus: int, nodes: int) -> list[dict]:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    total, trainable, largest = counts["total"], counts["trainable"], counts["largest_layer"]
    frozen = total - trainable
    world = gpus * nodes
    rows = []
    for label, stage, opt_off, param_off in SETTINGS:
        if stage == 2:
            est = lambda n, off=opt_off: estimate_zero2_model_states_mem_needs(  # noqa: E731
                n, num_gpus_per_node=gpus, num_nodes=nodes, cpu_offload=off)
            cpu_all, gpu_all = est(total)
            cpu_tr, gpu_tr = est(trainable)
            frozen_gpu = 2 * frozen  # replicated bf16 weights
        else:
            est = lambda n, off=opt_off, poff=param_off: estimate_zero3_model_states_mem_needs(  # noqa: E731
                n, largest, num_gpus_per_node=gpus, num_nodes=nodes, cpu_offload=off, cpu_offload_params=poff)[:2]
            cpu_all, gpu_all = est(total)
            cpu_tr, gpu_tr = est(trainable)
            frozen_gpu = 0 if param_off else 2 * frozen // world  # partitioned bf16 weights
        rows.append({"setting": label, "gpu_all": gpu_all, "cpu_all": cpu_all, "gpu_recipe": gpu_tr + frozen_gpu})
    return rows


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f} M" if n >= 100_000 else f"{n / 1e3:.1f} K"


def markdown(models: dict[str, dict], gpus: int, nodes: int, gpu_gb: int) -> str:
    lines = [f"### Model-state memory per GPU, {nodes} node x {gpus} GPUs ({gpu_gb} GB each), DeepSpeed estimators",
             ""]
    lines.append("| model | total params | trainable (Sa2VA recipe) | largest layer |")
    lines.append("|---|---|---|---|")
    for name, m in models.items():
        c = m["counts"]
        lines.append(f"| {name} | {c['total'] / 1e9:.3f} B | {c['trainable'] / 1e6:.1f} M "
                     f"({100 * c['trainable'] / c['total']:.1f}%) | {c['largest_layer'] / 1e6:.1f} M |")
    lines += ["", "GiB per GPU (CPU: GiB per node, DeepSpeed's estimate incl. its 1.5x buffer factor).", "",
              "| setting | " + " | ".join(f"{n}: all params trained (DeepSpeed) | {n}: CPU/node | "
                                         f"{n}: Sa2VA recipe" for n in models) + " |",
              "|---|" + "---|---|---|" * len(models)]
    for i, (label, *_rest) in enumerate(SETTINGS):
        cells = []
        for m in models.values():
            r = m["rows"][i]
            cells += [f"{r['gpu_all'] / GIB:.2f}", f"{r['cpu_all'] / GIB:.1f}", f"{r['gpu_recipe'] / GIB:.2f}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Per component (params, trainable):", ""]
    for name, m in models.items():
        parts = ", ".join(f"{g} {_millions(p)}" + (f" ({_millions(t)} trainable)" if t else "")
                          for g, (p, t) in m["counts"]["groups"].items())
        lines.append(f"- {name}: {parts}")
    lines += ["", "Model states only: activations (bf16, activation checkpointing), the caption phase's gathered "
              "captioning weights (ZeRO-3, `caption.gather=once`) and allocator slack come on top. \"All params "
              "trained\" is DeepSpeed's estimator as documented (every parameter has bf16 grads and fp32 Adam "
              "states); \"Sa2VA recipe\" applies the same estimator to the trainable parameters and adds the frozen "
              "weights at 2 bytes each (replicated under ZeRO-2, partitioned under ZeRO-3, none on the GPU with "
              "parameter offload)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "memory_estimates.md"))
    ap.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpu-gb", type=int, default=80, help="memory per GPU (label only)")
    args = ap.parse_args(argv)
    if args.gpus < 1 or args.nodes < 1:
        ap.error("--gpus and --nodes must be >= 1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the estimators are arithmetic; no accelerator needed
    models = {}
    for name, build in (("sa2va-1b-shape", lambda: _meta_build_preset("sa2va-1b-shape")),
                        ("4B-shape", _meta_build_4b)):
        counts = count_params(build())
        models[name] = {"counts": counts, "rows": estimates(counts, args.gpus, args.nodes)}
    table = markdown(models, args.gpus, args.nodes, args.gpu_gb)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print(table)
    print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
