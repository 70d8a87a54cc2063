"""Looking inside a model: attention weights, cross-attention alignments, token log-probabilities
and hidden states of one text, as tensors (what ``lmlab viz`` draws; ``Model.attention`` etc.).

    attention      A = softmax(QKᵀ/√d + M)  of every layer and head     (layers, heads, T, T)
    cross          the decoder's attention over the source per target token  (layers, heads, T_tgt, S)
    logprobs       log p(x_t | x_<t) for t ≥ 1, and the k best alternatives
    hidden         a Transformer's residual stream after each block (layers + 1, T, C);
                   an RNN's h_t (and an LSTM's cell c_t) of each layer  (layers, T, H)

The weights are recorded by the attention modules themselves while the model runs its own
forward (``record``: the explicit softmax path, the same numbers as the fused kernel up to
rounding), so what is drawn is what the model computes — ``transformers``' ``output_attentions``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lmlab.errors import LmlabError
from lmlab.nn.alignment import Alignment
from lmlab.nn.attention import CausalSelfAttention, CrossAttention

if TYPE_CHECKING:
    from lmlab.api import Model


@contextmanager
def recording(modules: list[nn.Module]) -> Iterator[list[list[Tensor]]]:
    """While inside, each of ``modules`` appends the weights of each forward to its own list."""
    records: list[list[Tensor]] = [[] for _ in modules]
    for m, r in zip(modules, records):
        m.record = r
    try:
        yield records
    finally:
        for m in modules:
            m.record = None


def token_strings(model: Model, ids: list[int]) -> list[str]:
    """Each token's own text (special tokens shown), for labels."""
    return [model.tokenizer.decode([i], skip_special_tokens=False) for i in ids]


@dataclass
class Attention:
    """Attention weights of one text: ``weights`` (layers, heads, T_query, T_key) and the tokens."""

    weights: Tensor
    queries: list[str]
    keys: list[str]


def _ids(model: Model, text: str) -> list[int]:
    if not isinstance(text, str) or not text:
        raise LmlabError("give a non-empty text to look at")
    ids = model.encode(text)
    if not ids:
        raise LmlabError(f"the text {text[:40]!r} has no tokens for this tokenizer")
    limit = getattr(model.config, "max_source_len", None) or getattr(model.config, "max_seq_len", None)
    if model.module.bounded_context and limit and len(ids) > limit:
        raise LmlabError(f"the text has {len(ids)} tokens, more than the model's {limit}; give a shorter text")
    return ids


def _stack(records: list[list[Tensor]]) -> Tensor:
    """One (1, H, T, S) tensor per layer -> (layers, H, T, S)."""
    return torch.stack([r[-1][0] for r in records]).float()


@torch.no_grad()
def attention(model: Model, text: str) -> Attention:
    """Self-attention weights over ``text``: a decoder-only Transformer's (causal), an encoder's
    (a BERT-style model, or the encoder of an encoder-decoder reading ``text`` as its source)."""
    module = model.module
    if getattr(module.config, "model_type", "") == "rnn" or type(module).__name__.startswith("RNN"):
        raise LmlabError("a recurrent model has no attention: look at its hidden units instead "
                         "(lmlab viz neurons, model.hidden_states)")  # fmt: skip
    ids = _ids(model, text)
    x = torch.tensor([ids], device=module.device)
    if model.is_encoder_decoder:
        layers = [m for m in module.encoder.modules() if isinstance(m, CausalSelfAttention)]
        with recording(layers) as rec:
            module.encode(x)
    else:
        layers = [m for m in module.modules() if isinstance(m, CausalSelfAttention)]
        with recording(layers) as rec:
            if getattr(module, "task", None) is not None:  # a classifier or QA head over an encoder
                module(x, attention_mask=torch.ones_like(x))
            else:
                module(x)
    if not layers:  # a classifier or reader over a recurrent body
        raise LmlabError("this model has no self-attention (a recurrent body): look at its hidden units instead")
    toks = token_strings(model, ids)
    return Attention(_stack(rec), toks, toks)


@torch.no_grad()
def cross_attention(model: Model, source: str, target: str | None = None) -> Attention:
    """An encoder-decoder's attention from each target token over the source tokens. The target
    is ``target`` (teacher-forced) or, when None, the model's own greedy translation; row i is
    the attention of the step that produced target token i."""
    module = model.module
    if not model.is_encoder_decoder:
        raise LmlabError("cross-attention belongs to an encoder-decoder (a translator or summarizer); "
                         "this model has only self-attention (lmlab viz attention)")  # fmt: skip
    layers = [m for m in module.modules() if isinstance(m, CrossAttention)]
    recurrent = not layers  # the RNN with attention: one alignment α_i per decoding step
    if recurrent:
        layers = [m for m in module.modules() if isinstance(m, Alignment)]
    src = _ids(model, source)
    if target is None:
        out = model.translate(source, return_details=True, temperature=0, num_beams=1)
        tgt = list(out.token_ids)
    else:
        tgt = model.target_tokenizer.encode(target).ids
    start = model.generation_config.get("decoder_start_token_id")
    if start is None:
        raise LmlabError("the model's generation settings have no decoder_start_token_id")
    dec_in = [int(start), *tgt[:-1]] if tgt else [int(start)]
    with recording(layers) as rec:
        module(torch.tensor([dec_in], device=module.device), src=torch.tensor([src], device=module.device))
    produced = tgt if tgt else []
    labels = [model.target_tokenizer.decode([i], skip_special_tokens=False) for i in produced] or ["<start>"]
    if recurrent:  # T steps of (1, S) -> one layer, one head: (1, 1, T, S)
        weights = torch.stack([a[0] for a in rec[0]]).float()[None, None]
    else:
        weights = _stack(rec)
    return Attention(weights[:, :, : len(labels)], labels, token_strings(model, src))


