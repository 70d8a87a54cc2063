"""Serving throughput: continuous batching vs one request at a time, and lmlab serve vs
transformers' own generation behind a minimal FastAPI endpoint — all through HTTP.

A GPT-2-124M-shaped model with random weights (saved with ``save_pretrained``; a word-level
tokenizer of GPT-2's 50,257 entries so that every token is text) is served by ``lmlab serve``
in a subprocess. Then:

1. 16 streaming clients × 64 tokens, one after another, then all 16 at once: aggregate
   tokens/s of each and their ratio (target >= 4x), time to first token and inter-token
   latency (median, p95) of each.
2. One client, 8 requests of 64 tokens each (greedy), against lmlab serve and against a
   minimal FastAPI app that calls ``transformers``' ``generate`` on the same folder: tokens/s
   and their ratio (target >= 1.5x).

No EOS token is configured, so every request runs its 64 tokens. Run on an otherwise idle
machine (quote the load average and the ratios):

    .venv/bin/python benchmarks/serve_throughput.py
    .venv/bin/python benchmarks/serve_throughput.py --layers 2 --clients 4 --tokens 16   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PEER_APP = '''
import sys, torch, transformers, uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
torch.set_num_threads({threads})
folder, port, dtype = sys.argv[1], int(sys.argv[2]), sys.argv[3]
tok = transformers.AutoTokenizer.from_pretrained(folder)
model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
app = FastAPI()
class Req(BaseModel):
    prompt: str
    max_tokens: int = 64
@app.get("/health")
def health():
    return {{"status": "ok"}}
@app.post("/generate")
def generate(req: Req):
    ids = tok(req.prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=req.max_tokens, min_new_tokens=req.max_tokens, do_sample=False,
                             pad_token_id=0)
    new = out[0, ids.shape[1]:]
    return {{"text": tok.decode(new), "tokens": int(new.shape[0])}}
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
'''


def http():
    try:
        import httpx
    except ImportError:  # openai 3 ships httpx2 (the same API)
        import httpx2 as httpx
    return httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, p: subprocess.Popen, timeout: float = 300) -> None:
    httpx = http()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise SystemExit(f"the server exited ({p.returncode})")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not come up")


def build_model(folder: Path, layers: int) -> None:
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(50257)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    cfg = transformers.GPT2Config(n_layer=layers, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).eval().save_pretrained(folder)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0").save_pretrained(folder)


def stream_one(url: str, prompt: str, tokens: int, record: dict) -> None:
    """One streaming completion: time to first token and the gaps between tokens."""
    httpx = http()
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    stamps = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                stamps.append(time.perf_counter())
    record["ttft"] = stamps[0] - t0
    record["gaps"] = [b - a for a, b in zip(stamps, stamps[1:])]
    record["tokens"] = len(stamps)
    record["end"] = stamps[-1]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def batching(url: str, clients: int, tokens: int) -> dict:
    prompts = [" ".join(f"t{100 * c + k}" for k in range(16)) for c in range(clients)]
    seq = [{} for _ in range(clients)]
    t0 = time.perf_counter()
    for p, rec in zip(prompts, seq):
        stream_one(url, p, tokens, rec)
    t_seq = time.perf_counter() - t0
    conc = [{} for _ in range(clients)]
    threads = [threading.Thread(target=stream_one, args=(url, p, tokens, rec)) for p, rec in zip(prompts, conc)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    t_conc = time.perf_counter() - t0
    out = {}
    for name, recs, wall in (("one at a time", seq, t_seq), ("all at once", conc, t_conc)):
        n = sum(r["tokens"] for r in recs)
        gaps = [g for r in recs for g in r["gaps"]]
        ttft = [r["ttft"] for r in recs]
        out[name] = {"tokens": n, "wall_s": round(wall, 2), "tokens_per_s": round(n / wall, 1),
                     "ttft_median_ms": round(1e3 * statistics.median(ttft), 1), "ttft_p95_ms": round(1e3 * pct(ttft, 0.95), 1),
                     "itl_median_ms": round(1e3 * statistics.median(gaps), 1), "itl_p95_ms": round(1e3 * pct(gaps, 0.95), 1)}  # fmt: skip
    out["ratio"] = round(out["all at once"]["tokens_per_s"] / out["one at a time"]["tokens_per_s"], 2)
    return out


def one_client(lmlab_url: str, peer_url: str, requests: int, tokens: int) -> dict:
    httpx = http()
    prompts = [" ".join(f"t{7 * c + k}" for k in range(16)) for c in range(requests)]
    out = {}
    for name in ("transformers", "lmlab", "transformers ", "lmlab "):  # alternated, twice each
        url = peer_url if name.strip() == "transformers" else lmlab_url
        t0, n = time.perf_counter(), 0
        for p in prompts:
            if name.strip() == "transformers":
                n += httpx.post(url + "/generate", json={"prompt": p, "max_tokens": tokens}, timeout=600).json()["tokens"]
            else:
                body = {"prompt": p, "max_tokens": tokens, "temperature": 0}
                n += httpx.post(url + "/v1/completions", json=body, timeout=600).json()["usage"]["completion_tokens"]
        out.setdefault(name.strip(), []).append(n / (time.perf_counter() - t0))
    best = {k: round(max(v), 1) for k, v in out.items()}
    return {"tokens_per_s": best, "ratio": round(best["lmlab"] / best["transformers"], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=12, help="GPT-2 124M: 12")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=8, help="one-client part: requests")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="torch threads of each server")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="both servers' weights")
    a = ap.parse_args()
    print(f"load average before: {os.getloadavg()}; weights {a.dtype}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "gpt2-random"
        build_model(folder, a.layers)
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
        port, peer_port = free_port(), free_port()
        lm = subprocess.Popen([sys.executable, "-m", "lmlab", "serve", str(folder), "--port", str(port), "--max-batch",
                               str(max(32, a.clients)), "--dtype", a.dtype], env=env, stderr=subprocess.DEVNULL)  # fmt: skip
        peer_py = Path(tmp) / "peer.py"
        peer_py.write_text(PEER_APP.format(threads=a.threads))
        torch_dtype = {"fp32": "float32", "bf16": "bfloat16"}[a.dtype]
        peer = subprocess.Popen([sys.executable, str(peer_py), str(folder), str(peer_port), torch_dtype], env=env,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            url, peer_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{peer_port}"
            wait_healthy(url, lm)
            wait_healthy(peer_url, peer)
            stream_one(url, "t1 t2", 4, {})  # warm-up
            http().post(peer_url + "/generate", json={"prompt": "t1 t2", "max_tokens": 4}, timeout=600)
            b = batching(url, a.clients, a.tokens)
            for name in ("one at a time", "all at once"):
                r = b[name]
                print(f"lmlab serve, {a.clients} streams {name:13s}: {r['tokens_per_s']:7.1f} tokens/s ({r['wall_s']} s); "
                      f"TTFT median {r['ttft_median_ms']} ms p95 {r['ttft_p95_ms']} ms; inter-token median "
                      f"{r['itl_median_ms']} ms p95 {r['itl_p95_ms']} ms", flush=True)  # fmt: skip
            print(f"continuous batching: {b['ratio']}x the tokens/s of one request at a time (target >= 4x)", flush=True)
            c = one_client(url, peer_url, a.requests, a.tokens)
            print(f"one client, {a.requests} x {a.tokens} tokens greedy: lmlab serve {c['tokens_per_s']['lmlab']} tokens/s, "
                  f"transformers generate behind FastAPI {c['tokens_per_s']['transformers']} tokens/s: "
                  f"{c['ratio']}x (target >= 1.5x)", flush=True)  # fmt: skip
        finally:
            for p in (lm, peer):
                p.terminate()
                p.wait(timeout=30)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
