"""Dialogue summarization from scratch: DialogSum, the encoder-decoder against an extractive baseline.

The Transformer encoder-decoder trains on ``dialogsum.train.jsonl.gz`` (12,460 dialogues; model
selection by ROUGE-L on 200 of ``dialogsum.dev.jsonl``) for ``--minutes``, then summarizes the
500 test dialogues (beam 4); ROUGE-1/2/L/Lsum F1 (rouge-score, stemmed) against the three
references of each (their mean; the max printed too). The extractive baseline is scored by
the same code: the first turn and the longest turn, speaker tags removed.

    .venv/bin/python benchmarks/summarize_dialogsum.py --minutes 60     # on an otherwise idle machine
    .venv/bin/python benchmarks/summarize_dialogsum.py --minutes 0.5 --test-limit 20 --out /tmp/ds-smoke
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DS = HERE.parent.parent / "shared" / "data" / "eval" / "summarization"
RECIPE = dict(
    model="transformer", d_model=256, n_layer=3, n_head=4, mlp="gelu", norm="layernorm", bias=True, dropout=0.1,
    label_smoothing=0.1, lr=1e-3, warmup=400, beta2=0.98, weight_decay=0.01, batch_tokens=6000, max_seq_len=512,
    tokenizer="bpe", vocab_size=8000,
)  # fmt: skip


def extractive(dialogue: str) -> str:
    """The first turn and the longest other turn, without the #PersonN#: tags."""
    turns = [re.sub(r"^#Person\d#:\s*", "", t).strip() for t in dialogue.split("\n") if t.strip()]
    if len(turns) < 2:
        return turns[0] if turns else ""
    longest = max(turns[1:], key=len)
    return f"{turns[0]} {longest}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--out", default="runs/bench-dialogsum")
    ap.add_argument("--test-limit", type=int, default=None)
    a = ap.parse_args()
    import lmlab
    from lmlab.eval.rouge import rouge_scores

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"load average before: {os.getloadavg()}")
    dev = [json.loads(x) for x in (DS / "dialogsum.dev.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
    (out / "dev.jsonl").write_text("".join(json.dumps(d) + "\n" for d in dev[:200]), encoding="utf-8")
    test = [json.loads(x) for x in (DS / "dialogsum.test.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
    test = test[: a.test_limit] if a.test_limit else test
    refs = [[t["summary1"], t["summary2"], t["summary3"]] for t in test]
    base = [extractive(t["dialogue"]) for t in test]
    for agg in ("mean", "max"):
        s = rouge_scores(base, refs, aggregate=agg)
        print(f"extractive baseline ({agg} over references): " + "  ".join(f"{k} {s[k]:.2f}" for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")))
    t0 = time.perf_counter()
    res = lmlab.train(task="summarize", data=str(DS / "dialogsum.train.jsonl.gz"), valid=str(out / "dev.jsonl"),
                      source_field="dialogue", target_field="summary", out=str(out / "run"), overwrite=True,
                      time=f"{a.minutes}m", eval_every=max(50, int(a.minutes * 6)), bleu_samples=200, progress=False,
                      **RECIPE)  # fmt: skip
    wall = time.perf_counter() - t0
    model = lmlab.load(out / "run" / "best")
    t1 = time.perf_counter()
    hyps = model.translate([t["dialogue"] for t in test], task="summarization", num_beams=4, batch_size=16,
                           no_repeat_ngram_size=3, max_new_tokens=80)  # fmt: skip
    decode = time.perf_counter() - t1
    (out / "summaries.txt").write_text("\n".join(" ".join(h.splitlines()) for h in hyps) + "\n", encoding="utf-8")
    print(f"encoder-decoder {model.module.num_parameters() / 1e6:.1f}M, {res.step} steps in {wall:.0f} s "
          f"(best dev ROUGE-L {res.best.get('rougeL')}), test decoding {decode:.0f} s")  # fmt: skip
    for agg in ("mean", "max"):
        s = rouge_scores(hyps, refs, aggregate=agg)
        print(f"encoder-decoder ({agg} over references):    " + "  ".join(f"{k} {s[k]:.2f}" for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")))
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
