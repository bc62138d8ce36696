"""`dualloop convert-sa2va --checkpoint DIR --out DIR`: a released Sa2VA checkpoint (the Hugging Face format of
ByteDance's Sa2VA: `Sa2VAChatModel`, InternViT + an LLM + SAM2) -> the directories `model.preset: pretrained` loads:

    OUT/vlm/                        transformers InternVL ("-hf" layout) with Sa2VA's tokenizer ([SEG], <vp>, </vp>
                                    already in it, so their trained rows are kept)  -> model.vlm_path
    OUT/sam2/                       transformers Sam2Model (image encoder, prompt encoder, mask decoder)
                                                                                     -> model.sam2_path
    OUT/seg_projection.safetensors  Sa2VA's trained [SEG] projection (text_hidden_fcs), adopted by the preset
    OUT/export.json                 what was written, the SAM2 memory weights left out, the overrides to train with
                                    (the model settings of Sa2VA's training and inference, SA2VA_MODEL: its
                                    prompt text, 12 tiles, bicubic SAM2 input, no object-score gate)

Supported: Sa2VA models whose LLM is a transformers class with the standard layout (Qwen2/Qwen2.5, Qwen3, Llama:
Sa2VA-1B, -4B, the InternVL3-based ones) or InternLM2 (Sa2VA-8B, -26B). transformers has no InternLM2 class, but
InternLM2 is Llama with fused weights, so it becomes `LlamaForCausalLM` (as transformers' own InternVL conversion and
InternLM's tools/convert2llama.py do): wqkv split per KV-head group, w1/w3/w2 -> gate/up/down, same rotate-half RoPE.
Its tokenizer is remote code over sentencepiece; it is rebuilt from `tokenizer.model` with the `tokenizers` library
(`internlm2.rebuild_tokenizer`), or taken from `--tokenizer DIR`. Phi3- and Qwen-VL-based releases raise an error
naming the architecture. Nothing is downloaded; the checkpoint's remote code is not run.
The vision renames follow the InternVL -> InternVL-hf layout (InternViT's fused qkv split into q/k/v; InternViT-6B's
q_norm/k_norm keep their names).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from dualloop.config import ConfigError, pretrained_overrides
from dualloop.files import check_new_output, staged_directory

from . import internlm2
from .internlm2 import to_llama_weights as internlm2_weights

PREFIX_VISION = "vision_model."
PREFIX_LLM = "language_model."
PREFIX_PROJECTOR = "mlp1."
PREFIX_SAM2 = "grounding_encoder.sam2_model."
PREFIX_SEG = "text_hidden_fcs."
# The model settings of Sa2VA's own training and inference (`model.*`): its prompt text; its predict_forward tiles every
# image into at most 12 tiles + a thumbnail (max_dynamic_patch, whatever the config says), as its training data did;
# its DirectResize to SAM2's 1024 is PIL's default, bicubic; its `_forward_sam_heads` override has SAM2's "no object ->
# logits -1024" rule commented out, so no mask is emptied by the object score.
SA2VA_MODEL = {"prompt_style": "sa2va", "max_tiles": 12, "sam2_resize": "bicubic", "object_gate": False}
INTERNLM2 = "InternLM2ForCausalLM"
# InternLM2 has no transformers class: its weights are renamed into Llama's (convert_vlm_state)
SUPPORTED_LLMS = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", "LlamaForCausalLM": "llama",
                  INTERNLM2: "llama"}

# InternViT (original) -> InternVLVisionModel, applied in order on the key after "vision_model."
_VISION_RENAMES = [
    (r"^embeddings\.class_embedding$", "embeddings.cls_token"),
    (r"^embeddings\.patch_embedding\.", "embeddings.patch_embeddings.projection."),
    (r"^embeddings\.position_embedding$", "embeddings.position_embeddings"),
    (r"^encoder\.layers\.", "encoder.layer."),
    (r"\.attn\.proj\.", ".attention.projection_layer."),
    (r"\.attn\.", ".attention."),
    (r"\.ls(\d)$", r".lambda_\1"),
    (r"\.norm1\.", ".layernorm_before."),
    (r"\.norm2\.", ".layernorm_after."),
]
# mlp1 = Sequential(LayerNorm, Linear, GELU, Linear)
_PROJECTOR_RENAMES = {"0": "layer_norm", "1": "linear_1", "3": "linear_2"}


def read_checkpoint(src: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json as a dict, all weights) of a Sa2VA checkpoint directory (safetensors, one file or shards)."""
    from safetensors.torch import load_file

    cfg_file = src / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"--checkpoint {src}: no config.json (expected a Sa2VA checkpoint directory)")
    cfg = json.loads(cfg_file.read_text())
    if "llm_config" not in cfg or "vision_config" not in cfg:
        raise ConfigError(f"{cfg_file}: not a Sa2VA config (model_type {cfg.get('model_type')!r}; expected "
                          "'sa2va_chat' with llm_config and vision_config)")
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"--checkpoint {src}: no *.safetensors files (only safetensors checkpoints are read)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return cfg, state


