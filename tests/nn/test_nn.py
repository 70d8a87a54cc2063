"""The building blocks in lmlab.nn, each checked against a reference lmlab did not write.

References: ``torch.nn.MultiheadAttention`` on the same weights, attention with the
key/value heads repeated by hand, the Vaswani and RoPE formulas evaluated with the
``math`` module, ``torch.nn.RMSNorm``, and the MLP formulas spelled out with matmuls.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from lmlab.nn.attention import CausalSelfAttention, attention_explicit
from lmlab.nn.cache import KVCache
from lmlab.nn.layers import MLP, RMSNorm
from lmlab.nn.positional import (
    RotaryEmbedding,
    SinusoidalPositions,
    apply_rope,
    rope_reference_angle,
    sinusoidal_table,
)

ATOL = 1e-5


def _causal_attention(
    d_model: int, n_head: int, n_kv_head: int, bias: bool = False, seed: int = 0
) -> CausalSelfAttention:
    """A CausalSelfAttention with random (not default-initialised) weights, in eval mode."""
    torch.manual_seed(seed)
    attn = CausalSelfAttention(
        d_model, n_head, n_kv_head, d_model // n_head, qkv_bias=bias, proj_bias=bias, use_rope=False
    )
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0.0, 0.3)
    return attn.eval()


# --------------------------------------------------------------------------- attention
def test_fast_and_explicit_paths_agree_with_torch_multihead_attention() -> None:
    """Both paths equal nn.MultiheadAttention loaded with the same weights (causal mask)."""
    torch.manual_seed(0)
    B, T, C, nh = 2, 7, 32, 4
    mha = nn.MultiheadAttention(C, nh, bias=True, batch_first=True).eval()
    with torch.no_grad():
        for p in mha.parameters():
            p.normal_(0.0, 0.3)
    attn = CausalSelfAttention(C, nh, nh, C // nh, qkv_bias=True, proj_bias=True, use_rope=False).eval()
    with torch.no_grad():
        # in_proj_weight is [W_q; W_k; W_v] stacked by rows, the same [Q | K | V] layout as qkv
        attn.qkv.weight.copy_(mha.in_proj_weight)
        attn.qkv.bias.copy_(mha.in_proj_bias)
        attn.proj.weight.copy_(mha.out_proj.weight)
        attn.proj.bias.copy_(mha.out_proj.bias)

    x = torch.randn(B, T, C)
    future = torch.ones(T, T, dtype=torch.bool).triu(1)  # MultiheadAttention: True = may NOT attend
    with torch.no_grad():
        ref, ref_w = mha(x, x, x, attn_mask=future, need_weights=True, average_attn_weights=False)
        y_fast = attn(x)
        y_expl, w = attn(x, need_weights=True)
        attn.fast = False
        y_slow = attn(x)

    torch.testing.assert_close(y_fast, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(y_expl, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(y_slow, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(w, ref_w, atol=ATOL, rtol=0)
    # softmax rows are distributions, and nothing flows from the future
    torch.testing.assert_close(w.sum(-1), torch.ones(B, nh, T), atol=ATOL, rtol=0)
    assert (w[..., future] == 0).all()
    assert (w[..., ~future] > 0).all()


def test_explicit_attention_is_the_formula() -> None:
    """attention_explicit == softmax(QKᵀ/√d + M)V written with plain loops over heads."""
    torch.manual_seed(1)
    B, nh, T, hs = 2, 3, 5, 8
    q, k, v = torch.randn(B, nh, T, hs), torch.randn(B, nh, T, hs), torch.randn(B, nh, T, hs)
    y, w = attention_explicit(q, k, v, None, causal=True)
    for b in range(B):
        for h in range(nh):
            for i in range(T):
                # scores_j = q_i·k_j / √d for j ≤ i; weights = exp / Σ exp
                s = [float(q[b, h, i] @ k[b, h, j]) / math.sqrt(hs) for j in range(i + 1)]
                top = max(s)
                e = [math.exp(sj - top) for sj in s]
                p = [ej / sum(e) for ej in e]
                out = sum(p[j] * v[b, h, j] for j in range(i + 1))
                torch.testing.assert_close(w[b, h, i, : i + 1], torch.tensor(p), atol=ATOL, rtol=0)
                assert (w[b, h, i, i + 1 :] == 0).all()
                torch.testing.assert_close(y[b, h, i], out, atol=ATOL, rtol=0)


def test_fast_and_explicit_paths_agree_with_a_padding_mask() -> None:
    """With an explicit boolean mask (left padding), both paths give the same output."""
    attn = _causal_attention(16, 4, 2, bias=True)
    torch.manual_seed(2)
    B, T = 2, 6
    x = torch.randn(B, T, 16)
    valid = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    pos = torch.arange(T)
    # query i may see key j when j ≤ i and j is real; a padding query sees itself
    mask = (pos[None, :] <= pos[:, None])[None, None] & (
        valid[:, None, None, :] | (pos[None, :] == pos[:, None])[None, None]
    )
    with torch.no_grad():
        y_fast = attn(x, mask=mask)
        y_expl, w = attn(x, mask=mask, need_weights=True)
    torch.testing.assert_close(y_fast, y_expl, atol=ATOL, rtol=0)
    assert (w[0, :, 2:, :2] == 0).all()  # real tokens never look at the padding
    torch.testing.assert_close(w.sum(-1), torch.ones(B, 4, T), atol=ATOL, rtol=0)


@pytest.mark.parametrize("fast", [True, False])
def test_attention_with_a_kv_cache_in_chunks_equals_no_cache(fast: bool) -> None:
    """Feeding the sequence in chunks through a cache (mask=None: causal) == one full pass."""
    attn = _causal_attention(16, 4, 2)
    attn.fast = fast
    torch.manual_seed(3)
    x = torch.randn(1, 9, 16)
    with torch.no_grad():
        full = attn(x)
        cache = KVCache(1, 1, 2, 16, 4)
        outs = []
        for a, b in [(0, 3), (3, 4), (4, 7), (7, 9)]:
            outs.append(attn(x[:, a:b], cache=cache))
            cache.advance(b - a)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
@pytest.mark.parametrize("fast", [True, False])
def test_grouped_query_attention_equals_mha_with_repeated_kv_heads(n_kv_head: int, fast: bool) -> None:
    """GQA == multi-head attention whose K/V projection rows are copied for each query head."""
    C, nh = 32, 4
    hs = C // nh
    gqa = _causal_attention(C, nh, n_kv_head, bias=True, seed=4)
    gqa.fast = fast
    mha = CausalSelfAttention(C, nh, nh, hs, qkv_bias=True, proj_bias=True).eval()
    group = nh // n_kv_head  # query head h uses key/value head h // group
    with torch.no_grad():
        w, b = gqa.qkv.weight, gqa.qkv.bias
        wq, wk, wv = w.split([nh * hs, n_kv_head * hs, n_kv_head * hs])
        bq, bk, bv = b.split([nh * hs, n_kv_head * hs, n_kv_head * hs])

        def rows(t: Tensor, h: int) -> Tensor:
            return t[h * hs : (h + 1) * hs]

        wk_full = torch.cat([rows(wk, h // group) for h in range(nh)])
        wv_full = torch.cat([rows(wv, h // group) for h in range(nh)])
        bk_full = torch.cat([rows(bk, h // group) for h in range(nh)])
        bv_full = torch.cat([rows(bv, h // group) for h in range(nh)])
        mha.qkv.weight.copy_(torch.cat([wq, wk_full, wv_full]))
        mha.qkv.bias.copy_(torch.cat([bq, bk_full, bv_full]))
        mha.proj.load_state_dict(gqa.proj.state_dict())

    torch.manual_seed(5)
    x = torch.randn(2, 6, C)
    with torch.no_grad():
        torch.testing.assert_close(gqa(x), mha(x), atol=ATOL, rtol=0)
        _, w_gqa = gqa(x, need_weights=True)
        _, w_mha = mha(x, need_weights=True)
    torch.testing.assert_close(w_gqa, w_mha, atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- sinusoidal
@pytest.mark.parametrize(("pos", "i"), [(0, 0), (1, 0), (3, 1), (7, 2), (50, 5), (127, 15)])
def test_sinusoidal_table_matches_vaswani_formula(pos: int, i: int) -> None:
    d = 32
    table = sinusoidal_table(128, d)
    angle = pos / 10000 ** (2 * i / d)
    assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)  # PE(pos,2i)
    assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)  # PE(pos,2i+1)


def test_sinusoidal_module_looks_up_rows() -> None:
    pe = SinusoidalPositions(16, 8)
    ids = torch.tensor([[3, 0, 15]])
    torch.testing.assert_close(pe(ids), sinusoidal_table(16, 8)[ids], atol=0, rtol=0)
    assert not pe.state_dict()  # a fixed table is not saved in checkpoints


# --------------------------------------------------------------------------- RoPE
def _rope(x: Tensor, positions: Tensor, rotary_dim: int | None = None, base: float = 10000.0) -> Tensor:
    """lmlab's RoPE applied to x of shape (B, nh, T, hs) at the given (T,) positions."""
    rd = rotary_dim or x.shape[-1]
    cos, sin = RotaryEmbedding(rd, 8, base)(positions[None])  # (1, T, rd)
    return apply_rope(x, cos[:, None], sin[:, None])


