"""Extractive question answering: the answer is a span of the context.

The model scores every token as the answer's start and as its end. A context longer than
the model's window is read in overlapping windows (``doc_stride`` tokens shared by
neighbours), each [CLS] question [SEP] context-part [SEP]; in each window

    p_start = softmax(start logits over context tokens),  p_end likewise
    score(s, e) = p_start[s] · p_end[e]        for s ≤ e < s + max_answer_len

and the best spans over all windows win. A span becomes character offsets of the original
context (widened to whole words with ``align_to_words``), so that
``context[start:end] == answer`` — for Chinese too. ``handle_impossible_answer`` lets the
empty answer compete with score p_start[CLS]·p_end[CLS] (SQuAD 2.0). The options and their
defaults are Hugging Face v4's question-answering pipeline's, whose results this matches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tokenizers import Encoding

from lmlab.errors import LmlabError
from lmlab.eval.bleu import _HAN
from lmlab.messages import warn
from lmlab.tasks.batching import batches, pad_id_of, padded, positive_int, task_tokenizer
from lmlab.tasks.classify import require_head

DEFAULTS = {"top_k": 1, "doc_stride": None, "max_answer_len": 15, "max_question_len": 64,
            "handle_impossible_answer": False, "align_to_words": True}  # fmt: skip


@dataclass
class Window:
    """One [CLS] question [SEP] part-of-context [SEP] row and the example it belongs to."""

    example: int
    encoding: Encoding


def examples_of(args: tuple, question: Any, context: Any) -> tuple[list[dict[str, str]], bool]:
    """(examples, single) from qa(question=, context=), qa({...}), qa([{...}, ...]) or lists of each."""
    if len(args) == 2 and question is None and context is None:  # qa(question, context), as v4 accepted
        question, context = args
        args = ()
    if args:
        if len(args) > 1 or question is not None or context is not None:
            raise LmlabError("give qa(question=..., context=...), or one dict {question, context}, or a list of them")
        x = args[0]
        items, single = ([x], True) if isinstance(x, dict) else (x, False)
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise LmlabError("qa takes question=... and context=..., a dict {question, context}, or a list of dicts")
    else:
        if question is None or context is None:
            raise LmlabError("qa needs both a question and a context")
        if isinstance(question, list) or isinstance(context, list):
            qs = question if isinstance(question, list) else [question] * len(context)
            cs = context if isinstance(context, list) else [context] * len(qs)
            if len(qs) != len(cs):
                raise LmlabError(f"{len(qs)} questions but {len(cs)} contexts; give one context per question")
            items, single = [{"question": q, "context": c} for q, c in zip(qs, cs)], False
        else:
            items, single = [{"question": question, "context": context}], True
    for i, x in enumerate(items):
        for key in ("question", "context"):
            v = x.get(key)
            if not isinstance(v, str):
                raise LmlabError(f"example {i + 1} has no {key} text (got {type(v).__name__}); give {{question, context}}")
            if not v.strip():
                raise LmlabError(f"example {i + 1} has an empty {key}; give a non-empty {key}")
    return items, single or len(items) == 1


def decode_spans(
    start: np.ndarray, end: np.ndarray, top_k: int, max_answer_len: int, allowed: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``top_k`` spans (s, e) by p_start[s]·p_end[e], s ≤ e < s + max_answer_len, both ends
    on allowed tokens: (starts, ends, scores)."""
    outer = start[:, None] * end[None, :]  # (T, T): score of every (s, e)
    candidates = np.tril(np.triu(outer), max_answer_len - 1)  # keep s ≤ e ≤ s + max_answer_len - 1
    flat = candidates.flatten()
    if top_k == 1:
        idx = np.array([np.argmax(flat)])
    elif len(flat) < top_k:
        idx = np.argsort(-flat)
    else:
        part = np.argpartition(-flat, top_k)[:top_k]
        idx = part[np.argsort(-flat[part])]
    starts, ends = np.unravel_index(idx, candidates.shape)
    ok = allowed[starts] & allowed[ends] & (starts <= ends) & (ends < starts + max_answer_len)
    starts, ends = starts[ok], ends[ok]
    return starts, ends, candidates[starts, ends]


