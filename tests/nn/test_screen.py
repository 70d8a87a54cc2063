"""The screened output layer (an int8 or bf16 screen, exact fp32 rescoring) picks the argmax
that the full fp32 product picks. Reference: ``F.linear`` on the same weights (PyTorch's op), with
logits built to defeat a bf16-only argmax (near-ties far below bf16's resolution), masks
that remove the best token, a logits bias, and whole models decoding greedily against the
same model with the fast path off."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_model
from torch import nn

from lmlab.generate import GenerationConfig, sample
from lmlab.nn import fastpath, native, screen
from lmlab.nn.screen import ScreenedLinear

pytestmark = pytest.mark.skipif(not fastpath.works(), reason="no oneDNN linear in this build")


class Owner(nn.Module):
    """A model's tail: an output layer and a bias added after it (Marian's final_logits_bias)."""

    def __init__(self, V: int, d: int, bias: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lm_head = nn.Linear(d, V, bias=False)
        self.logits_bias = nn.Parameter(torch.randn(1, V)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.lm_head(x)
        return z if self.logits_bias is None else z + self.logits_bias


KERNELS = ["bf16"] + (["int8"] if screen.int8_screen() else [])  # int8: where oneDNN sums int8 exactly


@pytest.fixture(params=KERNELS)
def small(monkeypatch, request):
    """Screen heads of any size, with each kernel (the int8 copy, and the bf16 one that CPUs
    without VNNI/AMX use)."""
    monkeypatch.setattr(screen, "MIN_WEIGHT", 0)
    monkeypatch.setattr(screen, "INT8", request.param == "int8")
    monkeypatch.setattr(screen, "NATIVE", False)  # (a bf16 head's screen on lmlab's kernel: its own tests)
    return request.param


BF16_KERNELS = ["onednn"] + (["lmlab"] if native.available() else [])  # a bf16 head's int8 screen


def bf16_kernel(kernel: str, monkeypatch) -> type:
    """Screen bf16 heads with oneDNN's int8 kernel (_Int8Copy) or lmlab's own (_NativeCopy)."""
    monkeypatch.setattr(screen, "NATIVE", None if kernel == "lmlab" else False)
    return screen._NativeCopy if kernel == "lmlab" else screen._Int8Copy


def owner(V: int = 3000, d: int = 64, bias: bool = False) -> Owner:
    m = Owner(V, d, bias).eval()
    assert fastpath.enable(m) >= 1 and screen.prepare(m)[0] == 1 and type(m.lm_head) is ScreenedLinear
    return m


def run(m: Owner, x: torch.Tensor, keep=()) -> torch.Tensor:
    bias = screen.prepare(m)[1]
    with torch.no_grad(), screen.screening(screen.keep_tensor(keep), bias):
        return m(x)


def reference(m: Owner, x: torch.Tensor) -> torch.Tensor:
    """The exact product of the numbers (fp64 of fp32 or bf16 inputs: no rounding at this size)."""
    z = F.linear(x.double(), m.lm_head.weight.detach().double())
    return z if m.logits_bias is None else z + m.logits_bias.detach().double()


@pytest.mark.parametrize("parts", [1, 6])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_the_argmax_and_the_candidates_logits_are_the_fp32_products(small, rows, bias, parts, monkeypatch):
    """``parts``: the int8 copy packed in one part, or in six of 512 rows (the last one shorter)."""
    if parts > 1:
        monkeypatch.setattr(screen, "CHUNK", 256)
        monkeypatch.setattr(screen, "PART_BYTES", 512 * 64)
    m = owner(bias=bias)
    x = torch.randn(rows, 1, 64, generator=torch.Generator().manual_seed(rows)) * 2
    got, ref = run(m, x), reference(m, x)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    if small == "int8":
        assert len(m.lm_head._screen.parts) == parts
    finite = torch.isfinite(got)
    assert finite.sum() < got.numel() / 10, "the screen kept most of the vocabulary"
    assert torch.allclose(got[finite].double(), ref[finite], atol=1e-5)
    plain = m(x)  # outside screening: the full logits
    assert torch.isfinite(plain).all() and torch.allclose(plain.double(), ref, atol=1e-5)


@pytest.mark.parametrize("kernel", BF16_KERNELS)
@pytest.mark.parametrize("rows", [1, 4])
def test_a_bf16_head_gives_the_bf16_logits_and_the_first_of_equal_maxima(small, rows, monkeypatch, kernel):
    """A bf16 model's head (int8 screen only) returns what a bf16 kernel returns at the
    candidates — each logit rounded to bf16 — so the argmax, first of equal values included,
    is the plain path's. Reference: the exact product (fp64) rounded to bf16. Made so that
    the top logits tie in bf16 (many tokens within 8 bits of the best)."""
    if small != "int8":
        pytest.skip("a bf16 weight is screened by the int8 copy only")
    monkeypatch.setattr(screen, "MAX_ROWS_BF16", screen.MAX_ROWS)  # several rows too (by default: one)
    kind = bf16_kernel(kernel, monkeypatch)
    m = Owner(3000, 64).eval()
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows)) * 2
    with torch.no_grad():
        top = F.linear(x[:1], m.lm_head.weight).argmax()
        for k in range(1, 40):  # near copies of the best row: logits within bf16's resolution of it
            m.lm_head.weight[(int(top) + 37 * k) % 3000] = m.lm_head.weight[top] * (1 - 1e-3 * k / 40)
    m = m.to(torch.bfloat16)
    assert fastpath.enable(m) >= 1 and screen.prepare(m)[0] == 1
    xb = x.to(torch.bfloat16)
    got = run(m, xb)
    ref = reference(m, xb).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and type(m.lm_head._screen) is kind
    assert int((ref[0] == ref[0].max()).sum()) > 1, "no tie to break"
    assert torch.equal(got.float().argmax(-1), ref.float().argmax(-1))
    finite = torch.isfinite(got)
    assert finite.sum() < got.numel() / 4
    assert torch.equal(got[finite], ref[finite])
    assert torch.equal(got.float().argmax(-1), m(xb).float().argmax(-1))  # the plain bf16 kernel's choice


@pytest.mark.parametrize("kernel", BF16_KERNELS)
def test_a_bf16_logits_bias_that_rounds_logits_together_still_gives_the_first_of_them(small, kernel, monkeypatch):
    """bf16(z + 1024) is the same number for logits z a few units apart (bf16's step at 1024
    is 8): the plain path then picks the first of those tokens, not the largest z. The screen
    must keep all of them as candidates to reproduce that."""
    if small != "int8":
        pytest.skip("a bf16 weight is screened by the int8 copy only")
    kind = bf16_kernel(kernel, monkeypatch)
    m = owner(V=3000, d=64, bias=True)
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        m.logits_bias.zero_()
        m.logits_bias[0, :8] = 1024.0
        for k in range(8):
            m.lm_head.weight[k] = x[0] / x[0].dot(x[0]) * (0.5 * k)  # z_k = k/2: the largest at k = 7
    m = m.to(torch.bfloat16)
    screen.release(m.lm_head)
    xb = x.to(torch.bfloat16)
    with torch.no_grad():
        plain = m(xb).float()
    assert int(plain.argmax()) == 0 and float(plain[0, 0]) == float(plain[0, 7])
    assert int(run(m, xb).float().argmax()) == 0 and type(m.lm_head._screen) is kind


@pytest.mark.parametrize("gap", [3e-5, -3e-5, 2e-4, -2e-4])
def test_near_ties_below_bf16s_resolution_go_to_the_larger_fp32_logit(small, gap):
    """Token j's logit is token i's + gap (|gap| far below what bf16 can tell apart at this
    size): the screen keeps both and the exact rescoring picks the right one."""
    m = owner()
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        w = m.lm_head.weight
        i = int(F.linear(x, w).argmax())
        j = (i + 17) % w.shape[0]
        w[j] = w[i] + gap * x[0] / x[0].dot(x[0])  # x·W_j = x·W_i + gap
        w[j] *= 1.0  # bump the version: the bf16 copy is remade
    ref = reference(m, x)[0]
    assert abs(float(ref[j] - ref[i]) - gap) < 1e-6
    assert int(run(m, x).argmax()) == (j if gap > 0 else i)


def test_a_kept_token_can_be_masked_and_the_next_best_is_still_exact(small):
    """The best token, dominating, is masked after the head (a bad word): the true runner-up
    must be among the candidates. Without ``keep`` it would not be (only the best is)."""
    m = owner()
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        top = int(F.linear(x, m.lm_head.weight).argmax())
        m.lm_head.weight[top] = 10 * x[0] / x[0].norm()  # far above everything else
    ref = reference(m, x)[0]
    ref[top] = float("-inf")
    alone = run(m, x)[0]
    assert torch.isfinite(alone).sum() == 1  # what the test guards against
    got = run(m, x, keep=[top])[0]
    got[top] = float("-inf")
    assert int(got.argmax()) == int(ref.argmax())


def test_a_kept_token_whose_logit_overflows_takes_the_plain_product_and_keeps_the_copy(small):
    """A kept token (one a mask removes after the head) whose fp32 logit or bound overflows: its
    check is inf − inf, which says nothing about the copy being stale. The plain product, the
    copy kept: releasing it rebuilt the whole head's copy at every step."""
    m = owner()
    with torch.no_grad():
        m.lm_head.weight[7] = 1e37  # ‖W_7‖ and, for x > 0, x · W_7 > 64e37: past fp32's 3.4e38
    first = None
    for seed in (5, 6, 7):
        x = torch.rand(1, 64, generator=torch.Generator().manual_seed(seed)) + (1.0 if seed == 5 else -0.5)
        out = run(m, x, keep=[7])[0]
        copy = m.lm_head.__dict__.get("_screen")
        assert copy is not None and (first is None or copy is first)  # built once, checked, kept
        first = copy
        with torch.no_grad():
            plain = m.lm_head(x)[0]  # (not screening: the layer's plain product)
        assert torch.equal(out, plain)
    assert out[7] != float("inf") and plain[7] != float("inf")  # (finite logits too: the bound is inf)


