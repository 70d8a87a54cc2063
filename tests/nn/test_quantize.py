"""Weight-only int8 quantization (lmlab.nn.quantize).

References: hand-computed scales and codes; the dequantize-and-multiply formula written
out in the test with float math; the float model's logits and greedy tokens.
Tolerance for a quantized model's logits: rms error ≤ 3% of the logits' standard
deviation and ≥ 90% of the argmaxes unchanged, on small random models with weights of
std 0.1 (measured: 1.7-2.0%, 96-100%; each weight is off by at most half a quantization
step, s_o/2 = max_i|W_oi|/254). GPT-2 124M with random weights: 2.3%.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import run_lmlab, tiny_checkpoint, tiny_model
from torch import nn

import lmlab
from lmlab.errors import LmlabError
from lmlab.nn.quantize import QuantLinear, _int8_kernel_works, quantize_model, quantize_rows

LLAMA = dict(pos="rope", norm="rmsnorm", activation="silu", gated_mlp=True, n_kv_head=2)


def test_quantize_rows_by_hand():
    w = torch.tensor([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0], [2.54, 1.27, -0.01]])
    q, s = quantize_rows(w)
    # row 0: s = 1/127, q = round(127·w) = [63.5 -> 64 (half to even), -127, 31.75 -> 32]
    # row 1: all zero -> s = 1, q = 0;  row 2: s = 0.02, q = [127, 63.5 -> 64, -0.5 -> -0]
    torch.testing.assert_close(s, torch.tensor([1 / 127, 1.0, 0.02]))
    assert q.dtype == torch.int8
    assert q.tolist() == [[64, -127, 32], [0, 0, 0], [127, 64, 0]]


def test_quantization_error_is_at_most_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(64, 48) * torch.rand(64, 1) * 3  # rows of different ranges
    q, s = quantize_rows(w)
    err = (q.float() * s[:, None] - w).abs()
    assert (err <= s[:, None] / 2 + 1e-7).all()
    assert q.abs().max() == 127


@pytest.mark.parametrize("block", [4096, 5])  # 5: W's 24 rows quantized in blocks (the last one short)
@pytest.mark.parametrize("in_features", [64, 40])  # 40: not a multiple of 16, the formula path
@pytest.mark.parametrize("bias", [True, False])
def test_quant_linear_equals_dequantized_formula(in_features, bias, block, monkeypatch):
    import lmlab.nn.quantize as quantize

    monkeypatch.setattr(quantize, "QUANTIZE_ROWS", block)
    torch.manual_seed(0)
    lin = nn.Linear(in_features, 24, bias=bias)
    ql = QuantLinear.from_linear(lin)
    assert ql.fast == (in_features % 16 == 0)
    x = torch.randn(3, 5, in_features)
    with torch.inference_mode():
        got = ql(x)
    s = lin.weight.detach().abs().amax(1) / 127  # written out: W ≈ s ⊙ round(W / s)
    w_hat = torch.round(lin.weight.detach() / s[:, None]) * s[:, None]
    want = F.linear(x, w_hat, None if lin.bias is None else lin.bias.detach())
    assert got.shape == want.shape and got.dtype == x.dtype
    # the kernel takes bf16 activations and returns bf16 sums: ~0.4% relative rounding
    torch.testing.assert_close(got, want, atol=2e-2 * want.abs().max().item(), rtol=1e-2)
    torch.testing.assert_close(ql.dequantize(), w_hat)


def torch_int8_kernels(monkeypatch) -> None:
    """Without lmlab's own kernel (tests/nn/test_native.py): PyTorch's and oneDNN's, as on a
    machine without a C++ compiler or AVX-512."""
    from lmlab.nn import native

    monkeypatch.setattr(native, "available", lambda: False)
    monkeypatch.setattr(native, "int8_linear", lambda *args: None)


def onednn_int8_layer(monkeypatch, in_features: int) -> tuple[nn.Linear, QuantLinear]:
    """A 300-row layer and its QuantLinear, which runs on oneDNN's int8 kernel whatever its size."""
    from lmlab.nn import quantize as Q
    from lmlab.nn import screen

    if not screen.int8_screen():
        pytest.skip("oneDNN's int8 kernel sums exactly only with VNNI/AMX")
    torch_int8_kernels(monkeypatch)
    monkeypatch.setattr(Q, "ONEDNN_MIN_WEIGHT", 0)
    torch.manual_seed(0)
    lin = nn.Linear(in_features, 300, bias=True)
    return lin, QuantLinear.from_linear(lin)


