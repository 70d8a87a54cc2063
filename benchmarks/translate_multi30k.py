"""Translation from scratch: the Transformer and the RNN with attention under one wall-clock budget.

Multi30k English→German (``../shared/data/eval/mt/multi30k_*``): each model trains on the
29,000 training pairs for ``--minutes`` (model selection on the 1,014 validation pairs:
``DIR/best`` is the checkpoint with the best dev BLEU), then its best checkpoint translates
test2016 and test2017 (greedy and beam 4), scored with cased sacreBLEU (13a) and chrF.
``--pair tatoeba`` runs the same recipe on Tatoeba English→Chinese (``tatoeba_cmn_*``,
BLEU with ``tokenize="zh"``). Also printed: dev BLEU against minutes (from metrics.jsonl),
and where the time went (set-up, training steps, evaluations, test decoding).

Run each alone on an otherwise idle machine (2-core timings are meaningless under load):

    .venv/bin/python benchmarks/translate_multi30k.py --models transformer --minutes 45
    .venv/bin/python benchmarks/translate_multi30k.py --models rnn-attention --minutes 45
    .venv/bin/python benchmarks/translate_multi30k.py --pair tatoeba --models transformer --minutes 45
    .venv/bin/python benchmarks/translate_multi30k.py --minutes 0.5 --test-limit 50 --out /tmp/mt-smoke   # smoke
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MT = HERE.parent.parent / "shared" / "data" / "eval" / "mt"

#: the recipes (lmlab train options); chosen for 2 CPU cores and ~45 minutes
RECIPES = {
    "transformer": dict(
        model="transformer", d_model=256, n_layer=3, n_head=4, mlp="gelu", norm="layernorm", bias=True,
        dropout=0.1, label_smoothing=0.1, lr=1e-3, warmup=400, beta2=0.98, weight_decay=0.01,
        batch_tokens=4000, max_seq_len=96,
    ),
    "rnn-attention": dict(
        model="rnn-attention", cell="gru", attention="additive", d_model=256, hidden_size=512, n_layer=1,
        dropout=0.2, label_smoothing=0.1, lr=2e-3, warmup=200, weight_decay=0.01, batch_tokens=4000,
        max_seq_len=96,
    ),
}  # fmt: skip

PAIRS = {
    "multi30k": dict(
        train=("multi30k_train.en.gz", "multi30k_train.de.gz"), valid=("multi30k_val.en.gz", "multi30k_val.de.gz"),
        tests={"test2016": ("multi30k_test_2016_flickr.en.gz", "multi30k_test_2016_flickr.de.gz"),
               "test2017": ("multi30k_test_2017_flickr.en.gz", "multi30k_test_2017_flickr.de.gz")},
        vocab=8000, tokenize="13a",
    ),
    "tatoeba": dict(
        train=("tatoeba_cmn_train.tsv.gz", None), valid=("tatoeba_cmn_dev.tsv", None),
        tests={"test": ("tatoeba_cmn_test.tsv", None)}, vocab=8000, tokenize="zh", separate_vocab=True,
    ),
}  # fmt: skip


def _lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def _valid_tsv(pair: dict, out: Path) -> str:
    """--valid takes pairs in --data's forms; two aligned files become one TSV next to the run."""
    src, tgt = pair["valid"]
    if tgt is None:
        return str(MT / src)
    path = out / "valid.tsv"
    path.write_text("".join(f"{s}\t{t}\n" for s, t in zip(_lines(MT / src), _lines(MT / tgt))), encoding="utf-8")
    return str(path)


def bleu_over_minutes(run: Path) -> list[tuple[float, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["elapsed_s"] / 60, r["bleu"]) for r in rows if "bleu" in r]


def run_one(name: str, pair_name: str, minutes: float, out: Path, test_limit: int | None = None) -> dict:
    import lmlab
    from lmlab.eval.bleu import translation_scores
    from lmlab.pairs import read_pairs

    pair = PAIRS[pair_name]
    run = out / f"{pair_name}-{name}"
    run.mkdir(parents=True, exist_ok=True)
    src, tgt = pair["train"]
    t0 = time.perf_counter()
    res = lmlab.train(
        task="translate", data=str(MT / src), target_data=str(MT / tgt) if tgt else None,
        valid=_valid_tsv(pair, run), out=str(run / "run"), overwrite=True, tokenizer="bpe",
        vocab_size=pair["vocab"], separate_vocab=pair.get("separate_vocab", False), time=f"{minutes}m", eval_every=max(50, int(minutes * 7)), bleu_samples=300,
        progress=False, **RECIPES[name],
    )  # fmt: skip
    wall_train = time.perf_counter() - t0
    state = json.loads((run / "run" / "trainer_state.json").read_text())
    model = lmlab.load(run / "run" / "best")
    result = {
        "model": name, "pair": pair_name, "minutes_budget": minutes, "steps": res.step,
        "train_wall_s": round(wall_train, 1), "train_loop_s": round(state["elapsed"], 1),
        "setup_s": round(wall_train - state["elapsed"], 1), "parameters": model.module.num_parameters(),
        "best_dev_bleu": state.get("best_bleu"), "dev_bleu_by_minute": bleu_over_minutes(run / "run"), "tests": {},
    }
    for test, (s, t) in pair["tests"].items():
        pairs = read_pairs(str(MT / s), str(MT / t) if t else None)
        pairs = pairs.head(test_limit) if test_limit else pairs
        for beams in (1, 4):
            t1 = time.perf_counter()
            hyps = model.translate(pairs.sources, num_beams=beams, batch_size=32)
            dt = time.perf_counter() - t1
            scores = translation_scores(hyps, pairs.targets, tokenize=pair["tokenize"])
            (run / f"{test}.beam{beams}.hyp").write_text("\n".join(hyps) + "\n", encoding="utf-8")
            result["tests"][f"{test} beam{beams}"] = {
                "bleu": round(scores["bleu"], 2), "chrf": round(scores["chrf"], 2), "decode_s": round(dt, 1),
                "signature": scores["signature"]["bleu"],
            }  # fmt: skip
    (run / "result.json").write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="transformer,rnn-attention")
    ap.add_argument("--pair", choices=list(PAIRS), default="multi30k")
    ap.add_argument("--minutes", type=float, default=45.0)
    ap.add_argument("--out", default="runs/bench-translate")
    ap.add_argument("--test-limit", type=int, default=None, help="score only the first N test pairs (smoke tests)")
    a = ap.parse_args()
    print(f"load average before: {os.getloadavg()}")
    for name in a.models.split(","):
        r = run_one(name, a.pair, a.minutes, Path(a.out), a.test_limit)
        print(f"\n== {r['pair']} {r['model']}: {r['parameters'] / 1e6:.1f}M parameters, {r['steps']} steps")
        print(f"   time: set-up {r['setup_s']} s, training loop {r['train_loop_s']} s (incl. dev evaluations)")
        print(f"   best dev BLEU {r['best_dev_bleu']}; dev BLEU by minute: "
              + ", ".join(f"{m:.0f}′ {b:.1f}" for m, b in r["dev_bleu_by_minute"]))  # fmt: skip
        for k, v in r["tests"].items():
            print(f"   {k:16s} BLEU {v['bleu']:6.2f}  chrF {v['chrf']:6.2f}  ({v['decode_s']} s)  {v['signature']}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
