"""Generation: logits processors, greedy/sampled decoding, streaming, the sliding window.

References the code under test did not produce: Hugging Face's logits warpers, a
hand-written nanoGPT-style loop over the model's no-cache forward (crop to the last
``max_seq_len`` tokens, recompute, take the argmax), and the tokenizer's own
``decode`` (through ``tokenizers`` and ``transformers``).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from helpers import (
    TOKENIZER_KINDS,
    bpe_tokenizer,
    lmlab_warnings,
    make_tokenizer,
    recorded_warnings,
    tiny_checkpoint,
)
from tokenizers import Tokenizer

import lmlab
from lmlab.cli import main
from lmlab.errors import LmlabError
from lmlab.generate import (
    Choice,
    GenerationConfig,
    IncrementalDecoder,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    process_logits,
)
from lmlab.messages import LmlabWarning
from lmlab.nn.cache import KVCache

CTX = 16  # a small context, so that going beyond it is cheap


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """``ckpt(kind, pos)`` -> a tiny random checkpoint folder, built once per module."""
    made: dict[tuple, Path] = {}

    def get(kind: str = "char", pos: str = "learned", **gen: object) -> Path:
        key = (kind, pos, tuple(sorted(gen.items())))
        if key not in made:
            folder = tmp_path_factory.mktemp(f"{kind}-{pos}") / "ckpt"
            made[key] = tiny_checkpoint(folder, kind, pos=pos, max_seq_len=CTX, generation_config=gen or None)
        return made[key]

    return get


def nanogpt_greedy(module: torch.nn.Module, ids: list[int], n: int, ctx: int) -> list[int]:
    """nanoGPT's ``generate`` with argmax: crop to the last ``ctx`` tokens, run the whole
    window through the model without a cache, append the most likely next token."""
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits, _ = module(torch.tensor([ids[-ctx:]]))  # (1, T, V)
            nxt = int(logits[0, -1].argmax())
            ids.append(nxt)
            out.append(nxt)
    return out


# --------------------------------------------------------------------------- logits processors
def _hf_warpers():
    transformers = pytest.importorskip("transformers")
    return transformers.TemperatureLogitsWarper, transformers.TopKLogitsWarper, transformers.TopPLogitsWarper


def _same_scores(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert torch.equal(torch.isinf(ours), torch.isinf(ref)), "different tokens filtered out"
    finite = torch.isfinite(ref)
    torch.testing.assert_close(ours[finite], ref[finite], atol=1e-6, rtol=0)


@pytest.mark.parametrize("t", [0.3, 0.7, 1.0, 1.8])
def test_temperature_matches_hugging_face(t):
    Temp, _, _ = _hf_warpers()
    logits = torch.randn(4, 97, generator=torch.Generator().manual_seed(1)) * 3
    ids = torch.zeros(4, 1, dtype=torch.long)
    _same_scores(apply_temperature(logits, t), Temp(t)(ids, logits.clone()))


@pytest.mark.parametrize("k", [1, 2, 10, 96, 97, 500])
def test_top_k_matches_hugging_face(k):
    _, TopK, _ = _hf_warpers()
    logits = torch.randn(4, 97, generator=torch.Generator().manual_seed(2)) * 3
    logits[0, :5] = logits[0, 5]  # ties at the k-th value are kept by both
    ids = torch.zeros(4, 1, dtype=torch.long)
    ours = apply_top_k(logits, k)
    _same_scores(ours, TopK(k)(ids, logits.clone()))
    assert (torch.isfinite(ours).sum(-1) >= min(k, 97)).all()


@pytest.mark.parametrize("p", [1e-6, 0.1, 0.5, 0.9, 0.999, 1.0])
def test_top_p_matches_hugging_face(p):
    _, _, TopP = _hf_warpers()
    logits = torch.randn(4, 97, generator=torch.Generator().manual_seed(3)) * 3
    logits[1, 10:] = float("-inf")  # already filtered tokens (as after top-k)
    ids = torch.zeros(4, 1, dtype=torch.long)
    ours = apply_top_p(logits, p)
    _same_scores(ours, TopP(p)(ids, logits.clone()))
    assert torch.isfinite(ours).any(-1).all(), "the most likely token is always kept"


@pytest.mark.parametrize("p", [0.25, 0.5, 0.75])
def test_top_p_boundary_is_inclusive_as_in_hugging_face(p):
    """Equal logits make the cumulative mass hit 1 - p exactly: a token whose mass up to
    it is exactly 1 - p is dropped (``<=``), so exactly p of the mass remains."""
    _, _, TopP = _hf_warpers()
    logits = torch.zeros(1, 4)
    ours = apply_top_p(logits, p)
    _same_scores(ours, TopP(p)(torch.zeros(1, 1, dtype=torch.long), logits.clone()))
    assert int(torch.isfinite(ours).sum()) == round(4 * p)


@pytest.mark.parametrize("t,k,p", [(0.7, 20, 0.9), (1.3, 5, 0.5), (1.0, None, 0.8), (0.5, 40, None)])
def test_processing_chain_matches_hugging_face_order(t, k, p):
    """Temperature, then top-k, then top-p: the order Hugging Face applies them in."""
    Temp, TopK, TopP = _hf_warpers()
    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(4)) * 2
    ids = torch.zeros(3, 1, dtype=torch.long)
    ref = Temp(t)(ids, logits.clone())
    if k:
        ref = TopK(k)(ids, ref)
    if p:
        ref = TopP(p)(ids, ref)
    cfg = GenerationConfig(temperature=t, top_k=k, top_p=p)
    _same_scores(process_logits(logits, cfg), ref)


# --------------------------------------------------------------------------- the Python API
def test_generate_types_and_greedy_is_argmax_step_by_step(ckpt):
    model = lmlab.load(ckpt("char"))
    prompt_ids = model.encode("To be")
    expected = nanogpt_greedy(model.module, prompt_ids, 10, CTX)  # 5 + 10 <= 16: no cropping
    assert len(set(expected)) > 2, "the test model should not just repeat one token"
    out = model.generate("To be", max_new_tokens=10, temperature=0)
    assert isinstance(out, str)
    assert out == model.tokenizer.decode(expected, skip_special_tokens=True)
    assert model.generate_ids("To be", max_new_tokens=10, temperature=0) == expected

    outs = model.generate(["To be", "The"], max_new_tokens=10, temperature=0)
    assert isinstance(outs, list) and all(isinstance(o, str) for o in outs)
    assert outs[0] == out
    assert outs[1] == model.tokenizer.decode(
        nanogpt_greedy(model.module, model.encode("The"), 10, CTX), skip_special_tokens=True
    )


def test_seed_reproducible_and_seeds_differ(ckpt):
    model = lmlab.load(ckpt("char"))
    a = model.generate("To be", max_new_tokens=15, temperature=1.0, seed=7)
    assert a == model.generate("To be", max_new_tokens=15, temperature=1.0, seed=7)
    others = {model.generate("To be", max_new_tokens=15, temperature=1.0, seed=s) for s in (8, 9)}
    assert len(others | {a}) == 3, "different seeds should give different samples"


def test_unseeded_sampling_follows_torch_manual_seed(ckpt):
    """Without a seed, ``torch.manual_seed`` makes sampling reproducible (a Hugging Face
    habit), and sampling does not reseed torch's global generator from the OS: the
    user's random stream after it is reproducible too."""
    model = lmlab.load(ckpt("char"))
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        text = model.generate("To be", max_new_tokens=20, temperature=1.0)
        runs.append((text, torch.rand(3)))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])


