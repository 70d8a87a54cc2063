"""``--bigram-buckets``: a bidirectional recurrent body adds a hashed embedding of each pair of
adjacent tokens. Checked against the formula written out with PyTorch's own LSTM; a
classifier with it trains, pads without changing its answers, starts from a language model,
and the flag is refused where nothing would read it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_tasks import SMALL, tiny_lstm_lm, toy_rows, write_tsv

import lmlab
from lmlab.errors import LmlabError
from lmlab.models.config import RNNConfig
from lmlab.models.rnn import RNNLanguageModel


def test_features_are_the_lstm_over_token_plus_hashed_pair_embeddings():
    torch.manual_seed(0)
    V, N = 11, 7
    cfg = RNNConfig(cell="lstm", vocab_size=V, d_model=6, hidden_size=5, n_layer=2, bidirectional=True, bigram_buckets=N)
    m = RNNLanguageModel(cfg).eval()
    assert torch.equal(m.bigram_emb.weight, torch.zeros(N, 6))  # starts as the model without pairs
    torch.nn.init.normal_(m.bigram_emb.weight)
    ids = torch.tensor([[3, 4, 3, 10, 0], [1, 1, 2, 9, 5]])
    E, G = m.tok_emb.weight, m.bigram_emb.weight

    def bucket(prev: int, cur: int) -> int:  # in Python's unbounded integers
        return ((prev * (V + 1) + cur) % (2**31 - 1)) * 2654435761 % (2**31 - 1) % N

    x = torch.stack([
        torch.stack([E[ids[b, t]] + G[bucket(int(ids[b, t - 1]) if t else V, int(ids[b, t]))] for t in range(5)])
        for b in range(2)
    ])  # fmt: skip
    with torch.no_grad():
        want = m.rnn(x)[0]  # PyTorch's bidirectional LSTM on the written-out embeddings
        torch.testing.assert_close(m.features(ids), want)
        torch.testing.assert_close(m.features(ids, torch.ones_like(ids)), want)
        # right padding: the first row's 3 real tokens read exactly as alone
        mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
        alone = m.features(ids[:1, :3])
        torch.testing.assert_close(m.features(ids, mask)[0, :3], alone[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("V", [3545, 4999, 7999, 50257])
def test_the_previous_token_counts_whatever_the_vocabulary_size(V):
    """A linear hash, (prev·(V+1) + id) mod 40000, leaves V = 4999 only 8 classes of previous
    token; the mixed one spreads 2,000 previous tokens over nearly as many buckets."""
    from lmlab.models.rnn import bigram_bucket

    prev = torch.arange(2000)
    b = bigram_bucket(prev, torch.full_like(prev, 7), V, 40000)
    assert b.min() >= 0 and b.max() < 40000
    assert len(set(b.tolist())) > 1900  # ~1,951 expected for 2,000 draws into 40,000


def test_a_one_way_body_refuses_bigrams():
    with pytest.raises(LmlabError, match="bidirectional"):
        RNNConfig(cell="lstm", bigram_buckets=8)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("bigrams")
    return write_tsv(d / "train.tsv", toy_rows(400)), write_tsv(d / "dev.tsv", toy_rows(80, seed=1), header=False)


def test_a_classifier_with_bigrams_trains_saves_and_pads_alike(data, tmp_path):
    train, dev = data
    out = tmp_path / "bi"
    res = lmlab.train(data=str(train), valid=str(dev), out=str(out), model="lstm", bidirectional=True, hidden_size=32,
                      bigram_buckets=512, steps=60, eval_every=30, **SMALL)  # fmt: skip
    assert res.best["accuracy"] >= 0.95, res.best
    assert json.loads((out / "config.json").read_text())["body"]["bigram_buckets"] == 512
    w = load_file(out / "model.safetensors")["body.bigram_emb.weight"]
    assert w.shape == (512, 32) and w.abs().sum() > 0  # learned from zeros
    clf = lmlab.pipeline("sentiment-analysis", str(out / "best"))
    texts = ["i loved it , great acting", "这部电影很好看", "boring and dull , very bad movie , truly awful"]
    together, alone = clf(texts, batch_size=3), [clf(t)[0] for t in texts]
    assert [r["label"] for r in together] == [r["label"] for r in alone] == ["positive", "positive", "negative"]
    assert [r["score"] for r in together] == pytest.approx([r["score"] for r in alone], abs=1e-5)


def test_a_classifier_with_bigrams_from_a_language_model(data, tmp_path):
    train, dev = data
    lm = tiny_lstm_lm(tmp_path, n_layer=1)
    out = tmp_path / "clf"
    lmlab.train(task="classify", init=str(lm), data=str(train), valid=str(dev), out=str(out), bidirectional=True,
                bigram_buckets=64, steps=1, lr=1e-12, warmup=0, progress=False)  # fmt: skip
    w, start = load_file(out / "model.safetensors"), load_file(lm / "model.safetensors")
    torch.testing.assert_close(w["body.tok_emb.weight"], start["tok_emb.weight"], atol=1e-6, rtol=0)
    assert w["body.bigram_emb.weight"].shape == (64, 16) and w["body.bigram_emb.weight"].abs().max() < 1e-6


@pytest.mark.parametrize(
    "extra, message",
    [
        (dict(task="classify", model="lstm"), "--bigram-buckets is read by a --bidirectional recurrent body"),
        (dict(task="classify", model="lstm", bidirectional=True, bigram_buckets=-1), "--bigram-buckets must be 0"),
        (dict(task="lm", model="lstm"), "--bigram-buckets: for --task classify only"),
    ],
)
def test_bigrams_where_nothing_reads_them_are_refused(data, tmp_path, extra, message):
    opts = {"bigram_buckets": 16, **extra}
    with pytest.raises(LmlabError, match=message):
        lmlab.train(data=str(data[0]), out=str(tmp_path / "x"), steps=1, progress=False, **opts)


def test_the_size_check_counts_the_pair_table():
    from lmlab.models.limits import MAX_FIELD, estimate_bytes

    small = RNNConfig(cell="lstm", vocab_size=50, d_model=8, hidden_size=6, n_layer=2, bidirectional=True)
    big = RNNConfig(cell="lstm", vocab_size=50, d_model=8, hidden_size=6, n_layer=2, bidirectional=True,
                    bigram_buckets=1000)  # fmt: skip
    assert estimate_bytes(big)[0] - estimate_bytes(small)[0] == 4 * 1000 * 8
    real = 4 * sum(p.numel() for p in RNNLanguageModel(big).parameters())
    assert real <= estimate_bytes(big)[0] <= 1.3 * real
    with pytest.raises(LmlabError, match="bigram_buckets = .* is out of range"):
        RNNConfig(cell="lstm", bidirectional=True, bigram_buckets=MAX_FIELD + 1)
