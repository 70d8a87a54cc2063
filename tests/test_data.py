"""Corpora and batches: which files a --data spec names, how they are joined, the token
cache, the train/validation split, the per-step batch sampler, and the CLI's data errors.

References are built by hand: file lists written out literally, joined strings built
with ``+``, token ids from ``tokenizers`` directly, windows indexed element by element.
"""

from __future__ import annotations

import os
import subprocess
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import cli_env, lmlab_cmd, popen

import lmlab.data as data
import lmlab.textstream as textstream
from lmlab.data import (
    BUILTIN_CHARS,
    TokenCorpus,
    builtin_files,
    encode_text,
    load_corpus,
    read_corpus,
    resolve_data,
    sample_starts,
    step_generator,
    windows,
)
from lmlab.errors import LmlabError
from lmlab.tokenizer import EOT, train_bpe_tokenizer, train_char_tokenizer

TEXT = "The quick brown fox jumps over the lazy dog.\n敏捷的棕色狐狸跳过了懒狗。\n\tindented line\n" * 30


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


# --------------------------------------------------------------------------- resolve_data
def test_resolve_single_file(tmp_path: Path) -> None:
    f = _write(tmp_path / "one.txt", "hello")
    assert resolve_data(f) == [f]
    assert resolve_data(str(f)) == [f]


def test_resolve_folder_sorted_recursive_text_only(tmp_path: Path) -> None:
    for name in ["b/z.txt", "a.txt", "b/c/d.md", "README", "c.py"]:
        _write(tmp_path / name, name)
    # Not corpus text: hidden files, hidden folders (a git checkout), binary suffixes.
    for name in [".hidden.txt", ".git/objects/ab/cdef", ".git/HEAD", "img.png", "b/.cache/x.txt"]:
        _write(tmp_path / name, b"\x00\xff")
    got = [f.relative_to(tmp_path).as_posix() for f in resolve_data(tmp_path)]
    assert got == ["README", "a.txt", "b/c/d.md", "b/z.txt", "c.py"]


def test_resolve_folder_without_text(tmp_path: Path) -> None:
    _write(tmp_path / "pic.png", b"\x89PNG")
    with pytest.raises(LmlabError, match="no text files") as e:
        resolve_data(tmp_path)
    _one_line(e)


def test_resolve_glob(tmp_path: Path) -> None:
    for name in ["b.txt", "a.txt", "c.md", "sub/d.txt"]:
        _write(tmp_path / name, name)
    assert resolve_data(str(tmp_path / "*.txt")) == [tmp_path / "a.txt", tmp_path / "b.txt"]
    assert resolve_data(str(tmp_path / "**" / "*.txt")) == [
        tmp_path / "a.txt",
        tmp_path / "b.txt",
        tmp_path / "sub" / "d.txt",
    ]
    with pytest.raises(LmlabError, match="matches no files") as e:
        resolve_data(str(tmp_path / "*.csv"))
    _one_line(e)


def test_resolve_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_corpus.txt"
    with pytest.raises(LmlabError) as e:
        resolve_data(missing)
    msg = _one_line(e)
    assert str(missing) in msg and "does not exist" in msg


def test_builtin_files_are_stdlib_source() -> None:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = resolve_data("builtin")
    assert len(files) > 100
    assert files == builtin_files()  # deterministic
    rel = [f.relative_to(root).as_posix() for f in files]  # all under the stdlib
    assert rel == sorted(rel)
    assert all(r.endswith(".py") for r in rel)
    for r in rel:
        parts = r.split("/")
        assert not {"site-packages", "dist-packages", "test", "tests", "__pycache__"} & set(parts), r
    assert "os.py" in rel and "json/__init__.py" in rel


# --------------------------------------------------------------------------- read_corpus
def test_read_corpus_joins_files_in_sorted_order(tmp_path: Path) -> None:
    _write(tmp_path / "2.txt", "second\n")
    _write(tmp_path / "1.txt", "first\n")
    _write(tmp_path / "sub" / "3.txt", "第三")
    text = read_corpus(resolve_data(tmp_path))
    assert text == "first\n" + EOT + "second\n" + EOT + "第三"