def test_a_kept_tokens_row_written_to_nan_in_place_releases_the_copy(small):
    """The other side of the test above: there the copy's own bound overflowed; here the copy is
    finite and W moved under it (a NaN written through .data, no version bump) — a stale copy,
    released, and every step after gives the plain product."""
    m = owner()
    x = torch.rand(1, 64, generator=torch.Generator().manual_seed(5)) - 0.5
    run(m, x, keep=[7])
    built = m.lm_head.__dict__.get("_screen")
    assert built is not None
    m.lm_head.weight.data[7] = float("nan")
    for keep in ([7], []):
        out = run(m, x, keep=keep)[0]
        with torch.no_grad():
            plain = m.lm_head(x)[0]
        assert m.lm_head.__dict__.get("_screen") is not built
        assert torch.isnan(out[7]) and int(out.argmax()) == int(plain.argmax()) == 7


def test_a_kernel_that_breaks_the_bound_is_not_used(small, monkeypatch):
    if small == "bf16":
        monkeypatch.setattr(screen, "U", 2.0**-30)  # a bound far tighter than bf16 can meet
    else:
        real = screen._Int8Copy.approx
        monkeypatch.setattr(screen._Int8Copy, "approx", lambda self, x: (lambda z, b: (z, b * 1e-3))(*real(self, x)))
    refused(small)


