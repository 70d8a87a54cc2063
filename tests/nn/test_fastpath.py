"""The CPU decoding fast path (oneDNN linear layers) computes what the plain path computes.

References: ``F.linear`` (PyTorch's own op) for single layers; the same model with
``fast_decoding = False`` (plain ``F.linear`` everywhere) for whole models — fp32 logits
within 1e-5 and identical greedy tokens, alone, in batches with left padding, and in beam
search; Hugging Face ``generate`` on the same imported GPT-2 weights.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_model
from torch import nn

from lmlab.generate import GenerationConfig, beam_search, sample
from lmlab.nn import fastpath, native_packed
from lmlab.nn.fastpath import FastLinear

pytestmark = pytest.mark.skipif(not fastpath.works(), reason="no oneDNN linear in this build")

LLAMA = dict(pos="rope", norm="rmsnorm", activation="silu", gated_mlp=True, n_kv_head=1, d_model=64, n_head=4)
GPT2 = dict(
    pos="learned", norm="layernorm", norm_bias=True, activation="gelu_tanh", gated_mlp=False,
    qkv_bias=True, proj_bias=True, mlp_bias=True, d_model=48, n_head=3,
)  # fmt: skip


def fast_linear(in_f: int, out_f: int, bias: bool = True, dtype=torch.float32) -> nn.Linear:
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    assert fastpath.prepare(lin) == 1 and type(lin) is FastLinear
    return lin


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 40), (3, 5, 40), (8, 1, 40)])
def test_linear_fast_path_equals_f_linear(shape, bias):
    lin = fast_linear(40, 72, bias)
    x = torch.randn(*shape)
    with torch.no_grad():
        got = lin(x)
    assert got.shape == (*shape[:-1], 72)
    torch.testing.assert_close(got, F.linear(x, lin.weight, lin.bias), atol=1e-5, rtol=1e-5)


def test_linear_fast_path_takes_non_contiguous_input():
    lin = fast_linear(40, 24)
    x = torch.randn(2, 40, 6).transpose(1, 2)  # (2, 6, 40), strided
    with torch.inference_mode():
        got = lin(x)
    torch.testing.assert_close(got, F.linear(x, lin.weight, lin.bias), atol=1e-5, rtol=1e-5)


def test_linear_bf16_packed_copy_follows_weight_changes():
    """bf16 multiplies a blocked copy of W; changing W in place (an optimizer step, a
    load_state_dict) must not leave the layer computing with the old copy."""
    lin = fast_linear(64, 32, dtype=torch.bfloat16)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    for change in range(3):
        with torch.no_grad():
            got = lin(x).float()
            want = F.linear(x.float(), lin.weight.float(), lin.bias.float())
            torch.testing.assert_close(got, want, atol=0.05, rtol=0.02)
            if change == 0:
                lin.weight.mul_(-2.0)  # in place, as an optimizer step
            elif change == 1:
                lin.load_state_dict({"weight": torch.randn(32, 64), "bias": torch.zeros(32)})


def test_linear_bf16_packed_copy_follows_a_fused_optimizer_step():
    """A fused AdamW step writes W without bumping its version counter: a training step
    (a forward with autograd on) in between must still retire the old packed copy."""
    lin = fast_linear(64, 32, dtype=torch.bfloat16)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        lin(x)  # packs W
    opt = torch.optim.AdamW(lin.parameters(), lr=0.5, fused=True)
    version = lin.weight._version
    lin(x).float().sum().backward()
    opt.step()
    assert lin.weight._version == version  # the premise: the counter did not move
    with torch.no_grad():
        got = lin(x).float()
    want = F.linear(x.float(), lin.weight.float(), lin.bias.float())
    torch.testing.assert_close(got, want, atol=0.05, rtol=0.02)


def test_linear_uses_plain_path_with_autograd():
    lin = fast_linear(16, 8)
    x = torch.randn(3, 16, requires_grad=True)
    y = lin(x)  # grad enabled: F.linear, differentiable
    y.sum().backward()
    torch.testing.assert_close(x.grad, lin.weight.sum(0).expand(3, 16))
    assert lin.weight.grad is not None


def test_preparing_for_decoding_draws_no_random_numbers(monkeypatch):
    """``torch.manual_seed(s)`` then generate must sample the same text on the first call
    (when the kernels are probed and prepared) as on later ones."""
    monkeypatch.setattr(fastpath, "_WORKS", None)  # probe again
    model = tiny_model(97, **GPT2)
    state = torch.get_rng_state()
    assert fastpath.prepare(model) > 0
    assert torch.equal(state, torch.get_rng_state())


def test_fast_path_off_when_onednn_is_missing(monkeypatch):
    monkeypatch.setattr(fastpath, "_WORKS", False)
    lin = nn.Linear(8, 4)
    assert fastpath.enable(lin) == 0 and type(lin) is nn.Linear


def test_enable_swaps_the_class_only_and_back():
    """On: every plain nn.Linear becomes a FastLinear with the very same parameters (same
    state_dict keys, tied weights still tied); an int8 QuantLinear is left alone. Off: back.
    The count is the number of layers on the fast path; a repeated call changes nothing."""
    from lmlab.nn.quantize import QuantLinear

    model = tiny_model(97, **GPT2)
    model.blocks[0].mlp.down = QuantLinear.from_linear(model.blocks[0].mlp.down)
    keys, params = list(model.state_dict()), [id(p) for p in model.parameters()]
    plain = [m for m in model.modules() if type(m) is nn.Linear]
    assert fastpath.enable(model, True) == len(plain) > 0
    assert all(type(m) is FastLinear for m in plain)
    assert isinstance(model.blocks[0].mlp.down, QuantLinear)
    assert list(model.state_dict()) == keys and [id(p) for p in model.parameters()] == params
    assert model.lm_head.weight is model.tok_emb.weight
    assert fastpath.enable(model, True) == len(plain)
    assert fastpath.enable(model, False) == 0
    assert all(type(m) is nn.Linear for m in plain)
    assert not any(isinstance(m, FastLinear) for m in model.modules())


def test_prepare_follows_fast_decoding():
    model = tiny_model(97, **GPT2)
    model.fast_decoding = False
    assert fastpath.prepare(model) == 0
    assert not any(isinstance(m, FastLinear) for m in model.modules())
    model.fast_decoding = True
    assert fastpath.prepare(model) == sum(isinstance(m, nn.Linear) for m in model.modules())


# --------------------------------------------------------------------------- whole models
def logits_both_paths(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        model.fast_decoding = False
        fastpath.prepare(model)
        plain, _ = model(ids)
        model.fast_decoding = True
        fastpath.prepare(model)
        fast, _ = model(ids)
    return plain, fast


@pytest.mark.parametrize("family", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_model_logits_fast_equal_plain(family):
    model = tiny_model(97, max_seq_len=64, **family)
    ids = torch.randint(0, 97, (2, 20))
    plain, fast = logits_both_paths(model, ids)
    assert any(isinstance(m, FastLinear) for m in model.modules())
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)


def greedy(model, prompts, fast: bool, **options) -> list[list[int]]:
    model.fast_decoding = fast
    cfg = GenerationConfig(max_new_tokens=24, temperature=0, **options)
    rows: list[list[int]] = [[] for _ in prompts]
    for choices in sample(model, prompts, cfg, [None] * len(prompts)):
        for c in choices:
            rows[c.row].append(c.token)
    return rows


@pytest.mark.parametrize("family", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_greedy_tokens_fast_equal_plain_with_left_padding(family):
    model = tiny_model(97, max_seq_len=64, **family)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3], [40, 41, 42, 43]]  # different lengths: left padding
    plain = greedy(model, prompts, fast=False)
    fast = greedy(model, prompts, fast=True)
    assert all(len(r) == 24 for r in fast)
    assert fast == plain
    alone = [greedy(model, [p], fast=True)[0] for p in prompts]
    assert alone == fast  # each row as if alone


def test_beam_search_fast_equals_plain():
    model = tiny_model(97, max_seq_len=64, **GPT2)
    cfg = GenerationConfig(max_new_tokens=10, num_beams=3, temperature=0)
    out = {}
    for fast in (False, True):
        model.fast_decoding = fast
        out[fast] = [[h.tokens for h in hyps] for hyps in beam_search(model, [[1, 2, 3]], cfg)]
    assert out[True] == out[False]


def test_fast_decoding_leaves_training_intact():
    """After decoding, a training step still differentiates through every layer."""
    model = tiny_model(97, **GPT2)
    greedy(model, [[1, 2, 3]], fast=True)
    model.train()
    logits, _ = model(torch.randint(0, 97, (2, 8)))
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_imported_gpt2_greedy_equals_hugging_face(tmp_path):
    transformers = pytest.importorskip("transformers")
    from helpers import bpe_tokenizer

    import lmlab

    tok = bpe_tokenizer()
    cfg = transformers.GPT2Config(
        vocab_size=tok.get_vocab_size(), n_positions=64, n_embd=48, n_layer=2, n_head=3
    )
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(8.0)  # peaked logits: greedy choices far from rounding ties
    hf.save_pretrained(tmp_path / "gpt2")
    tok.save(str(tmp_path / "gpt2" / "tokenizer.json"))
    model = lmlab.load(str(tmp_path / "gpt2"))
    prompt = "To be, or not"
    ids = torch.tensor([model.encode(prompt)])
    mine = model.generate_ids(prompt, max_new_tokens=20, temperature=0, eos_token_id=[])
    assert any(isinstance(m, FastLinear) for m in model.module.modules())
    with torch.no_grad():
        ref = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=20,
            eos_token_id=None,
            pad_token_id=0,
        )
    assert mine == ref[0, ids.shape[1] :].tolist()


def test_loaded_model_forward_runs_fast_and_equals_the_plain_path(tmp_path):
    """``lmlab.load`` switches a CPU model's no-grad forwards (eval, prefill) to oneDNN;
    the logits equal the plain ``F.linear`` path's, and training still differentiates."""
    from helpers import tiny_checkpoint

    import lmlab

    model = lmlab.load(tiny_checkpoint(tmp_path / "ckpt", **GPT2))
    module = model.module
    assert all(isinstance(m, FastLinear) for m in module.modules() if isinstance(m, nn.Linear))
    ids = torch.randint(0, module.config.vocab_size, (2, 12))
    with torch.inference_mode():
        fast, _ = module(ids)
    plain, fast_again = logits_both_paths(module, ids)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast_again, fast, atol=0, rtol=0)
    module.train()
    module(ids)[0].sum().backward()  # autograd on: the plain path, gradients everywhere
    assert all(p.grad is not None for p in module.parameters())


