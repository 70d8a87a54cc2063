"""The flags of ``lmlab``'s commands: the argparse definitions shared by the parser
(:mod:`lmlab.cli`) and the commands (:mod:`lmlab.cli.commands`).

Kept apart from both because the flag lists are long and change with the library's
options (every ``TrainConfig`` field is a ``train`` flag, every generation option a
``generate`` flag), while the parser and the commands stay short.
"""

from __future__ import annotations

import argparse


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
    pickle_flag(g)
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


def train_keys() -> list[str]:
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
        "--logprobs",
        type=int,
        default=None,
        metavar="N",
        help="needs --json: each token's log-prob and its N best alternatives",
    )
    p.add_argument(
        "--json", action="store_true", help="print one JSON object per sequence (text, tokens, finish reason)"
    )
    p.add_argument("--dtype", default=None, help="fp32 (default on CPU) or bf16")
    p.add_argument("--quantize", default=None, metavar="METHOD", help="int8: int8 weights (faster on CPU)")
    p.add_argument("--device", default=None, help="cpu (default), cuda, mps or auto")
    p.add_argument("--no-stream", dest="stream", action="store_false", help="print at the end")
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
]


def pickle_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read a Hugging Face pytorch_model.bin (torch.load(weights_only=True)); only for trusted files",
    )


def train_parser() -> argparse.ArgumentParser:
    """``lmlab train``'s flags alone: what ``--nproc`` turns the options back into for torchrun."""
    p = argparse.ArgumentParser(prog="lmlab train", add_help=False)
    add_train_args(p)
    return p
