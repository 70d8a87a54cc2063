"""Hugging Face encoder-decoders as settings of lmlab's one :class:`Seq2SeqTransformer`.

    Marian (opus-mt)  post-norm, sinusoidal positions as [sin | cos] from 0, embeddings × √d,
                      SiLU, final_logits_bias, decoder start = pad
    BART / mBART      learned positions offset by 2, a LayerNorm after the embeddings, GELU,
                      final_logits_bias; mBART: pre-norm with a final norm per stack
    T5 / v1.1 / FLAN  RMSNorm, pre-norm, no 1/√d, bucketed relative position bias, ReLU or
                      gated GELU, untied output (v1.1) or tied with the d^-½ rescale

Each family maps its ``config.json`` to a :class:`Seq2SeqConfig` (refusing, by name, what
the model cannot compute) and lists where each lmlab tensor comes from (:class:`Rule`,
read by :func:`lmlab.hf.weights.fill_model` and :func:`~lmlab.hf.weights.export_tensors`).
"""

from __future__ import annotations

from typing import Any

import torch

from lmlab.errors import LmlabError
from lmlab.hf.base import ACT_OUT, Family, Rule, act_in, need
from lmlab.hf.weights import export_tensors
from lmlab.models.config import Seq2SeqConfig
from lmlab.nn.positional import sinusoidal_table

#: the generation settings an encoder-decoder's config.json may hold (older checkpoints keep
#: them there; generation_config.json, when present, wins)
GENERATION_KEYS = (
    "decoder_start_token_id", "forced_bos_token_id", "forced_eos_token_id", "bad_words_ids", "num_beams",
    "max_length", "min_length", "no_repeat_ngram_size", "length_penalty", "early_stopping", "max_new_tokens",
)  # fmt: skip


def linear_rules(lm: str, hf: str | tuple[str, ...], bias: bool, sizes: tuple[int, ...] = ()) -> list[Rule]:
    """lmlab Linear ``lm`` from the Hugging Face Linear(s) ``hf`` (several: fused along dim 0)."""
    parts = (hf,) if isinstance(hf, str) else hf
    op = "cat" if len(parts) > 1 else "copy"
    rules = [Rule(f"{lm}.weight", tuple(f"{h}.weight" for h in parts), op, sizes)]
    if bias:
        rules.append(Rule(f"{lm}.bias", tuple(f"{h}.bias" for h in parts), op, sizes))
    return rules


def norm_rules(lm: str, hf: str, bias: bool) -> list[Rule]:
    return [Rule(f"{lm}.weight", (f"{hf}.weight",))] + ([Rule(f"{lm}.bias", (f"{hf}.bias",))] if bias else [])


class Seq2SeqFamily(Family):
    """A Hugging Face encoder-decoder family (``rules`` read by ``fill_model``)."""

    head = "lm_head.weight"
    prefix = ""
    is_seq2seq = True

    def generation_defaults(self, d: dict[str, Any]) -> dict[str, Any]:
        """Generation settings from config.json (decoder start = pad when unset, as T5 and
        Marian use)."""
        out = {k: d[k] for k in GENERATION_KEYS if d.get(k) is not None}
        if out.get("decoder_start_token_id") is None and d.get("pad_token_id") is not None:
            out["decoder_start_token_id"] = d["pad_token_id"]
        return out

    def rules(self, cfg: Seq2SeqConfig) -> list[Rule]:  # pragma: no cover - abstract
        raise NotImplementedError

    #: the tensor an output layer tied to it equals
    embedding = "model.shared.weight"

    def untie_if_stored(self, cfg: Seq2SeqConfig, weights: Any) -> None:
        """A checkpoint that says "tied" but stores an output layer of its own, different from
        the embedding, is read untied (as transformers reads it: FLAN-T5 and T5 v1.1 saved by
        some tools)."""
        names = weights.names()
        if cfg.tie_embeddings and self.head in names and self.embedding in names:
            if not weights.get(self.head).equal(weights.get(self.embedding)):
                cfg.tie_embeddings = False


