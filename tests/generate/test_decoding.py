"""The decoding toolbox (issue 5), checked against references the code did not produce.

- every logits processor vs the ``transformers`` LogitsProcessor/warper on the same logits;
- presence/frequency penalties vs OpenAI's formula computed by hand;
- greedy and beam search vs ``transformers`` ``generate`` on tiny imported gpt2 and llama
  models (random weights, a byte-level BPE trained here), token for token, also left-padded
  batches; log-probs vs ``compute_transition_scores``;
- batched rows vs the same prompts alone; beam search on an RNN vs a stateless re-run;
- stop strings and streaming vs ``str.find`` on the plain decoded text.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import char_tokenizer, lmlab_warnings, recorded_warnings, tiny_checkpoint
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import lmlab
from lmlab.api import Model
from lmlab.cli import main
from lmlab.errors import LmlabError
from lmlab.generate import (
    GenerationConfig,
    Penalties,
    TextStream,
    apply_bad_words,
    apply_min_new_tokens,
    apply_min_p,
    apply_no_repeat_ngram,
    apply_presence_frequency,
    apply_repetition_penalty,
    apply_typical_p,
    beam_search,
    process_logits,
)
from lmlab.models import build_model
from lmlab.models.base import LanguageModel
from lmlab.models.config import RNNConfig
from lmlab.models.rnn import RecurrentState

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
tlp = transformers.generation.logits_process

TEXT = (
    "First Citizen: Before we proceed any further, hear me speak.\n"
    "All: Speak, speak. You are all resolved rather to die than to famish?\n"
    "学而时习之，不亦说乎？有朋自远方来，不亦乐乎？\n"
) * 20
PROMPTS = ["First Citizen", "All: Speak, speak. You are", "we"]
CTX = 16


# --------------------------------------------------------------------------- tiny HF models
@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """name -> (lmlab Model, transformers model) of one tiny random HF folder, built once."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT], trainer=trainer)
    ids = dict(bos_token_id=0, eos_token_id=2, pad_token_id=0, initializer_range=0.3)
    configs = {
        "gpt2": lambda: transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, **ids),
        "llama": lambda: transformers.LlamaConfig(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
            **ids,
        ),
    }
    made: dict[str, tuple[Model, torch.nn.Module]] = {}

    def get(name: str) -> tuple[Model, torch.nn.Module]:
        if name not in made:
            cfg = configs[name]()
            cfg.vocab_size = tok.get_vocab_size()
            torch.manual_seed(0)
            ref = transformers.AutoModelForCausalLM.from_config(cfg).eval()
            folder = tmp_path_factory.mktemp(name)
            ref.save_pretrained(folder)
            tok.save(str(folder / "tokenizer.json"))
            made[name] = lmlab.load(folder), ref
        return made[name]

    return get


def _hf_generate(ref, model: Model, prompts: list[str], **kw) -> list[list[int]]:
    """transformers' new tokens for left-padded prompts; what it appends after a sequence
    ended (the fill value: pad id, or the first EOS when the pad id is 0) is cut off."""
    enc = [model.encode(p) for p in prompts]
    P = max(map(len, enc))
    x = torch.tensor([[0] * (P - len(e)) + e for e in enc])
    mask = torch.tensor([[0] * (P - len(e)) + [1] * len(e) for e in enc])
    eos = kw.get("eos_token_id", [2])
    eos = [eos] if isinstance(eos, int) else eos
    with torch.no_grad():
        out = ref.generate(
            x, attention_mask=mask, do_sample=False, pad_token_id=0, **{"eos_token_id": eos, **kw}
        )
    seqs = []
    for row in out[:, P:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        seqs.append(row[:cut])
    return seqs


def _flat(results) -> list:
    return [r for g in results for r in (g if isinstance(g, list) else [g])]


# --------------------------------------------------------------------------- processors
def _scores(B: int = 4, V: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 3


def _ids(B: int = 4, L: int = 12, V: int = 8, seed: int = 1) -> torch.Tensor:
    """Histories over a few token ids, so that repeats and repeated n-grams occur."""
    return torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(seed))


def _same(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert torch.equal(torch.isinf(ours), torch.isinf(ref)), "different tokens filtered out"
    finite = torch.isfinite(ref)
    torch.testing.assert_close(ours[finite], ref[finite], atol=1e-6, rtol=0)


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(penalty):
    scores, ids = _scores(), _ids()
    ref = tlp.RepetitionPenaltyLogitsProcessor(penalty)(ids, scores.clone())
    _same(apply_repetition_penalty(scores, ids.tolist(), penalty), ref)
    assert not torch.equal(ref, scores)


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.3, 0.9, 1.0])
def test_min_p_matches_transformers(min_p):
    scores = _scores()
    ref = tlp.MinPLogitsWarper(min_p)(None, scores.clone())
    _same(apply_min_p(scores, min_p), ref)


