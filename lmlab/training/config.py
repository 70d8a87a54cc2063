"""``lmlab train``'s options: :class:`TrainConfig` (every flag), their checks, and the
model config they describe; ``parse_duration`` reads ``--time``.

A mistake is one :class:`~lmlab.errors.LmlabError` line that names the flag and how to
fix it, raised before anything is read or written.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass

from lmlab.errors import LmlabError
from lmlab.models.config import RECURRENT, RNNConfig, TransformerConfig
from lmlab.training import distributed

#: With --init the model brings these: its architecture and its tokenizer (an error if given).
INIT_FIXED = (
    "tokenizer", "vocab_size", "model", "n_layer", "n_head", "n_kv_head", "d_model", "pos", "norm", "mlp",
    "bias", "tie_embeddings", "dropout", "hidden_size",
)  # fmt: skip


@dataclass
class TrainConfig:
    """Every option of ``lmlab train`` (the CLI flags are these names in kebab-case)."""

    data: str = "builtin"
    out: str | None = None
    # tokenizer
    tokenizer: str = "char"  # char | bpe | PATH to tokenizer.json or a folder
    vocab_size: int = 4096  # for bpe
    encoding_errors: str = "strict"
    # model (the default: lmlab's recipe for small CPU runs, see README)
    model: str = "gpt"  # gpt (the Transformer) | rnn | gru | lstm
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None
    d_model: int = 128
    max_seq_len: int = 64
    pos: str = "rope"
    norm: str = "rmsnorm"
    mlp: str = "swiglu"  # swiglu | gelu
    bias: bool = False
    tie_embeddings: bool = True
    dropout: float = 0.0
    hidden_size: int = 512  # recurrent models: units per layer (d_model is the embedding size)
    stateful: bool = False  # recurrent models: carry the state across consecutive chunks
    # optimisation
    steps: int | None = None  # default 2000 when neither steps nor time is given
    time: str | None = None  # a budget such as "5m", "90s", "1h"
    batch_size: int = 12  # the global batch, in sequences
    grad_accum: int = 1
    lr: float = 2e-3
    min_lr: float | None = None  # default lr/10
    warmup: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    seed: int = 1337
    # bookkeeping
    eval_every: int = 250
    eval_batches: int = 20
    save_every: int = 500
    val_fraction: float = 0.1
    precision: str = "fp32"
    device: str = "auto"
    resume: str | None = None
    extend_time: bool = False  # internal: --resume with --time T trains for T more
    init: str | None = None  # fine-tune from an lmlab checkpoint, a HF folder or a Hub id
    allow_pickle: bool = False  # with --init: accept a pickle .bin checkpoint (weights_only)
    overwrite: bool = False
    progress: bool = True

    def validate(self, given: Collection[str] = ()) -> None:
        """Check the options; ``given`` names those set explicitly (see ``_check_given``)."""

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise LmlabError(msg)

        need(self.out is not None, "give --out DIR, the folder to write the checkpoint to")
        need(self.precision in ("fp32", "bf16"), f"--precision must be fp32 or bf16 (got {self.precision})")
        need(self.mlp in ("swiglu", "gelu"), f"--mlp must be swiglu or gelu (got {self.mlp})")
        need(
            self.model in ("gpt", *RECURRENT),
            f"--model must be gpt, {', '.join(RECURRENT)} (got {self.model!r})",
        )
        need(self.n_layer > 0, f"--n-layer must be positive (got {self.n_layer})")
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
        need(
            self.batch_size % self.grad_accum == 0,
            f"--batch-size {self.batch_size} is not divisible by --grad-accum {self.grad_accum}",
        )
        world = distributed.env_world_size()  # under torchrun, each process takes an equal share
        need(
            self.batch_size % (world * self.grad_accum) == 0,
            f"--batch-size {self.batch_size} (the global batch) is not divisible by {world} processes "
            f"× --grad-accum {self.grad_accum}; give a multiple of {world * self.grad_accum}",
        )
        need(self.steps is None or self.steps > 0, f"--steps must be positive (got {self.steps})")
        need(
            self.steps is None or self.time is None,
            f"give one budget, --steps {self.steps} or --time {self.time}, not both",
        )
        need(self.lr > 0, f"--lr must be positive (got {self.lr})")
        need(
            self.min_lr is None or 0 <= self.min_lr <= self.lr,
            f"--min-lr must be between 0 and --lr {self.lr} (got {self.min_lr}); it is where the cosine ends",
        )
        need(self.warmup >= 0, f"--warmup must be 0 or more steps (got {self.warmup})")
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
        if self.init is not None:
            fixed = [k for k in INIT_FIXED if k in given]
            if fixed:
                raise LmlabError(
                    "--init uses the model's own architecture and tokenizer; drop "
                    + ", ".join("--" + k.replace("_", "-") for k in fixed)
                )
        elif "hidden_size" in given and self.model not in RECURRENT:
            raise LmlabError(
                f"--hidden-size is for recurrent models (--model {', '.join(RECURRENT)}); "
                f"--model {self.model} takes its width from --d-model: drop --hidden-size"
            )

    def model_config(self, vocab_size: int) -> TransformerConfig | RNNConfig:
        if self.model in RECURRENT:
            return RNNConfig(
                cell=self.model,
                vocab_size=vocab_size,
                d_model=self.d_model,
                hidden_size=self.hidden_size,
                n_layer=self.n_layer,
                dropout=self.dropout,
                tie_embeddings=self.tie_embeddings,
                max_seq_len=self.max_seq_len,
            )
        return TransformerConfig(
            vocab_size=vocab_size,
            n_layer=self.n_layer,
            n_head=self.n_head,
            n_kv_head=self.n_kv_head,
            d_model=self.d_model,
            max_seq_len=self.max_seq_len,
            pos=self.pos,
            norm=self.norm,
            norm_bias=self.bias,
            activation="silu" if self.mlp == "swiglu" else "gelu",
            gated_mlp=self.mlp == "swiglu",
            qkv_bias=self.bias,
            proj_bias=self.bias,
            mlp_bias=self.bias,
            tie_embeddings=self.tie_embeddings,
            dropout=self.dropout,
        )


def parse_duration(s: str | float | int) -> float:
    """'90s', '5m', '1.5h', '300' -> seconds."""
    if isinstance(s, int | float):
        return float(s)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", str(s))
    if not m:
        raise LmlabError(f"--time {s!r} is not a duration; write e.g. 90s, 5m or 1h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]
