"""`dualloop convert-sa2va --checkpoint DIR --out DIR`: a released Sa2VA checkpoint (the Hugging Face format of
ByteDance's Sa2VA: `Sa2VAChatModel`, InternViT + an LLM + SAM2) -> the directories `model.preset: pretrained` loads:

    OUT/vlm/                        transformers InternVL ("-hf" layout) with Sa2VA's tokenizer ([SEG], <vp>, </vp>
                                    already in it, so their trained rows are kept)  -> model.vlm_path
    OUT/sam2/                       transformers Sam2Model (image encoder, prompt encoder, mask decoder)
                                                                                     -> model.sam2_path
    OUT/seg_projection.safetensors  Sa2VA's trained [SEG] projection (text_hidden_fcs), adopted by the preset
    OUT/export.json                 what was written, the SAM2 memory weights left out, the overrides to train with
                                    (`model.prompt_style=sa2va`: the prompt text Sa2VA was trained with)

Supported: Sa2VA models whose LLM is a transformers class with the standard layout (Qwen2/Qwen2.5, Qwen3, Llama:
Sa2VA-1B, -4B, the InternVL3-based ones) or InternLM2 (Sa2VA-8B, -26B). transformers has no InternLM2 class, but
InternLM2 is Llama with fused weights, so it becomes `LlamaForCausalLM` (as transformers' own InternVL conversion and
InternLM's tools/convert2llama.py do): wqkv split per KV-head group, w1/w3/w2 -> gate/up/down, same rotate-half RoPE.
Its tokenizer is remote code over sentencepiece; it is rebuilt from `tokenizer.model` with the `tokenizers` library
(`internlm2_tokenizer`), or taken from `--tokenizer DIR`. Phi3- and Qwen-VL-based releases raise an error naming the
architecture. Nothing is downloaded; the checkpoint's remote code is not run.
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

from dualloop.config import ConfigError
from dualloop.files import check_new_output, staged_directory

PREFIX_VISION = "vision_model."
PREFIX_LLM = "language_model."
PREFIX_PROJECTOR = "mlp1."
PREFIX_SAM2 = "grounding_encoder.sam2_model."
PREFIX_SEG = "text_hidden_fcs."
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
# InternLM2 -> Llama, applied on the key after "language_model." (wqkv is split apart, see split_wqkv)
_INTERNLM2_RENAMES = [
    (r"^model\.tok_embeddings\.", "model.embed_tokens."),
    (r"\.attention\.wo\.", ".self_attn.o_proj."),
    (r"\.feed_forward\.w1\.", ".mlp.gate_proj."),
    (r"\.feed_forward\.w3\.", ".mlp.up_proj."),
    (r"\.feed_forward\.w2\.", ".mlp.down_proj."),
    (r"\.attention_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."),
    (r"^output\.", "lm_head."),
]
# InternLM2Config's defaults (Sa2VA/InternVL configuration_internlm2.py); note `bias` defaults to True there
_INTERNLM2_DEFAULTS = dict(vocab_size=103168, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                           num_attention_heads=32, hidden_act="silu", max_position_embeddings=2048,
                           initializer_range=0.02, rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                           tie_word_embeddings=False, bias=True, rope_theta=10000)
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
        text = internlm2_text_config(cfg["llm_config"])
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


def internlm2_text_config(llm: dict):
    """The LlamaConfig computing what InternLM2 (Sa2VA's llm_config) computes. Only InternLM2Config's own fields are
    read (the dict also holds every generic PretrainedConfig field); absent ones take InternLM2Config's defaults."""
    from transformers import LlamaConfig

    c = dict(_INTERNLM2_DEFAULTS, **{k: v for k, v in llm.items() if k in _INTERNLM2_DEFAULTS or k in (
        "num_key_value_heads", "rope_scaling")})
    heads = c["num_attention_heads"]
    kv_heads = c.get("num_key_value_heads") or heads
    if c["hidden_size"] % heads or heads % kv_heads:
        raise ConfigError(f"llm_config: hidden_size {c['hidden_size']}, num_attention_heads {heads}, "
                          f"num_key_value_heads {kv_heads} do not divide (InternLM2 needs both to)")
    rope = {"rope_type": "default", "rope_theta": float(c["rope_theta"])}
    scaling = c.get("rope_scaling")
    if scaling:
        # InternLM2's linear scaling divides positions by factor (= Llama's linear); its dynamic NTK rescales the base
        # to base * (factor * len / max_pos - (factor - 1)) ** (d / (d - 2)) past max_position_embeddings, the
        # formula of transformers' "dynamic" (same result up to max_position_embeddings; past it InternLM2 keeps the
        # grown base for later shorter calls, transformers goes back to the original one)
        kind, factor = scaling.get("type", scaling.get("rope_type")), scaling.get("factor")
        if kind not in ("linear", "dynamic") or not isinstance(factor, (int, float)) or factor < 1:
            raise ConfigError(f"llm_config.rope_scaling {scaling}: only InternLM2's 'linear' and 'dynamic' with a "
                              "factor >= 1 map onto transformers' Llama RoPE")
        rope = dict(rope, rope_type=kind, factor=float(factor))
    return LlamaConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"], num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=c["hidden_size"] // heads, hidden_act=c["hidden_act"],
        max_position_embeddings=c["max_position_embeddings"], initializer_range=c["initializer_range"],
        rms_norm_eps=c["rms_norm_eps"], pad_token_id=c["pad_token_id"], bos_token_id=c["bos_token_id"],
        eos_token_id=c["eos_token_id"], tie_word_embeddings=bool(c["tie_word_embeddings"]),
        attention_bias=bool(c["bias"]), mlp_bias=False,  # InternLM2: `bias` on wqkv and wo, never on the MLP
        rope_parameters=rope,
    )