@pytest.mark.parametrize("mass", [0.05, 0.3, 0.7, 0.95])
def test_typical_p_matches_transformers(mass):
    scores = _scores()
    scores[1, 30:] = float("-inf")  # already filtered tokens
    ref = tlp.TypicalLogitsWarper(mass)(None, scores.clone())
    _same(apply_typical_p(scores, mass), ref)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_matches_transformers(n):
    scores, ids = _scores(), _ids(L=20, V=5)
    ref = tlp.NoRepeatNGramLogitsProcessor(n)(ids, scores.clone())
    ours = apply_no_repeat_ngram(scores, ids.tolist(), n)
    _same(ours, ref)
    assert torch.isinf(ours).any()


def test_bad_words_match_transformers():
    scores, ids = _scores(), _ids(L=6)
    ids[0, -2:] = torch.tensor([3, 4])  # row 0 ends with the prefix of [3, 4, 9]
    ids[1, -1] = 6  # row 1 with the prefix of [6, 7]
    bad = [[5], [3, 4, 9], [6, 7], [2]]  # [2] is the EOS: transformers does not forbid it
    ref = tlp.NoBadWordsLogitsProcessor(bad, eos_token_id=2)(ids, scores.clone())
    penalties = Penalties(GenerationConfig(bad_words_ids=bad, eos_token_id=2))
    assert penalties.bad_words_ids == [[5], [3, 4, 9], [6, 7]]
    ours = apply_bad_words(scores, ids.tolist(), penalties.bad_words_ids)
    _same(ours, ref)
    assert torch.isinf(ours[0, 9]) and torch.isinf(ours[1, 7]) and not torch.isinf(ours[2, 7])


@pytest.mark.parametrize("n_new", [0, 2, 3, 5])
def test_min_new_tokens_matches_transformers(n_new):
    scores, ids = _scores(), _ids(L=7 + n_new)
    ref = tlp.MinNewTokensLengthLogitsProcessor(7, 3, [2, 11])(ids, scores.clone())
    _same(apply_min_new_tokens(scores, n_new, 3, [2, 11]), ref)


@pytest.mark.parametrize(
    "opts",
    [
        dict(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05),
        dict(temperature=1.3, top_p=0.8, typical_p=0.9),
        dict(temperature=0.5, min_p=0.1, typical_p=0.5),
    ],
)
def test_warper_chain_matches_transformers_order(opts):
    """Temperature, top-k, top-p, min-p, typical-p: the order transformers' generate builds."""
    scores = _scores()
    ref = scores.clone()
    warpers = [
        tlp.TemperatureLogitsWarper(opts["temperature"]),
        tlp.TopKLogitsWarper(opts["top_k"]) if "top_k" in opts else None,
        tlp.TopPLogitsWarper(opts["top_p"]) if "top_p" in opts else None,
        tlp.MinPLogitsWarper(opts["min_p"]) if "min_p" in opts else None,
        tlp.TypicalLogitsWarper(opts["typical_p"]) if "typical_p" in opts else None,
    ]
    for w in warpers:
        if w is not None:
            ref = w(None, ref)
    _same(process_logits(scores, GenerationConfig(**opts)), ref)


def test_penalty_chain_matches_transformers_processor_list():
    scores, ids = _scores(), _ids(L=10, V=6)
    cfg = GenerationConfig(
        repetition_penalty=1.5,
        no_repeat_ngram_size=2,
        bad_words_ids=[[1, 3]],
        min_new_tokens=4,
        eos_token_id=[0],
    )
    ref = tlp.LogitsProcessorList(
        [
            tlp.RepetitionPenaltyLogitsProcessor(1.5),
            tlp.NoRepeatNGramLogitsProcessor(2),
            tlp.NoBadWordsLogitsProcessor([[1, 3]], eos_token_id=[0]),
            tlp.MinNewTokensLengthLogitsProcessor(8, 4, [0]),
        ]
    )(ids, scores.clone())
    _same(Penalties(cfg)(scores, ids.tolist(), [8] * 4, 2), ref)