def llm_model_type(cfg: dict) -> str:
    arch = (cfg["llm_config"].get("architectures") or ["?"])[0]
    if arch not in SUPPORTED_LLMS:
        raise ConfigError(f"Sa2VA with a {arch} language model is not supported (supported: "
                          f"{', '.join(SUPPORTED_LLMS)}; e.g. Sa2VA-1B, -4B and the InternVL3-based releases)")
    return SUPPORTED_LLMS[arch]


def internvl_config(cfg: dict, image_token_id: int):
    """The transformers InternVLConfig equivalent to a Sa2VA config."""
    from transformers import AutoConfig, InternVLConfig, InternVLVisionConfig

    if cfg.get("ps_version", "v2") != "v2":
        raise ConfigError(f"ps_version {cfg.get('ps_version')!r}: only 'v2' pixel shuffle matches InternVL-hf")
    v = cfg["vision_config"]
    size = cfg.get("force_image_size") or v["image_size"]
    vision = InternVLVisionConfig(
        hidden_size=v["hidden_size"], num_hidden_layers=v["num_hidden_layers"],
        num_attention_heads=v["num_attention_heads"], intermediate_size=v["intermediate_size"],
        hidden_act=v.get("hidden_act", "gelu"), norm_type=v.get("norm_type", "rms_norm"),
        layer_norm_eps=v.get("layer_norm_eps", 1e-6), use_qk_norm=v.get("qk_normalization", False),
        attention_bias=v.get("qkv_bias", False), image_size=[size, size], patch_size=[v["patch_size"]] * 2,
        num_channels=v.get("num_channels", 3), layer_scale_init_value=v.get("initializer_factor", 0.1),
        use_absolute_position_embeddings=True,
    )
    if vision.use_qk_norm and vision.layer_norm_eps != 1e-6:  # InternVLVisionModel's q_norm/k_norm eps is fixed
        raise ConfigError(f"vision_config.layer_norm_eps {vision.layer_norm_eps} with qk_normalization: "
                          "transformers' InternVL vision q_norm/k_norm use 1e-6")
    kind = llm_model_type(cfg)
    if cfg["llm_config"]["architectures"][0] == INTERNLM2:
        text = internlm2.llama_config(cfg["llm_config"])
    else:
        llm = {k: x for k, x in cfg["llm_config"].items()
               if k not in ("_name_or_path", "auto_map", "architectures", "model_type", "transformers_version",
                            "_attn_implementation", "attn_implementation", "use_flash_attn", "torch_dtype")}
        text = AutoConfig.for_model(kind, **llm)
    ratio = cfg.get("downsample_ratio", 0.5)
    grid = int(size // v["patch_size"] * ratio)
    return InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=image_token_id, image_seq_length=grid * grid,
        downsample_ratio=ratio, projector_hidden_act="gelu", vision_feature_layer=cfg.get("select_layer", -1),
        vision_feature_select_strategy="default",
        tie_word_embeddings=bool(cfg["llm_config"].get("tie_word_embeddings", False)),
    )