@pytest.mark.parametrize("rows", [1, 3])
def test_an_output_sized_weight_on_onednns_int8_kernel_is_within_its_input_rounding(monkeypatch, rows):
    """Large weights (an output layer) run on oneDNN's int8 kernel with the input in two int8
    parts, x̂ = (a/f)(q₁ + q₂/127): per number |x − x̂| ≤ a/(254 f), so each output is within
    Σ_i |Ŵ_oi| · a/(254 f) of x·Ŵ_o (the formula, in fp64), rows of different sizes included."""
    lin, ql = onednn_int8_layer(monkeypatch, 40)
    x = torch.randn(rows, 40) * torch.logspace(0, 2, rows)[:, None]
    calls = []
    real = QuantLinear._onednn
    monkeypatch.setattr(QuantLinear, "_onednn", lambda self, *a: calls.append(1) or real(self, *a))
    with torch.inference_mode():
        got = ql(x)
    assert calls
    w_hat = ql.dequantize().double()
    want = F.linear(x.double(), w_hat, lin.bias.detach().double())
    big = x.abs().amax(1, keepdim=True).double()
    f = torch.exp2(torch.floor(torch.log2(big.max() / big)))
    bound = w_hat.abs().sum(1)[None] * (big.max() / 127) / (254 * f) + 1e-5 * want.abs()
    assert ((got.double() - want).abs() <= bound).all()
    assert (got.double() - want).abs().max() < 1e-3 * want.abs().max()  # ~14 bits: far finer than bf16


def test_onednns_int8_copy_replaces_the_codes_and_gives_them_back(monkeypatch):
    """Once oneDNN's packed copy of a big weight's codes is made and checked, it stands in
    place of them (``qweight`` holds a 1-byte stand-in: an output layer's codes held once);
    every way of reading them gives the original codes (reference: a clone taken before),
    products of more rows than decoding has still match the formula, and codes assigned or
    loaded anew are what the layer multiplies by."""
    import copy
    import pickle

    from lmlab.nn import quantize as Q

    lin, ql = onednn_int8_layer(monkeypatch, 64)
    codes = ql.qweight.clone()

    def formula(x, layer):
        return F.linear(x.double(), layer.dequantize().double(), layer.bias.double())

    x1 = torch.randn(1, 64)
    with torch.inference_mode():
        y1 = ql(x1)
    assert ql._buffers["qweight"].untyped_storage().nbytes() <= 1  # replaced
    assert torch.equal(ql.qweight, codes) and torch.equal(ql.state_dict()["qweight"], codes)
    assert torch.equal(copy.deepcopy(ql).qweight, codes)
    assert torch.equal(pickle.loads(pickle.dumps(ql)).qweight, codes)
    for rows in (100, 200):  # 64 rows at a time on oneDNN; the dequantized bf16 product
        x = torch.randn(rows, 64)
        with torch.inference_mode():
            got = ql(x).double()
        want = formula(x, ql)
        tol = 1e-3 if rows < Q.DEQUANTIZE_ROWS else 2e-2
        assert (got - want).abs().max() <= tol * want.abs().max()
    other = torch.randint(-127, 128, codes.shape, dtype=torch.int8)
    ql.qweight = other  # assigned anew: packed anew
    x = torch.randn(2, 64)
    with torch.inference_mode():
        got = ql(x).double()
    assert torch.equal(ql.qweight, other)
    assert (got - formula(x, ql)).abs().max() <= 1e-3 * formula(x, ql).abs().max()
    ql.load_state_dict({**ql.state_dict(), "qweight": codes})
    assert torch.equal(ql.qweight, codes)
    with torch.inference_mode():
        assert torch.equal(ql(x1), y1)  # the loaded codes are the first ones: the same output
        got = ql(x).double()
    assert (got - formula(x, ql)).abs().max() <= 1e-3 * formula(x, ql).abs().max()
    with torch.inference_mode():
        ql(x)  # replaced again
    ql.float()  # the codes go with the module, in their own storage again
    assert ql._buffers["qweight"].untyped_storage().nbytes() == codes.numel() and torch.equal(ql.qweight, codes)
    with torch.inference_mode():
        ql(x)
    assert ql._buffers["qweight"].untyped_storage().nbytes() <= 1
    with torch.inference_mode():  # codes put back inside inference mode: a plain tensor, packed again later
        assert torch.equal(ql.qweight, codes)
        ql(x)
    assert ql._buffers["qweight"].untyped_storage().nbytes() <= 1
    ql.load_state_dict({**ql.state_dict(), "qweight": codes})
    ql.qweight[:10] = 0  # written through the attribute (it puts the codes back first): the layer's codes
    with torch.inference_mode():
        got = ql(x).double()
    assert (got[:, :10] - ql.bias[:10].double()).abs().max() < 1e-6
    assert (got - formula(x, ql)).abs().max() <= 1e-3 * formula(x, ql).abs().max()


