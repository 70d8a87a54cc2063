"""Training a text classifier (``lmlab train --task classify``).

The same Trainer as every model (schedule, ``--time``, bf16, resume, torchrun, metrics,
loss plot); what differs is here: the data are labelled texts (``text<TAB>label`` or JSON
lines), a batch is a set of texts of similar length (little padding), and the loss is the
cross-entropy of the label given the pooled states of the body,

    L = −(1/N) Σ_b w_{y_b} log softmax(W · pool(h_b))_{y_b}        (w = 1, or n / (k · n_c): --class-weight balanced)

Each evaluation reports the dev loss and accuracy; ``DIR/best`` keeps the most accurate step.
The body is any lmlab model (``--model gpt | rnn | gru | lstm | encoder``), or a language
model trained here (``--init RUN``): the GPT-1/ULMFiT recipe, pretrain on plain text, then
fine-tune on labels.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from lmlab.checkpoint import unwrap
from lmlab.errors import LmlabError
from lmlab.labeled import Labeled, read_labeled
from lmlab.messages import say, warn
from lmlab.pairs import bucket_batches, pad_batch
from lmlab.tokenizer import (
    eos_token_id,
    load_tokenizer,
    template_token_ids,
    train_tokenizer,
    truncating,
    unk_token_id,
)
from lmlab.training.buckets import BucketPlan
from lmlab.training.tasks import classifier_config
from lmlab.training.trainer import Trainer, _Progress

#: dev texts held out when no --valid is given (at most)
MAX_VALID = 2000
#: word dropout's draws: their own stream beside bucket_batches' [seed, epoch] (data.step_generator's are 1–3)
WORD_DROPOUT_STREAM = 4


class ClassifyTrainer(BucketPlan, Trainer):
    """A Trainer whose data are labelled texts (see the module's docstring)."""

    # ------------------------------------------------------------------ data
    @property
    def data(self) -> Labeled:
        if getattr(self, "_data", None) is None:
            cfg = self.cfg
            self._data = read_labeled(cfg.data, cfg.text_field, cfg.label_field)
        return self._data

    def _new_tokenizer(self) -> Tokenizer:
        cfg = self.cfg
        if cfg.tokenizer in ("char", "bpe"):
            return train_tokenizer(cfg.tokenizer, self.data.texts, cfg.vocab_size)
        return load_tokenizer(cfg.tokenizer)

    def _new_model_config(self) -> Any:
        return self.cfg.model_config(self.tok.get_vocab_size(), labels=self.data.label_set)

    def _new_generation_config(self, mcfg: Any) -> dict[str, Any]:
        return {}

    def _init_model(self, source: Any) -> tuple[Any, Any]:
        """--init: a language model trained here becomes the body of a fresh head; a classifier
        (lmlab or Hugging Face) goes on training as it is, if it knows every label."""
        from lmlab.models import build_model

        module = source.module
        cfg = getattr(module.config, "head", None)
        if cfg == "classify":
            unknown = sorted(set(self.data.labels) - set(module.config.labels))
            if unknown:
                raise LmlabError(f"{self.cfg.init} classifies into {', '.join(module.config.labels)}; the data has "
                                 f"label {unknown[0]!r}: start a new classifier from a language model instead")  # fmt: skip
            if self.cfg.bidirectional and not getattr(module.config.body, "bidirectional", False):
                raise LmlabError(f"--bidirectional: {self.cfg.init} is a classifier with a one-way body, trained as it "
                                 "is; drop --bidirectional, or start from a language model")  # fmt: skip
            has = getattr(module.config.body, "bigram_buckets", 0)
            if self.cfg.bigram_buckets and self.cfg.bigram_buckets != has:
                raise LmlabError(f"--bigram-buckets {self.cfg.bigram_buckets}: {self.cfg.init} is a classifier with "
                                 f"{has or 'no'} bigram buckets, trained as it is; drop --bigram-buckets")  # fmt: skip
            return module.train(), module.config
        if cfg == "mlm":  # an encoder pretrained here (--task mlm): its body under a new classifier
            self.cfg.model = "encoder"
            if self.cfg.bidirectional:
                raise LmlabError(f"--bidirectional is for a recurrent body; {self.cfg.init} is an encoder, "
                                 "bidirectional already: drop --bidirectional")  # fmt: skip
            mcfg = classifier_config(self.cfg, module.config.body, self.data.label_set)
            model = build_model(mcfg)
            model.body.load_state_dict(module.body.state_dict())
            return model.train(), mcfg
        if cfg is not None or getattr(module, "is_encoder_decoder", False):
            raise LmlabError(f"--init {self.cfg.init}: a classifier starts from a language model (or a classifier); "
                             "this is another kind of model")  # fmt: skip
        self.cfg.model = "rnn" if module.config.model_type == "rnn" else "gpt"
        body = module.config
        if self.cfg.bidirectional:
            if body.model_type != "rnn":
                raise LmlabError(f"--bidirectional is for a recurrent body; {self.cfg.init} is a Transformer "
                                 "(drop --bidirectional: its last token has read the whole text)")  # fmt: skip
            body = dataclasses.replace(body, bidirectional=True, tie_embeddings=False,
                                       bigram_buckets=self.cfg.bigram_buckets)  # fmt: skip
        mcfg = classifier_config(self.cfg, body, self.data.label_set)
        model = build_model(mcfg)
        if self.cfg.bidirectional:
            load_forward_direction(model.body, module.state_dict())
        else:
            model.body.load_state_dict(module.state_dict())
        return model.train(), mcfg

    def _load_data(self, resuming: bool) -> Any:
        cfg = self.cfg
        data = self.data
        if cfg.valid is not None:
            return data, read_labeled(cfg.valid, cfg.text_field, cfg.label_field)
        n = len(data)
        if n < 2:
            raise LmlabError(f"{cfg.data} holds {n} labelled text; training needs at least 2 (one is held out "
                             "for the dev set), or give --valid FILE")  # fmt: skip
        k = min(MAX_VALID, n - 1, max(1, int(n * cfg.val_fraction)))
        order = np.random.default_rng(cfg.seed).permutation(n)
        pick = lambda idx: Labeled([data.texts[i] for i in idx], [data.labels[i] for i in idx], data.name)  # noqa: E731
        return pick(sorted(order[k:])), pick(sorted(order[:k]))

    def _encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids as the pipeline will read them: a long text is cut by the tokenizer's own
        truncation, which keeps a template's closing [SEP] (slicing the ids would drop it)."""
        limit = unwrap(self.model).config.max_seq_len
        tok = truncating(self.tok, limit)
        room = tok.post_processor.num_special_tokens_to_add(False) if tok.post_processor is not None else 0
        if limit <= room:  # tokenizers would skip the truncation silently
            raise LmlabError(f"--max-seq-len {limit} leaves no room for text beside the tokenizer's {room} special "
                             "tokens ([CLS], [SEP]): raise --max-seq-len")  # fmt: skip
        encs = tok.encode_batch(texts)
        self._cut += sum(bool(e.overflowing) for e in encs)
        return [e.ids or [0] for e in encs]

    def _label_ids(self, labels: list[str], what: str) -> list[int]:
        index = {lab: i for i, lab in enumerate(self.labels)}
        unknown = sorted({lab for lab in labels if lab not in index})
        if unknown:
            raise LmlabError(f"the {what} have label {unknown[0]!r}, which the training data do not "
                             f"(labels: {', '.join(self.labels)}); fix the data or add training examples of it")  # fmt: skip
        return [index[lab] for lab in labels]

    def _split_data(self, mcfg: Any, corpus: Any) -> None:
        cfg = self.cfg
        train, valid = corpus
        self.labels = mcfg.labels
        self._cut = 0
        self.train_x, self.val_x = self._encode(train.texts), self._encode(valid.texts)
        self.train_y = self._label_ids(train.labels, "training texts")
        self.val_y = self._label_ids(valid.labels, "dev texts" if cfg.valid is None else f"--valid texts ({cfg.valid})")
        if self._cut:
            warn(f"{self._cut} texts are longer than the model's {mcfg.max_seq_len} tokens and were cut to their "
                 "first tokens (raise --max-seq-len to read more)")  # fmt: skip
        counts = np.bincount(self.train_y, minlength=len(self.labels))
        self.class_weights = None
        if cfg.class_weight == "balanced":  # w_c = n / (k · n_c): every class weighs the same in total
            w = len(self.train_y) / (len(self.labels) * np.maximum(counts, 1))
            self.class_weights = torch.tensor(w, dtype=torch.float32, device=self.device)
        self.seq_len = mcfg.max_seq_len
        self.val_starts = None
        if cfg.token_dropout:
            self._blank = blank_token(self.tok)
            say(f"lmlab: word dropout: {cfg.token_dropout:.0%} of the training tokens become "
                f"{self.tok.id_to_token(self._blank[0])}")  # fmt: skip
        shares = ", ".join(f"{lab} {c:,}" for lab, c in zip(self.labels, counts))
        say(f"lmlab: {len(train):,} training texts ({shares}), {len(valid):,} dev texts"
            + (f" ({cfg.valid})" if cfg.valid else " (held out from --data)"))  # fmt: skip

    # ------------------------------------------------------------------ batches
    def _batches(self, epoch: int) -> list[list[int]]:
        lens = [len(x) for x in self.train_x]
        return bucket_batches(lens, [1] * len(lens), batch_size=self.cfg.batch_size, seed=self.cfg.seed, epoch=epoch)

    def _logits(self, rows: list[int], xs: list[list[int]]) -> torch.Tensor:
        ids, mask = pad_batch([xs[i] for i in rows], 0)
        with self._autocast():
            logits, _ = self.model(ids.to(self.device), attention_mask=mask.to(self.device))
        return logits.float()

    def _classify_loss(self, rows: list[int], xs: list[list[int]], ys: list[int]) -> torch.Tensor:
        y = torch.tensor([ys[i] for i in rows], device=self.device)
        return F.cross_entropy(self._logits(rows, xs), y, weight=self.class_weights)

    def train_step(self, step: int) -> float:
        rows = self._batch_at(step)
        self.step_tokens = sum(len(self.train_x[i]) for i in rows)
        xs: Any = self.train_x
        if self.cfg.token_dropout:  # a fresh draw each step, from (seed, step): a resumed run draws the same
            rng = np.random.default_rng([self.cfg.seed, step, WORD_DROPOUT_STREAM])
            blank, keep = self._blank
            xs = {i: word_dropout(self.train_x[i], self.cfg.token_dropout, blank, keep, rng) for i in rows}
        return self._step_on(rows, lambda micro: self._classify_loss(micro, xs, self.train_y))

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> float | None:
        """The dev loss (unweighted) and accuracy over every dev text (each rank the same)."""
        if not self.val_x:
            return None
        self.model.eval()
        lens = [len(x) for x in self.val_x]
        batches = bucket_batches(lens, [1] * len(lens), batch_size=self.cfg.batch_size, seed=self.cfg.seed, epoch=0)
        total, correct = 0.0, 0
        for rows in batches:
            logits = self._logits(rows, self.val_x)
            y = torch.tensor([self.val_y[i] for i in rows], device=self.device)
            total += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(-1) == y).sum())
        self.model.train()
        self.dev_accuracy = correct / len(self.val_x)
        return total / len(self.val_x)

    def _evaluate_into(self, row: dict[str, Any], seen: _Progress) -> bool:
        """Dev loss and accuracy into the metrics row; True at a new best accuracy."""
        super()._evaluate_into(row, seen)
        return self._keep_best(row, "accuracy", getattr(self, "dev_accuracy", None), 4)


