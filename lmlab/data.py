"""Corpora -> token id arrays (tokenized once, cached, memory-mapped) -> batches.

A corpus is a text file, a folder of text files, a glob, or ``builtin``. Files are
joined in sorted order with ``<|endoftext|>`` between them. The token ids are cached
under ``$LMLAB_CACHE`` (default ``~/.cache/lmlab``), keyed by the files' paths, sizes
and modification times and by the tokenizer, so a second run starts at once.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from lmlab.chatml import chat_texts, is_chat_file
from lmlab.errors import LmlabError
from lmlab.messages import is_main_process, say
from lmlab.textstream import (
    CHUNK_CHARS,
    cut,
    decoded_pieces,
    encode_chunks,
    encode_text,  # noqa: F401 - part of lmlab.data's API too
    npy_header,
    token_dtype,
)
from lmlab.tokenizer import EOT

#: The built-in corpus is capped at this many characters.
BUILTIN_CHARS = 3_000_000
TEXT_SUFFIXES = {".txt", ".md", ".py", ".text", ".rst", ".json", ".jsonl", ".csv", ".tsv", ".html"}


def cache_dir() -> Path:
    d = Path(os.environ.get("LMLAB_CACHE", Path.home() / ".cache" / "lmlab"))
    d.mkdir(parents=True, exist_ok=True)
    return d


# --------------------------------------------------------------------------- corpus files
def builtin_files() -> list[Path]:
    """The Python standard library's own source: every ``*.py`` under ``sysconfig``'s
    stdlib path, sorted by relative path, skipping ``site-packages``, test suites and
    IDLE. Every Python install carries it, so the demo needs no download. It differs
    slightly between Python versions, and so do the resulting models.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
    files = [f for f in root.rglob("*.py") if not skip.intersection(f.relative_to(root).parts)]
    if not files:
        raise LmlabError(f"no Python source found under {root} for the built-in corpus; pass --data PATH")
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def resolve_data(spec: str | os.PathLike) -> list[Path]:
    """A path, a folder, a glob, or 'builtin' -> the sorted list of files it names."""
    spec = str(spec)
    if spec == "builtin":
        return builtin_files()
    p = Path(spec).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        # Skip hidden files and anything under a hidden folder (.git/, .venv/, ...).
        files = sorted(
            f
            for f in p.rglob("*")
            if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
        )
        texty = [f for f in files if f.suffix.lower() in TEXT_SUFFIXES or f.suffix == ""]
        if not texty:
            raise LmlabError(
                f"folder {spec} has no text files (looked for {', '.join(sorted(TEXT_SUFFIXES))} "
                "or files without extension)"
            )
        return texty
    if any(c in spec for c in "*?["):
        files = sorted(Path(f) for f in glob.glob(os.path.expanduser(spec), recursive=True))
        files = [f for f in files if f.is_file()]
        if not files:
            raise LmlabError(f"the pattern {spec} matches no files")
        return files
    if p.is_symlink() and not p.exists():
        raise LmlabError(f"data path {spec} is a symbolic link to nothing (or a loop of links); point it at a text file")
    if p.exists():  # neither a file nor a folder
        kind = "a FIFO (named pipe)" if p.is_fifo() else "a socket" if p.is_socket() else "a device"
        raise LmlabError(f"data path {spec} is {kind}, not a text file; save the text to a file and give that")
    raise LmlabError(f"data path {spec} does not exist (give a text file, a folder, a glob, or 'builtin')")


def read_text(path: Path, encoding_errors: str = "strict") -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise LmlabError(f"cannot read {path} ({e.strerror})") from None
    if b"\x00" in raw[:8192]:
        raise LmlabError(
            f"{path} looks like a binary file, not text (a NUL byte at byte {raw.index(0)}); give "
            "UTF-8 text files (a UTF-16 text must be converted to UTF-8 first)"
        )
    try:
        return raw.decode("utf-8", errors=encoding_errors)
    except UnicodeDecodeError as e:
        raise LmlabError(
            f"{path} is not valid UTF-8 (byte {e.start}: {raw[e.start : e.start + 4]!r}); "
            "convert it to UTF-8 or pass --encoding-errors replace"
        ) from None


