"""Training an extractive question-answering model (``lmlab train --task qa``).

The same Trainer as every model; what differs is here. The data are SQuAD-format questions
(:mod:`lmlab.qa_data`); each becomes windows ``[CLS] question [SEP] part of the context [SEP]``
(the context read in overlapping parts, as the QA pipeline reads it), and a window's labels
are the token positions of the answer's first and last character — or [CLS] (position 0)
when the answer is not wholly inside it (Devlin et al. 2019's SQuAD recipe). The loss is

    L = ½ [CE(start logits, s) + CE(end logits, e)]      over the window's real tokens

Each evaluation reports the dev loss and ``span_f1``: over the dev windows that hold the
answer, the token-overlap F1 of the best span (s ≤ e < s + 30) with the answer's;
``DIR/best`` keeps the best. ``lmlab evaluate --task qa`` scores the run with the official
EM/F1 (SQuAD v1.1, or CMRC 2018 for Chinese).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, processors

from lmlab.checkpoint import unwrap
from lmlab.errors import LmlabError
from lmlab.messages import say, warn
from lmlab.pairs import bucket_batches, pad_batch
from lmlab.qa_data import QAExample, read_qa
from lmlab.tokenizer import load_tokenizer, train_tokenizer, truncating
from lmlab.training.buckets import BucketPlan
from lmlab.training.trainer import Trainer, _Progress

SPECIALS = ("[PAD]", "[CLS]", "[SEP]")
#: dev questions held out when no --valid is given (at most)
MAX_VALID = 500
#: the longest answer the dev metric considers, in tokens
MAX_ANSWER_TOKENS = 30


def qa_tokenizer(kind: str, examples: list[QAExample] | None, vocab_size: int) -> Tokenizer:
    """``char`` or ``bpe`` trained on the questions and contexts, with [PAD], [CLS], [SEP] and
    BERT's pair template (segment 0 the question, 1 the context); or an existing tokenizer."""
    if kind in ("char", "bpe"):
        assert examples is not None
        texts = (t for e in examples for t in (e.question, e.context))
        tok = train_tokenizer(kind, texts, vocab_size)
    else:
        tok = load_tokenizer(kind)
    if tok.post_processor is None:
        tok.add_special_tokens(list(SPECIALS))
        qa_tokenizer_template(tok)
    return tok


def qa_tokenizer_template(tok: Tokenizer) -> Tokenizer:
    """BERT's templates on ``tok`` (which has [CLS] and [SEP]): ``[CLS] A [SEP]``, and for a
    pair ``[CLS] A [SEP] B [SEP]`` with segment 0 the question, 1 the context."""
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A:0 [SEP]:0 $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return tok