def refused(kind: str) -> None:
    """A kernel that fails its check is not used: an fp32 head falls back from int8 to the bf16
    copy (the right argmax), a bf16 head (int8 only) and a failing bf16 copy to the plain product."""
    x = torch.randn(1, 64)
    m = owner()
    out = run(m, x)
    if kind == "bf16":
        assert torch.isfinite(out).all() and m.lm_head._screen_ok is False
        return
    assert type(m.lm_head._screen) is screen._Bf16Copy and int(out.argmax()) == int(reference(m, x).argmax())
    m = Owner(3000, 64).eval().to(torch.bfloat16)
    assert fastpath.enable(m) >= 1 and screen.prepare(m)[0] == 1
    out = run(m, x.to(torch.bfloat16))
    assert torch.isfinite(out).all() and m.lm_head._screen_ok is False


def test_a_kernel_that_raises_is_not_used(small, monkeypatch):
    """A oneDNN build without the op, or refusing its input type: the next kind, or the plain product."""

    def fails(self, w):
        raise RuntimeError("onednn: unsupported")

    monkeypatch.setattr(screen._Int8Copy if small == "int8" else screen._Bf16Copy, "__init__", fails)
    refused(small)


def test_rows_of_very_different_sizes_keep_the_screen_tight(small):
    """One activation scale serves every row of the int8 kernel: each row is first brought to
    the largest by a power of two, so a row 10⁴ times smaller still gets few candidates."""
    m = owner()
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(5)) * torch.tensor([[1e2], [1.0], [1e-2], [3.0]])
    got, ref = run(m, x), reference(m, x)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    assert torch.isfinite(got).sum() < got.numel() / 10


