"""Text to token ids a chunk at a time: never the whole corpus in memory.

A corpus of any size is read a few MB at a time (:func:`decoded_pieces`), cut into
chunks after a line break and never inside an end-of-text marker (:func:`cut`), encoded
a batch of chunks at a time (``tokenizers`` encodes a batch in parallel) and appended to
a file (:func:`encode_chunks`); the cache file is a ``.npy`` whose header is rewritten
once the length is known (:func:`npy_header`), so it maps with ``np.load(mmap_mode="r")``.
"""

from __future__ import annotations

import codecs
import io
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tokenizers import Tokenizer

from lmlab.errors import LmlabError
from lmlab.tokenizer import EOT

#: Text is read and encoded this many characters at a time: memory stays bounded whatever
#: the corpus size (a tokenizer's Encoding objects take ~100 bytes per token while alive).
CHUNK_CHARS = 1 << 18
#: Chunks encoded together (in parallel by ``tokenizers``) before their ids go to disk.
BATCH_CHUNKS = 8
READ_BYTES = 1 << 22


def cut(text: str, limit: int) -> int:
    """Where to end a chunk of ``text`` of at most ``limit`` characters: after its last
    newline (so a chunk ends where a BPE pre-tokenizer would split anyway), and never
    inside an end-of-text marker, which must stay one special token."""
    j = min(len(text), limit)
    if j == len(text):
        return j
    nl = text.rfind("\n", 0, j)
    j = nl + 1 if nl > 0 else j
    k = text.rfind(EOT, 0, j + len(EOT) - 1)
    if k != -1 and k < j < k + len(EOT):
        j = k if k > 0 else k + len(EOT)
    return j


def decoded_pieces(path: Path, encoding_errors: str, progress: Any = None) -> Iterator[str]:
    """The text of one file, decoded from UTF-8 a few MB at a time."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors=encoding_errors)
    offset = 0  # bytes of the file handed to the decoder so far
    try:
        f = open(path, "rb")
    except OSError as e:
        raise LmlabError(f"cannot read {path} ({e.strerror})") from None
    with f:
        while True:
            raw = f.read(READ_BYTES)
            if offset == 0 and b"\x00" in raw[:8192]:
                raise LmlabError(
                    f"{path} looks like a binary file, not text (a NUL byte at byte {raw.index(0)}); give "
                    "UTF-8 text files (a UTF-16 text must be converted to UTF-8 first)"
                )
            pending = len(decoder.getstate()[0])
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                at = offset - pending + e.start
                bad = (e.object[e.start : e.start + 4]) if isinstance(e.object, bytes) else b""
                raise LmlabError(
                    f"{path} is not valid UTF-8 (byte {at}: {bad!r}); "
                    "convert it to UTF-8 or pass --encoding-errors replace"
                ) from None
            offset += len(raw)
            if progress is not None:
                progress.update(len(raw))
            if text:
                yield text
            if not raw:
                return


def token_dtype(tok: Tokenizer) -> np.dtype:
    return np.dtype(np.uint16 if tok.get_vocab_size() <= 1 << 16 else np.uint32)


def encode_chunks(tok: Tokenizer, chunks: Iterable[str], out: BinaryIO) -> tuple[int, int, bool]:
    """Encode ``chunks`` a batch at a time and append their ids to ``out``: returns (tokens,
    characters, whether any text besides whitespace and end-of-text markers was seen).
    Peak memory is a batch's encodings, not the corpus's."""
    dtype = token_dtype(tok)
    n_tokens = n_chars = 0
    has_text = False
    batch: list[str] = []

    def flush() -> None:
        nonlocal n_tokens
        for e in tok.encode_batch_fast(batch, add_special_tokens=False):
            ids = np.asarray(e.ids, dtype=dtype)
            out.write(ids.tobytes())
            n_tokens += len(ids)
        batch.clear()

    for chunk in chunks:
        batch.append(chunk)
        n_chars += len(chunk)
        has_text = has_text or bool(chunk.replace(EOT, "").strip())
        if len(batch) >= BATCH_CHUNKS:
            flush()
    if batch:
        flush()
    return n_tokens, n_chars, has_text


def encode_text(tok: Tokenizer, text: str, chunk_chars: int = CHUNK_CHARS) -> np.ndarray:
    """Token ids of a text held in memory, encoded in parallel chunks (as a corpus is)."""
    buf = io.BytesIO()
    pieces = []
    while text:
        j = cut(text, chunk_chars)
        pieces.append(text[:j])
        text = text[j:]
    encode_chunks(tok, pieces, buf)
    return np.frombuffer(buf.getvalue(), dtype=token_dtype(tok)).copy()


#: Bytes of the .npy header written before the ids: room for any length, so the header
#: can be rewritten in place once the count is known (numpy allows space padding).
NPY_HEADER_BYTES = 128


def npy_header(dtype: np.dtype, n: int) -> bytes:
    """A version-1.0 .npy header for a 1-D array of ``n`` ``dtype`` values."""
    d = f"{{'descr': '{dtype.str}', 'fortran_order': False, 'shape': ({n},), }}"
    body = d.ljust(NPY_HEADER_BYTES - 10 - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body.encode("latin1")
