"""Chinese extractive QA from scratch: CMRC 2018.

The encoder with a span head trains on ``cmrc2018_dev.json`` (3,219 questions; 5% held out for
model selection) for ``--minutes`` with a character tokenizer, then answers the questions of
``cmrc2018_trial.json``; exact match and F1 by CMRC 2018's character scoring. There is no
large QA training set here: no target, an honest figure.

    .venv/bin/python benchmarks/qa_cmrc.py --minutes 30      # on an otherwise idle machine
    .venv/bin/python benchmarks/qa_cmrc.py --minutes 0.5 --test-limit 50 --out /tmp/qa-smoke
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
QA = HERE.parent.parent / "shared" / "data" / "eval" / "qa"
RECIPE = dict(model="encoder", d_model=256, n_layer=4, n_head=4, mlp="gelu", norm="layernorm", bias=True, dropout=0.1,
              lr=5e-4, warmup=300, batch_size=32, max_seq_len=256, tokenizer="char", val_fraction=0.05)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--out", default="runs/bench-cmrc")
    ap.add_argument("--test-limit", type=int, default=None)
    a = ap.parse_args()
    import lmlab
    from lmlab.eval.squad import qa_scores
    from lmlab.qa_data import read_qa

    out = Path(a.out)
    print(f"load average before: {os.getloadavg()}")
    t0 = time.perf_counter()
    res = lmlab.train(task="qa", data=str(QA / "cmrc2018_dev.json"), out=str(out / "run"), overwrite=True,
                      time=f"{a.minutes}m", eval_every=200, progress=False, **RECIPE)  # fmt: skip
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
