"""Pretraining an encoder as a masked language model (``lmlab train --task mlm``): BERT's recipe.

The same Trainer and data as a language model (windows of the tokenized text, ``--data``
any text, Chinese included); what differs is here. In each window 15% of the tokens are
chosen; of those, 80% become [MASK], 10% a random token, 10% stay as they are (so the
encoder cannot tell which tokens it will be asked about), and the loss is the cross-entropy
of the original tokens at the chosen positions only (Devlin et al. 2019, §3.1):

    L = −(1/|M|) Σ_{t ∈ M} log softmax(Norm(gelu(W h_t + b)) Eᵀ + c)_{x_t}

The choice is a pure function of (seed, step), so a resumed run masks what the uninterrupted
one would; evaluation masks the dev windows the same way at every evaluation (its loss is
comparable from one to the next). The pretrained encoder is the body that ``--task classify``
and ``--task qa`` start from with ``--init RUN``: the tokenizer already has the [PAD], [CLS],
[SEP] and [MASK] tokens and BERT's pair template those tasks use.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from lmlab.data import step_generator
from lmlab.errors import LmlabError
from lmlab.training.prepare import make_tokenizer
from lmlab.training.trainer import Trainer

#: the share of tokens chosen, and of those the shares replaced by [MASK] / a random token
MASK_RATE, MASK_TOKEN, RANDOM_TOKEN = 0.15, 0.8, 0.1
SPECIALS = ("[PAD]", "[CLS]", "[SEP]", "[MASK]")
IGNORE = -100  # F.cross_entropy's ignore_index: positions not chosen


def mlm_tokenizer(tok: Tokenizer) -> Tokenizer:
    """``tok`` with BERT's special tokens and its pair template (the QA reader's)."""
    from lmlab.training.qa import qa_tokenizer_template

    tok.add_special_tokens(list(SPECIALS))
    return qa_tokenizer_template(tok)


def mask_tokens(
    x: torch.Tensor, mask_id: int, vocab_size: int, special_ids: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) for a (B, T) batch of token ids: BERT's 80/10/10 corruption of 15%
    of the non-special tokens (at least one per batch); labels are the original ids at the
    chosen positions and ``IGNORE`` elsewhere. Random draws come from ``gen`` (on the CPU)."""
    u = torch.rand(x.shape, generator=gen)
    how = torch.rand(x.shape, generator=gen)
    rand_tokens = torch.randint(0, vocab_size, x.shape, generator=gen)
    x = x.cpu()
    allowed = ~torch.isin(x, special_ids)
    chosen = (u < MASK_RATE) & allowed
    if not bool(chosen.any()):  # a tiny batch: ask about one token at least
        if not bool(allowed.any()):
            raise LmlabError("a batch of the text holds only special tokens ([PAD], [CLS], [SEP], [MASK]): there is "
                             "nothing to mask and predict; train on ordinary text")  # fmt: skip
        chosen.view(-1)[int(torch.nonzero(allowed.view(-1))[0])] = True
    labels = torch.where(chosen, x, torch.full_like(x, IGNORE))
    inputs = torch.where(chosen & (how < MASK_TOKEN), torch.full_like(x, mask_id), x)
    inputs = torch.where(chosen & (how >= MASK_TOKEN) & (how < MASK_TOKEN + RANDOM_TOKEN), rand_tokens, inputs)
    return inputs, labels


class MLMTrainer(Trainer):
    """A Trainer whose model is an encoder under a masked-LM head (see the module's docstring)."""

    def _new_tokenizer(self) -> Tokenizer:
        return mlm_tokenizer(make_tokenizer(self.cfg))

    def _new_model_config(self) -> Any:
        return self.cfg.model_config(self.tok.get_vocab_size())

    def _new_generation_config(self, mcfg: Any) -> dict[str, Any]:
        return {"pad_token_id": self.tok.token_to_id("[PAD]"), "mask_token_id": self.tok.token_to_id("[MASK]")}

    def _init_model(self, source: Any) -> tuple[Any, Any]:  # pragma: no cover - refused by the config
        raise LmlabError("--task mlm trains an encoder from scratch; --resume continues a run")

    def _masking(self) -> tuple[int, torch.Tensor]:
        if getattr(self, "_mask_ids", None) is None:
            ids = [self.tok.token_to_id(t) for t in SPECIALS]
            if any(i is None for i in ids):
                raise LmlabError(f"the tokenizer of this run lacks {', '.join(SPECIALS)}; a masked-LM run needs them")
            self._mask_ids = (ids[SPECIALS.index("[MASK]")], torch.tensor(ids, dtype=torch.long))
        return self._mask_ids

    def _loss(self, x: torch.Tensor, y: torch.Tensor, carry: int | None = None) -> torch.Tensor:  # noqa: ARG002
        mask_id, specials = self._masking()
        inputs, labels = mask_tokens(x, mask_id, self.tok.get_vocab_size(), specials, self._gen)
        labels = labels.to(self.device)
        chosen = labels != IGNORE
        with self._autocast():  # logits of the chosen positions only: (n, V)
            logits, _ = self.model(inputs.to(self.device), positions=chosen)
        return F.cross_entropy(logits.float(), labels[chosen])

    def train_step(self, step: int) -> float:
        self._gen = step_generator(self.cfg.seed, step, stream=2)
        return super().train_step(step)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        self._gen = step_generator(self.cfg.seed, 0, stream=3)  # the same masks at every evaluation
        return super().evaluate()


__all__ = ["MLMTrainer", "mask_tokens", "mlm_tokenizer"]
