"""Speculative decoding (issue 16): prompt lookup and a draft model, checked against references.

- greedy: token for token the plain greedy output (and its log-probs), with a draft that
  disagrees often, a draft equal to the model, and prompt lookup;
- sampling: the distribution of the first three tokens equals the model's own, computed
  exactly by enumerating every sequence of a 6-token vocabulary (chi-square); the same
  statistic rejects a sampler that keeps every guess, so the test can fail;
- prompt lookup's candidates vs hand-worked cases; refusals by name.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
import torch
from helpers import bpe_tokenizer, tiny_checkpoint, tiny_model

import lmlab
from lmlab.cli import main
from lmlab.errors import LmlabError
from lmlab.generate import GenerationConfig, sample
from lmlab.generate.speculative import lookup_candidates, speculative_sample

PROMPTS = [
    "the quick brown fox jumps over the lazy dog. the quick brown fox",
    "to be, or not to be, that is the question: to be, or not",
    "abc",
]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A 3-layer model and a 1-layer draft with the same BPE tokenizer (random weights)."""
    d = tmp_path_factory.mktemp("spec")
    tok = bpe_tokenizer()
    big = tiny_checkpoint(d / "big", tokenizer=tok, n_layer=3, d_model=48, max_seq_len=128, seed=1)
    small = tiny_checkpoint(d / "small", tokenizer=tok, n_layer=1, d_model=16, max_seq_len=128, seed=2)
    return big, small


def test_lookup_candidates_by_hand():
    seq = [1, 2, 3, 4, 9, 1, 2, 3, 5, 6, 1, 2]
    # last 2-gram (1, 2): its latest earlier occurrence is at 5 -> followed by 3, 5, 6
    assert lookup_candidates(seq, 3, 2) == [3, 5, 6]
    assert lookup_candidates(seq, 10, 2) == [3, 5, 6, 1, 2]  # runs to the end of the text
    # no 3-gram (x, 1, 2) repeats with x = 6 ... (6, 1, 2) occurs only at the end: fall back to 2-grams
    assert lookup_candidates(seq, 2, 3) == [3, 5]
    assert lookup_candidates([7, 8, 9], 4, 2) == []  # nothing repeats
    assert lookup_candidates([5, 5], 3, 2) == [5]  # the 1-gram (5) at 0 is followed by 5
    assert lookup_candidates([4], 3, 2) == []


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_equals_plain_greedy(pair, prompt):
    big, small = pair
    m = lmlab.load(str(big))
    opts = dict(temperature=0, max_new_tokens=40, logprobs=2, return_details=True)
    plain = m.generate(prompt, **opts)
    runs = {
        "lookup": m.generate(prompt, prompt_lookup_num_tokens=4, **opts),
        "lookup-3gram": m.generate(prompt, prompt_lookup_num_tokens=2, max_matching_ngram_size=3, **opts),
        "draft": m.generate(prompt, assistant_model=str(small), num_assistant_tokens=3, **opts),
        "self-draft": m.generate(prompt, assistant_model=lmlab.load(str(big)), num_assistant_tokens=6, **opts),
    }
    for name, r in runs.items():
        assert r.token_ids == plain.token_ids, name
        assert r.text == plain.text and r.finish_reason == plain.finish_reason, name
        got = [t.logprob for t in r.logprobs]
        want = [t.logprob for t in plain.logprobs]
        assert got == pytest.approx(want, abs=1e-4), name
        assert [[a.token_id for a in t.top] for t in r.logprobs] == [[a.token_id for a in t.top] for t in plain.logprobs]


def test_greedy_stops_where_plain_greedy_stops(pair):
    big, small = pair
    m = lmlab.load(str(big))
    plain = m.generate(PROMPTS[0], temperature=0, max_new_tokens=30, return_details=True)
    eos = plain.token_ids[7]  # a token the text reaches: EOS there
    stop = m.decode(plain.token_ids[10:13])
    for extra in ({"prompt_lookup_num_tokens": 5}, {"assistant_model": str(small)}):
        a = m.generate(PROMPTS[0], temperature=0, max_new_tokens=30, eos_token_id=eos, return_details=True, **extra)
        b = m.generate(PROMPTS[0], temperature=0, max_new_tokens=30, eos_token_id=eos, return_details=True)
        assert (a.token_ids, a.finish_reason) == (b.token_ids, b.finish_reason) and a.finish_reason == "eos"
        if stop.strip():
            a = m.generate(PROMPTS[0], temperature=0, max_new_tokens=30, stop=stop, return_details=True, **extra)
            b = m.generate(PROMPTS[0], temperature=0, max_new_tokens=30, stop=stop, return_details=True)
            assert (a.text, a.finish_reason) == (b.text, b.finish_reason)
        streamed = "".join(m.stream(PROMPTS[0], temperature=0, max_new_tokens=30, **extra))
        assert streamed == plain.text


