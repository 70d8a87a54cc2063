"""The classification pipeline against transformers' text-classification pipeline, and the QA
pipeline on a long context.

A DistilBERT of distilbert-base's shape (6 layers, d 768, 12 heads, FFN 3072, WordPiece
vocabulary 30,522) with random weights, saved as a Hugging Face folder; lmlab's pipeline and
transformers' classify the same texts (SST-2 dev sentences) in one process, alternating,
batch 1 and batch 32; the labels must agree and the scores within 1e-4. Then lmlab's QA
pipeline (a DistilBERT QA head of the same shape) answers questions over a 2,000-token
context read in windows (384 tokens, stride 128): seconds per question.

    .venv/bin/python benchmarks/pipeline_speed.py            # on an otherwise idle machine
    .venv/bin/python benchmarks/pipeline_speed.py --n 16     # smoke
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
SST2_DEV = HERE.parent.parent / "shared" / "data" / "eval" / "sentiment" / "sst2_dev.tsv"


def folder(task: str, root: Path) -> Path:
    import transformers as T
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    words = sorted({w for line in SST2_DEV.read_text(encoding="utf-8").lower().split("\n") for w in line.split()})
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {t: i for i, t in enumerate(specials + words[: 30522 - len(specials)])}
    vocab.update({f"[unused{i}]": len(vocab) + i for i in range(30522 - len(vocab))})
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    cfg = T.DistilBertConfig(vocab_size=30522, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    torch.manual_seed(0)
    model = (T.DistilBertForSequenceClassification if task == "classify" else T.DistilBertForQuestionAnswering)(cfg)
    out = root / task
    model.eval().save_pretrained(out)
    T.DistilBertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                              sep_token="[SEP]", mask_token="[MASK]").save_pretrained(out)  # fmt: skip
    return out


def timed(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=128, help="texts per timing")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    import transformers as T

    import lmlab

    print(f"load average before: {os.getloadavg()}, torch threads {torch.get_num_threads()}")
    texts = [line.split("\t")[0] for line in SST2_DEV.read_text(encoding="utf-8").splitlines()[1:]][: a.n]
    with tempfile.TemporaryDirectory() as tmp:
        clf_dir = folder("classify", Path(tmp))
        ours = lmlab.pipeline("sentiment-analysis", str(clf_dir))
        theirs = T.pipeline("text-classification", model=str(clf_dir), device="cpu")
        a_out, b_out = ours(texts, batch_size=32), theirs(texts, batch_size=32)
        assert [x["label"] for x in a_out] == [x["label"] for x in b_out], "labels differ"
        worst = max(abs(x["score"] - y["score"]) for x, y in zip(a_out, b_out))
        assert worst < 1e-4, worst
        for bs in (1, 32):
            t_ours, t_theirs = [], []
            for _ in range(a.rounds):  # alternate, so a slow phase of the machine hits both
                t_ours.append(timed(lambda: ours(texts, batch_size=bs), 1))  # noqa: B023
                t_theirs.append(timed(lambda: theirs(texts, batch_size=bs), 1))  # noqa: B023
            o, t = statistics.median(t_ours), statistics.median(t_theirs)
            print(f"classification batch {bs:2d}: lmlab {len(texts) / o:7.1f} texts/s, transformers "
                  f"{len(texts) / t:7.1f} texts/s -> {t / o:.2f}x (scores within {worst:.1e})")  # fmt: skip
        qa_dir = folder("span", Path(tmp))
        qa = lmlab.pipeline("question-answering", str(qa_dir))
        context = " ".join(texts * 20)
        n_tokens = len(qa.plain.encode(context, add_special_tokens=False).ids)
        context = qa.plain.decode(qa.plain.encode(context, add_special_tokens=False).ids[:2000])
        questions = ["what is the film about ?", "who is charming ?", "why is it bleak ?", "where is the journey ?"]
        qa(question=questions[0], context=context)  # warm up
        s = timed(lambda: [qa(question=q, context=context) for q in questions], a.rounds) / len(questions)
        windows = len(qa.windows([{"question": questions[0], "context": context}], qa.options({})))
        print(f"question answering: {s:.3f} s per question over a 2,000-token context ({windows} windows of 384, "
              f"stride 128; from {n_tokens:,} tokens cut to 2,000)")  # fmt: skip
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