def split_wqkv(value: torch.Tensor, heads: int, kv_heads: int, key: str) -> tuple[torch.Tensor, ...]:
    """InternLM2's fused wqkv rows (weight or bias) -> (q, k, v). The rows are grouped per KV head: each group holds
    its heads // kv_heads query heads, then its key head, then its value head (modeling_internlm2.py:
    rearrange(qkv, 'b q (h gs d) -> b q h gs d', gs=2 + heads // kv_heads), queries = [..., :gs-2, :] flattened
    '(h gs)', keys = [..., -2, :], values = [..., -1, :]); query head h * groups + g thus uses KV head h, as in Llama's
    repeat_kv."""
    groups = heads // kv_heads
    if value.shape[0] % (kv_heads * (groups + 2)):
        raise ConfigError(f"{key}: {tuple(value.shape)} is not a fused wqkv of {heads} query and {kv_heads} KV heads")
    head_dim = value.shape[0] // (kv_heads * (groups + 2))
    rest = tuple(value.shape[1:])
    rows = value.reshape(kv_heads, groups + 2, head_dim, *rest)
    q = rows[:, :groups].reshape(heads * head_dim, *rest)
    k = rows[:, groups].reshape(kv_heads * head_dim, *rest)
    v = rows[:, groups + 1].reshape(kv_heads * head_dim, *rest)
    return q.contiguous(), k.contiguous(), v.contiguous()


def _internlm2_to_llama(key: str, name: str, value: torch.Tensor, text_config) -> dict[str, torch.Tensor]:
    """One InternLM2 weight (`name`: the key after "language_model.") -> its Llama weight(s)."""
    if ".attention.wqkv." in name:
        qkv = split_wqkv(value, text_config.num_attention_heads, text_config.num_key_value_heads, key)
        return {name.replace(".attention.wqkv.", f".self_attn.{p}_proj."): t for p, t in zip("qkv", qkv)}
    for pattern, repl in _INTERNLM2_RENAMES:
        name = re.sub(pattern, repl, name)
    return {name: value}


def convert_vlm_state(state: dict[str, torch.Tensor], vision_hidden: int,
                      internlm2=None) -> dict[str, torch.Tensor]:
    """Sa2VA's vision_model.* / language_model.* / mlp1.* -> InternVLForConditionalGeneration keys. `internlm2`: the
    text config (LlamaConfig) when the LLM is InternLM2, whose weights are then renamed and split into Llama's."""
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
            renamed = {name: value} if internlm2 is None else _internlm2_to_llama(key, name, value, internlm2)
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