def read_corpus(files: list[Path], encoding_errors: str = "strict", builtin: bool = False) -> str:
    """Files joined by the end-of-text token; the built-in corpus capped at BUILTIN_CHARS."""
    texts: list[str] = []
    total = 0  # characters of the joined text so far, separators included
    for f in files:
        sep = len(EOT) if texts else 0
        if builtin and total + sep >= BUILTIN_CHARS:
            break
        t = read_text(f, "replace" if builtin else encoding_errors)
        if builtin:
            t = t[: BUILTIN_CHARS - total - sep]  # len(EOT.join(texts)) <= BUILTIN_CHARS
            total += sep + len(t)
        texts.append(t)
    text = EOT.join(texts)
    if not text.strip():
        names = files[0] if len(files) == 1 else f"{len(files)} files"
        raise LmlabError(f"the corpus ({names}) is empty; give a file with some text in it")
    return text


def fingerprint(files: list[Path], extra: dict) -> str:
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(json.dumps(extra, sort_keys=True).encode())
    return h.hexdigest()[:24]


# --------------------------------------------------------------------------- streaming text
def iter_corpus(
    files: list[Path],
    encoding_errors: str = "strict",
    builtin: bool = False,
    chunk_chars: int | None = None,
    progress: Any = None,
) -> Iterator[str]:
    """The corpus (files joined by the end-of-text token) in chunks of at most
    ``chunk_chars`` (default CHUNK_CHARS) characters, cut as :func:`lmlab.textstream.cut` says; never
    whole in memory."""
    chunk_chars = chunk_chars or CHUNK_CHARS
    if builtin:  # 3M characters at most: the capped text, cut the same way
        text = read_corpus(files, encoding_errors, builtin=True)
        while text:
            j = cut(text, chunk_chars)
            yield text[:j]
            text = text[j:]
        return
    buf = ""
    for n, f in enumerate(files):
        if n:
            buf += EOT
        chat = is_chat_file(f)  # JSON lines of {"messages": [...]}: trained on as ChatML (lmlab.chatml)
        for piece in chat_texts(f, EOT) if chat else decoded_pieces(f, encoding_errors, progress):
            buf += piece
            while len(buf) >= chunk_chars:
                j = cut(buf, chunk_chars)
                yield buf[:j]
                buf = buf[j:]
    while buf:
        j = cut(buf, chunk_chars)
        yield buf[:j]
        buf = buf[j:]


def _progress(files: list[Path], what: str) -> Any:
    """A bar (MB read, MB/s, ETA) on stderr for a corpus big enough to wait for."""
    total = sum(f.stat().st_size for f in files)
    if total < PROGRESS_BYTES or not is_main_process():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1 << 20, desc=what, file=sys.stderr,
                dynamic_ncols=True, leave=False)


#: Show a progress bar when a corpus is at least this big.
PROGRESS_BYTES = 16 << 20


