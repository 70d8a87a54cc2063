"""The options of ``lmlab train`` that belong to one task: what ``--task translate`` checks,
and the flags a task or model would not read (an error naming them, never ignored).
Called by :meth:`lmlab.training.config.TrainConfig.validate`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmlab.errors import LmlabError

if TYPE_CHECKING:
    from lmlab.training.config import TrainConfig

SEQ2SEQ_MODELS = ("transformer", "rnn-attention")


def check_translate_options(cfg: TrainConfig) -> None:
    """--task translate: the model, the sizes and what it cannot combine with."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise LmlabError(msg)

    need(
        cfg.model in (*SEQ2SEQ_MODELS, "gpt"),
        f"--task translate trains an encoder-decoder: --model transformer or rnn-attention (got {cfg.model!r})",
    )
    need(cfg.batch_tokens is None or cfg.batch_tokens > 0, f"--batch-tokens must be positive (got {cfg.batch_tokens})")
    need(0.0 <= cfg.label_smoothing < 1.0, f"--label-smoothing must be in [0, 1) (got {cfg.label_smoothing})")
    need(cfg.bleu_samples >= 0, f"--bleu-samples must be >= 0 (got {cfg.bleu_samples})")
    need(not cfg.stateful, "--stateful is for language models; drop it with --task translate")
    need(cfg.init is None, "--init with --task translate is not supported yet: train the encoder-decoder "
         "from scratch (lmlab translate runs Marian/BART/T5 checkpoints as they are)")
    need(cfg.valid is not None or cfg.val_fraction > 0,
         "--val-fraction 0 leaves no dev pairs: give --valid PAIRS, or a --val-fraction above 0")
    need(cfg.data != "builtin", "--task translate needs parallel text: --data PAIRS (a .tsv, a .jsonl, or "
         "two line-aligned files --data SRC --target-data TGT)")


#: flags that only --task translate reads, and the models some of them are for
_TRANSLATE_ONLY = ("post_norm", "cell", "attention", "batch_tokens", "label_smoothing", "bleu_samples",
                   "source_field", "target_field")
_RNN_ATTENTION_ONLY = ("cell", "attention")
_TRANSFORMER_ONLY = ("post_norm", "pos", "n_head", "norm", "mlp")


def check_task_flags(cfg: TrainConfig, given: set[str]) -> None:
    """A flag the chosen task or model would not read is an error naming it, never ignored."""

    def drop(names: list[str], why: str) -> None:
        if names:
            raise LmlabError(f"{', '.join('--' + n.replace('_', '-') for n in names)}: {why}; drop "
                             + ("it" if len(names) == 1 else "them"))

    if cfg.task != "translate":
        drop([n for n in _TRANSLATE_ONLY if n in given], "for --task translate only")
        return
    drop([n for n in ("n_kv_head", "stateful") if n in given], "not used by an encoder-decoder")
    if cfg.model == "rnn-attention":
        drop([n for n in _TRANSFORMER_ONLY if n in given], "for --model transformer, not rnn-attention")
    else:
        drop([n for n in _RNN_ATTENTION_ONLY if n in given], "for --model rnn-attention, not transformer")