def test_top_k_one_and_tiny_top_p_are_greedy(ckpt):
    model = lmlab.load(ckpt("char", "rope"))
    greedy = model.generate_ids("The", max_new_tokens=12, temperature=0)
    assert model.generate_ids("The", max_new_tokens=12, temperature=1.5, top_k=1, seed=3) == greedy
    assert model.generate_ids("The", max_new_tokens=12, temperature=1.5, top_p=1e-9, seed=3) == greedy


def test_sampled_tokens_lie_in_the_top_k(ckpt):
    """Each sampled token is among the k most likely under the model's own logits for
    the text so far (recomputed here without the cache)."""
    model = lmlab.load(ckpt("char"))
    prompt = model.encode("To")
    new = model.generate_ids("To", max_new_tokens=12, temperature=2.0, top_k=3, seed=5)
    ids = list(prompt)
    with torch.no_grad():
        for tok in new:
            logits, _ = model.module(torch.tensor([ids]))
            assert tok in logits[0, -1].topk(3).indices.tolist()
            ids.append(tok)


def test_do_sample_false_in_generation_config_means_greedy(ckpt):
    """A Hugging Face ``generation_config.json`` with ``do_sample: false`` decodes greedily
    unless a temperature is given, also when the caller passes ``temperature=None``."""
    folder = ckpt("char", do_sample=False, bos_token_id=0)
    model = lmlab.load(folder)
    greedy = nanogpt_greedy(model.module, model.encode("To"), 10, CTX)
    assert model.generate_ids("To", max_new_tokens=10) == greedy
    assert model.generate_ids("To", max_new_tokens=10, temperature=None, top_k=None) == greedy
    assert model.generate_ids("To", max_new_tokens=10, temperature=1.0, seed=1) != greedy