def test_read_corpus_builtin_is_capped() -> None:
    files = builtin_files()
    text = read_corpus(files, builtin=True)
    assert BUILTIN_CHARS - len(EOT) < len(text) <= BUILTIN_CHARS
    # The same text built by hand: the files in order, joined, cut at the cap.
    pieces, n = [], 0
    for f in files:
        pieces.append(f.read_bytes().decode("utf-8", errors="replace"))
        n += len(pieces[-1]) + len(EOT)
        if n > BUILTIN_CHARS:
            break
    assert text == EOT.join(pieces)[: len(text)]


@pytest.mark.parametrize("content", ["", "   \n\n\t "], ids=["empty", "whitespace"])
def test_read_corpus_empty(tmp_path: Path, content: str) -> None:
    f = _write(tmp_path / "empty.txt", content)
    with pytest.raises(LmlabError, match="empty") as e:
        read_corpus([f])
    assert str(f) in _one_line(e)


def test_read_corpus_non_utf8_names_file_and_offset(tmp_path: Path) -> None:
    _write(tmp_path / "a.txt", "fine text\n")
    bad = _write(tmp_path / "b.txt", "héllo wörld\n".encode() + b"caf\xe9 latin-1\n")
    offset = len("héllo wörld\ncaf".encode())  # 16: é takes two bytes in UTF-8
    with pytest.raises(LmlabError) as e:
        read_corpus(resolve_data(tmp_path))
    msg = _one_line(e)
    assert str(bad) in msg
    assert f"byte {offset}" in msg
    assert "--encoding-errors replace" in msg
    text = read_corpus(resolve_data(tmp_path), encoding_errors="replace")
    assert text == "fine text\n" + EOT + "héllo wörld\ncaf\ufffd latin-1\n"


# --------------------------------------------------------------------------- tokens + cache
@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache folder of this test's own, so no other test's entries are hit."""
    d = tmp_path / "cache"
    monkeypatch.setenv("LMLAB_CACHE", str(d))
    return d


@pytest.fixture
def count_encodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts corpus encodings by the real encode_chunks (a cache hit must not tokenize)."""
    calls: list[int] = []
    real = data.encode_chunks

    def counting(tok, chunks, out):
        result = real(tok, chunks, out)
        calls.append(result[1])  # characters encoded
        return result

    monkeypatch.setattr(data, "encode_chunks", counting)
    return calls


def test_load_corpus_char_ids_exact(tmp_path: Path, cache: Path) -> None:
    _write(tmp_path / "d" / "a.txt", TEXT)
    _write(tmp_path / "d" / "b.txt", "zz " + TEXT)
    joined = TEXT + EOT + "zz " + TEXT
    tok = train_char_tokenizer([joined.replace(EOT, "")])
    corpus = load_corpus(tmp_path / "d", tok)
    assert corpus.ids.tolist() == tok.encode(joined).ids
    assert corpus.ids.tolist().count(tok.token_to_id(EOT)) == 1
    assert corpus.n_files == 2 and corpus.n_chars == len(joined)


def test_load_corpus_bpe_decodes_to_text(tmp_path: Path, cache: Path) -> None:
    f = _write(tmp_path / "c.txt", TEXT)
    tok = train_bpe_tokenizer([TEXT], vocab_size=300)
    corpus = load_corpus(f, tok)
    assert tok.decode(corpus.ids.tolist()) == TEXT
    assert len(corpus.ids) < len(TEXT.encode())  # merges were used


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_encode_text_in_chunks(kind: str) -> None:
    """Long texts are encoded in pieces; the pieces must not change a char tokenizer's ids
    (nor split an end-of-text marker), and BPE must still decode to the text."""
    text = "x" * 45 + EOT + "y" * 45 + "\n" + TEXT + EOT + EOT + "短" * 70 + EOT + "z" * 30
    if kind == "char":
        tok = train_char_tokenizer([text.replace(EOT, "")])
    else:
        tok = train_bpe_tokenizer([text.replace(EOT, "\n")], vocab_size=300)
    eot = tok.token_to_id(EOT)
    for chunk in (7, 13, 14, 50, 64, 1000, 1 << 18):
        ids = encode_text(tok, text, chunk_chars=chunk).tolist()
        assert ids.count(eot) == text.count(EOT), chunk
        assert tok.decode(ids, skip_special_tokens=False) == text, chunk
        if kind == "char":
            assert ids == tok.encode(text).ids, chunk