def word_dropout(ids: list[int], p: float, blank: int, keep: frozenset[int], rng: np.random.Generator) -> list[int]:
    """Word dropout (after Iyyer et al. 2015, who delete words; as Bowman et al. 2016, who
    replace them): each token becomes ``blank`` with probability p, so the classifier cannot
    lean on any single word or character and learns from every cue of a text; special tokens
    in ``keep`` stay. Training only: dev texts and predictions read every token."""
    a = np.asarray(ids, dtype=np.int64)
    a[(rng.random(a.size) < p) & ~np.isin(a, list(keep))] = blank
    return a.tolist()


def blank_token(tok: Tokenizer) -> tuple[int, frozenset[int]]:
    """What word dropout turns a token into — the tokenizer's unknown token; else its mask
    token (a body pretrained here as a masked LM reads it as "a token is hidden here"); else
    its end-of-text token (lmlab's and GPT-2's byte-level BPE have no unknown token) — and
    the special tokens ([CLS], [SEP], <s>) that are never dropped."""
    blank = unk_token_id(tok)
    for name in ("[MASK]", "<mask>"):
        blank = tok.token_to_id(name) if blank is None else blank
    blank = eos_token_id(tok) if blank is None else blank
    if blank is None:
        raise LmlabError("--token-dropout replaces tokens by the tokenizer's unknown token, and this tokenizer has "
                         "none (nor a mask or end-of-text token): drop --token-dropout")  # fmt: skip
    added = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    return blank, frozenset((added | template_token_ids(tok)) - {blank})


def load_forward_direction(body: torch.nn.Module, lm: dict[str, torch.Tensor]) -> None:
    """A bidirectional body from a one-way language model (ULMFiT's forward half): the
    embedding and every forward-direction weight are the LM's; the backward direction keeps
    its fresh init. Above the first layer a forward cell reads [h→; h←] where the LM's read
    h→ alone: its input weights are the LM's for h→ and zero for h←, so at the start the
    forward direction computes exactly what the language model did."""
    own = body.state_dict()
    with torch.no_grad():
        for name, t in lm.items():
            if name not in own:
                continue  # the LM's next-token head (and projection): a classifier has none
            dst = own[name]
            if dst.shape == t.shape:
                dst.copy_(t)
            else:  # weight_ih_l{k}, k ≥ 1: (gates·H, 2H) here, (gates·H, H) in the LM
                dst.zero_()
                dst[:, : t.shape[1]].copy_(t)


__all__ = ["ClassifyTrainer", "blank_token", "load_forward_direction", "word_dropout"]
