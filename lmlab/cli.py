"""``lmlab``: a thin command line over the library. Each command is one library call.

Errors a user can cause print one line (``lmlab: error: ...``) and exit with 2;
``--debug`` shows the traceback instead. Under torchrun, rank 0 alone prints it (see ``_fail``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import NoReturn

from lmlab.errors import LmlabError


def _bool_flag(p: argparse.ArgumentParser, name: str, default: bool, help: str) -> None:
    p.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=None, help=help)


def add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", help="a text file, a folder of text files, a glob, or 'builtin' (default)")
    g.add_argument("--out", help="folder for checkpoints, metrics.jsonl and loss.png")
    g.add_argument("--tokenizer", help="char (default), bpe, or a tokenizer.json / Hugging Face folder")
    g.add_argument("--vocab-size", type=int, help="BPE vocabulary size (default 4096)")
    g.add_argument(
        "--encoding-errors",
        choices=["strict", "replace", "ignore"],
        help="what to do with bytes that are not UTF-8 (default strict: stop with an error)",
    )
    g.add_argument("--val-fraction", type=float, help="the last fraction of tokens kept for validation (0.1)")
    g = p.add_argument_group("model")
    g.add_argument("--model", help="gpt (the Transformer, default), rnn, gru or lstm (recurrent)")
    g.add_argument("--n-layer", type=int)
    g.add_argument("--n-head", type=int)
    g.add_argument("--n-kv-head", type=int, help="key/value heads (< n-head: grouped-query attention)")
    g.add_argument("--d-model", type=int)
    g.add_argument(
        "--max-seq-len", type=int, help="context length in tokens (recurrent models: the BPTT window)"
    )
    g.add_argument("--pos", choices=["sinusoidal", "learned", "rope"])
    g.add_argument("--norm", choices=["layernorm", "rmsnorm"])
    g.add_argument("--mlp", choices=["swiglu", "gelu"])
    _bool_flag(g, "bias", False, "biases in linear layers and LayerNorm")
    _bool_flag(g, "tie-embeddings", True, "share the input embedding and the output layer")
    g.add_argument("--dropout", type=float)
    g.add_argument(
        "--hidden-size", type=int, help="recurrent models: units per layer (512); --d-model is the embedding"
    )
    _bool_flag(
        g,
        "stateful",
        False,
        "recurrent models: carry the state across consecutive chunks of the text (default: random windows)",
    )
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, help="optimizer steps (default 2000)")
    g.add_argument("--time", help="train for a time budget instead, e.g. 5m, 90s, 1h")
    g.add_argument("--batch-size", type=int, help="the global batch, in sequences (12)")
    g.add_argument("--grad-accum", type=int, help="micro-batches per step (1)")
    g.add_argument("--lr", type=float, help="peak learning rate (2e-3)")
    g.add_argument("--min-lr", type=float, help="final learning rate (lr/10)")
    g.add_argument("--warmup", type=int, help="warmup steps (100)")
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--grad-clip", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--precision", choices=["fp32", "bf16"])
    g.add_argument("--device", help="cpu, cuda, mps or auto (default)")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--eval-every", type=int, help="steps between validation evaluations (250)")
    g.add_argument("--eval-batches", type=int, help="validation batches per evaluation (20)")
    g.add_argument("--save-every", type=int, help="steps between checkpoints (500)")
    g.add_argument("--resume", metavar="DIR", help="continue the run in DIR with its stored settings")
    g.add_argument(
        "--init",
        metavar="SOURCE",
        help="fine-tune: start from an lmlab checkpoint, a Hugging Face folder or a Hub id (and its tokenizer)",
    )
    _pickle_flag(g)
    g.add_argument("--overwrite", action="store_true", default=None, help="replace a checkpoint in --out")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    g = p.add_argument_group("several processes")
    g.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="train on N local processes with PyTorch DDP: runs `torchrun --standalone "
        "--nproc-per-node N -m lmlab train ...` (for several machines, call torchrun yourself)",
    )


def add_compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="a text file, a folder, a glob, or 'builtin'")
    p.add_argument("--out", required=True, help="folder for one run per model, report.md and its charts")
    p.add_argument("--models", default="rnn,gru,lstm,gpt", help="comma-separated (default rnn,gru,lstm,gpt)")
    p.add_argument("--time", help="training time per model, e.g. 5m (default 5m)")
    p.add_argument(
        "--tokens", type=int, help="or a budget of training tokens per model (steps x batch x window)"
    )
    p.add_argument("--tokenizer", default="char", help="char (default), bpe, or a tokenizer.json")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size (4096)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--params", type=int, help="target parameter count (default: the default gpt's)")
    p.add_argument(
        "--model-args",
        action="append",
        metavar="MODEL:K=V,...",
        help="one model's settings, e.g. lstm:hidden_size=512,n_layer=2 (repeatable)",
    )
    p.add_argument("--max-seq-len", type=int, default=64, help="the window, for every model (64)")
    p.add_argument("--batch-size", type=int, default=12, help="sequences per step, for every model (12)")
    p.add_argument("--eval-every", type=int, help="steps between validation evaluations")
    p.add_argument("--eval-batches", type=int, default=20, help="validation batches per evaluation (20)")
    p.add_argument("--encoding-errors", choices=["strict", "replace", "ignore"], default="strict")
    p.add_argument("--prompt", help="the prompt of the samples (default: the corpus's first line)")
    p.add_argument("--sample-tokens", type=int, default=200, help="tokens per sample and speed test (200)")
    p.add_argument("--device", default="auto", help="cpu, cuda, mps or auto (default)")
    p.add_argument("--overwrite", action="store_true", help="replace runs already in --out")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def _train_keys() -> list[str]:
    """Every TrainConfig field is a flag of `lmlab train` (in kebab-case)."""
    import dataclasses

    from lmlab.training import TrainConfig

    return [f.name for f in dataclasses.fields(TrainConfig)]


def add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", default="", help="text to continue (default: empty)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate (200)")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default 0.8)")
    p.add_argument("--min-new-tokens", type=int, default=None, help="no EOS before this many tokens (0)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument(
        "--top-p", type=float, default=None, help="nucleus: the smallest set with this mass, in (0, 1]"
    )
    p.add_argument("--min-p", type=float, default=None, help="drop tokens below min-p x the top probability")
    p.add_argument("--typical-p", type=float, default=None, help="locally typical sampling mass, in (0, 1]")
    p.add_argument("--repetition-penalty", type=float, default=None, help="> 1 discourages seen tokens (1)")
    p.add_argument(
        "--presence-penalty", type=float, default=None, help="OpenAI: minus this once a token appeared"
    )
    p.add_argument("--frequency-penalty", type=float, default=None, help="OpenAI: minus this per occurrence")
    p.add_argument(
        "--no-repeat-ngram-size", type=int, default=None, help="never repeat an n-gram of this size"
    )
    p.add_argument("--bad-words", nargs="+", default=None, metavar="TEXT", help="strings never to generate")
    p.add_argument("--num-beams", type=int, default=None, help="beam search with this many beams (1: none)")
    p.add_argument(
        "--length-penalty", type=float, default=None, help="beam score = sum log p / length^this (1)"
    )
    p.add_argument(
        "--early-stopping",
        choices=["true", "false", "never"],
        default=None,
        help="beam search: stop when num-beams have finished (true), by heuristic (false), or never",
    )
    p.add_argument("--num-return-sequences", type=int, default=None, help="sequences per prompt (1)")
    p.add_argument(
        "--stop", action="append", default=None, metavar="TEXT", help="stop at this text (repeatable)"
    )
    p.add_argument(
        "--eos-token-id", type=int, nargs="+", default=None, help="token id(s) that end a sequence"
    )
    p.add_argument("--seed", type=int, default=None, help="same seed, same text")
    p.add_argument(
        "--logprobs", type=int, default=None, metavar="N", help="with --json: log-probs and N alternatives"
    )
    p.add_argument(
        "--json", action="store_true", help="print one JSON object per sequence (text, tokens, finish reason)"
    )
    p.add_argument("--dtype", default=None, help="fp32 (default on CPU) or bf16")
    p.add_argument("--quantize", default=None, metavar="METHOD", help="int8: int8 weights (faster on CPU)")
    p.add_argument("--device", default=None, help="cpu (default), cuda, mps or auto")
    p.add_argument("--no-stream", dest="stream", action="store_false", help="print at the end")
    _pickle_flag(p)


GENERATION_KEYS = [
    "max_new_tokens",
    "min_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "typical_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "no_repeat_ngram_size",
    "bad_words",
    "num_beams",
    "length_penalty",
    "early_stopping",
    "num_return_sequences",
    "stop",
    "eos_token_id",
    "seed",
    "logprobs",
]


def _pickle_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read a Hugging Face pytorch_model.bin (torch.load(weights_only=True)); only for trusted files",
    )


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line like every other lmlab error (not the
    usage block plus a message); subcommand parsers inherit this class."""

    def error(self, message: str) -> NoReturn:
        sys.exit(_fail(f"lmlab: error: {message} (see `{self.prog} --help`)"))


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="lmlab", description="Build, train and run language models.")
    ap.add_argument("--debug", action="store_true", help="show Python tracebacks")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("quickstart", help="train a small Transformer on the built-in corpus, then sample")
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument("--time", default="3m", help="training time budget (default 3m)")

    p = sub.add_parser("train", help="train a model from scratch (or --resume one)")
    add_train_args(p)

    p = sub.add_parser("generate", help="continue a prompt with a trained model")
    p.add_argument("checkpoint")
    add_generation_args(p)

    p = sub.add_parser("eval", help="loss and perplexity of a model over a corpus")
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--encoding-errors", choices=["strict", "replace", "ignore"], default="strict")
    _pickle_flag(p)

    p = sub.add_parser("info", help="architecture, parameters, tokenizer and training state")
    p.add_argument("checkpoint", help="an lmlab checkpoint, a Hugging Face folder or a Hub id")
    _pickle_flag(p)

    p = sub.add_parser("compare", help="train several models on the same text and budget; write a report")
    add_compare_args(p)

    p = sub.add_parser("export", help="write a model as a Hugging Face transformers folder")
    p.add_argument("checkpoint", help="an lmlab checkpoint, a Hugging Face folder or a Hub id")
    p.add_argument("--format", choices=["hf"], default="hf", help="hf: transformers (the only format)")
    p.add_argument("--out", required=True, help="the folder to write (must not exist, or be empty)")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: the model's own)")
    _pickle_flag(p)
    return ap


