"""lmlab vs Hugging Face transformers on a GPT-2 124M checkpoint (random weights).

    python benchmarks/hf_load_forward.py [--reps 10] [--seq 512] [--threads N]

1. Saves a GPT-2 124M architecture (12 layers, 768 wide, 50257 tokens) with random
   weights as a Hugging Face folder in a temporary directory.
2. Load: ``lmlab.load(DIR)`` vs ``AutoModelForCausalLM.from_pretrained(DIR)``, each in a
   fresh subprocess (so neither inherits the other's caches or allocator): wall time, and
   the peak resident memory while loading above the process's memory before the call,
   as a multiple of the weights' size in the loaded dtype.
3. Forward: one 512-token sequence, lmlab and transformers alternating (so machine noise
   hits both alike), median of ``--reps``; then where lmlab's forward time goes.
Ratios > 1.0 mean lmlab is faster (or smaller).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

LOAD_SCRIPT = r"""
import json, resource, sys, time
kind, folder, dtype = sys.argv[1], sys.argv[2], sys.argv[3]
import torch
if kind == "lmlab":
    import lmlab
else:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging
    logging.disable_progress_bar()
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
# Both libraries build the model on the meta device; the first meta-tensor op imports
# ~70 MiB of torch's Python decompositions, once per process. Pay it before measuring.
torch.empty(1, device="meta").normal_()
def hwm():  # the peak resident memory (VmHWM), which clear_refs resets
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak to the present, so import-time spikes do not count
before = rss()
t = time.perf_counter()
if kind == "lmlab":
    model = lmlab.load(folder, dtype=dtype).module
else:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
seconds = time.perf_counter() - t
peak = hwm()
with torch.inference_mode():  # touches every weight: transformers maps the file lazily
    model(torch.zeros(1, 8, dtype=torch.long))
first = time.perf_counter() - t
peak_fwd = hwm()
n = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
print(json.dumps({"seconds": seconds, "with_forward": first, "peak_over_before": peak - before,
                  "peak_with_forward": peak_fwd - before, "weights": n}))
"""


def make_checkpoint(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config())  # the 124M architecture, random weights
    model.save_pretrained(folder)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog. " * 200], trainer=trainer)
    tok.save(str(folder / "tokenizer.json"))


def measure_load(kind: str, folder: Path, dtype: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    r = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, kind, str(folder), dtype],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(r.stdout.strip().splitlines()[-1])


def time_forward(fn, ids: torch.Tensor) -> float:
    t = time.perf_counter()
    fn(ids)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    import lmlab

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "gpt2-124m"
        t = time.perf_counter()
        make_checkpoint(folder)
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        print(
            f"checkpoint: GPT-2 124M, {size / 2**20:.0f} MiB of safetensors ({time.perf_counter() - t:.1f}s)"
        )

        print("\nload (fresh subprocess each; peak = max resident memory above the pre-load level)")
        for dtype in ("float32", "bfloat16"):
            res = {k: measure_load(k, folder, dtype) for k in ("lmlab", "transformers")}
            for k, r in res.items():
                print(
                    f"  {dtype:9s} {k:12s} load {r['seconds']:5.2f}s (+ first forward {r['with_forward']:5.2f}s)"
                    f"   peak {r['peak_over_before'] / r['weights']:.2f}x weights"
                    f" (+ first forward {r['peak_with_forward'] / r['weights']:.2f}x; weights {r['weights'] / 2**20:.0f} MiB)"
                )
            ratio_t = res["transformers"]["seconds"] / res["lmlab"]["seconds"]
            ratio_f = res["transformers"]["with_forward"] / res["lmlab"]["with_forward"]
            ratio_m = res["transformers"]["peak_with_forward"] / res["lmlab"]["peak_with_forward"]
            print(
                f"  {dtype:9s} ratio (transformers / lmlab): load {ratio_t:.2f}x, load + first forward "
                f"{ratio_f:.2f}x, peak memory through the first forward {ratio_m:.2f}x"
            )
        print(
            "  (transformers keeps the weights memory-mapped and reads them on first use; lmlab copies\n"
            "   them into its own layout at load — fused qkv, transposed Conv1D — so compare the\n"
            "   'load + first forward' column for the work done)"
        )

        ours = lmlab.load(folder).module
        theirs = AutoModelForCausalLM.from_pretrained(folder).eval()
        ids = torch.randint(0, 50257, (1, a.seq), generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            diff = (ours(ids)[0] - theirs(ids).logits).abs().max().item()
            t_ours, t_theirs = [], []
            for _ in range(2):  # warm-up
                ours(ids), theirs(ids)
            for _ in range(a.reps):
                t_ours.append(time_forward(lambda x: ours(x), ids))
                t_theirs.append(time_forward(lambda x: theirs(x), ids))
        mo, mt = statistics.median(t_ours), statistics.median(t_theirs)
        print(f"\nforward, 1 x {a.seq} tokens, fp32, {torch.get_num_threads()} threads, median of {a.reps}")
        print(f"  lmlab        {mo * 1e3:7.1f} ms")
        print(f"  transformers {mt * 1e3:7.1f} ms")
        print(f"  ratio (transformers / lmlab): {mt / mo:.2f}x   (max |logit difference| {diff:.1e})")

        print("\nwhere lmlab's forward time goes (torch.profiler, self CPU time, one pass):")
        with torch.inference_mode(), torch.profiler.profile() as prof:
            ours(ids)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8)
        print("\n".join("  " + line for line in table.splitlines()))


if __name__ == "__main__":
    main()