# --------------------------------------------------------------------------- decoding to text
@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_text_is_tokenizer_decode_of_new_ids(ckpt, kind):
    """Compare with the tokenizer read straight from ``tokenizer.json``, and with
    ``transformers``' decode of the same file."""
    folder = ckpt(kind)
    model = lmlab.load(folder)
    prompt = "To be 学而"
    new = nanogpt_greedy(model.module, model.encode(prompt), 8, CTX)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    expected = tok.decode(new, skip_special_tokens=True)
    assert model.generate(prompt, max_new_tokens=8, temperature=0) == expected
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    assert hf.decode(new, skip_special_tokens=True) == expected


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_stream_concatenates_to_generate(ckpt, kind):
    model = lmlab.load(ckpt(kind))
    for seed in range(2):
        opts = dict(max_new_tokens=20, temperature=1.5, seed=seed)
        ids = model.generate_ids("To be", **opts)
        deltas = list(model.stream("To be", **opts))
        assert all(deltas), "no empty deltas"
        assert "".join(deltas) == model.generate("To be", **opts)
        assert "".join(deltas) == model.tokenizer.decode(ids, skip_special_tokens=True)


def _byte_tokens(tok: Tokenizer, data: bytes) -> list[int]:
    """The ids of single-byte tokens (GPT-2's byte -> printable character table)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    ids = [tok.token_to_id(table[b]) for b in data]
    assert None not in ids
    return ids


def test_incremental_decoder_holds_partial_utf8():
    tok = bpe_tokenizer()
    zhong = _byte_tokens(tok, "中".encode())  # 3 tokens, one byte each
    assert len(zhong) == 3 and tok.decode(zhong[:2]).endswith("\ufffd")
    ids = _byte_tokens(tok, b"a") + zhong + _byte_tokens(tok, b"b")
    dec = IncrementalDecoder(tok)
    deltas = [dec.push(i) for i in ids]
    assert deltas == ["a", "", "", "中", "b"], "the character appears whole, when its last byte arrives"
    assert dec.finish() == ""

    # Bytes that never complete: emitted at the end exactly as decode renders them.
    ids = _byte_tokens(tok, b"x") + zhong[:2]
    dec = IncrementalDecoder(tok)
    deltas = [dec.push(i) for i in ids] + [dec.finish()]
    assert deltas == ["x", "", "", "\ufffd"]
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True)

    # An incomplete character followed by other text is rendered as decode renders it.
    ids = zhong[:1] + _byte_tokens(tok, b"c")
    dec = IncrementalDecoder(tok)
    deltas = [dec.push(i) for i in ids] + [dec.finish()]
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True)
    assert deltas[0] == ""


def test_incremental_decoder_with_merged_tokens_across_characters():
    """A BPE token may hold the last byte of one character and the first of the next."""
    tok = bpe_tokenizer()
    ids = tok.encode("学而时习之，不亦说乎").ids
    assert len(ids) > 3 and any(tok.decode(ids[:i]).endswith("\ufffd") for i in range(1, len(ids)))
    dec = IncrementalDecoder(tok)
    text = ""
    for i, t in enumerate(ids):
        text += dec.push(t)
        assert "\ufffd" not in text
        assert tok.decode(ids[: i + 1]).startswith(text)
    text += dec.finish()
    assert text == "学而时习之，不亦说乎"


def test_stream_of_split_chinese_characters(ckpt, monkeypatch):
    """Drive ``Model.stream`` with scripted token ids in which Chinese characters span
    several byte tokens: no delta shows a U+FFFD that later becomes a character."""
    model = lmlab.load(ckpt("bpe"))
    tok = model.tokenizer
    script = (
        _byte_tokens(tok, b"To ")
        + _byte_tokens(tok, "中".encode())
        + tok.encode("学而时习之").ids
        + _byte_tokens(tok, "乐".encode())[:2]
    )

    def scripted(module, rows, cfg, seeds, penalties=None, should_stop=None):
        for i, t in enumerate(script):
            yield [Choice(0, t, "length" if i == len(script) - 1 else None)]

    monkeypatch.setattr("lmlab.generate.text.sample", scripted)
    deltas = list(model.stream("x"))
    final = tok.decode(script, skip_special_tokens=True)
    assert final == "To 中学而时习之\ufffd"
    assert "".join(deltas) == final == model.generate("x")
    assert all("\ufffd" not in d for d in deltas[:-1]) and deltas[-1] == "\ufffd"


# --------------------------------------------------------------------------- beyond the context
@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_sliding_window_matches_nanogpt_crop(ckpt, pos):
    model = lmlab.load(ckpt("char", pos))
    prompt = model.encode("To be")
    n = 3 * CTX
    expected = nanogpt_greedy(model.module, prompt, n, CTX)
    with recorded_warnings() as caught:
        assert model.generate_ids("To be", max_new_tokens=n, temperature=0) == expected
    said = lmlab_warnings(caught)
    assert len(said) == 1, said
    assert str(CTX) in said[0]
    # The stream goes beyond the context the same way, and also warns once.
    with recorded_warnings() as caught:
        text = "".join(model.stream("To be", max_new_tokens=n, temperature=0))
    assert text == model.tokenizer.decode(expected, skip_special_tokens=True)
    assert len(lmlab_warnings(caught)) == 1
    # Sampling beyond the context never fails either.
    assert len(model.generate_ids("To be", max_new_tokens=n, temperature=1.0, seed=0)) == n


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_filling_the_context_exactly_does_not_warn(ckpt, pos):
    """The last of n new tokens is predicted from prompt + n - 1 tokens: with
    prompt + n - 1 == max_seq_len nothing is cropped, so nothing to warn about."""
    model = lmlab.load(ckpt("char", pos))
    prompt = model.encode("To be")
    n = CTX - len(prompt) + 1
    with recorded_warnings() as caught:
        assert model.generate_ids("To be", max_new_tokens=n, temperature=0) == nanogpt_greedy(
            model.module, prompt, n, CTX
        )
    assert lmlab_warnings(caught) == []


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_prompt_longer_than_context_is_left_truncated(ckpt, pos):
    model = lmlab.load(ckpt("char", pos))
    prompt_text = "To be, or not to be, that is the question"
    prompt = model.encode(prompt_text)
    assert len(prompt) > 2 * CTX
    n = 20
    expected = nanogpt_greedy(model.module, prompt, n, CTX)
    assert expected == nanogpt_greedy(model.module, prompt[-CTX:], n, CTX)
    with recorded_warnings() as caught:
        assert model.generate_ids(prompt_text, max_new_tokens=n, temperature=0) == expected
    said = lmlab_warnings(caught)
    assert len(said) == 1, said
    assert "prompt" in said[0] and str(len(prompt)) in said[0]
    with pytest.warns(LmlabWarning, match="prompt"):
        assert model.generate_ids(prompt_text, max_new_tokens=1, temperature=0) == expected[:1]


# --------------------------------------------------------------------------- the KV cache's size
@pytest.fixture
def caches(monkeypatch):
    """Every KV cache the Transformer allocates during the test, with its shape at allocation."""
    made: list[tuple[KVCache, tuple[int, ...]]] = []

    class Recorded(KVCache):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append((self, self.shape))

    monkeypatch.setattr("lmlab.models.transformer.KVCache", Recorded)
    return made


BIG_CTX = 4096  # a long context (a 32k Qwen in miniature): the cache must not be this long


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_kv_cache_holds_what_the_request_needs_not_the_context(tmp_path, caches, pos):
    """Slots needed = P + n - 1 (P prompt tokens, n new ones; the last new token is never fed
    back), counted by hand here; rows = prompts (× beams). Tokens equal the no-cache crop."""
    model = lmlab.load(tiny_checkpoint(tmp_path / "c", "char", pos=pos, max_seq_len=BIG_CTX))
    cfg, n = model.module.config, 7

    def shape(rows: int, slots: int) -> tuple[int, ...]:  # (n_layer, B, n_kv_head, max_len, head_dim)
        return (cfg.n_layer, rows, cfg.n_kv_head, slots, cfg.head_dim)

    short, long = model.encode("To be"), model.encode("or not to be, that")
    assert model.generate_ids("To be", max_new_tokens=n, temperature=0) == nanogpt_greedy(
        model.module, short, n, BIG_CTX
    )
    (cache, allocated), *rest = caches
    assert not rest and allocated == shape(1, len(short) + n - 1) == cache.shape

    caches.clear()  # a left-padded batch: as many slots as its longest prompt needs
    pair = ["To be", "or not to be, that"]
    rows = model.generate(pair, max_new_tokens=n, temperature=0, return_details=True)
    alone = [nanogpt_greedy(model.module, p, n, BIG_CTX) for p in (short, long)]
    assert [r.token_ids for r in rows] == alone
    assert [a for _, a in caches] == [shape(2, len(long) + n - 1)]

    caches.clear()  # beam search: one row per prompt for the prompt, then num_beams rows per prompt
    model.generate(pair, max_new_tokens=n, num_beams=3)
    ((cache, allocated),) = caches
    assert allocated == shape(2, len(long) + n - 1)
    assert cache.shape == shape(2 * 3, len(long) + n - 1)
    assert tuple(cache.key_mask(cache.max_len).shape) == (2 * 3, len(long) + n - 1)


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_kv_cache_is_static_and_capped_at_the_context(ckpt, caches, pos):
    """One cache, allocated once and written in place (same storage at every step: no
    per-token allocation or concatenation), never longer than max_seq_len; past it the
    sliding window takes over and the tokens are still nanoGPT's crop."""
    model = lmlab.load(ckpt("char", pos))
    prompt, n = model.encode("To be"), 3 * CTX
    seen: list[tuple[int, int]] = []

    def spy(module, args, kwargs):
        state = args[1] if len(args) > 1 else kwargs.get("state")
        if state is not None:
            seen.append((state._k.data_ptr(), state._v.data_ptr()))  # the storage, behind the methods

    hook = model.module.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        got = model.generate_ids("To be", max_new_tokens=n, temperature=0)
    finally:
        hook.remove()
    assert got == nanogpt_greedy(model.module, prompt, n, CTX)
    ((cache, allocated),) = caches
    assert allocated[3] == CTX < len(prompt) + n - 1
    # prefill + one step per slot after the prompt, then the window recomputes without a cache
    assert len(seen) == 1 + CTX - len(prompt) and len(set(seen)) == 1


