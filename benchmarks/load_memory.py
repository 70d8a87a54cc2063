"""Memory while loading a bf16 model and decoding its first tokens, against its weights' size.

Qwen2-0.5B's architecture (494M parameters, tied output layer) with random weights is saved
in bf16 as a Hugging Face folder (942 MiB of weights). Each case runs in its own child
process: it loads and decodes a tiny model first (so the imports a first decode makes are
not counted), resets the kernel's peak counter (``/proc/self/clear_refs``), then loads the
big model with no ``dtype`` (a bf16 checkpoint loads in bf16) and generates 8 tokens. It
reports resident memory (VmRSS) after loading and after the first token, and the peak
(VmHWM), each above what the process held before loading, as a multiple of the weights
(the bf16 checkpoint's bytes, for the int8 load too).
The decoding-speed issue asks for ≤ 1.1× at the peak.

    .venv/bin/python benchmarks/load_memory.py                 # ~1 min, 3 GB of memory
    .venv/bin/python benchmarks/load_memory.py --model DIR     # any Hugging Face folder (bf16 or not)

Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    "sampling, batch 1": {"do_sample": True, "seed": 0},
    "greedy, batch 1": {"do_sample": False},
    "greedy, batch 1, screen_output = True": {"do_sample": False, "screen": True},
    "greedy, batch 2": {"do_sample": False, "batch": 2},
    'greedy, batch 1, quantize="int8"': {"do_sample": False, "quantize": "int8"},
}

CHILD = """
import gc, json, sys
sys.path.insert(0, sys.argv[1])
import lmlab

def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key + ":")) * 1024

opts = json.loads(sys.argv[4])
screen, batch, quant = opts.pop("screen", None), opts.pop("batch", 1), opts.pop("quantize", None)
warm = lmlab.load(sys.argv[3], quantize=quant)
warm.module.screen_output = screen
warm.generate(["to be"] * batch, max_new_tokens=2, **opts)
del warm
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM starts again from here
base = status("VmRSS")
lm = lmlab.load(sys.argv[2], quantize=quant)
lm.module.screen_output = screen
loaded = status("VmRSS")
lm.generate(["abcdefghijklmnopqrstuvwxyzABCDEF"] * batch, max_new_tokens=1, eos_token_id=[], **opts)
first = status("VmRSS")
lm.generate(["abcdefghijklmnopqrstuvwxyzABCDEF"] * batch, max_new_tokens=8, eos_token_id=[], **opts)
print(json.dumps({"loaded": loaded - base, "first": first - base, "peak": status("VmHWM") - base,
                  "dtype": str(lm.module.dtype)}))
"""


def make_folders(tmp: Path) -> tuple[Path, Path]:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2Config, Qwen2ForCausalLM

    def save(folder: Path, vocab_size: int, **shape: int) -> None:
        torch.manual_seed(0)
        cfg = Qwen2Config(vocab_size=vocab_size, tie_word_embeddings=True, rope_theta=1_000_000.0, **shape)
        Qwen2ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)
        vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
        while len(vocab) < vocab_size:  # one token per ASCII letter; the rest never used
            vocab[f"Ġw{len(vocab)}"] = len(vocab)
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.save(str(folder / "tokenizer.json"))

    big, tiny = tmp / "qwen2-0.5b-bf16", tmp / "tiny-bf16"
    save(big, 151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
         num_key_value_heads=2, max_position_embeddings=32768)  # fmt: skip
    save(tiny, 512, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
         num_key_value_heads=2)  # fmt: skip
    return big, tiny


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a Hugging Face folder (default: the Qwen2-0.5B shape, random)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        big, tiny = make_folders(Path(tmp))
        if a.model:
            big = Path(a.model)
        weights = sum(f.stat().st_size for f in big.glob("*.safetensors"))
        print(f"{big.name}: {weights / 2**20:,.0f} MiB of weights\n")
        print("| case | after loading | after the first token | peak |")
        print("|---|--:|--:|--:|")
        for name, opts in CASES.items():
            out = subprocess.run(
                [sys.executable, "-c", CHILD, str(ROOT), str(big), str(tiny), json.dumps(opts)],
                capture_output=True, text=True,
            )  # fmt: skip
            if out.returncode:
                print(f"| {name} | failed: {out.stderr.strip().splitlines()[-1]} | | |")
                continue
            m = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {name} ({m['dtype'].removeprefix('torch.')}) | {m['loaded'] / weights:.2f}× "
                  f"| {m['first'] / weights:.2f}× | {m['peak'] / weights:.2f}× |")  # fmt: skip


if __name__ == "__main__":
    main()