# --------------------------------------------------------------------------- commands
def cmd_train(a: argparse.Namespace) -> int:
    from lmlab.training import train

    opts = {k: getattr(a, k) for k in _train_keys() if getattr(a, k, None) is not None}
    if "out" not in opts and "resume" not in opts:
        raise LmlabError("give --out DIR (where to write the model), or --resume DIR")
    if getattr(a, "nproc", None) is not None:  # relaunch this command under torchrun
        return _train_nproc(opts, a.nproc, a.debug)
    res = train(**opts)
    from lmlab import distributed

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
    from lmlab.distributed import check_before_launch, launch, train_argv

    check_before_launch(opts, nproc)
    sub = next(x for x in build_parser()._actions if isinstance(x, argparse._SubParsersAction))
    res = launch(train_argv(opts, sub.choices["train"]), nproc, debug=debug)
    if res.status == 0 or res.status >= 128:  # >= 128: stopped by a signal; the workers saved, said so
        return res.status
    if res.reason is None:  # each failed process stopped on a user error, printed above
        return 2
    out = opts.get("out") or opts["resume"]
    raise LmlabError(
        f"the {nproc}-process run failed: {res.reason}; a checkpoint in {out}, if any, is whole: "
        f"continue with `lmlab train --resume {out} --nproc {nproc}`"
    )


