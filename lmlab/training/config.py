"""``lmlab train``'s options: :class:`TrainConfig` (every flag), their checks, and the
model config they describe; ``parse_duration`` reads ``--time``.

One source of truth: each field carries its flag's documentation (``option(...)``: help
text, choices, the kind of flag, its group in ``--help``), so ``lmlab train``'s parser
(:mod:`lmlab.cli.args`) and the command line that reproduces a set of options
(:func:`train_argv`, for ``--nproc`` and ``lmlab compare``) are both read from the
fields, and the help cannot disagree with the real defaults. The module imports no torch
(the model configs and the process group are imported where they are needed), so
``lmlab train --help`` answers at once.

A mistake is one :class:`~lmlab.errors.LmlabError` line that names the flag and how to
fix it, raised before anything is read or written.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from lmlab.errors import LmlabError
from lmlab.training.budget import check_batch_split, check_one_budget, parse_duration  # noqa: F401 - re-exported
from lmlab.training.tasks import (
    SEQ2SEQ_MODELS,
    SEQ2SEQ_TASKS,
    check_classify_options,
    check_mlm_options,
    check_qa_options,
    check_task_flags,
    check_translate_options,
    classify_model_config,
    mlm_model_config,
    qa_model_config,
)

#: What ``lmlab train`` can train (--task); the models each task takes.
TASKS = ("lm", "mlm", "translate", "summarize", "classify", "qa")

#: With --init the model brings these: its architecture and its tokenizer (an error if given).
INIT_FIXED = (
    "tokenizer", "vocab_size", "model", "n_layer", "n_head", "n_kv_head", "d_model", "pos", "norm", "mlp",
    "bias", "tie_embeddings", "dropout", "hidden_size",
)  # fmt: skip

#: How a field appears on the command line (``option(flag=...)``):
#: "value" ``--name VALUE``; "bool" ``--name`` / ``--no-name``; "switch" ``--name`` (sets True);
#: "negated" ``--no-name`` (sets False); None: not a flag (set by lmlab itself).
FLAG_KINDS = ("value", "bool", "switch", "negated", None)
#: The groups of ``lmlab train --help``, in order.
GROUPS = ("data", "model", "optimisation", "checkpoints")


def option(
    default: Any,
    help: str,
    *,
    group: str,
    flag: str | None = "value",
    choices: tuple[str, ...] | None = None,
    metavar: str | None = None,
    default_text: str | None = None,
) -> Any:
    """A TrainConfig field and its flag's documentation. ``default_text`` is what ``--help``
    says the default is when the value itself would not say it (None: the value, if any)."""
    assert flag in FLAG_KINDS and group in GROUPS
    meta = {"help": help, "group": group, "flag": flag, "choices": choices, "metavar": metavar}
    meta["default_text"] = default_text
    return dataclasses.field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Every option of ``lmlab train`` (the CLI flags are these names in kebab-case)."""

    #: The optimizer steps of a run given neither --steps nor --time.
    DEFAULT_STEPS: ClassVar[int] = 2000
    #: Layers when --n-layer is not given: 4 for the Transformer; 2 for a recurrent model
    #: (char-rnn's setting: a third layer of 512 units mostly adds time on a CPU).
    GPT_LAYERS: ClassVar[int] = 4
    RNN_LAYERS: ClassVar[int] = 2

    # data
    task: str = option(
        "lm", "what to train: lm (next-token prediction on text), mlm (an encoder pretrained on text by "
        "masked-token prediction, BERT's; the body --init gives classify and qa), translate or summarize (source -> "
        "target pairs), classify (text -> label), qa (question + context -> answer span)", group="data", choices=TASKS,
    )
    data: str = option(
        "builtin",
        "a text file, a folder of text files, a glob, or 'builtin'; --task translate: a .tsv, a .jsonl, "
        "or the source side of two line-aligned files (each may be .gz)",
        group="data",
    )
    target_data: str | None = option(
        None, "--task translate: the target side, line-aligned with --data", group="data", metavar="FILE"
    )
    separate_vocab: bool = option(
        False, "--task translate: a tokenizer per side (source, target) instead of one joint vocabulary",
        group="data", flag="switch",
    )
    source_field: str = option("src", "--task translate/summarize with a .jsonl: the source's key", group="data")
    target_field: str = option("tgt", "--task translate/summarize with a .jsonl: the target's key", group="data")
    text_field: str = option("text", "--task classify with a .jsonl: the text's key", group="data")
    label_field: str = option("label", "--task classify with a .jsonl: the label's key", group="data")
    valid: str | None = option(
        None, "--task translate, summarize or classify: a dev set in --data's forms", group="data", metavar="FILE",
        default_text="a held-out slice of the training data (--val-fraction; at most 1000 pairs, 2000 texts, 500 questions)",
    )
    out: str | None = option(None, "folder for checkpoints, metrics.jsonl and loss.png", group="data")
    tokenizer: str = option("char", "char, bpe, or a tokenizer.json / Hugging Face folder", group="data")
    vocab_size: int = option(4096, "BPE vocabulary size", group="data")
    encoding_errors: str = option("strict", "what to do with bytes that are not UTF-8 (strict stops with an error), "
                                  "replace or ignore", group="data", choices=("strict", "replace", "ignore"))  # fmt: skip
    # model (the default: lmlab's recipe for small CPU runs, see README)
    model: str = option(
        "gpt",
        "gpt (the Transformer), rnn, gru or lstm (recurrent); --task translate/summarize: transformer or "
        "rnn-attention; --task classify: also encoder (bidirectional, BERT-style)", group="model",
    )
    pooling: str | None = option(
        None, "--task classify: one vector from the token states: first, last, mean or max", group="model",
        choices=("first", "last", "mean", "max"), default_text="mean for encoder, last for gpt, max for rnn/gru/lstm",
    )
    bidirectional: bool = option(
        False, "--task classify with rnn/gru/lstm: read each text both ways (a BiLSTM; such a body cannot generate)",
        group="model", flag="switch",
    )
    bigram_buckets: int = option(0, "--task classify with --bidirectional: add an embedding of each pair of adjacent "
                                 "tokens, hashed into N buckets (Chinese characters: word-like pairs); 0: off",
                                 group="model", metavar="N")  # fmt: skip
    cell: str = option("gru", "--model rnn-attention: the recurrent cell", group="model", choices=("gru", "lstm"))
    post_norm: bool = option(
        False, "--task translate: the paper's post-norm Norm(x + f(x)) instead of pre-norm x + f(Norm(x))",
        group="model", flag="switch",
    )
    attention: str = option(
        "additive", "--model rnn-attention: Bahdanau's additive or Luong's dot/general score", group="model",
        choices=("additive", "dot", "general"),
    )
    n_layer: int | None = option(
        None, "layers", group="model", default_text=f"{GPT_LAYERS} for gpt, {RNN_LAYERS} for rnn, gru and lstm"
    )
    n_head: int = option(4, "attention heads", group="model")
    n_kv_head: int | None = option(
        None, "key/value heads (< n-head: grouped-query attention)", group="model", default_text="n-head"
    )
    d_model: int = option(128, "the embedding (and Transformer) width", group="model")
    max_seq_len: int = option(
        64, "context length in tokens (recurrent models: the BPTT window)", group="model"
    )
    pos: str = option("rope", "positional encoding", group="model", choices=("sinusoidal", "learned", "rope"))
    norm: str = option("rmsnorm", "normalisation", group="model", choices=("layernorm", "rmsnorm"))
    mlp: str = option("swiglu", "the feed-forward block", group="model", choices=("swiglu", "gelu"))
    bias: bool = option(False, "biases in linear layers and LayerNorm", group="model", flag="bool")
    tie_embeddings: bool = option(
        True, "share the input embedding and the output layer", group="model", flag="bool"
    )
    dropout: float = option(0.0, "dropout probability", group="model")
    hidden_size: int = option(
        512, "recurrent models: units per layer; --d-model is the embedding", group="model"
    )
    stateful: bool = option(False, "recurrent models: carry the state across consecutive chunks of the text, not "
                            "random windows", group="model", flag="bool")  # fmt: skip
    # optimisation
    steps: int | None = option(
        None, "optimizer steps", group="optimisation", default_text=f"{DEFAULT_STEPS} without --time"
    )
    time: str | float | None = option(None, "train for a time budget instead, e.g. 5m, 90s, 1h", group="optimisation")
    batch_size: int = option(12, "the global batch, in sequences", group="optimisation")
    batch_tokens: int | None = option(
        None, "--task translate: batches of about this many (padded) tokens instead of --batch-size pairs",
        group="optimisation",
    )
    label_smoothing: float = option(
        0.1, "--task translate: label smoothing ε of the loss (Vaswani et al. use 0.1)", group="optimisation"
    )
    grad_accum: int = option(1, "micro-batches per step", group="optimisation")
    lr: float = option(2e-3, "peak learning rate", group="optimisation")
    min_lr: float | None = option(None, "final learning rate", group="optimisation", default_text="lr/10")
    warmup: int = option(100, "warmup steps", group="optimisation")
    weight_decay: float = option(0.1, "AdamW weight decay (matrices only)", group="optimisation")
    beta1: float = option(0.9, "AdamW β₁, the decay of the gradient's running mean", group="optimisation")
    beta2: float = option(0.99, "AdamW β₂, the decay of the squared gradient's running mean", group="optimisation")
    grad_clip: float = option(1.0, "clip the gradient's norm to this; 0: no clipping", group="optimisation")
    ema_decay: float = option(0.0, "average the weights, θ̄ ← d·θ̄ + (1−d)·θ after each step (0.999: about the last "
                              "1,000 steps); evaluations and the saved model use θ̄; 0: off", group="optimisation")  # fmt: skip
    token_dropout: float = option(0.0, "--task classify: word dropout, each training token becomes the unknown token "
                                  "with this probability (0.1: one in ten); 0: off", group="optimisation")  # fmt: skip
    class_weight: str = option("none", "--task classify: balanced weighs each class's loss by n / (k · n_class)",
                               group="optimisation", choices=("none", "balanced"))  # fmt: skip
    seed: int = option(1337, "random seed (initialisation, batches, dropout)", group="optimisation")
    precision: str = option("fp32", "arithmetic precision", group="optimisation", choices=("fp32", "bf16"))
    device: str = option("auto", "cpu, cuda, mps or auto", group="optimisation")
    # checkpoints and bookkeeping
    eval_every: int = option(250, "steps between validation evaluations", group="checkpoints")
    eval_batches: int = option(20, "validation batches per evaluation", group="checkpoints")
    save_every: int = option(500, "steps between checkpoints", group="checkpoints")
    bleu_samples: int = option(
        200, "--task translate: dev pairs translated (greedy) for BLEU at each evaluation", group="checkpoints"
    )
    val_fraction: float = option(0.1, "the last fraction of tokens kept for validation", group="data")
    resume: str | None = option(
        None, "continue the run in DIR with its stored settings", group="checkpoints", metavar="DIR"
    )
    extend_time: bool = option(
        False, "--resume with --time T trains for T more", group="checkpoints", flag=None
    )
    init: str | None = option(
        None,
        "fine-tune: start from an lmlab checkpoint, a Hugging Face folder or a Hub id (and its tokenizer)",
        group="checkpoints",
        metavar="SOURCE",
    )
    allow_pickle: bool = option(
        False,
        "read a Hugging Face pytorch_model.bin (torch.load(weights_only=True)); only for trusted files",
        group="checkpoints",
        flag="switch",
    )
    overwrite: bool = option(False, "replace a checkpoint in --out", group="checkpoints", flag="switch")
    progress: bool = option(True, "no progress bar", group="checkpoints", flag="negated")

    def __post_init__(self) -> None:
        """--n-layer not given: the model's own default depth (GPT_LAYERS, RNN_LAYERS)."""
        if self.n_layer is None:
            from lmlab.models.config import RECURRENT

            recurrent = self.model in (*RECURRENT, "rnn-attention")
            self.n_layer = self.RNN_LAYERS if recurrent else self.GPT_LAYERS
        if self.task in SEQ2SEQ_TASKS and self.model == "gpt":
            self.model = "transformer"  # the default --model, for an encoder-decoder
        if self.task in ("qa", "mlm") and self.model == "gpt":
            self.model = "encoder"  # the default --model, for a reader and a masked LM
            self._encoder_default = True
        if self.task in SEQ2SEQ_TASKS and self.pos == "rope":
            self.pos = "sinusoidal"  # the paper's; RoPE is a decoder-only default
            self._rope_default = True

    def _check_types(self) -> None:
        """Each option has its annotated type (``steps="3"``, ``lr="fast"``, ``n_layer=1.5`` from
        Python or a damaged trainer_state.json are named here, not deep inside torch);
        floats are finite. An int is a valid float; a bool is not a number."""
        for f in dataclasses.fields(self):
            value, kinds = getattr(self, f.name), str(f.type).replace(" ", "").split("|")
            if value is None and "None" in kinds:
                continue
            ok = any(
                (k == "int" and isinstance(value, int) and not isinstance(value, bool))
                or (k == "float" and isinstance(value, (int, float)) and not isinstance(value, bool))
                or (k == "bool" and isinstance(value, bool))
                or (k == "str" and isinstance(value, str))
                or k not in ("int", "float", "bool", "str", "None")
                for k in kinds
            )
            if not ok:
                want = " or ".join(k for k in kinds if k != "None")
                raise LmlabError(f"--{f.name.replace('_', '-')} must be {_ARTICLE.get(want, 'a ' + want)}, not {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise LmlabError(f"--{f.name.replace('_', '-')} must be a finite number, not {value}")

    def validate(self, given: Collection[str] = ()) -> None:
        """Check the options; ``given`` names those set explicitly (see ``_check_given``)."""
        from lmlab.models.config import RECURRENT
        from lmlab.training.distributed import env_world_size

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise LmlabError(msg)

        self._check_types()
        need(self.out is not None, "give --out DIR, the folder to write the checkpoint to")
        need(str(self.out).strip() != "", "--out is empty; give the folder to write the checkpoint to")
        need(self.precision in ("fp32", "bf16"), f"--precision must be fp32 or bf16 (got {self.precision})")
        need(self.mlp in ("swiglu", "gelu"), f"--mlp must be swiglu or gelu (got {self.mlp})")
        need(self.task in TASKS, f"--task must be one of {', '.join(TASKS)} (got {self.task!r})")
        if self.task in SEQ2SEQ_TASKS:
            check_translate_options(self)
        elif self.task == "classify":
            check_classify_options(self)
        elif self.task == "qa":
            check_qa_options(self)
        elif self.task == "mlm":
            check_mlm_options(self)
        else:
            need(
                self.model in ("gpt", *RECURRENT),
                f"--model must be gpt, {', '.join(RECURRENT)} (got {self.model!r})"
                + ("; rnn-attention and transformer are for --task translate" if self.model in SEQ2SEQ_MODELS else ""),
            )
            need(self.target_data is None and self.valid is None and not self.separate_vocab,
                 "--target-data, --valid and --separate-vocab are for --task translate (parallel text)")
        need(self.n_layer > 0, f"--n-layer must be positive (got {self.n_layer})")
        need(self.max_seq_len > 0, f"--max-seq-len must be positive (got {self.max_seq_len})")
        need(
            self.model not in RECURRENT or self.hidden_size > 0,
            f"--hidden-size must be positive (got {self.hidden_size})",
        )
        need(
            not self.stateful or self.model in RECURRENT or self.init is not None,  # --init: checked on load
            f"--stateful needs a recurrent model (--model {', '.join(RECURRENT)}); "
            f"--model {self.model} has no state to carry from one chunk to the next",
        )
        need(self.batch_size > 0, f"--batch-size must be positive (got {self.batch_size})")
        need(self.grad_accum > 0, f"--grad-accum must be positive (got {self.grad_accum})")
        check_batch_split(self.batch_size, self.grad_accum, env_world_size())
        need(self.steps is None or self.steps > 0, f"--steps must be positive (got {self.steps})")
        check_one_budget(self.steps, self.time)
        need(self.lr > 0, f"--lr must be positive (got {self.lr})")
        need(
            self.min_lr is None or 0 <= self.min_lr <= self.lr,
            f"--min-lr must be between 0 and --lr {self.lr} (got {self.min_lr}); it is where the cosine ends",
        )
        need(self.warmup >= 0, f"--warmup must be 0 or more steps (got {self.warmup})")
        need(0 <= self.ema_decay < 1, f"--ema-decay must be in [0, 1), e.g. 0.999 (got {self.ema_decay}); 0 is off")
        need(0 <= self.val_fraction < 1, f"--val-fraction must be in [0, 1) (got {self.val_fraction})")
        need(self.eval_every > 0, f"--eval-every must be positive (got {self.eval_every})")
        need(self.save_every > 0, f"--save-every must be positive (got {self.save_every})")
        need(
            self.encoding_errors in ("strict", "replace", "ignore"),
            "--encoding-errors must be strict, replace or ignore",
        )
        if self.time is not None:
            need(parse_duration(self.time) > 0, f"--time must be positive (got {self.time})")
        self._check_given(set(given))

    def _check_given(self, given: set[str]) -> None:
        """Flags that make sense only together with others: an error names the flag to
        drop. ``given`` are the options the user set (the CLI passes only those), so a
        default never counts as a choice."""
        from lmlab.models.config import RECURRENT

        if self.task in SEQ2SEQ_TASKS and "pos" in given and getattr(self, "_rope_default", False):
            raise LmlabError(f"--task {self.task}: the encoder-decoder takes --pos sinusoidal or learned, not rope")
        if "model" in given and getattr(self, "_encoder_default", False):
            raise LmlabError(f"--task {self.task} trains a bidirectional encoder: --model encoder (the default), "
                             "not gpt")  # fmt: skip
        if self.model == "encoder" and self.init is None:
            unread = [k for k in ("pos", "n_kv_head", "tie_embeddings") if k in given]
            if unread:
                flags = {"tie_embeddings": "--no-tie-embeddings" if not self.tie_embeddings else "--tie-embeddings"}
                raise LmlabError(", ".join(flags.get(k, "--" + k.replace("_", "-")) for k in unread) + ": the encoder has learned "
                                 "positions, one key/value head per query head and no output layer to tie; drop "
                                 + ("it" if len(unread) == 1 else "them"))  # fmt: skip
        check_task_flags(self, given)
        if self.init is not None:
            fixed = [k for k in INIT_FIXED if k in given]
            if fixed:
                raise LmlabError(
                    "--init uses the model's own architecture and tokenizer; drop "
                    + ", ".join("--" + k.replace("_", "-") for k in fixed)
                )
        elif "hidden_size" in given and self.model not in (*RECURRENT, "rnn-attention"):
            raise LmlabError(
                f"--hidden-size is for recurrent models (--model {', '.join(RECURRENT)}); "
                f"--model {self.model} takes its width from --d-model: drop --hidden-size"
            )

    def model_config(self, vocab_size: int, target_vocab_size: int | None = None, labels: list[str] | None = None) -> Any:
        from lmlab.models.config import RECURRENT, RNNConfig, Seq2SeqConfig, TransformerConfig

        if self.task == "classify":  # a body (an lm's config, or the encoder's) under a head
            return classify_model_config(self, vocab_size, labels or [])
        if self.task == "qa":
            return qa_model_config(self, vocab_size)
        if self.task == "mlm":
            return mlm_model_config(self, vocab_size)
        if self.task in SEQ2SEQ_TASKS and self.model == "rnn-attention":
            from lmlab.models.config import RNNSeq2SeqConfig

            return RNNSeq2SeqConfig(
                cell=self.cell, vocab_size=vocab_size, d_model=self.d_model, hidden_size=self.hidden_size,
                n_layer=self.n_layer, attention=self.attention, dropout=self.dropout,
                max_source_len=self.max_seq_len, max_target_len=self.max_seq_len,
                target_vocab_size=target_vocab_size, share_embeddings=target_vocab_size is None,
            )  # fmt: skip
        if self.task in SEQ2SEQ_TASKS:
            return Seq2SeqConfig(
                vocab_size=vocab_size, n_layer=self.n_layer, n_head=self.n_head, d_model=self.d_model,
                max_source_len=self.max_seq_len, max_target_len=self.max_seq_len, pos=self.pos, norm=self.norm,
                norm_bias=self.bias, activation="silu" if self.mlp == "swiglu" else "gelu",
                gated_mlp=self.mlp == "swiglu", attn_bias=self.bias, mlp_bias=self.bias, prenorm=not self.post_norm,
                # learned positions in BART's layout (2 spare rows, a norm after the embeddings), so
                # the model exports as BART/mBART; sinusoidal as Marian's [sin | cos]
                pos_offset=2 if self.pos == "learned" else 0, embed_norm=self.pos == "learned",
                sinusoidal_layout="halves",
                tie_embeddings=self.tie_embeddings, dropout=self.dropout,
                target_vocab_size=target_vocab_size, share_embeddings=target_vocab_size is None,
            )  # fmt: skip

        if self.model in RECURRENT:
            return RNNConfig(
                cell=self.model, vocab_size=vocab_size, d_model=self.d_model, hidden_size=self.hidden_size,
                n_layer=self.n_layer, dropout=self.dropout, tie_embeddings=self.tie_embeddings and not self.bidirectional,
                max_seq_len=self.max_seq_len, bidirectional=self.bidirectional, bigram_buckets=self.bigram_buckets,
            )  # fmt: skip
        return TransformerConfig(
            vocab_size=vocab_size, n_layer=self.n_layer, n_head=self.n_head, n_kv_head=self.n_kv_head,
            d_model=self.d_model, max_seq_len=self.max_seq_len, pos=self.pos, norm=self.norm, norm_bias=self.bias,
            activation="silu" if self.mlp == "swiglu" else "gelu", gated_mlp=self.mlp == "swiglu",
            qkv_bias=self.bias, proj_bias=self.bias, mlp_bias=self.bias, tie_embeddings=self.tie_embeddings,
            dropout=self.dropout,
        )  # fmt: skip


# --------------------------------------------------------------------------- the flags
_TYPES: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool}
_ARTICLE = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def flag_fields() -> Iterator[dataclasses.Field]:
    """The TrainConfig fields that are ``lmlab train`` flags, in order (not the internal ones)."""
    return (f for f in dataclasses.fields(TrainConfig) if f.metadata.get("flag") is not None)


def flag_name(f: dataclasses.Field) -> str:
    """``--vocab-size`` for ``vocab_size``."""
    return "--" + f.name.replace("_", "-")


def value_type(f: dataclasses.Field) -> type:
    """The type a flag's text is read as: the annotation's first member (``int | None`` -> int)."""
    annotation = f.type if isinstance(f.type, str) else f.type.__name__
    return _TYPES[annotation.split("|")[0].strip()]


def train_argv(options: dict[str, Any]) -> list[str]:
    """The ``lmlab train`` flags that reproduce ``options`` (TrainConfig names; a None
    value, an unknown name or an internal field gives no flag). Read from the fields, as
    the parser is, so the two cannot drift apart."""
    argv: list[str] = []
    for f in flag_fields():
        value = options.get(f.name)
        if value is None:
            continue
        kind, name = f.metadata["flag"], flag_name(f)
        if kind == "bool":
            argv.append(name if value else "--no-" + name[2:])
        elif kind == "switch":
            argv += [name] if value else []
        elif kind == "negated":
            argv += [] if value else ["--no-" + name[2:]]
        else:
            argv += [name, str(value)]
    return argv

