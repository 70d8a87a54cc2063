"""Speculative decoding: prompt lookup and a draft model vs plain greedy, lmlab and transformers.

A target and a draft are trained here on the same text with one tokenizer (default: Tiny
Shakespeare, characters; a 12-layer/768-wide target, GPT-2 small's body, 20 minutes; a
2-layer/128-wide draft, 4 minutes; both trained in bf16), then exported as Hugging Face
(GPT-2) folders so ``transformers`` runs the very same pair. A draft pays when a pass of it
costs a small share of a target pass: on a 2-core CPU a small model's pass is ~1 ms of
per-call overhead, so the target must be big enough that its pass is 10-20 times that.
Both sides decode greedily at batch 1 in ``--dtype`` (bf16: how a CPU runs a big model), in
one process, rounds alternating:

- plain greedy;
- ``assistant_model``: the draft guesses ``--k`` tokens, the target checks them (lmlab
  ``num_assistant_tokens=k``; transformers' assisted generation with the same fixed k);
- ``prompt_lookup_num_tokens``: on a prompt the output is likely to copy (a passage of the
  training text, then its first line again), guesses from the text itself.

Reported: tokens/s, the ratio to plain greedy of the same library, lmlab's acceptance rate
(accepted / proposed guesses) and forward passes per token, and whether every output equals
plain greedy decoding (it must: the method is exact). Medians over rounds.

    .venv/bin/python benchmarks/speculative.py                         # trains 20 + 4 min, then ~5 min
    .venv/bin/python benchmarks/speculative.py --target runs/big --draft runs/draft   # reuse a pair
    .venv/bin/python benchmarks/speculative.py --tokenizer bpe --target-shape 6x384 --target-minutes 8 \
        --target-lr 2e-3 --precision fp32 --dtype fp32 --out runs/bench-speculative-small   # the first, small pair
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHAKESPEARE = HERE.parent.parent / "shared" / "data" / "tinyshakespeare.txt"


def train_pair(out: Path, a: argparse.Namespace) -> tuple[Path, Path]:
    import lmlab

    common = dict(data=str(SHAKESPEARE), progress=False, overwrite=True, model="gpt", dropout=0.0)
    tok = dict(tokenizer="char") if a.tokenizer == "char" else dict(tokenizer="bpe", vocab_size=2048)
    target, draft = out / "target", out / "draft"
    if not (target / "model.safetensors").exists():
        layers, width = (int(v) for v in a.target_shape.split("x"))
        lmlab.train(out=str(target), n_layer=layers, d_model=width, n_head=width // 64, time=f"{a.target_minutes}m",
                    max_seq_len=a.seq_len, batch_size=a.batch_size, lr=a.target_lr, precision=a.precision, **tok,
                    **common)  # fmt: skip
    if not (draft / "model.safetensors").exists():
        lmlab.train(out=str(draft), tokenizer=str(target / "tokenizer.json"), n_layer=2, d_model=128, n_head=4,
                    time=f"{a.draft_minutes}m", max_seq_len=a.seq_len, batch_size=a.batch_size,
                    precision=a.precision, **common)  # fmt: skip
    return target, draft


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default=None, help="an lmlab run (default: train one)")
    ap.add_argument("--draft", default=None, help="an lmlab run with the target's tokenizer (default: train one)")
    ap.add_argument("--target-minutes", type=float, default=20.0)
    ap.add_argument("--draft-minutes", type=float, default=4.0)
    ap.add_argument("--target-shape", default="12x768", help="the target's layers x width (the draft: 2x128)")
    ap.add_argument("--target-lr", type=float, default=6e-4)
    ap.add_argument("--tokenizer", default="char", choices=("char", "bpe"), help="char, or a byte-level BPE of 2,048")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--precision", default="bf16", choices=("fp32", "bf16"), help="training arithmetic")
    ap.add_argument("--k", type=int, default=4, help="guesses per check (draft and prompt lookup)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bf16", choices=("fp32", "bf16"), help="both sides decode in this dtype")
    ap.add_argument("--out", default="runs/bench-speculative")
    a = ap.parse_args()

    import lmlab

    lmlab._spin_for_decoding()
    import torch
    from transformers import AutoModelForCausalLM

    from lmlab.hf import export_hf

    torch.set_num_threads(a.threads)
    out = Path(a.out)
    if a.target and a.draft:
        target_dir, draft_dir = Path(a.target), Path(a.draft)
    else:
        target_dir, draft_dir = train_pair(out, a)
    hf_target, hf_draft = out / "hf-target", out / "hf-draft"
    export_hf(str(target_dir), hf_target)
    export_hf(str(draft_dir), hf_draft)
    model, draft = lmlab.load(str(target_dir), dtype=a.dtype), lmlab.load(str(draft_dir), dtype=a.dtype)
    torch_dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    hf_m = AutoModelForCausalLM.from_pretrained(hf_target, dtype=torch_dtype).eval()
    hf_d = AutoModelForCausalLM.from_pretrained(hf_draft, dtype=torch_dtype).eval()

    text = SHAKESPEARE.read_text(encoding="utf-8")
    f, p, again = (400, 500, 100) if a.tokenizer == "bpe" else (200, 250, 60)  # in characters: ~the same tokens
    free = text[10_000 : 10_000 + f]  # a passage to continue freely
    passage = text[20_000 : 20_000 + p]
    copying = passage + "\n\n" + passage[:again]  # its first lines again: the output may copy the rest
    n = a.new_tokens
    hf_plain = dict(do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)

    def lm(prompt, **extra):
        stats: dict = {}
        t0 = time.perf_counter()
        if "prompt_lookup_num_tokens" in extra or "assistant_model" in extra:
            from lmlab.generate import GenerationConfig
            from lmlab.generate.speculative import speculative_sample

            cfg = GenerationConfig(temperature=0, max_new_tokens=n, eos_token_id=[],
                                   **{k: v for k, v in extra.items() if k != "assistant_model"})  # fmt: skip
            rounds = speculative_sample(model.module, [model.encode(prompt)], cfg, [None],
                                        draft=extra.get("assistant_model"), stats=stats)  # fmt: skip
            ids = [c.token for r in rounds for c in r]
        else:
            from lmlab.generate import GenerationConfig, sample

            cfg = GenerationConfig(temperature=0, max_new_tokens=n, eos_token_id=[])
            ids = [c[0].token for c in sample(model.module, [model.encode(prompt)], cfg, [None])]
        return time.perf_counter() - t0, ids, stats

    def hf(prompt, **extra):
        x = torch.tensor([model.encode(prompt)])
        t0 = time.perf_counter()
        with torch.inference_mode():
            y = hf_m.generate(x, attention_mask=torch.ones_like(x), **hf_plain, **extra)
        return time.perf_counter() - t0, y[0, x.shape[1]:].tolist(), {}

    if hasattr(hf_d, "generation_config"):  # a fixed k, as lmlab's num_assistant_tokens
        hf_d.generation_config.num_assistant_tokens = a.k
        hf_d.generation_config.num_assistant_tokens_schedule = "constant"
    cases = {
        ("free", "plain"): (lambda: lm(free), lambda: hf(free)),
        ("free", "draft"): (lambda: lm(free, assistant_model=draft.module, num_assistant_tokens=a.k),
                            lambda: hf(free, assistant_model=hf_d)),
        ("copying", "plain"): (lambda: lm(copying), lambda: hf(copying)),
        ("copying", "lookup"): (lambda: lm(copying, prompt_lookup_num_tokens=a.k),
                                lambda: hf(copying, prompt_lookup_num_tokens=a.k)),
        ("copying", "draft"): (lambda: lm(copying, assistant_model=draft.module, num_assistant_tokens=a.k),
                               lambda: hf(copying, assistant_model=hf_d)),
    }  # fmt: skip
    times: dict = {key: ([], []) for key in cases}
    outputs: dict = {}
    stats_of: dict = {}
    for f_lm, f_hf in cases.values():  # warm-up: one of each
        f_lm(), f_hf()
    for r in range(a.rounds):
        for key, (f_lm, f_hf) in cases.items():
            order = [(0, f_lm), (1, f_hf)] if r % 2 == 0 else [(1, f_hf), (0, f_lm)]
            for side, f in order:
                t, ids, st = f()
                times[key][side].append(t)
                outputs[key, side] = ids
                if st:
                    stats_of[key] = st
    print(f"load average: {os.getloadavg()}; {a.dtype}; threads {a.threads}; k {a.k}; {n} new tokens; {a.rounds} rounds")
    print(f"target {model.module.num_parameters() / 1e6:.1f}M, draft {draft.module.num_parameters() / 1e6:.1f}M params")
    print(f"{'prompt':8s} {'method':7s} {'lmlab tok/s':>11s} {'vs plain':>8s} {'hf tok/s':>9s} {'vs plain':>8s} "
          f"{'lmlab/hf':>8s} {'accept':>7s} {'passes/tok':>10s}  same as greedy")  # fmt: skip
    for (prompt, method) in cases:
        lm_t, hf_t = statistics.median(times[prompt, method][0]), statistics.median(times[prompt, method][1])
        lm_p, hf_p = statistics.median(times[prompt, "plain"][0]), statistics.median(times[prompt, "plain"][1])
        st = stats_of.get((prompt, method), {})
        acc = f"{st['accepted'] / st['proposed']:.0%}" if st.get("proposed") else "-"
        passes = f"{st['forwards'] / n:.2f}" if st else "1.00"
        plain = (prompt, "plain")
        same = (outputs[(prompt, method), 0] == outputs[plain, 0], outputs[(prompt, method), 1] == outputs[plain, 1],
                outputs[plain, 0] == outputs[plain, 1])  # fmt: skip
        print(f"{prompt:8s} {method:7s} {n / lm_t:11.1f} {lm_p / lm_t:7.2f}x {n / hf_t:9.1f} {hf_p / hf_t:7.2f}x "
              f"{hf_t / lm_t:7.2f}x {acc:>7s} {passes:>10s}  lmlab {same[0]}, hf {same[1]}, lmlab=hf {same[2]}")  # fmt: skip


if __name__ == "__main__":
    main()