_SPM_NORMAL, _SPM_USER_DEFINED = 1, 4  # sentencepiece_model.proto piece types
# transformers' PreTrainedTokenizerBase.clean_up_tokenization, which InternLM2Tokenizer applies on every decode
_CLEAN_UP = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]


def _spm_problems(proto, added: dict[int, dict]) -> list[str]:
    """What of a sentencepiece model `internlm2_tokenizer` would not reproduce. The rest was compared with the real
    InternLM2Tokenizer on sentencepiece-trained BPE models: identity and nmt_nfkc rules, with and without dummy
    prefix, extra-whitespace removal, byte fallback, user-defined pieces."""
    t, n = proto.trainer_spec, proto.normalizer_spec
    problems = []
    if t.model_type != 2:
        problems.append(f"model_type {t.model_type} (only BPE, 2)")
    if t.treat_whitespace_as_suffix or not n.escape_whitespaces:
        problems.append("treat_whitespace_as_suffix / no escape_whitespaces")
    if proto.denormalizer_spec.precompiled_charsmap:
        problems.append("a denormalizer")
    user = [p.piece for i, p in enumerate(proto.pieces) if p.type == _SPM_USER_DEFINED and i not in added]
    if user and (n.add_dummy_prefix or n.remove_extra_whitespaces or n.precompiled_charsmap):
        problems.append(f"user-defined pieces {user[:3]} with a dummy prefix / whitespace removal / normalization")
    return problems


