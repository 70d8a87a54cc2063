"""``lmlab translate`` and ``lmlab evaluate``: text-to-text on the command line.

Inputs come from ``--text``, ``--input FILE`` (one per line) or standard input; stdout gets
exactly one line per input (the translation, newlines folded to spaces; an empty input
line gives an empty output line), or one JSON object per input with ``--json``. Progress
and warnings go to stderr, so ``lmlab translate M --input a.txt > b.txt`` is clean.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from lmlab.cli.args import GENERATION_KEYS, add_decoding_args
from lmlab.errors import LmlabError


def add_translate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="an lmlab run, a Hugging Face folder (Marian, BART, T5) or a Hub id")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--text", action="append", default=None, help="a text to translate (repeatable)")
    which.add_argument("--input", metavar="FILE", help="one text per line (UTF-8; - for standard input)")
    p.add_argument("--output", metavar="FILE", help="write the translations here, one per line (default: stdout)")
    p.add_argument("--batch-size", type=int, default=16, help="sources decoded together (16)")
    p.add_argument("--prefix", default=None, help="prepended to every source (T5: taken from its config)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_decoding_args(p, seq2seq=True)


def add_evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="an lmlab run, a Hugging Face folder or a Hub id")
    p.add_argument("--task", choices=["translate", "summarize", "classify", "qa", "lm"], default=None,
                   help="translate: BLEU, chrF; summarize: ROUGE; classify: accuracy, macro-F1; qa: EM, F1; "
                   "lm: perplexity (default: by the model)")  # fmt: skip
    p.add_argument("--data", required=True,
                   help="translate/summarize: .tsv, .jsonl or two aligned files; classify: text<TAB>label .tsv "
                   "or .jsonl; qa: SQuAD JSON or .jsonl")  # fmt: skip
    p.add_argument("--target-data", metavar="FILE", help="the references, line-aligned with --data")
    p.add_argument("--source-field", default="src", help="a .jsonl's source key (src)")
    p.add_argument("--target-field", default="tgt", help="a .jsonl's reference key(s), comma-separated (tgt)")
    p.add_argument("--output", metavar="FILE", help="write the hypotheses here, one per line")
    p.add_argument("--tokenize", default=None, help="sacreBLEU's tokenizer (default: zh for Chinese, else 13a)")
    p.add_argument("--max-samples", type=int, default=None, help="score only the first N pairs")
    p.add_argument("--batch-size", type=int, default=16, help="sources decoded together (lm: windows)")
    p.add_argument("--prefix", default=None, help="prepended to every source (T5: taken from its config)")
    p.add_argument("--encoding-errors", choices=["strict", "replace", "ignore"], default="strict")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_decoding_args(p, seq2seq=True)


def _options(a: argparse.Namespace) -> dict[str, Any]:
    keys = (*GENERATION_KEYS, "do_sample", "forced_bos_token_id")
    opts = {k: getattr(a, k) for k in keys if getattr(a, k, None) is not None}
    if "early_stopping" in opts and opts["early_stopping"] != "never":
        opts["early_stopping"] = opts["early_stopping"] == "true"
    return opts


def read_inputs(a: argparse.Namespace) -> list[str]:
    """--text (each one), --input FILE / - (one per line), or standard input when piped."""
    if a.text is not None:
        return list(a.text)
    source = a.input
    if source is None:
        if sys.stdin.isatty():
            raise LmlabError("give --text TEXT, --input FILE, or pipe the texts into standard input (one per line)")
        source = "-"
    if source == "-":
        raw, where = sys.stdin.buffer.read(), "standard input"
    else:
        try:
            raw, where = Path(source).expanduser().read_bytes(), source
        except FileNotFoundError:
            raise LmlabError(f"--input {source}: no such file") from None
        except IsADirectoryError:
            raise LmlabError(f"--input {source}: that is a folder; give a text file, one input per line") from None
        except OSError as e:
            raise LmlabError(f"--input {source}: cannot read it ({e.strerror})") from None
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise LmlabError(f"{where} is not valid UTF-8 (byte {e.start}); save it as UTF-8") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final line break
    return [line.removesuffix("\r") for line in lines]


class ProgressBar:
    """A progress bar over inputs on stderr (tqdm), advanced a batch at a time."""

    def __init__(self, total: int, on: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="text", file=sys.stderr, disable=not on or total < 2, dynamic_ncols=True)

    def __call__(self, n: int) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def load_model(a: argparse.Namespace) -> Any:
    """The model of ``a.checkpoint`` (loaded once: ``evaluate`` may have loaded it to learn its task)."""
    import lmlab

    if getattr(a, "_model", None) is not None:
        return a._model

    return lmlab.load(a.checkpoint, dtype=getattr(a, "dtype", None), device=getattr(a, "device", None),
                      allow_pickle=a.allow_pickle, quantize=getattr(a, "quantize", None),
                      group_size=getattr(a, "group_size", None))  # fmt: skip


def translate_lines(model: Any, texts: list[str], a: argparse.Namespace, return_details: bool = False) -> list[Any]:
    """One result per input, in order; empty inputs give empty results without decoding."""
    keep = [i for i, t in enumerate(texts) if t.strip()]
    bar = ProgressBar(len(keep), a.progress)
    task = getattr(a, "hf_task", "translation")
    try:
        got = model.translate([texts[i] for i in keep], return_details=return_details, prefix=a.prefix, task=task,
                              batch_size=a.batch_size, on_batch=bar, **_options(a)) if keep else []  # fmt: skip
    finally:
        bar.close()
    out: list[Any] = [None if return_details else ""] * len(texts)
    for i, r in zip(keep, got):
        out[i] = r
    return out


def one_line(text: str) -> str:
    return " ".join(text.splitlines())


def write_lines(lines: list[str], output: str | None) -> None:
    """stdout, or a file written whole then renamed into place (no half-written file)."""
    body = "".join(line + "\n" for line in lines)
    if output is None:
        sys.stdout.write(body)
        sys.stdout.flush()
        return
    path = Path(output).expanduser()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(body, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise LmlabError(f"--output {output}: cannot write it ({e.strerror})") from None


def cmd_translate(a: argparse.Namespace) -> int:
    import lmlab

    lmlab._spin_for_decoding()
    texts = read_inputs(a)  # before the (slow) load: a wrong path fails at once
    model = load_model(a)
    key = "summary_text" if getattr(a, "hf_task", "") == "summarization" else "translation_text"
    if not model.is_encoder_decoder:
        what = "summarization" if key == "summary_text" else "translation"
        raise LmlabError(f"{a.checkpoint} is not an encoder-decoder; {what} needs a seq2seq model (trained with "
                         "--task translate or --task summarize, or a Marian/BART/T5 folder)")  # fmt: skip
    if a.json:
        import dataclasses

        results = translate_lines(model, texts, a, return_details=True)
        rows = []
        for r in results:
            rs = r if isinstance(r, list) else [r]
            items = [{key: x.text, **({"details": dataclasses.asdict(x)} if a.logprobs is not None else {})}
                     if x is not None else {key: ""} for x in rs]  # fmt: skip
            rows.append(json.dumps(items if len(items) > 1 else items[0], ensure_ascii=False))
        write_lines(rows, a.output)
        return 0
    results = translate_lines(model, texts, a)
    lines = [one_line(" ||| ".join(r) if isinstance(r, list) else r) for r in results]
    write_lines(lines, a.output)
    return 0


def _stored_kind(source: str) -> str | None:
    """'translate' or 'lm' from a local folder's config.json, read without loading the model
    (so a wrong --data fails before a slow load); None when it cannot tell (a Hub id)."""
    f = Path(source).expanduser() / "config.json"
    try:
        mt = json.loads(f.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return "translate" if mt in ("seq2seq", "rnn_seq2seq", "marian", "bart", "mbart", "t5") else "lm"


def cmd_evaluate(a: argparse.Namespace) -> int:
    from lmlab.pairs import read_pairs

    task = a.task or _stored_kind(a.checkpoint)
    if task == "lm" and (a.target_data or a.max_samples is not None or a.output):
        raise LmlabError("--target-data, --max-samples and --output are for --task translate; drop them for perplexity")
    if a.max_samples is not None and a.max_samples < 1:
        raise LmlabError(f"--max-samples must be >= 1 (got {a.max_samples})")
    pairs = read_pairs(a.data, a.target_data, a.source_field, a.target_field) if task == "translate" else None
    model = load_model(a)
    task = task or ("translate" if model.is_encoder_decoder else "lm")
    if task == "lm":
        from lmlab.cli.commands import report_perplexity

        return report_perplexity(model, a)
    if not model.is_encoder_decoder:
        kind, fix = {
            "classify": ("a classifier", "score it with --task classify"),
            "span": ("a QA model", "score it with --task qa"),
            "mlm": ("a masked-LM encoder", "fine-tune the encoder with --init first"),
        }.get(getattr(model.config, "head", None), ("a language model", "score it with --task lm for perplexity"))
        raise LmlabError(f"{a.checkpoint} is {kind}: --task translate needs an encoder-decoder ({fix})")
    from lmlab.eval.bleu import translation_scores

    if pairs is None:
        pairs = read_pairs(a.data, a.target_data, a.source_field, a.target_field)
    if a.max_samples is not None:
        pairs = pairs.head(a.max_samples)
    a.num_return_sequences = None  # one hypothesis per source
    hyps = [one_line(h) for h in translate_lines(model, pairs.sources, a)]
    refs = pairs.references if pairs.references is not None else pairs.targets
    scores = translation_scores(hyps, refs, tokenize=a.tokenize)
    if a.output:
        write_lines(hyps, a.output)
    if a.json:
        print(json.dumps({k: scores[k] for k in ("bleu", "chrf", "signature", "n")}, ensure_ascii=False))
        return 0
    print(f"BLEU {scores['bleu']:.2f}  chrF {scores['chrf']:.2f}  over {scores['n']:,} sentences of {a.data}")
    print(f"signatures: BLEU {scores['signature']['bleu']}  chrF {scores['signature']['chrf']}")
    if a.output:
        print(f"hypotheses: {a.output}")
    return 0


__all__ = ["add_evaluate_args", "add_translate_args", "cmd_evaluate", "cmd_translate", "read_inputs"]
