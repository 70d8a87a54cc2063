"""Labelled text for classification: ``text<TAB>label`` rows (``.tsv``; a first row
``text<TAB>label`` is a header) or JSON lines with a text and a label field, either
possibly gzip-compressed. Labels are any strings (``0``/``1``, ``positive``, ``好评``);
a JSON number is read as its text. Texts that are empty are skipped with one warning."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from lmlab.errors import LmlabError
from lmlab.messages import warn
from lmlab.pairs import _existing_file, _kind, read_lines


@dataclass
class Labeled:
    texts: list[str]
    labels: list[str]
    name: str = ""

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def label_set(self) -> list[str]:
        """The distinct labels, sorted (numbers numerically): ids do not depend on the rows' order."""
        return sorted(set(self.labels), key=_label_key)

    def head(self, n: int) -> Labeled:
        return Labeled(self.texts[:n], self.labels[:n], self.name)


def _label_key(label: str) -> tuple[int, float | str]:
    """Numbers in numeric order (0, 1, 2, 10), then other labels alphabetically."""
    try:
        return (0, float(label))
    except ValueError:
        return (1, label)


def read_labeled(spec: str | os.PathLike, text_field: str = "text", label_field: str = "label") -> Labeled:
    path = _existing_file(spec, "--data")
    suffixes = [x.lower() for x in path.suffixes if x.lower() != ".gz"]
    last = suffixes[-1] if suffixes else ""
    if last == ".csv":
        raise LmlabError(f"{path} is a .csv file; lmlab reads text<TAB>label .tsv files or JSON lines (.jsonl): "
                         "save it with tab separators")  # fmt: skip
    kind = "jsonl" if last == ".json" else _kind(path)  # datasets' to_json writes JSON lines as .json
    rows = _jsonl(path, text_field, label_field) if kind == "jsonl" else _tsv(path, text_field, label_field)
    empty = sum(1 for t, _ in rows if not t.strip())
    if empty:
        warn(f"{path}: {empty} of {len(rows)} rows have an empty text; they were skipped")
    rows = [(t, lab) for t, lab in rows if t.strip()]
    if not rows:
        raise LmlabError(f"{path} holds no labelled text (expected text<TAB>label rows, or JSON lines)")
    return Labeled([t for t, _ in rows], [lab for _, lab in rows], str(spec))


def _tsv(path: Path, text_field: str, label_field: str) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for n, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 2:
            raise LmlabError(
                f"{path} line {n} has {len(fields)} tab-separated field{'s' if len(fields) != 1 else ''}; "
                "a row is text<TAB>label (a label column is missing, or the text holds a tab)"
            )
        if n == 1 and [f.strip().lower() for f in fields] in (["text", "label"], [text_field, label_field], ["sentence", "label"]):
            continue
        label = fields[1].strip()
        if not label:
            raise LmlabError(f"{path} line {n} has an empty label; give each row a label")
        rows.append((fields[0], label))
    return rows


def _jsonl(path: Path, text_field: str, label_field: str) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for n, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise LmlabError(f"{path} line {n} is not valid JSON ({e.msg} at column {e.colno}); fix or remove it") from None
        if not isinstance(obj, dict):
            raise LmlabError(f"{path} line {n} is a JSON {type(obj).__name__}, not an object with {text_field!r} and {label_field!r}")
        for f in (text_field, label_field):
            if f not in obj:
                keys = ", ".join(repr(k) for k in obj) or "none"
                raise LmlabError(
                    f"{path} line {n} has no field {f!r} (its keys: {keys}); name the fields with "
                    "--text-field and --label-field"
                )
        text, label = obj[text_field], obj[label_field]
        if not isinstance(text, str):
            raise LmlabError(f"{path} line {n}: {text_field!r} is a JSON {type(text).__name__}, not a string")
        if isinstance(label, bool) or not isinstance(label, (str, int, float)) or not str(label).strip():
            raise LmlabError(f"{path} line {n}: {label_field!r} must be a non-empty string or a number (got {label!r})")
        rows.append((text, str(label).strip()))
    return rows


__all__ = ["Labeled", "read_labeled"]