class QATrainer(BucketPlan, Trainer):
    """A Trainer whose data are questions with answers in their contexts (see the docstring)."""

    @property
    def examples(self) -> list[QAExample]:
        if getattr(self, "_examples", None) is None:
            self._examples = [e for e in read_qa(self.cfg.data) if e.answers and _span(e) is not None]
            if not self._examples:
                raise LmlabError(f"{self.cfg.data} has no question whose answer is found in its context to learn from")
        return self._examples

    def _new_tokenizer(self) -> Tokenizer:
        return qa_tokenizer(self.cfg.tokenizer, self.examples if self.cfg.tokenizer in ("char", "bpe") else None,
                            self.cfg.vocab_size)  # fmt: skip

    def _new_model_config(self) -> Any:
        return self.cfg.model_config(self.tok.get_vocab_size())

    def _new_generation_config(self, mcfg: Any) -> dict[str, Any]:
        return {"pad_token_id": self.tok.token_to_id("[PAD]") or 0}

    def _init_model(self, source: Any) -> tuple[Any, Any]:
        head = getattr(source.module.config, "head", None)
        if head == "mlm":  # an encoder pretrained here (--task mlm): its body under a new span head
            from lmlab.models import build_model
            from lmlab.models.task_config import TaskConfig

            body = source.module.config.body
            if body.type_vocab_size < 2:
                raise LmlabError(f"--init {self.cfg.init}: its encoder has no segment embeddings for question and "
                                 "context; pretrain it with this version of lmlab (--task mlm)")  # fmt: skip
            mcfg = TaskConfig(body=body, head="span", head_hidden=False, head_dropout=self.cfg.dropout, id2label=None)
            model = build_model(mcfg)
            model.body.load_state_dict(source.module.body.state_dict())
            return model.train(), mcfg
        if head != "span":
            raise LmlabError(f"--init {self.cfg.init}: --task qa starts from a QA model (a span head: lmlab or "
                             "...ForQuestionAnswering) or an encoder pretrained with --task mlm; this is another "
                             "kind of model")  # fmt: skip
        return source.module.train(), source.module.config

    def _load_data(self, resuming: bool) -> Any:
        cfg = self.cfg
        if cfg.valid is not None:
            return self.examples, [e for e in read_qa(cfg.valid) if e.answers]
        n = len(self.examples)
        if n < 2:
            raise LmlabError(f"{cfg.data} holds {n} answered question; training needs at least 2 (one is held "
                             "out for the dev set), or give --valid FILE")  # fmt: skip
        order = np.random.default_rng(cfg.seed).permutation(n)
        k = min(MAX_VALID, n - 1, max(1, int(n * cfg.val_fraction)))
        return [self.examples[i] for i in sorted(order[k:])], [self.examples[i] for i in sorted(order[:k])]

    def _windows(self, examples: list[QAExample]) -> list[tuple[list[int], list[int], int, int]]:
        """(ids, type ids, start, end) of every window of every question."""
        limit = unwrap(self.model).config.max_seq_len
        tok = truncating(self.tok)
        plain = truncating(self.tok)  # for a question's length: no truncation
        specials = tok.post_processor.num_special_tokens_to_add(True) if tok.post_processor is not None else 0
        out, skipped = [], []
        for ex in examples:
            a, b = _span(ex) or (-1, -1)
            # The context's share of a window: what the question and the special tokens leave. The
            # windows overlap by a quarter of a window (at most 128), less than that share (the
            # tokenizer's stride must be; a question that leaves < 2 tokens is skipped, counted).
            room = limit - specials - len(plain.encode(ex.question, add_special_tokens=False).ids)
            if room < 2:
                skipped.append(ex.id)
                continue
            tok.enable_truncation(limit, stride=min(128, limit // 4, room - 1), strategy="only_second")
            enc = tok.encode(ex.question, ex.context)
            for w in [enc, *enc.overflowing]:
                s = w.char_to_token(a, 1) if a >= 0 else None
                t = w.char_to_token(b, 1) if a >= 0 else None
                s, t = (s, t) if s is not None and t is not None and s <= t else (0, 0)
                context = [q == 1 for q in w.sequence_ids]  # the context's tokens (RoBERTa's type ids are all 0)
                out.append((w.ids, w.type_ids, s, t, context))
        if skipped:
            what = f"{len(skipped)} of {len(examples)} questions (id {', '.join(map(str, skipped[:3]))}" + (", ..." if len(skipped) > 3 else "") + ")"
            if len(skipped) == len(examples):
                raise LmlabError(f"every question is too long for the model's {limit}-token window with room for its "
                                 "context; raise --max-seq-len (or start from a model with a longer context)")  # fmt: skip
            warn(f"{what} leave no room for their context in a {limit}-token window and were skipped; "
                 "raise --max-seq-len to read them")  # fmt: skip
        return out

    def _split_data(self, mcfg: Any, corpus: Any) -> None:
        train, valid = corpus
        self.train_w, self.val_w = self._windows(train), self._windows(valid)
        self.seq_len = mcfg.max_seq_len
        self.val_starts = None
        held = sum(1 for w in self.train_w if w[2] > 0)
        say(f"lmlab: {len(train):,} training questions -> {len(self.train_w):,} windows ({held:,} hold the answer), "
            f"{len(valid):,} dev questions" + (f" ({self.cfg.valid})" if self.cfg.valid else " (held out from --data)"))  # fmt: skip

    # ------------------------------------------------------------------ batches
    def _batches(self, epoch: int) -> list[list[int]]:
        lens = [len(w[0]) for w in self.train_w]
        return bucket_batches(lens, [1] * len(lens), batch_size=self.cfg.batch_size, seed=self.cfg.seed, epoch=epoch)

    def _logits(self, rows: list[int], ws: list) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = pad_batch([ws[i][0] for i in rows], self.gen_cfg.get("pad_token_id") or 0)
        types, _ = pad_batch([ws[i][1] for i in rows], 0)
        mask = mask.to(self.device)
        with self._autocast():
            logits, _ = self.model(ids.to(self.device), attention_mask=mask, token_type_ids=types.to(self.device))
        return logits.float().masked_fill(~mask.bool()[..., None], float("-inf")), mask  # (B, T, 2): padding never wins

    def _qa_loss(self, rows: list[int], ws: list, logits: torch.Tensor | None = None) -> torch.Tensor:
        if logits is None:
            logits, _ = self._logits(rows, ws)
        s = torch.tensor([ws[i][2] for i in rows], device=self.device)
        e = torch.tensor([ws[i][3] for i in rows], device=self.device)
        return (F.cross_entropy(logits[..., 0], s) + F.cross_entropy(logits[..., 1], e)) / 2

    def train_step(self, step: int) -> float:
        rows = self._batch_at(step)
        self.step_tokens = sum(len(self.train_w[i][0]) for i in rows)
        return self._step_on(rows, lambda micro: self._qa_loss(micro, self.train_w))

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Dev loss over every dev window; span F1 over the windows that hold the answer."""
        if not self.val_w:
            return None
        self.model.eval()
        lens = [len(w[0]) for w in self.val_w]
        total, f1s = 0.0, []
        for rows in bucket_batches(lens, [1] * len(lens), batch_size=self.cfg.batch_size, seed=0, epoch=0):
            logits, _ = self._logits(rows, self.val_w)
            total += float(self._qa_loss(rows, self.val_w, logits)) * len(rows)
            for j, i in enumerate(rows):
                _, _, s, e, context = self.val_w[i]
                if s == 0:
                    continue
                ps, pe = best_span(logits[j, : len(context)], torch.tensor(context, device=self.device))
                overlap = max(0, min(e, pe) - max(s, ps) + 1)
                f1s.append(0.0 if overlap == 0 else 2 * overlap / ((pe - ps + 1) + (e - s + 1)))
        self.model.train()
        self.dev_span_f1 = 100 * sum(f1s) / len(f1s) if f1s else None
        return total / len(self.val_w)

    def _evaluate_into(self, row: dict[str, Any], seen: _Progress) -> bool:
        super()._evaluate_into(row, seen)
        return self._keep_best(row, "span_f1", getattr(self, "dev_span_f1", None), 2)


def _span(ex: QAExample) -> tuple[int, int] | None:
    """The first answer's first and last character in the context (its answer_start, else where
    its text first occurs), spaces at its ends left out; None if the text is not there."""
    text = ex.answers[0]
    a = ex.starts[0] if ex.starts and ex.starts[0] is not None else ex.context.find(text)
    if a < 0 or not text.strip():
        return None
    a += len(text) - len(text.lstrip())
    return a, a + len(text.strip()) - 1


def best_span(logits: torch.Tensor, context: torch.Tensor) -> tuple[int, int]:
    """argmax over s ≤ e < s + MAX_ANSWER_TOKENS, both in the context, of start[s] + end[e]."""
    T = context.shape[0]
    start = logits[:T, 0].masked_fill(~context, float("-inf"))
    end = logits[:T, 1].masked_fill(~context, float("-inf"))
    scores = start[:, None] + end[None, :]  # (T, T)
    i = torch.arange(T, device=logits.device)
    ok = (i[None, :] >= i[:, None]) & (i[None, :] < i[:, None] + MAX_ANSWER_TOKENS)
    flat = int(scores.masked_fill(~ok, float("-inf")).argmax())
    return flat // T, flat % T


__all__ = ["QATrainer", "best_span", "qa_tokenizer"]
