"""``lmlab train``'s options: one source (TrainConfig's fields) for the flags, their help
and the command line that reproduces a set of options (``--nproc``, ``lmlab compare``).

References: the flag spellings and defaults as the documentation gives them (written out
here), argparse parsing the generated command line back, and AdamW's own settings in the
optimizer a run builds.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
from contextlib import redirect_stdout

import pytest
from helpers import lmlab_warnings, recorded_warnings

import lmlab
from lmlab.cli import build_parser
from lmlab.cli.args import train_keys
from lmlab.training import TrainConfig, Trainer, train_argv

#: Every flag of `lmlab train` and what it sets (the README's and docs/training.md's spellings).
FLAGS = {
    "--data": ("data", "d.txt"), "--out": ("out", "o"), "--tokenizer": ("tokenizer", "bpe"),
    "--vocab-size": ("vocab_size", 300), "--encoding-errors": ("encoding_errors", "replace"),
    "--val-fraction": ("val_fraction", 0.2), "--model": ("model", "lstm"), "--n-layer": ("n_layer", 3),
    "--n-head": ("n_head", 8), "--n-kv-head": ("n_kv_head", 2), "--d-model": ("d_model", 64),
    "--max-seq-len": ("max_seq_len", 32), "--pos": ("pos", "learned"), "--norm": ("norm", "layernorm"),
    "--mlp": ("mlp", "gelu"), "--bias": ("bias", True), "--no-tie-embeddings": ("tie_embeddings", False),
    "--dropout": ("dropout", 0.1), "--hidden-size": ("hidden_size", 96), "--stateful": ("stateful", True),
    "--steps": ("steps", 7), "--time": ("time", "5m"), "--batch-size": ("batch_size", 6), "--grad-accum": ("grad_accum", 2),
    "--lr": ("lr", 0.001), "--min-lr": ("min_lr", 0.0001), "--warmup": ("warmup", 5),
    "--weight-decay": ("weight_decay", 0.05), "--beta1": ("beta1", 0.8), "--beta2": ("beta2", 0.95),
    "--grad-clip": ("grad_clip", 0.5), "--seed": ("seed", 3), "--precision": ("precision", "bf16"),
    "--device": ("device", "cpu"), "--eval-every": ("eval_every", 9), "--eval-batches": ("eval_batches", 4),
    "--save-every": ("save_every", 11), "--resume": ("resume", "r"), "--init": ("init", "gpt2"),
    "--allow-pickle": ("allow_pickle", True), "--overwrite": ("overwrite", True),
    "--no-progress": ("progress", False), "--task": ("task", "translate"), "--target-data": ("target_data", "t.de"),
    "--source-field": ("source_field", "en"), "--target-field": ("target_field", "de"), "--valid": ("valid", "v.tsv"),
    "--batch-tokens": ("batch_tokens", 900), "--label-smoothing": ("label_smoothing", 0.2),
    "--bleu-samples": ("bleu_samples", 50), "--cell": ("cell", "lstm"), "--attention": ("attention", "dot"),
    "--post-norm": ("post_norm", True), "--separate-vocab": ("separate_vocab", True),
    "--text-field": ("text_field", "review"), "--label-field": ("label_field", "stars"), "--pooling": ("pooling", "max"),
    "--class-weight": ("class_weight", "balanced"), "--bidirectional": ("bidirectional", True),
    "--ema-decay": ("ema_decay", 0.5), "--bigram-buckets": ("bigram_buckets", 64),
    "--token-dropout": ("token_dropout", 0.1),
}  # fmt: skip


def _train_subparser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def _parsed_options(argv: list[str]) -> dict:
    a = build_parser().parse_args(["train", *argv])
    return {k: getattr(a, k) for k in train_keys() if getattr(a, k, None) is not None}


def test_every_option_is_a_flag() -> None:
    """Each TrainConfig field but the internal one is settable, with the documented spelling."""
    settable = {name for name, _ in FLAGS.values()}
    assert settable == {f.name for f in dataclasses.fields(TrainConfig)} - {"extend_time"}
    argv = [w for flag, (_, v) in FLAGS.items() for w in ([flag] if isinstance(v, bool) else [flag, str(v)])]
    assert _parsed_options(argv) == dict(FLAGS.values())
    assert _parsed_options(["--no-bias", "--tie-embeddings", "--no-stateful", "--time", "5m"]) == {
        "bias": False, "tie_embeddings": True, "stateful": False, "time": "5m",
    }  # fmt: skip
    assert _parsed_options([]) == {}  # a default is never passed on as a choice


def test_the_command_line_parses_back_to_the_options() -> None:
    """What --nproc and compare hand a child process: the same options, every kind of flag."""
    opts = dict(FLAGS.values())
    argv = train_argv(opts)
    assert _parsed_options(argv) == opts
    assert train_argv({"bias": False, "progress": True, "overwrite": False, "steps": None}) == ["--no-bias"]
    assert train_argv({"extend_time": True, "tie_embeddings": True}) == ["--tie-embeddings"]


def test_help_states_the_real_defaults() -> None:
    out = io.StringIO()
    with redirect_stdout(out):
        _train_subparser().print_help()
    text = " ".join(out.getvalue().split())  # argparse wraps lines
    for expected in [
        "--steps STEPS optimizer steps (default 2000 without --time)",
        "--lr LR peak learning rate (default 0.002)",
        "--min-lr MIN_LR final learning rate (default lr/10)",
        "(default 0.9)",  # beta1
        "(default 0.99)",  # beta2
        "--batch-size BATCH_SIZE the global batch, in sequences (default 12)",
        "--bias, --no-bias biases in linear layers and LayerNorm (default off)",
        "share the input embedding and the output layer (default on)",
        "--warmup WARMUP warmup steps (default 100)",
        "--val-fraction VAL_FRACTION the last fraction of tokens kept for validation (default 0.1)",
    ]:
        assert expected in text, expected
    assert "--extend-time" not in text


@pytest.mark.parametrize("argv", [["--steps", "5", "--time", "1m"], ["--lr", "x"], ["--pos", "alibi"]])
def test_bad_flags_are_one_line_errors(argv: list[str], capsys) -> None:
    from lmlab.cli import main

    try:
        rc = main(["train", "--out", "o", *argv])
    except SystemExit as e:  # argparse's own refusals
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("lmlab: error: ") and len(err.strip().splitlines()) == 1, err


def test_betas_and_the_default_budget_reach_the_run(tmp_path, corpus_path) -> None:
    """--beta1/--beta2 are AdamW's betas; a run given neither --steps nor --time plans 2000 steps."""
    opts = _parsed_options(["--data", str(corpus_path), "--out", str(tmp_path / "o"), "--beta1", "0.8",
                            "--beta2", "0.95", "--n-layer", "1", "--d-model", "16", "--device", "cpu"])  # fmt: skip
    trainer = Trainer(TrainConfig(**opts), opts)
    try:
        trainer.setup()
        assert [g["betas"] for g in trainer.optimizer.param_groups] == [(0.8, 0.95)] * 2
        assert trainer.max_steps == 2000
    finally:
        trainer.close()


