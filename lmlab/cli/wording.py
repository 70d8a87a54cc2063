"""Sentences two commands print alike (``lmlab eval`` and the quick start): one wording,
kept here so that they cannot drift apart. No torch."""

from __future__ import annotations


def perplexity_sentence(ppl: float, unit: str, vocab: int) -> str:
    """What a perplexity means, in words: the number of equally likely choices the model
    is, on average, torn between for each next ``unit`` (character or token)."""
    return (
        f"perplexity {ppl:.1f}: on average, the model is as unsure of each next {unit} as if it "
        f"were choosing among {ppl:.1f} equally likely ones (1 would be certain; a blind guess "
        f"among all {vocab:,} {unit}s it knows would score {vocab:,}; lower is better)"
    )
