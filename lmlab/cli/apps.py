"""``lmlab classify`` (``sentiment``), ``lmlab qa``, ``lmlab summarize`` and ``lmlab evaluate``
for those tasks: the applications on the command line.

As ``lmlab translate``: inputs from ``--text``, ``--input FILE`` or standard input; stdout gets
one line per input (``classify``: the top label and its score, ``negative 0.97``; ``qa``: the
answer; ``summarize``: the summary), or one JSON object per input with ``--json``; progress
and warnings go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lmlab.cli.args import pickle_flag
from lmlab.cli.seq2seq import ProgressBar, add_translate_args, load_model, one_line, read_inputs, write_lines
from lmlab.errors import LmlabError


# --------------------------------------------------------------------------- flags
def _io_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--output", metavar="FILE", help=f"write the {what} here, one per line (default: stdout)")
    p.add_argument("--json", action="store_true", help="one JSON object per input (Hugging Face's pipeline output)")
    p.add_argument("--batch-size", type=int, default=8, help="inputs run together (8)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: fp32; bf16 for a checkpoint stored in bf16)")
    pickle_flag(p)


def add_classify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a classifier: an lmlab run (--task classify) or a Hugging Face folder")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--text", action="append", default=None, help="a text to classify (repeatable)")
    which.add_argument("--input", metavar="FILE", help="one text per line (UTF-8; - for standard input)")
    p.add_argument("--top-k", type=int, default=None, help="with --json: the k best labels of each text (default 1)")
    _io_args(p, "labels")


def add_qa_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a QA model: an lmlab run (--task qa) or a Hugging Face ...ForQuestionAnswering")
    p.add_argument("--question", help="the question")
    p.add_argument("--context", help="the text holding the answer")
    p.add_argument("--input", metavar="FILE", help="SQuAD-format JSON, or JSON lines of {question, context}")
    p.add_argument("--top-k", type=int, default=None, help="answers per question (1)")
    p.add_argument("--doc-stride", type=int, default=None, help="tokens shared by neighbouring windows (128)")
    p.add_argument("--max-answer-len", type=int, default=None, help="longest answer, in tokens (15)")
    p.add_argument("--max-seq-len", type=int, default=None, help="a window's tokens (384, or the model's length)")
    p.add_argument("--max-question-len", type=int, default=None, help="longer questions are cut (64 tokens)")
    p.add_argument("--handle-impossible-answer", action="store_true", default=None,
                   help="the empty answer may win (SQuAD 2.0)")  # fmt: skip
    p.add_argument("--no-align-to-words", dest="align_to_words", action="store_false", default=None,
                   help="keep token boundaries (default: widen the answer to whole words)")  # fmt: skip
    p.add_argument("--strict", action="store_true", help="a broken SQuAD record is an error, not skipped")
    _io_args(p, "answers")


def add_summarize_args(p: argparse.ArgumentParser) -> None:
    add_translate_args(p)
    p.set_defaults(hf_task="summarization")


def add_task_eval_args(p: argparse.ArgumentParser) -> None:
    """``lmlab evaluate``'s flags for classify, summarize and qa (beside translate's)."""
    p.add_argument("--text-field", default="text", help="classify with .jsonl: the text key (text)")
    p.add_argument("--label-field", default="label", help="classify with .jsonl: the label key (label)")
    p.add_argument("--plot", metavar="PNG", help="classify: draw the confusion matrix here")
    p.add_argument("--rouge-max", action="store_true",
                   help="summarize: the best score over the references (default: their mean)")  # fmt: skip
    p.add_argument("--strict", action="store_true", help="qa: a broken SQuAD record is an error, not skipped")


# --------------------------------------------------------------------------- classify
def _labels(model: Any, texts: list[str], a: argparse.Namespace) -> list[Any]:
    from lmlab.tasks.classify import TextClassificationPipeline

    clf = TextClassificationPipeline(model, batch_size=a.batch_size)
    keep = [i for i, t in enumerate(texts) if t.strip()]
    bar = ProgressBar(len(keep), a.progress)
    try:
        top_k = {"top_k": a.top_k} if getattr(a, "top_k", None) is not None else {}
        got = clf([texts[i] for i in keep], on_batch=bar, **top_k) if keep else []
    finally:
        bar.close()
    out: list[Any] = [None] * len(texts)
    for i, r in zip(keep, got):
        out[i] = r
    return out


def cmd_classify(a: argparse.Namespace) -> int:
    if a.top_k is not None and a.top_k < 1:
        raise LmlabError(f"--top-k must be >= 1 (got {a.top_k})")
    texts = read_inputs(a)
    model = load_model(a)
    results = _labels(model, texts, a)
    if a.json:
        write_lines([json.dumps(r if r is not None else {}, ensure_ascii=False) for r in results], a.output)
        return 0
    lines = []
    for r in results:
        best = (r[0] if isinstance(r, list) else r) if r else None
        lines.append(f"{best['label']} {best['score']:.2f}" if best else "")
    write_lines(lines, a.output)
    return 0


# --------------------------------------------------------------------------- qa
def _qa_options(a: argparse.Namespace) -> dict[str, Any]:
    keys = ("top_k", "doc_stride", "max_answer_len", "max_question_len", "handle_impossible_answer", "align_to_words")
    return {k: getattr(a, k) for k in keys if getattr(a, k, None) is not None}


def _qa_examples(a: argparse.Namespace) -> list[Any]:
    from lmlab.qa_data import read_qa

    if a.input is not None:
        if a.question is not None or a.context is not None:
            raise LmlabError("give --question and --context, or --input FILE, not both")
        return read_qa(a.input, strict=a.strict)
    if a.question is None or a.context is None:
        raise LmlabError("give --question Q --context C, or --input FILE (SQuAD JSON, or JSON lines of {question, context})")
    from lmlab.qa_data import QAExample

    return [QAExample("1", a.question, a.context)]


def answer_all(model: Any, examples: list[Any], a: argparse.Namespace) -> list[Any]:
    from lmlab.tasks.qa import QuestionAnsweringPipeline

    qa = QuestionAnsweringPipeline(model, batch_size=a.batch_size, max_seq_len=getattr(a, "max_seq_len", None))
    bar = ProgressBar(len(examples), a.progress)
    out = []
    try:
        opts = _qa_options(a)
        for lo in range(0, len(examples), 32):  # a few questions at a time: windows batch across them
            chunk = examples[lo : lo + 32]
            got = qa([{"question": e.question, "context": e.context} for e in chunk], **opts)
            out += [got] if len(chunk) == 1 else got
            bar(len(chunk))
    finally:
        bar.close()
    return out


def cmd_qa(a: argparse.Namespace) -> int:
    examples = _qa_examples(a)
    model = load_model(a)
    results = answer_all(model, examples, a)
    if a.json:
        rows = [json.dumps({"id": e.id, **r} if isinstance(r, dict) else {"id": e.id, "answers": r}, ensure_ascii=False)
                for e, r in zip(examples, results)]  # fmt: skip
        write_lines(rows, a.output)
        return 0
    write_lines([one_line((r[0] if isinstance(r, list) else r)["answer"]) for r in results], a.output)
    return 0


# --------------------------------------------------------------------------- evaluate
def evaluate_classify(a: argparse.Namespace) -> int:
    from lmlab.eval.classification import classification_scores, format_confusion, plot_confusion
    from lmlab.labeled import read_labeled

    data = read_labeled(a.data, a.text_field, a.label_field)
    if a.max_samples is not None:
        data = data.head(a.max_samples)
    model = load_model(a)
    a.top_k = None
    got = _labels(model, data.texts, a)
    predicted = [r["label"] for r in got]
    labels, gold = model.config.labels, data.labels
    if not set(gold) <= set(labels) and all(g.isdigit() and int(g) < len(labels) for g in gold):
        gold = [labels[int(g)] for g in gold]  # 0/1 data for a model that names its labels: ids
        print("lmlab: the data's labels are ids; read as the model's: "
              + ", ".join(f"{i} = {lab}" for i, lab in enumerate(labels)), file=sys.stderr)  # fmt: skip
    scores = classification_scores(predicted, gold, labels)
    if a.output:
        write_lines([f"{p}\t{g}\t{one_line(t)}" for p, g, t in zip(predicted, gold, data.texts)], a.output)
    if a.plot:
        plot_confusion(scores, a.plot)
    if a.json:
        keys = ("accuracy", "macro_f1", "confusion_matrix", "labels", "per_class", "n")
        print(json.dumps({k: scores[k] for k in keys}, ensure_ascii=False))
        return 0
    print(f"accuracy {scores['accuracy']:.4f}  macro-F1 {scores['macro_f1']:.4f}  over {scores['n']:,} texts of {a.data}")
    print(format_confusion(scores))
    for what, path in (("predictions", a.output), ("confusion matrix", a.plot)):
        if path:
            print(f"{what}: {path}")
    return 0


def evaluate_summarize(a: argparse.Namespace) -> int:
    from lmlab.cli.seq2seq import translate_lines
    from lmlab.eval.rouge import rouge_scores
    from lmlab.pairs import read_pairs

    pairs = read_pairs(a.data, a.target_data, a.source_field, a.target_field)
    if a.max_samples is not None:
        pairs = pairs.head(a.max_samples)
    model = load_model(a)
    if not model.is_encoder_decoder:
        raise LmlabError(f"{a.checkpoint} is not an encoder-decoder; --task summarize needs a seq2seq model")
    a.num_return_sequences = None
    a.hf_task = "summarization"
    hyps = [one_line(h) for h in translate_lines(model, pairs.sources, a)]
    refs = pairs.references if pairs.references is not None else pairs.targets
    scores = rouge_scores(hyps, refs, aggregate="max" if a.rouge_max else "mean")
    if a.output:
        write_lines(hyps, a.output)
    if a.json:
        print(json.dumps(scores, ensure_ascii=False))
        return 0
    print(" ".join(f"{k} {scores[k]:.2f}" for k in ("rouge1", "rouge2", "rougeL", "rougeLsum"))
          + f"  over {scores['n']:,} summaries of {a.data} ({scores['aggregate']} over references, "
          f"tokens: {scores['tokenizer']})")  # fmt: skip
    if a.output:
        print(f"summaries: {a.output}")
    return 0


def evaluate_qa(a: argparse.Namespace) -> int:
    from lmlab.eval.squad import qa_scores
    from lmlab.qa_data import read_qa

    examples = read_qa(a.data, strict=a.strict, check_offsets=False)  # scored as the official scripts: texts only
    if a.max_samples is not None:
        examples = examples[: a.max_samples]
    unanswered = [e.id for e in examples if not e.answers]
    if unanswered:
        raise LmlabError(f"{a.data}: question {unanswered[0]} has no reference answer; scoring needs answers")
    model = load_model(a)
    for k in ("top_k", "doc_stride", "max_answer_len", "max_question_len", "handle_impossible_answer",
              "align_to_words", "max_seq_len"):  # fmt: skip
        setattr(a, k, getattr(a, k, None))
    results = answer_all(model, examples, a)
    predictions = [(r[0] if isinstance(r, list) else r)["answer"] for r in results]
    scores = qa_scores(predictions, [e.answers for e in examples])
    if a.output:
        rows = [{"id": e.id, "prediction": p, "answers": e.answers} for e, p in zip(examples, predictions)]
        write_lines([json.dumps(r, ensure_ascii=False) for r in rows], a.output)
    if a.json:
        print(json.dumps(scores, ensure_ascii=False))
        return 0
    print(f"exact match {scores['exact_match']:.2f}  F1 {scores['f1']:.2f}  over {scores['n']:,} questions of "
          f"{a.data} ({scores['scoring']})")  # fmt: skip
    if a.output:
        print(f"predictions: {a.output}")
    return 0


def cmd_evaluate_task(a: argparse.Namespace) -> int:
    """``lmlab evaluate``: the task from --task, else from the model's config.json."""
    from lmlab.cli.seq2seq import cmd_evaluate

    task = a.task or stored_task(a.checkpoint)
    if a.max_samples is not None and a.max_samples < 1:
        raise LmlabError(f"--max-samples must be >= 1 (got {a.max_samples})")
    if task is None:  # a Hub id: the model itself says what it does
        model = load_model(a)
        head = getattr(model.config, "head", None)
        task = {"classify": "classify", "span": "qa", "mlm": "lm"}.get(head) or ("translate" if model.is_encoder_decoder else "lm")
        a._model = model
    if task in ("classify", "summarize", "qa"):
        return {"classify": evaluate_classify, "summarize": evaluate_summarize, "qa": evaluate_qa}[task](a)
    a.task = task
    return cmd_evaluate(a)


def stored_task(source: str) -> str | None:
    """The task a local folder's model does, read from its config.json without loading it:
    classify, qa, translate or lm; None when it cannot tell (a Hub id)."""
    f = Path(source).expanduser() / "config.json"
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
        mt = cfg.get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    if mt == "task":  # a masked-LM encoder has only its dev loss: `lmlab eval`'s refusal names it
        return {"classify": "classify", "span": "qa", "mlm": "lm"}.get(cfg.get("head"), "classify")
    archs = " ".join(map(str, cfg.get("architectures") or []))
    if "ForSequenceClassification" in archs:
        return "classify"
    if "ForQuestionAnswering" in archs:
        return "qa"
    return "translate" if mt in ("seq2seq", "rnn_seq2seq", "marian", "bart", "mbart", "t5") else "lm"


__all__ = [
    "add_classify_args", "add_qa_args", "add_summarize_args", "add_task_eval_args", "cmd_classify", "cmd_qa",
    "cmd_evaluate_task", "evaluate_classify", "evaluate_qa", "evaluate_summarize", "stored_task",
]  # fmt: skip
