"""lmlab's one-query attention kernel (lmlab/nn/kernels/attend_one.cpp), against the formula in
fp64 (PyTorch's attention run on doubles), and the decoding step that calls it."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from lmlab.nn import native, native_attention

BUILDABLE = native._cpu_ok() and shutil.which("g++") is not None
needs_kernel = pytest.mark.skipif(not BUILDABLE, reason="no g++ or no AVX-512 on this machine")


def exact(q, k, v, mask, scale=None) -> torch.Tensor:
    """softmax(scale·q kᵀ + M) v in fp64, each query head reading its group's key/value head."""
    rep = q.shape[1] // k.shape[1]
    k2, v2 = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    s = (q.double() @ k2.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ v2


def cache_views(B, nkv, S, hs, dtype, g, room=7):
    """Keys and values as a decoding step reads them: the first S slots of a bigger cache."""
    kc = torch.randn(B, nkv, S + room, hs, generator=g).to(dtype)
    vc = torch.randn(B, nkv, S + room, hs, generator=g).to(dtype)
    return kc[:, :, :S], vc[:, :, :S]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("B", "nh", "nkv", "hs"), [(1, 14, 2, 64), (2, 4, 4, 16), (3, 8, 1, 128), (1, 2, 2, 256)])
@pytest.mark.parametrize("S", [1, 5, 600])
@pytest.mark.parametrize("masked", [False, True])
def test_one_query_attention_is_the_formula(dtype, B, nh, nkv, hs, S, masked):
    """Grouped heads, every head width it takes, one key to many, masked keys (each row's last key
    kept, as the decoding mask keeps the query's own): within the input dtype's rounding of fp64."""
    if dtype == torch.float32 and S < native_attention.FP32_MIN_KEYS:
        S = native_attention.FP32_MIN_KEYS  # fp32 over fewer keys stays on PyTorch's kernel (tested below)
    g = torch.Generator().manual_seed(B * 1000 + nh * 100 + S + hs)
    q = torch.randn(B, nh, 1, hs, generator=g).to(dtype)
    k, v = cache_views(B, nkv, S, hs, dtype, g)
    mask = None
    if masked:
        mask = torch.rand(B, 1, 1, S, generator=g) < 0.6
        mask[..., -1] = True
    got = native_attention.attend_one(q, k, v, mask, None)
    assert got is not None and got.dtype == dtype and got.shape == (B, nh, 1, hs)
    tol = 2**-7 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.double(), exact(q, k, v, mask), atol=tol, rtol=tol)


@needs_kernel
def test_a_scale_a_broadcast_mask_and_a_strided_query():
    """An explicit scale; one mask row for every batch row; q a view into a fused projection
    (GPT-2's: no RoPE, so q is never copied)."""
    g = torch.Generator().manual_seed(5)
    fused = torch.randn(2, 12, 1, 32, generator=g).bfloat16()  # (B, [Q|K|V] heads, 1, hs)
    q = fused[:, :4]
    k, v = cache_views(2, 4, 9, 32, torch.bfloat16, g)
    mask = torch.tensor([True, False, True, True, False, True, True, True, True]).view(1, 1, 1, 9)
    got = native_attention.attend_one(q, k, v, mask, 0.3)
    torch.testing.assert_close(got.double(), exact(q, k, v, mask, 0.3), atol=2**-7, rtol=2**-7)


@needs_kernel
def test_a_row_with_every_key_masked_is_zeros_as_pytorchs():
    """Not a decoding step's mask (which keeps the query's own key), but the function is public:
    a row that may attend to nothing gives 0, as F.scaled_dot_product_attention does, not 0/0;
    and an input that needs a gradient is refused (the kernel computes none)."""
    g = torch.Generator().manual_seed(8)
    q = torch.randn(2, 4, 1, 32, generator=g).bfloat16()
    k, v = cache_views(2, 2, 6, 32, torch.bfloat16, g)
    mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    mask[1] = False
    got = native_attention.attend_one(q, k, v, mask, None)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert bool((got[1] == 0).all()) and bool((want[1] == 0).all())
    torch.testing.assert_close(got[0].double(), exact(q[:1], k[:1], v[:1], None)[0], atol=2**-7, rtol=2**-7)
    assert native_attention.attend_one(q.clone().requires_grad_(), k, v, None, None) is None


@needs_kernel
def test_what_it_does_not_take_is_refused_not_read():
    """None (the caller's PyTorch attention) for anything the kernel would misread."""
    g = torch.Generator().manual_seed(6)
    q = torch.randn(1, 4, 1, 32, generator=g).bfloat16()
    k, v = cache_views(1, 2, 10, 32, torch.bfloat16, g)
    assert native_attention.attend_one(q, k, v, None, None) is not None
    assert native_attention.attend_one(q.float(), k.float(), v.float(), None, None) is None  # fp32, few keys
    assert native_attention.attend_one(q, k.float(), v, None, None) is None  # mixed dtypes
    assert native_attention.attend_one(q.half(), k.half(), v.half(), None, None) is None
    assert native_attention.attend_one(q[..., :24], k[..., :24], v[..., :24], None, None) is None  # hs not ×16
    assert native_attention.attend_one(q, k.transpose(-1, -2).contiguous().transpose(-1, -2), v, None, None) is None
    assert native_attention.attend_one(torch.randn(1, 3, 1, 32).bfloat16(), k, v, None, None) is None  # 3 heads, 2 groups
    assert native_attention.attend_one(torch.randn(1, 4, 2, 32).bfloat16(), k, v, None, None) is None  # two queries
    assert native_attention.attend_one(q, k, v, torch.ones(1, 1, 1, 9, dtype=torch.bool), None) is None
    assert native_attention.attend_one(q, k, v, torch.ones(1, 1, 1, 10), None) is None  # not bool
    assert native_attention.attend_one(q, k, v[:, :, :9], None, None) is None


@needs_kernel
def test_a_bf16_model_decodes_through_it_and_agrees_with_pytorchs_attention(monkeypatch):
    """A tiny Llama-shaped model in bf16, greedy: every one-query step calls the kernel (a spy
    counts), and the logits of the last step match the same model on PyTorch's attention."""
    from lmlab.nn import fastpath
    from tests.nn.test_fastpath import LLAMA, tiny_model

    torch.manual_seed(0)
    model = tiny_model(97, max_seq_len=64, **LLAMA).to(torch.bfloat16).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    native_attention.available()
    lib, calls = native_attention._lib, []

    class Spy:
        def lmlab_attend_one(self, *args):
            calls.append(args[8])  # S
            return lib.lmlab_attend_one(*args)

    def run():
        state = model.init_state(1, 16)
        with torch.inference_mode(), fastpath.unrolling():
            model(ids[:, :4], state)
            return model(ids[:, 4:], state)[0].float()

    monkeypatch.setattr(native_attention, "_lib", Spy())
    got = run()
    assert calls == [5] * model.config.n_layer
    monkeypatch.setattr(native_attention, "_lib", None)
    want = run()
    torch.testing.assert_close(got, want, atol=0.05, rtol=0.02)
