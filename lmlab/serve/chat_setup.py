"""Which chat template a served model uses, and with which special tokens and stop strings.

An imported model brings its own template (``chat_template.jinja`` or ``tokenizer_config.json``
in its folder), rendered as transformers renders it; a model trained here has none and gets
lmlab's documented default (ChatML's ``<|im_start|>role ... <|im_end|>``), which also stops
generation at ``<|im_end|>``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmlab.serve.chat import (
    DEFAULT_CHAT_TEMPLATE,
    DEFAULT_STOP,
    check_messages,
    read_chat_template,
    render_chat,
)

#: the tokenizer_config.json entries a template may read (transformers passes them all)
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


@dataclass
class ChatSetup:
    template: str
    special_tokens: dict[str, str] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)
    own: bool = False  # the model's own template (else lmlab's default)

    @classmethod
    def of(cls, model: Any) -> ChatSetup:
        origin = getattr(model.module, "hf_origin", None) or {}
        where = origin.get("path") or model.source  # a Hub id's local snapshot, else the folder given
        folder = Path(where) if where else None
        template = read_chat_template(folder) if folder is not None and folder.is_dir() else None
        if template is None:
            return cls(DEFAULT_CHAT_TEMPLATE, {}, list(DEFAULT_STOP), own=False)
        return cls(template, _special_tokens(folder), [], own=True)

    def render(self, messages: list[dict[str, Any]]) -> str:
        """The prompt text of ``messages`` (checked: a bad message is a one-line LmlabError)."""
        return render_chat(self.template, check_messages(messages), add_generation_prompt=True,
                           special_tokens=self.special_tokens)  # fmt: skip


def _special_tokens(folder: Path) -> dict[str, str]:
    path = folder / "tokenizer_config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        cfg = {}
    out = {}
    for name in SPECIAL_NAMES:
        value = cfg.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out[name] = value
    return out