@pytest.mark.parametrize("presence,frequency", [(0.5, 0.0), (0.0, 0.7), (1.2, -0.4)])
def test_presence_and_frequency_penalties_follow_openai_formula(presence, frequency):
    """mu[j] - c[j]·frequency - [c[j] > 0]·presence, with c[j] counted over the generated
    tokens only (the prompt is not penalised), written out with Python loops."""
    scores, ids = _scores(V=9), _ids(L=12, V=9)
    prompt_lens = [3, 0, 12, 7]
    expected = scores.clone()
    for b in range(4):
        generated = ids[b, prompt_lens[b] :].tolist()
        for j in range(9):
            c = generated.count(j)
            expected[b, j] = scores[b, j] - c * frequency - (1.0 if c > 0 else 0.0) * presence
    generated = [ids[b, prompt_lens[b] :].tolist() for b in range(4)]
    torch.testing.assert_close(apply_presence_frequency(scores, generated, presence, frequency), expected)
    cfg = GenerationConfig(presence_penalty=presence, frequency_penalty=frequency)
    torch.testing.assert_close(Penalties(cfg)(scores, ids.tolist(), prompt_lens, 5), expected)


# --------------------------------------------------------------------------- parity with generate
@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize(
    "opts",
    [
        dict(),
        dict(repetition_penalty=1.4, no_repeat_ngram_size=3, min_new_tokens=4, eos_token_id=[31, 64]),
        dict(eos_token_id=[215, 201], repetition_penalty=0.8),
    ],
)
def test_greedy_batch_equals_transformers_generate(hf, name, opts):
    model, ref = hf(name)
    want = _hf_generate(ref, model, PROMPTS, max_new_tokens=16, **opts)
    got = model.generate(PROMPTS, max_new_tokens=16, temperature=0, return_details=True, **opts)
    assert [r.token_ids for r in got] == want
    for r in got:
        ended = bool(r.token_ids) and r.token_ids[-1] in opts.get("eos_token_id", [2])
        assert r.finish_reason == ("eos" if ended else "length")
    alone = [model.generate_ids(p, max_new_tokens=16, temperature=0, **opts) for p in PROMPTS]
    assert alone == want


def test_bad_words_as_strings_equal_transformers_bad_words_ids(hf):
    model, ref = hf("gpt2")
    plain = model.generate_ids(PROMPTS[0], max_new_tokens=12, temperature=0)
    word = model.tokenizer.decode(plain[1:3])  # two tokens the model would produce
    bad_ids = [model.tokenizer.encode(word, add_special_tokens=False).ids, plain[5:6]]
    want = _hf_generate(ref, model, PROMPTS[:1], max_new_tokens=12, bad_words_ids=bad_ids)[0]
    got = model.generate_ids(
        PROMPTS[0], max_new_tokens=12, temperature=0, bad_words=[word], bad_words_ids=[plain[5:6]]
    )
    assert got == want != plain
    assert word not in model.decode(got)


BEAMS = [
    dict(num_beams=3),
    dict(num_beams=4, length_penalty=0.5, early_stopping=True, num_return_sequences=2),
    dict(num_beams=2, length_penalty=-1.0, early_stopping="never", num_return_sequences=2),
    dict(
        num_beams=3, length_penalty=1.5, early_stopping=False, repetition_penalty=1.3, no_repeat_ngram_size=2
    ),
]


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("opts", BEAMS)
def test_beam_search_equals_transformers_generate(hf, name, opts):
    """With EOS tokens the model does produce, so that hypotheses finish at different steps."""
    model, ref = hf(name)
    eos = [215, 201] if name == "gpt2" else [201, 58]
    want = _hf_generate(ref, model, PROMPTS, max_new_tokens=15, eos_token_id=eos, **opts)
    got = _flat(model.generate(PROMPTS, max_new_tokens=15, eos_token_id=eos, return_details=True, **opts))
    assert [r.token_ids for r in got] == want
    assert {r.finish_reason for r in got} <= {"eos", "length"}
    first = model.generate(PROMPTS[1], max_new_tokens=15, eos_token_id=eos, **opts)
    n = opts.get("num_return_sequences", 1)
    assert first == ([model.decode(w) for w in want[n : 2 * n]] if n > 1 else model.decode(want[1]))


def test_beam_scores_and_logprobs_equal_transformers(hf):
    model, ref = hf("gpt2")
    x = torch.tensor([model.encode(PROMPTS[0])])
    opts = dict(
        num_beams=3, length_penalty=0.7, num_return_sequences=3, max_new_tokens=10, eos_token_id=[215]
    )
    with torch.no_grad():
        out = ref.generate(
            x, attention_mask=torch.ones_like(x), do_sample=False, pad_token_id=0,
            output_scores=True, return_dict_in_generate=True, **opts,
        )  # fmt: skip
    hf_steps = ref.compute_transition_scores(
        out.sequences, out.scores, out.beam_indices, normalize_logits=False
    )
    got = model.generate(PROMPTS[0], return_details=True, logprobs=2, **opts)
    for j, r in enumerate(got):
        n = len(r.token_ids)
        assert r.score == pytest.approx(float(out.sequences_scores[j]), abs=1e-5)
        torch.testing.assert_close(
            torch.tensor([t.logprob for t in r.logprobs]), hf_steps[j, :n], atol=1e-5, rtol=0
        )
        assert r.score == pytest.approx(sum(t.logprob for t in r.logprobs) / n**0.7, abs=1e-5)
        assert all(len(t.top) == 2 and t.top[0].logprob >= t.logprob for t in r.logprobs)


