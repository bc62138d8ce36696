"""Tokenizers: an offline word-level one for the random-weight presets, and the special tokens every model needs.

The random presets have no checkpoint tokenizer, so one is built here with the `tokenizers` library: lowercasing,
whitespace + punctuation split, a fixed vocabulary (special tokens, prompt words, the synthetic corpus's words,
digits and punctuation). Any other word maps to <unk>. `[SEG]`, `<vp>`, `</vp>` are added to every tokenizer as
single special ids (Sa2VA: tokenizing the text " [SEG]" yields several pieces and the [SEG] hidden state is lost).
"""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SEG_TOKEN = "[SEG]"
VP_START = "<vp>"
VP_END = "</vp>"
NEW_SPECIAL_TOKENS = (SEG_TOKEN, VP_START, VP_END)

# InternVL's image markers (the "-hf" checkpoints' tokenizers already hold them).
IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"

PAD, UNK, EOS = "<pad>", "<unk>", "</s>"
BASE_SPECIAL_TOKENS = (PAD, UNK, EOS, IMG_START, IMG_END, IMG_CONTEXT)

PROMPT_WORDS = (
    "please give me short description of region region1 segment it is there are part regions picture image "
    "this what the a an and in on at with object describe"
).split()
# Agreed with the synthetic-corpus writer (dualloop/data/synthetic.py): every caption uses only these words.
SYNTHETIC_WORDS = (
    "the a small large red green blue yellow circle square triangle on at in left right top bottom middle"
).split()
DIGITS = list("0123456789")
PUNCTUATION = list(".,;:!?'\"-()/")


def base_vocabulary() -> list[str]:
    """Ordered, de-duplicated vocabulary of the word-level tokenizer (before the new special tokens)."""
    seen: dict[str, None] = {}
    for word in (*BASE_SPECIAL_TOKENS, *PROMPT_WORDS, *SYNTHETIC_WORDS, *DIGITS, *PUNCTUATION):
        seen.setdefault(word, None)
    return list(seen)


def build_word_tokenizer(add_new: bool = True, extra_special: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """The offline tokenizer of the random-weight presets; [SEG], <vp>, </vp> are the last three ids
    (`add_new=False` leaves them out, as in a checkpoint's own tokenizer). extra_special: more special tokens after
    InternVL's image markers (another VLM family's)."""
    vocab = {word: i for i, word in enumerate(base_vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    # Whitespace() splits on \w+|[^\w\s]+; punctuation runs are split further so "circle." -> "circle", ".".
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, " ." -> "."
    # left padding as an init argument: saved with the tokenizer (an attribute set later is not), so batched
    # generation with the saved tokenizer pads as the model's own prompts do
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=UNK, pad_token=PAD, eos_token=EOS,
                                   padding_side="left")
    fast.add_tokens([IMG_START, IMG_END, IMG_CONTEXT, *extra_special], special_tokens=True)
    if add_new:
        add_new_special_tokens(fast)
    return fast


def add_new_special_tokens(tokenizer) -> list[int]:
    """Add [SEG], <vp>, </vp> as single special ids (idempotent); return their ids."""
    missing = [t for t in NEW_SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in NEW_SPECIAL_TOKENS]
    for token, i in zip(NEW_SPECIAL_TOKENS, ids):
        if i is None or i == tokenizer.unk_token_id or tokenizer.encode(token, add_special_tokens=False) != [i]:
            raise RuntimeError(f"tokenizer does not map {token!r} to a single id (got {i})")
    return ids


def special_id(tokenizer, token: str) -> int:
    """Id of a token that must exist in the tokenizer as one piece; a clear error otherwise."""
    i = tokenizer.convert_tokens_to_ids(token)
    if i is None or (tokenizer.unk_token_id is not None and i == tokenizer.unk_token_id and token != UNK):
        raise ValueError(f"tokenizer has no token {token!r} (needed for the VLM's image prompts)")
    return int(i)