def _rope_complex(x: Tensor, positions: Tensor, rotary_dim: int, base: float = 10000.0) -> Tensor:
    """Rotate-half RoPE with complex numbers: z_i = x_i + j·x_{i+rd/2},  z_i' = z_i · e^{j·m·θ_i}."""
    x = x.double()
    half = rotary_dim // 2
    theta = torch.tensor([base ** (-2 * i / rotary_dim) for i in range(half)], dtype=torch.float64)
    z = torch.complex(x[..., :half], x[..., half:rotary_dim])
    rot = torch.polar(torch.ones(len(positions), half, dtype=torch.float64), positions[:, None] * theta)
    z = z * rot  # (..., T, half) · (T, half)
    return torch.cat([z.real, z.imag, x[..., rotary_dim:]], dim=-1)


def test_rope_matches_complex_number_reference() -> None:
    torch.manual_seed(6)
    x = torch.randn(2, 3, 11, 16)
    positions = torch.tensor([0, 1, 2, 3, 5, 8, 13, 17, 20, 30, 40])
    out = _rope(x, positions)
    torch.testing.assert_close(out.double(), _rope_complex(x, positions, 16), atol=ATOL, rtol=0)


def test_rope_table_angles_match_hand_computed() -> None:
    rope = RotaryEmbedding(8, 32)
    cos, sin = rope(torch.tensor([[5, 17]]))
    for row, m in enumerate((5, 17)):
        for i in range(4):
            angle = rope_reference_angle(m, i, 8)
            assert angle == pytest.approx(m * 10000 ** (-2 * i / 8))
            for col in (i, i + 4):  # both halves of the pair share θ_i
                assert cos[0, row, col].item() == pytest.approx(math.cos(angle), abs=1e-6)
                assert sin[0, row, col].item() == pytest.approx(math.sin(angle), abs=1e-6)


