"""``lmlab quickstart``: the demo — train, evaluate, sample, and say where things are.

The demo can be run again and again (``make demo``): it replaces its own earlier run,
saying so, but never a run someone continued (``lmlab train --resume``) or trained there
with ``lmlab train``; the new demo then goes to ``OUT-2`` (or ``-3``, ...). Its own is one
whose ``.quickstart.json`` (written when the demo ends) still names the step and elapsed
time of the checkpoint in ``trainer_state.json``: any training since changes both.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from pathlib import Path

from lmlab.checkpoint import RunDir
from lmlab.cli.wording import perplexity_sentence
from lmlab.training import train

#: The demo's mark in its --out folder: the step and elapsed seconds it ended at.
MARK = ".quickstart.json"
#: The demo model's context, in characters: lmlab's default recipe has 64, code has longer
#: structure. What the demo suggests (``try_next``) fits in it, so it runs without the
#: sliding-window warning.
CONTEXT = 128


def _progress(folder: Path) -> dict | None:
    """The step and elapsed time of the run in ``folder`` (None if unreadable)."""
    try:
        state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
        return {"step": state["step"], "elapsed": state["elapsed"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_own_run(folder: Path) -> bool:
    """True if ``folder`` holds the checkpoint an earlier demo left, untouched since."""
    try:
        mark = json.loads((folder / MARK).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    progress = _progress(folder)
    return progress is not None and mark == progress


def demo_folder(out: str) -> tuple[str, list[str], bool]:
    """Where this demo trains: ``out`` or the first of ``out-2``, ``out-3``, ... that holds
    no checkpoint or an earlier demo's own. Returns it, the folders passed over (runs kept)
    and whether an earlier demo there is replaced."""
    kept: list[str] = []
    for k in itertools.count(1):
        folder = out if k == 1 else f"{out}-{k}"
        if not RunDir(folder).has_checkpoint():
            return folder, kept, False
        if is_own_run(Path(folder)):
            return folder, kept, True
        kept.append(folder)
    raise AssertionError("unreachable")


def quickstart(out: str = "runs/quickstart", time: str = "3m") -> None:
    import lmlab

    out, kept, replacing = demo_folder(out)
    if kept:
        print(
            f"lmlab quickstart: keeping {' and '.join(kept)} (trained further since the demo, or not by it); "
            f"this demo trains in {out}" + (", replacing the earlier demo there" if replacing else ""),
            file=sys.stderr,
        )
    elif replacing:
        print(
            f"lmlab quickstart: replacing the earlier demo run in {out} (its checkpoint and metrics); to keep "
            f"a demo run, continue it (`lmlab train --resume {out}`) or give --out another folder",
            file=sys.stderr,
        )
    print(
        f"lmlab quickstart: training a small Transformer on the built-in corpus for {time}", file=sys.stderr
    )
    # The old mark goes first: a demo killed before it writes its own must not leave the
    # earlier demo's mark describing a run it no longer describes.
    (Path(out) / MARK).unlink(missing_ok=True)
    res = train(
        data="builtin", out=out, time=time, overwrite=True, max_seq_len=CONTEXT, eval_every=100, save_every=250
    )
    progress = _progress(Path(out))
    if progress is not None:  # this checkpoint is the demo's own: the next demo may replace it
        (Path(out) / MARK).write_text(json.dumps(progress), encoding="utf-8")
    model = lmlab.load(out)
    vocab = model.tokenizer.get_vocab_size()
    if res.val_loss is not None:
        plain = perplexity_sentence(math.exp(res.val_loss), "character", vocab)
        print(f"\nvalidation loss {res.val_loss:.4f}, {plain}")
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

--- try next ---""")
    print("\n".join(try_next(out, res.step)))


def try_next(out: str, step: int) -> list[str]:
    """The commands the demo suggests; the generate one fits the CONTEXT (prompt + new
    tokens - 1 <= 128 characters), so the first thing a new user runs does not warn."""
    return [
        f'.venv/bin/lmlab generate {out} --prompt "def main(" --max-new-tokens 100',
        f".venv/bin/lmlab info {out}",
        f".venv/bin/lmlab train --resume {out} --steps {step + 1000}",
        ".venv/bin/lmlab train --data my_text.txt --out runs/mine --time 5m",
    ]
