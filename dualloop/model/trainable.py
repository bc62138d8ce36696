"""Trainable parts: PEFT LoRA on every linear layer of the LLM, and requires_grad per component (ModelConfig.train).

Components (names match `ModelConfig.train` switches and `dualloop inspect` groups):
vision_encoder, projector, llm_base, llm_lora, new_token_rows, seg_projection, sam2_image_encoder, prompt_encoder,
mask_decoder. Each parameter belongs to exactly one component (tied weights are counted once).
"""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

COMPONENTS = ("vision_encoder", "projector", "llm_base", "llm_lora", "new_token_rows", "seg_projection",
              "sam2_image_encoder", "prompt_encoder", "mask_decoder")

# SAM2's "no memory" embedding is added to single-image embeddings as a constant (it stands for an empty memory
# bank in video tracking); it is never trained here.
ALWAYS_FROZEN = ("sam2.no_memory_embedding",)


def apply_lora(language_model: nn.Module, r: int, alpha: int, dropout: float) -> list[str]:
    """Inject PEFT LoRA adapters into every nn.Linear of the language model (in place); return the target names."""
    from peft import LoraConfig, inject_adapter_in_model

    if r <= 0:
        raise ValueError(f"model.lora.r must be positive, got {r}")
    targets = sorted({name.rsplit(".", 1)[-1] for name, m in language_model.named_modules()
                      if isinstance(m, nn.Linear)})
    if not targets:
        raise ValueError("the language model has no nn.Linear layers to put LoRA on")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    inject_adapter_in_model(config, language_model)
    return targets


def component_of(name: str) -> str:
    """Component of a parameter of DualLoopModel, by its qualified name."""
    if name.startswith("vlm."):
        if ".rows." in name:
            return "new_token_rows"
        # InternVL: vision_tower + multi_modal_projector; Qwen-VL: visual, whose merger (and Qwen3-VL's DeepStack
        # mergers) is the projector
        if name.startswith(("vlm.model.multi_modal_projector.", "vlm.model.visual.merger.",
                            "vlm.model.visual.deepstack_merger_list.")):
            return "projector"
        if name.startswith(("vlm.model.vision_tower.", "vlm.model.visual.")):
            return "vision_encoder"
        if ".lora_" in name:
            return "llm_lora"
        return "llm_base"
    if name.startswith("text_hidden_fcs."):
        return "seg_projection"
    if name.startswith("sam2.prompt_encoder."):
        return "prompt_encoder"
    if name.startswith("sam2.mask_decoder."):
        return "mask_decoder"
    if name.startswith("sam2."):  # vision_encoder.*, no_memory_embedding (added to the image embedding)
        return "sam2_image_encoder"
    raise ValueError(f"parameter {name!r} belongs to no known component")


def parameters_by_component(model: nn.Module) -> "OrderedDict[str, list[tuple[str, nn.Parameter]]]":
    groups: OrderedDict[str, list] = OrderedDict((c, []) for c in COMPONENTS)
    for name, p in model.named_parameters():  # shared (tied) parameters appear once
        groups[component_of(name)].append((name, p))
    return groups


def set_trainable(model: nn.Module, train_cfg) -> None:
    """requires_grad per component from `train_cfg` (a TrainablePartsConfig)."""
    for comp, params in parameters_by_component(model).items():
        flag = bool(getattr(train_cfg, comp))
        for name, p in params:
            p.requires_grad_(flag and name not in ALWAYS_FROZEN)


def numel(p: nn.Parameter) -> int:
    """Full element count, also of a ZeRO-3 partitioned parameter."""
    return int(getattr(p, "ds_numel", p.numel()))
