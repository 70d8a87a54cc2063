"""Speculative decoding: prompt lookup and a draft model vs plain greedy, lmlab and transformers.

A target and a draft are trained here on the same text with one tokenizer (default: Tiny
Shakespeare, a 6-layer/384-wide target and a 2-layer/128-wide draft, byte-level BPE 2,048),
then exported as Hugging Face (GPT-2) folders so ``transformers`` runs the very same pair.
Both sides decode greedily at batch 1, in one process, rounds alternating:

- plain greedy;
- ``assistant_model``: the draft guesses ``--k`` tokens, the target checks them (lmlab
  ``num_assistant_tokens=k``; transformers' assisted generation with the same fixed k);
- ``prompt_lookup_num_tokens``: on a prompt the output is likely to copy (a passage of the
  training text, then its first line again), guesses from the text itself.

Reported: tokens/s, the ratio to plain greedy of the same library, lmlab's acceptance rate
(accepted / proposed guesses) and forward passes per token, and whether every output equals
plain greedy decoding (it must: the method is exact). Medians over rounds.

    .venv/bin/python benchmarks/speculative.py                         # trains 8 + 4 min, then ~5 min
    .venv/bin/python benchmarks/speculative.py --target runs/big --draft runs/draft   # reuse a pair
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHAKESPEARE = HERE.parent.parent / "shared" / "data" / "tinyshakespeare.txt"


def train_pair(out: Path, target_min: float, draft_min: float) -> tuple[Path, Path]:
    import lmlab

    common = dict(data=str(SHAKESPEARE), progress=False, overwrite=True, model="gpt", max_seq_len=512, dropout=0.0,
                  batch_size=8)
    target, draft = out / "target", out / "draft"
    if not (target / "model.safetensors").exists():
        lmlab.train(out=str(target), tokenizer="bpe", vocab_size=2048, n_layer=6, d_model=384, n_head=6,
                    time=f"{target_min}m", **common)  # fmt: skip
    if not (draft / "model.safetensors").exists():
        lmlab.train(out=str(draft), tokenizer=str(target / "tokenizer.json"), n_layer=2, d_model=128, n_head=4,
                    time=f"{draft_min}m", **common)  # fmt: skip
    return target, draft


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default=None, help="an lmlab run (default: train one)")
    ap.add_argument("--draft", default=None, help="an lmlab run with the target's tokenizer (default: train one)")
    ap.add_argument("--target-minutes", type=float, default=8.0)
    ap.add_argument("--draft-minutes", type=float, default=4.0)
    ap.add_argument("--k", type=int, default=4, help="guesses per check (draft and prompt lookup)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
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
        target_dir, draft_dir = train_pair(out, a.target_minutes, a.draft_minutes)
    hf_target, hf_draft = out / "hf-target", out / "hf-draft"
    export_hf(str(target_dir), hf_target)
    export_hf(str(draft_dir), hf_draft)
    model, draft = lmlab.load(str(target_dir)), lmlab.load(str(draft_dir))
    hf_m = AutoModelForCausalLM.from_pretrained(hf_target).eval()
    hf_d = AutoModelForCausalLM.from_pretrained(hf_draft).eval()

    text = SHAKESPEARE.read_text(encoding="utf-8")
    free = text[10_000:10_400]  # a passage to continue freely
    passage = text[20_000:20_500]
    copying = passage + "\n\n" + passage[:100]  # its first lines again: the output may copy the rest
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
    print(f"load average: {os.getloadavg()}; threads {a.threads}; k {a.k}; {n} new tokens; {a.rounds} rounds")
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