def test_rope_preserves_norms() -> None:
    torch.manual_seed(7)
    x = torch.randn(1, 2, 10, 16)
    out = _rope(x, torch.arange(10) * 7)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), atol=ATOL, rtol=0)
    assert not torch.allclose(out[:, :, 1:], x[:, :, 1:])  # it did rotate (position 0 is identity)


def test_rope_dot_product_depends_only_on_offset() -> None:
    """⟨R_m q, R_n k⟩ is the same for every (m, n) with the same m - n, and changes with m - n."""
    torch.manual_seed(8)
    q = torch.randn(1, 1, 1, 16).expand(1, 1, 6, 16)
    k = torch.randn(1, 1, 1, 16).expand(1, 1, 6, 16)
    ms = torch.tensor([3, 10, 25, 4, 12, 30])
    ns = torch.tensor([1, 8, 23, 4, 12, 30])  # offsets 2, 2, 2, 0, 0, 0
    dots = (_rope(q, ms) * _rope(k, ns)).sum(-1).flatten()
    torch.testing.assert_close(dots[:3], dots[:1].expand(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(
        dots[3:], (q[..., 0, :] * k[..., 0, :]).sum(-1).flatten().expand(3), atol=1e-4, rtol=0
    )
    assert abs(dots[0] - dots[3]) > 1e-2


def test_partial_rotary_leaves_the_other_channels_unchanged() -> None:
    torch.manual_seed(9)
    x = torch.randn(2, 2, 7, 16)
    positions = torch.arange(7) + 3
    out = _rope(x, positions, rotary_dim=6)
    assert torch.equal(out[..., 6:], x[..., 6:])
    assert not torch.allclose(out[..., :6], x[..., :6])
    torch.testing.assert_close(out.double(), _rope_complex(x, positions, 6), atol=ATOL, rtol=0)


def test_rope_table_grows_on_demand() -> None:
    small, big = RotaryEmbedding(8, 4), RotaryEmbedding(8, 64)
    ids = torch.tensor([[0, 3, 9, 40]])
    for a, b in zip(small(ids), big(ids)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_rope_table_grown_in_a_bf16_model_is_the_fp32_table_rounded() -> None:
    """The table starts at 4,096 rows; a bf16 model reaching past them grows it from the fp32
    angles (its inv_freq buffer is bf16 by then), rounded once to bf16 like the first rows.
    Reference: cos/sin of m·θ_i computed by hand in fp64."""
    rope = RotaryEmbedding(64, 32768, base=1_000_000.0).to(torch.bfloat16)
    assert rope.cos.shape[0] == 4096 and rope.inv_freq.dtype == torch.bfloat16
    before = rope(torch.tensor([[10, 4000]]))
    cos, sin = rope(torch.tensor([[10, 4000, 5000, 20000]]))
    assert rope.cos.shape[0] > 20000 and cos.dtype == torch.bfloat16
    assert torch.equal(cos[:, :2], before[0]) and torch.equal(sin[:, :2], before[1])
    for row, m in enumerate((10, 4000, 5000, 20000)):
        for i in (0, 5, 31):
            angle = rope_reference_angle(m, i, 64, base=1_000_000.0)
            # bf16 rounding (2⁻⁸) and the fp32 angle's own (m·θ·2⁻²⁴)
            assert abs(cos[0, row, i].item() - math.cos(angle)) <= 2**-8 + 1e-3
            assert abs(sin[0, row, i + 32].item() - math.sin(angle)) <= 2**-8 + 1e-3


# --------------------------------------------------------------------------- norms and MLPs
def test_rmsnorm_matches_formula_and_torch() -> None:
    torch.manual_seed(10)
    norm = RMSNorm(12, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 12) * 4
    # y = x / sqrt(mean(x²) + eps) · w
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), ref, atol=ATOL, rtol=1e-6)
    if hasattr(nn, "RMSNorm"):
        theirs = nn.RMSNorm(12, eps=1e-6)
        with torch.no_grad():
            theirs.weight.copy_(norm.weight)
        torch.testing.assert_close(norm(x), theirs(x), atol=ATOL, rtol=1e-6)
    # computed in float32 for low-precision inputs, then cast back
    xb = x.bfloat16()
    torch.testing.assert_close(norm.to(torch.bfloat16)(xb).float(), ref, atol=0.1, rtol=0.02)


def test_swiglu_mlp_matches_formula() -> None:
    """down(silu(W_gate x) ⊙ W_up x) with the gate/up halves of the fused matrix split by hand."""
    torch.manual_seed(11)
    d, d_ff = 16, 24
    mlp = MLP(d, d_ff, "silu", gated=True, bias=False, dropout=0.0)
    x = torch.randn(2, 3, d)
    w_gate, w_up = mlp.up.weight[:d_ff], mlp.up.weight[d_ff:]
    g = x @ w_gate.T
    silu = g * torch.sigmoid(g)  # silu(g) = g·σ(g)
    ref = (silu * (x @ w_up.T)) @ mlp.down.weight.T
    torch.testing.assert_close(mlp(x), ref, atol=ATOL, rtol=0)


def test_gelu_mlp_matches_formula() -> None:
    """down(gelu(up x + b1)) + b2 with exact GELU x·Φ(x), Φ from math.erf."""
    torch.manual_seed(12)
    mlp = MLP(8, 32, "gelu", gated=False, bias=True, dropout=0.0)
    with torch.no_grad():
        mlp.up.bias.normal_()
        mlp.down.bias.normal_()
    x = torch.randn(4, 8)
    h = (x @ mlp.up.weight.T + mlp.up.bias).detach().double()
    gelu = h.apply_(lambda v: v * 0.5 * (1.0 + math.erf(v / math.sqrt(2.0)))).float()
    ref = gelu @ mlp.down.weight.T + mlp.down.bias
    torch.testing.assert_close(mlp(x), ref, atol=ATOL, rtol=0)
    tanh = MLP(8, 32, "gelu_tanh", gated=False, bias=False, dropout=0.0)
    u = x @ tanh.up.weight.T
    # GPT-2: 0.5·u·(1 + tanh(√(2/π)·(u + 0.044715·u³)))
    g = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))
    torch.testing.assert_close(tanh(x), g @ tanh.down.weight.T, atol=ATOL, rtol=0)
