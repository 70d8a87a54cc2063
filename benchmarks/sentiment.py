"""Sentiment classification from scratch, and with language-model pretraining (--init).

SST-2 (``sst2_train.tsv.gz``, 67,349 phrases; model selection on 1,000 held-out *sentences*
— phrases of 12+ words — with every training phrase inside or around one of them removed, so
the selection set shares no text with training, as the dev set does not; scored on
``sst2_dev.tsv``, 872 sentences: GLUE's test labels are not public) and
ChnSentiCorp (``chnsenticorp_train.tsv``; model selection on ``chnsenticorp_dev.tsv``; scored
on ``chnsenticorp_test.tsv``), each with an LSTM, the encoder and the decoder-only
Transformer under one wall-clock budget (``--minutes``), and with pretraining: a language
model of the same body trained first on unlabelled text — the training sentences without
their labels (+ ``wikitext2_valid.txt`` for English) — for ``--pretrain-minutes``, then
fine-tuned on the labels (``--init``). Reported: accuracy and macro-F1 on the scored split,
steps, and the wall time of each stage (pretraining apart from the classifier's).

Run alone on an otherwise idle machine (2-core timings are meaningless under load):

    .venv/bin/python benchmarks/sentiment.py --datasets sst2 --runs lstm,encoder --minutes 30
    .venv/bin/python benchmarks/sentiment.py --datasets sst2 --runs lstm+lm,gpt+lm --pretrain-minutes 20
    .venv/bin/python benchmarks/sentiment.py --datasets chnsenticorp --runs lstm,encoder
    .venv/bin/python benchmarks/sentiment.py --datasets chnsenticorp --runs bilstm --tokenizer bpe --vocab-size 8000
    .venv/bin/python benchmarks/sentiment.py --datasets chnsenticorp --runs bilstm --minutes 28 --max-seq-len 512
    .venv/bin/python benchmarks/sentiment.py --datasets chnsenticorp --runs bilstm --minutes 27 --max-seq-len 512 --ema-decay 0.998
    .venv/bin/python benchmarks/sentiment.py --datasets chnsenticorp --runs bilstm --minutes 27 --max-seq-len 512 \
        --ema-decay 0.998 --bigram-buckets 40000
    .venv/bin/python benchmarks/sentiment.py --datasets chnsenticorp --runs bilstm --minutes 27 --max-seq-len 512 \
        --ema-decay 0.998 --bigram-buckets 40000 --set weight_decay=1.0 --set eval_every=100   # the best recipe
    .venv/bin/python benchmarks/sentiment.py --datasets chnsenticorp --runs encoder+mlm --minutes 15 --pretrain-minutes 15
    .venv/bin/python benchmarks/sentiment.py --datasets sst2 --runs bilstm --ema-decay 0.998 --set steps=6000 --set time=null
    .venv/bin/python benchmarks/sentiment.py --datasets sst2 --runs bilstm --ema-decay 0.998 --set steps=3200 --set time=null \
        --refit   # every phrase, a step count chosen by the run above; the last checkpoint scored
    .venv/bin/python benchmarks/sentiment.py --minutes 0.3 --pretrain-minutes 0.2 --out /tmp/sa-smoke   # smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
EVAL = HERE.parent.parent / "shared" / "data" / "eval"

DATASETS = {
    "sst2": dict(train="sentiment/sst2_train.tsv.gz", valid="sentences", test="sentiment/sst2_dev.tsv",
                 tokenizer="bpe", vocab_size=16000, max_seq_len=64, extra_text=["lm/wikitext2_valid.txt"]),
    "chnsenticorp": dict(train="sentiment/chnsenticorp_train.tsv", valid="sentiment/chnsenticorp_dev.tsv",
                         test="sentiment/chnsenticorp_test.tsv", tokenizer="char", vocab_size=8000, max_seq_len=256,
                         extra_text=[]),
}  # fmt: skip

# one recipe per body: the classifier's options (the language model of a +lm run shares the body's)
BODIES = {
    "lstm": dict(model="lstm", d_model=300, hidden_size=512, n_layer=1, dropout=0.3, lr=2e-3, warmup=200, batch_size=64),
    "bilstm": dict(model="lstm", bidirectional=True, d_model=300, hidden_size=512, n_layer=1, dropout=0.3, lr=2e-3,
                   warmup=200, batch_size=64),
    "gru": dict(model="gru", d_model=300, hidden_size=512, n_layer=1, dropout=0.3, lr=2e-3, warmup=200, batch_size=64),
    "encoder": dict(model="encoder", d_model=256, n_layer=4, n_head=4, dropout=0.1, lr=5e-4, warmup=500, batch_size=64,
                    mlp="gelu", norm="layernorm"),
    "gpt": dict(model="gpt", d_model=256, n_layer=4, n_head=4, dropout=0.1, lr=5e-4, warmup=500, batch_size=64),
}  # fmt: skip


def _lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def sentence_split(train: Path, out: Path, n_hold: int = 1000, min_words: int = 12, seed: int = 0) -> tuple[Path, Path]:
    """SST-2's training set holds every phrase of each sentence with its own label: a random
    held-out slice of it is mostly sub-phrases of training sentences (92% accurate when whole
    dev sentences are 83%), and picks late, overfit checkpoints. Hold out ``n_hold`` phrases of
    ``min_words``+ words instead (sentences, or nearly) and drop every training phrase inside
    one of them (a sub-phrase) or containing one: no text is shared."""
    import random

    rows = [tuple(r.rsplit("\t", 1)) for r in _lines(train)[1:] if "\t" in r]
    rows = [(t.strip(), y) for t, y in rows]
    cand = [i for i, (t, _) in enumerate(rows) if len(t.split()) >= min_words]
    hold = set(random.Random(seed).sample(cand, n_hold))
    inside = set()  # every word span of a held-out phrase
    for i in hold:
        w = rows[i][0].split()
        inside.update(" ".join(w[a:b]) for a in range(len(w)) for b in range(a + 1, len(w) + 1))
    held = [f" {rows[i][0]} " for i in hold]
    keep = [(t, y) for i, (t, y) in enumerate(rows)
            if i not in hold and t not in inside and not (len(t.split()) >= min_words and any(h in f" {t} " for h in held))]  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    tr, sel = out / "train.tsv", out / "selection.tsv"
    tr.write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in keep), encoding="utf-8")
    sel.write_text("text\tlabel\n" + "".join(f"{rows[i][0]}\t{rows[i][1]}\n" for i in sorted(hold)), encoding="utf-8")
    print(f"sst2: {len(keep):,} training phrases, {len(hold):,} held-out sentences for selection "
          f"({len(rows) - len(keep) - len(hold):,} phrases inside or around them dropped)", flush=True)  # fmt: skip
    return tr, sel


def unlabelled_corpus(ds: dict, out: Path) -> Path:
    """The training texts without their labels (+ extra plain text): the pretraining corpus."""
    texts = [row.rsplit("\t", 1)[0] for row in _lines(EVAL / ds["train"])[1:] if "\t" in row]
    for extra in ds["extra_text"]:
        texts += [line for line in _lines(EVAL / extra) if line.strip()]
    path = out / "unlabelled.txt"
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    return path


def tokenizer_opts(ds: dict) -> dict:
    """--tokenizer, and --vocab-size where it is read (a BPE trained here)."""
    return dict(tokenizer=ds["tokenizer"], **({"vocab_size": ds["vocab_size"]} if ds["tokenizer"] == "bpe" else {}))


def run_one(dataset: str, run: str, minutes: float, pretrain_minutes: float, out: Path, ema_decay: float = 0.0,
            bigram_buckets: int = 0, extra: dict | None = None, refit: bool = False) -> dict:
    import lmlab
    from lmlab.eval.classification import classification_scores
    from lmlab.labeled import read_labeled

    ds = DATASETS[dataset]
    body_name, pretrain = run.removesuffix("+lm").removesuffix("+mlm"), run.endswith(("+lm", "+mlm"))
    body = BODIES[body_name]
    folder = out / f"{dataset}-{run.replace('+', '-')}"
    folder.mkdir(parents=True, exist_ok=True)
    result = {"dataset": dataset, "run": run, "minutes_budget": minutes, "ema_decay": ema_decay,
              "bigram_buckets": bigram_buckets, "options": extra or {}, "refit": refit}  # fmt: skip
    common = dict(progress=False, overwrite=True, max_seq_len=ds["max_seq_len"])
    init = None
    if pretrain:
        if (body_name == "encoder") != run.endswith("+mlm"):
            raise SystemExit("an encoder pretrains as a masked LM (encoder+mlm); lstm, gru and gpt as an LM (+lm)")
        corpus = unlabelled_corpus(ds, folder)
        lm_opts = {k: v for k, v in body.items() if k not in ("batch_size", "bidirectional")}
        if body_name == "encoder":  # BERT's masked-LM pretraining (--task mlm)
            lm_opts.update(task="mlm", warmup=100, lr=1e-3)
        t0 = time.perf_counter()
        res = lmlab.train(data=str(corpus), out=str(folder / "lm"), **tokenizer_opts(ds),
                          time=f"{pretrain_minutes}m", batch_size=32, eval_every=200, **lm_opts, **common)  # fmt: skip
        result["pretrain"] = {"wall_s": round(time.perf_counter() - t0, 1), "steps": res.step,
                              "val_loss": res.val_loss, "corpus_chars": corpus.stat().st_size}  # fmt: skip
        init = str(folder / "lm")
    opts = dict(body) if init is None else {k: v for k, v in body.items() if k in ("lr", "warmup", "batch_size", "bidirectional")}
    if init is None:
        opts.update(tokenizer_opts(ds))
    if bigram_buckets and opts.get("bidirectional"):  # read by a bidirectional body only
        opts["bigram_buckets"] = bigram_buckets
    train = str(EVAL / ds["train"])
    valid = str(EVAL / ds["valid"]) if ds["valid"] else None
    if ds["valid"] == "sentences":
        split_train, valid = map(str, sentence_split(EVAL / ds["train"], folder / "split"))
        train = train if refit else split_train  # --refit: every phrase; the held-out ones only watched
    elif refit and valid:  # --refit: the training texts and the dev texts (dev only watched)
        both = folder / "train+dev.tsv"
        both.write_text("\n".join(_lines(EVAL / ds["train"]) + _lines(EVAL / ds["valid"])[1:]) + "\n", encoding="utf-8")
        train = str(both)
    t0 = time.perf_counter()
    kw = dict(task="classify", data=train, valid=valid, init=init, out=str(folder / "clf"), time=f"{minutes}m",
              val_fraction=0.03, ema_decay=ema_decay, eval_every=200, **opts, **common)  # fmt: skip
    res = lmlab.train(**{**kw, **(extra or {})})
    result["train"] = {"wall_s": round(time.perf_counter() - t0, 1), "steps": res.step, "best_dev": res.best}
    test = read_labeled(EVAL / ds["test"])
    # the checkpoint selection picked, and the run's last one (--refit: the last is the result;
    # its selection set was trained on, so its "best" is not a selection)
    for key, ckpt in (("test", folder / "clf" / "best"), ("test_last", folder / "clf")):
        clf = lmlab.pipeline("sentiment-analysis", str(ckpt), batch_size=64)
        t0 = time.perf_counter()
        predicted = [r["label"] for r in clf(test.texts)]
        scores = classification_scores(predicted, test.labels, clf.model.config.labels)
        result[key] = {"split": ds["test"], "accuracy": round(scores["accuracy"], 4),
                       "macro_f1": round(scores["macro_f1"], 4), "n": scores["n"],
                       "confusion_matrix": scores["confusion_matrix"], "predict_s": round(time.perf_counter() - t0, 1)}  # fmt: skip
    if refit:
        result["test"], result["test_selected"] = result["test_last"], result["test"]
    result["parameters"] = clf.model.module.num_parameters()
    (folder / "result.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", default="sst2,chnsenticorp")
    ap.add_argument("--runs", default="lstm,encoder,gpt,lstm+lm,gpt+lm",
                    help="bodies; +lm: with LM pretraining; encoder+mlm: with masked-LM pretraining")
    ap.add_argument("--minutes", type=float, default=30.0, help="the classifier's budget")
    ap.add_argument("--pretrain-minutes", type=float, default=20.0, help="the language model's budget (+lm runs)")
    ap.add_argument("--out", default="runs/bench-sentiment")
    ap.add_argument("--tokenizer", default=None, help="override the dataset's tokenizer (char, bpe, or a tokenizer.json path)")
    ap.add_argument("--vocab-size", type=int, default=None, help="override the dataset's vocabulary size")
    ap.add_argument("--max-seq-len", type=int, default=None, help="override the dataset's token limit (longer texts are cut)")
    ap.add_argument("--ema-decay", type=float, default=0.0, help="the classifier's weight average (lmlab train --ema-decay)")
    ap.add_argument("--bigram-buckets", type=int, default=0, help="bilstm: hashed pair embeddings (lmlab train --bigram-buckets)")
    ap.add_argument("--dropout", type=float, default=None, help="override every body's dropout")
    ap.add_argument("--refit", action="store_true",
                    help="train on every labelled text (sst2: the held-out sentences too; chnsenticorp: train + dev) "
                         "and score the last checkpoint; pair with a fixed --set steps=N --set time=null chosen by "
                         "a run without it")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any other lmlab.train option of the classifier (e.g. weight_decay=1.0, eval_every=100)")
    a = ap.parse_args()
    from lmlab.training import TrainConfig

    for ds in DATASETS.values():
        given = (("tokenizer", a.tokenizer), ("vocab_size", a.vocab_size), ("max_seq_len", a.max_seq_len))
        ds.update({k: v for k, v in given if v is not None})
    if a.dropout is not None:
        for body in BODIES.values():
            body["dropout"] = a.dropout
    extra = {}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for item in a.set:
        key, eq, value = item.partition("=")
        key = key.replace("-", "_")
        if not eq or key not in fields:
            ap.error(f"--set {item}: give KEY=VALUE with KEY an lmlab.train option (e.g. weight_decay=1.0)")
        try:
            extra[key] = json.loads(value)
        except json.JSONDecodeError:
            extra[key] = value
    out = Path(a.out)
    print(f"load average before: {os.getloadavg()}")
    for dataset in a.datasets.split(","):
        for run in a.runs.split(","):
            r = run_one(dataset, run, a.minutes, a.pretrain_minutes, out, a.ema_decay, a.bigram_buckets, extra, a.refit)
            pre = r.get("pretrain")
            pre_txt = f"; pretraining {pre['wall_s']} s, {pre['steps']} steps (val loss {pre['val_loss']:.3f})" if pre else ""
            t = r["test"]
            print(f"{dataset:13s} {run:9s} {r['parameters'] / 1e6:5.2f}M  {t['split']}: accuracy {t['accuracy']:.4f}  "
                  f"macro-F1 {t['macro_f1']:.4f}  | classifier {r['train']['wall_s']} s, {r['train']['steps']} steps, "
                  f"best dev {r['train']['best_dev']}{pre_txt}; last checkpoint {r['test_last']['accuracy']:.4f}", flush=True)  # fmt: skip
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