def test_greedy_logprobs_equal_compute_transition_scores(hf):
    model, ref = hf("llama")
    x = torch.tensor([model.encode(PROMPTS[1])])
    with torch.no_grad():
        out = ref.generate(
            x, attention_mask=torch.ones_like(x), do_sample=False, pad_token_id=0, max_new_tokens=8,
            repetition_penalty=1.3, output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip
    steps = ref.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)[0]
    r = model.generate(
        PROMPTS[1], max_new_tokens=8, temperature=0, repetition_penalty=1.3, logprobs=3, return_details=True
    )
    assert r.token_ids == out.sequences[0, x.shape[1] :].tolist()
    torch.testing.assert_close(torch.tensor([t.logprob for t in r.logprobs]), steps, atol=1e-5, rtol=0)
    for t, scores in zip(r.logprobs, out.scores):
        logp = torch.log_softmax(scores[0], -1)
        vals, ids = logp.topk(3)
        assert [a.token_id for a in t.top] == ids.tolist() and t.top[0].token_id == t.token_id
        torch.testing.assert_close(torch.tensor([a.logprob for a in t.top]), vals, atol=1e-5, rtol=0)
        assert t.token == model.tokenizer.decode([t.token_id])


def test_sampled_logprobs_are_those_of_the_filtered_distribution(hf):
    """Recomputed by hand with the model's no-cache forward: log softmax(top-k(z / T))."""
    model, _ = hf("gpt2")
    r = model.generate(
        PROMPTS[0], max_new_tokens=6, temperature=0.7, top_k=5, seed=3, logprobs=8, return_details=True
    )
    ids = model.encode(PROMPTS[0])
    for t in r.logprobs:
        with torch.no_grad():
            z = model.module(torch.tensor([ids]))[0][0, -1] / 0.7
        kth = z.topk(5).values[-1]
        logp = torch.log_softmax(z.masked_fill(z < kth, float("-inf")), -1)
        assert t.logprob == pytest.approx(float(logp[t.token_id]), abs=1e-5)
        assert len(t.top) == 5  # the filtered-out tokens (-inf) are not alternatives
        ids.append(t.token_id)


# --------------------------------------------------------------------------- batches
def test_sampled_batch_rows_equal_each_prompt_alone(hf):
    model, _ = hf("llama")
    opts = dict(max_new_tokens=12, temperature=1.2, top_p=0.95, min_p=0.02, presence_penalty=0.5, seed=7)
    batch = model.generate(PROMPTS, **opts)
    assert batch == [model.generate(p, **opts) for p in PROMPTS]
    assert batch == model.generate(PROMPTS, **opts), "seeded sampling is reproducible"
    assert batch != model.generate(PROMPTS, **{**opts, "seed": 8})
    several = model.generate(PROMPTS[:2], num_return_sequences=3, **opts)
    assert [len(g) for g in several] == [3, 3] and len(set(several[0])) == 3
    assert several[0][0] == batch[0], "the first sample of a prompt is the one it gets alone"


def test_rows_that_finish_early_leave_the_others_unchanged(hf):
    model, _ = hf("llama")
    alone = [model.generate_ids(p, max_new_tokens=14, temperature=0) for p in PROMPTS]
    eos = next(t for t in alone[1][:5] if t not in alone[0])  # ends the second row early, not the first
    got = model.generate(PROMPTS, max_new_tokens=14, temperature=0, eos_token_id=eos, return_details=True)
    for r, a in zip(got, alone):
        cut = a.index(eos) + 1 if eos in a else len(a)
        assert r.token_ids == a[:cut]
    assert got[1].finish_reason == "eos" and len(got[1].token_ids) <= 5
    assert got[0].finish_reason == "length" and len(got[0].token_ids) == 14