def test_an_int8_kernel_whose_sums_are_not_exact_is_not_used(small, monkeypatch):
    """Sums off by 2⁻¹⁸ (an int16-saturating or rounding kernel would be off by far more),
    under a bound widened to cover them: the bound alone would pass it, the sums' check not."""
    if small != "int8":
        pytest.skip("the int8 kernel's own check")
    real = screen._Int8Copy.approx
    monkeypatch.setattr(
        screen._Int8Copy, "approx", lambda self, x: (lambda z, b: (z * (1 + 2.0**-18), b * 2))(*real(self, x))
    )
    refused(small)


def test_non_finite_inputs_and_many_rows_take_the_plain_product(small):
    m = owner()
    x = torch.randn(2, 64)
    x[0, 3] = float("nan")
    out = run(m, x)
    assert torch.isnan(out[0]).all() and torch.isfinite(out[1]).all()
    many = torch.randn(screen.MAX_ROWS + 1, 64)
    assert torch.isfinite(run(m, many)).all()


def test_screening_is_per_thread_and_training_drops_the_copy(small):
    m = owner()
    x = torch.randn(1, 64)
    seen = {}

    def other() -> None:
        with torch.no_grad():
            seen["z"] = m(x)

    with torch.no_grad(), screen.screening(screen.keep_tensor([])):
        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert not torch.isfinite(m(x)).all()
    assert torch.isfinite(seen["z"]).all()
    assert m.lm_head._screen is not None
    m.train()
    m(x).sum().backward()
    assert m.lm_head._screen is None


def test_fast_path_off_turns_a_screened_head_back_into_a_linear(small):
    m = owner()
    run(m, torch.randn(1, 64))
    assert fastpath.enable(m, False) == 0
    assert type(m.lm_head) is nn.Linear and "_screen" not in m.lm_head.__dict__


def test_masked_ids_beyond_the_logits_are_ignored_as_the_masks_ignore_them(small):
    m = owner()
    x = torch.randn(1, 64)
    got = run(m, x, keep=[5, 3000, 4000])  # V = 3000
    assert int(got.argmax()) == int(reference(m, x).argmax()) and torch.isfinite(got[0, 5])


def test_a_screened_model_copies_and_pickles_and_a_copy_uses_its_own_bias(small):
    import copy
    import io
    import pickle

    m = owner(bias=True)
    x = torch.randn(1, 64)
    run(m, x)
    assert m.lm_head._screen is not None
    pickle.loads(pickle.dumps(m))
    torch.save(m, io.BytesIO())
    clone = copy.deepcopy(m)
    with torch.no_grad():
        clone.logits_bias[0, 123] = 50.0  # the copy's own bias decides
    assert int(run(clone, x).argmax()) == 123 and int(run(m, x).argmax()) != 123


def test_weights_replaced_or_written_through_data_are_not_screened_with_a_stale_copy(small):
    m = owner(V=4096, d=128)
    x = torch.randn(1, 128, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    for _ in range(4):
        run(m, x)  # a copy of the current W
        m.lm_head.weight.data = torch.randn(4096, 128, generator=g)  # a new tensor, perhaps at the old address
        assert int(run(m, x).argmax()) == int(reference(m, x).argmax())
    run(m, x)
    perm = torch.randperm(4096, generator=g)
    m.lm_head.weight.data.copy_(m.lm_head.weight.data[perm].clone())  # in place, no version bump
    for _ in range(2):
        assert int(run(m, x).argmax()) == int(reference(m, x).argmax())


def test_a_weight_cut_through_data_keeps_its_address_and_counter_but_not_its_copy(small):
    """``w.data = w.data[:n]``: the same address and write counter as the W the copy was made
    from; the shape tells them apart (the stale copy's 3,000 rows went into an index of 2,000)."""
    m = owner()
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(4))
    run(m, x)
    w = m.lm_head.weight
    w.data = w.data[:2000]
    out = run(m, x)
    assert out.shape == (1, 2000) and int(out.argmax()) == int(reference(m, x).argmax())


