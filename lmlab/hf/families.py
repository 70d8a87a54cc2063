"""The supported Hugging Face families, and the choice of one for export.

Each family is a setting of lmlab's one Transformer (see :mod:`lmlab.hf.base`):
GPT-2 and GPT-NeoX in :mod:`lmlab.hf.gpt`, Llama, Mistral, Qwen2 and Gemma in
:mod:`lmlab.hf.llama`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from lmlab.errors import LmlabError
from lmlab.hf.base import Family, Rule, join_needs, mlp_flag, need, norm_flag, pos_flag
from lmlab.hf.gpt import GPT2, GPTNeoX
from lmlab.hf.llama import Gemma, Llama, Mistral, Qwen2
from lmlab.models.config import TransformerConfig

__all__ = ["EXPORT_ORDER", "FAMILIES", "Family", "Rule", "choose_family", "family_for", "same_architecture"]

FAMILIES: dict[str, Family] = {
    f.model_type: f for f in (GPT2(), Llama(), Mistral(), Qwen2(), Gemma(), GPTNeoX())
}
#: the families an lmlab-trained model may export to, in order of preference
EXPORT_ORDER = ("gpt2", "llama", "qwen2", "gpt_neox", "gemma")


def family_for(d: dict[str, Any], source: str) -> Family:
    mt = d.get("model_type")
    fam = FAMILIES.get(str(mt))
    need(
        fam is not None,
        f"{source} is a Hugging Face {mt!r} model, which lmlab cannot load "
        f"(supported model_type: {', '.join(FAMILIES)}; encoder-decoders: marian, bart, mbart, t5; "
        "encoders with a task head: bert, distilbert, roberta, xlm-roberta)",
    )
    return fam


def choose_family(cfg: TransformerConfig, origin: str | None = None) -> Family:
    """The family whose architecture computes exactly what ``cfg`` does: the model's own
    family first (an imported Qwen2 stays Qwen2); else one that holds ``cfg`` as it is
    before one that needs zero biases added (q/k/v biases alone: Qwen2 rather than Llama),
    each in the order GPT-2, Llama, Qwen2, GPT-NeoX, Gemma."""
    fits = [m for m in EXPORT_ORDER if FAMILIES[m].misfit(cfg) is None]
    as_is = [m for m in fits if same_architecture(FAMILIES[m].export_config(cfg), cfg)]
    if origin in FAMILIES and FAMILIES[origin].misfit(cfg) is None:
        return FAMILIES[origin]
    if as_is or fits:
        return FAMILIES[(as_is or fits)[0]]
    raise LmlabError(no_equivalent_message(cfg, origin))


def no_equivalent_message(cfg: TransformerConfig, origin: str | None = None) -> str:
    """Why no family fits, in the ``lmlab train`` flags the user set: the model's layout, then
    what each family a trained model can reach (GPT-2, Llama, GPT-NeoX; and an imported
    model's own family) still needs, nearest first, e.g.

        this model (--pos rope --norm rmsnorm --mlp gelu) has no exact Hugging Face equivalent:
        Llama needs --mlp swiglu; GPT-NeoX needs --norm layernorm; GPT-2 needs --pos ...
    """
    names = ["gpt2", "llama", "gpt_neox"]
    if origin in FAMILIES and origin not in names:
        names.insert(0, origin)
    unmet = {m: [f for f in FAMILIES[m].fits(cfg) if not f.ok] for m in names}
    order = sorted(names, key=lambda m: len(unmet[m]))  # stable: ties keep the order above
    have = [pos_flag(cfg), norm_flag(cfg), mlp_flag(cfg)]
    for m in order:
        have += [f.have for f in unmet[m] if f.have not in have]
    needs = "; ".join(FAMILIES[m].misfit(cfg) or "" for m in order)
    return f"this model ({join_needs(have)}) has no exact Hugging Face equivalent: {needs}"


def same_architecture(a: TransformerConfig, b: TransformerConfig) -> bool:
    """Equal configs up to training-only settings (dropout, init) and float noise."""
    da, db = dataclasses.asdict(a), dataclasses.asdict(b)
    for k in ("dropout", "init_std"):
        da.pop(k), db.pop(k)

    def same(x: Any, y: Any) -> bool:
        if isinstance(x, float) or isinstance(y, float):
            return (
                isinstance(x, int | float) and isinstance(y, int | float) and math.isclose(x, y, rel_tol=1e-9)
            )
        return x == y

    return da.keys() == db.keys() and all(same(da[k], db[k]) for k in da)
