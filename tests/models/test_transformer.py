"""The decoder-only Transformer: KV cache, padding, causality, config, size and weight tying.

References: the model's own no-cache forward (the cache must not change the maths),
each row of a batch run alone, a hand-written greedy loop, and Hugging Face's
``GPT2LMHeadModel`` for the parameter count.
"""

from __future__ import annotations

import json

import pytest
import torch

from lmlab.errors import LmlabError
from lmlab.generate import GenerationConfig, generate_tokens
from lmlab.messages import LmlabWarning
from lmlab.models.config import TransformerConfig, config_from_dict, config_to_dict
from lmlab.models.transformer import Transformer

POSITIONS = ("rope", "learned", "sinusoidal")
ATOL = 1e-5


def tiny(pos: str = "rope", **kw: object) -> Transformer:
    """A 2-layer GQA model; init_std large enough that logits are far from ties."""
    torch.manual_seed(0)
    opts: dict[str, object] = dict(
        vocab_size=61, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=32, pos=pos, init_std=0.2
    )
    opts.update(kw)
    return Transformer(TransformerConfig(**opts)).eval()


def ids_of(n: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 61, (batch, n), generator=g)


# --------------------------------------------------------------------------- KV cache
@pytest.mark.parametrize("pos", POSITIONS)
def test_kv_cache_one_token_at_a_time_matches_full_forward(pos: str) -> None:
    model = tiny(pos)
    ids = ids_of(14, batch=2)
    with torch.no_grad():
        full, _ = model(ids)
        state = model.init_state(2, 20)
        out = [model(ids[:, :5], state)[0]]  # prefill
        for t in range(5, 14):
            out.append(model(ids[:, t : t + 1], state)[0])
    assert state.length == 14
    torch.testing.assert_close(torch.cat(out, 1), full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("pos", POSITIONS)
def test_kv_cache_in_chunks_matches_full_forward(pos: str) -> None:
    model = tiny(pos)
    ids = ids_of(15)
    with torch.no_grad():
        full, _ = model(ids)
        state = model.init_state(1)
        out = [model(ids[:, a:b], state)[0] for a, b in [(0, 3), (3, 7), (7, 8), (8, 15)]]
        last, _ = model(ids[:, :15], model.init_state(1), last_only=True)
    torch.testing.assert_close(torch.cat(out, 1), full, atol=ATOL, rtol=0)
    torch.testing.assert_close(last, full[:, -1:], atol=ATOL, rtol=0)


def test_kv_cache_matches_with_the_explicit_attention_path() -> None:
    model = tiny("rope")
    for block in model.blocks:
        block.attn.fast = False
    ids = ids_of(10)
    with torch.no_grad():
        full, _ = model(ids)
        state = model.init_state(1)
        out = [model(ids[:, a:b], state)[0] for a, b in [(0, 4), (4, 5), (5, 10)]]
    torch.testing.assert_close(torch.cat(out, 1), full, atol=ATOL, rtol=0)


def _greedy_without_cache(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """Re-run the whole (cropped) prefix every step and take the argmax: no state at all."""
    tokens, new = list(prompt), []
    ctx = model.config.max_seq_len
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([tokens[-ctx:]]))
            nxt = int(logits[0, -1].argmax())
            new.append(nxt)
            tokens.append(nxt)
    return new


@pytest.mark.parametrize("pos", POSITIONS)
def test_cached_greedy_generation_equals_uncached_loop(pos: str) -> None:
    model = tiny(pos, tie_embeddings=False)  # tied + random tends to echo the last token forever
    prompt = ids_of(6)[0].tolist()
    with torch.no_grad():
        got = list(generate_tokens(model, prompt, GenerationConfig(max_new_tokens=20, temperature=0)))
    assert got == _greedy_without_cache(model, prompt, 20)
    assert len(set(got)) > 1  # a non-degenerate continuation, so the comparison means something


def test_greedy_generation_past_the_context_uses_a_sliding_window() -> None:
    model = tiny("learned", max_seq_len=12, tie_embeddings=False)
    prompt = ids_of(5)[0].tolist()
    with torch.no_grad(), pytest.warns(LmlabWarning, match="sliding window"):
        got = list(generate_tokens(model, prompt, GenerationConfig(max_new_tokens=15, temperature=0)))
    assert got == _greedy_without_cache(model, prompt, 15)
    assert len(set(got)) > 1


# --------------------------------------------------------------------------- padding
def _left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad rows with id 0; return ids, attention_mask and position_ids = cumsum(mask) - 1."""
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r) :] = r
        mask[b, T - len(r) :] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, position_ids


@pytest.mark.parametrize("pos", POSITIONS)
def test_left_padded_batch_matches_each_row_alone(pos: str) -> None:
    model = tiny(pos)
    rows = [ids_of(9, seed=2)[0], ids_of(4, seed=3)[0], ids_of(6, seed=4)[0]]
    ids, mask, position_ids = _left_pad(rows)
    with torch.no_grad():
        batch, _ = model(ids, attention_mask=mask, position_ids=position_ids)
        for b, r in enumerate(rows):
            alone, _ = model(r[None])
            torch.testing.assert_close(batch[b, -len(r) :], alone[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("pos", POSITIONS)
def test_left_padded_batch_with_cache_matches_each_row_alone(pos: str) -> None:
    """Prefill a padded batch into the cache, then decode 4 tokens per row, one at a time."""
    model = tiny(pos)
    rows = [ids_of(7, seed=5)[0], ids_of(3, seed=6)[0]]
    extra = ids_of(4, batch=2, seed=7)
    ids, mask, position_ids = _left_pad(rows)
    with torch.no_grad():
        state = model.init_state(2, 16)
        out = [model(ids, state, attention_mask=mask, position_ids=position_ids)[0][:, -1:]]
        next_pos = position_ids[:, -1:] + 1
        for t in range(4):
            out.append(model(extra[:, t : t + 1], state, position_ids=next_pos + t)[0])
        got = torch.cat(out, 1)  # (B, 5, V): last prompt position, then 4 decoded
        for b, r in enumerate(rows):
            alone, _ = model(torch.cat([r, extra[b]])[None])
            torch.testing.assert_close(got[b], alone[0, len(r) - 1 :], atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- causality
@pytest.mark.parametrize("fast", [True, False])
def test_changing_a_future_token_leaves_earlier_logits_unchanged(fast: bool) -> None:
    model = tiny("rope")
    for block in model.blocks:
        block.attn.fast = fast
    ids = ids_of(12)
    changed = ids.clone()
    changed[0, 8] = (ids[0, 8] + 1) % 61
    with torch.no_grad():
        a, _ = model(ids)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8], atol=1e-6, rtol=0)
    assert (a[:, 8:] - b[:, 8:]).abs().amax(-1).min() > 1e-4  # the change does reach later positions


# --------------------------------------------------------------------------- config
def test_config_round_trips_through_json() -> None:
    cfg = TransformerConfig(
        vocab_size=100, n_layer=3, n_head=6, n_kv_head=2, d_model=48, pos="learned", norm="layernorm",
        norm_bias=True, activation="gelu_tanh", gated_mlp=False, qkv_bias=True, rotary_dim=4,
        tie_embeddings=False, embed_scale=2.0,
    )  # fmt: skip
    back = config_from_dict(json.loads(json.dumps(config_to_dict(cfg))))
    assert back == cfg
    assert config_to_dict(back)["model_type"] == "transformer"
    assert (back.head_dim, back.d_ff) == (8, 192)  # derived fields are stored, not re-derived


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        (dict(n_head=4, n_kv_head=3), "n_kv_head=3 must divide n_head=4"),
        (dict(n_head=4, n_kv_head=8), "n_kv_head=8 must divide"),
        (dict(d_model=30, n_head=4), "d_model=30 is not divisible by n_head=4"),
        (dict(pos="alibi"), "pos must be one of"),
        (dict(norm="batchnorm"), "norm must be one of"),
        (dict(activation="tanh"), "activation must be one of"),
        (dict(dropout=1.0), "dropout"),
        (dict(n_layer=0), "n_layer must be positive"),
        (dict(rotary_dim=3), "rotary_dim=3 must be even"),
    ],
)
def test_bad_configs_raise_a_clear_error(kw: dict, needle: str) -> None:
    with pytest.raises(LmlabError, match=needle) as e:
        TransformerConfig(**kw)
    assert "\n" not in str(e.value)


def test_config_from_dict_rejects_unknown_fields_and_types() -> None:
    d = config_to_dict(TransformerConfig())
    with pytest.raises(LmlabError, match="fields this lmlab does not know: n_experts"):
        config_from_dict({**d, "n_experts": 8})
    with pytest.raises(LmlabError, match="unknown lmlab model_type 'mamba'"):
        config_from_dict({**d, "model_type": "mamba"})
    with pytest.raises(LmlabError, match="n_layer must be an? int, not 'four'"):  # (models/limits.py)
        config_from_dict({**d, "n_layer": "four"})
    with pytest.raises(LmlabError, match="n_kv_head"):
        config_from_dict({**d, "n_kv_head": 3})


# --------------------------------------------------------------------------- size and tying
def test_gpt2_style_parameter_count_equals_hugging_face() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    sizes = dict(vocab_size=97, n_layer=2, n_head=4, d_model=32, max_seq_len=40)
    ours = Transformer(
        TransformerConfig(
            **sizes, pos="learned", norm="layernorm", norm_bias=True, activation="gelu_tanh",
            gated_mlp=False, qkv_bias=True, proj_bias=True, mlp_bias=True, tie_embeddings=True,
        )
    )  # fmt: skip
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_layer=2, n_head=4, n_embd=32, n_positions=40))
    theirs = sum(p.numel() for p in hf.parameters())  # parameters() counts the tied matrix once
    assert ours.num_parameters() == theirs
    assert sum(p.numel() for p in ours.parameters()) == theirs


def test_weight_tying() -> None:
    tied = tiny("rope")
    assert tied.lm_head.weight is tied.tok_emb.weight
    untied = tiny("rope", tie_embeddings=False)
    assert untied.lm_head.weight is not untied.tok_emb.weight
    assert untied.num_parameters() == tied.num_parameters() + 61 * 32
    with torch.no_grad():
        tied.tok_emb.weight[3].zero_()
    assert (tied.lm_head.weight[3] == 0).all()  # one tensor, two roles