class Marian(Seq2SeqFamily):
    """Junczys-Dowmunt et al. 2018 (opus-mt): the paper's post-norm Transformer."""

    model_type = "marian"
    display = "Marian"
    architecture = "MarianMTModel"
    ignore = ("embed_positions.weight",)  # sinusoidal: computed, not learned

    def to_lmlab(self, d: dict[str, Any]) -> Seq2SeqConfig:
        mt = self.model_type
        for a, b in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")):
            need(d.get(a, 8) == d.get(b, 8), f"{mt} checkpoint has {a}={d.get(a)} but {b}={d.get(b)}; lmlab "
                 "uses one value for both stacks")
        need(not d.get("normalize_before", False), f"{mt} checkpoint sets normalize_before (pre-norm); not supported")
        shared = bool(d.get("share_encoder_decoder_embeddings", True))
        V = int(d["vocab_size"])
        tv = int(d.get("decoder_vocab_size") or V)
        n = int(d.get("max_position_embeddings", 512))
        return Seq2SeqConfig(
            vocab_size=V, target_vocab_size=None if shared else tv, share_embeddings=shared,
            n_layer=int(d.get("encoder_layers", 6)), n_decoder_layer=int(d.get("decoder_layers", 6)),
            n_head=int(d.get("encoder_attention_heads", 8)), d_model=int(d.get("d_model", 512)),
            d_ff=int(d.get("encoder_ffn_dim", 2048)), max_source_len=n, max_target_len=n,
            pos="sinusoidal", sinusoidal_layout="halves", norm="layernorm", norm_eps=1e-5, norm_bias=True,
            prenorm=False, final_norm=False, embed_norm=False, scale_embedding=bool(d.get("scale_embedding", False)),
            activation=act_in(mt, d.get("activation_function", "gelu")), gated_mlp=False, attn_bias=True,
            mlp_bias=True, attn_scale=True, tie_embeddings=bool(d.get("tie_word_embeddings", True)),
            logits_bias=True, dropout=0.0,
        )  # fmt: skip

    def _stack_rules(self, cfg: Seq2SeqConfig) -> list[Rule]:
        r: list[Rule] = []
        d = cfg.d_model
        qkv = (d, d, d)
        for i in range(cfg.n_layer):
            p, q = f"model.encoder.layers.{i}.", f"encoder.{i}."
            r += linear_rules(q + "attn.qkv", tuple(p + f"self_attn.{x}_proj" for x in "qkv"), True, qkv)
            r += linear_rules(q + "attn.proj", p + "self_attn.out_proj", True)
            r += norm_rules(q + "norm1", p + "self_attn_layer_norm", True)
            r += linear_rules(q + "mlp.up", p + "fc1", True) + linear_rules(q + "mlp.down", p + "fc2", True)
            r += norm_rules(q + "norm2", p + "final_layer_norm", True)
        for i in range(cfg.n_decoder_layer):
            p, q = f"model.decoder.layers.{i}.", f"decoder.{i}."
            r += linear_rules(q + "attn.qkv", tuple(p + f"self_attn.{x}_proj" for x in "qkv"), True, qkv)
            r += linear_rules(q + "attn.proj", p + "self_attn.out_proj", True)
            r += norm_rules(q + "norm1", p + "self_attn_layer_norm", True)
            r += linear_rules(q + "cross.q", p + "encoder_attn.q_proj", True)
            r += linear_rules(q + "cross.kv", (p + "encoder_attn.k_proj", p + "encoder_attn.v_proj"), True, (d, d))
            r += linear_rules(q + "cross.proj", p + "encoder_attn.out_proj", True)
            r += norm_rules(q + "norm2", p + "encoder_attn_layer_norm", True)
            r += linear_rules(q + "mlp.up", p + "fc1", True) + linear_rules(q + "mlp.down", p + "fc2", True)
            r += norm_rules(q + "norm3", p + "final_layer_norm", True)
        return r

    def rules(self, cfg: Seq2SeqConfig) -> list[Rule]:
        r = self._stack_rules(cfg)
        if cfg.share_embeddings:
            r.append(Rule("src_emb.weight", ("model.shared.weight",)))
        else:
            r += [Rule("src_emb.weight", ("model.encoder.embed_tokens.weight",)),
                  Rule("tgt_emb.weight", ("model.decoder.embed_tokens.weight",))]  # fmt: skip
        if not cfg.tie_embeddings:
            r.append(Rule("lm_head.weight", ("lm_head.weight",)))
        r.append(Rule("logits_bias", ("final_logits_bias",)))
        return r


    # ------------------------------------------------------------------ export
    def misfit(self, cfg: Seq2SeqConfig) -> str | None:
        """What ``cfg`` lacks to be this family exactly, in ``lmlab train`` flags; None if it fits."""
        need_ = self._needs(cfg)
        return f"{self.display} needs {', '.join(need_)}" if need_ else None

    def _needs(self, cfg: Seq2SeqConfig) -> list[str]:
        out = []
        if cfg.prenorm or cfg.final_norm:
            out.append("--post-norm")
        if cfg.pos != "sinusoidal" or cfg.sinusoidal_layout != "halves" or cfg.pos_offset or cfg.embed_norm:
            out.append("--pos sinusoidal (laid out as [sin | cos], no norm after the embeddings)")
        out += _common_needs(cfg)
        return out

    def to_hf(self, cfg: Seq2SeqConfig) -> dict[str, Any]:
        return {
            "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "encoder_layers": cfg.n_layer,
            "decoder_layers": cfg.n_decoder_layer, "encoder_attention_heads": cfg.n_head,
            "decoder_attention_heads": cfg.n_head, "encoder_ffn_dim": cfg.d_ff, "decoder_ffn_dim": cfg.d_ff,
            "max_position_embeddings": max(cfg.max_source_len, cfg.max_target_len),
            "activation_function": ACT_OUT[cfg.activation], "scale_embedding": cfg.scale_embedding,
            "share_encoder_decoder_embeddings": True, "tie_word_embeddings": True, "dropout": cfg.dropout,
            "attention_dropout": 0.0, "activation_dropout": 0.0, "is_encoder_decoder": True,
        }  # fmt: skip