def test_a_huge_logits_bias_cannot_round_the_best_token_away(small):
    """ẑ + c ± b rounds in fp32: with c = 2²⁰ next to logits of ~0.06, the bound must cover it."""
    m = owner(V=64, d=64, bias=True)
    g = torch.Generator().manual_seed(0)
    for t in range(300):
        with torch.no_grad():
            m.lm_head.weight.normal_(0, 1e-4, generator=g)
            x = torch.randn(1, 64, generator=g)
            base = torch.randn(64, generator=g)
            base *= 0.0625 / (base @ x[0])  # x·base = 0.0625: on a rounding boundary of c + ·
            for k in range(8):
                m.lm_head.weight[k] = base + torch.randn(64, generator=g) * 2e-6
            m.logits_bias.zero_()
            m.logits_bias[0, :8] = 2.0**20 + 0.125 * (t % 2)
            plain = m(x)[0]
        got = run(m, x)[0]
        assert int(got.argmax()) == int(plain.argmax()), t


@pytest.mark.parametrize(
    "opts",
    [
        dict(),
        dict(bad_words_ids=[[5], [7, 9]], min_new_tokens=6, eos_token_id=[3]),
        dict(forced_bos_token_id=4, forced_eos_token_id=[2], eos_token_id=[2]),
    ],
)
def test_greedy_decoding_with_the_screen_equals_the_plain_model(small, monkeypatch, opts):
    """Whole decoder-only models, batches with left padding, masks and forced tokens: the same
    tokens as the model with the fast path (and so the screen) off."""
    monkeypatch.setattr(screen, "MAX_CANDIDATES", 1.0)  # every step screens, however close the logits
    calls = []
    real = ScreenedLinear._screened
    monkeypatch.setattr(ScreenedLinear, "_screened", lambda self, *a: calls.append(1) or real(self, *a))
    model = tiny_model(vocab_size=512, d_model=64, n_head=4, tie_embeddings=False).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)
    prompts = [[5, 6, 7, 8, 9], [11, 12], [20]]
    cfg = GenerationConfig(max_new_tokens=12, temperature=0.0, **opts)

    def tokens(fast: bool) -> list[list[int]]:
        model.fast_decoding = fast
        out = [[] for _ in prompts]
        for step in sample(model, prompts, cfg, [None] * len(prompts)):
            for c in step:
                out[c.row].append(c.token)
        return out

    plain = tokens(False)
    assert not calls
    assert tokens(True) == plain
    assert calls, "the screen never ran"
    model.screen_output, n = False, len(calls)
    assert tokens(True) == plain and len(calls) == n
    assert "_screen" not in model.lm_head.__dict__  # the bf16 copy is gone too


@pytest.mark.parametrize("kernel", BF16_KERNELS)
def test_greedy_decoding_of_a_bf16_model_equals_its_plain_kernels(small, monkeypatch, kernel):
    """A bf16 decoder-only model screened (int8 copy) chooses the tokens its plain bf16 output
    layer chooses, near-ties included: 40 prompts with an output layer of wide logits, 16
    tokens each, against the same model with the screen off; and as one batch."""
    if small != "int8":
        pytest.skip("a bf16 weight is screened by the int8 copy only")
    monkeypatch.setattr(screen, "MAX_CANDIDATES", 1.0)
    monkeypatch.setattr(screen, "MAX_ROWS_BF16", screen.MAX_ROWS)  # the batch of 40 stays plain: > 32 rows
    kind = bf16_kernel(kernel, monkeypatch)
    model = tiny_model(vocab_size=2048, d_model=64, n_head=4, tie_embeddings=False).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)
    model.to(torch.bfloat16)
    prompts = [[i % 2048, (7 * i) % 2048, (13 * i + 5) % 2048] for i in range(40)]
    cfg = GenerationConfig(max_new_tokens=16, temperature=0.0, eos_token_id=[])

    def tokens(on: bool, batch: bool = False) -> list[list[int]]:
        model.screen_output = on
        groups = [prompts] if batch else [[p] for p in prompts]
        out = []
        for g in groups:
            rows = [[] for _ in g]
            for step in sample(model, g, cfg, [None] * len(g)):
                for ch in step:
                    rows[ch.row].append(ch.token)
            out += rows
        return out

    screened = tokens(True)
    assert type(model.lm_head.__dict__.get("_screen")) is kind, "the screen never ran"
    assert screened == tokens(False)
    assert tokens(True, batch=True) == screened