# --------------------------------------------------------------------------- stopping and options
def test_eos_token_stops_generation(ckpt):
    folder = ckpt("char")
    model = lmlab.load(folder)
    greedy = nanogpt_greedy(model.module, model.encode("To be"), 12, CTX)
    k = next(i for i in range(1, 12) if greedy[i] not in greedy[:i])  # first time this token appears
    eos = greedy[k]
    out = model.generate_ids("To be", max_new_tokens=12, temperature=0, eos_token_id=eos)
    assert out == greedy[: k + 1]
    stored = lmlab.load(ckpt("char", eos_token_id=eos, bos_token_id=0))
    assert stored.generate_ids("To be", max_new_tokens=12, temperature=0) == greedy[: k + 1]
    assert stored.generate("To be", max_new_tokens=12, temperature=0) == model.tokenizer.decode(
        greedy[: k + 1], skip_special_tokens=True
    )


def test_empty_prompt_starts_from_bos(ckpt):
    model = lmlab.load(ckpt("char", bos_token_id=0))
    assert model.generate_ids("", max_new_tokens=6, temperature=0) == nanogpt_greedy(
        model.module, [0], 6, CTX
    )
    no_bos = lmlab.load(ckpt("char", eos_token_id=0))
    with pytest.raises(LmlabError, match="empty"):
        no_bos.generate("", max_new_tokens=3)
    with pytest.raises(LmlabError, match="empty"):
        list(no_bos.stream("", max_new_tokens=3))


