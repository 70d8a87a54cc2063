"""Decoding an encoder-decoder: sources in, target texts out, through the one decoding loop.

    sources ──pad + mask──▶ model.bind(src, mask) ──▶ a language model of the target
    prompts = [[decoder_start]] · n  ──generate_stream──▶ results

The decoder's prompt is the decoder start token alone, so ``max_new_tokens`` counts what
``transformers`` counts (the start token excluded, a forced BOS included). Sources are
decoded a batch at a time, longest first, so that a batch holds sources of similar length
(little padding); results come back in the caller's order. Each batch gives, row by row,
what each source gives alone: padding is masked out of every attention over the source.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from lmlab.errors import LmlabError
from lmlab.generate.config import GenerationConfig
from lmlab.generate.text import GenerationResult, generate_stream
from lmlab.messages import warn
from lmlab.models.encdec import EncoderDecoderModel

#: sources decoded together (each times num_beams or num_return_sequences rows)
DEFAULT_BATCH = 16


def pad_sources(sources: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, S) and mask (B, S), 1 = real token."""
    S = max(len(s) for s in sources)
    ids = torch.full((len(sources), S), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sources), S, dtype=torch.long)
    for b, s in enumerate(sources):
        ids[b, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[b, : len(s)] = 1
    return ids.to(device), mask.to(device)


def seq2seq_generate(
    model: EncoderDecoderModel,
    tokenizer: Any,
    sources: Sequence[Sequence[int]],
    cfg: GenerationConfig,
    pad_id: int,
    batch_size: int = DEFAULT_BATCH,
    on_batch: Callable[[int], None] | None = None,
) -> list[list[GenerationResult]]:
    """For each source, its ``num_return_sequences`` results (``tokenizer`` decodes targets).

    ``on_batch(n)`` is called after each batch with the number of sources it held (progress).
    """
    start = cfg.decoder_start_token_id
    if start is None:
        raise LmlabError(
            "the model has no decoder_start_token_id (the token its decoder starts from); "
            "set it in generation_config.json or pass decoder_start_token_id=..."
        )
    if any(len(s) == 0 for s in sources):
        raise LmlabError("a source is empty; give a non-empty text to each input")
    if batch_size < 1:
        raise LmlabError(f"batch_size must be >= 1 (got {batch_size})")
    n = cfg.num_return_sequences
    out: list[list[GenerationResult]] = [[] for _ in sources]
    order = sorted(range(len(sources)), key=lambda i: -len(sources[i]))
    with torch.inference_mode():
        for lo in range(0, len(order), batch_size):
            rows = order[lo : lo + batch_size]
            src, mask = pad_sources([sources[i] for i in rows], pad_id, model.device)
            bound = model.bind(src, mask)
            found: list[GenerationResult | None] = [None] * (len(rows) * n)
            for k, _, res in generate_stream(bound, tokenizer, [[start] for _ in rows], cfg):
                if res is not None:
                    found[k] = res
            for j, i in enumerate(rows):
                out[i] = [r for r in found[j * n : (j + 1) * n] if r is not None]
            if on_batch is not None:
                on_batch(len(rows))
    return out




class Seq2SeqRequest:
    """Texts to target texts with a model's own settings, as ``transformers`` applies them.

    - decoding is deterministic unless sampling is asked for (``do_sample=True``, stored or
      given, or a temperature > 0): greedy, or beam search when ``num_beams`` > 1;
    - ``max_length``/``min_length`` count the decoder start token, so they become
      ``max_new_tokens = max_length − 1`` and ``min_new_tokens = min_length − 1``;
    - T5's ``task_specific_params`` give the task's prefix ("translate English to German: ")
      and settings, as the v4 pipelines applied them;
    - a source longer than the model's source length keeps its first tokens (and its final
      EOS), with one warning counting them.
    """

    def __init__(
        self, model: EncoderDecoderModel, tokenizer: Any, target_tokenizer: Any,
        generation_config: dict[str, Any], task: str = "translation", prefix: str | None = None,
    ) -> None:  # fmt: skip
        self.model, self.tokenizer, self.target_tokenizer = model, tokenizer, target_tokenizer
        params = _task_params((model.hf_origin or {}).get("config") or {}, task)
        self.prefix = params.pop("prefix", "") if prefix is None else prefix
        params.pop("prefix", None)
        self.stored = {**generation_config, **params}

    def config(self, **options: Any) -> GenerationConfig:
        opts = {k: v for k, v in options.items() if v is not None}
        stored = self.stored
        sampling = opts.get("do_sample")
        if sampling is None:
            t = opts.get("temperature")
            sampling = (t is not None and t > 0) or stored.get("do_sample") is True
        if not sampling:
            opts["do_sample"] = False
            opts.pop("temperature", None)
        elif "temperature" not in opts:
            opts["temperature"] = stored.get("temperature") or 1.0  # transformers' default
        ctx = self.model.config.max_target_len
        if "max_new_tokens" not in opts:
            if stored.get("max_new_tokens") is not None:
                m = stored["max_new_tokens"]
            elif isinstance(stored.get("max_length"), int):
                m = stored["max_length"] - 1
            else:
                m = DEFAULT_MAX_NEW
            opts["max_new_tokens"] = max(0, min(m, ctx - 1))
        elif isinstance(opts["max_new_tokens"], int) and opts["max_new_tokens"] > ctx - 1:
            warn(f"max_new_tokens={opts['max_new_tokens']} is more than this model's target length allows; "
                 f"using {ctx - 1}")  # fmt: skip
            opts["max_new_tokens"] = ctx - 1
        if "min_new_tokens" not in opts and isinstance(stored.get("min_length"), int):
            opts["min_new_tokens"] = min(max(0, stored["min_length"] - 1), opts["max_new_tokens"])
        return GenerationConfig.from_dict(stored, where="the model's generation settings", **opts)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        limit = self.model.config.max_source_len
        out, cut = [], 0
        for t in texts:
            ids = list(self.tokenizer.encode(self.prefix + t).ids)
            if len(ids) > limit:
                cut += 1
                eos = self.stored.get("eos_token_id")
                eos = eos[0] if isinstance(eos, list) and eos else eos
                ids = ids[: limit - 1] + [ids[-1]] if ids[-1] == eos else ids[:limit]
            out.append(ids)
        if cut:
            warn(f"{cut} of {len(texts)} inputs were longer than the model's {limit} source tokens; "
                 f"each was cut to its first {limit}")  # fmt: skip
        return out

    def run(self, texts: Sequence[str], batch_size: int = DEFAULT_BATCH, on_batch: Any = None,
            **options: Any) -> list[list[GenerationResult]]:  # fmt: skip
        cfg = self.config(**options)
        if not texts:
            return []
        if any(not t.strip() for t in texts):
            i = next(i for i, t in enumerate(texts) if not t.strip())
            raise LmlabError(f"input {i + 1} is empty; give a non-empty text to each input")
        pad = self.stored.get("pad_token_id")  # any id the encoder can embed: padding is masked out
        pad = pad if isinstance(pad, int) and 0 <= pad < self.model.config.vocab_size else 0
        return seq2seq_generate(self.model, self.target_tokenizer, self.encode(texts), cfg, pad, batch_size, on_batch)


#: new tokens when neither the call nor the model's settings say (transformers' 20 is too short
#: for a sentence of prose)
DEFAULT_MAX_NEW = 256


def _task_params(config: dict[str, Any], task: str) -> dict[str, Any]:
    """The settings ``task_specific_params`` holds for ``task`` (T5: "translation" picks
    English to German, the first listed, unless a key like "translation_en_to_fr" is given)."""
    tsp = config.get("task_specific_params")
    if not isinstance(tsp, dict):
        return {}
    if task in tsp and isinstance(tsp[task], dict):
        return dict(tsp[task])
    keys = [k for k in tsp if k.startswith(task)]
    key = "translation_en_to_de" if task == "translation" and "translation_en_to_de" in tsp else (keys or [None])[0]
    return dict(tsp[key]) if key and isinstance(tsp[key], dict) else {}


__all__ = ["DEFAULT_BATCH", "Seq2SeqRequest", "pad_sources", "seq2seq_generate"]