def test_batch_beyond_the_context_slides_each_row(tmp_path):
    """Rows of different lengths past max_seq_len = nanoGPT's crop-and-recompute, per row."""
    model = lmlab.load(tiny_checkpoint(tmp_path / "c", "char", max_seq_len=CTX))
    prompts = ["To be, or not", "The", "Whether 'tis nobler in the mind"]
    n = 2 * CTX

    def crop_greedy(ids: list[int]) -> list[int]:
        ids, out = list(ids), []
        with torch.no_grad():
            for _ in range(n):
                out.append(int(model.module(torch.tensor([ids[-CTX:]]))[0][0, -1].argmax()))
                ids.append(out[-1])
        return out

    with recorded_warnings() as caught:
        got = model.generate(prompts, max_new_tokens=n, temperature=0, return_details=True)
    assert [r.token_ids for r in got] == [crop_greedy(model.encode(p)) for p in prompts]
    assert len(lmlab_warnings(caught)) == 1


def _rnn_model(cell: str) -> Model:
    tok = char_tokenizer()
    torch.manual_seed(0)
    module = build_model(RNNConfig(cell=cell, vocab_size=tok.get_vocab_size(), d_model=16, hidden_size=24))
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(3.0)  # sharper distributions: greedy choices far from ties
    return Model(module.eval(), tok, {"bos_token_id": 0})


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_recurrent_batches_equal_each_prompt_alone(cell):
    model = _rnn_model(cell)
    prompts = ["To be", "Whether 'tis", "a"]
    for opts in (dict(temperature=0), dict(temperature=1.0, top_k=10, seed=4)):
        batch = model.generate(prompts, max_new_tokens=20, **opts)
        assert batch == [model.generate(p, max_new_tokens=20, **opts) for p in prompts]
        assert len(set(batch)) == 3


class _Rerun(LanguageModel):
    """A stateless reference: its "state" is the token history (1, B, L), and every call
    re-runs the whole history through the wrapped RNN from a zero state."""

    bounded_context = False

    def __init__(self, inner: LanguageModel) -> None:
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, ids, state=None, *, last_only=False, **kw):
        hist = ids[None] if state is None else torch.cat([state.h, ids[None]], dim=2)
        logits, _ = self.inner(hist[0], None)
        return (logits[:, -1:] if last_only else logits), RecurrentState(hist)  # rows on dim 1


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_beam_search_reorders_recurrent_states(cell):
    """Beam search with the RNN's own state (reordered by index_select on dim 1) finds the
    same hypotheses, with the same scores, as re-running every history from scratch."""
    model = _rnn_model(cell)
    prompts = [model.encode("To be"), model.encode("The s")]
    cfg = GenerationConfig(
        max_new_tokens=12,
        num_beams=4,
        num_return_sequences=4,
        length_penalty=0.8,
        eos_token_id=[3],
        logprobs=0,
    )
    got = beam_search(model.module, prompts, cfg)
    want = beam_search(_Rerun(model.module), prompts, cfg)
    assert [[h.tokens for h in g] for g in got] == [[h.tokens for h in g] for g in want]
    for g, w in zip(got, want):
        assert len({tuple(h.tokens) for h in g}) == 4
        for h, hw in zip(g, w):
            assert h.score == pytest.approx(hw.score, abs=1e-4)
            assert h.score == pytest.approx(sum(h.logprobs) / len(h.tokens) ** 0.8, abs=1e-4)


# --------------------------------------------------------------------------- stop strings, streaming
def test_text_stream_holds_back_what_a_stop_string_may_take():
    tok = char_tokenizer("xaby abcz")
    ids = tok.encode("xaby abc").ids
    ts = TextStream(tok, ["abc", "yz"])
    deltas = []
    for t in ids:
        stopped = ts.push(t)
        deltas.append(ts.delta())
    assert stopped and ts.text == "xaby "
    # "a", then "ab", may begin "abc": held until "y" shows they do not; "y" may begin "yz"
    assert deltas == ["x", "", "", "ab", "y ", "", "", ""]
    assert "".join(deltas) + ts.finish() == "xaby "


def test_text_stream_stop_inside_split_chinese_characters(hf):
    """Characters spread over byte tokens: no delta shows U+FFFD, and a stop string that
    starts inside a token (and spans several) cuts the text right before it."""
    model, _ = hf("gpt2")
    tok = model.tokenizer
    text = "学而时习之，不亦说乎？"
    ids = tok.encode(text).ids
    assert any(tok.decode(ids[:i]).endswith("\ufffd") for i in range(1, len(ids)))
    ts = TextStream(tok, ["习之，不"])
    out = ""
    for t in ids:
        stopped = ts.push(t)
        out += ts.delta()
        assert "\ufffd" not in out and "习" not in out
        if stopped:
            break
    assert out + ts.finish() == "学而时"


