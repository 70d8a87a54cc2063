"""The RNN encoder-decoder with attention: the scores against hand-written formulas,
padding that changes nothing, teacher forcing against step-by-step decoding, the decoding
loop (greedy and beam search, batched against alone, beam scores against teacher-forced
log-probs), learning a reversal task, configs, checkpoints and the errors a user can cause.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.nn.functional as F
from helpers import char_tokenizer

from lmlab.errors import LmlabError
from lmlab.generate.config import GenerationConfig
from lmlab.generate.seq2seq import pad_sources, seq2seq_generate
from lmlab.models import build_model
from lmlab.models.config import RNNSeq2SeqConfig, config_from_dict, config_to_dict
from lmlab.models.limits import estimate_bytes
from lmlab.models.loading import load_checkpoint, write_checkpoint
from lmlab.models.rnn_seq2seq import RNNSeq2Seq
from lmlab.nn.alignment import AdditiveAttention, DotAttention, GeneralAttention, make_alignment

TOK = char_tokenizer()
V = TOK.get_vocab_size()
PAD, START = 0, 1
#: (cell, attention, bidirectional): Bahdanau and Luong, every cell, both encoders
KINDS = [
    ("gru", "additive", True),
    ("lstm", "dot", True),
    ("gru", "general", False),
    ("rnn", "additive", True),
]


def small(cell: str = "gru", attention: str = "additive", bidirectional: bool = True, **kw) -> RNNSeq2Seq:
    torch.manual_seed(0)
    cfg = dict(cell=cell, attention=attention, bidirectional=bidirectional, vocab_size=V, d_model=12,
               hidden_size=16, n_layer=2, dropout=0.0, max_target_len=24, init_std=0.5)  # fmt: skip
    return RNNSeq2Seq(RNNSeq2SeqConfig(**{**cfg, **kw})).eval()


def sources(lengths=(5, 3, 7, 1), seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, V, (n,), generator=g).tolist() for n in lengths]


# ---------------------------------------------------------------------- the scores
def _masked_softmax(e: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    e = torch.where(mask, e, torch.tensor(float("-inf")))
    return e.exp() / e.exp().sum(-1, keepdim=True)


def test_additive_attention_is_bahdanaus_formula():
    torch.manual_seed(0)
    att = AdditiveAttention(3, 4, 5)
    s, h = torch.randn(2, 3), torch.randn(2, 6, 4)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    W, U, b, v = att.query.weight, att.key.weight, att.key.bias, att.v.weight[0]
    # e_ij = vᵀ tanh(W s + U h_j + b), written out
    e = torch.einsum("a,bsa->bs", v, torch.tanh(torch.einsum("aq,bq->ba", W, s)[:, None] + h @ U.T + b))
    alpha = _masked_softmax(e, mask)
    ctx, got = att(s, att.keys(h), h, mask)
    torch.testing.assert_close(got, alpha)
    torch.testing.assert_close(ctx, torch.einsum("bs,bsc->bc", alpha, h))
    assert torch.all(got[0, 4:] == 0)  # exactly zero on padding
    torch.testing.assert_close(got.sum(-1), torch.ones(2))


def test_dot_and_general_scores_are_luongs():
    torch.manual_seed(0)
    s, h = torch.randn(2, 4), torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    dot = DotAttention()
    ctx, got = dot(s, dot.keys(h), h, mask)
    torch.testing.assert_close(got, _masked_softmax(torch.einsum("bc,bsc->bs", s, h), mask))  # sᵀ h_j
    assert torch.all(got[0, 2:] == 0)
    gen = GeneralAttention(4, 4)
    e = torch.einsum("bq,qc,bsc->bs", s, gen.key.weight, h)  # sᵀ W h_j
    ctx, got = gen(s, gen.keys(h), h, None)
    torch.testing.assert_close(got, torch.softmax(e, -1))
    torch.testing.assert_close(ctx, torch.einsum("bs,bsc->bc", got, h))


def test_make_alignment_refuses_what_it_cannot_build():
    with pytest.raises(ValueError, match="equal query and key sizes"):
        make_alignment("dot", 4, 6, 8)
    with pytest.raises(ValueError, match="additive, dot, general"):
        make_alignment("concat", 4, 4, 8)


# ---------------------------------------------------------------------- the model
@pytest.mark.parametrize("cell,attention,bi", KINDS)
def test_padding_changes_no_row(cell, attention, bi):
    """A batch of sources of different lengths gives each row what the source gives alone."""
    m = small(cell, attention, bi)
    srcs = sources()
    src, mask = pad_sources(srcs, PAD, torch.device("cpu"))
    tgt = torch.randint(3, V, (len(srcs), 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        batch, _ = m(tgt, src=src, src_mask=mask)
        alpha = m.alignments(tgt, src=src, src_mask=mask)
        for b, s in enumerate(srcs):
            alone, _ = m(tgt[b : b + 1], src=torch.tensor([s]))
            torch.testing.assert_close(batch[b : b + 1], alone, atol=1e-5, rtol=0)
    assert alpha.shape == (len(srcs), 6, src.shape[1])
    assert torch.all(alpha.masked_select(~mask.bool()[:, None].expand_as(alpha)) == 0)
    torch.testing.assert_close(alpha.sum(-1), torch.ones(len(srcs), 6))


@pytest.mark.parametrize("cell,attention,bi", KINDS)
def test_teacher_forcing_equals_one_step_at_a_time(cell, attention, bi):
    m = small(cell, attention, bi)
    src, mask = pad_sources(sources(), PAD, torch.device("cpu"))
    tgt = torch.randint(3, V, (4, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full, end = m(tgt, src=src, src_mask=mask)
        state = m.init_state(4, 7, m.encode(src, mask))
        steps = []
        for i in range(7):
            assert state.length == i and state.remaining == 7 - i
            logits, state = m(tgt[:, i : i + 1], state)
            steps.append(logits)
        last, _ = m(tgt, src=src, src_mask=mask, last_only=True)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    torch.testing.assert_close(last, full[:, -1:])
    torch.testing.assert_close(state.h, end.h)
    assert end.length == 7 and state.remaining == 0


def test_the_state_follows_selected_rows():
    """select(index) with repeats and reordering = the rows run separately (beam search)."""
    m = small("lstm", "dot")
    src, mask = pad_sources(sources(), PAD, torch.device("cpu"))
    tgt = torch.randint(3, V, (4, 3), generator=torch.Generator().manual_seed(4))
    index = torch.tensor([2, 2, 0, 3, 1])
    with torch.no_grad():
        _, st = m(tgt[:, :2], src=src, src_mask=mask)
        picked, _ = m(tgt[index, 2:], st.select(index))
        full, _ = m(tgt, src=src, src_mask=mask)
    torch.testing.assert_close(picked, full[index, 2:], atol=1e-5, rtol=0)


def _gen(**kw) -> GenerationConfig:
    return GenerationConfig(
        **{"max_new_tokens": 8, "temperature": 0.0, "decoder_start_token_id": START, **kw}
    )


@pytest.mark.parametrize("cell,attention,bi", KINDS[:2])
def test_greedy_decoding_of_a_batch_equals_each_source_alone(cell, attention, bi):
    m = small(cell, attention, bi)
    srcs = sources((4, 9, 2, 6))
    batch = seq2seq_generate(m, TOK, srcs, _gen(), PAD)
    for s, res in zip(srcs, batch):
        alone = seq2seq_generate(m, TOK, [s], _gen(), PAD)[0]
        assert res[0].token_ids == alone[0].token_ids and len(res[0].token_ids) == 8
    # greedy = argmax of teacher-forced logits over its own output
    ids = torch.tensor([[START, *batch[0][0].token_ids]])
    with torch.no_grad():
        logits, _ = m(ids[:, :-1], src=torch.tensor([srcs[0]]))
    assert logits.argmax(-1)[0].tolist() == batch[0][0].token_ids


def test_beam_search_scores_are_the_models_log_probs():
    """Beams' states follow their parents: each returned score equals Σ log p / |y| of its
    tokens recomputed by teacher forcing; scores come sorted; a batch = each source alone."""
    m = small("gru", "additive", target_vocab_size=8, share_embeddings=False)
    torch.manual_seed(1)
    with torch.no_grad():  # weights far from the init: beams that part ways and reorder
        for p in m.parameters():
            p.normal_(0, 0.6)
    srcs = sources((5, 3))
    cfg = _gen(num_beams=3, num_return_sequences=3, eos_token_id=[2], max_new_tokens=6)
    batch = seq2seq_generate(m, TOK, srcs, cfg, PAD)
    for s, res in zip(srcs, batch):
        assert len(res) == 3
        scores = [r.score for r in res]
        assert scores == sorted(scores, reverse=True)
        for r in res:
            ids = torch.tensor([[START, *r.token_ids]])
            with torch.no_grad():
                logits, _ = m(ids[:, :-1], src=torch.tensor([s]))
            logp = torch.log_softmax(logits[0], -1).gather(1, ids[0, 1:, None]).sum()
            assert r.score == pytest.approx(float(logp) / len(r.token_ids), abs=1e-4)
        alone = seq2seq_generate(m, TOK, [s], cfg, PAD)[0]
        assert [r.token_ids for r in alone] == [r.token_ids for r in res]
    one = seq2seq_generate(m, TOK, srcs, _gen(num_beams=1, max_new_tokens=6), PAD)
    greedy = seq2seq_generate(m, TOK, srcs, _gen(max_new_tokens=6), PAD)
    assert [r[0].token_ids for r in one] == [r[0].token_ids for r in greedy]


def test_it_learns_to_reverse_sequences():
    """20 pairs (x, reversed x + EOS) of 4-6 tokens, learnt to exact greedy outputs."""
    torch.manual_seed(0)
    EOS, n_vocab = 2, 13
    g = torch.Generator().manual_seed(1)
    pairs = []
    for _ in range(20):
        x = torch.randint(3, n_vocab, (int(torch.randint(4, 7, (1,), generator=g)),), generator=g).tolist()
        pairs.append((x, [*x[::-1], EOS]))
    cfg = RNNSeq2SeqConfig(
        vocab_size=n_vocab, d_model=32, hidden_size=64, n_layer=1, dropout=0.0, max_target_len=16
    )
    m = RNNSeq2Seq(cfg)
    src, mask = pad_sources([x for x, _ in pairs], PAD, torch.device("cpu"))
    tgt = torch.full((20, 8), -100)
    for i, (_, y) in enumerate(pairs):
        tgt[i, : len(y) + 1] = torch.tensor([START, *y])
    tgt_in, tgt_out = tgt[:, :-1].clamp(min=0), tgt[:, 1:]
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    t0 = time.perf_counter()
    for _ in range(300):
        logits, _ = m(tgt_in, src=src, src_mask=mask)
        loss = F.cross_entropy(logits.reshape(-1, n_vocab), tgt_out.reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:
            break
    assert loss.item() < 0.01 and time.perf_counter() - t0 < 20
    m.eval()
    out = seq2seq_generate(m, TOK, [x for x, _ in pairs], _gen(max_new_tokens=10, eos_token_id=[EOS]), PAD)
    assert [r[0].token_ids for r in out] == [y for _, y in pairs]


# ---------------------------------------------------------------------- config, files
def test_config_round_trip_and_build():
    cfg = RNNSeq2SeqConfig(cell="lstm", attention="general", target_vocab_size=50, share_embeddings=False)
    d = json.loads(json.dumps(config_to_dict(cfg)))
    assert d["model_type"] == "rnn_seq2seq" and d["attention_size"] == cfg.hidden_size
    back = config_from_dict(d)
    assert back == cfg and back.tgt_vocab_size == 50 and back.max_seq_len == cfg.max_target_len
    assert isinstance(build_model(back), RNNSeq2Seq)


@pytest.mark.parametrize(
    "kw",
    [
        dict(share_embeddings=False, tie_embeddings=False, cell="lstm", attention="dot"),
        dict(
            bidirectional=False, n_layer=3, target_vocab_size=300, share_embeddings=False, attention="general"
        ),
        dict(cell="rnn", attention_size=40),
    ],
)
def test_size_estimate_is_exact(kw):
    m = build_model(RNNSeq2SeqConfig(**kw))
    assert estimate_bytes(m.config)[0] == 4 * m.num_parameters()


@pytest.mark.parametrize("share,tie", [(True, True), (False, True), (False, False)])
def test_checkpoint_round_trip(tmp_path, share, tie):
    m = small(
        "lstm", "additive", share_embeddings=share, tie_embeddings=tie, target_vocab_size=None if share else V
    )
    with torch.no_grad():  # make the biases and a non-tied output layer differ from a fresh init
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    write_checkpoint(tmp_path / "ck", m, TOK, {"decoder_start_token_id": START})
    loaded = load_checkpoint(tmp_path / "ck").module
    assert isinstance(loaded, RNNSeq2Seq) and loaded.config == m.config
    assert (loaded.lm_head.weight is loaded.tgt_emb.weight) == tie
    src, mask = pad_sources(sources(), PAD, torch.device("cpu"))
    tgt = torch.randint(3, V, (4, 5), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, _ = m(tgt, src=src, src_mask=mask)
        b, _ = loaded(tgt, src=src, src_mask=mask)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(cell="transformer"), "cell must be one of"),
        (dict(attention="bahdanau"), "attention must be one of additive, dot, general"),
        (dict(hidden_size=7), "even hidden_size"),
        (dict(dropout=1.0), "dropout must be in"),
        (dict(target_vocab_size=10), "set share_embeddings false"),
        (dict(attention_size=0), "attention_size must be positive"),
        (dict(n_layer="2"), "n_layer must be an int"),
        (dict(bidirectional=1), "bidirectional must be a bool"),
        (dict(init_std=0.0), "init_std must be positive"),
    ],
)
def test_bad_config_values_are_one_line_errors(bad, match):
    with pytest.raises(LmlabError, match=match) as e:
        config_from_dict({"model_type": "rnn_seq2seq", **bad})
    assert "\n" not in str(e.value)


def test_misuse_is_a_one_line_error():
    m = small()
    tgt = torch.tensor([[START, 4]])
    cases = [
        (lambda: m(tgt), "needs the source"),
        (lambda: m(tgt, src=torch.tensor([[4, 5, 0]]), src_mask=torch.tensor([[1, 0, 1]])), "right padding"),
        (lambda: m(tgt, src=torch.tensor([[4, 5]]), src_mask=torch.tensor([[0, 0]])), "a source is empty"),
        (lambda: m(torch.ones(1, 30, dtype=torch.long), src=torch.tensor([[4]])), "max_target_len=24"),
        (lambda: m.init_state(1, 4), "needs the encoded source"),
        (lambda: m(tgt, m.init_state(1, 1, m.encode(torch.tensor([[4]])))), "room for 1 more"),
        (lambda: m.encode(torch.tensor([4, 5])), r"shape \(batch, time\)"),
    ]
    for call, match in cases:
        with pytest.raises(LmlabError, match=match) as e:
            call()
        assert "\n" not in str(e.value)