@dataclass
class TokenScores:
    """Each token's log-probability given the ones before it (the first has none: ``nan``),
    and the k most likely tokens at its position: (text, log-probability) best first."""

    tokens: list[str]
    ids: list[int]
    logprobs: list[float]
    top: list[list[tuple[str, float]]]


@torch.no_grad()
def token_logprobs(model: Model, text: str, top_k: int = 5) -> TokenScores:
    """log p(x_t | x_<t) = log_softmax(z_{t-1})[x_t] for a decoder-only model over ``text``."""
    module = model.module
    if model.is_encoder_decoder or getattr(module, "task", None) is not None:
        raise LmlabError("token probabilities are a language model's: this model does not predict the next token")
    ids = _ids(model, text)
    logits, _ = module(torch.tensor([ids], device=module.device))
    lp = torch.log_softmax(logits[0].float(), dim=-1)  # (T, V): row t is the distribution of token t+1
    chosen = [float("nan")] + [float(lp[t - 1, ids[t]]) for t in range(1, len(ids))]
    vals, top = lp.topk(min(top_k, lp.shape[-1]), dim=-1)
    alts: list[list[tuple[str, float]]] = [[]]
    for t in range(1, len(ids)):
        alts.append([(model.tokenizer.decode([int(i)], skip_special_tokens=False), float(v))
                     for i, v in zip(top[t - 1], vals[t - 1])])  # fmt: skip
    return TokenScores(token_strings(model, ids), ids, chosen, alts)


@torch.no_grad()
def hidden_states(model: Model, text: str) -> dict[str, Any]:
    """``{"tokens", "hidden"}`` (+ ``"cell"`` for an LSTM): an RNN's h_t of each layer
    (layers, T, H); a Transformer's residual stream before the first block and after each
    (layers + 1, T, C)."""
    module = model.module
    ids = _ids(model, text)
    x = torch.tensor([ids], device=module.device)
    toks = token_strings(model, ids)
    if hasattr(module, "rnn") and not model.is_encoder_decoder:
        return {"tokens": toks, **_recurrent_states(module, x)}
    blocks = getattr(module, "blocks", None)
    if blocks is None:
        raise LmlabError("hidden states are shown for decoder-only Transformers and RNN/GRU/LSTM models")
    outs: list[Tensor] = []
    hooks = [blocks[0].register_forward_pre_hook(lambda m, a: outs.append(a[0][0].float()))]
    hooks += [b.register_forward_hook(lambda m, a, y: outs.append(y[0].float())) for b in blocks]
    try:
        module(x)
    finally:
        for h in hooks:
            h.remove()
    return {"tokens": toks, "hidden": torch.stack(outs)}


def _recurrent_states(module: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """Every layer's h_t (and c_t), one step at a time with PyTorch's cell kernels on the
    fused layer's own weights (the fused layer returns only the top layer's outputs)."""
    cell = module.config.cell
    step = {"lstm": torch.lstm_cell, "gru": torch.gru_cell, "rnn": torch.rnn_tanh_cell}[cell]
    inp = module.tok_emb(x)[0]  # (T, d)
    H = module.config.hidden_size
    hs, cs = [], []
    for w_ih, w_hh, b_ih, b_hh in module.rnn.all_weights[: module.config.n_layer]:
        h = inp.new_zeros(1, H)
        c = inp.new_zeros(1, H)
        out_h, out_c = [], []
        for t in range(inp.shape[0]):
            if cell == "lstm":
                h, c = step(inp[t : t + 1], (h, c), w_ih, w_hh, b_ih, b_hh)
                out_c.append(c[0])
            else:
                h = step(inp[t : t + 1], h, w_ih, w_hh, b_ih, b_hh)
            out_h.append(h[0])
        hs.append(torch.stack(out_h))
        cs.append(torch.stack(out_c) if out_c else None)
        inp = hs[-1]
    out = {"hidden": torch.stack(hs).float()}
    if cell == "lstm":
        out["cell"] = torch.stack(cs).float()
    return out


__all__ = ["Attention", "TokenScores", "attention", "cross_attention", "hidden_states", "recording", "token_logprobs"]
