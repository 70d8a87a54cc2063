"""``lmlab``: a thin command line over the library. Each command is one library call.

This module is the entry point (``lmlab`` and ``python -m lmlab``): the parser, ``main``
and the error handling around every command. The commands themselves are in
:mod:`lmlab.cli.commands`, their flags in :mod:`lmlab.cli.args`.

Errors a user can cause print one line (``lmlab: error: ...``) and exit with 2;
``--debug`` shows the traceback instead. Under torchrun, rank 0 alone prints it (see ``_fail``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import NoReturn

from lmlab import __version__ as lmlab_version
from lmlab.cli.apps import (
    add_classify_args,
    add_qa_args,
    add_summarize_args,
    add_task_eval_args,
    cmd_classify,
    cmd_evaluate_task,
    cmd_qa,
)
from lmlab.cli.args import add_compare_args, add_generation_args, add_train_args, pickle_flag
from lmlab.cli.commands import COMMANDS
from lmlab.cli.seq2seq import add_evaluate_args, add_translate_args, cmd_translate
from lmlab.cli.serve import add_serve_args, cmd_serve
from lmlab.cli.spelling import explain_usage_error, unknown_arguments
from lmlab.cli.viz import add_viz_args, cmd_viz
from lmlab.errors import LmlabError
from lmlab.messages import cli_format


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line like every other lmlab error (not the
    usage block plus a message), with the nearest valid spelling when there is one
    (:mod:`lmlab.cli.spelling`); subcommand parsers inherit this class.

    Prefix abbreviations are off (``allow_abbrev=False``): ``--step 5`` would otherwise be
    taken silently as ``--steps 5``, and adding any flag could change what an old command
    line means. A mistyped flag gets a did-you-mean instead."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        sys.exit(_fail(f"lmlab: error: {explain_usage_error(self, message)}"))

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        """As argparse's, but an unknown flag is blamed on the subcommand it was given to
        (``lmlab train --help`` is where the right spelling is), with a did-you-mean."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            sub = self._subcommand_parser(getattr(parsed, "command", None))
            sys.exit(_fail(f"lmlab: error: {unknown_arguments(sub, extras)}"))
        return parsed

    def _subcommand_parser(self, command: str | None) -> argparse.ArgumentParser:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and command in action.choices:
                return action.choices[command]
        return self


def _torch_version() -> str:
    """torch's version from its package metadata: importing torch would slow every --help."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        return "not installed"


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="lmlab", description="Build, train and run language models.")
    ap.add_argument("--debug", action="store_true", help="show Python tracebacks")
    ap.add_argument("--version", action="version", version=f"lmlab {lmlab_version} (torch {_torch_version()})")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("quickstart", help="train a small Transformer on the built-in corpus, then sample")
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument("--time", default="3m", help="training time budget (default 3m)")

    p = sub.add_parser("train", help="train a model from scratch (or --resume one)")
    add_train_args(p)

    p = sub.add_parser("generate", help="continue a prompt with a trained model")
    p.add_argument("checkpoint")
    add_generation_args(p)

    p = sub.add_parser("translate", help="translate (any text-to-text) with an encoder-decoder")
    add_translate_args(p)

    p = sub.add_parser("summarize", help="summarize texts with an encoder-decoder (BART, T5, or trained here)")
    add_summarize_args(p)

    for name in ("classify", "sentiment"):
        p = sub.add_parser(name, help="label texts with a classifier (sentiment analysis)" if name == "classify"
                           else "= classify")  # fmt: skip
        add_classify_args(p)

    p = sub.add_parser("qa", help="answer a question from a context (extractive question answering)")
    add_qa_args(p)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (and playground) for a model")
    add_serve_args(p)

    p = sub.add_parser("viz", help="draw what a model computes: attention, alignment, positions, tokens, neurons")
    add_viz_args(p)

    p = sub.add_parser("evaluate", help="score a model on a test set: BLEU, ROUGE, accuracy, EM/F1 or perplexity")
    add_evaluate_args(p)
    add_task_eval_args(p)

    p = sub.add_parser("eval", help="loss and perplexity of a model over a corpus (= evaluate --task lm)")
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--encoding-errors", choices=["strict", "replace", "ignore"], default="strict")
    p.add_argument("--dtype", default=None, help="fp32 or bf16 (default: fp32; bf16 for a checkpoint stored in bf16)")
    pickle_flag(p)

    p = sub.add_parser("info", help="architecture, parameters, tokenizer and training state")
    p.add_argument("checkpoint", help="an lmlab checkpoint, a Hugging Face folder or a Hub id")
    pickle_flag(p)

    p = sub.add_parser("compare", help="train several models on the same text and budget; write a report")
    add_compare_args(p)

    p = sub.add_parser("export", help="write a model as a Hugging Face transformers folder")
    p.add_argument("checkpoint", help="an lmlab checkpoint, a Hugging Face folder or a Hub id")
    p.add_argument("--format", choices=["hf"], default="hf", help="hf: transformers (the only format)")
    p.add_argument("--out", required=True, help="the folder to write (must not exist, or be empty)")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: the model's own)")
    pickle_flag(p)
    for p in sub.choices.values():  # `lmlab train ... --debug` as well as `lmlab --debug train ...`
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show Python tracebacks")
    return ap


#: Seconds a rank > 0 leaves rank 0 to report an error they share before it reports it itself.
QUIET_RANK_GRACE_S = 10.0


def _torchrun_rank() -> int | None:
    """This process's rank under torchrun; None outside it (read without importing torch)."""
    if "LOCAL_RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    if "lmlab.training.distributed" in sys.modules:  # the process group's rank, if one was joined
        return sys.modules["lmlab.training.distributed"].rank()
    return int(os.environ.get("RANK", "0"))