def convert_vlm_state(state: dict[str, torch.Tensor], vision_hidden: int,
                      internlm2_config=None) -> dict[str, torch.Tensor]:
    """Sa2VA's vision_model.* / language_model.* / mlp1.* -> InternVLForConditionalGeneration keys.
    `internlm2_config`: the text config (LlamaConfig) when the LLM is InternLM2, whose weights are then renamed and
    split into Llama's."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(PREFIX_VISION):
            name = key[len(PREFIX_VISION):]
            for pattern, repl in _VISION_RENAMES:
                name = re.sub(pattern, repl, name)
            name = "model.vision_tower." + name
            if ".attention.qkv." in name:  # fused [q; k; v] rows
                if value.shape[0] != 3 * vision_hidden:
                    raise ConfigError(f"{key}: {tuple(value.shape)} is not a fused qkv of width {vision_hidden}")
                for part, chunk in zip("qkv", value.split(vision_hidden, dim=0)):
                    out[name.replace(".qkv.", f".{part}_proj.")] = chunk.contiguous()
                continue
            out[name] = value
        elif key.startswith(PREFIX_LLM):
            name = key[len(PREFIX_LLM):]
            renamed = ({name: value} if internlm2_config is None
                       else internlm2_weights(key, name, value, internlm2_config))
            for new, tensor in renamed.items():
                if new.startswith("model."):
                    out["model.language_model." + new[len("model."):]] = tensor
                elif new.startswith("lm_head."):
                    out[new] = tensor
                else:
                    raise ConfigError(f"{key}: unexpected language-model weight")
        elif key.startswith(PREFIX_PROJECTOR):
            index, _, rest = key[len(PREFIX_PROJECTOR):].partition(".")
            if index not in _PROJECTOR_RENAMES:
                raise ConfigError(f"{key}: unexpected projector weight")
            out[f"model.multi_modal_projector.{_PROJECTOR_RENAMES[index]}.{rest}"] = value
    return out


def split_state(state: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """(VLM weights, SAM2 weights without their prefix, [SEG] projection weights); any other key is an error."""
    vlm, sam2, seg = {}, {}, {}
    for key, value in state.items():
        if key.startswith((PREFIX_VISION, PREFIX_LLM, PREFIX_PROJECTOR)):
            vlm[key] = value
        elif key.startswith(PREFIX_SAM2):
            sam2[key[len(PREFIX_SAM2):]] = value
        elif key.startswith(PREFIX_SEG):
            seg[key[len(PREFIX_SEG):]] = value
        else:
            raise ConfigError(f"unexpected weight {key!r} in the Sa2VA checkpoint (not vision_model, "
                              "language_model, mlp1, grounding_encoder.sam2_model or text_hidden_fcs)")
    return vlm, sam2, seg


def _tokenizer_config(src: Path) -> dict:
    f = src / "tokenizer_config.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def load_tokenizer(src: Path, override: Path | None = None):
    """The release's tokenizer without its remote code: an InternLM2Tokenizer rebuilt
    (`internlm2.rebuild_tokenizer`), any other through AutoTokenizer; `override` (--tokenizer DIR) replaces it, if
    its added tokens have the release's ids."""
    from transformers import AutoTokenizer

    tcfg = _tokenizer_config(src)
    if override is None and str(tcfg.get("tokenizer_class", "")).startswith("InternLM2Tokenizer"):
        return internlm2.rebuild_tokenizer(src, tcfg)
    where = override or src
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(where), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the directory named
        raise ConfigError(f"{'--tokenizer' if override else '--checkpoint'} {where}: cannot load its tokenizer: "
                          f"{e}") from e
    if override is not None:
        wrong = [(t["content"], int(i), tokenizer.convert_tokens_to_ids(t["content"]))
                 for i, t in (tcfg.get("added_tokens_decoder") or {}).items()
                 if tokenizer.convert_tokens_to_ids(t["content"]) != int(i)]
        if wrong:
            raise ConfigError(f"--tokenizer {override}: ids differ from the release's (token, release, given): "
                              f"{wrong[:5]}")
    return tokenizer


def _materialize(model_cls, config, state: dict[str, torch.Tensor], what: str):
    """A transformers model holding exactly `state` (built on the meta device, then assigned: no second copy)."""
    with torch.device("meta"):
        model = model_cls(config)
    expected = model.state_dict()
    # a tied LM head is the embedding: a checkpoint may or may not store it
    tied = {"lm_head.weight"} & set(expected) - set(state) if getattr(config, "tie_word_embeddings", False) else set()
    missing = [k for k in expected if k not in state and k not in tied]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ConfigError(f"{what}: the converted weights do not fit the model (missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]})")
    wrong = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in state.items() if v.shape != expected[k].shape]
    if wrong:
        raise ConfigError(f"{what}: shape mismatch (key, checkpoint, model): {wrong[:5]}")
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.tie_weights()
    return model


