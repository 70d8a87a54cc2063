"""Char-level Tiny Shakespeare: nanoGPT's CPU recipe replicated vs lmlab's own recipe.

Both train on ../shared/data/tinyshakespeare.txt with the last 10% of characters as
validation (as nanoGPT does), for the same budget: 2000 steps x batch 12 x context 64.
The final validation loss is the mean over 200 random validation batches.

    .venv/bin/python benchmarks/shakespeare_char.py            # both recipes
    .venv/bin/python benchmarks/shakespeare_char.py --recipe lmlab --set lr=3e-3
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import lmlab

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tinyshakespeare.txt"

# nanoGPT's config/train_shakespeare_char.py with its "on a CPU" overrides:
# --n_layer=4 --n_head=4 --n_embd=128 --block_size=64 --batch_size=12 --max_iters=2000
# --lr_decay_iters=2000 --dropout=0.0 (learning_rate 1e-3, min_lr 1e-4, beta2 0.99, warmup 100)
NANOGPT = dict(
    n_layer=4,
    n_head=4,
    d_model=128,
    max_seq_len=64,
    pos="learned",
    norm="layernorm",
    mlp="gelu",
    bias=False,
    tie_embeddings=True,
    dropout=0.0,
    batch_size=12,
    steps=2000,
    lr=1e-3,
    min_lr=1e-4,
    warmup=100,
    weight_decay=0.1,
    beta1=0.9,
    beta2=0.99,
    grad_clip=1.0,
)
# lmlab's default recipe for this budget (what `lmlab train` uses; see README).
LMLAB = dict(batch_size=12, steps=2000, max_seq_len=64)


def run(name: str, recipe: dict, seed: int, out_root: Path) -> dict:
    out = out_root / name
    t0 = time.perf_counter()
    res = lmlab.train(
        data=str(DATA),
        out=str(out),
        tokenizer="char",
        seed=seed,
        eval_every=10**9,
        eval_batches=200,
        save_every=10**9,
        progress=False,
        overwrite=True,
        **recipe,
    )
    wall = time.perf_counter() - t0
    return {"recipe": name, "val_loss": res.val_loss, "wall_s": wall, "settings": recipe}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", choices=["both", "nanogpt", "lmlab"], default="both")
    ap.add_argument("--set", action="append", default=[], help="override a setting, e.g. lr=3e-3")
    ap.add_argument("--seed", type=int, default=1337)
    a = ap.parse_args()
    if not DATA.is_file():
        print(f"missing {DATA}: this benchmark needs ../shared/data/tinyshakespeare.txt", file=sys.stderr)
        return 1
    overrides = {}
    for kv in a.set:
        k, v = kv.split("=", 1)
        overrides[k] = json.loads(v) if v[:1] in "0123456789-[{tf" or v in ("true", "false") else v
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        if a.recipe in ("both", "nanogpt"):
            results.append(
                run("nanogpt", {**NANOGPT, **(overrides if a.recipe == "nanogpt" else {})}, a.seed, Path(tmp))
            )
            print(json.dumps(results[-1]), flush=True)
        if a.recipe in ("both", "lmlab"):
            results.append(run("lmlab", {**LMLAB, **overrides}, a.seed, Path(tmp)))
            print(json.dumps(results[-1]), flush=True)
    print(f"\n{'recipe':10s} {'val loss':>9s} {'wall s':>8s}")
    for r in results:
        print(f"{r['recipe']:10s} {r['val_loss']:9.4f} {r['wall_s']:8.1f}")
    if len(results) == 2:
        print(f"wall-time ratio lmlab / nanogpt: {results[1]['wall_s'] / results[0]['wall_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
