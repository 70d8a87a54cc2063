"""``lmlab``: a thin command line over the library. Each command is one library call.

Errors a user can cause print one line (``lmlab: error: ...``) and exit with 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
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


def _train_keys() -> list[str]:
    """Every TrainConfig field is a flag of `lmlab train` (in kebab-case)."""
    import dataclasses

    from lmlab.train import TrainConfig

    return [f.name for f in dataclasses.fields(TrainConfig)]


def add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", default="", help="text to continue (default: empty)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate (200)")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="same seed, same text")
    p.add_argument("--dtype", default=None, help="fp32 (default on CPU) or bf16")
    p.add_argument("--device", default=None, help="cpu (default), cuda, mps or auto")
    p.add_argument("--no-stream", dest="stream", action="store_false", help="print at the end")
    _pickle_flag(p)


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
        self.exit(2, f"lmlab: error: {message} (see `{self.prog} --help`)\n")


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

    p = sub.add_parser("info", help="architecture, parameters, tokenizer and training state")
    p.add_argument("checkpoint")

    p = sub.add_parser("export", help="write a model as a Hugging Face transformers folder")
    p.add_argument("checkpoint", help="an lmlab checkpoint, a Hugging Face folder or a Hub id")
    p.add_argument("--format", choices=["hf"], default="hf", help="hf: transformers (the only format)")
    p.add_argument("--out", required=True, help="the folder to write (must not exist, or be empty)")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: the model's own)")
    _pickle_flag(p)
    return ap


# --------------------------------------------------------------------------- commands
def cmd_train(a: argparse.Namespace) -> int:
    from lmlab.train import train

    opts = {k: getattr(a, k) for k in _train_keys() if getattr(a, k, None) is not None}
    if "out" not in opts and "resume" not in opts:
        raise LmlabError("give --out DIR (where to write the model), or --resume DIR")
    res = train(**opts)
    _report_train(res)
    return 0


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

    model = lmlab.load(a.checkpoint, dtype=a.dtype, device=a.device, allow_pickle=a.allow_pickle)
    opts = dict(
        max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed
    )
    out = sys.stdout
    if a.stream:
        for delta in model.stream(a.prompt, **opts):
            out.write(delta)
            out.flush()
    else:
        out.write(model.generate(a.prompt, **opts))
    out.write("\n")
    out.flush()
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    import lmlab
    from lmlab.evaluate import evaluate_corpus

    model = lmlab.load(a.checkpoint)
    r = evaluate_corpus(model, a.data, batch_size=a.batch_size, encoding_errors=a.encoding_errors)
    print(f"loss {r['loss']:.4f}  perplexity {r['perplexity']:.3f}  over {r['tokens']:,} tokens of {a.data}")
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    import dataclasses

    import lmlab
    from lmlab.tokenizer import tokenizer_kind

    model = lmlab.load(a.checkpoint)
    cfg = model.config
    print(f"checkpoint   {a.checkpoint}")
    print(f"model        {type(model.module).__name__}  ({cfg.model_type})")
    print(f"parameters   {model.module.num_parameters():,}")
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
    else:
        print("training     (no training state: not resumable)")
    return 0


def cmd_quickstart(a: argparse.Namespace) -> int:
    from lmlab.quickstart import quickstart

    quickstart(out=a.out, time=a.time)
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from lmlab.hf import export_hf

    out = export_hf(a.checkpoint, a.out, dtype=a.dtype, allow_pickle=a.allow_pickle)
    kind = json.loads((out / "config.json").read_text(encoding="utf-8"))["model_type"]
    print(f"lmlab: exported {a.checkpoint} as a Hugging Face {kind} model", file=sys.stderr)
    print(f"lmlab: wrote {out}/ (config.json, model.safetensors, tokenizer.json, ...)", file=sys.stderr)
    return 0


COMMANDS = {
    "export": cmd_export,
    "train": cmd_train,
    "generate": cmd_generate,
    "eval": cmd_eval,
    "info": cmd_info,
    "quickstart": cmd_quickstart,
}


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
        print(f"lmlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
