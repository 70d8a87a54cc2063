"""The options of ``lmlab train`` that belong to one task: what ``--task translate`` checks,
and the flags a task or model would not read (an error naming them, never ignored).
Called by :meth:`lmlab.training.config.TrainConfig.validate`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmlab.errors import LmlabError
from lmlab.messages import warn

if TYPE_CHECKING:
    from lmlab.training.config import TrainConfig

SEQ2SEQ_MODELS = ("transformer", "rnn-attention")
#: the tasks an encoder-decoder trains for (source -> target pairs)
SEQ2SEQ_TASKS = ("translate", "summarize")
#: the bodies a classifier can have
CLASSIFY_MODELS = ("gpt", "rnn", "gru", "lstm", "encoder")
#: how each body's token states become one vector, unless --pooling says: a bidirectional
#: encoder averages; a causal Transformer has read everything at its last token; a recurrent
#: model takes the max over time of each unit (Collobert et al. 2011; the usual baseline)
DEFAULT_POOLING = {"encoder": "mean", "gpt": "last", "rnn": "max", "gru": "max", "lstm": "max"}


def check_translate_options(cfg: TrainConfig) -> None:
    """--task translate: the model, the sizes and what it cannot combine with."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise LmlabError(msg)

    need(
        cfg.model in (*SEQ2SEQ_MODELS, "gpt"),
        f"--task {cfg.task} trains an encoder-decoder: --model transformer or rnn-attention (got {cfg.model!r})",
    )
    need(cfg.batch_tokens is None or cfg.batch_tokens > 0, f"--batch-tokens must be positive (got {cfg.batch_tokens})")
    need(0.0 <= cfg.label_smoothing < 1.0, f"--label-smoothing must be in [0, 1) (got {cfg.label_smoothing})")
    need(cfg.bleu_samples >= 0, f"--bleu-samples must be >= 0 (got {cfg.bleu_samples})")
    need(not cfg.stateful, f"--stateful is for language models; drop it with --task {cfg.task}")
    need(cfg.init is None, f"--init with --task {cfg.task} is not supported yet: train the encoder-decoder "
         "from scratch (lmlab translate/summarize run Marian/BART/T5 checkpoints as they are)")
    need(cfg.valid is not None or cfg.val_fraction > 0,
         "--val-fraction 0 leaves no dev pairs: give --valid PAIRS, or a --val-fraction above 0")
    need(cfg.data != "builtin", f"--task {cfg.task} needs parallel text: --data PAIRS (a .tsv, a .jsonl, or "
         "two line-aligned files --data SRC --target-data TGT)")


