"""What a Hugging Face family is, for lmlab: a config mapping and a tensor layout.

A family says three things, nothing more:
  - how its ``config.json`` maps to a :class:`TransformerConfig` (``to_lmlab``) and back
    (``to_hf``), refusing anything the Transformer cannot compute with parity;
  - where each of its tensors goes in lmlab's state dict, and how it is laid out
    (``rules``: one :class:`Rule` per lmlab tensor, read in both directions);
  - whether an lmlab config has an exact equivalent in it (``fits`` / ``misfit``), for export,
    said in the ``lmlab train`` flags that set each setting (``--mlp gelu``, not ``gated_mlp``).
There is no model file per family: the differences are fields of the one config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmlab.errors import LmlabError
from lmlab.models.config import TransformerConfig

# Hugging Face ``hidden_act`` / ``activation_function`` -> lmlab activation, and back.
# gelu_new and gelu_pytorch_tanh are the same tanh approximation (Hendrycks & Gimpel 2016):
#   0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)));  "gelu" is the exact x·Φ(x). transformers
# computes gelu_new op by op and gelu_pytorch_tanh fused: in bf16 they round differently, so
# each keeps its own lmlab name (bf16 greedy tokens then match transformers' exactly).
ACT_IN = {
    "gelu": "gelu",
    "gelu_new": "gelu_new",
    "gelu_pytorch_tanh": "gelu_tanh",
    "silu": "silu",
    "swish": "silu",
    "relu": "relu",
}
ACT_OUT = {
    "gelu": "gelu",
    "gelu_tanh": "gelu_pytorch_tanh",
    "gelu_new": "gelu_new",
    "silu": "silu",
    "relu": "relu",
}


@dataclass(frozen=True)
class Rule:
    """One lmlab tensor ``lm`` made of the Hugging Face tensors ``hf``.

    op  copy   lm = hf
        t      lm = hfᵀ                     GPT-2's Conv1D stores (in, out), nn.Linear (out, in)
        cat    lm = [hf₀; hf₁; ...] (dim 0)  q|k|v -> fused qkv, gate|up -> mlp.up
        heads  lm = [Q | K | V]              from GPT-NeoX's per-head [q_h k_h v_h] layout
        plus1  lm = 1 + hf                   Gemma's RMSNorm computes x̂·(1 + w) and stores w
    ``sizes`` are the dim-0 sizes of the ``cat`` parts (to split them again on export).
    """

    lm: str
    hf: tuple[str, ...]
    op: str = "copy"
    sizes: tuple[int, ...] = ()

    @property
    def computes(self) -> bool:
        """Whether the op makes new numbers (plus1) rather than moving the stored ones: a value
        it makes may not be exact in the dtype the stored ones are."""
        return self.op == "plus1"


#: one layer's tensor: (lmlab suffix, Hugging Face suffixes, op, dim-0 sizes of the ``cat`` parts)
LayerTensor = tuple[str, tuple[str, ...], str, tuple[int, ...]]


def layer_tensors(
    lm: str, hf: str | tuple[str, ...], op: str = "copy", sizes: tuple[int, ...] = (), bias: bool = False
) -> list[LayerTensor]:
    """The weight of lmlab layer ``lm`` (and its bias when ``bias``) from Hugging Face layer(s)
    ``hf``, for :meth:`Family._layer_rules`. Several ``hf`` layers are fused along dim 0
    (``op="cat"``, q|k|v -> qkv, gate|up -> up) and split in ``sizes`` again on export; the
    bias follows the weight's op, except that a transposed weight's bias is copied as it is
    (a vector has no transpose)."""
    parts = (hf,) if isinstance(hf, str) else hf
    out = [(f"{lm}.weight", tuple(f"{h}.weight" for h in parts), op, sizes)]
    if bias:
        out.append((f"{lm}.bias", tuple(f"{h}.bias" for h in parts), "copy" if op == "t" else op, sizes))
    return out


def need(ok: bool, msg: str) -> None:
    if not ok:
        raise LmlabError(msg)


def act_in(mt: str, name: str | None) -> str:
    act = ACT_IN.get(str(name))
    need(
        act is not None,
        f"{mt} checkpoint uses activation {name!r}, which lmlab does not implement "
        f"(supported: {', '.join(ACT_IN)})",
    )
    return act


def rope_from(mt: str, d: dict[str, Any], default_partial: float = 1.0) -> tuple[float, float]:
    """(rope_theta, partial_rotary_factor) from the transformers 5.x ``rope_parameters``
    or the older top-level ``rope_theta`` / ``rope_scaling`` / ``rotary_pct`` keys."""
    rp = d.get("rope_parameters") or {}
    need(
        not (rp and all(isinstance(v, dict) for v in rp.values())),
        f"{mt} checkpoint has per-layer rope_parameters ({', '.join(rp)}); lmlab uses one RoPE for all layers",
    )
    rs = d.get("rope_scaling") or {}
    kind = rp.get("rope_type") or rp.get("type") or rs.get("rope_type") or rs.get("type") or "default"
    need(
        kind == "default",
        f"{mt} checkpoint uses rope_type={kind!r} (RoPE scaling); lmlab implements only the default "
        "RoPE, so its logits would differ — this checkpoint is not supported",
    )
    theta = rp.get("rope_theta") or d.get("rope_theta") or d.get("rotary_emb_base") or 10000.0
    partial = rp.get("partial_rotary_factor", d.get("partial_rotary_factor", d.get("rotary_pct")))
    return float(theta), float(default_partial if partial is None else partial)


def rope_keys(cfg: TransformerConfig, **extra: Any) -> dict[str, Any]:
    """RoPE keys in both forms, so transformers 4.x and 5.x read the same thing."""
    return {
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, **extra},
    }


@dataclass(frozen=True)
class Fit:
    """One requirement of a family, for export: ``ok`` when the model meets it; ``need`` (what
    the family needs) and ``have`` (what the model has) name the ``lmlab train`` flag that sets
    it, since that is what a user chose, or the TransformerConfig field when no flag sets it."""

    ok: bool
    need: str
    have: str


def pos_flag(cfg: TransformerConfig) -> str:
    return f"--pos {cfg.pos}"


def norm_flag(cfg: TransformerConfig) -> str:
    return f"--norm {cfg.norm}"


def mlp_flag(cfg: TransformerConfig) -> str:
    """--mlp swiglu = gated + SiLU, --mlp gelu = plain + GELU (lmlab.training's mapping)."""
    if cfg.gated_mlp and cfg.activation == "silu":
        return "--mlp swiglu"
    if not cfg.gated_mlp and cfg.activation == "gelu":
        return "--mlp gelu"
    return f"gated_mlp={cfg.gated_mlp} with activation={cfg.activation!r}"


def bias_flag(cfg: TransformerConfig) -> str:
    """--bias sets every bias, --no-bias none; any other mix was set field by field."""
    biases = (cfg.qkv_bias, cfg.proj_bias, cfg.mlp_bias)
    if all(biases):
        return "--bias"
    if not any(biases):
        return "--no-bias"
    return f"qkv_bias={cfg.qkv_bias}, proj_bias={cfg.proj_bias}, mlp_bias={cfg.mlp_bias}"


def fit_pos(cfg: TransformerConfig, allowed: tuple[str, ...]) -> Fit:
    return Fit(cfg.pos in allowed, "--pos " + "|".join(allowed), pos_flag(cfg))


def fit_norm(cfg: TransformerConfig, norm: str) -> Fit:
    return Fit(cfg.norm == norm, f"--norm {norm}", norm_flag(cfg))


def fit_mlp(cfg: TransformerConfig, gated: bool) -> Fit:
    return Fit(cfg.gated_mlp == gated, "--mlp swiglu" if gated else "--mlp gelu", mlp_flag(cfg))


def fit_no_gqa(cfg: TransformerConfig) -> Fit:
    return Fit(
        cfg.n_kv_head == cfg.n_head, f"--n-kv-head {cfg.n_head} (= --n-head)", f"--n-kv-head {cfg.n_kv_head}"
    )


def fit_head_dim(cfg: TransformerConfig) -> Fit:
    ok = cfg.head_dim * cfg.n_head == cfg.d_model
    return Fit(ok, "head_dim = d_model/n_head", f"head_dim={cfg.head_dim}")


def fit_sequential(cfg: TransformerConfig) -> Fit:
    return Fit(not cfg.parallel_residual, "parallel_residual=False", "parallel_residual=True")


def fit_embed_scale(cfg: TransformerConfig, scale: float) -> Fit:
    return Fit(cfg.embed_scale == scale, f"embed_scale={scale:g}", f"embed_scale={cfg.embed_scale:g}")


def fit_activation(cfg: TransformerConfig) -> Fit:
    ok = cfg.activation in ACT_OUT
    return Fit(ok, f"activation in {', '.join(ACT_OUT)}", f"activation={cfg.activation!r}")


def join_needs(needs: list[str]) -> str:
    """Flags as a command line (``--norm layernorm --mlp gelu``), then config fields, comma-separated."""
    flags = " ".join(n for n in needs if n.startswith("--"))
    fields = ", ".join(n for n in needs if not n.startswith("--"))
    return ", ".join(x for x in (flags, fields) if x)


class Family:
    """A Hugging Face architecture; subclasses fill in the mapping."""

    model_type: str = ""
    architecture: str = ""
    display: str = ""  # the family's name in messages ("GPT-2")
    prefix: str = ""  # where the body's tensors live ("model.", "transformer.")
    head: str = "lm_head.weight"  # the untied output layer
    ignore: tuple[str, ...] = ()  # checkpoint tensors that are not weights (old mask buffers)

    def to_lmlab(self, d: dict[str, Any]) -> TransformerConfig:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_hf(self, cfg: TransformerConfig) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def fits(self, cfg: TransformerConfig) -> list[Fit]:  # pragma: no cover - abstract
        """Every requirement ``cfg`` must meet to have an exact equivalent in this family."""
        raise NotImplementedError

    def misfit(self, cfg: TransformerConfig) -> str | None:
        """None when ``cfg`` has an exact equivalent in this family, else what it needs
        ("GPT-2 needs --norm layernorm --mlp gelu")."""
        unmet = [f.need for f in self.fits(cfg) if not f.ok]
        return f"{self.display or self.model_type} needs {join_needs(unmet)}" if unmet else None

    def export_config(self, cfg: TransformerConfig) -> TransformerConfig:
        """``cfg`` with the tensors this family always has (absent biases are written as zeros,
        which computes the same function)."""
        return cfg

    def body_rules(self, cfg: TransformerConfig) -> list[Rule]:  # pragma: no cover - abstract
        raise NotImplementedError

    def rules(self, cfg: TransformerConfig) -> list[Rule]:
        out = self.body_rules(cfg)
        if not cfg.tie_embeddings:
            out.append(Rule("lm_head.weight", (self.head,)))
        return out

    def _layer_rules(self, cfg: TransformerConfig, names: list[LayerTensor]) -> list[Rule]:
        """Rules for every layer from (lmlab suffix, hf suffix(es), op, cat sizes) entries,
        each Hugging Face name under that layer's prefix (see :func:`layer_tensors`)."""
        out = []
        for i in range(cfg.n_layer):
            p = self.layer_prefix(i)
            for lm, hf, op, sizes in names:
                out.append(Rule(f"blocks.{i}.{lm}", tuple(p + h for h in hf), op, sizes))
        return out

    def layer_prefix(self, i: int) -> str:  # pragma: no cover - abstract
        raise NotImplementedError