def convert(src: str | Path, out: str | Path, *, dtype: str | None = None,
            tokenizer: str | Path | None = None, overwrite: bool = False) -> dict:
    from safetensors.torch import save_file
    from transformers import InternVLForConditionalGeneration, Sam2Model

    from .convert_sam2 import convert_sam2_state_dict, detect_variant, sam2_config
    from .tokenizer import IMG_CONTEXT, NEW_SPECIAL_TOKENS

    src, out = Path(src), Path(out).absolute()
    if not src.is_dir():
        raise ConfigError(f"--checkpoint {src}: directory not found")
    check_new_output(out, overwrite, marker="export.json", what="a conversion")
    cfg, state = read_checkpoint(src)
    llm_model_type(cfg)  # an unsupported LLM fails before any work
    tokenizer = load_tokenizer(src, Path(tokenizer) if tokenizer is not None else None)
    vocab = tokenizer.get_vocab()
    absent = [t for t in (IMG_CONTEXT, *NEW_SPECIAL_TOKENS) if t not in vocab]
    if absent:
        raise ConfigError(f"{src}: the tokenizer lacks {absent} (not a Sa2VA tokenizer?)")
    if dtype is not None:
        cast = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        state = {k: v.to(cast) if v.is_floating_point() else v for k, v in state.items()}

    vlm_state, sam2_state, seg = split_state(state)
    if set(seg) != {"0.weight", "0.bias", "2.weight", "2.bias"}:
        raise ConfigError(f"{src}: text_hidden_fcs weights {sorted(seg)}; expected Linear, ReLU, Linear")
    config = internvl_config(cfg, vocab[IMG_CONTEXT])
    if len(tokenizer) > config.text_config.vocab_size:
        raise ConfigError(f"{src}: the tokenizer has {len(tokenizer)} ids, the LLM's embedding "
                          f"{config.text_config.vocab_size} rows")
    internlm2_config = config.text_config if cfg["llm_config"]["architectures"][0] == INTERNLM2 else None
    vlm_converted = convert_vlm_state(vlm_state, config.vision_config.hidden_size, internlm2_config)
    head, embed = vlm_converted.get("lm_head.weight"), vlm_converted.get("model.language_model.embed_tokens.weight")
    if config.tie_word_embeddings and head is not None and not torch.equal(head, embed):
        config.tie_word_embeddings = config.text_config.tie_word_embeddings = False  # a trained, separate head
    vlm = _materialize(InternVLForConditionalGeneration, config, vlm_converted, f"{src} (VLM)")
    sam2_converted, dropped = convert_sam2_state_dict(sam2_state)
    sam2 = _materialize(Sam2Model, sam2_config(detect_variant(sam2_state)), sam2_converted, f"{src} (SAM2)")
    if seg["2.weight"].shape[0] != sam2.config.mask_decoder_config.hidden_size:
        raise ConfigError(f"{src}: the [SEG] projection's output width {seg['2.weight'].shape[0]} is not SAM2's "
                          f"prompt width {sam2.config.mask_decoder_config.hidden_size}")

    written = {"source": str(src), "converted_from": "sa2va", "vlm_path": str(out / "vlm"),
               "sam2_path": str(out / "sam2"), "seg_projection": str(out / "seg_projection.safetensors"),
               "llm": cfg["llm_config"]["architectures"][0], "sam2_variant": detect_variant(sam2_state),
               "sam2_memory_weights_left_out": len(dropped), **SA2VA_MODEL,
               "train_with": pretrained_overrides(out, SA2VA_MODEL)}
    with staged_directory(out, what="a conversion") as stage:  # a full disk leaves nothing that looks complete
        vlm.save_pretrained(str(stage / "vlm"), safe_serialization=True)
        tokenizer.save_pretrained(str(stage / "vlm"))
        sam2.save_pretrained(str(stage / "sam2"), safe_serialization=True)
        save_file({k: v.contiguous() for k, v in seg.items()}, str(stage / "seg_projection.safetensors"))
        (stage / "export.json").write_text(json.dumps(written, indent=1))
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dualloop convert-sa2va", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a Sa2VA checkpoint directory (config.json, *.safetensors)")
    p.add_argument("--out", required=True, help="output directory (vlm/, sam2/, seg_projection.safetensors)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: as stored")
    p.add_argument("--tokenizer", default=None,
                   help="a tokenizer directory to use instead of the release's (its added tokens must have the "
                        "release's ids), e.g. where the InternLM2 tokenizer.model has settings not rebuilt here")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier conversion in --out (only once the new one is complete)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        written = convert(args.checkpoint, args.out, dtype=args.dtype, tokenizer=args.tokenizer,
                          overwrite=args.overwrite)
    except ValueError as e:  # ConfigError, and the SAM2 converter's errors
        print(f"dualloop convert-sa2va: {e}", file=sys.stderr)
        return 2
    print(json.dumps(written, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