def _common_needs(cfg: Seq2SeqConfig) -> list[str]:
    """What Marian, BART and mBART all need: LayerNorm and biases everywhere, a plain MLP, one
    vocabulary tied to the output layer."""
    out = []
    if cfg.norm != "layernorm":
        out.append("--norm layernorm")
    if not (cfg.norm_bias and cfg.attn_bias and cfg.mlp_bias):
        out.append("--bias")
    if cfg.gated_mlp:
        out.append("--mlp gelu")
    if not cfg.share_embeddings:
        out.append("one vocabulary for both sides (no --separate-vocab)")
    elif not cfg.tie_embeddings:
        out.append("--tie-embeddings")
    if not cfg.attn_scale or cfg.head_scale != 1.0 or cfg.pos == "relative":
        out.append("scaled attention without relative positions (a T5-style model exports as T5 only)")
    if cfg.n_head * cfg.head_dim != cfg.d_model:
        out.append(f"n_head × head_dim = d_model (has {cfg.n_head} × {cfg.head_dim} ≠ {cfg.d_model})")
    if not cfg.scale_embedding and cfg.pos == "sinusoidal":
        out.append("embeddings × √d (scale_embedding)")
    return out


def _learned_needs(cfg: Seq2SeqConfig) -> list[str]:
    """BART's positions: learned, two spare rows, a LayerNorm after the embeddings."""
    if cfg.pos != "learned" or cfg.pos_offset != 2 or not cfg.embed_norm:
        return ["--pos learned (BART's layout: offset 2, a norm after the embeddings)"]
    if cfg.max_source_len != cfg.max_target_len:
        return ["one position table for both sides (max_source_len = max_target_len)"]
    return []


class Bart(Marian):
    """Lewis et al. 2019: Marian's layout plus learned positions (offset 2) and a LayerNorm
    after the embeddings; mBART (Liu et al. 2020) adds pre-norm and a final norm per stack."""

    model_type = "bart"
    display = "BART"
    architecture = "BartForConditionalGeneration"
    ignore = ()

    def to_lmlab(self, d: dict[str, Any]) -> Seq2SeqConfig:
        d = {**d, "normalize_before": False}
        cfg = super().to_lmlab(d)
        cfg.pos, cfg.pos_offset, cfg.embed_norm = "learned", 2, True
        cfg.sinusoidal_layout = "interleaved"
        cfg.validate()
        return cfg

    def _needs(self, cfg: Seq2SeqConfig) -> list[str]:
        out = ["--post-norm"] if cfg.prenorm or cfg.final_norm else []
        return out + _learned_needs(cfg) + _common_needs(cfg)

    def to_hf(self, cfg: Seq2SeqConfig) -> dict[str, Any]:
        out = super().to_hf(cfg)
        del out["share_encoder_decoder_embeddings"]
        return out

    def rules(self, cfg: Seq2SeqConfig) -> list[Rule]:
        r = super().rules(cfg)
        for side, lm in (("encoder", "enc"), ("decoder", "dec")):
            r.append(Rule(f"{lm}_pos.weight", (f"model.{side}.embed_positions.weight",)))
            r += norm_rules(f"{lm}_emb_norm", f"model.{side}.layernorm_embedding", True)
            if cfg.final_norm:
                r += norm_rules(f"{lm}_norm", f"model.{side}.layer_norm", True)
        return r