def test_decoding_unrolls_seq2seq_steps_only_while_nothing_observes_them(tmp_path, monkeypatch):
    """The translate loop takes the unrolled one-token step (no module calls), and leaves it
    for the modules' own forwards when a hook or an attention recording watches them: the
    hook sees every step. Tokens are equal either way."""
    from helpers import tiny_seq2seq_checkpoint

    import lmlab
    from lmlab.models.seq2seq import DecoderLayer

    m = lmlab.load(tiny_seq2seq_checkpoint(tmp_path / "m"))
    calls = []
    step = DecoderLayer.step
    monkeypatch.setattr(DecoderLayer, "step", lambda self, *a: calls.append(1) or step(self, *a))
    opts = dict(max_new_tokens=6, min_new_tokens=6)
    unrolled = m.translate(["to be or not"], return_details=True, **opts)[0].token_ids
    assert len(calls) == 6  # every forward of its one decoder layer, the decoder start's included
    seen = []
    hook = m.module.decoder[0].register_forward_hook(lambda *_: seen.append(1))
    calls.clear()
    hooked = m.translate(["to be or not"], return_details=True, **opts)[0].token_ids
    hook.remove()
    assert calls == [] and len(seen) == 6 and hooked == unrolled
    m.module.decoder[0].cross.record = []
    assert not fastpath.unobserved(m.module)
    m.module.decoder[0].cross.record = None
    m.module.decoder[0].attn.fast = False
    assert not fastpath.unobserved(m.module)
    m.module.decoder[0].attn.fast = True
    assert fastpath.unobserved(m.module)
    m.module.decoder[0].mlp.dropout.train()  # MC dropout: kept on in one module
    assert not fastpath.unobserved(m.module)