def _fail(message: str, status: int = 2) -> int:
    """Print a user error once per job; ``status`` to exit with.

    Under torchrun every rank hits the same user error (the same options, files and
    all-reduced loss), or the one rank 0 passed on (PeerError): rank 0 alone prints it.
    A rank > 0 first waits up to QUIET_RANK_GRACE_S, for torchrun's SIGTERM: it comes when
    rank 0 exits, and exiting at once instead could get rank 0 stopped before it printed.
    It ends the wait silently, with ``status``. A rank whose error was its own (rank 0
    did not exit) prints it after the wait, tagged ``[rank r]``."""
    rank = _torchrun_rank()
    if rank:
        _wait_for_rank0(status)
        message = message.replace("lmlab: error: ", f"lmlab: error: [rank {rank}] ", 1)
    print(message, file=sys.stderr, flush=True)
    return status


def _wait_for_rank0(status: int) -> None:
    """Sleep until SIGTERM or SIGINT (then exit with ``status``) or QUIET_RANK_GRACE_S pass."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def leave(signum, frame):  # noqa: ARG001
        raise SystemExit(status)

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, leave)
    time.sleep(QUIET_RANK_GRACE_S)
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, signal.SIG_DFL)


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    if a.command is None:
        ap.print_help(sys.stderr)
        return 2
    cli_format()  # every warning as one line, `lmlab: warning: ...`
    try:
        extra = {"translate": cmd_translate, "summarize": cmd_translate, "evaluate": cmd_evaluate_task,
                 "classify": cmd_classify, "sentiment": cmd_classify, "qa": cmd_qa, "serve": cmd_serve,
                 "viz": cmd_viz}  # fmt: skip
        return {**COMMANDS, **extra}[a.command](a)
    except LmlabError as e:
        if a.debug:
            raise
        return _fail(f"lmlab: error: {e}")
    except KeyboardInterrupt:
        if not _torchrun_rank():  # under torchrun, rank 0 speaks for the job
            print("lmlab: interrupted" + _resume_hint(a), file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def _resume_hint(a: argparse.Namespace) -> str:
    """For ``lmlab train`` stopped before its loop could save (while reading the corpus):
    how to continue, if the run folder holds a checkpoint from before."""
    out = getattr(a, "resume", None) or getattr(a, "out", None)
    if a.command != "train" or out is None or not (Path(out) / "trainer_state.json").is_file():
        return ""
    nproc = f" --nproc {a.nproc}" if getattr(a, "nproc", None) else ""
    return f"; the checkpoint in {out} is whole: continue with `lmlab train --resume {out}{nproc}`"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
