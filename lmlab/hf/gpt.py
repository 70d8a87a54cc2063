"""GPT-2 and GPT-NeoX (Pythia): LayerNorm with bias, plain GELU MLP, fused q/k/v."""

from __future__ import annotations

import dataclasses
from typing import Any

from lmlab.hf.base import (
    ACT_OUT,
    Family,
    Fit,
    Rule,
    act_in,
    fit_activation,
    fit_embed_scale,
    fit_head_dim,
    fit_mlp,
    fit_no_gqa,
    fit_norm,
    fit_pos,
    fit_sequential,
    layer_tensors,
    need,
    rope_from,
    rope_keys,
)
from lmlab.models.config import TransformerConfig


# --------------------------------------------------------------------------- GPT-2
class GPT2(Family):
    """Radford et al. 2019: learned positions, LayerNorm, GELU MLP, biases everywhere."""

    model_type = "gpt2"
    display = "GPT-2"
    architecture = "GPT2LMHeadModel"
    prefix = "transformer."
    ignore = (".attn.bias", ".attn.masked_bias")

    def to_lmlab(self, d: dict[str, Any]) -> TransformerConfig:
        need(not d.get("add_cross_attention"), "gpt2 checkpoint has cross-attention (add_cross_attention)")
        need(
            not d.get("scale_attn_by_inverse_layer_idx"),
            "gpt2 checkpoint sets scale_attn_by_inverse_layer_idx, which lmlab does not implement",
        )
        need(
            d.get("scale_attn_weights", True),
            "gpt2 checkpoint sets scale_attn_weights=false (no 1/√d scaling), which lmlab does not implement",
        )
        c = d.get("n_embd", 768)
        return TransformerConfig(
            vocab_size=d["vocab_size"],
            n_layer=d.get("n_layer", 12),
            n_head=d.get("n_head", 12),
            d_model=c,
            d_ff=d.get("n_inner") or 4 * c,
            max_seq_len=d.get("n_positions") or d.get("n_ctx") or 1024,
            pos="learned",
            norm="layernorm",
            norm_eps=d.get("layer_norm_epsilon", 1e-5),
            norm_bias=True,
            activation=act_in("gpt2", d.get("activation_function", "gelu_new")),
            gated_mlp=False,
            qkv_bias=True,
            proj_bias=True,
            mlp_bias=True,
            tie_embeddings=d.get("tie_word_embeddings", True),
        )

    def to_hf(self, cfg: TransformerConfig) -> dict[str, Any]:
        return {
            "vocab_size": cfg.vocab_size,
            "n_positions": cfg.max_seq_len,
            "n_embd": cfg.d_model,
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "n_inner": cfg.d_ff,
            "activation_function": ACT_OUT[cfg.activation],
            "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout,
            "attn_pdrop": cfg.dropout,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "tie_word_embeddings": cfg.tie_embeddings,
        }

    def fits(self, cfg: TransformerConfig) -> list[Fit]:
        # learned absolute positions (a sinusoidal table is written as one), LayerNorm, a plain
        # GELU MLP, multi-head attention only, sequential residuals
        return [
            fit_pos(cfg, ("learned", "sinusoidal")),
            fit_norm(cfg, "layernorm"),
            fit_mlp(cfg, gated=False),
            fit_no_gqa(cfg),
            fit_head_dim(cfg),
            fit_sequential(cfg),
            fit_embed_scale(cfg, 1.0),
            fit_activation(cfg),
        ]

    def export_config(self, cfg: TransformerConfig) -> TransformerConfig:
        return dataclasses.replace(
            cfg, pos="learned", norm_bias=True, qkv_bias=True, proj_bias=True, mlp_bias=True
        )

    def layer_prefix(self, i: int) -> str:
        return f"{self.prefix}h.{i}."

    def body_rules(self, cfg: TransformerConfig) -> list[Rule]:
        p = self.prefix
        out = [Rule("tok_emb.weight", (p + "wte.weight",)), Rule("pos_emb.weight", (p + "wpe.weight",))]
        # q|k|v are already fused in c_attn; Conv1D weights are stored transposed ("t")
        out += self._layer_rules(
            cfg,
            [
                *layer_tensors("norm1", "ln_1", bias=True),
                *layer_tensors("attn.qkv", "attn.c_attn", "t", bias=True),
                *layer_tensors("attn.proj", "attn.c_proj", "t", bias=True),
                *layer_tensors("norm2", "ln_2", bias=True),
                *layer_tensors("mlp.up", "mlp.c_fc", "t", bias=True),
                *layer_tensors("mlp.down", "mlp.c_proj", "t", bias=True),
            ],
        )
        return out + [Rule("norm_f.weight", (p + "ln_f.weight",)), Rule("norm_f.bias", (p + "ln_f.bias",))]


