"""Training an encoder-decoder on parallel text (``lmlab train --task translate``).

The same Trainer as every model (schedule, ``--time``, bf16, resume, torchrun, metrics,
loss plot); what differs is here: the data are (source, target) pairs, a batch is a set
of pairs of similar length (``bucket_batches``: little padding), and the loss is the
label-smoothed cross-entropy of the target given the source, over real target tokens:

    L = −(1/N) Σ_{b,t: y_bt ≠ pad} [(1−ε) log p(y_bt | y_b,<t, x_b) + (ε/V) Σ_v log p(v | ...)]

(Szegedy et al. 2016; ε = 0.1 in Vaswani et al. 2017). Targets are read as
``[EOS] y₁ … y_n`` (decoder input, EOS doubling as the decoder start) → ``y₁ … y_n [EOS]``
(labels). Each evaluation reports the validation loss and the BLEU of greedy translations
of a fixed dev sample; ``DIR/best`` keeps the checkpoint with the best dev BLEU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, processors

from lmlab.checkpoint import unwrap
from lmlab.errors import LmlabError
from lmlab.messages import say, warn
from lmlab.models.loading import read_target_tokenizer
from lmlab.pairs import Pairs, bucket_batches, pad_batch, read_pairs
from lmlab.tokenizer import EOT, load_tokenizer, train_tokenizer
from lmlab.training.buckets import BucketPlan
from lmlab.training.trainer import Trainer, _Progress

#: the padding token added to a tokenizer trained for translation
PAD = "<pad>"
#: dev pairs held out when no --valid is given (at most)
MAX_VALID = 1000


#: what ends a sentence, in the order looked for: lmlab's own, then SentencePiece's (T5, Marian)
END_TOKENS = (EOT, "</s>")


def end_token_id(tok: Tokenizer) -> int | None:
    return next((i for i in (tok.token_to_id(t) for t in END_TOKENS) if i is not None), None)


def pairs_tokenizer(kind: str, pairs: Pairs | None, vocab_size: int, side: str = "both") -> Tokenizer:
    """One vocabulary over both sides (``char`` or byte-level ``bpe`` trained on ``pairs``;
    ``side`` "source" or "target": on that side only), with a padding token; or an existing
    tokenizer (``kind`` = a tokenizer.json or a folder holding one). Sources end with EOS (a
    post-processor adds it), as Marian's and T5's do: whoever encodes a source with it
    (lmlab translate, transformers' AutoTokenizer) gets it."""
    if kind in ("char", "bpe"):
        assert pairs is not None
        texts = {"source": pairs.sources, "target": pairs.targets}.get(side)
        chunks = texts if texts is not None else (t for pair in zip(pairs.sources, pairs.targets) for t in pair)
        tok = train_tokenizer(kind, chunks, vocab_size)
    elif Path(kind).is_dir() and not (Path(kind) / "tokenizer.json").is_file() and (Path(kind) / "spiece.model").is_file():
        from lmlab.spm import load_spm_tokenizer  # a T5-style SentencePiece folder

        tok = load_spm_tokenizer(kind)
    else:
        tok = load_tokenizer(kind)
    if tok.token_to_id(PAD) is None:
        tok.add_special_tokens([PAD])
    eos = end_token_id(tok)
    if tok.post_processor is None and eos is not None:
        end = tok.id_to_token(eos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A {end}", pair=f"$A {end} $B {end}", special_tokens=[(end, eos)]
        )
    return tok


class Seq2SeqTrainer(BucketPlan, Trainer):
    """A Trainer whose data are sentence pairs (see the module's docstring)."""

    # ------------------------------------------------------------------ data
    def _read(self) -> Pairs:
        cfg = self.cfg
        return read_pairs(cfg.data, cfg.target_data, cfg.source_field, cfg.target_field)

    def _new_tokenizer(self) -> Tokenizer:
        cfg = self.cfg
        if cfg.tokenizer in ("char", "bpe"):
            self._pairs = self._read()
        elif cfg.separate_vocab:
            raise LmlabError("--separate-vocab trains a tokenizer per side: give --tokenizer char or bpe")
        return pairs_tokenizer(cfg.tokenizer, getattr(self, "_pairs", None), cfg.vocab_size,
                               "source" if cfg.separate_vocab else "both")  # fmt: skip

    @property
    def target_tok(self) -> Tokenizer:
        """The decoder's tokenizer: the source's, or with --separate-vocab its own (trained on
        the targets; a resumed run reads its target_tokenizer.json)."""
        tok = getattr(self, "_target_tok", None)
        if tok is None:
            cfg = self.cfg
            shared = getattr(self, "shared", {}).get("target_tokenizer")
            if shared:  # a torchrun rank > 0: rank 0's, as for the source tokenizer
                tok = Tokenizer.from_str(shared)
            elif cfg.resume is not None:
                tok = read_target_tokenizer(cfg.resume)
            elif cfg.separate_vocab:
                pairs = getattr(self, "_pairs", None) or self._read()
                tok = pairs_tokenizer(cfg.tokenizer, pairs, cfg.vocab_size, "target")
            self._target_tok = tok = tok or self.tok
        return tok

    def _target_tokenizer_to_save(self) -> Tokenizer | None:
        return None if self.target_tok is self.tok else self.target_tok

    def _shared_extras(self) -> dict[str, str]:
        extra = self._target_tokenizer_to_save()
        return {"target_tokenizer": extra.to_str()} if extra is not None else {}

    def _new_model_config(self) -> Any:
        tv = None if self.target_tok is self.tok else self.target_tok.get_vocab_size()
        return self.cfg.model_config(self.tok.get_vocab_size(), target_vocab_size=tv)

    def _new_generation_config(self, mcfg: Any) -> dict[str, Any]:
        eos = end_token_id(self.target_tok)
        if eos is None or end_token_id(self.tok) is None:
            raise LmlabError(f"the tokenizer has no end-of-sentence token ({' or '.join(END_TOKENS)}); "
                             "use --tokenizer char or bpe")  # fmt: skip
        return {
            "eos_token_id": eos, "bos_token_id": eos, "decoder_start_token_id": eos,
            "pad_token_id": self.target_tok.token_to_id(PAD), "max_new_tokens": mcfg.max_target_len - 1,
        }  # fmt: skip

    @property
    def _source_pad(self) -> int:
        return self.tok.token_to_id(PAD) or 0

    def _load_data(self, resuming: bool) -> Any:
        cfg = self.cfg
        pairs = getattr(self, "_pairs", None) or self._read()
        if cfg.valid is not None:
            valid = read_pairs(cfg.valid, None, cfg.source_field, cfg.target_field, what="--valid")
            train = pairs
        else:
            train, valid = pairs.split(cfg.val_fraction or 0.05, seed=cfg.seed, max_valid=MAX_VALID)
        return train, valid

    def _encode(self, pairs: Pairs, what: str) -> tuple[list[list[int]], list[list[int]]]:
        """Token ids: sources end with EOS; targets are bare (EOS is added around them)."""
        m = unwrap(self.model).config
        src_eos = end_token_id(self.tok)
        src = [e.ids if e.ids[-1:] == [src_eos] else e.ids + [src_eos] for e in self.tok.encode_batch(pairs.sources)]
        tgt = [e.ids for e in self.target_tok.encode_batch(pairs.targets, add_special_tokens=False)]
        self._cut[0] += sum(len(s) > m.max_source_len for s in src)
        self._cut[1] += sum(len(t) + 1 > m.max_target_len for t in tgt)
        src = [s if len(s) <= m.max_source_len else s[: m.max_source_len - 1] + [src_eos] for s in src]
        tgt = [t[: m.max_target_len - 1] for t in tgt]
        return src, tgt

    def _split_data(self, mcfg: Any, corpus: Any) -> None:
        train, valid = corpus
        self.train_pairs, self.valid_pairs = train, valid
        self._cut = [0, 0]  # sources, targets longer than the model takes (one warning for both sets)
        self.train_src, self.train_tgt = self._encode(train, "training pairs")
        self.val_src, self.val_tgt = self._encode(valid, "dev pairs")
        if any(self._cut):
            warn(f"{self._cut[0]} sources and {self._cut[1]} targets (training and dev pairs) are longer than the "
                 f"model's {mcfg.max_source_len} tokens and were cut (raise --max-seq-len to keep them whole)")  # fmt: skip
        self.seq_len = mcfg.max_target_len
        self.val_starts = None
        say(f"lmlab: {len(train):,} training pairs, {len(valid):,} dev pairs"
            + (f" ({self.cfg.valid})" if self.cfg.valid else " (held out from --data)"))  # fmt: skip

    # ------------------------------------------------------------------ batches
    def _batches(self, epoch: int) -> list[list[int]]:
        cfg = self.cfg
        src_lens = [len(s) for s in self.train_src]
        tgt_lens = [len(t) + 1 for t in self.train_tgt]
        if cfg.batch_tokens:
            return bucket_batches(src_lens, tgt_lens, batch_tokens=cfg.batch_tokens, seed=cfg.seed, epoch=epoch)
        return bucket_batches(src_lens, tgt_lens, batch_size=cfg.batch_size, seed=cfg.seed, epoch=epoch)

    def _tensors(self, rows: list[int], src: list[list[int]], tgt: list[list[int]]) -> tuple[torch.Tensor, ...]:
        eos, pad = self.gen_cfg["eos_token_id"], self.gen_cfg["pad_token_id"]
        start = self.gen_cfg["decoder_start_token_id"]
        s, s_mask = pad_batch([src[i] for i in rows], self._source_pad)
        tin, _ = pad_batch([[start] + tgt[i] for i in rows], pad)
        lab, lab_mask = pad_batch([tgt[i] + [eos] for i in rows], pad)
        lab = lab.masked_fill(~lab_mask, -100)  # ignored by the loss
        return s.to(self.device), s_mask.to(self.device), tin.to(self.device), lab.to(self.device)

    def _seq2seq_loss(self, rows: list[int], src: list[list[int]], tgt: list[list[int]], smoothing: float) -> torch.Tensor:
        s, s_mask, tin, lab = self._tensors(rows, src, tgt)
        with self._autocast():
            logits, _ = self.model(tin, src=s, src_mask=s_mask)
        return F.cross_entropy(logits.float().flatten(0, 1), lab.flatten(), ignore_index=-100, label_smoothing=smoothing)

    def train_step(self, step: int) -> float:
        rows = self._batch_at(step)
        self.step_tokens = sum(len(self.train_src[i]) + len(self.train_tgt[i]) + 1 for i in rows)
        smoothing = self.cfg.label_smoothing
        return self._step_on(rows, lambda micro: self._seq2seq_loss(micro, self.train_src, self.train_tgt, smoothing))

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> float | None:
        """The validation loss (no label smoothing: the true cross-entropy), over at most
        ``--eval-batches`` batches of the dev pairs."""
        if not self.val_src:
            return None
        self.model.eval()
        cfg = self.cfg
        lens = ([len(s) for s in self.val_src], [len(t) + 1 for t in self.val_tgt])
        if cfg.batch_tokens:  # the training batches' size, so long dev pairs fit as training pairs do
            batches = bucket_batches(*lens, batch_tokens=cfg.batch_tokens, seed=cfg.seed, epoch=0)
        else:
            batches = bucket_batches(*lens, batch_size=cfg.batch_size, seed=cfg.seed, epoch=0)
        losses = [float(self._seq2seq_loss(b, self.val_src, self.val_tgt, 0.0)) for b in batches[: cfg.eval_batches]]
        self.model.train()
        return self.dist.mean(sum(losses) / len(losses))

    @property
    def dev_metric(self) -> str:
        """What picks DIR/best: BLEU for translation, ROUGE-L for summaries."""
        return "rougeL" if self.cfg.task == "summarize" else "bleu"

    def dev_bleu(self) -> float | None:
        """BLEU (sacreBLEU) — ROUGE-L for --task summarize — of greedy outputs for the first
        ``--bleu-samples`` dev pairs."""
        k = min(self.cfg.bleu_samples, len(self.valid_pairs))
        if k == 0 or not self.dist.is_main:
            return None
        from lmlab.generate.config import GenerationConfig
        from lmlab.generate.seq2seq import seq2seq_generate

        model = unwrap(self.model)
        model.eval()
        cfg = GenerationConfig.from_dict(self.gen_cfg, temperature=0.0)
        try:
            results = seq2seq_generate(model, self.target_tok, self.val_src[:k], cfg, self._source_pad, 32)
        finally:
            model.train()
        hyps = [r[0].text for r in results]
        refs = (self.valid_pairs.references or self.valid_pairs.targets)[:k]
        if self.dev_metric == "rougeL":
            from lmlab.eval.rouge import rouge_scores

            return rouge_scores(hyps, refs)["rougeL"]
        from lmlab.eval.bleu import translation_scores

        return translation_scores(hyps, refs)["bleu"]

    def _evaluate_into(self, row: dict[str, Any], seen: _Progress) -> bool:
        """Validation loss and dev BLEU (ROUGE-L) into the metrics row; True at a new best (or,
        with --bleu-samples 0, a new best validation loss)."""
        best_by_loss = super()._evaluate_into(row, seen)
        if self.cfg.bleu_samples == 0:
            return best_by_loss
        score = self.dev_bleu()  # rank 0 decodes; the others learn the verdict below
        is_best = self._keep_best(row, self.dev_metric, score, 2)
        if self.dist.active:  # every rank must agree to save (saving gathers from all ranks)
            is_best = bool(self.dist.all_reduce([float(is_best)], op="max")[0])
        return is_best


__all__ = ["PAD", "Seq2SeqTrainer", "pairs_tokenizer"]
