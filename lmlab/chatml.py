"""Chat-formatted training text: JSON lines of ``{"messages": [{"role", "content"}, ...]}``
written out in ChatML, the format ``lmlab serve`` renders for a model trained here:

    <|im_start|>system
    You are terse.<|im_end|>
    <|im_start|>user
    你好<|im_end|>
    <|im_start|>assistant
    你好！<|im_end|>

so a model trained on such a file learns to answer after ``<|im_start|>assistant`` and to end
its turn with ``<|im_end|>`` (where the server stops it). Conversations are separated by the
end-of-text token, as files are. (The same text as serve's default Jinja template: a test
holds them equal.)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from lmlab.errors import LmlabError

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ROLES = ("system", "developer", "user", "assistant", "tool")


def format_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """ChatML text of ``messages`` (roles and string contents already checked)."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def is_chat_file(path: Path) -> bool:
    """A .jsonl file whose first non-empty line is an object with a "messages" list."""
    if path.suffix != ".jsonl":
        return False
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    return isinstance(row, dict) and isinstance(row.get("messages"), list)
    except (OSError, ValueError):
        return False
    return False


def chat_texts(path: Path, eot: str) -> Iterator[str]:
    """Each conversation of a chat JSONL file in ChatML, followed by ``eot``; one line saying
    which line is wrong and why, otherwise."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {n}"
            try:
                row = json.loads(line)
            except ValueError as e:
                raise LmlabError(f"{where} is not JSON ({e.msg}); a chat file has one {{\"messages\": [...]}} per line") from None
            messages = row.get("messages") if isinstance(row, dict) else None
            if not isinstance(messages, list) or not messages:
                raise LmlabError(f"{where} has no \"messages\" list; each line is {{\"messages\": [{{\"role\", \"content\"}}, ...]}}")
            for k, m in enumerate(messages):
                if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                    raise LmlabError(f"{where}: messages[{k}] must have a role ({', '.join(ROLES)}) and a string content")
            yield format_chat(messages) + eot
