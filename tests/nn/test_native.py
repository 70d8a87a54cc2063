"""lmlab's own int8 kernel (lmlab/nn/kernels/int8_linear.cpp), against the formula in fp64."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from lmlab.nn import int8, int8_blocked, native
from lmlab.nn.quantize import QuantLinear

#: where the kernel can be built it must be: a machine with the compiler and the CPU for it
#: that silently fell back would test nothing here
BUILDABLE = native._cpu_ok() and shutil.which("g++") is not None
needs_kernel = pytest.mark.skipif(not BUILDABLE, reason="no g++ or no AVX-512 on this machine")


def reference(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """y = x (s ⊙ q)ᵀ + b written out in fp64."""
    y = x.double() @ (q.double() * s.double()[:, None]).T
    return y if b is None else y + b.double()


def kernel_calls(monkeypatch) -> list[int]:
    """The rows of x of each call into the compiled kernel, from here on (every path to it)."""
    assert native.available()
    calls, lib = [], native._lib

    class Spy:
        def lmlab_int8_linear(self, *args):  # (x, q, s, b, y, M, N, K, threads)
            calls.append(args[5])
            return lib.lmlab_int8_linear(*args)

    monkeypatch.setattr(native, "_lib", Spy())
    return calls


@needs_kernel
def test_the_kernel_builds_where_it_can():
    assert native.available()


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 9, 15, 16, 17])
@pytest.mark.parametrize("out_features", [1, 4, 16, 37, 300])  # 16 at a time, and the rest
@pytest.mark.parametrize("in_features", [16, 48, 896])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_is_the_formula(rows, out_features, in_features, bias):
    """Every shape the kernel's loops split differently (four output rows at a time for one
    input row, eight input rows a pass, the tails), within fp32 summation error of fp64."""
    g = torch.Generator().manual_seed(rows * 1000 + out_features + in_features)
    q = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, generator=g)
    s = torch.rand(out_features, generator=g) * 0.02 + 1e-3
    b = torch.randn(out_features, generator=g) if bias else None
    x = torch.randn(rows, in_features, generator=g)
    got = native.int8_linear(x, q, s, b)
    want = reference(x, q, s, b)
    assert got is not None and got.shape == (rows, out_features) and got.dtype == torch.float32
    # fp32 sums of in_features terms: |error| ≤ ~in_features · ulp · Σ|x q s|
    bound = 1e-6 * in_features * (x.double().abs() @ (q.double().abs() * s.double()[:, None]).T) + 1e-6
    assert ((got.double() - want).abs() <= bound).all()


@needs_kernel
def test_a_bf16_input_and_a_non_finite_row():
    """bf16 rows are read as fp32 (exactly); an infinity spoils its own row only."""
    torch.manual_seed(0)
    q = torch.randint(-127, 128, (40, 64), dtype=torch.int8)
    s = torch.rand(40) * 0.01
    x = torch.randn(3, 64).bfloat16()
    x[1, 3] = float("inf")
    got = native.int8_linear(x, q, s, None)
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[2]).all() and not torch.isfinite(got[1]).all()
    want = reference(x[[0, 2]].float(), q, s, None)
    assert torch.allclose(got[[0, 2]].double(), want, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_the_same_numbers_on_one_thread_and_on_two():
    """Each output is one thread's sum, in one order: the thread count changes nothing."""
    torch.manual_seed(1)
    q = torch.randint(-127, 128, (4096, 64), dtype=torch.int8)  # big enough to run in parallel
    s, x = torch.rand(4096), torch.randn(5, 64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.int8_linear(x, q, s, None)
        torch.set_num_threads(2)
        two = native.int8_linear(x, q, s, None)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_shapes_the_kernel_does_not_take_get_none():
    """A width that is not a multiple of 16, codes that are not int8 or not contiguous: None
    (the caller's other paths), never a wrong sum."""
    q = torch.zeros(8, 40, dtype=torch.int8)
    assert native.int8_linear(torch.randn(1, 40), q, torch.ones(8), None) is None
    assert native.int8_linear(torch.randn(1, 16), torch.zeros(8, 16), torch.ones(8), None) is None
    assert native.int8_linear(torch.randn(1, 16), torch.zeros(16, 8, dtype=torch.int8).T, torch.ones(8), None) is None


@needs_kernel
def test_an_int8_layer_decodes_on_it_from_its_codes_blocked_in_their_place(monkeypatch):
    """A QuantLinear's products of fewer rows than a prefill go to the kernel, whatever the
    weight's size, from its codes in the kernel's order, which replace the plain codes (held
    once: no oneDNN copy, no second copy) and read back as them exactly."""
    import pickle

    from lmlab.nn import quantize as Q

    monkeypatch.setattr(Q, "ONEDNN_MIN_WEIGHT", 0)  # (oneDNN would take any size)
    calls = kernel_calls(monkeypatch)
    torch.manual_seed(2)
    ql = QuantLinear.from_linear(nn.Linear(64, 301))
    q = ql.qweight.clone()
    for rows in (1, 32):
        x = torch.randn(rows, 64)
        with torch.inference_mode():
            got = ql(x)
        assert torch.allclose(got.double(), reference(x, q, ql.scale, ql.bias), rtol=1e-5, atol=1e-5)
    assert calls == [1, 32]
    held = ql.__dict__["_held"][0]
    assert isinstance(held, native.Blocked) and held.codes.untyped_storage().nbytes() == 301 * 64
    assert ql._buffers["qweight"].untyped_storage().nbytes() == 1  # the stand-in
    assert torch.equal(ql.state_dict()["qweight"], q) and torch.equal(pickle.loads(pickle.dumps(ql)).qweight, q)
    assert ql.__dict__["_held"][0] is held  # (saving and pickling read the codes without undoing it)
    assert torch.equal(ql.qweight, q) and ql.__dict__.get("_held") is None  # reading them puts them back
    ql.qweight[0, 0] = -ql.qweight[0, 0] - 1  # a write into them is the layer's: blocked anew
    x = torch.randn(1, 64)
    with torch.inference_mode():
        got = ql(x)
    assert torch.allclose(got.double(), reference(x, ql._codes(), ql.scale, ql.bias), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got.double(), reference(x, q, ql.scale, ql.bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 3, 15, 16, 17, 32, 300, 301])
@pytest.mark.parametrize("cols", [16, 48])
def test_the_blocked_order_is_16_rows_a_line_of_four_inputs(rows, cols):
    q = torch.randint(-127, 128, (rows, cols), dtype=torch.int8)
    b = native.block(q)
    assert b.codes.shape == (rows * cols,) and (b.rows, b.cols) == (rows, cols)
    assert torch.equal(b.dense(), q)
    buf = torch.empty(rows * cols + 5, dtype=torch.int8)
    into = native.block(q, out=buf[5:])  # written where it is told (a stretch of a larger buffer)
    assert into.codes.data_ptr() == buf[5:].data_ptr() and torch.equal(buf[5:], b.codes)
    for i in range(0, rows, 16):  # row ranges, across the N mod 16 plain rows at the end
        assert torch.equal(b.dense_rows(i, min(rows, i + 16)), q[i : i + 16])
        assert torch.equal(b.dense_rows(i, rows), q[i:])
    n16 = rows - rows % 16
    for n in range(rows):  # where the kernel reads code (n, k): by hand
        for k in (0, 1, 3, 4, cols - 1, 17 % cols, 30 % cols):
            at = (n // 16) * 16 * cols + (k // 4) * 64 + (k % 4) * 16 + n % 16 if n < n16 else n * cols + k
            assert b.codes[at] == q[n, k]


def test_no_compiler_means_no_kernel_and_no_error(monkeypatch, tmp_path):
    """A compiler that fails (or LMLAB_NATIVE=0): available() is False, int8 layers take
    PyTorch's kernels, and nothing is raised."""
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # exits 1
    assert not native.available()
    assert native.int8_linear(torch.randn(1, 16), torch.zeros(4, 16, dtype=torch.int8), torch.ones(4), None) is None
    ql = QuantLinear.from_linear(nn.Linear(16, 4))
    with torch.inference_mode():
        assert ql(torch.randn(1, 16)).shape == (1, 4)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.delenv("CXX")
    monkeypatch.setenv("LMLAB_NATIVE", "0")
    assert not native.available()


def test_sizes_that_do_not_fit_together_get_none_not_a_read_past_the_end():
    """The kernel reads raw memory: every size is checked before (a review found a wrong-width
    input read past the codes: garbage, or a segfault)."""
    q, s = torch.zeros(8, 16, dtype=torch.int8), torch.ones(8)
    x = torch.randn(1, 16)
    assert native.int8_linear(torch.randn(1, 32), q, s, None) is None  # x wider than q
    assert native.int8_linear(x, torch.zeros(1 << 12, 16, dtype=torch.int8), s, None) is None  # too few scales
    assert native.int8_linear(x, q, s, torch.ones(3)) is None  # a bias of the wrong length
    assert native.int8_linear(x[0], q, s, None) is None  # not a matrix
    assert native.int8_linear(torch.empty(1, 16, device="meta"), q, s, None) is None
    assert native.int8_linear(torch.empty(0, 16), q, s, None) is None


def test_a_wrong_width_input_is_the_usual_error_and_a_gradient_flows():
    """Through a QuantLinear: an input of the wrong width raises (as nn.Linear does), and an
    input that needs a gradient gets the formula's, not a result detached from it."""
    torch.manual_seed(4)
    lin = nn.Linear(64, 48)
    ql = QuantLinear.from_linear(lin)
    with pytest.raises(RuntimeError):
        ql(torch.randn(1, 128))
    x = torch.randn(4, 64, requires_grad=True)
    ql(x).pow(2).sum().backward()
    w = ql.dequantize().double()
    xd = x.detach().double().requires_grad_()
    torch.nn.functional.linear(xd, w, ql.bias.double()).pow(2).sum().backward()
    assert torch.allclose(x.grad.double(), xd.grad, rtol=1e-4, atol=1e-4)


@needs_kernel
def test_rows_past_the_kernels_take_the_dequantized_product_and_no_copy_is_made(monkeypatch):
    """Up to NATIVE_MAX_ROWS rows: the kernel; more: Ŵ in bf16 for the call (faster there:
    the kernel reads the codes once per 8 rows), never oneDNN's copy, which would take the
    codes from the kernel. An output-layer-sized weight: the kernel up to 8 rows unless its
    codes were blocked for it first (decoding), then up to BLOCKED_MAX_ROWS_BIG rows, and more
    by Ŵ in bf16 made from the blocked codes a chunk of rows at a time."""
    from lmlab.nn import quantize as Q

    calls = kernel_calls(monkeypatch)
    torch.manual_seed(5)
    ql = QuantLinear.from_linear(nn.Linear(64, 300))
    for rows in (Q.NATIVE_MAX_ROWS, Q.NATIVE_MAX_ROWS + 1, 200):
        x = torch.randn(rows, 64)
        with torch.inference_mode():
            got = ql(x)
        want = reference(x, ql.qweight, ql.scale, ql.bias)
        assert (got.double() - want).abs().max() <= 2e-2 * want.abs().max()  # bf16's rounding at most
    assert calls == [Q.NATIVE_MAX_ROWS] and ql.__dict__.get("_held") is None
    monkeypatch.setattr(Q, "DEQUANTIZE_MAX", 64 * 300 - 1)  # as if an output layer
    calls.clear()
    with torch.inference_mode():
        ql(torch.randn(Q.NATIVE_MAX_ROWS_BIG + 1, 64))  # first more rows: not on the kernel
        ql(torch.randn(Q.NATIVE_MAX_ROWS_BIG, 64))
    assert calls == [Q.NATIVE_MAX_ROWS_BIG] or (int8.exact_sums() and not calls)  # (or oneDNN's copy took the codes)
    # blocked first (decoding): then up to BLOCKED_MAX_ROWS_BIG rows on the kernel, more by Ŵ
    # in bf16 made from the blocked codes a chunk of rows of W at a time (no copy in their place)
    monkeypatch.setattr(int8_blocked, "BLOCKED_CHUNK", 32)  # several chunks, the last with the N mod 16 tail
    ql = QuantLinear.from_linear(nn.Linear(64, 301))
    q = ql.qweight.clone()
    monkeypatch.setattr(Q, "DEQUANTIZE_MAX", 64 * 301 - 1)
    calls.clear()
    for rows in (1, Q.NATIVE_MAX_ROWS_BIG + 1, Q.BLOCKED_MAX_ROWS_BIG, Q.BLOCKED_MAX_ROWS_BIG + 1, 200):
        x = torch.randn(rows, 64)
        with torch.inference_mode():
            got = ql(x)
        want = reference(x, q, ql.scale, ql.bias)
        if rows <= Q.BLOCKED_MAX_ROWS_BIG:
            assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)
        else:
            assert (got.double() - want).abs().max() <= 2e-2 * want.abs().max()  # bf16's rounding at most
    assert calls == [1, Q.NATIVE_MAX_ROWS_BIG + 1, Q.BLOCKED_MAX_ROWS_BIG]
    assert isinstance(ql.__dict__["_held"][0], native.Blocked)


@needs_kernel
def test_built_without_a_home_and_with_a_compiler_given_with_flags(monkeypatch, tmp_path):
    """No home directory (an arbitrary uid in a container) and no LMLAB_CACHE: a folder under
    the temporary directory; CXX may carry arguments ("ccache g++", "g++ -g0")."""
    from pathlib import Path

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.delenv("LMLAB_CACHE", raising=False)
    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(native.tempfile, "tempdir", None)  # (gettempdir reads TMPDIR again)
    monkeypatch.setenv("CXX", "g++ -g0")
    assert native.available()
    assert list((tmp_path / f"lmlab-kernels-{__import__('os').getuid()}").glob("int8_linear-*.so"))
    q = torch.randint(-127, 128, (5, 32), dtype=torch.int8)
    x, s = torch.randn(2, 32), torch.rand(5)
    assert torch.allclose(native.int8_linear(x, q, s, None).double(), reference(x, q, s, None), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_the_kernel_bound_to_a_layer_follows_what_is_assigned_and_lets_go():
    """After its first product a layer calls the kernel bound to its blocked codes, scales and
    bias (few checks a call); codes, scales or a bias assigned anew, or scales written in
    place, give the new products; reading the codes back drops the binding and its memory."""
    import weakref

    torch.manual_seed(7)
    ql = QuantLinear.from_linear(nn.Linear(64, 40))

    def check(x: torch.Tensor) -> None:
        with torch.inference_mode():
            got = ql(x)
        want = reference(x, ql._codes(), ql.scale, ql.bias)
        assert got.dtype == x.dtype and torch.allclose(got.double(), want, rtol=1e-2 if x.dtype != torch.float32 else 1e-5, atol=1e-4)

    x = torch.randn(3, 1, 64)
    check(x)
    assert ql.__dict__.get("_bound") is not None
    ql.scale.mul_(2.0)  # in place: the bound kernel reads it
    check(x)
    ql.scale = torch.rand(40)  # a new tensor
    check(x)
    ql.bias = torch.randn(40)
    check(x)
    ql.qweight = torch.randint(-127, 128, (40, 64), dtype=torch.int8)  # new codes (not blocked yet)
    check(x)
    check(x.to(torch.bfloat16))  # other inputs take the checked path
    check(torch.randn(64, 3).T)  # (not contiguous)
    blocked = weakref.ref(ql.__dict__["_held"][0].codes)
    ql.qweight  # noqa: B018 - reading the codes puts them back
    assert ql.__dict__.get("_bound") is None and blocked() is None
    check(x)


@needs_kernel
@pytest.mark.parametrize("default", [torch.bfloat16, torch.float64])
def test_the_bound_kernel_writes_fp32_whatever_the_default_dtype(default):
    torch.manual_seed(8)
    ql = QuantLinear.from_linear(nn.Linear(64, 40))
    x = torch.randn(2, 64)
    with torch.inference_mode():
        ql(x)  # (binds)
        try:
            torch.set_default_dtype(default)
            got = ql(x)
        finally:
            torch.set_default_dtype(torch.float32)
    assert ql.__dict__.get("_bound") is not None and got.dtype == torch.float32
    assert torch.allclose(got.double(), reference(x, ql._codes(), ql.scale, ql.bias), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_storage_swapped_under_a_bound_tensor_and_a_bias_made_a_parameter_are_followed():
    torch.manual_seed(9)
    ql = QuantLinear.from_linear(nn.Linear(64, 40))
    x = torch.randn(2, 64)

    def check() -> None:
        with torch.inference_mode():
            got = ql(x)
        assert torch.allclose(got.double(), reference(x, ql._codes(), ql.scale, ql.bias), rtol=1e-5, atol=1e-5)

    check()
    ql.scale.data = ql.scale.data * 2  # new storage under the same tensor: the old one is freed
    check()
    ql.bias.data = torch.randn(40, dtype=torch.float64)  # not fp32 any more: the checked path
    check()
    ql.bias = nn.Parameter(torch.randn(40))  # out of the buffers
    check()


@needs_kernel
def test_codes_written_through_a_reference_taken_before_decoding_are_the_layers():
    """``w = layer.qweight`` taken before the codes were blocked in their place: a write into
    w is the layer's (``__getattr__``'s promise), read at the next call."""
    torch.manual_seed(10)
    ql = QuantLinear.from_linear(nn.Linear(64, 40))
    w = ql.qweight
    x = torch.randn(1, 64)
    with torch.inference_mode():
        ql(x)
    assert isinstance(ql.__dict__["_held"][0], native.Blocked)
    w[:5] = -w[:5]
    with torch.inference_mode():
        got = ql(x)
    assert torch.allclose(got.double(), reference(x, w, ql.scale, ql.bias), rtol=1e-5, atol=1e-5)
    assert torch.equal(ql.state_dict()["qweight"], w)
    assert ql.qweight is w  # (the codes put back are the very tensor held outside)


@needs_kernel
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_a_quantized_model_takes_the_unrolled_step_with_the_module_paths_tokens(tmp_path, method):
    """int8/int4 models decode on the unrolled one-token step (no module calls), as oneDNN
    models do, and give the module path's tokens (``fast_decoding = False`` turns it off)."""
    from helpers import tiny_checkpoint

    import lmlab
    from lmlab.models import transformer

    ckpt = tiny_checkpoint(
        tmp_path / "ckpt", d_model=64, d_ff=128, n_head=4, n_kv_head=2, pos="rope", norm="rmsnorm", gated_mlp=True
    )
    lm = lmlab.load(ckpt, quantize=method)
    steps = []
    real = transformer.Block.step
    transformer.Block.step = lambda self, *a: steps.append(1) or real(self, *a)
    try:
        fast = lm.generate("hello", max_new_tokens=12, do_sample=False)
        unrolled = len(steps)
        lm.module.fast_decoding = False
        plain = lm.generate("hello", max_new_tokens=12, do_sample=False)
    finally:
        transformer.Block.step = real
    assert unrolled > 0 and len(steps) == unrolled  # the second run took the module path
    assert fast == plain