def test_a_resumed_run_warns_of_the_options_it_ignores(tmp_path, corpus_path) -> None:
    small = dict(n_layer=1, n_head=2, d_model=16, max_seq_len=16, batch_size=4, device="cpu", progress=False)
    out = tmp_path / "run"
    lmlab.train(data=str(corpus_path), out=str(out), steps=2, **small)
    with recorded_warnings() as caught:
        lmlab.train(resume=str(out), steps=3, lr=1e-4, beta2=0.9, progress=False)
    assert lmlab_warnings(caught) == ["a resumed run keeps its stored settings; ignoring --beta2, --lr"]


def test_vocab_size_without_bpe_is_named_as_ignored(tmp_path, corpus_path) -> None:
    """--vocab-size sizes a BPE only: with characters it is ignored, and said so (the run's
    vocabulary is the corpus's distinct characters, not the number asked)."""
    small = dict(n_layer=1, n_head=2, d_model=16, max_seq_len=16, batch_size=4, device="cpu", progress=False, steps=1)
    with recorded_warnings() as caught:
        res = lmlab.train(data=str(corpus_path), out=str(tmp_path / "c"), tokenizer="char", vocab_size=5000, **small)
    assert lmlab_warnings(caught) == [
        "--vocab-size is read by --tokenizer bpe only; a char tokenizer has one token per distinct character of "
        "the data: ignoring --vocab-size 5000"
    ]
    assert lmlab.load(res.out).tokenizer.get_vocab_size() == len(set(corpus_path.read_text(encoding="utf-8"))) + 2
    with recorded_warnings() as caught:
        lmlab.train(data=str(corpus_path), out=str(tmp_path / "b"), tokenizer="bpe", vocab_size=300, **small)
    assert not [w for w in lmlab_warnings(caught) if "--vocab-size" in w]
