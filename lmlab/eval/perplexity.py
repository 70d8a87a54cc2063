"""Loss and perplexity of a model over a whole corpus.

perplexity = exp(mean cross-entropy) — the effective number of equally likely
choices the model hesitates between at each token.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from lmlab.data import load_corpus
from lmlab.errors import LmlabError
from lmlab.messages import warn
from lmlab.tokenizer import UNK, tokenizer_kind

if TYPE_CHECKING:  # only for the annotation: eval sits below the public API
    from lmlab.api import Model


@torch.inference_mode()
def evaluate_corpus(
    model: Model, data: str | os.PathLike, batch_size: int = 8, encoding_errors: str = "strict"
) -> dict[str, float]:
    """Every token of ``data`` after the first is predicted once, in consecutive
    windows of the model's context (the first token of each window from a fresh
    context, as is usual for fixed-context models)."""
    if batch_size <= 0:
        raise LmlabError(f"--batch-size must be positive (got {batch_size})")
    corpus = load_corpus(data, model.tokenizer, encoding_errors)
    ids = np.asarray(corpus.ids, dtype=np.int64)
    unk = model.tokenizer.token_to_id(UNK) if tokenizer_kind(model.tokenizer) == "char" else None
    n_unk = 0 if unk is None else int((ids == unk).sum())
    if n_unk:
        warn(
            f"{n_unk:,} characters of {data} are not in the model's vocabulary and count as {UNK}; "
            "the loss on them says little"
        )
    if len(ids) < 2:
        raise LmlabError(f"{data} has {len(ids)} token(s); evaluation needs at least 2")
    T = getattr(model.config, "max_seq_len", 256)
    module = model.module
    total, count = 0.0, 0
    starts = list(range(0, len(ids) - 1, T))
    for i in range(0, len(starts), batch_size):
        chunk = starts[i : i + batch_size]
        n = [min(T, len(ids) - 1 - s) for s in chunk]
        L = max(n)
        x = torch.zeros(len(chunk), L, dtype=torch.long)
        y = torch.full((len(chunk), L), -100, dtype=torch.long)
        for r, (s, k) in enumerate(zip(chunk, n)):
            x[r, :k] = torch.from_numpy(ids[s : s + k])
            y[r, :k] = torch.from_numpy(ids[s + 1 : s + 1 + k])
        logits, _ = module(x.to(module.device))
        loss = F.cross_entropy(
            logits.float().view(-1, logits.shape[-1]),
            y.to(module.device).view(-1),
            ignore_index=-100,
            reduction="sum",
        )
        total += float(loss)
        count += int((y != -100).sum())
    mean = total / count
    return {"loss": mean, "perplexity": math.exp(mean), "tokens": count}