def test_prompt_lookup_counts_its_passes():
    """One pass per round (plus the prompt's): a round yields its accepted guesses and one token."""
    model = tiny_model(20, n_layer=1, max_seq_len=128)
    prompt = [3, 4, 5, 6, 7, 8] * 4
    cfg = GenerationConfig(temperature=0, max_new_tokens=24, prompt_lookup_num_tokens=4)
    plain_cfg = GenerationConfig(temperature=0, max_new_tokens=24)
    plain = [c[0].token for c in sample(model, [prompt], plain_cfg, [None])]
    stats: dict = {}
    rounds = list(speculative_sample(model, [prompt], cfg, [None], stats=stats))
    got = [c.token for r in rounds for c in r]
    assert got == plain
    assert len(rounds) == stats["forwards"] - 1  # a yield per pass: the tokens that pass produced
    # every round is one pass and yields the accepted guesses plus one token
    assert stats["forwards"] == 1 + (24 - stats["accepted"])
    assert stats["accepted"] > 0


def _exact_three_token_distribution(model, prompt, V):
    """P(t1, t2, t3) = p(t1|x) p(t2|x t1) p(t3|x t1 t2), by running the model on every prefix."""
    probs = {}
    with torch.no_grad():
        for seq in itertools.product(range(V), repeat=2):
            ids = torch.tensor([prompt + list(seq)])
            logp = torch.log_softmax(model(ids)[0][0].double(), -1)  # (T, V)
            P = len(prompt)
            for t3 in range(V):
                lp = logp[P - 1, seq[0]] + logp[P, seq[1]] + logp[P + 1, t3]
                probs[(seq[0], seq[1], t3)] = math.exp(float(lp))
    return probs


def _chi2(counts: Counter, probs: dict, n: int) -> tuple[float, int]:
    stat, cells = 0.0, 0
    for key, p in probs.items():
        e = n * p
        stat += (counts.get(key, 0) - e) ** 2 / e
        cells += 1
    return stat, cells - 1