def internlm2_tokenizer(src: Path, tcfg: dict):
    """InternLM2Tokenizer (the release's remote code over sentencepiece) rebuilt with `tokenizers` so that it encodes
    the same ids, with no sentencepiece and no remote code. InternLM2Tokenizer = transformers' slow tokenizer split
    at the added tokens (tokenizer_config's added_tokens_decoder), then `sp.encode` of every piece of text between
    them (so a dummy prefix, if the model has one, starts every such piece), BOS (sentencepiece's bos id) in front
    when add_bos_token (default True), EOS behind when add_eos_token (default False); decoding = `sp.decode` (a
    leading space stays unless it is the model's dummy prefix) + clean_up_tokenization (" ." -> ".", always).
    The added tokens keep their ids: InternLM2's chat markers (<|im_start|> ...) sit on [UNUSED_TOKEN_*]
    pieces of the model and are renamed, InternVL's and Sa2VA's (<img>, <IMG_CONTEXT>, [SEG], <vp> ...) follow the
    pieces. Sentencepiece BPE = merges in piece-score order over the normal pieces, unknown characters as bytes."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import import_protobuf

    spm_file = src / "tokenizer.model"
    if not spm_file.is_file():
        raise ConfigError(f"--checkpoint {src}: no tokenizer.model for its InternLM2Tokenizer (or pass --tokenizer)")
    proto = import_protobuf().ModelProto()
    proto.ParseFromString(spm_file.read_bytes())
    added = {int(i): (t if isinstance(t, dict) else {"content": t})
             for i, t in (tcfg.get("added_tokens_decoder") or {}).items()}
    if not added:
        raise ConfigError(f"{src / 'tokenizer_config.json'}: no added_tokens_decoder (the ids of <|im_start|>, "
                          "<IMG_CONTEXT>, [SEG] ... are unknown); pass --tokenizer DIR")
    problems = _spm_problems(proto, added)
    if problems:
        raise ConfigError(f"{spm_file}: {'; '.join(problems)}: its tokenization is not reproduced here; pass "
                          "--tokenizer DIR with a tokenizer transformers loads that encodes like it (same ids)")

    pieces = [p.piece for p in proto.pieces]
    for i, a in added.items():
        if i < len(pieces):
            pieces[i] = a["content"]
    vocab = {p: i for i, p in enumerate(pieces)}
    if len(vocab) != len(pieces):
        twice = sorted({p for p in pieces if pieces.count(p) > 1})[:3]
        raise ConfigError(f"{spm_file}: pieces {twice} occur twice (after the added tokens' renames)")
    # sentencepiece merges the adjacent pair whose union is the best-scored normal piece; a ranked merge list
    # reproduces that (ties: lower id first)
    normal = {p.piece: (-p.score, i) for i, p in enumerate(proto.pieces) if p.type == _SPM_NORMAL and i not in added}
    ranked = sorted((rank, piece[:cut], piece[cut:]) for piece, rank in normal.items() for cut in range(1, len(piece))
                    if piece[:cut] in normal and piece[cut:] in normal)
    t, n = proto.trainer_spec, proto.normalizer_spec
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for _, a, b in ranked], unk_token=pieces[t.unk_id],
                               fuse_unk=True, byte_fallback=t.byte_fallback))
    steps = [normalizers.Precompiled(n.precompiled_charsmap)] if n.precompiled_charsmap else []
    if n.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(r"^ +| +$"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if n.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    steps += [decoders.Strip(" ", 1, 0)] if n.add_dummy_prefix else []
    tok.decoder = decoders.Sequence(steps + [decoders.Replace(a, b) for a, b in _CLEAN_UP])
    # the slow tokenizer splits the raw text at every added token, special or not
    news = []
    for i in sorted(added):
        a = added[i]
        token = AddedToken(a["content"], special=a.get("special", True), normalized=False,
                           lstrip=a.get("lstrip", False), rstrip=a.get("rstrip", False),
                           single_word=a.get("single_word", False))
        news.append((i, token))
    # sentencepiece matches user-defined pieces whole; without a dummy prefix that is splitting the text there
    news += [(i, AddedToken(p.piece, special=False, normalized=True)) for i, p in enumerate(proto.pieces)
             if p.type == _SPM_USER_DEFINED and i not in added]
    for i, token in sorted(news, key=lambda x: x[0]):
        (tok.add_special_tokens if token.special else tok.add_tokens)([token])
        if tok.token_to_id(token.content) != i:
            raise ConfigError(f"{src}: added token {token.content!r} has id {i}, but ids must follow the "
                              f"{len(pieces)} pieces without gaps")

    add_bos, add_eos = tcfg.get("add_bos_token", True), tcfg.get("add_eos_token", False)
    bos, eos = pieces[t.bos_id] if t.bos_id >= 0 else None, pieces[t.eos_id] if t.eos_id >= 0 else None
    if (add_bos and bos is None) or (add_eos and eos is None):
        raise ConfigError(f"{spm_file}: add_bos_token/add_eos_token but the model has no bos/eos piece")
    single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
    pair = single + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])  # InternLM2Tokenizer: no BOS before the 2nd text
    if add_eos:
        pair.remove(f"{eos}:0")
    tok.post_processor = processors.TemplateProcessing(
        single=" ".join(single), pair=" ".join(pair),
        special_tokens=[(x, vocab[x]) for x, on in ((bos, add_bos), (eos, add_eos)) if on])

    def named(key, default):
        v = tcfg.get(key, default)
        return v.get("content") if isinstance(v, dict) else v

    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=pieces[t.unk_id],
        pad_token=named("pad_token", "</s>"), clean_up_tokenization_spaces=False)


def load_tokenizer(src: Path, override: Path | None = None):
    """The release's tokenizer without its remote code: an InternLM2Tokenizer rebuilt (`internlm2_tokenizer`), any
    other through AutoTokenizer; `override` (--tokenizer DIR) replaces it, if its added tokens have the release's
    ids."""
    from transformers import AutoTokenizer

    tcfg = _tokenizer_config(src)
    if override is None and str(tcfg.get("tokenizer_class", "")).startswith("InternLM2Tokenizer"):
        return internlm2_tokenizer(src, tcfg)
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
    internlm2 = config.text_config if cfg["llm_config"]["architectures"][0] == INTERNLM2 else None
    vlm_converted = convert_vlm_state(vlm_state, config.vision_config.hidden_size, internlm2)
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
               "sam2_memory_weights_left_out": len(dropped),
               "train_with": f"model.preset=pretrained model.vlm_path={out / 'vlm'} model.sam2_path={out / 'sam2'} "
                             "model.prompt_style=sa2va"}
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