@pytest.mark.skipif(not native.available(), reason="lmlab's int8 kernel is not built here")
def test_lmlabs_kernel_screens_a_bf16_head_within_its_bound_and_a_broken_bound_is_refused(monkeypatch):
    """_NativeCopy: its ẑ is within b of x·W_v computed in fp64 (inputs of very different sizes,
    a vocabulary that is not a multiple of 4); its codes take V·d bytes; more rows than it
    screens give no bound (the plain product); and a bound made too tight fails its check."""
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(3001, 64, generator=g) * 0.3).to(torch.bfloat16)
    copy = screen._NativeCopy(w)
    assert copy.check(w) and copy.blocked.codes.numel() == 3001 * 64
    for scale in (1e-3, 1.0, 1e3):
        x = torch.randn(1, 64, generator=g) * scale
        z, b = copy.approx(x)
        exact = F.linear(x.double(), w.double())
        assert bool(((z.double() - exact).abs() <= b.double()).all())
        assert float(b.max()) < 0.05 * float(exact.abs().max())  # a bound that separates
    z, b = copy.approx(torch.randn(2, 64))  # two rows: a bf16 head screens one
    assert torch.isnan(z).all() and torch.isnan(b).all()
    real = screen._NativeCopy.approx
    monkeypatch.setattr(screen._NativeCopy, "approx", lambda self, x: (lambda z, b: (z, b * 1e-4))(*real(self, x)))
    assert not screen._NativeCopy(w).check(w)
    monkeypatch.setattr(screen, "MIN_WEIGHT", 0)
    m = Owner(3000, 64).eval().to(torch.bfloat16)
    assert fastpath.enable(m) >= 1 and screen.prepare(m)[0] == 1
    xb = torch.randn(1, 64, generator=g).to(torch.bfloat16)
    out = run(m, xb)
    fallback = screen._Int8Copy if screen.int8_screen() else type(None)
    assert type(m.lm_head.__dict__.get("_screen")) is fallback
    assert int(out.float().argmax()) == int(m(xb).float().argmax())


@pytest.mark.skipif(not native.available(), reason="lmlab's int8 kernel is not built here")
def test_lmlabs_screen_built_in_parts_and_at_the_edges_of_fp32(monkeypatch):
    """Built in several parts (the last with V mod 4 rows), the codes are native.block's; an
    fp32 sum that overflows though the logit is finite, and inputs near fp32's and bf16's
    underflow, still give the plain bf16 kernel's argmax (or no bound: the plain product)."""
    monkeypatch.setattr(screen, "PART_BYTES", 1)  # parts of CHUNK rows
    g = torch.Generator().manual_seed(4)
    w = (torch.randn(3001, 32, generator=g) * 0.3).to(torch.bfloat16)
    copy = screen._NativeCopy(w)
    from lmlab.nn.int8 import quantize_rows

    assert torch.equal(copy.blocked.codes, native.block(quantize_rows(w.float())[0]).codes) and copy.check(w)
    monkeypatch.setattr(screen, "MIN_WEIGHT", 0)
    monkeypatch.setattr(screen, "NATIVE", None)

    def plain_and_screened(weight: torch.Tensor, x: torch.Tensor) -> tuple[int, int]:
        m = Owner(*weight.shape).eval().to(torch.bfloat16)
        with torch.no_grad():
            m.lm_head.weight.copy_(weight)
        assert fastpath.enable(m) >= 1 and screen.prepare(m)[0] == 1
        xb = x.to(torch.bfloat16)
        got = run(m, xb)
        return int(m(xb).float().argmax()), int(got.float().argmax())

    big = torch.zeros(3000, 32)
    big[0, 0], big[0, 16] = -1.0, 1.0  # z₀ = 0 (the largest), but x₀·q₀ = −1e37·127 overflows in its lane
    big[1:, 0] = big[1:, 16] = -torch.arange(1, 3000) / 3000 * 0.1  # the others below 0, spread out,
    big[1:, 1] = 1.0  # their largest weight where x is 0: their sums stay finite, and the screen separates
    x = torch.zeros(1, 32)
    x[0, 0] = x[0, 16] = 1e37
    plain, screened = plain_and_screened(big, x)
    assert screened == plain == 0
    tiny = torch.zeros(3000, 32)
    tiny[0, 0], tiny[1, 0] = 2.0**-7, 2.0**-5  # logits 2⁻¹⁴⁰ and 2⁻¹³⁸: both 0 in bf16, a tie
    x = torch.zeros(1, 32)
    x[0, 0] = 2.0**-133
    plain, screened = plain_and_screened(tiny, x)
    assert screened == plain == 0


