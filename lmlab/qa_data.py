"""Question-answering data: SQuAD's JSON format (``data[].paragraphs[].qas[]``, answers as
``{"text", "answer_start"}``: SQuAD, XQuAD, CMRC 2018), or JSON lines of
``{"question", "context"}`` with optional ``answers`` (a list of texts, a list of
``{"text", "answer_start"}``, or Hugging Face datasets' ``{"text": [...], "answer_start": [...]}``).

An answer whose ``answer_start`` does not point at its text in the context is dropped; a
question left with no answer, or with an empty question or context, is skipped; each kind
gets one warning naming the first few ids and counting them all (``strict=True``: an error
instead)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from lmlab.errors import LmlabError
from lmlab.messages import warn
from lmlab.pairs import _existing_file, _kind, read_lines


@dataclass
class QAExample:
    id: str
    question: str
    context: str
    answers: list[str] = field(default_factory=list)  # the reference texts (empty: unanswerable / unknown)
    starts: list[int | None] = field(default_factory=list)  # each answer's character offset, if given


def read_qa(spec: str | os.PathLike, strict: bool = False, check_offsets: bool = True) -> list[QAExample]:
    """The questions of ``spec``. ``check_offsets=False`` keeps every answer text whatever its
    answer_start says (scoring needs only the texts, as the official scripts read them)."""
    path = _existing_file(spec, "--data")
    if _kind(path) == "jsonl":
        raw = [_jsonl_record(line, path, n) for n, line in enumerate(read_lines(path), start=1) if line.strip()]
    else:
        text = "\n".join(read_lines(path))
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise LmlabError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); give SQuAD-format JSON or JSON lines") from None
        raw = _squad_records(doc, path)
    examples: list[QAExample] = []
    broken: dict[str, list[str]] = {}  # why -> ids
    for r in raw:
        ex = _example(r, path)
        if not ex.question.strip() or not ex.context.strip():
            broken.setdefault("the question or the context is empty", []).append(ex.id)
            continue
        good = [(a, s) for a, s in zip(ex.answers, ex.starts)
                if s is None or not check_offsets or (s >= 0 and ex.context[s : s + len(a)] == a)]  # fmt: skip
        if len(good) < len(ex.answers):  # a broken answer is dropped; a question with none left, skipped
            why = "answer_start does not point at the answer's text in the context"
            broken.setdefault(why + (" (those answers dropped)" if good else ""), []).append(ex.id)
            if not good:
                continue
            ex.answers, ex.starts = [a for a, _ in good], [s for _, s in good]
        examples.append(ex)
    for why, ids in broken.items():
        what = f"{len(ids)} question{'s' if len(ids) > 1 else ''} of {path} (id {', '.join(ids[:3])}"
        what += f" and {len(ids) - 3} more)" if len(ids) > 3 else ")"
        if strict:
            raise LmlabError(f"{what}: {why}; fix them (or drop --strict to skip them)")
        warn(f"{what}: {why}" + ("" if why.endswith("dropped)") else "; skipped"))
    if not examples:
        raise LmlabError(f"{path} holds no usable question (expected SQuAD-format JSON or JSON lines of {{question, context}})")
    return examples


def _jsonl_record(line: str, path: Any, n: int) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise LmlabError(f"{path} line {n} is not valid JSON ({e.msg} at column {e.colno}); fix or remove it") from None
    if not isinstance(obj, dict):
        raise LmlabError(f"{path} line {n} is a JSON {type(obj).__name__}, not an object with question and context")
    return {"id": str(obj.get("id", n)), **obj, "_where": f"line {n}"}


def _squad_records(doc: Any, path: Any) -> list[dict]:
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise LmlabError(f"{path} is not in SQuAD format (a top-level \"data\" list of articles with paragraphs)")
    out = []
    for a, article in enumerate(doc["data"]):
        for p, para in enumerate((article or {}).get("paragraphs", []) if isinstance(article, dict) else []):
            if not isinstance(para, dict):
                continue
            for q in para.get("qas", []) or []:
                if isinstance(q, dict):
                    qid = str(q.get("id", f"{a}.{p}"))
                    out.append({**q, "id": qid, "context": para.get("context"), "_where": f"question {qid}"})
    return out


def _example(r: dict, path: Any) -> QAExample:
    where = f"{path} {r.get('_where', '')}".strip()
    q, c = r.get("question"), r.get("context")
    for name, v in (("question", q), ("context", c)):
        if not isinstance(v, str):
            raise LmlabError(f"{where} has no {name} text; every record needs a question and a context")
    answers, starts = _answers(r.get("answers", r.get("answer")), where)
    return QAExample(str(r.get("id")), q, c, answers, starts)


def _answers(a: Any, where: str) -> tuple[list[str], list[int | None]]:
    if a is None:
        return [], []
    if isinstance(a, str):
        return [a], [None]
    if isinstance(a, dict) and isinstance(a.get("text"), list):  # datasets' columnar form
        texts, st = a["text"], a.get("answer_start") or [None] * len(a["text"])
        a = [{"text": t, "answer_start": s} for t, s in zip(texts, st)]
    if not isinstance(a, list):
        raise LmlabError(f"{where}: answers must be a list (of texts or {{text, answer_start}})")
    texts, starts = [], []
    for x in a:
        text, start = (x, None) if isinstance(x, str) else (x.get("text"), x.get("answer_start")) if isinstance(x, dict) else (None, None)
        if not isinstance(text, str):
            raise LmlabError(f"{where}: an answer has no text")
        if start is not None and (isinstance(start, bool) or not isinstance(start, int)):
            raise LmlabError(f"{where}: answer_start must be a character offset (an integer), not {start!r}")
        texts.append(text)
        starts.append(start)
    return texts, starts


__all__ = ["QAExample", "read_qa"]
