"""lmlab's own bf16 and fp32 kernels (lmlab/nn/kernels/bf16_linear.cpp, f32_linear.cpp), against
the formula in fp64, and the layers that decode on them."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmlab.nn import fastpath, native_packed
from lmlab.nn.fastpath import FastLinear

#: where the kernel can be built it must be: a machine with the compiler and the CPU for it
#: that silently fell back would test nothing here
BUILDABLE = native_packed._cpu_ok(torch.bfloat16) and shutil.which("g++") is not None
needs_kernel = pytest.mark.skipif(not BUILDABLE, reason="no g++ or no AVX-512 BF16 on this machine")
BUILDABLE_F32 = native_packed._cpu_ok(torch.float32) and shutil.which("g++") is not None
needs_f32 = pytest.mark.skipif(not BUILDABLE_F32, reason="no g++ or no AVX-512 on this machine")
DTYPES = [pytest.param(torch.bfloat16, marks=needs_kernel), pytest.param(torch.float32, marks=needs_f32)]


def within_rounding(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """got = fp32 sums of x Wᵀ + b (bf16: rounded to bf16 once): within fp32 summation error
    (K·2⁻²⁴ of Σ|x||w|) of the exact value computed in fp64, plus one bf16 rounding (2⁻⁸
    relative) in bf16."""
    exact = x.double() @ w.double().T + (0 if b is None else b.double())
    sums = x.double().abs() @ w.double().abs().T + (0 if b is None else b.double().abs())
    tol = sums * (x.shape[-1] + 2) * 2**-24 + 1e-30 + (exact.abs() * 2**-8 if w.dtype == torch.bfloat16 else 0)
    assert got.dtype == w.dtype and got.shape == exact.shape
    assert bool(((got.double() - exact).abs() <= tol).all()), float(((got.double() - exact).abs() - tol).max())


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_kernel_builds_where_it_can(dtype):
    assert native_packed.available(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 7, 8, 9, 16, 17, 40])
@pytest.mark.parametrize("out_features", [1, 15, 16, 17, 48, 300])  # blocks of 16, in pairs, and the rest
@pytest.mark.parametrize("in_features", [2, 6, 64, 898])
@pytest.mark.parametrize("bias", [False, True])
def test_the_product_is_the_formula(dtype, rows, out_features, in_features, bias):
    """Every shape the kernel's loops split differently: one row of x (four sums a block), rows
    in groups of eight, blocks two at a time and a last one alone, a last block of fewer than
    16 rows, inputs not a multiple of the unrolling."""
    g = torch.Generator().manual_seed(rows * 1000 + out_features * 10 + in_features)
    w = torch.randn(out_features, in_features, generator=g).to(dtype)
    b = torch.randn(out_features, generator=g).to(dtype) if bias else None
    x = torch.randn(rows, in_features, generator=g).to(dtype)
    packed = native_packed.pack(w)
    assert packed is not None
    within_rounding(packed(x, b), x, w, b)


def plain_kernel(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, threads: int = 2) -> torch.Tensor:
    """lmlab_bf16_plain itself (no fallback): x Wᵀ + b with W plain."""
    lib = native_packed._libs[torch.bfloat16]
    y = torch.empty(x.shape[0], w.shape[0], dtype=torch.bfloat16)
    rc = lib.lmlab_bf16_plain(x.data_ptr(), w.data_ptr(), None if b is None else b.data_ptr(), y.data_ptr(),
                              x.shape[0], w.shape[0], w.shape[1], threads)  # fmt: skip
    assert rc == 0
    return y


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 9, 17])
@pytest.mark.parametrize("out_features", [1, 17, 300])
@pytest.mark.parametrize("in_features", [1, 31, 33, 65, 129, 898])
@pytest.mark.parametrize("bias", [False, True])
def test_the_plain_product_is_the_formula(rows, out_features, in_features, bias):
    """W plain (a tied output layer's): every split of its loops — one row of x (four chains),
    two to four (two), more (one), past 8 rows (groups of 8), a last line of fewer than 32
    numbers, a last group of fewer than 16 rows of W."""
    assert native_packed.available(torch.bfloat16)
    g = torch.Generator().manual_seed(rows * 1000 + out_features * 10 + in_features)
    w = torch.randn(out_features, in_features, generator=g).bfloat16()
    b = torch.randn(out_features, generator=g).bfloat16() if bias else None
    x = torch.randn(rows, in_features, generator=g).bfloat16()
    within_rounding(plain_kernel(x, w, b), x, w, b)
    within_rounding(native_packed.plain_product(x, w, b), x, w, b)
    for t in (1, 3):
        assert torch.equal(plain_kernel(x, w, b, threads=t), plain_kernel(x, w, b))


def test_the_plain_product_without_the_kernel_is_pytorchs(monkeypatch):
    """Where the kernel is not built: torch.mv for one row, F.linear for more — the same
    numbers to bf16's rounding; an fp32 bias cast to bf16 either way."""
    monkeypatch.setattr(native_packed, "_libs", {torch.bfloat16: None})
    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 96, generator=g).bfloat16()
    b = torch.randn(40, generator=g)
    for rows in (1, 3):
        x = torch.randn(2, rows, 96, generator=g).bfloat16()[:1]
        got = native_packed.plain_product(x, w, b)
        assert got.shape == (1, rows, 40) and got.dtype == torch.bfloat16
        within_rounding(got[0], x[0], w, b.bfloat16())
    assert not native_packed.plain_serves(torch.zeros(2, 96, dtype=torch.bfloat16), w)
    assert native_packed.plain_serves(torch.zeros(1, 96, dtype=torch.bfloat16), w)


