"""Checking a model config read from a file before anything is allocated.

A ``config.json`` is data from a disk or a download: a wrong type (``"n_layer": "4"``,
``true``, ``2.5``), a NaN, or a size no machine holds (``"vocab_size": 1e12``) must give
one line naming the file and the field, not a traceback from deep inside torch or an
allocation that swallows the machine. Two checks:

- types: each field's value has the type its annotation says (a bool is not an int; an
  int is a valid float; floats must be finite);
- size: the weights' bytes, estimated from the config (parameters × 4 bytes in float32,
  plus the position tables), must fit in this machine's memory.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from lmlab.errors import LmlabError
from lmlab.runtime import machine_memory

#: Integer fields that multiply into the weights' size (the usual suspects of a bad file).
SIZE_FIELDS = ("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "head_dim", "d_ff",
               "max_seq_len", "hidden_size", "rotary_dim", "target_vocab_size", "n_decoder_layer",
               "max_source_len", "max_target_len", "relative_buckets", "relative_max_distance",
               "attention_size", "num_labels")
#: A sanity bound on any one size field, far above every real model (GPT-3: 96 layers,
#: d_model 12288; the largest vocabularies ~256k; the longest contexts ~10M).
MAX_FIELD = 1 << 26


def check_field_types(cls: type, values: dict[str, Any], where: str = "") -> None:
    """Raise an LmlabError naming ``where`` (a file, if any) and the field whose value has
    the wrong type, sign or size."""
    hints = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    at = f"{where}: " if where else ""
    for name, value in values.items():
        kind = hints.get(name, "")
        optional = "None" in kind
        if value is None:
            if not optional:
                raise LmlabError(f"{at}{name} is null; it must be a value of type {_base(kind)}")
            continue
        base = _base(kind)
        ok = {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, (int, float)) and not isinstance(value, bool),
            "bool": isinstance(value, bool),
            "str": isinstance(value, str),
        }.get(base, True)
        if not ok:
            article = "an" if base == "int" else "a"
            raise LmlabError(f"{at}{name} must be {article} {base}, not {json_repr(value)}")
        if base == "float" and not math.isfinite(value):
            raise LmlabError(f"{at}{name} must be a finite number, not {value}")
        if base == "int" and name in SIZE_FIELDS and value <= 0:
            raise LmlabError(f"{at}{name} must be positive (got {value})")
        if base == "int" and name in SIZE_FIELDS and value > MAX_FIELD:
            raise LmlabError(f"{at}{name} = {value} is out of range (1 to {MAX_FIELD:,})")


def _base(kind: str) -> str:
    return kind.replace("| None", "").replace("None |", "").strip()


def json_repr(value: Any) -> str:
    kind = {bool: "true/false", str: "a string", float: "a float", int: "an int"}.get(type(value))
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    return f"{value!r} ({kind or type(value).__name__})"


def estimate_bytes(cfg: Any) -> tuple[int, str]:
    """float32 bytes of the weights and fixed tables, and the field contributing most."""
    terms: dict[str, int] = {}
    if cfg.model_type == "task":  # the body, plus a d×d layer and the classifier
        total, field = estimate_bytes(cfg.body)
        return total + 4 * (cfg.d_model + 1) * (cfg.d_model + max(cfg.num_labels, 2)), field
    if cfg.model_type == "encoder":
        d = cfg.d_model
        attn = 4 * cfg.n_head * cfg.head_dim * d
        terms["vocab_size"] = (cfg.vocab_size + cfg.type_vocab_size) * d
        terms["n_layer"] = cfg.n_layer * (attn + (3 if cfg.gated_mlp else 2) * d * cfg.d_ff + 4 * d)
        terms["max_seq_len"] = (cfg.max_seq_len + cfg.pos_offset) * d
    elif cfg.model_type == "transformer":
        d, V, L = cfg.d_model, cfg.vocab_size, cfg.n_layer
        attn = (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim * d + cfg.n_head * cfg.head_dim * d
        mlp = (3 if cfg.gated_mlp else 2) * d * cfg.d_ff
        terms["vocab_size"] = V * d * (1 if cfg.tie_embeddings else 2)
        terms["n_layer"] = L * (attn + mlp + 4 * d)
        terms["max_seq_len"] = cfg.max_seq_len * (d if cfg.pos != "rope" else cfg.rotary_dim)
    elif cfg.model_type == "seq2seq":
        d, V = cfg.d_model, cfg.vocab_size
        attn = 4 * cfg.n_head * cfg.head_dim * d
        mlp = (3 if cfg.gated_mlp else 2) * d * cfg.d_ff
        terms["vocab_size"] = V * d * (1 if cfg.share_embeddings else 2)
        terms["n_layer"] = cfg.n_layer * (attn + mlp)
        terms["n_decoder_layer"] = cfg.n_decoder_layer * (2 * attn + mlp)
        terms["max_source_len"] = (cfg.max_source_len + cfg.max_target_len) * d
    elif cfg.model_type == "rnn_seq2seq":
        d, H, A, L = cfg.d_model, cfg.hidden_size, cfg.attention_size, cfg.n_layer
        g = {"rnn": 1, "gru": 3, "lstm": 4}.get(cfg.cell, 4)
        He = H // 2 if cfg.bidirectional else H  # each encoder direction
        tables = (not cfg.share_embeddings) + (not cfg.tie_embeddings)
        terms["vocab_size"] = cfg.vocab_size * d + cfg.tgt_vocab_size * (d * tables + 1)
        # encoder layers (input d, then H) + decoder layers (input [E y; c or h̃], then H) + W_init
        enc = g * H * (d + He + 2) + (L - 1) * g * H * (H + He + 2)
        fed = H if cfg.attention == "additive" else d  # beside E y: c_i (Bahdanau) or h̃_{i-1} (Luong)
        dec = g * H * (d + fed + H + 2) + (L - 1) * g * H * (2 * H + 2)
        terms["n_layer"] = enc + dec + L * H * (H + 1)
        attn = {"additive": 2 * H * A + 2 * A, "general": H * H}.get(cfg.attention, 0)
        terms["hidden_size"] = attn + (2 * H + (d if cfg.attention == "additive" else 0) + 1) * d  # + readout
    else:
        d, H, V, L = cfg.d_model, cfg.hidden_size, cfg.vocab_size, cfg.n_layer
        gates = {"rnn": 1, "gru": 3, "lstm": 4}.get(cfg.cell, 4)
        ways = 2 if getattr(cfg, "bidirectional", False) else 1
        terms["vocab_size"] = V * d + V * H
        terms["n_layer"] = ways * L * gates * (H * (d + ways * H) + 2 * H)  # (upper layers read [h→; h←])
        terms["bigram_buckets"] = getattr(cfg, "bigram_buckets", 0) * d
    total = 4 * sum(terms.values())
    return total, max(terms, key=terms.get)


def check_fits_in_memory(cfg: Any, where: str = "this config") -> None:
    """Refuse, before anything is allocated, a model whose weights exceed the machine's memory."""
    need, field = estimate_bytes(cfg)
    have = machine_memory()
    if have is not None and need > have:
        raise LmlabError(
            f"{where} describes a model of about {need / 2**30:,.1f} GiB of weights (mostly from "
            f"{field} = {getattr(cfg, field):,}), more than this machine's {have / 2**30:,.1f} GiB; "
            "the file is damaged or the model is too big for this machine"
        )