class _Script(LanguageModel):
    """A model that spells out a fixed text: after a one-token prompt, the i-th new token is
    ``script[i]`` (logit 10, every other token 0). Its state is the count of tokens seen,
    shaped (1, B, 1) like an RNN's. The output is real text cut into real BPE tokens, so
    stop strings can be placed exactly (a random model's output is mostly stray bytes)."""

    bounded_context = False

    def __init__(self, script: list[int], vocab_size: int) -> None:
        super().__init__()
        self.script = script
        self.config = RNNConfig(vocab_size=vocab_size)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # a parameter: device and dtype

    def forward(self, ids, state=None, *, last_only=False, **kw):
        B, T = ids.shape
        seen = (torch.zeros(1, B, 1, dtype=torch.long) if state is None else state.h) + T
        nxt = torch.tensor([self.script[min(int(c) - 1, len(self.script) - 1)] for c in seen[0, :, 0]])
        logits = torch.zeros(B, 1, self.config.vocab_size)
        logits[torch.arange(B), 0, nxt] = 10.0
        return logits, RecurrentState(seen)


SCRIPT = "First Citizen: Before we proceed any further, 学而时习之，hear me speak. All: Speak, speak."


@pytest.fixture(scope="module")
def scripted(hf):
    tok = hf("gpt2")[0].tokenizer
    ids = tok.encode(SCRIPT).ids
    assert len(ids) < len(SCRIPT) - 10, "BPE merges: tokens of several characters"
    return Model(_Script(ids, tok.get_vocab_size()), tok, {"bos_token_id": 0, "eos_token_id": 2}), ids


@pytest.mark.parametrize(
    "stop,inside",
    [
        ("eed any fur", True),  # starts inside the token "ce", spans eight tokens
        ("ear me", True),  # inside "hea"
        ("her, 学而", True),  # inside "ther", ends inside the bytes of a Chinese character's tokens
        ("而时习之，h", False),  # starts among the byte tokens of Chinese characters
        ("zen:", False),
        ("eak.", True),  # the first occurrence: inside " speak", before "Speak."
    ],
)
def test_stop_strings_across_and_inside_tokens(scripted, stop, inside):
    model, ids = scripted
    n = len(ids)
    assert model.generate("", max_new_tokens=n, temperature=0) == SCRIPT
    want = SCRIPT[: SCRIPT.find(stop)]
    boundaries = {len(model.decode(ids[:i])) for i in range(n + 1)}
    if inside:
        assert len(want) not in boundaries, "the stop string starts inside a token"
    for stops in ([stop], ["never there", stop, stop[1:]]):
        r = model.generate("", max_new_tokens=n, temperature=0, stop=stops, return_details=True)
        assert (r.text, r.finish_reason) == (want, "stop")
        k = next(i for i in range(1, n + 1) if stop[1:] in model.decode(ids[:i]))
        assert r.token_ids == ids[:k], "generation ends with the token that completes the stop string"
        deltas = list(model.stream("", max_new_tokens=n, temperature=0, stop=stops))
        assert "".join(deltas) == want and all(deltas)
        # no delta ever shows text the stop string later takes back (nor a partial character)
        shown = ""
        for d in deltas:
            shown += d
            assert want.startswith(shown) and "\ufffd" not in shown
    # a batch: each row stops at its own place
    rows = model.generate(["", ""], max_new_tokens=n, temperature=0, stop=[stop], return_details=True)
    assert [r.text for r in rows] == [want, want]
    # beam search: hypotheses end with the token that completes a stop string
    beams = model.generate(
        "", max_new_tokens=n, num_beams=2, num_return_sequences=2, stop=[stop], return_details=True
    )
    assert beams[0].text == want and beams[0].finish_reason == "stop"
    for r in beams:
        assert (
            stop not in model.decode(r.token_ids[:-1]) and r.text == model.decode(r.token_ids).split(stop)[0]
        )
    assert "".join(model.stream("", max_new_tokens=n, num_beams=2, stop=[stop])) == want


def test_stop_string_that_never_completes_is_released_at_the_end(scripted):
    model, ids = scripted
    stop = "speak.!"  # its beginning shows up twice, it never completes
    r = model.generate("", max_new_tokens=len(ids), temperature=0, stop=[stop], return_details=True)
    assert (r.text, r.finish_reason) == (SCRIPT, "length")
    deltas = list(model.stream("", max_new_tokens=len(ids), temperature=0, stop=[stop]))
    assert "".join(deltas) == SCRIPT
    assert not deltas[-1].startswith("."), "'speak.' was held back until the end"


