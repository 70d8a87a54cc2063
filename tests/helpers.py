"""Tiny lmlab checkpoints for tests, built in a fraction of a second.

A test that needs "a model on disk" should not train one: a randomly initialised
Transformer exercises the same loading, decoding and CLI code. The three tokenizer
kinds differ in how ids become text, which is what generation tests care about:

- char: one token per code point, joined with nothing (``decoders.Fuse``);
- bpe: byte-level BPE, where one Chinese character may span several byte tokens;
- word: WordLevel over whitespace-split words, decoded by joining words with spaces.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from lmlab.checkpoint import write_checkpoint
from lmlab.config import TransformerConfig
from lmlab.models.transformer import Transformer
from lmlab.tokenizer import EOT, train_bpe_tokenizer, train_char_tokenizer

#: Training text for the tokenizers: ASCII prose, punctuation, and Chinese (3 UTF-8 bytes each).
#: A few KB of text for training runs in tests (tests never read ../shared).
SHAKESPEARE_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n\n"
    "All:\nResolved. resolved.\n\n"
) * 40

TOKENIZER_TEXT = (
    "To be, or not to be, that is the question:\n"
    "Whether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune.\n"
    "学而时习之，不亦说乎？有朋自远方来，不亦乐乎？\n"
) * 8

TOKENIZER_KINDS = ("char", "bpe", "word")


def char_tokenizer(text: str = TOKENIZER_TEXT) -> Tokenizer:
    return train_char_tokenizer([text])


def bpe_tokenizer(text: str = TOKENIZER_TEXT, vocab_size: int = 300) -> Tokenizer:
    """Byte-level BPE with few merges, so most Chinese characters stay as 3 byte tokens."""
    return train_bpe_tokenizer([text], vocab_size=vocab_size)


def word_tokenizer(text: str = TOKENIZER_TEXT) -> Tokenizer:
    """WordLevel over ``Whitespace`` pre-tokens; the decoder joins the words with spaces
    (the WordPiece decoder without clean-up: words not starting with ``##`` get a space)."""
    words = sorted(set(w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)))
    vocab = {EOT: 0, "[UNK]": 1}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens([EOT, "[UNK]"])
    return tok


def make_tokenizer(kind: str) -> Tokenizer:
    return {"char": char_tokenizer, "bpe": bpe_tokenizer, "word": word_tokenizer}[kind]()


def tiny_model(
    vocab_size: int,
    *,
    pos: str = "learned",
    max_seq_len: int = 32,
    n_layer: int = 2,
    d_model: int = 32,
    n_head: int = 2,
    init_std: float = 0.3,
    seed: int = 0,
    **config: Any,
) -> Transformer:
    """A random Transformer in eval mode. ``init_std`` is larger than GPT-2's 0.02 so the
    logits are far from uniform: greedy choices are then not decided by rounding noise."""
    torch.manual_seed(seed)
    cfg = TransformerConfig(
        vocab_size=vocab_size,
        n_layer=n_layer,
        n_head=n_head,
        d_model=d_model,
        max_seq_len=max_seq_len,
        pos=pos,
        init_std=init_std,
        **config,
    )
    return Transformer(cfg).eval()


def tiny_checkpoint(
    folder: str | Path,
    kind: str = "char",
    *,
    generation_config: dict[str, Any] | None = None,
    tokenizer: Tokenizer | None = None,
    **model_options: Any,
) -> Path:
    """Write a random tiny checkpoint with a ``kind`` tokenizer into ``folder`` (new).

    The generation config defaults to a BOS token (``<|endoftext|>``) and no EOS, so a
    run always produces exactly ``max_new_tokens`` tokens unless a test asks otherwise.
    """
    tok = tokenizer or make_tokenizer(kind)
    model = tiny_model(tok.get_vocab_size(), **model_options)
    gen = {"bos_token_id": tok.token_to_id(EOT)} if generation_config is None else generation_config
    return write_checkpoint(folder, model, tok, gen)