@pytest.mark.skipif(not native.available(), reason="lmlab's int8 kernel is not built here")
def test_a_bf16_head_is_screened_on_lmlabs_kernel_without_vnni(monkeypatch):
    """A CPU with AVX-512 but no exact int8 dot products (no VNNI, no AMX): no oneDNN int8
    screen, but lmlab's kernel screens the bf16 head."""
    monkeypatch.setattr(screen, "INT8", False)
    monkeypatch.setattr(screen, "NATIVE", None)
    monkeypatch.setattr(screen, "MIN_WEIGHT", 0)
    m = Owner(3000, 64).eval().to(torch.bfloat16)
    assert fastpath.enable(m) >= 1 and screen.prepare(m)[0] == 1
    xb = torch.randn(1, 64, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    out = run(m, xb)
    assert type(m.lm_head._screen) is screen._NativeCopy and torch.isfinite(out).sum() < out.numel() / 4
    assert int(out.float().argmax()) == int(m(xb).float().argmax())


def test_a_bf16_head_screens_only_on_request(monkeypatch):
    """``screen_output`` None (the default): an fp32 model's greedy steps read its head through
    the screen's copy, a bf16 model's do not (its int8 copy would be half the head's bytes:
    +14% of a Qwen2-0.5B's memory) — until True; None again drops the copy. The tokens are the
    same either way."""
    if not screen.screenable(torch.zeros(16, 16, dtype=torch.bfloat16)):
        pytest.skip("no screen for a bf16 head on this machine")
    monkeypatch.setattr(screen, "MIN_WEIGHT", 0)
    model = tiny_model(vocab_size=512, d_model=64, n_head=4, tie_embeddings=False).eval()
    cfg = GenerationConfig(max_new_tokens=4, temperature=0.0, eos_token_id=[])

    def tokens() -> list[int]:
        return [c.token for step in sample(model, [[1, 2, 3]], cfg, [None]) for c in step]

    assert model.screen_output is None
    tokens()
    assert "_screen" in model.lm_head.__dict__  # fp32: screened by default
    model.to(torch.bfloat16)
    plain = tokens()
    assert "_screen" not in model.lm_head.__dict__  # bf16: not by default, its fp32-time copy dropped
    model.screen_output = True
    assert tokens() == plain and "_screen" in model.lm_head.__dict__
    model.screen_output = None
    assert tokens() == plain and "_screen" not in model.lm_head.__dict__
    model.screen_output = True
    tokens()
    model.screen_output = None  # then a sampling call: the copy goes too
    list(sample(model, [[1, 2, 3]], GenerationConfig(max_new_tokens=2, temperature=1.0), [0]))
    assert "_screen" not in model.lm_head.__dict__


def test_one_head_per_model_counts_a_bf16_head_left_unscreened(monkeypatch):
    """A module with an fp32 and a bf16 output layer has two heads: not screened (nor a bf16
    head's screen counted out of the one-head rule when bf16 heads are not asked for)."""
    monkeypatch.setattr(screen, "MIN_WEIGHT", 0)

    class Part(nn.Module):
        def __init__(self, dtype: torch.dtype) -> None:
            super().__init__()
            self.lm_head = fastpath.FastLinear(64, 256, bias=False).to(dtype)

    both = nn.Module()
    both.a, both.b = Part(torch.float32), Part(torch.bfloat16)
    assert screen.prepare(both, bf16=False)[0] == 0 and screen.prepare(both, bf16=True)[0] == 0