def test_stream_equals_generate_with_every_option(hf):
    model, _ = hf("gpt2")
    opts = dict(
        max_new_tokens=25, temperature=0.9, top_k=40, typical_p=0.95, repetition_penalty=1.2,
        frequency_penalty=0.3, no_repeat_ngram_size=3, seed=11, stop=["ea"],
    )  # fmt: skip
    for prompt in PROMPTS + ["学而"]:
        deltas = list(model.stream(prompt, **opts))
        assert all(deltas)
        assert "".join(deltas) == model.generate(prompt, **opts)
    beam = dict(max_new_tokens=12, num_beams=3)
    assert "".join(model.stream(PROMPTS[0], **beam)) == model.generate(PROMPTS[0], **beam)


# --------------------------------------------------------------------------- API and CLI
def test_return_types_and_details(hf):
    model, _ = hf("gpt2")
    assert isinstance(model.generate("we", max_new_tokens=3, temperature=0), str)
    assert model.generate([], max_new_tokens=3) == []
    two = model.generate(["we", "All"], max_new_tokens=3, temperature=0)
    assert isinstance(two, list) and all(isinstance(t, str) for t in two)
    three = model.generate("we", max_new_tokens=3, num_beams=3, num_return_sequences=3)
    assert isinstance(three, list) and len(three) == 3 and all(isinstance(t, str) for t in three)
    r = model.generate("we", max_new_tokens=5, temperature=0, return_details=True)
    assert r.finish_reason == "length" and len(r.token_ids) == 5 and r.text == model.decode(r.token_ids)
    assert r.logprobs is None
    assert model.generate("we", max_new_tokens=0, return_details=True).token_ids == []


@pytest.mark.parametrize(
    "options,message",
    [
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"temperature": -0.1}, "temperature"),
        ({"num_beams": 0}, "num_beams"),
        ({"min_new_tokens": 9, "max_new_tokens": 5}, "min_new_tokens"),
        ({"stop": [""]}, "stop string is empty"),
        ({"stop": ["a", ""]}, "stop string is empty"),
        ({"min_p": 1.5}, "min_p"),
        ({"typical_p": 0.0}, "typical_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"num_beams": 2, "num_return_sequences": 3}, "num_return_sequences"),
        ({"temperature": 0, "num_return_sequences": 2}, "num_return_sequences"),
        ({"early_stopping": "sometimes"}, "early_stopping"),
        ({"no_such_option": 1}, "no_such_option"),
    ],
)
def test_bad_options_raise_one_line_errors(hf, options, message):
    model, _ = hf("gpt2")
    for call in (lambda: model.generate("we", **options), lambda: list(model.stream("we", **options))):
        with pytest.raises(LmlabError, match=message) as e:
            call()
        assert "\n" not in str(e.value)


