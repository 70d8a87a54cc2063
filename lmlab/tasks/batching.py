"""What every encoder pipeline does before the model: tokenize with the model's own
tokenizer (its post-processor adds [CLS]/[SEP] or <s>/</s>), cut what is too long with one
warning, pad right into batches of similar length."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from tokenizers import Encoding, Tokenizer

from lmlab.errors import LmlabError
from lmlab.tokenizer import truncating


def task_tokenizer(model: Any, max_length: int | None = None, stride: int = 0, strategy: str = "longest_first") -> Tokenizer:
    """A copy of the model's tokenizer that truncates to ``max_length`` (the pipelines' own
    settings, never the caller's tokenizer's state)."""
    tok = model.tokenizer
    if not hasattr(tok, "to_str"):
        raise LmlabError("this model's tokenizer is a SentencePiece pair (Marian); it has no classifier or QA head")
    return truncating(tok, max_length, stride, strategy)


def pad_id_of(model: Any) -> int:
    """Any id the body can embed: padding is masked out (the model's pad, else [PAD]/<pad>, else 0)."""
    pad = model.generation_config.get("pad_token_id")
    if isinstance(pad, int) and 0 <= pad < model.config.vocab_size:
        return pad
    for name in ("[PAD]", "<pad>"):
        i = model.tokenizer.token_to_id(name)
        if i is not None and i < model.config.vocab_size:
            return i
    return 0


def padded(encodings: Sequence[Encoding], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` (1 = real) and ``token_type_ids`` (B, T)."""
    T = max(len(e.ids) for e in encodings)
    B = len(encodings)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    types = torch.zeros(B, T, dtype=torch.long)
    for b, e in enumerate(encodings):
        n = len(e.ids)
        ids[b, :n] = torch.tensor(e.ids, dtype=torch.long)
        mask[b, :n] = 1
        types[b, :n] = torch.tensor(e.type_ids, dtype=torch.long)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "token_type_ids": types.to(device)}


def positive_int(value: Any, name: str) -> int:
    """``value`` if it is an integer >= 1, else a one-line error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LmlabError(f"{name} must be a positive integer, not {value!r}")
    return value


def batches(n: int, lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Row indices in batches of ``batch_size``, longest first (little padding per batch)."""
    positive_int(batch_size, "batch_size")
    order = sorted(range(n), key=lambda i: -lengths[i])
    for lo in range(0, n, batch_size):
        yield order[lo : lo + batch_size]


def check_texts(inputs: Any, what: str = "text") -> tuple[list[Any], bool]:
    """(items, single): a str (or one dict) is one input, a list several; empty texts refused."""
    single = not isinstance(inputs, list)
    items = [inputs] if single else inputs
    for i, x in enumerate(items):
        text = x.get("text") if isinstance(x, dict) else x
        if not isinstance(text, str):
            got = type(text).__name__
            raise LmlabError(f"each {what} must be a str (or {{'text', 'text_pair'}}); input {i + 1} is {got}")
        if isinstance(x, dict) and not isinstance(x.get("text_pair", ""), str):
            raise LmlabError(f"input {i + 1}: text_pair must be a str, not {type(x['text_pair']).__name__}")
        if not text.strip():
            raise LmlabError(f"input {i + 1} is an empty {what}; give a non-empty text to each input")
    return items, single


__all__ = ["batches", "check_texts", "pad_id_of", "padded", "positive_int", "task_tokenizer"]