def widen_to_words(text: str, a: int, b: int) -> tuple[int, int]:
    """[a, b) grown to the whitespace-delimited words it touches; a Han character is a word of
    its own (Chinese has no spaces), so a span of Han characters stays as it is."""

    def inside(i: int) -> bool:
        return 0 <= i < len(text) and not text[i].isspace() and not _HAN.match(text[i])

    if a < b and inside(a):
        while inside(a - 1):
            a -= 1
    if a < b and inside(b - 1):
        while inside(b):
            b += 1
    while a < b and text[a].isspace():  # a span that began or ended on a space: the words alone
        a += 1
    while b > a and text[b - 1].isspace():
        b -= 1
    return a, b


class QuestionAnsweringPipeline:
    """``qa = lmlab.pipeline("question-answering", MODEL)``; ``qa(question=Q, context=C)``."""

    task = "question-answering"

    def __init__(self, model: Any, batch_size: int = 8, max_seq_len: int | None = None, **defaults: Any) -> None:
        require_head(model, "span", "question answering")
        self.model = model
        self.batch_size = positive_int(batch_size, "batch_size")
        self.defaults = {**DEFAULTS, **defaults}
        self.max_seq_len = self._window(max_seq_len)
        self.options({})  # a bad default fails here, not at the first question
        self.plain = task_tokenizer(model)
        tok = model.tokenizer
        cls = next((tok.token_to_id(t) for t in ("[CLS]", "<s>") if tok.token_to_id(t) is not None), None)
        self.cls_id = cls
        from lmlab.tokenizer import tokenizer_kind

        #: a character tokenizer makes every character a "word": whole words are then found in the text
        self.char_level = tokenizer_kind(tok) == "char"

    def _window(self, max_seq_len: Any) -> int:
        """The tokens of one window: 384 (or the model's length, if shorter), or ``max_seq_len``."""
        limit = self.model.config.max_seq_len
        if max_seq_len is None:
            return min(limit, 384)
        n = positive_int(max_seq_len, "max_seq_len")
        if n > limit:
            raise LmlabError(f"max_seq_len={n} is more than the model's {limit} positions")
        return n

    def options(self, given: dict[str, Any]) -> dict[str, Any]:
        opts = {**self.defaults, **{k: v for k, v in given.items() if v is not None}}
        unknown = sorted(set(opts) - set(DEFAULTS))
        if unknown:
            raise LmlabError(f"unknown question-answering option {unknown[0]} (options: {', '.join(DEFAULTS)})")
        for k in ("top_k", "max_answer_len", "max_question_len"):
            v = opts[k]
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise LmlabError(f"{k} must be a positive integer (got {v!r})")
        stride = opts["doc_stride"]
        if stride is None:  # transformers' default: half the window, at most 128
            opts["doc_stride"] = min(self.max_seq_len // 2, 128)
        elif not isinstance(stride, int) or isinstance(stride, bool) or stride < 0:
            raise LmlabError(f"doc_stride must be an integer >= 0 (got {stride!r})")
        return opts

    # ------------------------------------------------------------------ windows
    def _question(self, q: str, max_len: int) -> str:
        enc = self.plain.encode(q, add_special_tokens=False)
        if len(enc.ids) <= max_len:
            return q
        warn(f"a question of {len(enc.ids)} tokens was cut to its first {max_len} (max_question_len)")
        return q[: enc.offsets[max_len - 1][1]]

    def windows(self, examples: list[dict[str, str]], opts: dict[str, Any]) -> list[Window]:
        tok = task_tokenizer(self.model)
        specials = tok.num_special_tokens_to_add(True)
        out: list[Window] = []
        for i, ex in enumerate(examples):
            q = self._question(ex["question"], opts["max_question_len"])
            room = self.max_seq_len - len(self.plain.encode(q, add_special_tokens=False).ids) - specials
            if room <= opts["doc_stride"]:
                raise LmlabError(
                    f"the question leaves {max(room, 0)} of the model's {self.max_seq_len} tokens for the context, "
                    f"not more than doc_stride={opts['doc_stride']}: shorten the question or lower doc_stride"
                )
            tok.enable_truncation(self.max_seq_len, stride=opts["doc_stride"], strategy="only_second")
            enc = tok.encode(q, ex["context"])
            for w in [enc, *enc.overflowing]:
                out.append(Window(i, w))
        return out

    def logits(self, windows: list[Window], on_batch: Callable[[int], None] | None = None) -> list[np.ndarray]:
        """Each window's (T, 2) start/end logits."""
        module, pad = self.model.module, pad_id_of(self.model)
        out: list[np.ndarray] = [np.empty(0)] * len(windows)
        with torch.inference_mode():
            for rows in batches(len(windows), [len(w.encoding.ids) for w in windows], self.batch_size):
                batch = padded([windows[i].encoding for i in rows], pad, module.device)
                logits, _ = module(batch["input_ids"], attention_mask=batch["attention_mask"],
                                   token_type_ids=batch["token_type_ids"])  # fmt: skip
                for j, i in enumerate(rows):
                    out[i] = logits[j, : len(windows[i].encoding.ids)].float().cpu().numpy()
                if on_batch is not None:
                    on_batch(len(rows))
        return out

    # ------------------------------------------------------------------ answers
    def answers(self, context: str, windows: list[Window], logits: list[np.ndarray], opts: dict[str, Any]) -> list[dict]:
        found: list[dict[str, Any]] = []
        null = 1e6
        for w, lg in zip(windows, logits):
            e = w.encoding
            in_context = np.array([s == 1 for s in e.sequence_ids])  # a span lies in the context
            allowed = in_context.copy()  # ... and the softmax runs over it and [CLS] (the empty answer)
            if self.cls_id is not None:
                allowed |= np.array(e.ids) == self.cls_id
            lg = lg.astype(np.float64)  # float32 would round a far-behind token's probability to 0
            start = np.where(allowed, lg[:, 0], -10000.0)
            end = np.where(allowed, lg[:, 1], -10000.0)
            start = np.exp(start - start.max())
            start /= start.sum()
            end = np.exp(end - end.max())
            end /= end.sum()
            if opts["handle_impossible_answer"]:
                null = min(null, float(start[0] * end[0]))
            start[0] = end[0] = 0.0  # [CLS] is the empty answer, never a span's end
            starts, ends, scores = decode_spans(start, end, opts["top_k"], opts["max_answer_len"], in_context)
            for s, t, score in zip(starts, ends, scores):
                a, b = e.offsets[s][0], e.offsets[t][1]
                if opts["align_to_words"] and self.char_level:
                    a, b = widen_to_words(context, a, b)
                elif opts["align_to_words"]:
                    ws, we = e.token_to_word(int(s)), e.token_to_word(int(t))
                    cs = e.word_to_chars(ws, 1) if ws is not None else None
                    ce = e.word_to_chars(we, 1) if we is not None else None
                    if cs is not None and ce is not None:
                        a, b = cs[0], ce[1]
                while a < b and context[a].isspace():  # byte-level BPE offsets include the space before a word
                    a += 1
                while b > a and context[b - 1].isspace():
                    b -= 1
                found.append({"score": float(score), "start": int(a), "end": int(b), "answer": context[a:b]})
        if opts["handle_impossible_answer"]:
            found.append({"score": null, "start": 0, "end": 0, "answer": ""})
        found.sort(key=lambda x: x["score"], reverse=True)
        return found[: opts["top_k"]]

    def __call__(
        self, *args: Any, question: Any = None, context: Any = None,
        on_batch: Callable[[int], None] | None = None, **options: Any,
    ) -> dict | list:  # fmt: skip
        examples, single = examples_of(args, question, context)
        window = options.pop("max_seq_len", None)
        batch = options.pop("batch_size", None)
        saved = (self.max_seq_len, self.batch_size)
        try:
            if window is not None:
                self.max_seq_len = self._window(window)
            if batch is not None:
                self.batch_size = positive_int(batch, "batch_size")
            return self._answer(examples, single, self.options(options), on_batch)
        finally:
            self.max_seq_len, self.batch_size = saved

    def _answer(self, examples: list[dict[str, str]], single: bool, opts: dict[str, Any], on_batch: Any) -> dict | list:
        windows = self.windows(examples, opts)
        logits = self.logits(windows, on_batch)
        results: list[Any] = []
        for i, ex in enumerate(examples):
            mine = [k for k, w in enumerate(windows) if w.example == i]
            found = self.answers(ex["context"], [windows[k] for k in mine], [logits[k] for k in mine], opts)
            if not found:
                raise LmlabError(
                    f"example {i + 1}: no span of the context can be an answer (max_answer_len="
                    f"{opts['max_answer_len']}); give a longer context or pass handle_impossible_answer=True"
                )
            results.append(found[0] if len(found) == 1 else found)
        return results[0] if single else results


__all__ = ["DEFAULTS", "QuestionAnsweringPipeline", "decode_spans", "examples_of"]