def check_classify_options(cfg: TrainConfig) -> None:
    """--task classify: the body, the data and what it cannot combine with."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise LmlabError(msg)

    need(cfg.model in CLASSIFY_MODELS,
         f"--task classify puts a classifier on --model {', '.join(CLASSIFY_MODELS)} (got {cfg.model!r})")
    need(cfg.data != "builtin", "--task classify needs labelled text: --data FILE (text<TAB>label rows, or .jsonl)")
    need(not cfg.stateful, "--stateful is for language models; drop it with --task classify")
    need(cfg.target_data is None and not cfg.separate_vocab,
         "--target-data and --separate-vocab are for --task translate/summarize")
    need(cfg.valid is not None or cfg.val_fraction > 0,
         "--val-fraction 0 leaves no dev texts: give --valid FILE, or a --val-fraction above 0")
    need(not cfg.bidirectional or cfg.init is not None or cfg.model in ("rnn", "gru", "lstm"),
         f"--bidirectional is for recurrent bodies (--model rnn, gru or lstm), not --model {cfg.model}: "
         "the encoder is bidirectional already")
    need(cfg.bigram_buckets >= 0, f"--bigram-buckets must be 0 (off) or positive (got {cfg.bigram_buckets})")
    need(0 <= cfg.token_dropout < 1, f"--token-dropout must be in [0, 1), e.g. 0.1 (got {cfg.token_dropout}); 0 is off")
    need(not cfg.bigram_buckets or cfg.bidirectional,
         "--bigram-buckets is read by a --bidirectional recurrent body (--model lstm --bidirectional); add "
         "--bidirectional, or drop --bigram-buckets")


def classify_model_config(cfg: TrainConfig, vocab_size: int, labels: list[str]) -> Any:
    """The classifier --model describes: its body (a language model's config, or the
    encoder's) under a linear head over the pooled states."""
    import dataclasses

    if cfg.model == "encoder":
        body = encoder_body(cfg, vocab_size, type_vocab_size=0)
    else:  # the language model --task lm would train, as the body
        body = dataclasses.replace(cfg, task="lm", pooling=None).model_config(vocab_size)
    return classifier_config(cfg, body, labels)


def encoder_body(cfg: TrainConfig, vocab_size: int, type_vocab_size: int) -> Any:
    """The encoder --model encoder trains: pre-norm (it trains from scratch without warm-up
    trouble), learned positions, the --norm/--mlp/--bias of the other Transformers."""
    from lmlab.models.task_config import EncoderConfig

    return EncoderConfig(
        vocab_size=vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head, d_model=cfg.d_model,
        max_seq_len=cfg.max_seq_len, pos="learned", type_vocab_size=type_vocab_size, prenorm=True, embed_norm=False,
        norm=cfg.norm, norm_eps=1e-5, norm_bias=cfg.bias, attn_bias=cfg.bias, mlp_bias=cfg.bias,
        activation="silu" if cfg.mlp == "swiglu" else "gelu", gated_mlp=cfg.mlp == "swiglu", dropout=cfg.dropout,
    )  # fmt: skip


def qa_model_config(cfg: TrainConfig, vocab_size: int) -> Any:
    """An encoder (with question/context segment embeddings) under a span head."""
    from lmlab.models.task_config import TaskConfig

    body = encoder_body(cfg, vocab_size, type_vocab_size=2)
    return TaskConfig(body=body, head="span", head_hidden=False, head_dropout=cfg.dropout, id2label=None)


def check_qa_options(cfg: TrainConfig) -> None:
    """--task qa: an encoder on SQuAD-format data."""
    if cfg.model != "encoder":
        raise LmlabError(f"--task qa trains an extractive reader: --model encoder (got {cfg.model!r})")
    if cfg.data == "builtin":
        raise LmlabError("--task qa needs questions: --data FILE (SQuAD-format JSON, or .jsonl with answers)")
    if cfg.stateful or cfg.target_data is not None or cfg.separate_vocab:
        raise LmlabError("--stateful, --target-data and --separate-vocab are not for --task qa")
    if cfg.valid is None and cfg.val_fraction <= 0:
        raise LmlabError("--val-fraction 0 leaves no dev questions: give --valid FILE, or a --val-fraction above 0")


def mlm_model_config(cfg: TrainConfig, vocab_size: int) -> Any:
    """An encoder (with the two segment embeddings QA fine-tuning uses) under BERT's masked-LM head."""
    from lmlab.models.task_config import TaskConfig

    body = encoder_body(cfg, vocab_size, type_vocab_size=2)
    return TaskConfig(body=body, head="mlm", head_hidden=True, head_activation="gelu", head_dropout=cfg.dropout,
                      id2label=None)  # fmt: skip


def check_mlm_options(cfg: TrainConfig) -> None:
    """--task mlm: an encoder pretrained on plain text."""
    if cfg.model != "encoder":
        raise LmlabError(f"--task mlm pretrains a bidirectional encoder: --model encoder (got {cfg.model!r}); "
                         "a gpt or recurrent model pretrains with --task lm")  # fmt: skip
    if cfg.init is not None:
        raise LmlabError("--task mlm trains an encoder from scratch; drop --init (--resume RUN continues a run)")
    if cfg.stateful or cfg.target_data is not None or cfg.separate_vocab or cfg.valid is not None:
        raise LmlabError("--stateful, --target-data, --separate-vocab and --valid are not for --task mlm "
                         "(its dev text is the last --val-fraction of --data)")  # fmt: skip


def classifier_config(cfg: TrainConfig, body: Any, labels: list[str]) -> Any:
    """A linear head over the pooled states of ``body`` (a new body, or an --init model's)."""
    from lmlab.models.task_config import TaskConfig

    return TaskConfig(
        body=body, head="classify", num_labels=len(labels), pooling=cfg.pooling or DEFAULT_POOLING[cfg.model],
        head_hidden=False, head_dropout=cfg.dropout, id2label={str(i): lab for i, lab in enumerate(labels)},
    )  # fmt: skip


#: flags that only --task translate reads, and the models some of them are for
_TRANSLATE_ONLY = ("post_norm", "cell", "attention", "batch_tokens", "label_smoothing", "bleu_samples",
                   "source_field", "target_field")
_RNN_ATTENTION_ONLY = ("cell", "attention")
_CLASSIFY_ONLY = ("text_field", "label_field", "pooling", "class_weight", "bidirectional", "bigram_buckets",
                  "token_dropout")
_TRANSFORMER_ONLY = ("post_norm", "pos", "n_head", "norm", "mlp")


def check_task_flags(cfg: TrainConfig, given: set[str]) -> None:
    """A flag the chosen task or model would not read is an error naming it, never ignored."""

    def drop(names: list[str], why: str) -> None:
        if names:
            raise LmlabError(f"{', '.join('--' + n.replace('_', '-') for n in names)}: {why}; drop "
                             + ("it" if len(names) == 1 else "them"))

    if "vocab_size" in given and cfg.init is None and cfg.tokenizer != "bpe":  # a warning: runs that gave it worked
        what = ("a char tokenizer has one token per distinct character of the data" if cfg.tokenizer == "char"
                else f"{cfg.tokenizer} brings its own vocabulary")  # fmt: skip
        warn(f"--vocab-size is read by --tokenizer bpe only; {what}: ignoring --vocab-size {cfg.vocab_size}")
    if cfg.task not in SEQ2SEQ_TASKS:
        drop([n for n in _TRANSLATE_ONLY if n in given], "for --task translate or summarize only")
    if cfg.task != "classify":
        drop([n for n in _CLASSIFY_ONLY if n in given], "for --task classify only")
    if cfg.task not in SEQ2SEQ_TASKS:
        return
    drop([n for n in ("n_kv_head", "stateful") if n in given], "not used by an encoder-decoder")
    if cfg.model == "rnn-attention":
        drop([n for n in _TRANSFORMER_ONLY if n in given], "for --model transformer, not rnn-attention")
    else:
        drop([n for n in _RNN_ATTENTION_ONLY if n in given], "for --model rnn-attention, not transformer")
