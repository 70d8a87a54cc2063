"""Llama and its kin (Mistral, Qwen2, Gemma): RoPE, RMSNorm, SwiGLU, separate q/k/v."""

from __future__ import annotations

import dataclasses
from typing import Any

from lmlab.hf.base import (
    ACT_OUT,
    Family,
    Fit,
    Rule,
    act_in,
    bias_flag,
    fit_activation,
    fit_embed_scale,
    fit_mlp,
    fit_norm,
    fit_pos,
    fit_sequential,
    layer_tensors,
    need,
    rope_from,
    rope_keys,
)
from lmlab.models.config import TransformerConfig


# --------------------------------------------------------------------------- Llama and kin
class Llama(Family):
    """Touvron et al. 2023: RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases.

    Mistral, Qwen2 and Gemma share its tensor names; they differ in biases, in sliding
    windows, and (Gemma) in the embedding scale and the RMSNorm weight offset.
    """

    model_type = "llama"
    display = "Llama"
    architecture = "LlamaForCausalLM"
    prefix = "model."
    ignore = ("rotary_emb.inv_freq",)
    tie_default = False

    def layer_prefix(self, i: int) -> str:
        return f"{self.prefix}layers.{i}."

    def biases(self, d: dict[str, Any]) -> tuple[bool, bool, bool]:
        """(qkv_bias, proj_bias, mlp_bias) as this family's config says."""
        attn = bool(d.get("attention_bias", False))
        return attn, attn, bool(d.get("mlp_bias", False))

    def check(self, d: dict[str, Any]) -> None:
        """Refuse settings of this family that lmlab's Transformer does not compute."""

    def embed_scale(self, d_model: int) -> float:
        return 1.0

    def to_lmlab(self, d: dict[str, Any]) -> TransformerConfig:
        mt = self.model_type
        self.check(d)
        theta, _ = rope_from(mt, d)
        n_head = d["num_attention_heads"]
        hidden = d["hidden_size"]
        qkv_bias, proj_bias, mlp_bias = self.biases(d)
        act = d.get("hidden_activation") or d.get("hidden_act", "silu")
        return TransformerConfig(
            vocab_size=d["vocab_size"],
            n_layer=d["num_hidden_layers"],
            n_head=n_head,
            n_kv_head=d.get("num_key_value_heads") or n_head,
            d_model=hidden,
            head_dim=d.get("head_dim") or hidden // n_head,
            d_ff=d["intermediate_size"],
            max_seq_len=d.get("max_position_embeddings", 2048),
            pos="rope",
            rope_theta=theta,
            norm="rmsnorm",
            norm_eps=d.get("rms_norm_eps", 1e-6),
            activation=act_in(mt, self.legacy_act(act)),
            gated_mlp=True,
            qkv_bias=qkv_bias,
            proj_bias=proj_bias,
            mlp_bias=mlp_bias,
            embed_scale=self.embed_scale(hidden),
            tie_embeddings=d.get("tie_word_embeddings", self.tie_default),
        )

    def legacy_act(self, act: str) -> str:
        return act

    def to_hf(self, cfg: TransformerConfig) -> dict[str, Any]:
        return {
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model,
            "intermediate_size": cfg.d_ff,
            "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.n_kv_head,
            "head_dim": cfg.head_dim,
            "hidden_act": ACT_OUT[cfg.activation],
            "max_position_embeddings": cfg.max_seq_len,
            "rms_norm_eps": cfg.norm_eps,
            "attention_dropout": cfg.dropout,
            "tie_word_embeddings": cfg.tie_embeddings,
            **rope_keys(cfg),
            **self.bias_keys(cfg),
        }

    def bias_keys(self, cfg: TransformerConfig) -> dict[str, Any]:
        return {"attention_bias": cfg.qkv_bias or cfg.proj_bias, "mlp_bias": cfg.mlp_bias}

    def fits(self, cfg: TransformerConfig) -> list[Fit]:
        # full RoPE, RMSNorm, a gated MLP (SwiGLU), sequential residuals; grouped-query is fine
        return [
            fit_pos(cfg, ("rope",)),
            fit_norm(cfg, "rmsnorm"),
            fit_mlp(cfg, gated=True),
            Fit(
                cfg.rotary_dim == cfg.head_dim,
                f"rotary_dim={cfg.head_dim} (= head_dim)",
                f"rotary_dim={cfg.rotary_dim}",
            ),
            fit_sequential(cfg),
            fit_embed_scale(cfg, self.embed_scale(cfg.d_model)),
            *self.bias_fits(cfg),
            fit_activation(cfg),
        ]

    def bias_fits(self, cfg: TransformerConfig) -> list[Fit]:
        """Llama has attention_bias and mlp_bias switches: any biases fit."""
        return []

    def export_config(self, cfg: TransformerConfig) -> TransformerConfig:
        attn = cfg.qkv_bias or cfg.proj_bias
        return dataclasses.replace(cfg, qkv_bias=attn, proj_bias=attn)

    def norm_op(self) -> str:
        return "copy"

    def body_rules(self, cfg: TransformerConfig) -> list[Rule]:
        q, kv, ff = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.d_ff
        n = self.norm_op()
        # separate q, k, v (and gate, up) layers -> lmlab's fused qkv (and up): "cat" along dim 0
        qkv = tuple(f"self_attn.{x}_proj" for x in "qkv")
        names = [
            *layer_tensors("norm1", "input_layernorm", n),
            *layer_tensors("attn.qkv", qkv, "cat", (q, kv, kv), bias=cfg.qkv_bias),
            *layer_tensors("attn.proj", "self_attn.o_proj", bias=cfg.proj_bias),
            *layer_tensors("norm2", "post_attention_layernorm", n),
            *layer_tensors("mlp.up", ("mlp.gate_proj", "mlp.up_proj"), "cat", (ff, ff), bias=cfg.mlp_bias),
            *layer_tensors("mlp.down", "mlp.down_proj", bias=cfg.mlp_bias),
        ]
        return [
            Rule("tok_emb.weight", (self.prefix + "embed_tokens.weight",)),
            *self._layer_rules(cfg, names),
            Rule("norm_f.weight", (self.prefix + "norm.weight",), n),
        ]