class MBart(Bart):
    model_type = "mbart"
    display = "mBART"
    architecture = "MBartForConditionalGeneration"

    def to_lmlab(self, d: dict[str, Any]) -> Seq2SeqConfig:
        cfg = super().to_lmlab(d)
        cfg.prenorm, cfg.final_norm = True, True
        return cfg

    def _needs(self, cfg: Seq2SeqConfig) -> list[str]:
        out = [] if cfg.prenorm and cfg.final_norm else ["pre-norm with a final norm (the default, no --post-norm)"]
        return out + _learned_needs(cfg) + _common_needs(cfg)


class T5(Seq2SeqFamily):
    """Raffel et al. 2020: pre-norm RMSNorm, relative position buckets, no attention scaling."""

    model_type = "t5"
    display = "T5"
    architecture = "T5ForConditionalGeneration"
    ignore = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
    embedding = "shared.weight"

    def to_lmlab(self, d: dict[str, Any]) -> Seq2SeqConfig:
        mt = self.model_type
        proj = str(d.get("feed_forward_proj", "relu"))
        gated = proj.startswith("gated-")
        act = proj.removeprefix("gated-")
        act = {"gelu": "gelu_new"}.get(act, act) if gated else act  # T5 v1.1's "gated-gelu" is gelu_new
        act = act_in(mt, d.get("dense_act_fn") or act)
        tied = bool(d.get("tie_word_embeddings", True))
        # transformers 5 keeps the d^-½ rescale as its own key (4.x: whenever tied)
        rescale = bool(d.get("scale_decoder_outputs", tied))
        dm = int(d.get("d_model", 512))
        n = int(d.get("n_positions", 512) or 512)
        return Seq2SeqConfig(
            vocab_size=int(d["vocab_size"]), n_layer=int(d.get("num_layers", 6)),
            n_decoder_layer=int(d.get("num_decoder_layers") or d.get("num_layers", 6)),
            n_head=int(d.get("num_heads", 8)), d_model=dm, head_dim=int(d.get("d_kv", 64)),
            d_ff=int(d.get("d_ff", 2048)), max_source_len=n, max_target_len=n, pos="relative",
            relative_buckets=int(d.get("relative_attention_num_buckets", 32)),
            relative_max_distance=int(d.get("relative_attention_max_distance", 128)),
            norm="rmsnorm", norm_eps=float(d.get("layer_norm_epsilon", 1e-6)), norm_bias=False, prenorm=True,
            final_norm=True, embed_norm=False, scale_embedding=False, activation=act, gated_mlp=gated,
            attn_bias=False, mlp_bias=False, attn_scale=False, share_embeddings=True, tie_embeddings=tied,
            logits_bias=False, head_scale=dm**-0.5 if rescale else 1.0, dropout=0.0,
        )  # fmt: skip

    def rules(self, cfg: Seq2SeqConfig) -> list[Rule]:
        inner = cfg.n_head * cfg.head_dim
        qkv = (inner, inner, inner)

        def mlp(q: str, p: str) -> list[Rule]:
            up = (p + "wi_0", p + "wi_1") if cfg.gated_mlp else p + "wi"
            return linear_rules(q + "mlp.up", up, False, (cfg.d_ff, cfg.d_ff)) + linear_rules(q + "mlp.down", p + "wo", False)

        r = [Rule("src_emb.weight", ("shared.weight",))]
        for i in range(cfg.n_layer):
            p, q = f"encoder.block.{i}.layer.", f"encoder.{i}."
            r += linear_rules(q + "attn.qkv", tuple(p + f"0.SelfAttention.{x}" for x in "qkv"), False, qkv)
            r += linear_rules(q + "attn.proj", p + "0.SelfAttention.o", False)
            r += norm_rules(q + "norm1", p + "0.layer_norm", False) + mlp(q, p + "1.DenseReluDense.")
            r += norm_rules(q + "norm2", p + "1.layer_norm", False)
        for i in range(cfg.n_decoder_layer):
            p, q = f"decoder.block.{i}.layer.", f"decoder.{i}."
            r += linear_rules(q + "attn.qkv", tuple(p + f"0.SelfAttention.{x}" for x in "qkv"), False, qkv)
            r += linear_rules(q + "attn.proj", p + "0.SelfAttention.o", False)
            r += norm_rules(q + "norm1", p + "0.layer_norm", False)
            r += linear_rules(q + "cross.q", p + "1.EncDecAttention.q", False)
            r += linear_rules(q + "cross.kv", (p + "1.EncDecAttention.k", p + "1.EncDecAttention.v"), False, (inner, inner))
            r += linear_rules(q + "cross.proj", p + "1.EncDecAttention.o", False)
            r += norm_rules(q + "norm2", p + "1.layer_norm", False) + mlp(q, p + "2.DenseReluDense.")
            r += norm_rules(q + "norm3", p + "2.layer_norm", False)
        for side, lm in (("encoder", "enc"), ("decoder", "dec")):
            r.append(Rule(f"{lm}_pos.weight", (f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",)))
            r += norm_rules(f"{lm}_norm", f"{side}.final_layer_norm", False)
        if not cfg.tie_embeddings:
            r.append(Rule("lm_head.weight", ("lm_head.weight",)))
        return r


SEQ2SEQ_FAMILIES: dict[str, Seq2SeqFamily] = {f.model_type: f for f in (Marian(), Bart(), MBart(), T5())}
#: the families a seq2seq model trained here may export to, in order of preference
SEQ2SEQ_EXPORT = ("marian", "bart", "mbart")


def choose_seq2seq_family(cfg: Seq2SeqConfig, origin: str | None) -> Seq2SeqFamily:
    """An imported model's own family; else the first of Marian, BART, mBART that computes
    exactly what ``cfg`` does, or an LmlabError saying what each would need."""
    if origin in SEQ2SEQ_FAMILIES:
        return SEQ2SEQ_FAMILIES[origin]
    for name in SEQ2SEQ_EXPORT:
        if SEQ2SEQ_FAMILIES[name].misfit(cfg) is None:
            return SEQ2SEQ_FAMILIES[name]
    why = "; ".join(SEQ2SEQ_FAMILIES[n].misfit(cfg) or "" for n in SEQ2SEQ_EXPORT)
    raise LmlabError(f"this encoder-decoder has no exact Hugging Face equivalent: {why}")

def seq2seq_export(
    module: Any, cfg: Seq2SeqConfig, origin: dict[str, Any] | None, dtype: torch.dtype
) -> tuple[Any, dict[str, Any], dict[str, torch.Tensor]]:
    """An encoder-decoder as Marian, BART or mBART (an imported one: its own family): the
    family, its config.json and its tensors. Marian's sinusoidal tables are written out
    (transformers keeps them as weights); a model without a logits bias gets zeros."""
    family = choose_seq2seq_family(cfg, origin["model_type"] if origin else None)
    if origin and origin["model_type"] == family.model_type:
        hf_cfg = dict(origin["config"])
    else:
        hf_cfg = family.to_hf(cfg)
    rules = family.rules(cfg)
    if not cfg.logits_bias:
        family = _WithoutRule(family, "logits_bias")
    tensors = export_tensors(module, family, cfg, dtype)
    if "final_logits_bias" in {h for r in rules for h in r.hf} and "final_logits_bias" not in tensors:
        tensors["final_logits_bias"] = torch.zeros(1, cfg.tgt_vocab_size, dtype=dtype)
    if family.model_type == "marian":
        n = int(hf_cfg.get("max_position_embeddings", cfg.max_target_len))
        table = sinusoidal_table(n, cfg.d_model, "halves").to(dtype)
        for side in ("encoder", "decoder"):
            tensors[f"model.{side}.embed_positions.weight"] = table.clone()
    return family, hf_cfg, tensors


class _WithoutRule:
    """A family whose ``rules`` leave out one lmlab tensor (one the model does not have)."""

    def __init__(self, family: Any, lm: str) -> None:
        self._family, self._lm = family, lm

    def __getattr__(self, name: str) -> Any:
        return getattr(self._family, name)

    def rules(self, cfg: Any) -> list[Any]:
        return [r for r in self._family.rules(cfg) if r.lm != self._lm]


__all__ = ["GENERATION_KEYS", "SEQ2SEQ_FAMILIES", "Seq2SeqFamily", "choose_seq2seq_family", "seq2seq_export"]