def test_a_non_finite_row_stays_its_own_and_inference_tensors_work(monkeypatch):
    """oneDNN's int8 path shares one input scale across rows: a row with an infinity must not
    turn the others into NaN (that product goes to the per-row path), and a layer whose
    int8 weight is an inference tensor (no version counter) still multiplies."""
    from lmlab.nn import quantize as Q

    torch_int8_kernels(monkeypatch)
    monkeypatch.setattr(Q, "ONEDNN_MIN_WEIGHT", 0)
    torch.manual_seed(0)
    lin = nn.Linear(64, 300)
    ql = QuantLinear.from_linear(lin)
    x = torch.randn(3, 64)
    x[1, 5] = float("inf")
    with torch.inference_mode():
        y = ql(x)
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[2]).all() and not torch.isfinite(y[1]).all()
    with torch.inference_mode():
        frozen = QuantLinear.from_linear(lin)  # built in inference mode: inference tensors
        y = frozen(x[:1])
    want = F.linear(x[:1].double(), frozen.dequantize().double(), lin.bias.detach().double())
    assert torch.allclose(y.double(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


@pytest.mark.parametrize("in_features", [40, 8, 17, 100])  # not multiples of 16
def test_width_not_a_multiple_of_16_dequantizes_and_stays_within_the_quantization_error(
    in_features, monkeypatch
):
    """``torch._weight_int8pack_mm`` reads the input 16 values at a time and has no tail, so
    these layers must take the dequantize path: the kernel is never called, and the output is
    the float layer's within the quantization error, bounded per output by

        |y_o - ŷ_o| = |Σ_i x_i (W_oi - Ŵ_oi)| ≤ Σ_i |x_i| · s_o/2,   s_o = max_i |W_oi| / 127

    (a kernel that dropped the last in_features mod 16 inputs would be off by Σ_tail x_i W_oi)."""
    torch.manual_seed(3)
    lin = nn.Linear(in_features, 24)
    ql = QuantLinear.from_linear(lin)
    assert not ql.fast

    def no_kernel(*args, **kwargs):
        raise AssertionError(f"int8 kernel called for in_features={in_features}")

    monkeypatch.setattr(torch, "_weight_int8pack_mm", no_kernel, raising=False)
    x = torch.randn(3, 5, in_features)
    with torch.inference_mode():
        got, want = ql(x), lin(x)
    s = lin.weight.detach().abs().amax(1) / 127  # (out,)
    bound = x.abs().sum(-1, keepdim=True) * s / 2  # Σ_i |x_i| · s_o/2 : (3, 5, 1)·(out,) -> (3, 5, out)
    err = (got - want).abs()
    assert got.shape == want.shape and got.dtype == x.dtype
    assert (err <= bound + 1e-5).all(), float((err - bound).max())
    assert err.max() > 0  # the weights were rounded: not the float layer itself
    tail = in_features % 16  # what a tail-less 16-wide kernel would leave out
    dropped = F.linear(x[..., in_features - tail :], lin.weight.detach()[:, in_features - tail :]).abs()
    assert (dropped > bound).any()  # so this bound would catch it


@pytest.mark.skipif(not _int8_kernel_works(), reason="no int8 CPU kernel in this build")
def test_fast_and_formula_paths_agree(monkeypatch):
    torch_int8_kernels(monkeypatch)
    torch.manual_seed(1)
    ql = QuantLinear.from_linear(nn.Linear(96, 50))
    x = torch.randn(7, 96)
    with torch.inference_mode():
        fast = ql(x)
        ql.fast = False
        slow = ql(x)
    torch.testing.assert_close(fast, slow, atol=2e-2 * slow.abs().max().item(), rtol=1e-2)


def test_many_rows_dequantize_to_bf16_within_the_rounding_of_the_kernel_path(monkeypatch):
    """A prefill's rows (>= DEQUANTIZE_ROWS) multiply by Ŵ = s ⊙ q in bf16, not through the
    int8 kernel (never called): the same formula, checked against it written out in fp32."""
    from lmlab.nn import quantize as Q

    torch.manual_seed(2)
    lin = nn.Linear(96, 50)
    ql = QuantLinear.from_linear(lin)
    x = torch.randn(2, Q.DEQUANTIZE_ROWS, 96)

    def no_kernel(*args, **kwargs):
        raise AssertionError("int8 kernel called for a prefill's rows")

    monkeypatch.setattr(torch, "_weight_int8pack_mm", no_kernel, raising=False)
    with torch.inference_mode():
        got = ql(x)
    s = lin.weight.detach().abs().amax(1) / 127
    w_hat = torch.round(lin.weight.detach() / s[:, None]) * s[:, None]
    want = F.linear(x, w_hat, lin.bias.detach())
    assert got.shape == want.shape and got.dtype == x.dtype
    torch.testing.assert_close(got, want, atol=2e-2 * want.abs().max().item(), rtol=1e-2)
    torch_int8_kernels(monkeypatch)
    monkeypatch.setattr(Q, "DEQUANTIZE_MAX", 96 * 50 - 1)  # a weight too big for a bf16 copy: the kernel
    with pytest.raises(AssertionError, match="int8 kernel called"), torch.inference_mode():
        ql(x)


def quantized_pair(**options):
    model = tiny_model(97, max_seq_len=64, init_std=0.1, **options)
    q = quantize_model(tiny_model(97, max_seq_len=64, init_std=0.1, **options))
    return model, q


@pytest.mark.parametrize("d_model", [64, 40])  # 40: qkv, proj, up and lm_head take the dequantize path
@pytest.mark.parametrize("family", [{}, LLAMA], ids=["default", "llama"])
def test_quantized_model_logits_close_and_greedy_mostly_equal(family, d_model):
    model, q = quantized_pair(d_model=d_model, n_head=4, **family)
    slow = [m for m in q.modules() if isinstance(m, QuantLinear) and not m.fast]
    assert len(slow) == (0 if d_model % 16 == 0 else 3 * model.config.n_layer + 1)  # qkv, proj, up; lm_head
    assert all(not isinstance(m, nn.Linear) for m in q.modules())
    assert isinstance(q.tok_emb, nn.Embedding) and q.tok_emb.weight.dtype == torch.float32
    ids = torch.randint(0, 97, (4, 32))
    with torch.inference_mode():
        a, _ = model(ids)
        b, _ = q(ids)
    rel = (a - b).pow(2).mean().sqrt() / a.std()
    assert 0 < rel < 0.03
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9

    from lmlab.generate import generate_tokens
    from lmlab.generate.config import GenerationConfig

    # the float model's greedy continuation; the int8 model, fed the same tokens, picks the
    # same next token at most steps (comparing two free runs would count every token after
    # the first flip of a near-tie as different)
    prompt = [1, 2, 3]
    ref = list(generate_tokens(model, prompt, GenerationConfig(max_new_tokens=30, temperature=0)))
    with torch.inference_mode():
        z, _ = q(torch.tensor([prompt + ref]))
    picks = z[0, len(prompt) - 1 : -1].argmax(-1).tolist()
    assert sum(x == y for x, y in zip(ref, picks)) >= 27


def test_an_int8_model_counts_the_parameters_of_its_float_model():
    model, q = quantized_pair()
    # the tied output layer's int8 copy is a second matrix of the embedding's size
    assert q.num_parameters() == model.num_parameters() + model.tok_emb.weight.numel()


def test_tied_output_layer_gets_its_own_int8_copy():
    model, q = quantized_pair(d_model=32)
    assert model.config.tie_embeddings
    assert isinstance(q.lm_head, QuantLinear)
    half_step = q.lm_head.scale[:, None] / 2  # |s_o·q_oi - W_oi| ≤ s_o/2
    assert ((q.lm_head.dequantize() - q.tok_emb.weight.detach()).abs() <= half_step + 1e-6).all()
    q.tie_weights()  # must not put a float weight back on the int8 layer
    assert isinstance(q.lm_head, QuantLinear) and "weight" not in dict(q.lm_head.named_parameters())


def test_load_quantize_int8_and_generate(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ckpt", d_model=32, init_std=0.1)
    fp = lmlab.load(ckpt)
    q8 = lmlab.load(ckpt, quantize="int8")
    assert isinstance(q8.module.lm_head, QuantLinear)
    text = q8.generate("To be", max_new_tokens=12, temperature=0)
    assert isinstance(text, str) and text
    ids = fp.encode("To be, or not to be")
    a, b = fp.logits(ids), q8.logits(ids)
    assert (a - b).pow(2).mean().sqrt() / a.std() < 0.03


@pytest.mark.parametrize("bad", ["int2", "INT8", "fp8", ""])
def test_bad_quantize_value_is_a_clear_error(tmp_path, bad):
    ckpt = tiny_checkpoint(tmp_path / "ckpt", d_model=32)
    with pytest.raises(LmlabError, match="unknown quantization"):
        lmlab.load(ckpt, quantize=bad)


def test_non_finite_weights_refused():
    model = tiny_model(50, d_model=32)
    with torch.no_grad():
        model.blocks[1].mlp.up.weight[3, 5] = float("nan")
    with pytest.raises(LmlabError, match=r"blocks\.1\.mlp\.up has NaN or infinite"):
        quantize_model(model)


def test_quantize_twice_and_save_quantized_refused(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ckpt", d_model=32)
    q8 = lmlab.load(ckpt, quantize="int8")
    with pytest.raises(LmlabError, match="already quantized"):
        quantize_model(q8.module)
    with pytest.raises(LmlabError, match="saves float checkpoints only"):
        q8.save(tmp_path / "out")


def test_cli_generate_quantize(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ckpt", d_model=32)
    expected = lmlab.load(ckpt, quantize="int8").generate("To be", max_new_tokens=8, temperature=0)
    run = ["generate", str(ckpt), "--prompt", "To be", "--max-new-tokens", "8", "--temperature", "0"]
    ok = run_lmlab(*run, "--quantize", "int8", timeout=120)
    assert ok.stdout == expected + "\n"
    bad = run_lmlab(*run, "--quantize", "int2", check_rc=2, timeout=120)
    assert bad.stderr.startswith("lmlab: error: unknown quantization 'int2'")
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize("case", ["llama", "gemma", "mislabelled"])
def test_a_bf16_checkpoint_quantizes_to_the_model_its_fp32_load_quantizes_to(tmp_path, case):
    """``quantize="int8"`` with no dtype reads a checkpoint whose numbers are all bf16 in bf16 and
    converts what stays float to fp32 after quantizing (no fp32 copy of the whole model): the
    very tensors, buffers included, that quantizing its fp32 load gives (the reference). Gemma
    (its norms load as 1 + w, a sum bf16 would round) and a config.json that says bf16 over fp32
    tensors are read in fp32."""
    import json

    transformers = pytest.importorskip("transformers")
    from helpers import bpe_tokenizer

    tok = bpe_tokenizer()
    shape = dict(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    torch.manual_seed(0)
    if case == "gemma":
        hf = transformers.GemmaForCausalLM(transformers.GemmaConfig(head_dim=16, **shape))
        with torch.no_grad():
            for n, p in hf.named_parameters():
                if "norm" in n:
                    p.normal_(0, 0.3)  # 1 + w is then rarely a bf16 number
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape))
    (hf if case == "mislabelled" else hf.to(torch.bfloat16)).save_pretrained(tmp_path / "m")
    if case == "mislabelled":  # fp32 tensors, a config that says bf16
        cfg = json.loads((tmp_path / "m" / "config.json").read_text())
        cfg["dtype"] = cfg["torch_dtype"] = "bfloat16"
        (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    tok.save(str(tmp_path / "m" / "tokenizer.json"))
    got = lmlab.load(str(tmp_path / "m"), quantize="int8").module
    want = quantize_model(lmlab.load(str(tmp_path / "m"), dtype="fp32").module)
    # the token table of a bf16 read stays bf16 (half the bytes), its numbers the fp32 load's
    table = "tok_emb.weight"
    assert got.state_dict()[table].dtype == (torch.float32 if case in ("gemma", "mislabelled") else torch.bfloat16)
    for a, b in ((got.state_dict(), want.state_dict()), (dict(got.named_buffers()), dict(want.named_buffers()))):
        assert a.keys() == b.keys()
        for k in b:
            same_type = a[k].dtype == b[k].dtype or k == table
            assert same_type and torch.equal(a[k].to(b[k].dtype), b[k]), k
    assert got.dtype == torch.float32
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.inference_mode():
        assert torch.equal(got(ids)[0], want(ids)[0])  # the same logits, bit for bit
        assert got.init_state(1, 8)._k.dtype == torch.float32  # its cache in what it computes in
    ones = [m._ones.dtype for m in got.modules() if isinstance(m, QuantLinear)]
    assert ones and set(ones) == {torch.bfloat16}  # the int8 kernel's unit scales, as made