def _report_train(res) -> None:
    msg = [f"lmlab: trained {res.step} steps"]
    if res.val_loss is not None:
        msg.append(f"validation loss {res.val_loss:.4f} (perplexity {math.exp(res.val_loss):.2f})")
    print(", ".join(msg), file=sys.stderr)
    print(f"lmlab: checkpoint: {res.out}/  (best: {res.out}/best/)", file=sys.stderr)
    print(f"lmlab: metrics:    {res.out}/metrics.jsonl", file=sys.stderr)
    if res.loss_png:
        print(f"lmlab: loss curve: {res.loss_png}", file=sys.stderr)


def cmd_generate(a: argparse.Namespace) -> int:
    import lmlab

    model = lmlab.load(
        a.checkpoint, dtype=a.dtype, device=a.device, allow_pickle=a.allow_pickle, quantize=a.quantize
    )
    opts = {k: getattr(a, k) for k in GENERATION_KEYS if getattr(a, k, None) is not None}
    if "early_stopping" in opts and opts["early_stopping"] != "never":
        opts["early_stopping"] = opts["early_stopping"] == "true"
    out = sys.stdout
    if a.json or a.logprobs is not None or (a.num_return_sequences or 1) > 1:
        return _print_results(model.generate(a.prompt, return_details=True, **opts), as_json=a.json)
    if a.stream:
        for delta in model.stream(a.prompt, **opts):
            out.write(delta)
            out.flush()
    else:
        out.write(model.generate(a.prompt, **opts))
    out.write("\n")
    out.flush()
    return 0


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
    from lmlab.evaluate import evaluate_corpus

    model = lmlab.load(a.checkpoint, allow_pickle=a.allow_pickle)
    r = evaluate_corpus(model, a.data, batch_size=a.batch_size, encoding_errors=a.encoding_errors)
    print(f"loss {r['loss']:.4f}  perplexity {r['perplexity']:.3f}  over {r['tokens']:,} tokens of {a.data}")
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    import dataclasses

    import lmlab
    from lmlab.tokenizer import tokenizer_kind

    model = lmlab.load(a.checkpoint, allow_pickle=a.allow_pickle)
    cfg = model.config
    origin = getattr(model.module, "hf_origin", None)  # set when read from a Hugging Face folder / Hub id
    print(f"checkpoint   {a.checkpoint}")
    if origin:
        arch = ", ".join(origin["config"].get("architectures") or []) or "no architectures listed"
        print(f"source       Hugging Face {origin['model_type']} ({arch}), read from {origin['path']}")
    print(f"model        {type(model.module).__name__}  ({cfg.model_type})")
    print(f"parameters   {model.module.num_parameters():,}")
    dtype = str(model.module.dtype).removeprefix("torch.")
    stored = origin and (origin["config"].get("dtype") or origin["config"].get("torch_dtype"))
    print(f"dtype        {dtype}" + (f" (stored as {stored})" if stored else ""))
    if cfg.model_type == "transformer":
        print(f"context      {cfg.max_seq_len:,} tokens")
    else:  # a recurrent state has no length limit; max_seq_len is the training window
        print(f"context      unbounded (trained on {cfg.max_seq_len:,}-token windows)")
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    print("config       " + ", ".join(f"{k}={v}" for k, v in fields.items() if k != "model_type"))
    print(f"tokenizer    {tokenizer_kind(model.tokenizer)}, {model.tokenizer.get_vocab_size()} tokens")
    st = Path(a.checkpoint) / "trainer_state.json"
    if st.is_file():
        s = json.loads(st.read_text())
        best = s.get("best_val")
        print(
            f"training     step {s.get('step')} of {s.get('max_steps')}, {s.get('tokens', 0):,} tokens, "
            f"{s.get('elapsed', 0):.0f}s" + (f", best validation loss {best:.4f}" if best is not None else "")
        )
    elif origin:
        print("training     (a Hugging Face model, no lmlab training state: fine-tune with train --init)")
    else:
        print("training     (no training state: not resumable)")
    return 0


def cmd_quickstart(a: argparse.Namespace) -> int:
    from lmlab.quickstart import quickstart

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


#: Seconds a rank > 0 leaves rank 0 to report an error they share before it reports it itself.
QUIET_RANK_GRACE_S = 10.0


def _torchrun_rank() -> int | None:
    """This process's rank under torchrun; None outside it (read without importing torch)."""
    if "LOCAL_RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    if "lmlab.distributed" in sys.modules:  # the process group's rank, if one was joined
        return sys.modules["lmlab.distributed"].rank()
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
    warnings.formatwarning = lambda msg, cat, *args, **kw: f"lmlab: warning: {msg}\n"
    try:
        return COMMANDS[a.command](a)
    except LmlabError as e:
        if a.debug:
            raise
        return _fail(f"lmlab: error: {e}")
    except KeyboardInterrupt:
        if not _torchrun_rank():  # under torchrun, rank 0 speaks for the job
            print("lmlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
