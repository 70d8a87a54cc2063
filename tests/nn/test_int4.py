"""Group-wise int4 weights (lmlab.nn.int4): the codes against the formula written out here,
the kernel's products against the dequantized formula in fp64, and a model quantized to
int4 decoding from the command line."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import run_lmlab, tiny_checkpoint
from torch import nn

import lmlab
from lmlab.errors import LmlabError
from lmlab.nn import int4
from lmlab.nn.int4 import Int4Linear


def reference_dequantized(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ŵ and each weight's group scale, from the formula: s = (max − min)/15 and z = min + 8s
    rounded to bf16, q = clamp(round((w − z)/s) + 8, 0, 15), Ŵ = (q − 8)s + z."""
    rows, cols = w.shape
    g = w.double().reshape(rows, -1, group_size)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    s = ((hi - lo) / 15).clamp(min=1e-6).to(torch.bfloat16).double()
    z = (lo + 8 * s).to(torch.bfloat16).double()
    q = (torch.round((g - z) / s) + 8).clamp(0, 15)
    return ((q - 8) * s + z).reshape(rows, cols), s.expand_as(g).reshape(rows, cols)


@pytest.mark.parametrize("out_features", [48, 300])  # 300: not a multiple of 16 (rows padded for the kernel)
@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("bias", [True, False])
def test_int4_linear_is_the_group_wise_formula(out_features, group_size, bias):
    torch.manual_seed(0)
    lin = nn.Linear(128, out_features, bias=bias)
    w_hat, s = reference_dequantized(lin.weight.detach(), group_size)
    assert ((w_hat - lin.weight.detach().double()).abs() <= s / 2 + 1e-3 * s + 2**-8 * s * 8).all()
    layer = Int4Linear.from_linear(lin, group_size)
    # the layer's Ŵ: the formula's (read back through the kernel: rounded to bf16)
    torch.testing.assert_close(layer.dequantize().double(), w_hat, atol=0, rtol=2**-8)
    x = torch.randn(5, 3, 128)
    with torch.inference_mode():
        got = layer(x).double()
    assert got.shape == (5, 3, out_features) and layer(x).dtype == x.dtype
    b = lin.bias.detach().double() if bias else 0
    want = x.double() @ w_hat.T + b
    # bf16 activations and outputs: ~2⁻⁸ relative, on sums of 128 products
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()


def test_int4_kernel_used_and_formula_path_agree(monkeypatch):
    """The same layer with and without PyTorch's int4 kernel gives the same products (up to
    bf16 rounding): the fallback is the formula."""
    if not int4.kernel_works():
        pytest.skip("no CPU int4 kernel in this torch build")
    torch.manual_seed(1)
    lin = nn.Linear(64, 80)
    fast = Int4Linear.from_linear(lin, 32)
    assert fast.packed is not None
    monkeypatch.setattr(int4, "_KERNEL_OK", False)
    slow = Int4Linear.from_linear(lin, 32)
    assert slow.packed is None and slow.codes.dtype == torch.int8
    x = torch.randn(4, 64)
    with torch.inference_mode():
        a, b = fast(x).double(), slow(x).double()
    assert (a - b).abs().max() <= 2e-2 * b.abs().max()


def test_int4_bad_group_sizes_are_one_line_errors():
    lin = nn.Linear(96, 16)
    with pytest.raises(LmlabError, match="int4 groups are 32, 64, 128, 256"):
        Int4Linear.from_linear(lin, 48)
    with pytest.raises(LmlabError, match="not a multiple of --group-size 64"):
        Int4Linear.from_linear(lin, 64)


def test_load_quantize_int4_generates_and_the_cli_agrees(tmp_path):
    from lmlab.messages import LmlabWarning
    from lmlab.nn.quantize import QuantLinear

    ckpt = tiny_checkpoint(tmp_path / "ckpt", d_model=64)  # its MLPs' down layers have 176 inputs
    with pytest.warns(LmlabWarning, match=r"2 linear layer\(s\) have a width that groups of 32 do not divide: they are int8 \(one scale a row\)$"):
        q4 = lmlab.load(ckpt, quantize="int4", group_size=32)
    assert any(isinstance(m, Int4Linear) for m in q4.module.modules())
    assert isinstance(q4.module.blocks[0].mlp.down, QuantLinear)
    assert not any(type(m) is nn.Linear for m in q4.module.modules())
    # reference: the float model with each layer's weight set to its Ŵ (the formula, in fp32)
    ref = lmlab.load(ckpt).module
    for name, m in q4.module.named_modules():
        if isinstance(m, (Int4Linear, QuantLinear)):  # a new Parameter: a tied output layer's own
            ref.get_submodule(name).weight = nn.Parameter(m.dequantize())
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.inference_mode():
        a, b = q4.module(ids)[0], ref(ids)[0]
    assert ((a - b).pow(2).mean().sqrt() / b.std()) < 0.03  # bf16 activations through the kernel
    expected = q4.generate("To be", max_new_tokens=6, temperature=0)
    run = ["generate", str(ckpt), "--prompt", "To be", "--max-new-tokens", "6", "--temperature", "0"]
    ok = run_lmlab(*run, "--quantize", "int4", "--group-size", "32", timeout=120)
    assert ok.stdout == expected + "\n"
    bad = run_lmlab(*run, "--quantize", "int8", "--group-size", "32", check_rc=2, timeout=120)
    assert "group_size (--group-size) is for quantize='int4'" in bad.stderr and "Traceback" not in bad.stderr
    for bad_size in (0, 48):  # refused before the checkpoint is read
        with pytest.raises(LmlabError, match="int4 groups are 32, 64, 128, 256"):
            lmlab.load(ckpt, quantize="int4", group_size=bad_size)
    with pytest.raises(LmlabError, match="already quantized"):
        lmlab.nn.quantize.quantize_model(q4.module, "int8")


def test_int4_matches_f_linear_of_its_dequantized_weight_in_fp64():
    """The kernel against F.linear on the layer's own Ŵ (fp64), a batch of rows of different sizes."""
    torch.manual_seed(2)
    layer = Int4Linear.from_linear(nn.Linear(256, 64, bias=False), 64)
    x = torch.randn(7, 256) * torch.logspace(0, 2, 7)[:, None]
    with torch.inference_mode():
        got = layer(x).double()
    want = F.linear(x.double(), layer.dequantize().double())
    assert ((got - want).abs() <= 1e-2 * want.abs().amax(1, keepdim=True) + 1e-6).all()
