"""The flags of ``lmlab``'s commands: the argparse definitions shared by the parser
(:mod:`lmlab.cli`) and the commands (:mod:`lmlab.cli.commands`).

Kept apart from both because the flag lists are long and change with the library's
options (every generation option is a ``generate`` flag), while the parser and the
commands stay short. ``train``'s flags are generated from ``TrainConfig``'s fields
(:mod:`lmlab.training.config`, which imports no torch).
"""

from __future__ import annotations

import argparse
import dataclasses

from lmlab.training.config import GROUPS, flag_fields, flag_name, value_type


def add_train_args(p: argparse.ArgumentParser) -> None:
    """``lmlab train``'s flags, one per TrainConfig field, read from the field: its name,
    type, choices, help and default (see :func:`lmlab.training.config.option`). Every flag
    defaults to None, so that the options passed on are those the user set (a default
    never counts as a choice, see ``TrainConfig._check_given``)."""
    groups = {name: p.add_argument_group(name) for name in GROUPS}
    for f in flag_fields():
        _add_train_flag(groups[f.metadata["group"]], f)
    g = p.add_argument_group("several processes")  # not an option of the run: how to start it
    g.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="train on N local processes with PyTorch DDP: runs `torchrun --standalone "
        "--nproc-per-node N -m lmlab train ...` (for several machines, call torchrun yourself)",
    )


def _add_train_flag(g: argparse._ArgumentGroup, f: dataclasses.Field) -> None:
    meta, name = f.metadata, flag_name(f)
    kind = meta["flag"]
    if kind == "bool":  # --bias / --no-bias
        g.add_argument(name, action=argparse.BooleanOptionalAction, default=None, help=_help(f))
    elif kind == "switch":  # --overwrite
        g.add_argument(name, action="store_true", default=None, help=_help(f))
    elif kind == "negated":  # --no-progress
        g.add_argument("--no-" + name[2:], dest=f.name, action="store_false", default=None, help=_help(f))
    else:
        kw = {"choices": meta["choices"], "metavar": meta["metavar"]}
        g.add_argument(
            name, type=value_type(f), help=_help(f), **{k: v for k, v in kw.items() if v is not None}
        )


def _help(f: dataclasses.Field) -> str:
    """The field's help, and its default as TrainConfig has it (so --help cannot disagree)."""
    meta = f.metadata
    shown = meta["default_text"]
    if shown is None and meta["flag"] == "bool":
        shown = "on" if f.default else "off"
    elif shown is None and meta["flag"] == "value" and f.default is not None:
        shown = str(f.default)
    return meta["help"] + (f" (default {shown})" if shown is not None else "")


def add_compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="a text file, a folder, a glob, or 'builtin'")
    p.add_argument("--out", required=True, help="folder for one run per model, report.md and its charts")
    p.add_argument("--task", choices=["lm", "translate"], default="lm",
                   help="lm (default): language models on text; translate: encoder-decoders on pairs")  # fmt: skip
    p.add_argument("--models", default=None,
                   help="comma-separated (default rnn,gru,lstm,gpt; --task translate: rnn-attention,transformer)")  # fmt: skip
    p.add_argument("--target-data", default=None, help="--task translate: the target side of two aligned files")
    p.add_argument("--valid", default=None, help="--task translate: a dev set (default: a held-out slice)")
    p.add_argument("--source-field", default=None, help="--task translate with a .jsonl: the source key (src)")
    p.add_argument("--target-field", default=None, help="--task translate with a .jsonl: the target key (tgt)")
    p.add_argument("--batch-tokens", type=int, default=None, help="--task translate: batches of about N tokens")
    p.add_argument("--bleu-samples", type=int, default=None, help="--task translate: dev pairs for BLEU (200)")
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


def train_keys() -> list[str]:
    """The TrainConfig fields that are ``lmlab train`` flags (the parsed namespace's names)."""
    return [f.name for f in flag_fields()]


def add_generation_args(p: argparse.ArgumentParser) -> None:
    which = p.add_mutually_exclusive_group()  # one prompt: on the command line, or from a file
    which.add_argument("--prompt", default="", help="text to continue (default: empty); - reads standard input")
    which.add_argument(
        "--prompt-file",
        metavar="FILE",
        help="read the prompt from a UTF-8 file (- for standard input): a prompt too long for the "
        "command line; one final line break is dropped",
    )
    add_decoding_args(p, seq2seq=False)
    p.add_argument("--no-stream", dest="stream", action="store_false", help="print at the end")


def add_decoding_args(p: argparse.ArgumentParser, seq2seq: bool = True) -> None:
    """The decoding options (``generate``'s); ``seq2seq``: the defaults of translation and
    summarization (deterministic unless sampling is asked for)."""
    if seq2seq:
        p.add_argument("--max-new-tokens", type=int, default=None,
                       help="tokens to generate (the model's max_length - 1, else 256)")  # fmt: skip
        p.add_argument("--temperature", type=float, default=None, help="> 0 samples (default: greedy or beams)")
        p.add_argument("--do-sample", action="store_true", default=None, help="sample instead of greedy/beams")
        p.add_argument("--forced-bos-token-id", type=int, default=None, metavar="ID",
                       help="the first new token (mBART-50: the target language's code)")  # fmt: skip
    else:
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
    if not seq2seq:
        p.add_argument("--prompt-lookup", dest="prompt_lookup_num_tokens", type=int, default=None, metavar="N",
                       help="speculative decoding: guess N tokens by finding the text's last words earlier in "
                            "it, check them in one pass (same output; faster when the output copies the input)")
        p.add_argument("--draft", default=None, metavar="MODEL",
                       help="speculative decoding: a small model with the same tokenizer guesses, this one checks")
        p.add_argument("--num-assistant-tokens", type=int, default=None, metavar="K",
                       help="with --draft: tokens guessed per check (5)")
    p.add_argument(
        "--logprobs",
        type=int,
        default=None,
        metavar="N",
        help="needs --json: each token's log-prob and its N best alternatives",
    )
    p.add_argument(
        "--json", action="store_true", help="print one JSON object per sequence (text, tokens, finish reason)"
    )
    p.add_argument("--dtype", default=None, help="fp32 or bf16 (default: fp32; bf16 for a checkpoint stored in bf16)")
    p.add_argument(
        "--quantize", default=None, metavar="METHOD",
        help="int8 (one scale a row) or int4 (a scale and zero point a group of inputs): faster on CPU",
    )  # fmt: skip
    p.add_argument("--group-size", type=int, default=None, help="--quantize int4: inputs per group (32, 64, 128, 256; 64)")
    p.add_argument("--device", default=None, help="cpu (default), cuda, mps or auto")
    pickle_flag(p)


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
    "prompt_lookup_num_tokens",
    "num_assistant_tokens",
]


def pickle_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read a Hugging Face pytorch_model.bin (torch.load(weights_only=True)); only for trusted files",
    )
