"""``lmlab quickstart``: the demo — train, evaluate, sample, and say where things are."""

from __future__ import annotations

import math
import sys

from lmlab.training import train


def quickstart(out: str = "runs/quickstart", time: str = "3m") -> None:
    import lmlab

    print(
        f"lmlab quickstart: training a small Transformer on the built-in corpus for {time}", file=sys.stderr
    )
    # lmlab's default recipe, with a 128-character context: code has longer structure.
    res = train(
        data="builtin", out=out, time=time, overwrite=True, max_seq_len=128, eval_every=100, save_every=250
    )
    model = lmlab.load(out)
    vocab = model.tokenizer.get_vocab_size()
    if res.val_loss is not None:
        ppl = math.exp(res.val_loss)
        print(
            f"\nvalidation loss {res.val_loss:.4f} nats/character, perplexity {ppl:.2f}: as unsure as a "
            f"uniform pick among {ppl:.0f} characters (a uniform guess over all {vocab} would score {vocab})"
        )
    prompts = ["def ", "import ", "class "]
    for i, p in enumerate(prompts):
        n = model.config.max_seq_len - len(model.encode(p))  # stay inside the context window
        text = model.generate(p, max_new_tokens=n, temperature=0.8, seed=i)
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