@needs_kernel
def test_the_packed_order_by_hand_and_back():
    """W[n, k] sits at block n//16, line k//2, lane n%16, half k%2 (the kernel's reading order);
    to_dense gives W back bit for bit, rows of the padded last block dropped."""
    w = torch.randn(37, 10).bfloat16()
    p = native_packed.pack(w)
    assert p.data.numel() == 48 * 10 and p.shape == (37, 10)
    for n in range(37):
        for k in range(10):
            assert p.data[(n // 16) * 16 * 10 + (k // 2) * 32 + (n % 16) * 2 + k % 2] == w[n, k]
    assert bool((p.data.view(3, 5, 16, 2)[2, :, 5:] == 0).all())  # the padding: zeros
    assert torch.equal(p.to_dense(), w)
    w2 = torch.randn(16, 2).bfloat16()  # K = 2: the order is W's own; still a copy
    p2 = native_packed.pack(w2)
    assert p2.data.data_ptr() != w2.data_ptr() and torch.equal(p2.to_dense(), w2)


@needs_f32
def test_the_fp32_order_by_hand_and_back():
    """fp32: W[n, k] at block n//16, line k, lane n%16; to_dense gives W back bit for bit."""
    w = torch.randn(21, 5)
    p = native_packed.pack(w)
    assert p.data.numel() == 32 * 5 and p.data.dtype == torch.float32
    for n in range(21):
        for k in range(5):
            assert p.data[(n // 16) * 16 * 5 + k * 16 + n % 16] == w[n, k]
    assert torch.equal(p.to_dense(), w)
    w1 = torch.randn(16, 1)  # K = 1: W's own order; still a copy
    assert native_packed.pack(w1).data.data_ptr() != w1.data_ptr()


@needs_kernel
def test_the_result_does_not_depend_on_the_threads():
    """Each block's sums are one thread's: 1 or 2 threads give the same bits (deterministic)."""
    w, x = torch.randn(300, 128).bfloat16(), torch.randn(3, 128).bfloat16()
    p, threads = native_packed.pack(w), torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = p(x, None)
        torch.set_num_threads(2)
        two = p(x, None)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@needs_kernel
def test_what_the_kernel_cannot_take_is_refused_not_read():
    """It reads raw memory: a wrong width, dtype or bias is None (the caller's other path), an
    odd K or a non-bf16 W is not packed."""
    w = torch.randn(20, 8).bfloat16()
    p = native_packed.pack(w)
    assert p(torch.randn(1, 16).bfloat16(), None) is None  # wider than W
    assert p(torch.randn(1, 8), None) is None  # fp32
    assert p(torch.randn(0, 8).bfloat16(), None) is None
    assert p(torch.randn(1, 8).bfloat16(), torch.randn(20)) is None  # an fp32 bias (the layer casts it first)
    assert p(torch.randn(1, 8).bfloat16(), torch.randn(19).bfloat16()) is None
    assert native_packed.pack(torch.randn(4, 7).bfloat16()) is None  # K odd
    assert native_packed.pack(torch.randn(4, 8).half()) is None  # fp16: no kernel
    assert native_packed.pack(torch.randn(8).bfloat16()) is None


def test_no_compiler_means_no_kernel_and_no_error(monkeypatch, tmp_path):
    """A compiler that fails (or LMLAB_NATIVE=0): available() is False, nothing is packed, and
    a bf16 layer decodes on oneDNN's kernel — the same numbers, within rounding."""
    monkeypatch.setattr(native_packed, "_libs", {})
    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # exits 1
    assert not native_packed.available() and native_packed.pack(torch.randn(4, 8).bfloat16()) is None
    assert not native_packed.available(torch.float32) and native_packed.pack(torch.randn(4, 8)) is None
    lin = nn.Linear(64, 40).bfloat16()
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    fastpath.enable(lin)
    lin._replaces = True
    x = torch.randn(2, 64).bfloat16()
    with torch.no_grad():
        got = lin(x)
    assert lin._held is not None and type(lin._held[0]) is not native_packed.Packed
    torch.testing.assert_close(got.float(), F.linear(x.float(), w.float(), b.float()), atol=0.05, rtol=0.02)
    monkeypatch.setattr(native_packed, "_libs", {})
    monkeypatch.delenv("CXX")
    monkeypatch.setenv("LMLAB_NATIVE", "0")
    assert not native_packed.available() and not native_packed.available(torch.float32)


def decoding_layer(n_in: int, n_out: int, dtype: torch.dtype, seed: int) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    """An nn.Linear on the decoding path whose packed copy may replace W (as ``prepare`` marks a
    layer's own weight), with clones of W and b taken before anything packed them."""
    torch.manual_seed(seed)
    lin = nn.Linear(n_in, n_out).to(dtype)
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    fastpath.enable(lin)
    lin._replaces = True
    return lin, w0, b0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 8, 600])
def test_a_decoding_layer_is_held_in_the_kernels_order_and_read_back_exactly(dtype, rows, monkeypatch):
    """The packed copy replaces W (a stand-in of one number); the product is the formula's (600
    rows: past PACKED_MAX_ROWS, W made plain for the product); W comes back bit for bit through
    ``state_dict`` and ``layer.weight``. (fp32: where MKL is not the rule for few rows, i.e.
    off Intel; forced here.)"""
    monkeypatch.setattr(fastpath, "_MKL_ROWS", False)
    lin, w0, b0 = decoding_layer(96, 50, dtype, seed=3)
    x = torch.randn(rows, 96).to(dtype)
    with torch.inference_mode():
        got = lin(x)
        again = lin(x)  # the stand-in path
    assert type(lin._held[0]) is native_packed.Packed and lin._parameters["weight"].data_ptr() == lin._held[2].data_ptr()
    within_rounding(got, x, w0, b0)
    assert torch.equal(got, again)
    assert torch.equal(lin.state_dict()["weight"], w0) and torch.equal(lin.weight, w0)


@needs_kernel
def test_a_bias_of_another_dtype_is_cast_not_refused():
    """A bf16 W with an fp32 bias (a hand-built layer; oneDNN took it): the layer casts the bias
    to bf16 for the kernel — the formula within bf16 rounding, not an error, and no plain copy
    of W made per call."""
    torch.manual_seed(4)
    lin = nn.Linear(32, 20).bfloat16()
    lin.bias = nn.Parameter(torch.randn(20))
    w0 = lin.weight.detach().clone()
    fastpath.enable(lin)
    lin._replaces = True
    x = torch.randn(3, 32).bfloat16()
    with torch.inference_mode():
        lin(x)
        calls = []
        real = native_packed.Packed.to_dense
        native_packed.Packed.to_dense = lambda self: calls.append(1) or real(self)
        try:
            got = lin(x)
        finally:
            native_packed.Packed.to_dense = real
    assert not calls
    torch.testing.assert_close(got.float(), F.linear(x.float(), w0.float(), lin.bias.float()), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_model_decodes_the_same_on_either_kernel(dtype, monkeypatch):
    """A tiny Llama-shaped model in bf16 or fp32: logits with lmlab's kernels against the
    previous path (oneDNN's), and near the fp32 model read through plain PyTorch."""
    from tests.nn.test_fastpath import LLAMA, tiny_model

    monkeypatch.setattr(fastpath, "_MKL_ROWS", False)  # fp32 on Intel stays on MKL: force the kernel here
    torch.manual_seed(0)
    model32 = tiny_model(97, max_seq_len=64, **LLAMA)
    ids = torch.tensor([[5, 6, 7, 8]])
    outs = {}
    for on in (True, False):
        model = tiny_model(97, max_seq_len=64, **LLAMA)
        model.load_state_dict(model32.state_dict())
        model = model.to(dtype).eval()
        if not on:
            monkeypatch.setitem(native_packed._libs, dtype, None)
        fastpath.prepare(model)
        with torch.inference_mode():
            model(ids)  # packs
            outs[on] = model(ids)[0].float()
        held = [type(m._held[0]) for m in model.modules() if isinstance(m, FastLinear) and m._held is not None]
        assert all((t is native_packed.Packed) == on for t in held) and (held or not on)
    with torch.inference_mode():
        ref = model32(ids)[0]
    tol = dict(atol=0.08, rtol=0.05) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[True], outs[False], **tol)
    torch.testing.assert_close(outs[True], ref, **(dict(atol=0.15, rtol=0.1) if dtype == torch.bfloat16 else tol))


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_packed_layer_never_multiplies_its_stand_in(dtype, monkeypatch):
    """After W was replaced: an input of another dtype (CPU autocast) gets the plain W back, and
    a forward that reached the slow path just as another thread packed (forced here by calling
    it directly) takes the packed copy — the formula both times, never the NaN stand-in (a
    review found fp32 layers multiplying it)."""
    monkeypatch.setattr(fastpath, "_MKL_ROWS", False)
    lin, w0, b0 = decoding_layer(64, 40, dtype, seed=5)
    x = torch.randn(2, 64).to(dtype)
    with torch.no_grad():
        lin(x)
        assert lin._held is not None and lin._held[2] is not None  # W stands in
        raced = lin._onednn_forward(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cast = lin(torch.randn(2, 64, dtype=torch.float16 if dtype == torch.bfloat16 else torch.float32))
    within_rounding(raced, x, w0, b0)
    assert bool(torch.isfinite(cast).all())
