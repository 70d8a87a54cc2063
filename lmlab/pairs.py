"""Parallel text: (source, target) pairs for translation and summarization, and their batches.

Three forms of one thing, each possibly gzip-compressed (a ``.gz`` suffix):

- a ``.tsv`` file, ``source<TAB>target`` per line (an optional header row is skipped);
- a ``.jsonl`` file, one object per line with a source and a target field; the target
  field may name several comma-separated fields, the references of a multi-reference
  test set (``summary1,summary2``);
- two line-aligned plain text files (``train.en`` and ``train.de``), as WMT ships them.

Lines are split on ``\\n`` only, never with ``str.splitlines``: that also breaks at
U+2028, U+0085, form feeds and other characters that real corpora hold inside a sentence,
and would silently shift one file of a pair against the other. A file is read whole;
parallel corpora for this lab fit in memory.

Training batches group pairs of similar length (:func:`bucket_batches`) and pad them
on the right (:func:`pad_batch`).
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmlab.errors import LmlabError
from lmlab.messages import warn

#: Header rows (lower-cased) that a .tsv may start with; the field names are added per call.
TSV_HEADERS = {("source", "target"), ("src", "tgt")}


# --------------------------------------------------------------------------- the pairs
@dataclass
class Pairs:
    """Sources and targets, aligned by index.

    ``references``: every reference of each pair (``references[i][0] == targets[i]``)
    when the data names several target fields, else None; evaluation scores against all
    of them, training uses ``targets``. ``skipped``: pairs dropped for an empty side.
    """

    sources: list[str]
    targets: list[str]
    references: list[list[str]] | None = None
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.sources)

    def _take(self, idx: Sequence[int], skipped: int = 0) -> Pairs:
        refs = None if self.references is None else [self.references[i] for i in idx]
        return Pairs([self.sources[i] for i in idx], [self.targets[i] for i in idx], refs, skipped)

    def head(self, n: int) -> Pairs:
        """The first ``n`` pairs (all of them if there are fewer)."""
        return self._take(range(min(max(n, 0), len(self))))

    def split(
        self, valid_fraction: float, seed: int = 0, max_valid: int | None = None
    ) -> tuple[Pairs, Pairs]:
        """(train, valid): a held-out slice drawn at random by ``seed``, so the same seed
        always holds out the same pairs (and a resumed run validates on what it did before).

        n_valid = min(max(1, round(n · valid_fraction)), n - 1), capped by ``max_valid``:
        both parts keep at least one pair. Each part keeps the file's order.
        """
        n = len(self)
        if not 0 < valid_fraction < 1:
            raise LmlabError(
                f"the validation fraction must be between 0 and 1 (exclusive), not {valid_fraction}"
            )
        if n < 2:
            raise LmlabError(f"cannot hold out validation pairs from {n} pair; give at least 2 pairs")
        n_valid = min(max(1, round(n * valid_fraction)), n - 1)
        if max_valid is not None:
            n_valid = max(1, min(n_valid, max_valid))
        held = np.zeros(n, dtype=bool)
        held[np.random.default_rng(seed).permutation(n)[:n_valid]] = True
        return self._take(np.flatnonzero(~held).tolist(), self.skipped), self._take(
            np.flatnonzero(held).tolist()
        )


# --------------------------------------------------------------------------- reading
def read_pairs(
    data: str | os.PathLike,
    target_data: str | os.PathLike | None = None,
    source_field: str = "src",
    target_field: str = "tgt",
    what: str = "--data",
) -> Pairs:
    """Read pairs from a ``.tsv``, a ``.jsonl``, or two line-aligned text files (``data``
    holds the sources, ``target_data`` the targets). Pairs with an empty side are dropped
    and counted in one warning. ``what``: the option that named ``data``, for messages.
    """
    path = _existing_file(data, what)
    kind = _kind(path)
    if target_data is not None:
        if kind != "text":
            raise LmlabError(
                f"{what} {path} already holds pairs (a .{kind} file); drop the targets file {target_data}, "
                "which is only for two line-aligned plain text files"
            )
        target_path = _existing_file(target_data, "the targets file")
        rows = _two_files(path, target_path)
        name = f"{path} and {target_path}"
    elif kind == "tsv":
        rows = _tsv_rows(path, source_field, target_field)
        name = str(path)
    elif kind == "jsonl":
        rows = _jsonl_rows(path, source_field, target_field)
        name = str(path)
    else:
        raise LmlabError(
            f"{what} {path} is neither .tsv nor .jsonl; give a .tsv (source<TAB>target), a .jsonl with "
            f"'{source_field}' and '{target_field}' fields, or the targets too as a second line-aligned file"
        )
    return _collect(rows, name, multi=kind == "jsonl" and len(_fields(target_field)) > 1)


def _existing_file(spec: str | os.PathLike, what: str) -> Path:
    p = Path(spec).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        raise LmlabError(
            f"{what} {spec} is a folder; give a .tsv or .jsonl file, or two line-aligned text files"
        )
    if p.is_symlink():
        raise LmlabError(
            f"{what} {spec} is a symbolic link to nothing (or a loop of links); point it at a file"
        )
    if p.exists():
        raise LmlabError(f"{what} {spec} is not a regular file; save the pairs to a file and give that")
    raise LmlabError(
        f"{what} {spec} does not exist (give a .tsv or .jsonl file, or two line-aligned text files)"
    )


def _kind(path: Path) -> str:
    """'tsv', 'jsonl' or 'text', from the suffix under any ``.gz``."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    last = suffixes[-1] if suffixes else ""
    return {".tsv": "tsv", ".jsonl": "jsonl"}.get(last, "text")