def _chi2_limit(df: int, z: float = 3.72) -> float:
    """The chi-square quantile at about 1 − 1e-4 (Wilson–Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("mode", ["lookup", "draft"])
def test_sampling_follows_the_models_distribution(mode):
    V, n = 6, 3000
    model = tiny_model(V, n_layer=1, d_model=16, init_std=0.15, seed=3, max_seq_len=16)
    draft = tiny_model(V, n_layer=1, d_model=16, init_std=0.3, seed=4, max_seq_len=16)  # a different q
    prompt = [1, 2, 3, 1, 2]  # lookup guesses 3, 1, 2 after (1, 2)
    probs = _exact_three_token_distribution(model, prompt, V)
    cfg = GenerationConfig(temperature=1.0, max_new_tokens=3, num_assistant_tokens=2,
                           prompt_lookup_num_tokens=2 if mode == "lookup" else None)  # fmt: skip
    counts: Counter = Counter()
    proposed = 0
    for seed in range(n):
        stats: dict = {}
        rounds = speculative_sample(model, [prompt], cfg, [seed], stats=stats, draft=draft if mode == "draft" else None)
        toks = [c.token for r in rounds for c in r]
        counts[tuple(toks)] += 1
        proposed += stats["proposed"]
    assert proposed > n  # guesses were made (and so accepted and rejected)
    stat, df = _chi2(counts, probs, n)
    assert stat < _chi2_limit(df), (stat, df)

    # the same test rejects a sampler that keeps every guess of the draft (its q, not p)
    if mode == "draft":
        wrong: Counter = Counter()
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for _ in range(n):
                seq = list(prompt)
                for _ in range(3):
                    q = torch.softmax(draft(torch.tensor([seq]))[0][0, -1].double(), -1)
                    seq.append(int(torch.multinomial(q, 1, generator=g)))
                wrong[tuple(seq[-3:])] += 1
        assert _chi2(wrong, probs, n)[0] > _chi2_limit(df)


def test_refusals(pair, tmp_path):
    big, small = pair
    m = lmlab.load(str(big))
    cases = [
        (dict(num_beams=2), "beam search"),
        (dict(repetition_penalty=1.3), "penalties"),
        (dict(no_repeat_ngram_size=2), "no_repeat_ngram_size"),
        (dict(temperature=1.0, num_return_sequences=2), "one sequence"),
        (dict(max_new_tokens=200), "context"),
        (dict(prompt_lookup_num_tokens=0), "prompt_lookup_num_tokens must be >= 1"),
        (dict(bad_words=["e"]), "bad words"),  # banned strings would not be applied: refused
        (dict(max_new_tokens=200), "use max_new_tokens <= 77"),  # how to fix it (a 51-token prompt)
        (dict(assistant_model=str(small)), "not both"),
    ]
    for opts, words in cases:
        with pytest.raises(LmlabError, match=words):
            m.generate(PROMPTS[0], **{"temperature": 0, "prompt_lookup_num_tokens": 3, **opts})
    with pytest.raises(LmlabError, match="one sequence"):
        m.generate(PROMPTS[:2], temperature=0, prompt_lookup_num_tokens=3)
    other = tiny_checkpoint(tmp_path / "other", kind="char", max_seq_len=128)
    with pytest.raises(LmlabError, match="another tokenizer"):
        m.generate("abc", assistant_model=str(other))
    with pytest.raises(LmlabError, match="assistant_model must be"):
        m.generate("abc", assistant_model=42)
    from lmlab.models.config import TransformerConfig
    from lmlab.models.heads import TaskModel
    from lmlab.models.loading import write_checkpoint
    from lmlab.models.task_config import TaskConfig

    tok = bpe_tokenizer()
    body = TransformerConfig(vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, d_model=16, max_seq_len=128)
    cls = TaskModel(TaskConfig(body=body, head="classify", id2label={"0": "neg", "1": "pos"})).eval()
    classifier = write_checkpoint(tmp_path / "cls", cls, tok, {})
    with pytest.raises(LmlabError, match="decoder-only language model"):
        m.generate("abc", assistant_model=str(classifier))
    short = tiny_checkpoint(tmp_path / "short", tokenizer=bpe_tokenizer(), n_layer=1, d_model=16, max_seq_len=16)
    with pytest.raises(LmlabError, match="the assistant model's context of 16"):
        m.generate(PROMPTS[0], temperature=0, max_new_tokens=40, assistant_model=str(short))


def test_a_huge_guess_count_is_capped_at_the_context(pair):
    """Guesses past the context could never be checked: k = 10⁹ decodes as k = the context."""
    big, _ = pair
    m = lmlab.load(str(big))
    plain = m.generate(PROMPTS[1], temperature=0, max_new_tokens=30)
    assert m.generate(PROMPTS[1], temperature=0, max_new_tokens=30, prompt_lookup_num_tokens=10**9) == plain


def test_recurrent_models_are_refused(tmp_path):
    from lmlab.models.rnn import RNNConfig, RNNLanguageModel

    model = RNNLanguageModel(RNNConfig(vocab_size=10, cell="lstm", d_model=8, hidden_size=8, n_layer=1)).eval()
    cfg = GenerationConfig(temperature=0, max_new_tokens=4, prompt_lookup_num_tokens=2)
    with pytest.raises(LmlabError, match="recurrent"):
        list(speculative_sample(model, [[1, 2, 3]], cfg, [None]))


def test_cli_prompt_lookup_and_draft(pair, capsys):
    big, small = pair
    base = ["generate", str(big), "--prompt", PROMPTS[1], "--temperature", "0", "--max-new-tokens", "30", "--no-stream"]
    assert main(base) == 0
    plain = capsys.readouterr().out
    assert main([*base, "--prompt-lookup", "4"]) == 0
    assert capsys.readouterr().out == plain
    assert main([*base, "--draft", str(small), "--num-assistant-tokens", "4"]) == 0
    assert capsys.readouterr().out == plain
    assert main([*base, "--num-assistant-tokens", "4"]) != 0  # without --draft: said, not ignored
    assert "add --draft" in capsys.readouterr().err
    assert main([*base, "--prompt-lookup", "4", "--draft", str(small)]) != 0
    assert "not both" in capsys.readouterr().err