@pytest.mark.parametrize(
    "family", [GPT2, LLAMA, dict(LLAMA, parallel_residual=True, rotary_dim=8)], ids=["gpt2", "llama", "parallel"]
)
def test_unrolled_decoder_steps_equal_the_modules_path_with_left_padding(family):
    """A decoder-only model's one-token steps (Block.step) against its modules' forward: two
    left-padded rows, a prefill then 6 steps, logits within fp32 rounding."""
    model = tiny_model(97, max_seq_len=64, **family).eval()
    ids = torch.tensor([[0, 0, 5, 6, 7], [9, 8, 7, 6, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    nxt = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(0))

    def run(unrolled: bool) -> torch.Tensor:
        state, out = model.init_state(2, 12), []
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        with torch.no_grad(), fastpath.unrolling(unrolled):
            model(ids, state, attention_mask=mask, position_ids=pos)
            for t in range(6):
                pos = pos[:, -1:] + 1
                out.append(model(nxt[:, t : t + 1], state, attention_mask=torch.ones(2, 1), position_ids=pos)[0])
        return torch.cat(out, 1)

    calls = []
    real = type(model.blocks[0]).step
    type(model.blocks[0]).step = lambda self, *a: calls.append(1) or real(self, *a)
    try:
        unrolled = run(True)
    finally:
        type(model.blocks[0]).step = real
    assert len(calls) == 6 * len(model.blocks)
    torch.testing.assert_close(unrolled, run(False), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- one copy of W
def stands_in(lin: nn.Module) -> bool:
    """W's data is the 2-byte stand-in: the packed copy is the layer's only copy of W."""
    return lin._parameters["weight"].untyped_storage().nbytes() == 2


def packed_bf16_layer() -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    """A bf16 layer after a no-grad forward (W replaced by its packed copy), a copy of W
    taken before, and an input."""
    lin = fast_linear(64, 32, dtype=torch.bfloat16)
    w0 = lin.weight.detach().clone()
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        got = lin(x)
    assert stands_in(lin)
    torch.testing.assert_close(got.float(), F.linear(x.float(), w0.float(), lin._parameters["bias"].float()), atol=0.05, rtol=0.02)
    return lin, w0, x


def test_a_bf16_weight_is_held_once_and_read_back_bit_for_bit():
    """The packed copy replaces W (W's storage: 2 bytes); ``layer.weight`` gives W back, exactly
    the numbers it had (reference: a clone taken before), and the next forward packs again."""
    lin, w0, x = packed_bf16_layer()
    with torch.no_grad():
        again = lin(x)  # the stand-in path: the same product
    assert stands_in(lin)
    assert torch.equal(lin.weight, w0) and not stands_in(lin)
    assert lin._held is None  # one copy: the plain one again
    with torch.no_grad():
        assert torch.equal(lin(x), again) and stands_in(lin)


@pytest.mark.parametrize("reader", ["state_dict", "deepcopy", "pickle", "to_fp32", "enable_off", "grad_forward"])
def test_every_way_of_reading_a_packed_weight_gives_it_back(reader):
    import copy
    import io

    lin, w0, x = packed_bf16_layer()
    if reader == "state_dict":
        got = lin.state_dict()["weight"]
    elif reader == "deepcopy":
        got = copy.deepcopy(lin).weight
    elif reader == "pickle":
        buf = io.BytesIO()
        torch.save(lin, buf)
        got = torch.load(io.BytesIO(buf.getvalue()), weights_only=False).weight
    elif reader == "to_fp32":
        got = lin.float()._parameters["weight"]
        w0 = w0.float()
    elif reader == "enable_off":
        fastpath.enable(lin, False)
        assert type(lin) is nn.Linear
        got = lin._parameters["weight"]
    else:
        lin(x.float().bfloat16().requires_grad_()).float().sum().backward()
        got = lin._parameters["weight"]
        assert torch.equal(lin.weight.grad, torch.ones(4, 32, dtype=torch.bfloat16).T.float().mm(x.float()).bfloat16())
    assert torch.equal(got, w0)
    assert not stands_in(lin)


def test_loading_a_state_dict_into_a_packed_layer_replaces_its_weight():
    lin, w0, x = packed_bf16_layer()
    new = torch.randn(32, 64).bfloat16()
    lin.load_state_dict({"weight": new, "bias": torch.zeros(32)})
    with torch.no_grad():
        got = lin(x)
    assert stands_in(lin)
    torch.testing.assert_close(got.float(), F.linear(x.float(), new.float()), atol=0.05, rtol=0.02)
    assert torch.equal(lin.weight, new)


def test_a_weight_assigned_anew_wins_over_the_packed_copy():
    """``layer.weight = nn.Parameter(...)`` while the copy stands in: the new W is used, and
    unpacking does not write the old numbers into it."""
    lin, w0, x = packed_bf16_layer()
    new = nn.Parameter(torch.randn(32, 64).bfloat16())
    want, numbers = F.linear(x.float(), new.float(), lin.bias.float()), new.detach().clone()
    lin.weight = new
    with torch.no_grad():
        got = lin(x)
    torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.02)
    assert lin.weight is new and torch.equal(lin.weight, numbers)


def test_a_weight_with_a_gradient_stays_plain():
    """Between a backward and the optimizer's step (an evaluation in between), W keeps its
    plain data: the step writes into it. Reference: plain SGD by hand."""
    lin = fast_linear(64, 32, dtype=torch.bfloat16)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    lin(x).float().sum().backward()
    w0, g = lin.weight.detach().clone(), lin.weight.grad.clone()
    with torch.no_grad():
        lin(x)  # an evaluation
    assert not stands_in(lin)
    torch.optim.SGD(lin.parameters(), lr=0.5).step()
    assert torch.equal(lin.weight, w0 - 0.5 * g)


def test_tied_and_output_weights_stay_plain_and_one_row_takes_no_copy():
    """A bf16 model: every decoder layer's W is replaced by its packed copy; the output layer,
    tied to the embedding, keeps its plain W — and multiplies one row without any copy; where
    lmlab's bf16 kernel is built, any number of rows (up to PLAIN_MAX_ROWS on it, more by
    F.linear on the plain W), elsewhere two rows or more with a packed copy beside. Greedy
    tokens equal the plain path's, and the parameters read back equal the ones before decoding."""
    model = tiny_model(97, max_seq_len=64, **LLAMA).to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = greedy(model, [[5, 6, 7]], fast=False)
    fast = greedy(model, [[5, 6, 7]], fast=True)
    assert fast == plain
    decoder = [m for n, m in model.named_modules() if isinstance(m, FastLinear) and n != "lm_head"]
    assert decoder and all(stands_in(m) for m in decoder)
    assert model.lm_head.weight is model.tok_emb.weight and not stands_in(model.lm_head)
    assert model.lm_head._held is None  # one row at a time: the plain W, where it lies
    greedy(model, [[5, 6, 7], [1, 2]], fast=True)
    assert (model.lm_head._held is None) == native_packed.available(torch.bfloat16)  # two rows: the same, or a copy
    x = torch.randn(1, native_packed.PLAIN_MAX_ROWS + 1, model.config.d_model, dtype=torch.bfloat16)
    with torch.no_grad():
        got = model.lm_head(x)
    assert (model.lm_head._held is None) == native_packed.available(torch.bfloat16)  # more rows: the same, or a copy
    torch.testing.assert_close(got, F.linear(x, model.tok_emb.weight), atol=0, rtol=2**-7)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not any(stands_in(m) for m in decoder)  # state_dict gave them back


def test_one_row_through_a_plain_bf16_weight_is_the_bf16_product():
    """torch.mv's one row (a tied or screened W) against F.linear of the same numbers in fp64,
    rounded once to bf16, with and without a bias."""
    for bias in (False, True):
        lin = fast_linear(512, 300, bias=bias, dtype=torch.bfloat16)
        lin._replaces = False
        x = torch.randn(1, 1, 512, dtype=torch.bfloat16)
        with torch.no_grad():
            got = lin(x)
        want = F.linear(x.double(), lin.weight.double(), None if lin.bias is None else lin.bias.double())
        assert got.shape == (1, 1, 300) and lin._held is None
        assert (got == want.bfloat16()).float().mean() > 0.99  # fp32 sums: at most a last-bit tie apart
        torch.testing.assert_close(got.double(), want, atol=0, rtol=2**-8)


def test_threads_decoding_one_packed_model_agree():
    """Four threads run one bf16 layer at once from its first forward (packing, replacing W):
    each gets the product of the original W."""
    import threading

    lin = fast_linear(256, 512, dtype=torch.bfloat16)
    w0 = lin.weight.detach().clone()
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    want = F.linear(x.float(), w0.float(), lin.bias.float())
    out, errors = [], []

    def work() -> None:
        try:
            for _ in range(20):
                with torch.no_grad():
                    out.append(lin(x).float())
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(out) == 80
    for o in out:
        torch.testing.assert_close(o, want, atol=0.05, rtol=0.02)
    assert torch.equal(lin.weight, w0)


def test_a_pruned_layer_computes_with_its_own_weight():
    """``torch.nn.utils.prune`` (or a parametrization) takes W out of ``_parameters``: the fast
    path leaves such a layer to its own ``weight`` (reference: F.linear of the pruned W)."""
    from torch.nn.utils import prune

    for dtype in (torch.float32, torch.bfloat16):
        lin = fast_linear(64, 32, dtype=dtype)
        prune.l1_unstructured(lin, "weight", amount=0.5)
        x = torch.randn(3, 64, dtype=dtype)
        with torch.no_grad():
            got = lin(x)
        torch.testing.assert_close(got, F.linear(x, lin.weight, lin.bias))
        assert (lin.weight == 0).float().mean() == 0.5


def test_a_call_with_other_weights_leaves_the_layers_own_intact():
    """``torch.func.functional_call`` swaps W for a call: that call uses the given W (untouched
    by the packing), and afterwards the layer's own W is whole again."""
    lin, w0, x = packed_bf16_layer()
    new, bias = torch.randn(32, 64).bfloat16(), torch.zeros(32).bfloat16()
    new0 = new.clone()
    with torch.no_grad():
        got = torch.func.functional_call(lin, {"weight": new, "bias": bias}, (x,))
    torch.testing.assert_close(got.float(), F.linear(x.float(), new0.float()), atol=0.05, rtol=0.02)
    assert torch.equal(new, new0)
    assert torch.equal(lin.weight, w0)


def _in_another_thread(fn, wait: float = 0.1):
    """Start ``fn`` in a thread and give it ``wait`` seconds (it may block on the layer's lock)."""
    import threading
    import time

    t = threading.Thread(target=fn)
    t.start()
    time.sleep(wait)
    return t


def test_a_state_dict_taken_while_another_thread_decodes_holds_the_weight(monkeypatch):
    """A decoding thread runs while ``state_dict`` is between giving W back and reading it:
    the saved W is the real one (reference: a clone taken before), and the decode's output too."""
    lin, w0, x = packed_bf16_layer()
    want = F.linear(x.float(), w0.float(), lin.bias.float())
    real, out, threads = nn.Module._save_to_state_dict, [], []

    def decode() -> None:
        with torch.no_grad():
            out.append(lin(x).float())

    def save(self, *args):
        threads.append(_in_another_thread(decode))
        return real(self, *args)

    monkeypatch.setattr(nn.Module, "_save_to_state_dict", save)
    saved = lin.state_dict()["weight"]
    threads[0].join()
    assert torch.equal(saved, w0)
    torch.testing.assert_close(out[0], want, atol=0.05, rtol=0.02)


def test_unpacking_from_another_thread_while_the_copy_is_made(monkeypatch):
    """Another thread asks for W back while this one is packing (between making the copy and
    replacing W): W ends whole, never a stand-in without its copy."""
    lin = fast_linear(64, 32, dtype=torch.bfloat16)
    w0 = lin.weight.detach().clone()
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    real_full, threads = torch.full, []

    def full(*args, **kwargs):
        monkeypatch.setattr(torch, "full", real_full)
        threads.append(_in_another_thread(lin.unpack))
        return real_full(*args, **kwargs)

    monkeypatch.setattr(torch, "full", full)
    with torch.no_grad():
        first = lin(x)
    threads[0].join()
    with torch.no_grad():
        second = lin(x)
    want = F.linear(x.float(), w0.float(), lin.bias.float())
    for y in (first, second):
        torch.testing.assert_close(y.float(), want, atol=0.05, rtol=0.02)
    assert torch.equal(lin.weight, w0)


def test_a_forward_that_finds_its_weight_replaced_midway_uses_the_copy(monkeypatch):
    """Thread A saw W plain; before it multiplies, thread B packs W and replaces it: A's product
    is still W's (not the stand-in's NaNs)."""
    lin = fast_linear(64, 32, dtype=torch.bfloat16)
    w0 = lin.weight.detach().clone()
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    real = FastLinear._onednn_forward

    def late(self, x):
        def other() -> None:
            with torch.no_grad():
                real(self, x)

        _in_another_thread(other, 0).join()
        return real(self, x)

    monkeypatch.setattr(FastLinear, "_onednn_forward", late)
    with torch.no_grad():
        got = lin(x)
    torch.testing.assert_close(got.float(), F.linear(x.float(), w0.float(), lin.bias.float()), atol=0.05, rtol=0.02)


def test_pack_in_place_false_keeps_the_plain_weights():
    model = tiny_model(97, max_seq_len=64, **LLAMA).to(torch.bfloat16)
    model.pack_in_place = False
    greedy(model, [list(range(5, 25))], fast=True)  # a prompt of more than PLAIN_MAX_ROWS tokens: copies beside W
    layers = [m for n, m in model.named_modules() if isinstance(m, FastLinear) and n != "lm_head"]
    assert all(m._held is not None and not stands_in(m) for m in layers)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    model.pack_in_place = True
    greedy(model, [[5, 6, 7]], fast=True)
    assert all(stands_in(m) for m in layers)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_one_parameter_in_two_prepared_models_is_never_read_as_a_stand_in(dtype, grad):
    """Model B's layer holds the very Parameter model A's layer replaced by its packed copy (A
    decoded first; each was prepared alone, so neither saw the sharing). B must not multiply
    the stand-in's NaNs: A gives W back and neither replaces it again, even after another
    prepare. Reference: F.linear on a clone of W, in fp64."""
    torch.manual_seed(0)
    a, b = (nn.Sequential(nn.Linear(256, 96, bias=False)).to(dtype).eval() for _ in range(2))
    b[0].weight = a[0].weight
    w0 = a[0].weight.detach().clone()
    assert fastpath.prepare(a) == 1 and fastpath.prepare(b) == 1
    x = torch.randn(3, 256, dtype=dtype)
    want = F.linear(x.double(), w0.double())
    tol = dict(atol=1e-2, rtol=2**-7) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(a(x).double(), want, **tol)
    if dtype == torch.bfloat16:
        assert stands_in(a[0])  # what the test is about (an fp32 W is replaced only on lmlab's fp32 kernel)
    with torch.set_grad_enabled(grad):
        torch.testing.assert_close(b(x).detach().double(), want, **tol)
    assert not stands_in(a[0]) and torch.equal(a[0]._parameters["weight"], w0)
    for model in (a, b, a, b):
        fastpath.prepare(model)
        with torch.no_grad():
            torch.testing.assert_close(model(x).double(), want, **tol)
        assert not stands_in(a[0]) and not stands_in(b[0])


@pytest.mark.parametrize("reader", ["weight", "state_dict", "deepcopy", "to_fp32", "load_state_dict"])
def test_reading_a_shared_parameter_through_the_other_model_gives_w_back(reader):
    """The same sharing, W read through B's module while A's stand-in holds it: every read
    gives W back (reference: a clone taken before), and converting B (``.float()``) converts W,
    not the NaNs — which A could no longer restore."""
    import copy

    torch.manual_seed(0)
    a, b = (nn.Sequential(nn.Linear(256, 96, bias=False)).to(torch.bfloat16).eval() for _ in range(2))
    b[0].weight = a[0].weight
    w0 = a[0].weight.detach().clone()
    fastpath.prepare(a), fastpath.prepare(b)
    with torch.no_grad():
        a(torch.randn(2, 256, dtype=torch.bfloat16))
    assert stands_in(a[0])
    if reader == "weight":
        got = b[0].weight
    elif reader == "state_dict":
        got = b.state_dict()["0.weight"]
    elif reader == "deepcopy":
        got = copy.deepcopy(b)[0]._parameters["weight"]
    elif reader == "to_fp32":
        got = b.float()[0]._parameters["weight"]
    else:
        b.load_state_dict({"0.weight": w0 * 2})  # (×2, /2: exact in bf16)
        got = b[0]._parameters["weight"].detach() / 2
    assert torch.equal(got.to(w0.dtype), w0) and not stands_in(a[0])
    assert torch.equal(a[0].weight.to(w0.dtype), w0 * (2 if reader == "load_state_dict" else 1))  # one W, A's too


def test_a_shared_parameter_replaced_by_another_thread_just_before_the_product(monkeypatch):
    """B's forward passes its first look at W (still plain), then A's thread decodes and
    replaces W, then B chooses its operand (under the lock): it must see the stand-in there
    and have it given back, not multiply the NaNs."""
    import threading

    torch.manual_seed(0)
    a, b = (nn.Sequential(nn.Linear(256, 96, bias=False)).to(torch.bfloat16).eval() for _ in range(2))
    b[0].weight = a[0].weight
    w0 = a[0].weight.detach().clone()
    fastpath.prepare(a), fastpath.prepare(b)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    real, seen = FastLinear._packed, []

    def a_decodes_first(self, x, bias):
        if self is b[0] and not seen:
            t = threading.Thread(target=lambda: seen.append(torch.no_grad()(a)(x)))
            t.start()
            t.join()
            seen.append(stands_in(a[0]))
        return real(self, x, bias)

    monkeypatch.setattr(FastLinear, "_packed", a_decodes_first)
    with torch.no_grad():
        got = b(x)
    assert seen[1] is True  # A had replaced W when B came to choose
    torch.testing.assert_close(got.double(), F.linear(x.double(), w0.double()), atol=1e-2, rtol=2**-7)