@pytest.mark.parametrize(
    "options,message",
    [
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": -0.2}, "top_p"),
        ({"temperature": -0.5}, "temperature"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"top_k": -3}, "top_k"),
    ],
)
def test_bad_options_raise_lmlab_error(ckpt, options, message):
    model = lmlab.load(ckpt("char"))
    with pytest.raises(LmlabError, match=message):
        model.generate("To be", **options)
    with pytest.raises(LmlabError, match=message):
        list(model.stream("To be", **options))


def test_zero_new_tokens_is_empty(ckpt):
    model = lmlab.load(ckpt("char"))
    assert model.generate("To be", max_new_tokens=0) == ""
    assert list(model.stream("To be", max_new_tokens=0)) == []


def test_word_level_stream_joins_words_with_spaces(ckpt):
    model = lmlab.load(ckpt("word"))
    tok = make_tokenizer("word")
    ids = model.generate_ids("To be", max_new_tokens=6, temperature=1.0, seed=2)
    words = [tok.id_to_token(i) for i in ids if i > 1]  # 0, 1: special tokens, skipped
    assert "".join(model.stream("To be", max_new_tokens=6, temperature=1.0, seed=2)) == " ".join(words)


@pytest.mark.parametrize("prompt", [["To", "be"], 5, None])
def test_prompt_of_the_wrong_type_is_a_user_error(ckpt, prompt):
    model = lmlab.load(ckpt("char"))
    with pytest.raises(LmlabError, match="prompt"):
        list(model.stream(prompt, max_new_tokens=2))
    if not isinstance(prompt, list):
        with pytest.raises(LmlabError, match="prompt"):
            model.generate(prompt, max_new_tokens=2)


