"""InternLM2 (Sa2VA-8B, -26B) as transformers' Llama: the config, the weights (fused wqkv split per KV-head group,
w1/w3/w2 -> gate/up/down; the same rotate-half RoPE) and the remote-code InternLM2Tokenizer rebuilt with the
`tokenizers` library from its sentencepiece model (no sentencepiece, no remote code). Used by convert_sa2va."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from dualloop.config import ConfigError

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
def llama_config(llm: dict):
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


def to_llama_weights(key: str, name: str, value: torch.Tensor, text_config) -> dict[str, torch.Tensor]:
    """One InternLM2 weight (`name`: the key after "language_model.") -> its Llama weight(s)."""
    if ".attention.wqkv." in name:
        qkv = split_wqkv(value, text_config.num_attention_heads, text_config.num_key_value_heads, key)
        return {name.replace(".attention.wqkv.", f".self_attn.{p}_proj."): t for p, t in zip("qkv", qkv)}
    for pattern, repl in _INTERNLM2_RENAMES:
        name = re.sub(pattern, repl, name)
    return {name: value}


_SPM_NORMAL, _SPM_USER_DEFINED = 1, 4  # sentencepiece_model.proto piece types
# transformers' PreTrainedTokenizerBase.clean_up_tokenization, which InternLM2Tokenizer applies on every decode
_CLEAN_UP = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]


def _spm_problems(proto, added: dict[int, dict]) -> list[str]:
    """What of a sentencepiece model `rebuild_tokenizer` would not reproduce. The rest was compared with the real
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


def rebuild_tokenizer(src: Path, tcfg: dict):
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