# --------------------------------------------------------------------------- GPT-NeoX / Pythia
class GPTNeoX(Family):
    """Black et al. 2022 (Pythia): parallel residual, partial rotary, LayerNorm with bias,
    q/k/v fused per head."""

    model_type = "gpt_neox"
    display = "GPT-NeoX"
    architecture = "GPTNeoXForCausalLM"
    prefix = "gpt_neox."
    head = "embed_out.weight"
    ignore = ("attention.bias", "attention.masked_bias", "rotary_emb.inv_freq")

    def layer_prefix(self, i: int) -> str:
        return f"{self.prefix}layers.{i}."

    def to_lmlab(self, d: dict[str, Any]) -> TransformerConfig:
        theta, partial = rope_from("gpt_neox", d, default_partial=0.25)
        n_head, hidden = d["num_attention_heads"], d["hidden_size"]
        head_dim = hidden // n_head
        rotary = int(head_dim * partial)  # as transformers computes it
        need(
            rotary > 0 and rotary % 2 == 0,
            f"gpt_neox checkpoint rotates {rotary} of {head_dim} channels per head "
            "(partial_rotary_factor); lmlab needs an even, positive number",
        )
        attn_bias = bool(d.get("attention_bias", True))
        return TransformerConfig(
            vocab_size=d["vocab_size"],
            n_layer=d["num_hidden_layers"],
            n_head=n_head,
            d_model=hidden,
            d_ff=d["intermediate_size"],
            max_seq_len=d.get("max_position_embeddings", 2048),
            pos="rope",
            rope_theta=theta,
            rotary_dim=rotary,
            norm="layernorm",
            norm_eps=d.get("layer_norm_eps", 1e-5),
            norm_bias=True,
            activation=act_in("gpt_neox", d.get("hidden_act", "gelu")),
            gated_mlp=False,
            qkv_bias=attn_bias,
            proj_bias=attn_bias,
            mlp_bias=True,
            parallel_residual=d.get("use_parallel_residual", True),
            tie_embeddings=d.get("tie_word_embeddings", False),
        )

    def to_hf(self, cfg: TransformerConfig) -> dict[str, Any]:
        partial = cfg.rotary_dim / cfg.head_dim
        return {
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model,
            "intermediate_size": cfg.d_ff,
            "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head,
            "hidden_act": ACT_OUT[cfg.activation],
            "max_position_embeddings": cfg.max_seq_len,
            "layer_norm_eps": cfg.norm_eps,
            "use_parallel_residual": cfg.parallel_residual,
            "attention_bias": cfg.qkv_bias or cfg.proj_bias,
            "hidden_dropout": cfg.dropout,
            "attention_dropout": cfg.dropout,
            "tie_word_embeddings": cfg.tie_embeddings,
            "rotary_pct": partial,
            "rotary_emb_base": cfg.rope_theta,
            **rope_keys(cfg, partial_rotary_factor=partial),
        }

    def fits(self, cfg: TransformerConfig) -> list[Fit]:
        # RoPE (possibly partial: rotary_pct = rotary_dim / head_dim), LayerNorm, a plain GELU
        # MLP, multi-head attention only
        return [
            fit_pos(cfg, ("rope",)),
            fit_norm(cfg, "layernorm"),
            fit_mlp(cfg, gated=False),
            fit_no_gqa(cfg),
            fit_head_dim(cfg),
            fit_embed_scale(cfg, 1.0),
            Fit(
                int(cfg.head_dim * (cfg.rotary_dim / cfg.head_dim)) == cfg.rotary_dim,
                f"rotary_dim a fraction of head_dim={cfg.head_dim} that survives rounding",
                f"rotary_dim={cfg.rotary_dim}",
            ),
            fit_activation(cfg),
        ]

    def export_config(self, cfg: TransformerConfig) -> TransformerConfig:
        attn = cfg.qkv_bias or cfg.proj_bias
        return dataclasses.replace(cfg, qkv_bias=attn, proj_bias=attn, mlp_bias=True, norm_bias=True)

    def body_rules(self, cfg: TransformerConfig) -> list[Rule]:
        # q|k|v fused per head ("heads": [q_h k_h v_h] for each head h -> [Q | K | V])
        names = [
            *layer_tensors("norm1", "input_layernorm", bias=True),
            *layer_tensors("attn.qkv", "attention.query_key_value", "heads", bias=cfg.qkv_bias),
            *layer_tensors("attn.proj", "attention.dense", bias=cfg.proj_bias),
            *layer_tensors("norm2", "post_attention_layernorm", bias=True),
            *layer_tensors("mlp.up", "mlp.dense_h_to_4h", bias=True),
            *layer_tensors("mlp.down", "mlp.dense_4h_to_h", bias=True),
        ]
        p = self.prefix
        return [
            Rule("tok_emb.weight", (p + "embed_in.weight",)),
            *self._layer_rules(cfg, names),
            Rule("norm_f.weight", (p + "final_layer_norm.weight",)),
            Rule("norm_f.bias", (p + "final_layer_norm.bias",)),
        ]
