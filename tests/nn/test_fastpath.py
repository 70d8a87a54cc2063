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
from lmlab.nn import fastpath
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
    assert fastpath.enable(lin) == 1 and type(lin) is FastLinear
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