def test_cache_is_reused(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = _write(tmp_path / "c.txt", TEXT)
    tok = train_char_tokenizer([TEXT])
    first = load_corpus(f, tok)
    assert first.cache_path is not None and first.cache_path.is_file()
    assert first.cache_path.parent == cache  # under $LMLAB_CACHE

    def boom(*a, **kw):
        raise AssertionError("re-tokenized although the cache is valid")

    monkeypatch.setattr(data, "encode_chunks", boom)
    monkeypatch.setattr(data, "encode_text", boom)
    monkeypatch.setattr(data, "read_corpus", boom)
    monkeypatch.setattr(data, "iter_corpus", boom)
    second = load_corpus(f, tok)
    assert second.cache_path == first.cache_path
    assert np.array_equal(np.asarray(second.ids), np.asarray(first.ids))
    assert isinstance(second.ids, np.memmap)


def test_cache_invalidated_by_file_and_tokenizer_changes(
    tmp_path: Path, cache: Path, count_encodes: list[int]
) -> None:
    f = _write(tmp_path / "c.txt", TEXT)
    tok = train_char_tokenizer([TEXT + "Q"])
    load_corpus(f, tok)
    load_corpus(f, tok)
    assert len(count_encodes) == 1

    # Size changes.
    _write(f, TEXT + "Q")
    c = load_corpus(f, tok)
    assert len(count_encodes) == 2 and c.ids.tolist() == tok.encode(TEXT + "Q").ids

    # Same size, new content, new modification time.
    st = f.stat()
    _write(f, "Q" + TEXT)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    assert f.stat().st_size == st.st_size
    c = load_corpus(f, tok)
    assert len(count_encodes) == 3 and c.ids.tolist() == tok.encode("Q" + TEXT).ids

    # Another tokenizer.
    other = train_char_tokenizer(["Q" + TEXT + "@"])
    c = load_corpus(f, other)
    assert len(count_encodes) == 4 and c.ids.tolist() == other.encode("Q" + TEXT).ids
    load_corpus(f, other)
    load_corpus(f, tok)
    assert len(count_encodes) == 4  # both entries still valid
    assert len(list(cache.glob("tokens-*.npy"))) == 4


def test_damaged_cache_is_rebuilt(tmp_path: Path, cache: Path, count_encodes: list[int]) -> None:
    f = _write(tmp_path / "c.txt", TEXT)
    tok = train_char_tokenizer([TEXT])
    path = load_corpus(f, tok).cache_path
    path.write_bytes(b"not an npy file")
    c = load_corpus(f, tok)
    assert len(count_encodes) == 2
    assert c.ids.tolist() == tok.encode(TEXT).ids


def test_cache_stays_out_of_the_checkpoint(tmp_path: Path, cache: Path) -> None:
    """A real (one-step) training run: tokens cached under $LMLAB_CACHE, none in --out;
    with --encoding-errors replace a non-UTF-8 corpus trains."""
    import lmlab

    f = _write(tmp_path / "latin1.txt", TEXT.encode() + b"caf\xe9\n" + TEXT.encode())
    out = tmp_path / "run"
    lmlab.train(
        data=str(f),
        out=str(out),
        encoding_errors="replace",
        n_layer=1,
        n_head=2,
        d_model=16,
        max_seq_len=16,
        steps=1,
        batch_size=2,
        eval_batches=1,
        device="cpu",
        progress=False,
    )
    assert (out / "tokenizer.json").is_file()
    assert list(cache.glob("tokens-*.npy"))
    assert not [p for p in out.rglob("*") if p.suffix == ".npy"]


# --------------------------------------------------------------------------- split
def test_split_last_fraction_is_validation() -> None:
    ids = np.arange(1000, 1200, dtype=np.uint16)
    corpus = TokenCorpus(ids, "x", 1, None, None)
    train, val = corpus.split(0.1, 8)
    assert train.tolist() == list(range(1000, 1180))
    assert val.tolist() == list(range(1180, 1200))
    train, val = corpus.split(0.0, 8)
    assert train.tolist() == ids.tolist() and len(val) == 0


def test_split_corpus_shorter_than_context() -> None:
    corpus = TokenCorpus(np.arange(10, dtype=np.uint16), "tiny.txt", 1, None, None)
    with pytest.raises(LmlabError) as e:
        corpus.split(0.1, 16)
    msg = _one_line(e)
    assert "tiny.txt" in msg and "10 tokens" in msg and "--max-seq-len" in msg


def test_split_validation_shorter_than_context_grows_to_one_window(capsys) -> None:
    corpus = TokenCorpus(np.arange(100, dtype=np.uint16), "small.txt", 1, None, None)
    train, val = corpus.split(0.05, 16)  # 5 validation tokens < 17: the last 17 instead
    assert train.tolist() == list(range(83)) and val.tolist() == list(range(83, 100))
    assert "validating on its last 17 tokens (17%) instead" in capsys.readouterr().err
    with pytest.raises(LmlabError) as e:
        TokenCorpus(np.arange(30, dtype=np.uint16), "small.txt", 1, None, None).split(0.05, 16)
    assert "at least 34 tokens" in _one_line(e) and "--max-seq-len" in _one_line(e)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_data_that_is_a_fifo_or_a_link_loop_is_named_as_such(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(LmlabError, match="is a FIFO"):
        resolve_data(fifo)
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    with pytest.raises(LmlabError, match="symbolic link to nothing"):
        resolve_data(loop)


def test_load_corpus_short_text_fails_at_split(tmp_path: Path, cache: Path) -> None:
    f = _write(tmp_path / "short.txt", "just a few words")
    corpus = load_corpus(f, train_char_tokenizer(["just a few words"]))
    with pytest.raises(LmlabError, match="context window"):
        corpus.split(0.1, 64)


# --------------------------------------------------------------------------- batches
def test_step_generator_is_a_function_of_seed_and_step() -> None:
    def draw(seed: int, step: int, stream: int = 0) -> list[int]:
        return sample_starts(10_000, 64, 12, step_generator(seed, step, stream)).tolist()

    assert draw(1337, 5) == draw(1337, 5)
    draw(1337, 4)  # drawing other steps in between changes nothing
    assert draw(1337, 5) == draw(1337, 5)
    others = [draw(1337, 6), draw(1337, 4), draw(1338, 5), draw(1337, 5, stream=1)]
    assert all(o != draw(1337, 5) for o in others)
    assert len({tuple(draw(0, s)) for s in range(50)}) == 50


def test_sample_starts_within_bounds() -> None:
    n, T = 20, 16
    starts = sample_starts(n, T, 2000, step_generator(0, 0))
    # y needs data[s + T]: the last valid start is n - T - 1, and every start is reachable.
    assert set(starts.tolist()) == {0, 1, 2, 3}
    assert starts.dtype == torch.int64


def test_windows_are_shifted_by_one() -> None:
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 60_000, size=500).astype(np.uint16)
    T = 12
    starts = sample_starts(len(raw), T, 9, step_generator(3, 7))
    x, y = windows(raw, starts, T)
    assert x.shape == y.shape == (9, T) and x.dtype == y.dtype == torch.int64
    for b, s in enumerate(starts.tolist()):
        for t in range(T):
            assert x[b, t].item() == int(raw[s + t])
            assert y[b, t].item() == int(raw[s + t + 1])


def test_windows_on_memmapped_cache(tmp_path: Path, cache: Path) -> None:
    f = _write(tmp_path / "c.txt", TEXT)
    tok = train_char_tokenizer([TEXT])
    ids = load_corpus(f, tok).ids
    ref = tok.encode(TEXT).ids
    x, y = windows(ids, torch.tensor([0, 5, len(ref) - 9]), 8)
    assert x[0].tolist() == ref[0:8] and y[0].tolist() == ref[1:9]
    assert x[1].tolist() == ref[5:13] and y[2].tolist() == ref[-8:]


# --------------------------------------------------------------------------- CLI errors
def _cli_train(data_arg: str, out: Path, cache_dir: Path) -> subprocess.Popen:
    cmd = lmlab_cmd("train", "--data", data_arg, "--out", str(out))
    cmd += ["--n-layer", "1", "--d-model", "16", "--n-head", "2", "--max-seq-len", "16", "--steps", "1"]
    cmd += ["--device", "cpu", "--no-progress"]
    return popen(cmd, cli_env(LMLAB_CACHE=str(cache_dir)))


def test_cli_data_errors(tmp_path: Path) -> None:
    """Each exits 2 with one ``lmlab: error:`` line and no traceback (run side by side)."""
    bad = _write(tmp_path / "bad.txt", b"ok line\nBAD \xff\xfe here\n" + TEXT.encode())
    empty = _write(tmp_path / "empty.txt", "")
    missing = tmp_path / "missing.txt"
    cases = {
        "non-utf8": (bad, ["byte 12", str(bad), "--encoding-errors replace"]),
        "empty": (empty, ["empty", str(empty)]),
        "missing": (missing, ["does not exist", str(missing)]),
    }
    procs = {k: _cli_train(str(p), tmp_path / f"out-{k}", tmp_path / "cache") for k, (p, _) in cases.items()}
    for k, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 2, (k, stderr)
        assert "Traceback" not in stderr + stdout, k
        errors = [line for line in stderr.splitlines() if line.startswith("lmlab: error:")]
        assert len(errors) == 1, (k, stderr)
        for needle in cases[k][1]:
            assert needle in errors[0], (k, needle, errors[0])
        assert not (tmp_path / f"out-{k}" / "model.safetensors").exists()


# --------------------------------------------------------------------------- streaming
def test_streamed_corpus_equals_the_joined_text_encoded_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Read 7 bytes at a time, chunks of at most 11 characters, 3 chunks per batch: a
    multi-byte character split between reads, chunk cuts at newlines and around the
    end-of-text marker between files — the ids equal the char tokenizer's on the whole text."""
    monkeypatch.setattr(textstream, "READ_BYTES", 7)
    monkeypatch.setattr(data, "CHUNK_CHARS", 11)
    monkeypatch.setattr(textstream, "BATCH_CHUNKS", 3)
    a = "学而时习之，不亦说乎？\nabc def\n" * 3
    b = "有朋自远方来" + "x" * 30 + "\n\n" + TEXT[:200]
    _write(tmp_path / "d" / "a.txt", a)
    _write(tmp_path / "d" / "b.txt", b)
    joined = a + EOT + b
    tok = train_char_tokenizer([joined.replace(EOT, "")])
    corpus = load_corpus(tmp_path / "d", tok, use_cache=False)
    assert np.asarray(corpus.ids).tolist() == tok.encode(joined).ids
    assert corpus.n_chars == len(joined)
    chunks = list(data.iter_corpus(resolve_data(tmp_path / "d")))
    assert "".join(chunks) == joined and max(map(len, chunks)) <= 11 + len(EOT)


def test_streamed_utf8_error_names_the_byte_across_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(textstream, "READ_BYTES", 5)
    raw = "héllo wörld, ".encode() * 3 + b"\xff\xfe" + b"tail"
    f = _write(tmp_path / "bad.txt", raw)
    offset = raw.index(b"\xff")
    tok = train_char_tokenizer(["helo wrd,"])
    with pytest.raises(LmlabError, match=rf"bad.txt is not valid UTF-8 \(byte {offset}: "):
        load_corpus(f, tok, use_cache=False)


def test_tokenizer_trained_on_streamed_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lmlab import tokenizer as tokmod

    text = TEXT + EOT + "第二个文件。\n" + TEXT
    chunks = [text[i : i + 50] for i in range(0, len(text), 50)]
    char = tokmod.train_tokenizer("char", iter(chunks))
    assert char.get_vocab() == train_char_tokenizer([text.replace(EOT, "")]).get_vocab()
    # BPE learns its merges from the first BPE_SAMPLE_CHARS characters only
    monkeypatch.setattr(tokmod, "BPE_SAMPLE_CHARS", 100)
    sampled = tokmod.train_tokenizer("bpe", iter(chunks), vocab_size=300)
    assert sampled.get_vocab() == tokmod.train_bpe_tokenizer([c.replace(EOT, "\n") for c in chunks[:2]], 300).get_vocab()
    with pytest.raises(LmlabError, match="unknown tokenizer kind 'word'"):
        tokmod.train_tokenizer("word", iter(chunks))