def test_empty_prompt_without_bos_is_an_error(tmp_path, capsys):
    folder = tiny_checkpoint(tmp_path / "c", "char", generation_config={"eos_token_id": 0})
    model = lmlab.load(folder)
    calls = (
        lambda: model.generate(["To", ""], max_new_tokens=3),
        lambda: model.generate("", max_new_tokens=3, num_beams=2),
        lambda: list(model.stream("", max_new_tokens=3)),
    )
    for call in calls:
        with pytest.raises(LmlabError, match="prompt is empty and the model has no BOS token") as e:
            call()
        assert "\n" not in str(e.value)
    capsys.readouterr()
    assert main(["generate", str(folder), "--prompt", "", "--max-new-tokens", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmlab: error: the prompt is empty") and err.count("\n") == 1


def test_cli_options_and_json(hf, capsys):
    model, _ = hf("gpt2")
    folder = model.source
    full = model.generate(PROMPTS[0], max_new_tokens=20, temperature=0)
    stop = next(c for c in full[3:] if c != "\ufffd")
    args = ["generate", folder, "--prompt", PROMPTS[0], "--max-new-tokens", "20", "--temperature", "0"]
    assert main([*args, "--stop", stop, "--stop", "zzz", "--repetition-penalty", "1.0"]) == 0
    with_stop = model.generate(PROMPTS[0], max_new_tokens=20, temperature=0, stop=[stop, "zzz"])
    assert capsys.readouterr().out == with_stop + "\n" and len(with_stop) < len(full)
    assert main([*args, "--json", "--logprobs", "2", "--no-repeat-ngram-size", "2"]) == 0
    r = json.loads(capsys.readouterr().out)
    want = model.generate(
        PROMPTS[0], max_new_tokens=20, temperature=0, no_repeat_ngram_size=2, logprobs=2, return_details=True
    )
    assert (
        r["token_ids"] == want.token_ids
        and r["finish_reason"] == "length"
        and len(r["logprobs"]) == len(want.token_ids)
    )
    assert r["logprobs"][0]["logprob"] == pytest.approx(want.logprobs[0].logprob)
    assert main([*args, "--num-beams", "3", "--num-return-sequences", "2", "--early-stopping", "true"]) == 0
    out = capsys.readouterr().out
    beams = model.generate(
        PROMPTS[0], max_new_tokens=20, num_beams=3, num_return_sequences=2, early_stopping=True
    )
    assert out == f"--- 1/2 ---\n{beams[0]}\n--- 2/2 ---\n{beams[1]}\n"
    assert main([*args, "--top-p", "1.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmlab: error: top_p") and err.count("\n") == 1


def test_generation_config_json_options_are_used(tmp_path):
    """A Hugging Face generation_config.json with beam and penalty settings (and its
    ``stop_strings`` name) applies, and explicit options override it."""
    folder = tiny_checkpoint(
        tmp_path / "c", "char", max_seq_len=64,
        generation_config={"bos_token_id": 0, "num_beams": 3, "repetition_penalty": 1.3, "stop_strings": ["e"]},
    )  # fmt: skip
    model = lmlab.load(folder)
    stored = model.generate("To be", max_new_tokens=10, return_details=True)
    plain = lmlab.load(tiny_checkpoint(tmp_path / "d", "char", max_seq_len=64))
    same = plain.generate(
        "To be", max_new_tokens=10, num_beams=3, repetition_penalty=1.3, stop=["e"], return_details=True
    )
    assert stored == same
    assert model.generate(
        "To be", max_new_tokens=10, num_beams=1, temperature=0, stop=["zz"]
    ) == plain.generate("To be", max_new_tokens=10, temperature=0, repetition_penalty=1.3)


def test_token_id_options_outside_the_vocabulary_are_errors(tmp_path):
    """An EOS id or a bad word id the model cannot produce (0 <= id < vocab_size) would be
    silently ignored: it is a one-line error naming the vocabulary's size instead."""
    model = lmlab.load(tiny_checkpoint(tmp_path / "c", "char"))
    V = model.module.config.vocab_size
    assert V == model.tokenizer.get_vocab_size()
    bad = [
        dict(eos_token_id=9999),
        dict(eos_token_id=[0, V]),
        dict(eos_token_id=-1),
        dict(bad_words_ids=[[1, V]]),
    ]
    named = rf"vocabulary (has|of) {V} tokens \(ids 0 to {V - 1}\)"
    for opts in bad:
        calls = (
            lambda o=opts: model.generate("To", max_new_tokens=2, **o),
            lambda o=opts: model.generate("To", max_new_tokens=2, num_beams=2, **o),
            lambda o=opts: list(model.stream("To", max_new_tokens=2, **o)),
        )
        for call in calls:
            with pytest.raises(LmlabError, match=named) as e:
                call()
            assert "\n" not in str(e.value)
    # the last id is one: greedy decoding that picks it first ends there, on EOS
    first = model.generate_ids("To", max_new_tokens=1, temperature=0)[0]
    eos = [V - 1, first]
    r = model.generate("To", max_new_tokens=5, temperature=0, eos_token_id=eos, return_details=True)
    assert (r.token_ids, r.finish_reason) == ([first], "eos")


def test_two_stage_top_k_equals_one_top_k_over_every_beam() -> None:
    """Beam search picks its candidates per beam first, then among those: the same scores and
    indices (into K·V) as torch.topk over all K·V continuations at once."""
    from lmlab.generate.beam import _top

    g = torch.Generator().manual_seed(0)
    for B, K, V, n in [(2, 4, 1000, 8), (3, 1, 50, 2), (1, 3, 4, 6), (2, 5, 300, 10)]:
        acc = torch.randn(B, K, V, generator=g)
        acc[:, 1:] -= 1e9  # the first step: only beam 0 is open
        got, want = _top(acc, n), torch.topk(acc.reshape(B, K * V), n)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (B, K, V, n)
    # ties (log-probs rounded to a few values, as in bf16): the candidates, and their order,
    # are still the one top-k's, since a tie among the best n+1 hands the choice back to it
    for seed in range(300):
        g = torch.Generator().manual_seed(seed)
        acc = torch.randint(-6, 1, (2, 3, 8), generator=g).float()
        got, want = _top(acc, 4), torch.topk(acc.reshape(2, 24), 4)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), seed
    acc = torch.tensor([[[-4.0, -4, -3, -0, -3, -4, -2, -3], [-2.0, -3, -1, -1, -1, -4, -3, -1]]])
    assert torch.equal(_top(acc, 4)[1], torch.topk(acc.reshape(1, -1), 4)[1])