# --------------------------------------------------------------------------- tokens
@dataclass
class TokenCorpus:
    """All token ids of a corpus and where the validation part begins."""

    ids: np.ndarray
    name: str
    n_files: int
    n_chars: int | None
    cache_path: Path | None

    def split(self, val_fraction: float, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Train = the first (1 - f) of the tokens, validation = the last f (as nanoGPT).

        A validation part shorter than one window (seq_len + 1 tokens) could not be
        evaluated: on a small corpus it grows to one window, with a line saying so, as long
        as the training part keeps one window too.
        """
        n = len(self.ids)
        n_val = int(n * val_fraction)
        window = seq_len + 1
        if val_fraction > 0 and n_val < window and n - window >= window:
            say(
                f"lmlab: the last {val_fraction:.0%} of {self.name} ({n_val} tokens) is shorter than one "
                f"context window ({window}); validating on its last {window} tokens ({window / n:.0%}) instead"
            )
            n_val = window
        if n - n_val < window or (val_fraction > 0 and n_val < window):
            need = 2 * window if val_fraction > 0 else window
            raise LmlabError(
                f"the corpus {self.name} has {n} tokens; training needs more than one context window: at "
                f"least {need} tokens (a window of {window} to train on"
                f"{' and one to validate on' if val_fraction > 0 else ''}) — give more text or a smaller --max-seq-len"
            )
        return self.ids[: n - n_val], self.ids[n - n_val :]


def load_corpus(
    data: str | os.PathLike,
    tok: Tokenizer,
    encoding_errors: str = "strict",
    use_cache: bool = True,
    text: str | None = None,
) -> TokenCorpus:
    """Tokenize a corpus, or memory-map its cached tokens if nothing changed.

    The text is read, encoded and written to the cache a chunk at a time (memory stays
    bounded by a batch of chunks, whatever the corpus size), then the ids are mapped from
    disk. ``text``: the corpus already in memory (small corpora, tests).
    """
    files = resolve_data(data)
    builtin = str(data) == "builtin"
    key = fingerprint(
        files,
        {
            "cache_format": 4,  # bump when the corpus text or its encoding changes (4: chat JSONL as ChatML)
            "tok": hashlib.sha256(tok.to_str().encode()).hexdigest(),
            "errors": encoding_errors,
            "builtin": BUILTIN_CHARS if builtin else 0,
            "py": sys.version_info[:2] if builtin else None,
        },
    )
    name = "builtin (Python stdlib source)" if builtin else str(data)
    folder = cache_dir() if use_cache else Path(tempfile.mkdtemp(prefix="lmlab-tokens-"))
    path = folder / f"tokens-{key}.npy"
    if use_cache and path.is_file():
        try:
            return TokenCorpus(np.load(path, mmap_mode="r"), name, len(files), None, path)
        except (ValueError, OSError):
            path.unlink(missing_ok=True)  # a damaged cache entry is simply rebuilt
    if text is not None:
        chunks: Iterable[str] = iter([text]) if len(text) <= CHUNK_CHARS else _split(text)
        bar = None
    else:
        bar = _progress(files, f"tokenizing {name}")
        chunks = iter_corpus(files, encoding_errors, builtin, progress=bar)
    dtype = token_dtype(tok)
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".tmp", delete=False) as f:
        try:
            f.write(npy_header(dtype, 0))  # the real length is known at the end
            n_tokens, n_chars, has_text = encode_chunks(tok, chunks, f)
            f.seek(0)
            f.write(npy_header(dtype, n_tokens))
        except BaseException as e:
            f.close()
            os.unlink(f.name)
            if isinstance(e, OSError):  # the cache's disk is full or not writable
                raise LmlabError(
                    f"cannot write the token cache in {folder} ({e.strerror}); free space there or point "
                    "LMLAB_CACHE at another folder"
                ) from None
            raise
        finally:
            if bar is not None:
                bar.close()
    if not has_text:
        os.unlink(f.name)
        what = files[0] if len(files) == 1 else f"{len(files)} files"
        raise LmlabError(f"the corpus ({what}) is empty; give a file with some text in it")
    os.replace(f.name, path)
    if not use_cache:  # a private temporary folder: read the ids into memory and remove it
        ids = np.load(path)
        shutil.rmtree(folder, ignore_errors=True)
        return TokenCorpus(ids, name, len(files), n_chars, None)
    return TokenCorpus(_map(path), name, len(files), n_chars, path)


def _split(text: str) -> Iterator[str]:
    while text:
        j = cut(text, CHUNK_CHARS)
        yield text[:j]
        text = text[j:]


def _map(path: Path) -> np.ndarray:
    """The cached ids, memory-mapped read-only (numpy cannot map zero bytes of data)."""
    try:
        return np.load(path, mmap_mode="r")
    except ValueError:
        return np.load(path)


# --------------------------------------------------------------------------- batches
def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A generator for one training step, a pure function of (seed, step).

    The data a step sees then depends on neither history nor process count: resume
    needs only the step number, and every rank derives the same global batch.
    """
    mixed = (seed * 0x9E3779B1 + step * 0x85EBCA77 + stream * 0xC2B2AE3D) % (1 << 62)
    return torch.Generator().manual_seed(mixed)


def sample_starts(n_tokens: int, seq_len: int, count: int, gen: torch.Generator) -> torch.Tensor:
    """Window starts drawn uniformly at random with replacement (nanoGPT's sampler)."""
    return torch.randint(n_tokens - seq_len, (count,), generator=gen)


def windows(data: np.ndarray, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs x = data[s : s+T] and targets y = data[s+1 : s+T+1] for each start s."""
    idx = starts.numpy()[:, None] + np.arange(seq_len + 1)[None, :]
    w = torch.from_numpy(np.asarray(data[idx], dtype=np.int64))  # (B, T+1)
    return w[:, :-1], w[:, 1:]
