"""What each ``lmlab`` command does: ``cmd_train``, ``cmd_generate``, ``cmd_eval``, ``cmd_info``,
``cmd_export``, ``cmd_compare`` and ``cmd_quickstart``, and the lines they print.

Each command is one library call plus its report; the parser and the error handling that
wrap them live in :mod:`lmlab.cli`, the flags in :mod:`lmlab.cli.args`. Heavy imports
(torch, the models) happen inside the commands, so that ``lmlab --help`` stays quick.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from lmlab.cli.args import GENERATION_KEYS, train_keys
from lmlab.cli.wording import perplexity_sentence
from lmlab.errors import LmlabError


def cmd_train(a: argparse.Namespace) -> int:
    from lmlab.training import train

    opts = {k: getattr(a, k) for k in train_keys() if getattr(a, k, None) is not None}
    if "out" not in opts and "resume" not in opts:
        raise LmlabError("give --out DIR (where to write the model), or --resume DIR")
    if getattr(a, "nproc", None) is not None:  # relaunch this command under torchrun
        return _train_nproc(opts, a.nproc, a.debug)
    res = train(**opts)
    from lmlab.training import distributed

    if distributed.is_main():  # under torchrun, rank 0 reports for the job
        _report_train(res)
    # Stopped by Ctrl-C or SIGTERM (after saving): exit as the signal would, so that
    # `lmlab train ... && next-step` and job schedulers see the run did not finish.
    # (Under torchrun the workers exit 0 and the launcher reports the signal.)
    if distributed.launched():
        return 0
    return {"interrupted": 130, "terminated": 143}.get(res.stop_reason or "", 0)


def _train_nproc(opts: dict, nproc: int, debug: bool) -> int:
    """`lmlab train --nproc N`: check the options once, then run this command on N
    processes under torchrun. A failure prints lmlab's own line(s) only: the processes'
    (rank 0's) error, and a line here for what they could not say (one was killed)."""
    from lmlab.training.config import train_argv
    from lmlab.training.launcher import check_before_launch, continue_advice, launch

    check_before_launch(opts, nproc)
    res = launch(train_argv(opts), nproc, debug=debug)
    if res.status == 0 or res.status >= 128:  # >= 128: stopped by a signal; the workers saved, said so
        return res.status
    if res.reason is None:  # each failed process stopped on a user error, printed above
        return 2
    out = opts.get("out") or opts["resume"]
    advice = continue_advice(out, f"lmlab train --resume {out} --nproc {nproc}")
    raise LmlabError(f"the {nproc}-process run failed: {res.reason}; {advice}")


def _report_train(res) -> None:
    if res.step == res.start_step and res.stop_reason is None:
        return  # a resumed run already at its end: it said so, and how to go on
    msg = [f"lmlab: trained {res.step} steps"]
    if res.val_loss is not None and getattr(res, "task", "lm") == "lm":
        msg.append(f"validation loss {res.val_loss:.4f} (perplexity {math.exp(res.val_loss):.2f})")
    elif res.val_loss is not None:
        msg.append(f"dev loss {res.val_loss:.4f}")
    for key, value in (getattr(res, "best", None) or {}).items():
        msg.append(f"best dev {key} {value:.4f}" if key == "accuracy" else f"best dev {key} {value:.2f}")
    print(", ".join(msg), file=sys.stderr)
    print(f"lmlab: checkpoint: {res.out}/  (best: {res.out}/best/)", file=sys.stderr)
    print(f"lmlab: metrics:    {res.out}/metrics.jsonl", file=sys.stderr)
    if res.loss_png:
        print(f"lmlab: loss curve: {res.loss_png}", file=sys.stderr)


def cmd_generate(a: argparse.Namespace) -> int:
    import lmlab

    lmlab._spin_for_decoding()

    if a.logprobs is not None and not a.json:  # checked before the (slow) load
        raise LmlabError(
            f"--logprobs {a.logprobs} is printed only in the JSON output: add --json "
            "(one JSON object per sequence, with each token's log-probability and its best alternatives)"
        )
    if a.num_assistant_tokens is not None and a.draft is None:
        raise LmlabError("--num-assistant-tokens sets how many tokens the --draft model guesses: add --draft MODEL")
    if a.prompt_lookup_num_tokens is not None and a.draft is not None:
        raise LmlabError("give --prompt-lookup or --draft, not both (one way of guessing at a time)")
    prompt = read_prompt(a.prompt, a.prompt_file)  # before the (slow) load: a wrong path fails at once
    model = lmlab.load(
        a.checkpoint, dtype=a.dtype, device=a.device, allow_pickle=a.allow_pickle, quantize=a.quantize,
        group_size=a.group_size,
    )  # fmt: skip
    opts = {k: getattr(a, k) for k in GENERATION_KEYS if getattr(a, k, None) is not None}
    if "early_stopping" in opts and opts["early_stopping"] != "never":
        opts["early_stopping"] = opts["early_stopping"] == "true"
    if a.draft is not None:
        opts["assistant_model"] = lmlab.load(a.draft, dtype=a.dtype, device=a.device, allow_pickle=a.allow_pickle)
    out = sys.stdout
    if a.json or (a.num_return_sequences or 1) > 1:
        return _print_results(model.generate(prompt, return_details=True, **opts), as_json=a.json)
    if a.stream:
        for delta in model.stream(prompt, **opts):
            out.write(delta)
            out.flush()
    else:
        out.write(model.generate(prompt, **opts))
    out.write("\n")
    out.flush()
    return 0


def read_prompt(prompt: str, prompt_file: str | None) -> str:
    """The prompt of ``lmlab generate``: ``--prompt TEXT``, or read from ``--prompt-file
    FILE`` or standard input (``-``), for prompts longer than the shell's argument limit.
    Read as UTF-8, strictly (a prompt is short enough to fix, and a silent U+FFFD would
    change what the model continues); one final line break, which editors and ``echo``
    add, is dropped."""
    source = prompt_file if prompt_file is not None else (prompt if prompt == "-" else None)
    if source is None:
        return prompt
    flag = f"--prompt-file {source}" if prompt_file is not None else "--prompt -"
    if source == "-":
        raw = sys.stdin.buffer.read()
        where = "standard input"
    else:
        path = Path(source).expanduser()
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise LmlabError(f"{flag}: no such file; give the path of a UTF-8 text file") from None
        except IsADirectoryError:
            raise LmlabError(f"{flag}: that is a folder; give a UTF-8 text file") from None
        except OSError as e:
            raise LmlabError(f"{flag}: cannot read it ({e.strerror})") from None
        where = "the file"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LmlabError(
            f"{flag}: {where} is not valid UTF-8 (byte {e.start}: {raw[e.start : e.start + 4]!r}); "
            "save it as UTF-8"
        ) from None
    text = text.removeprefix("\ufeff")  # a byte-order mark some editors write
    return text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text


def _print_results(results, as_json: bool) -> int:
    """Several sequences, or details: one JSON object per line with --json, else each text
    after a ``--- i/n ---`` line."""
    import dataclasses

    results = results if isinstance(results, list) else [results]
    for i, r in enumerate(results, 1):
        if as_json:
            print(json.dumps(dataclasses.asdict(r), ensure_ascii=False))
        else:
            if len(results) > 1:
                print(f"--- {i}/{len(results)} ---")
            print(r.text)
    sys.stdout.flush()
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    import lmlab

    return report_perplexity(lmlab.load(a.checkpoint, dtype=a.dtype, allow_pickle=a.allow_pickle), a)


def report_perplexity(model, a: argparse.Namespace) -> int:
    """``lmlab eval`` (= ``lmlab evaluate --task lm``): loss and perplexity over --data."""
    head = getattr(model.config, "head", None)
    if head == "mlm":
        raise LmlabError(f"{a.checkpoint} is an encoder pretrained by masked-token prediction: it has no next-token "
                         f"perplexity (its dev loss is in {a.checkpoint}/metrics.jsonl); fine-tune it with `lmlab train "
                         f"--task classify --init {a.checkpoint}` (or --task qa) and score that")  # fmt: skip
    if head is not None:
        task = "classify" if head == "classify" else "qa"
        raise LmlabError(f"{a.checkpoint} is a {'classifier' if head == 'classify' else 'QA model'}, not a language "
                         f"model: score it with `lmlab evaluate {a.checkpoint} --task {task} --data ...`")  # fmt: skip
    from lmlab.eval.perplexity import evaluate_corpus
    from lmlab.tokenizer import tokenizer_kind

    if model.is_encoder_decoder:
        raise LmlabError(f"{a.checkpoint} is an encoder-decoder: score it with `lmlab evaluate {a.checkpoint} "
                         "--task translate --data PAIRS` (BLEU and chrF)")  # fmt: skip
    r = evaluate_corpus(model, a.data, batch_size=a.batch_size, encoding_errors=a.encoding_errors)
    print(f"loss {r['loss']:.4f}  perplexity {r['perplexity']:.3f}  over {r['tokens']:,} tokens of {a.data}")
    unit = "character" if tokenizer_kind(model.tokenizer) == "char" else "token"
    print(perplexity_sentence(r["perplexity"], unit, model.tokenizer.get_vocab_size()))
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    import dataclasses

    import lmlab
    from lmlab.tokenizer import tokenizer_kind

    model = lmlab.load(a.checkpoint, allow_pickle=a.allow_pickle)
    cfg = model.config
    origin = model.module.hf_origin  # set when read from a Hugging Face folder / Hub id
    print(f"checkpoint   {a.checkpoint}")
    if origin:
        arch = ", ".join(origin["config"].get("architectures") or []) or "no architectures listed"
        print(f"source       Hugging Face {origin['model_type']} ({arch}), read from {origin['path']}")
    print(f"model        {type(model.module).__name__}  ({cfg.model_type})")
    print(f"parameters   {model.module.num_parameters():,}")
    dtype = str(model.module.dtype).removeprefix("torch.")
    stored = origin and (origin["config"].get("dtype") or origin["config"].get("torch_dtype"))
    print(f"dtype        {dtype}" + (f" (stored as {stored})" if stored else ""))
    if model.is_encoder_decoder:
        print(f"lengths      sources up to {cfg.max_source_len:,} tokens, targets up to {cfg.max_target_len:,}")
    elif cfg.model_type == "task":
        kind = {"classify": "classifier", "span": "extractive QA (span) head"}.get(
            cfg.head, "masked-LM encoder (pretraining: the body of --task classify/qa --init)")
        print(f"task         {kind}" + (f", labels: {', '.join(cfg.labels)}" if cfg.head == "classify" else ""))
        print(f"context      {cfg.max_seq_len:,} tokens" + ("" if cfg.head == "mlm" else
              " (longer texts are cut, with a warning; QA reads windows)"))  # fmt: skip
    elif cfg.model_type == "transformer":
        print(f"context      {cfg.max_seq_len:,} tokens")
    else:  # a recurrent state has no length limit; max_seq_len is the training window
        print(f"context      unbounded (trained on {cfg.max_seq_len:,}-token windows)")
    for label, c in ([("body", cfg.body), ("head", cfg)] if cfg.model_type == "task" else [("config", cfg)]):
        fields = {f.name: getattr(c, f.name) for f in dataclasses.fields(c)}
        skip = ("model_type", "body", "id2label")
        print(f"{label:<13}" + ", ".join(f"{k}={v}" for k, v in fields.items() if k not in skip))
    print(f"tokenizer    {tokenizer_kind(model.tokenizer)}, {model.tokenizer.get_vocab_size()} tokens")
    if model.target_tokenizer is not model.tokenizer:
        tt = model.target_tokenizer
        print(f"target       {tokenizer_kind(tt)}, {tt.get_vocab_size()} tokens (the decoder's own vocabulary)")
    st = Path(a.checkpoint) / "trainer_state.json"
    if st.is_file():
        from lmlab.training.prepare import read_trainer_state

        s = read_trainer_state(Path(a.checkpoint))  # a damaged file: one line naming it
        best, bleu = s.get("best_val"), s.get("best_bleu")
        precision = (s.get("train_config") or {}).get("precision")
        print(
            f"training     step {s.get('step')} of {s.get('max_steps')}, {s.get('tokens', 0):,} tokens, "
            f"{s.get('elapsed', 0):.0f}s" + (f", precision {precision}" if precision else "")
            + (f", best validation loss {best:.4f}" if best is not None else "")
            + (f", best dev BLEU {bleu:.2f}" if isinstance(bleu, (int, float)) else "")
        )
    elif origin:
        print("training     (a Hugging Face model, no lmlab training state: fine-tune with train --init)")
    else:
        print("training     (no training state: not resumable)")
    return 0


def cmd_quickstart(a: argparse.Namespace) -> int:
    from lmlab.cli.quickstart import quickstart

    quickstart(out=a.out, time=a.time)
    return 0


def cmd_compare(a: argparse.Namespace) -> int:
    from lmlab.compare import compare

    opts = {k: v for k, v in vars(a).items() if k not in ("command", "debug")}
    res = compare(**opts)
    print(f"lmlab: compared {', '.join(r.name for r in res.runs)}", file=sys.stderr)
    print(f"lmlab: report: {res.report}  (charts: {', '.join(c.name for c in res.charts)})", file=sys.stderr)
    print(f"lmlab: runs:   {', '.join(r.folder + '/' for r in res.runs)}", file=sys.stderr)
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from lmlab.hf import export_hf

    out = export_hf(a.checkpoint, a.out, dtype=a.dtype, allow_pickle=a.allow_pickle)
    kind = json.loads((out / "config.json").read_text(encoding="utf-8"))["model_type"]
    print(f"lmlab: exported {a.checkpoint} as a Hugging Face {kind} model", file=sys.stderr)
    print(f"lmlab: wrote {out}/ (config.json, model.safetensors, tokenizer.json, ...)", file=sys.stderr)
    return 0


COMMANDS = {
    "compare": cmd_compare,
    "export": cmd_export,
    "train": cmd_train,
    "generate": cmd_generate,
    "eval": cmd_eval,
    "info": cmd_info,
    "quickstart": cmd_quickstart,
}
