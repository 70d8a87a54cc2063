"""OpenAI's response shapes: completions, chat completions, their stream chunks, log-probabilities.

Pure functions of what the engine produced, so each shape is tested on its own. The token
strings of log-probabilities are each token decoded alone; ``bytes`` (chat) are its UTF-8
bytes — for a byte-level BPE token that holds part of a character, the raw bytes of that part
(OpenAI's convention), so a client can join them back into the character.
"""

from __future__ import annotations

import time
import uuid
from typing import Any


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def token_bytes(tokenizer: Any, token_id: int) -> list[int]:
    """The UTF-8 bytes a token stands for: a byte-level BPE token's own bytes (which may be
    part of a character), else its decoded text's."""
    piece = tokenizer.id_to_token(token_id) if hasattr(tokenizer, "id_to_token") else None
    if piece is not None and _is_byte_level(tokenizer):
        table = _byte_table()
        if all(ch in table for ch in piece):
            return [table[ch] for ch in piece]
    return list(token_text(tokenizer, token_id).encode("utf-8"))


def token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _is_byte_level(tokenizer: Any) -> bool:
    dec = getattr(tokenizer, "decoder", None)
    return dec is not None and "ByteLevel" in type(dec).__name__ + repr(dec)[:40]


_TABLE: dict[str, int] | None = None


def _byte_table() -> dict[str, int]:
    """GPT-2's printable stand-ins for the 256 byte values (the inverse of bytes_to_unicode)."""
    global _TABLE
    if _TABLE is None:
        keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
        chars, n = list(keep), 0
        for b in range(256):
            if b not in keep:
                keep.append(b)
                chars.append(256 + n)
                n += 1
        _TABLE = {chr(c): b for b, c in zip(keep, chars)}
    return _TABLE


def completion_logprobs(tokenizer: Any, items: list[tuple[int, float | None, list[tuple[int, float]] | None]],
                        start_offset: int) -> dict[str, Any]:  # fmt: skip
    """Completions' ``{tokens, token_logprobs, top_logprobs, text_offset}`` for (id, logprob, top)."""
    tokens, lps, tops, offsets = [], [], [], []
    offset = start_offset
    for tid, lp, top in items:
        text = token_text(tokenizer, tid)
        tokens.append(text)
        lps.append(lp)
        tops.append(None if top is None else {token_text(tokenizer, a): v for a, v in top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tokenizer: Any, items: list[tuple[int, float, list[tuple[int, float]]]]) -> dict[str, Any]:
    """Chat's ``{content: [{token, logprob, bytes, top_logprobs: [...]}]}``."""

    def one(tid: int, lp: float) -> dict[str, Any]:
        return {"token": token_text(tokenizer, tid), "logprob": lp, "bytes": token_bytes(tokenizer, tid)}

    return {"content": [{**one(t, lp), "top_logprobs": [one(a, v) for a, v in top]} for t, lp, top in items]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def completion(rid: str, model: str, created: int, choices: list[dict[str, Any]], use: dict[str, int]) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "usage": use, "system_fingerprint": None}  # fmt: skip


def chat_completion(rid: str, model: str, created: int, choices: list[dict[str, Any]], use: dict[str, int]) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": use, "system_fingerprint": None}  # fmt: skip


def chunk(rid: str, model: str, created: int, choices: list[dict[str, Any]], chat: bool,
          use: dict[str, int] | None = None) -> dict[str, Any]:  # fmt: skip
    out = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
           "model": model, "choices": choices, "system_fingerprint": None}  # fmt: skip
    if use is not None:
        out["usage"] = use
    return out


__all__ = ["chat_completion", "chat_logprobs", "chunk", "completion", "completion_logprobs", "new_id", "usage"]
