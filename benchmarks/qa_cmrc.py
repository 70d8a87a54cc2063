"""Chinese extractive QA from scratch: CMRC 2018.

The encoder with a span head trains on ``cmrc2018_dev.json`` (3,219 questions; 5% held out for
model selection) for ``--minutes`` with a character tokenizer, then answers the questions of
``cmrc2018_trial.json``; exact match and F1 by CMRC 2018's character scoring. There is no
large QA training set here: no target, an honest figure.

``--pretrain-minutes M`` first pretrains the same encoder as a masked language model
(``--task mlm``, BERT's recipe) on Chinese text that holds no test question: the contexts of
``cmrc2018_dev.json`` (the training questions' own passages) and the ChnSentiCorp training
reviews; the reader then starts from it (``--init``). Compare at equal wall time: a
from-scratch run of ``--minutes`` = pretraining + fine-tuning minutes.

    .venv/bin/python benchmarks/qa_cmrc.py --minutes 30      # on an otherwise idle machine
    .venv/bin/python benchmarks/qa_cmrc.py --pretrain-minutes 20 --minutes 25
    .venv/bin/python benchmarks/qa_cmrc.py --minutes 0.5 --pretrain-minutes 0.3 --test-limit 50 --out /tmp/qa-smoke
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
QA = HERE.parent.parent / "shared" / "data" / "eval" / "qa"
REVIEWS = HERE.parent.parent / "shared" / "data" / "eval" / "sentiment" / "chnsenticorp_train.tsv"
RECIPE = dict(model="encoder", d_model=256, n_layer=4, n_head=4, mlp="gelu", norm="layernorm", bias=True, dropout=0.1,
              lr=5e-4, warmup=300, batch_size=32, max_seq_len=256, tokenizer="char", val_fraction=0.05)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--out", default="runs/bench-cmrc")
    ap.add_argument("--test-limit", type=int, default=None)
    ap.add_argument("--pretrain-minutes", type=float, default=0.0, help="masked-LM pretraining first (0: none)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    a = ap.parse_args()
    import torch

    import lmlab
    from lmlab.eval.squad import qa_scores
    from lmlab.qa_data import read_qa

    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    print(f"load average before: {os.getloadavg()}, threads {torch.get_num_threads()}")
    recipe, init = dict(RECIPE), None
    if a.pretrain_minutes > 0:
        out.mkdir(parents=True, exist_ok=True)
        contexts = list(dict.fromkeys(e.context for e in read_qa(QA / "cmrc2018_dev.json")))
        reviews = [r.rsplit("\t", 1)[0] for r in REVIEWS.read_text(encoding="utf-8").splitlines()[1:] if "\t" in r]
        corpus = out / "pretrain.txt"
        corpus.write_text("\n".join(contexts + reviews) + "\n", encoding="utf-8")
        body = {k: v for k, v in RECIPE.items() if k not in ("val_fraction", "warmup", "lr")}
        t0 = time.perf_counter()
        pre = lmlab.train(task="mlm", data=str(corpus), out=str(out / "mlm"), overwrite=True, time=f"{a.pretrain_minutes}m",
                          eval_every=100, progress=False, lr=1e-3, warmup=100, val_fraction=0.02, **body)  # fmt: skip
        print(f"masked-LM pretraining: {corpus.stat().st_size / 1e6:.1f} MB of text ({len(contexts):,} passages, "
              f"{len(reviews):,} reviews), {pre.step} steps in {time.perf_counter() - t0:.0f} s, dev loss "
              f"{pre.val_loss:.3f}")  # fmt: skip
        init = str(out / "mlm" / "best")
        recipe = {k: v for k, v in RECIPE.items() if k in ("lr", "warmup", "batch_size", "max_seq_len",
                                                          "val_fraction")}  # the rest comes with --init
    t0 = time.perf_counter()
    res = lmlab.train(task="qa", data=str(QA / "cmrc2018_dev.json"), out=str(out / "run"), overwrite=True, init=init,
                      time=f"{a.minutes}m", eval_every=200, progress=False, **recipe)  # fmt: skip
    wall = time.perf_counter() - t0
    test = read_qa(QA / "cmrc2018_trial.json")
    test = test[: a.test_limit] if a.test_limit else test
    qa = lmlab.pipeline("question-answering", str(out / "run" / "best"), batch_size=32, max_answer_len=30)
    t1 = time.perf_counter()
    got = qa([{"question": e.question, "context": e.context} for e in test])
    got = got if isinstance(got, list) else [got]
    answer_s = time.perf_counter() - t1
    s = qa_scores([g["answer"] for g in got], [e.answers for e in test])
    print(f"encoder {qa.model.module.num_parameters() / 1e6:.1f}M, {res.step} steps in {wall:.0f} s (best dev span F1 "
          f"{res.best.get('span_f1')}); trial: EM {s['exact_match']:.2f}  F1 {s['f1']:.2f} over {s['n']} questions "
          f"({s['scoring']}), {answer_s / len(test):.3f} s per question")  # fmt: skip
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