def read_lines(path: Path) -> list[str]:
    """The file's lines: gunzipped if ``.gz``, UTF-8 with any BOM stripped, split on ``\\n``
    with each line's ``\\r`` dropped; a final newline does not make an extra empty line."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise LmlabError(f"cannot read {path} ({e.strerror})") from None
    if path.suffix.lower() == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise LmlabError(
                f"{path} is not a valid gzip file ({e}); recompress it or drop the .gz suffix"
            ) from None
    if b"\x00" in raw[:8192]:
        raise LmlabError(
            f"{path} looks like a binary file, not text (a NUL byte at byte {raw.index(0)}); give UTF-8 "
            "text (a UTF-16 file must be converted to UTF-8 first)"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise LmlabError(
            f"{path} is not valid UTF-8 (line {line}, byte {e.start}: {raw[e.start : e.start + 4]!r}); "
            "convert it to UTF-8, e.g. iconv -f LATIN1 -t UTF-8"
        ) from None
    text = text.removeprefix("\ufeff")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


#: A row: (source, every reference target); the first target is the training target.
Row = tuple[str, list[str]]


def _tsv_rows(path: Path, source_field: str, target_field: str) -> list[Row]:
    headers = TSV_HEADERS | {(source_field.strip().lower(), target_field.strip().lower())}
    rows: list[Row] = []
    for n, line in enumerate(read_lines(path), start=1):
        if not line.strip() and "\t" not in line:
            continue  # a blank line holds no pair (a trailing one is common)
        fields = line.split("\t")
        if len(fields) != 2:
            raise LmlabError(
                f"{path} line {n} has {len(fields)} tab-separated field{'s' if len(fields) != 1 else ''}, "
                "a pair needs exactly 2 (source<TAB>target)"
            )
        if n == 1 and tuple(f.strip().lower() for f in fields) in headers:
            continue
        rows.append((fields[0], [fields[1]]))
    return rows


def _fields(target_field: str) -> list[str]:
    return [f.strip() for f in target_field.split(",") if f.strip()]


def _jsonl_rows(path: Path, source_field: str, target_field: str) -> list[Row]:
    targets = _fields(target_field)
    if not targets:
        raise LmlabError(f"the target field '{target_field}' names no field; pass --target-field NAME")
    rows: list[Row] = []
    for n, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise LmlabError(
                f"{path} line {n} is not valid JSON ({e.msg} at column {e.colno}); fix or remove it"
            ) from None
        if not isinstance(obj, dict):
            raise LmlabError(
                f"{path} line {n} is a JSON {type(obj).__name__}, not an object; each line must be an object "
                f'like {{"{source_field}": ..., "{targets[0]}": ...}}'
            )
        values = [_field(obj, f, path, n) for f in [source_field, *targets]]
        rows.append((values[0], values[1:]))
    return rows


def _field(obj: dict, field: str, path: Path, n: int) -> str:
    if field not in obj:
        keys = ", ".join(repr(k) for k in obj) or "none"
        raise LmlabError(
            f"{path} line {n} has no field '{field}' (its keys: {keys}); name the fields with "
            "--source-field and --target-field"
        )
    value = obj[field]
    if value is None:
        return ""  # counted with the empty pairs
    if not isinstance(value, str):
        raise LmlabError(
            f"{path} line {n}: field '{field}' is a JSON {type(value).__name__}, not a string; "
            "give text in that field or name another with --source-field/--target-field"
        )
    return value


def _two_files(sources: Path, targets: Path) -> list[Row]:
    src, tgt = read_lines(sources), read_lines(targets)
    if len(src) != len(tgt):
        raise LmlabError(
            f"the sources {sources} have {len(src)} lines but the targets {targets} have {len(tgt)}; "
            "the two files must be line-aligned (line i of one translates line i of the other)"
        )
    return [(s, [t]) for s, t in zip(src, tgt)]


def _collect(rows: list[Row], name: str, multi: bool) -> Pairs:
    """Strip each side; drop (and count, in one warning) the pairs with an empty side."""
    sources: list[str] = []
    targets: list[str] = []
    references: list[list[str]] = []
    skipped = 0
    for source, refs in rows:
        source, refs = source.strip(), [r.strip() for r in refs]
        if not source or not refs[0]:
            skipped += 1
            continue
        sources.append(source)
        targets.append(refs[0])
        references.append([r for r in refs if r])  # an empty extra reference is a missing one
    if skipped:
        warn(f"skipped {skipped} pair{'s' if skipped != 1 else ''} with an empty source or target in {name}")
    if not sources:
        raise LmlabError(
            f"{name} holds no pairs; give at least one line with a source and a target that are not empty"
        )
    return Pairs(sources, targets, references if multi else None, skipped)


# --------------------------------------------------------------------------- batches
def bucket_batches(
    src_lens: Sequence[int],
    tgt_lens: Sequence[int],
    batch_tokens: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    epoch: int = 0,
) -> list[list[int]]:
    """One epoch of batches (lists of example indices), each index exactly once.

    Why: a batch pads every sequence to its longest. Batches drawn at random from
    lengths spread over 5..100 tokens pad each row to ~100 while the mean is ~50, so
    about half of the compute goes to padding; neighbours in length order differ by a
    token or two, so sorted batches waste almost nothing. A budget of padded tokens
    (``len(batch) · max(longest source, longest target) ≤ batch_tokens``) then gives short
    sentences big batches and long ones small batches at about the same memory.

    The sort key is the longer side plus a jitter in [0, 1 + 10%) drawn per (seed, epoch),
    so pairs of (nearly) equal length change batches from epoch to epoch; the order of the
    batches is shuffled by (seed, epoch) too. With ``batch_size`` a batch holds at most that
    many pairs (both limits hold when both are given). A pair longer than ``batch_tokens``
    forms a batch of its own.
    """
    if len(src_lens) != len(tgt_lens):
        raise LmlabError(
            f"{len(src_lens)} source lengths but {len(tgt_lens)} target lengths; give one of each per pair"
        )
    if batch_tokens is None and batch_size is None:
        raise LmlabError("bucket_batches needs a limit: give batch_tokens or batch_size")
    for name, value in (("batch_tokens", batch_tokens), ("batch_size", batch_size)):
        if value is not None and value < 1:
            raise LmlabError(f"{name} must be at least 1, not {value}")
    lengths = np.maximum(np.asarray(src_lens, dtype=np.int64), np.asarray(tgt_lens, dtype=np.int64))
    if len(lengths) == 0:
        return []
    rng = np.random.default_rng([seed, epoch])
    jitter = rng.random(len(lengths)) * (1 + 0.1 * lengths)
    order = np.argsort(lengths + jitter, kind="stable")

    batches: list[list[int]] = []
    batch: list[int] = []
    longest = 0
    for i in order.tolist():
        longest_with_i = max(longest, int(lengths[i]))
        fits_tokens = batch_tokens is None or (len(batch) + 1) * longest_with_i <= batch_tokens
        fits_size = batch_size is None or len(batch) + 1 <= batch_size
        if batch and not (fits_tokens and fits_size):
            batches.append(batch)
            batch, longest_with_i = [], int(lengths[i])
        batch.append(i)
        longest = longest_with_i
    batches.append(batch)
    return [batches[b] for b in rng.permutation(len(batches)).tolist()]


def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists to the longest: ids (B, T) int64 and mask (B, T) bool,
    True on real tokens (so position t of row b is padding iff not mask[b, t])."""
    longest = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.bool)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[b, : len(s)] = True
    return ids, mask