def _refuse_window(mt: str, window: Any, ctx: int) -> None:
    need(
        window is None or int(window) >= ctx,
        f"{mt} checkpoint uses sliding-window attention (sliding_window={window}) shorter than its "
        f"context (max_position_embeddings={ctx}); lmlab's attention has no sliding window, so "
        "long inputs would give different logits — this checkpoint is not supported",
    )


class Mistral(Llama):
    """Jiang et al. 2023: Llama's layout; a sliding window (refused when shorter than the context)."""

    model_type = "mistral"
    display = "Mistral"
    architecture = "MistralForCausalLM"

    def check(self, d: dict[str, Any]) -> None:
        _refuse_window("mistral", d.get("sliding_window"), d.get("max_position_embeddings", 4096 * 32))

    def biases(self, d: dict[str, Any]) -> tuple[bool, bool, bool]:
        return False, False, False

    def bias_keys(self, cfg: TransformerConfig) -> dict[str, Any]:
        return {"sliding_window": None}

    def bias_fits(self, cfg: TransformerConfig) -> list[Fit]:
        return [Fit(not (cfg.qkv_bias or cfg.proj_bias or cfg.mlp_bias), "--no-bias", bias_flag(cfg))]


class Qwen2(Llama):
    """Qwen2/2.5: Llama's layout with biases on q, k and v (not on o_proj or the MLP)."""

    model_type = "qwen2"
    display = "Qwen2"
    architecture = "Qwen2ForCausalLM"

    def check(self, d: dict[str, Any]) -> None:
        ctx = d.get("max_position_embeddings", 32768)
        sliding = [t for t in d.get("layer_types") or [] if t != "full_attention"]
        if d.get("use_sliding_window") or sliding:
            n = d.get("num_hidden_layers", 0)
            if sliding or d.get("max_window_layers", n) < n:
                _refuse_window("qwen2", d.get("sliding_window"), ctx)

    def biases(self, d: dict[str, Any]) -> tuple[bool, bool, bool]:
        return True, False, False

    def bias_keys(self, cfg: TransformerConfig) -> dict[str, Any]:
        return {"use_sliding_window": False, "sliding_window": None}

    def bias_fits(self, cfg: TransformerConfig) -> list[Fit]:
        # biases on q, k, v only
        return [
            Fit(not (cfg.proj_bias or cfg.mlp_bias), "proj_bias=False, mlp_bias=False", bias_flag(cfg))
        ]

    def export_config(self, cfg: TransformerConfig) -> TransformerConfig:
        return dataclasses.replace(cfg, qkv_bias=True)


class Gemma(Llama):
    """Gemma 1: Llama's layout, embeddings × √d_model, RMSNorm y = x̂·(1 + w), tanh-GELU."""

    model_type = "gemma"
    display = "Gemma"
    architecture = "GemmaForCausalLM"
    tie_default = True

    def check(self, d: dict[str, Any]) -> None:
        need(
            not d.get("use_bidirectional_attention"),
            "gemma checkpoint uses bidirectional attention (use_bidirectional_attention); "
            "lmlab's Transformer is causal",
        )

    def biases(self, d: dict[str, Any]) -> tuple[bool, bool, bool]:
        attn = bool(d.get("attention_bias", False))
        return attn, attn, False

    def bias_keys(self, cfg: TransformerConfig) -> dict[str, Any]:
        return {"attention_bias": cfg.qkv_bias or cfg.proj_bias}

    def bias_fits(self, cfg: TransformerConfig) -> list[Fit]:
        return [Fit(not cfg.mlp_bias, "mlp_bias=False", bias_flag(cfg))]

    def legacy_act(self, act: str) -> str:
        # transformers reads Gemma's legacy hidden_act="gelu" as the tanh approximation
        return "gelu_pytorch_tanh" if act == "gelu" else act

    def embed_scale(self, d_model: int) -> float:
        return d_model**0.5  # x₀ = E[ids]·√d_model

    def norm_op(self) -> str:
        return "plus1"