# --------------------------------------------------------------------------- warnings and details
@pytest.mark.parametrize("num_beams", [1, 2])
def test_sliding_window_warning_comes_before_the_first_delta(ckpt, num_beams):
    """Whether the window will slide is known before the first token (prompt + max_new_tokens
    - 1 > context): the warning is said then, once per call, not in the middle of the text."""
    model = lmlab.load(ckpt("char", "rope"))
    n = 3 * CTX
    with recorded_warnings() as caught:
        stream = model.stream("To be", max_new_tokens=n, temperature=0, num_beams=num_beams)
        first = next(stream)
        said = lmlab_warnings(caught)
        assert first and len(said) == 1, said
        assert f"({len(model.encode('To be'))} tokens) + max_new_tokens ({n}) may run past" in said[0]
        assert f"context of {CTX} tokens" in said[0] and f"sliding window of the last {CTX} tokens" in said[0]
        rest = "".join(stream)
        assert len(lmlab_warnings(caught)) == 1  # once per call
        again = model.generate("To be", max_new_tokens=n, temperature=0, num_beams=num_beams)
        assert first + rest == again
        assert len(lmlab_warnings(caught)) == 2  # and once for the next call


def test_unknown_character_warning_names_the_callers_line(ckpt):
    """The warning points at the line that called lmlab (here, this file), whatever the
    depth of lmlab's own frames under it."""
    calls = {
        "encode": lambda m: m.encode("龘 To be"),
        "generate": lambda m: m.generate("龘 To be", max_new_tokens=2),
        "generate a batch": lambda m: m.generate(["To", "龘 To be"], max_new_tokens=2),
        "stream": lambda m: list(m.stream("龘 To be", max_new_tokens=2)),
    }
    for name, call in calls.items():
        model = lmlab.load(ckpt("char"))  # a fresh model: the warning comes once per model
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call(model)
        unk = [w for w in caught if "never saw" in str(w.message)]
        assert len(unk) == 1, name
        assert Path(unk[0].filename).resolve() == Path(__file__).resolve(), (name, unk[0].filename)


def test_json_logprobs_alternatives_are_plain_tokens(ckpt, capsys):
    """Each alternative under "top" is {token_id, token, logprob}: the model's n most likely
    tokens, recomputed here with a no-cache forward (greedy: the chosen token is the first)."""
    folder = ckpt("char", "rope")
    model = lmlab.load(folder)
    args = ["generate", str(folder), "--prompt", "To be", "--max-new-tokens", "4", "--temperature", "0"]
    capsys.readouterr()
    assert main([*args, "--json", "--logprobs", "3"]) == 0
    r = json.loads(capsys.readouterr().out)
    ids = model.encode("To be")
    assert len(r["logprobs"]) == 4
    for t in r["logprobs"]:
        with torch.no_grad():
            logp = torch.log_softmax(model.module(torch.tensor([ids]))[0][0, -1].float(), dim=-1)
        vals, top = logp.topk(3)
        assert set(t) == {"token_id", "token", "logprob", "top"}
        assert t["token_id"] == int(top[0]) and t["logprob"] == pytest.approx(float(vals[0]), abs=1e-5)
        assert [set(a) for a in t["top"]] == [{"token_id", "token", "logprob"}] * 3
        assert [a["token_id"] for a in t["top"]] == top.tolist()
        pieces = [model.tokenizer.decode([i], skip_special_tokens=False) for i in top.tolist()]
        assert [a["token"] for a in t["top"]] == pieces  # special tokens by name (<unk>)
        assert [a["logprob"] for a in t["top"]] == pytest.approx(vals.tolist(), abs=1e-5)
        ids.append(t["token_id"])
