"""``lmlab quickstart``: the demo — train, evaluate, sample, and say where things are."""

from __future__ import annotations

import math
import sys

from lmlab.train import train


def quickstart(out: str = "runs/quickstart", time: str = "3m") -> None:
    import lmlab

    print(
        f"lmlab quickstart: training a small Transformer on the built-in corpus for {time}", file=sys.stderr
    )
    res = train(data="builtin", out=out, time=time, overwrite=True, eval_every=100, save_every=250)
    model = lmlab.load(out)
    print("", file=sys.stderr)
    if res.val_loss is not None:
        print(
            f"validation loss {res.val_loss:.4f}   perplexity {math.exp(res.val_loss):.2f}   "
            f"(a uniform guess over {model.tokenizer.get_vocab_size()} characters: "
            f"{model.tokenizer.get_vocab_size()})"
        )
    prompts = ["def ", "import ", "class "]
    for i, p in enumerate(prompts):
        text = model.generate(p, max_new_tokens=200, temperature=0.8, seed=i)
        print(f"\n--- sample {i + 1} (prompt {p!r}, temperature 0.8, seed {i}) ---")
        print(p + text)
    print(f"""
--- where things are ---
checkpoint    {out}/            (config.json, model.safetensors, tokenizer.json, ...)
best model    {out}/best/
metrics       {out}/metrics.jsonl
loss curve    {res.loss_png}

--- try next ---
.venv/bin/lmlab generate {out} --prompt "def main(" --max-new-tokens 300
.venv/bin/lmlab info {out}
.venv/bin/lmlab train --resume {out} --steps {res.step + 1000}
.venv/bin/lmlab train --data my_text.txt --out runs/mine --time 5m""")
