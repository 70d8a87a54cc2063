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
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from lmlab.errors import LmlabError
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
    raise LmlabError(f"data path {spec} does not exist (give a text file, a folder, a glob, or 'builtin')")


def read_text(path: Path, encoding_errors: str = "strict") -> str:
    raw = path.read_bytes()
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


# --------------------------------------------------------------------------- tokens
def encode_text(tok: Tokenizer, text: str, chunk_chars: int = 1 << 18) -> np.ndarray:
    """Token ids of a long text, encoded in parallel chunks cut after a newline."""
    chunks, i = [], 0
    while i < len(text):
        j = min(len(text), i + chunk_chars)
        if j < len(text):
            nl = text.rfind("\n", i, j)
            j = nl + 1 if nl > i else j
            # Never cut through an end-of-text marker: it must stay one special token.
            k = text.rfind(EOT, i, j + len(EOT) - 1)
            if k != -1 and k < j < k + len(EOT):
                j = k if k > i else k + len(EOT)
        chunks.append(text[i:j])
        i = j
    ids = [np.asarray(e.ids, dtype=np.int64) for e in tok.encode_batch(chunks, add_special_tokens=False)]
    out = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
    return out.astype(np.uint16 if tok.get_vocab_size() <= 1 << 16 else np.uint32)


@dataclass
class TokenCorpus:
    """All token ids of a corpus and where the validation part begins."""

    ids: np.ndarray
    name: str
    n_files: int
    n_chars: int | None
    cache_path: Path | None

    def split(self, val_fraction: float, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Train = the first (1 - f) of the tokens, validation = the last f (as nanoGPT)."""
        n = len(self.ids)
        n_val = int(n * val_fraction)
        if n - n_val < seq_len + 1:
            raise LmlabError(
                f"the corpus {self.name} has {n} tokens; training needs more than one context "
                f"window ({seq_len + 1} tokens) in its training part — give more text or a "
                "smaller --max-seq-len"
            )
        if val_fraction > 0 and n_val < seq_len + 1:
            raise LmlabError(
                f"the validation part of {self.name} ({n_val} tokens, the last "
                f"{val_fraction:.0%}) is shorter than one context window ({seq_len + 1}); "
                "give more text, a larger --val-fraction, or a smaller --max-seq-len"
            )
        return self.ids[: n - n_val], self.ids[n - n_val :]


def load_corpus(
    data: str | os.PathLike,
    tok: Tokenizer,
    encoding_errors: str = "strict",
    use_cache: bool = True,
    text: str | None = None,
) -> TokenCorpus:
    """Tokenize a corpus, or memory-map its cached tokens if nothing changed."""
    files = resolve_data(data)
    builtin = str(data) == "builtin"
    key = fingerprint(
        files,
        {
            "cache_format": 2,  # bump when the corpus text or its encoding changes
            "tok": hashlib.sha256(tok.to_str().encode()).hexdigest(),
            "errors": encoding_errors,
            "builtin": BUILTIN_CHARS if builtin else 0,
            "py": sys.version_info[:2] if builtin else None,
        },
    )
    name = "builtin (Python stdlib source)" if builtin else str(data)
    path = cache_dir() / f"tokens-{key}.npy" if use_cache else None
    if path is not None and path.is_file():
        try:
            ids = np.load(path, mmap_mode="r")
            return TokenCorpus(ids, name, len(files), None, path)
        except (ValueError, OSError):
            path.unlink(missing_ok=True)  # a damaged cache entry is simply rebuilt
    if text is None:
        text = read_corpus(files, encoding_errors, builtin)
    ids = encode_text(tok, text)
    if path is not None:
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npy", delete=False) as f:
            np.save(f, ids)
        os.replace(f.name, path)
        ids = np.load(path, mmap_mode="r")
    return TokenCorpus(ids, name, len(files), len(text), path)


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
