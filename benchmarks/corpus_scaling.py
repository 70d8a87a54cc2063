"""Corpus scaling: peak memory and speed of tokenizing 10 MB, 100 MB and 1 GB corpora.

A corpus of the requested size is made by repeating Tiny Shakespeare (each copy numbered,
so BPE sees a little variety) in a temporary folder. For each size and tokenizer kind
(char, byte-level BPE) one child process runs what ``lmlab train`` runs before its first
step: the tokenizer trained on the corpus (streamed; BPE on at most its first 200M
characters) and the corpus encoded into the token cache (``lmlab.data.load_corpus``,
streamed a chunk at a time). The parent reads the child's peak resident memory from the
kernel (``wait4``'s ``ru_maxrss``) and prints MB/s and tokens/s per phase.

The peer is the way lmlab tokenized before (the whole text read into memory and encoded
at once: ``read_corpus`` + ``encode_batch`` over all its chunks), run on the sizes where
it fits (``--peer-max-mb``, 100 MB by default: at ~100 bytes of memory per character,
1 GB would need ~100 GB).

    .venv/bin/python benchmarks/corpus_scaling.py                      # 10, 100, 1000 MB (~15 min)
    .venv/bin/python benchmarks/corpus_scaling.py --sizes 10,100 --kinds char
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_SOURCE = HERE.parent.parent / "shared" / "data" / "tinyshakespeare.txt"

CHILD = r"""
import json, sys, time
from pathlib import Path
path, kind, mode = sys.argv[1], sys.argv[2], sys.argv[3]
from lmlab.data import iter_corpus, load_corpus, read_corpus, resolve_data, encode_text
from lmlab.tokenizer import EOT, train_tokenizer, train_char_tokenizer, train_bpe_tokenizer
files = resolve_data(path)
t0 = time.perf_counter()
if mode == "lmlab":
    tok = train_tokenizer(kind, iter_corpus(files), vocab_size=4096)
    t1 = time.perf_counter()
    corpus = load_corpus(path, tok, use_cache=False)
    n = len(corpus.ids)
else:  # the whole text in memory, as lmlab did before streaming
    text = read_corpus(files)
    tok = (train_char_tokenizer([text.replace(EOT, "")]) if kind == "char"
           else train_bpe_tokenizer((t[i:i + (1 << 20)] for t in [text.replace(EOT, "\n")]
                                     for i in range(0, len(t), 1 << 20)), 4096))
    t1 = time.perf_counter()
    chunks = [text[i:i + (1 << 18)] for i in range(0, len(text), 1 << 18)]
    encs = tok.encode_batch(chunks, add_special_tokens=False)
    n = sum(len(e.ids) for e in encs)
t2 = time.perf_counter()
print(json.dumps({"tokens": n, "train_s": t1 - t0, "encode_s": t2 - t1}))
"""


def make_corpus(source: Path, mb: int, folder: Path) -> Path:
    text = source.read_text(encoding="utf-8")
    path = folder / f"corpus-{mb}mb.txt"
    target = mb * 1_000_000
    with open(path, "w", encoding="utf-8") as f:
        written, k = 0, 0
        while written < target:
            piece = f"== copy {k} ==\n{text}"
            f.write(piece)
            written += len(piece.encode())
            k += 1
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10,100,1000", help="corpus sizes in MB")
    ap.add_argument("--kinds", default="char,bpe")
    ap.add_argument("--source", default=str(DEFAULT_SOURCE))
    ap.add_argument("--peer-max-mb", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tmp", default=None, help="folder for the generated corpora (default: a temporary one)")
    a = ap.parse_args()
    source = Path(a.source)
    if not source.is_file():
        raise SystemExit(f"{source} not found (the shared data folder beside the clone); pass --source FILE")
    rows = []
    with tempfile.TemporaryDirectory(dir=a.tmp) as tmp:
        for mb in (int(s) for s in a.sizes.split(",")):
            path = make_corpus(source, mb, Path(tmp))
            size = path.stat().st_size / 1e6
            for kind in a.kinds.split(","):
                modes = ["lmlab"] + (["peer"] if mb <= a.peer_max_mb else [])
                for mode in modes:
                    r = measure(path, kind, mode, a.threads)
                    r.update(mb=round(size), kind=kind, mode=mode)
                    r["encode_mb_s"] = size / r["encode_s"]
                    r["tokens_per_s"] = r["tokens"] / r["encode_s"]
                    rows.append(r)
                    print(
                        f"{size:7.0f} MB  {kind:4s}  {mode:5s}  peak RSS {r['peak_rss_mb']:8.0f} MB  "
                        f"tokenizer {r['train_s']:7.1f} s  encode {r['encode_s']:7.1f} s "
                        f"({r['encode_mb_s']:6.1f} MB/s, {r['tokens_per_s'] / 1e6:5.2f}M tokens/s)",
                        flush=True,
                    )
            path.unlink()
    print(json.dumps(rows))


def measure(path: Path, kind: str, mode: str, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "RAYON_NUM_THREADS": str(threads),
           "LMLAB_CACHE": str(path.parent / "cache")}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path), kind, mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{mode} {kind} on {path.name} failed:\n{err[-2000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux: kilobytes
    return result


if __name__ == "__main__":
    main()
