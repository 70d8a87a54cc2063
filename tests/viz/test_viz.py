"""``lmlab viz``: the pictures, pages and numbers it writes, on tiny random models (a decoder-only
lmlab checkpoint, a BERT from transformers, an encoder-decoder, an LSTM).

- a PNG has the pixel size of the figure the ``*_figure`` builder makes (figsize × dpi) and the
  expected number of panels (Axes holding a heatmap or a plot), labelled with the tokens;
- the JSON holds the numbers of ``Model.attention`` / ``cross_attention`` / ``token_logprobs`` /
  ``hidden_states``; the sinusoidal table is checked against the paper's formula, computed
  here with ``math`` (lmlab's layout, the one drawn: sin at even dimensions 2i, cos at 2i+1),
  RoPE's scores against Σ_i (x_i² + x_{i+d/2}²) cos((m − n) θ_i);
- the HTML pages fetch nothing and open in headless Chromium without console errors (skipped
  without a browser, except under CI);
- Chinese, Japanese and Korean render with the CJK font found (no "missing glyph" warning), and
  without one there is one lmlab warning and a picture;
- on an imported Hugging Face GPT-2: token log-probabilities equal log_softmax of transformers'
  own logits on the same weights, the learned positions equal its ``wpe`` table;
- the neurons shown are ranked by hand (mean |h| by default, or the variance) from PyTorch's own
  LSTM run on the model's weights.
"""

from __future__ import annotations

import io
import json
import math
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import (
    REPO,
    char_tokenizer,
    lmlab_warnings,
    recorded_warnings,
    tiny_checkpoint,
    tiny_hf_encoder,
    write_checkpoint,
)
from PIL import Image

import lmlab
from lmlab.errors import LmlabError
from lmlab.viz import (
    alignment_figure,
    attention_figure,
    fonts,
    neurons_figure,
    positions_figure,
    tokens_figure,
)

TEXT = "to be, or not to be"
CHINESE = "学而时习之"
JAPANESE = "吾輩は猫である。名前はまだ無い。カタカナ"  # kanji, hiragana, katakana
KOREAN = "나는 고양이로소이다. 한글"  # hangul syllables


# --------------------------------------------------------------------------- models
@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A decoder-only Transformer: 2 layers × 2 heads, learned positions, char tokenizer."""
    return lmlab.load(tiny_checkpoint(tmp_path_factory.mktemp("viz") / "lm", pos="learned", max_seq_len=64))


@pytest.fixture(scope="module")
def lm_dir(lm):
    return lm.source


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    pytest.importorskip("transformers")
    return lmlab.load(tiny_hf_encoder(tmp_path_factory.mktemp("viz") / "bert"))


@pytest.fixture(scope="module")
def mt_dir(tmp_path_factory):
    from helpers import tiny_seq2seq_checkpoint

    return tiny_seq2seq_checkpoint(tmp_path_factory.mktemp("viz") / "mt", n_decoder_layer=2)


@pytest.fixture(scope="module")
def mt(mt_dir):
    return lmlab.load(mt_dir)


@pytest.fixture(scope="module")
def lstm_dir(tmp_path_factory):
    from lmlab.models.config import RNNConfig
    from lmlab.models.rnn import RNNLanguageModel

    torch.manual_seed(0)
    tok = char_tokenizer()
    module = RNNLanguageModel(RNNConfig(vocab_size=tok.get_vocab_size(), d_model=8, hidden_size=12, n_layer=2))
    return write_checkpoint(tmp_path_factory.mktemp("viz") / "lstm", module.eval(), tok, {})


@pytest.fixture(scope="module")
def lstm(lstm_dir):
    return lmlab.load(lstm_dir)


@pytest.fixture(scope="module")
def cjk(tmp_path_factory):
    """A decoder-only Transformer whose char tokenizer knows Chinese, Japanese and Korean (one
    token per character, none of them <unk>)."""
    from helpers import TOKENIZER_TEXT

    tok = char_tokenizer(TOKENIZER_TEXT + JAPANESE + KOREAN)
    return lmlab.load(tiny_checkpoint(tmp_path_factory.mktemp("viz") / "cjk", tokenizer=tok, pos="learned",
                                      max_seq_len=64))  # fmt: skip


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A Hugging Face GPT-2 (random weights, scaled up so the distributions are far from uniform)
    saved with ``save_pretrained`` and a byte-level BPE tokenizer.json beside it."""
    transformers = pytest.importorskip("transformers")
    from helpers import bpe_tokenizer

    tok = bpe_tokenizer()
    eot = tok.token_to_id("<|endoftext|>")
    cfg = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_embd=32, n_layer=2, n_head=4, n_positions=48,
                                  bos_token_id=eot, eos_token_id=eot)  # fmt: skip
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, w in ref.named_parameters():  # layer norms' gains near 1, everything else N(0, 0.3)
            w.normal_(1.0, 0.1) if ".ln_" in name and name.endswith("weight") else w.normal_(0.0, 0.3)
    folder = tmp_path_factory.mktemp("viz") / "gpt2"
    ref.save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def _hf_gpt2(folder):
    """transformers' own GPT-2 on the saved weights, and the saved tokenizer (the references)."""
    import transformers
    from tokenizers import Tokenizer

    ref = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    return ref, Tokenizer.from_file(str(folder / "tokenizer.json"))


# --------------------------------------------------------------------------- helpers
def viz(*argv: str) -> tuple[int, str]:
    """``lmlab viz ARGV`` in this process: (exit status, stderr)."""
    from contextlib import redirect_stderr

    from lmlab.cli import main

    err = io.StringIO()
    with redirect_stderr(err):
        rc = main(["viz", *map(str, argv)])
    return rc, err.getvalue()


def heatmaps(fig) -> list:
    return [ax for ax in fig.axes if ax.images]


def panels(fig) -> list:
    """Axes that hold a heatmap or a curve (colour bars hold neither)."""
    return [ax for ax in fig.axes if ax.images or ax.lines]


def png_size(path: Path) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 1000, path
    with Image.open(path) as im:
        assert im.format == "PNG"
        px = im.convert("L")
        lo, hi = px.getextrema()
        assert hi - lo > 100, "a blank picture"
        return im.size


def size_of(fig) -> tuple[int, int]:
    w, h = fig.get_size_inches() * fig.dpi
    return round(w), round(h)


def shown(tokens: list[str]) -> list[str]:
    from lmlab.viz.heatmap import label

    return [label(t) for t in tokens]


# --------------------------------------------------------------------------- attention
def test_attention_grid_single_layer_and_one_head(lm, tmp_path):
    toks = lm.tokens(TEXT)
    fig = attention_figure(lm, TEXT)
    maps = heatmaps(fig)
    assert len(maps) == 2 * 2  # rows = layers, columns = heads
    assert [t.get_text() for t in maps[0].get_yticklabels()] == shown(toks)  # the queries, left column
    assert [t.get_text() for t in maps[-1].get_xticklabels()] == shown(toks)  # the keys, bottom row
    assert maps[0].images[0].get_array().shape == (len(toks), len(toks))
    assert len(heatmaps(attention_figure(lm, TEXT, layer=1))) == 2  # that layer's heads
    one = attention_figure(lm, TEXT, layer=1, head=0, dpi=80)
    assert len(heatmaps(one)) == 1
    torch.testing.assert_close(torch.tensor(heatmaps(one)[0].images[0].get_array().data), lm.attention(TEXT)[1, 0],
                               atol=1e-7, rtol=0)  # fmt: skip
    assert size_of(one)[0] > size_of(fig)[0] / 2  # one panel drawn large

    rc, err = viz("attention", lm.source, "--text", TEXT, "--out", tmp_path / "a.png")
    assert rc == 0, err
    assert png_size(tmp_path / "a.png") == size_of(fig)
    rc, err = viz("attention", lm.source, "--text", TEXT, "--layer", 1, "--head", 0, "--dpi", 80, "--out",
                  tmp_path / "one.png")  # fmt: skip
    assert rc == 0, err
    assert png_size(tmp_path / "one.png") == size_of(one)


def test_attention_json_holds_model_attention(lm, tmp_path):
    assert viz("attention", lm.source, "--text", TEXT, "--out", tmp_path / "a.json")[0] == 0
    got = json.loads((tmp_path / "a.json").read_text(encoding="utf-8"))
    want = lm.attention(TEXT)
    assert got["tokens"] == lm.tokens(TEXT) and got["layers"] == [0, 1] and got["heads"] == [0, 1]
    torch.testing.assert_close(torch.tensor(got["weights"]), want, atol=0, rtol=0)
    assert viz("attention", lm.source, "--text", TEXT, "--layer", 1, "--head", 1, "--out", tmp_path / "b.json")[0] == 0
    got = json.loads((tmp_path / "b.json").read_text(encoding="utf-8"))
    torch.testing.assert_close(torch.tensor(got["weights"]), want[1:, 1:], atol=0, rtol=0)


def test_attention_of_bert_and_of_an_encoder(bert, mt, tmp_path):
    text = "the movie was good"
    fig = attention_figure(bert, text)
    assert len(heatmaps(fig)) == 2 * 4
    assert [t.get_text() for t in heatmaps(fig)[0].get_yticklabels()] == ["[CLS]", "the", "movie", "was", "good",
                                                                          "[SEP]"]  # fmt: skip
    src = "To be, or not"
    assert len(heatmaps(attention_figure(mt, src))) == 1 * 2  # the encoder's layer and heads
    from lmlab.viz import draw_attention

    out = draw_attention(mt, src, tmp_path / "enc.json")
    torch.testing.assert_close(torch.tensor(json.loads(out.read_text())["weights"]), mt.attention(src), atol=0, rtol=0)
    assert png_size(draw_attention(bert, text, tmp_path / "bert.png")) == size_of(fig)


# --------------------------------------------------------------------------- alignment
def test_alignment_panels_and_numbers(mt, mt_dir, tmp_path):
    src, tgt = "To be, or not", "the question"
    cross = mt.cross_attention(src, target=tgt)  # (layers, heads, T, S)
    fig = alignment_figure(mt, src, target=tgt)
    maps = heatmaps(fig)
    assert len(maps) == 2  # one panel per decoder layer, heads averaged
    torch.testing.assert_close(torch.tensor(maps[1].images[0].get_array().data), cross[1].mean(0), atol=1e-7, rtol=0)
    assert len(heatmaps(alignment_figure(mt, src, target=tgt, layer=0))) == 1
    head = heatmaps(alignment_figure(mt, src, target=tgt, layer=0, head=1))
    torch.testing.assert_close(torch.tensor(head[0].images[0].get_array().data), cross[0, 1], atol=1e-7, rtol=0)

    assert viz("alignment", mt_dir, "--text", src, "--target", tgt, "--out", tmp_path / "al.json")[0] == 0
    got = json.loads((tmp_path / "al.json").read_text(encoding="utf-8"))
    torch.testing.assert_close(torch.tensor(got["weights"]), cross, atol=0, rtol=0)
    torch.testing.assert_close(torch.tensor(got["shown"]), cross.mean(1), atol=1e-7, rtol=0)
    assert len(got["target"]) == cross.shape[2] and len(got["source"]) == cross.shape[3]
    rc, err = viz("alignment", mt_dir, "--text", src, "--target", tgt, "--out", tmp_path / "al.png")
    assert rc == 0, err
    assert png_size(tmp_path / "al.png") == size_of(fig)
    own = mt.cross_attention(src)  # no --target: the model's greedy translation
    assert len(heatmaps(alignment_figure(mt, src))[0].get_yticklabels()) == own.shape[2]


# --------------------------------------------------------------------------- positions
def test_sinusoidal_is_the_papers_formula(tmp_path):
    d, P = 16, 40
    rc, err = viz("positions", "--kind", "sinusoidal", "--d-model", d, "--max-len", P, "--out", tmp_path / "pe.json")
    assert rc == 0, err
    got = json.loads((tmp_path / "pe.json").read_text(encoding="utf-8"))
    assert got["layout"] == "interleaved"
    for pos in range(P):
        for i in range(d // 2):
            angle = pos / 10000 ** (2 * i / d)
            assert got["matrix"][pos][2 * i] == pytest.approx(math.sin(angle), abs=1e-6)
            assert got["matrix"][pos][2 * i + 1] == pytest.approx(math.cos(angle), abs=1e-6)
    # PE(p)·PE(q) / (d/2) = mean_i cos((p − q) ω_i): a function of the offset alone
    for off in (0, 1, 7, 30):
        want = sum(math.cos(off / 10000 ** (2 * i / d)) for i in range(d // 2)) / (d // 2)
        assert got["similarity_by_offset"][off] == pytest.approx(want, abs=1e-5)
        assert got["similarity"][P - 1][P - 1 - off] == pytest.approx(want, abs=1e-5)
    fig = positions_figure("sinusoidal", d_model=d, max_len=P)
    assert len(panels(fig)) == 3 and len(heatmaps(fig)) == 2
    assert viz("positions", "--kind", "sinusoidal", "--out", tmp_path / "pe.png")[0] == 0
    assert png_size(tmp_path / "pe.png") == (1500, 460) == size_of(positions_figure("sinusoidal"))


def test_rope_scores_depend_only_on_the_offset(tmp_path):
    from lmlab.viz.positions import rope

    d, P = 8, 24
    got = rope(d, P, seed=3)
    theta = [10000 ** (-2 * i / d) for i in range(d // 2)]
    assert got["theta"].tolist() == pytest.approx(theta, rel=1e-6)
    x = torch.randn(d, generator=torch.Generator().manual_seed(3)).double()
    weight = (x[: d // 2] ** 2 + x[d // 2 :] ** 2) / (x @ x)  # each rotated pair (i, i + d/2) keeps its length
    for m in range(P):
        for n in range(P):
            want = sum(float(w) * math.cos((m - n) * t) for w, t in zip(weight, theta))
            assert float(got["scores"][m, n]) == pytest.approx(want, abs=1e-5)
    fig = positions_figure("rope", d_model=d, max_len=P)
    assert len(panels(fig)) == 3
    assert viz("positions", "--kind", "rope", "--d-model", 32, "--max-len", 64, "--out", tmp_path / "r.png")[0] == 0
    assert png_size(tmp_path / "r.png") == (1500, 460)


def test_learned_positions_are_the_models_own(lm, lm_dir, tmp_path):
    assert viz("positions", "--kind", "learned", lm_dir, "--max-len", 20, "--out", tmp_path / "l.json")[0] == 0
    got = json.loads((tmp_path / "l.json").read_text(encoding="utf-8"))
    table = lm.module.pos_emb.weight.detach()[:20].double()
    torch.testing.assert_close(torch.tensor(got["matrix"], dtype=torch.float64), table, atol=1e-12, rtol=0)
    cos = torch.nn.functional.cosine_similarity(table[:, None], table[None], dim=-1)
    torch.testing.assert_close(torch.tensor(got["similarity"], dtype=torch.float64), cos, atol=1e-9, rtol=0)
    assert len(panels(positions_figure("learned", lm))) == 3
    assert viz("positions", "--kind", "learned", lm_dir, "--out", tmp_path / "l.png")[0] == 0
    assert png_size(tmp_path / "l.png") == (1500, 460)


# --------------------------------------------------------------------------- tokens
def test_tokens_surprisal(lm, lm_dir, tmp_path):
    text = "the sea and the question"
    fig = tokens_figure(lm, text)
    ax = fig.axes[0]
    boxes = sum(len(c.get_paths()) for c in ax.collections) + len(ax.patches)
    assert boxes == len(lm.tokens(text))  # one box per token (the first hatched)
    assert "".join(t.get_text() for t in ax.texts) == text
    assert viz("tokens", lm_dir, "--text", text, "--out", tmp_path / "t.png")[0] == 0
    assert png_size(tmp_path / "t.png") == size_of(fig)

    assert viz("tokens", lm_dir, "--text", text, "--top-k", 3, "--out", tmp_path / "t.json")[0] == 0
    got = json.loads((tmp_path / "t.json").read_text(encoding="utf-8"))
    assert got["logprobs"][0] is None and got["surprisal"][0] is None and got["top"][0] == []
    torch.testing.assert_close(torch.tensor(got["logprobs"][1:]), lm.token_logprobs(text), atol=1e-6, rtol=0)
    assert all(len(t) == 3 for t in got["top"][1:])

    assert viz("tokens", lm_dir, "--text", text, "--out", tmp_path / "t.html")[0] == 0
    page = (tmp_path / "t.html").read_text(encoding="utf-8")
    spans = re.findall(r'<span class="(tok[^"]*)"(?: style="background:(#[0-9a-f]{6})")? data-t="(\d+)" '
                       r'title="([^"]*)">', page)  # fmt: skip
    assert len(spans) == len(got["tokens"])
    assert spans[0][0] == "tok none" and "no prediction" in spans[0][3]
    assert all("likeliest" in s[3] for s in spans[1:])
    darkest = min(range(1, len(spans)), key=lambda t: int(spans[t][1][3:5], 16))  # the least green: the reddest
    assert darkest == max(range(1, len(spans)), key=lambda t: got["surprisal"][t])


# --------------------------------------------------------------------------- an imported Hugging Face model
HF_TEXT = "the sea, 'tis nobler in the mind"


def test_tokens_of_an_imported_gpt2_equal_transformers(gpt2_dir, tmp_path):
    """``lmlab viz tokens`` on a save_pretrained GPT-2: the JSON's log-probabilities and top-k are
    log_softmax of transformers' own logits on the same weights; the page and picture show them."""
    ref, tok = _hf_gpt2(gpt2_dir)
    ids = tok.encode(HF_TEXT).ids
    with torch.no_grad():
        lp = torch.log_softmax(ref(torch.tensor([ids])).logits[0].double(), dim=-1)  # row t: token t+1
    want = [float(lp[t - 1, ids[t]]) for t in range(1, len(ids))]
    assert max(want) - min(want) > 1.0  # far from uniform: a shifted or wrong row would show

    assert viz("tokens", gpt2_dir, "--text", HF_TEXT, "--top-k", 4, "--out", tmp_path / "t.json")[0] == 0
    got = json.loads((tmp_path / "t.json").read_text(encoding="utf-8"))
    assert got["ids"] == ids and got["tokens"] == [tok.decode([i]) for i in ids]
    assert got["logprobs"][0] is None and got["top"][0] == []
    assert got["logprobs"][1:] == pytest.approx(want, abs=1e-5)
    assert got["surprisal"][1:] == pytest.approx([-x for x in want], abs=1e-5)
    for t in range(1, len(ids)):
        vals, best = lp[t - 1].topk(4)
        assert [a["token"] for a in got["top"][t]] == [tok.decode([int(i)]) for i in best]
        assert [a["logprob"] for a in got["top"][t]] == pytest.approx(vals.tolist(), abs=1e-5)

    assert viz("tokens", gpt2_dir, "--text", HF_TEXT, "--out", tmp_path / "t.html")[0] == 0
    page = (tmp_path / "t.html").read_text(encoding="utf-8")
    titles = re.findall(r'<span class="tok[^"]*"[^>]* data-t="\d+" title="([^"]*)">', page)
    assert len(titles) == len(ids) and "no prediction" in titles[0]
    shown_lp = [-float(re.search(r"−log p = ([0-9.]+) nats", t).group(1)) for t in titles[1:]]
    assert shown_lp == pytest.approx(want, abs=1.5e-3)  # printed with 3 decimals

    assert viz("tokens", gpt2_dir, "--text", HF_TEXT, "--out", tmp_path / "t.png")[0] == 0
    model = lmlab.load(gpt2_dir)
    fig = tokens_figure(model, HF_TEXT)
    ax = fig.axes[0]
    assert sum(len(c.get_paths()) for c in ax.collections) + len(ax.patches) == len(ids)
    assert png_size(tmp_path / "t.png") == size_of(fig)


def test_learned_positions_of_an_imported_gpt2_are_its_wpe(gpt2_dir, tmp_path):
    """``lmlab viz positions --kind learned`` on a save_pretrained GPT-2: the matrix is the model's
    ``transformer.wpe`` table as transformers loads it, the similarity its rows' cosines."""
    import base64

    ref, _ = _hf_gpt2(gpt2_dir)
    wpe = ref.transformer.wpe.weight.detach().double()  # (n_positions = 48, n_embd = 32)
    assert viz("positions", "--kind", "learned", gpt2_dir, "--out", tmp_path / "p.json")[0] == 0
    got = json.loads((tmp_path / "p.json").read_text(encoding="utf-8"))
    assert got["kind"] == "learned" and got["max_len"] == 48 and got["d_model"] == 32
    torch.testing.assert_close(torch.tensor(got["matrix"], dtype=torch.float64), wpe, atol=0, rtol=0)
    rows = [[float(x) for x in r] for r in wpe]
    norms = [math.sqrt(sum(x * x for x in r)) for r in rows]
    for i, j in ((0, 0), (0, 1), (3, 17), (47, 5), (20, 21)):
        cos = sum(a * b for a, b in zip(rows[i], rows[j])) / (norms[i] * norms[j])
        assert got["similarity"][i][j] == pytest.approx(cos, abs=1e-9)
    for off in (0, 1, 10, 47):
        pairs = [(i, i + off) for i in range(48 - off)]
        mean = sum(got["similarity"][i][j] for i, j in pairs) / len(pairs)
        assert got["similarity_by_offset"][off] == pytest.approx(mean, abs=1e-9)

    assert viz("positions", "--kind", "learned", gpt2_dir, "--max-len", 20, "--out", tmp_path / "p20.json")[0] == 0
    got = json.loads((tmp_path / "p20.json").read_text(encoding="utf-8"))
    torch.testing.assert_close(torch.tensor(got["matrix"], dtype=torch.float64), wpe[:20], atol=0, rtol=0)

    assert viz("positions", "--kind", "learned", gpt2_dir, "--out", tmp_path / "p.png")[0] == 0
    assert png_size(tmp_path / "p.png") == (1500, 460)
    assert len(panels(positions_figure("learned", lmlab.load(gpt2_dir)))) == 3

    assert viz("positions", "--kind", "learned", gpt2_dir, "--out", tmp_path / "p.html")[0] == 0
    page = (tmp_path / "p.html").read_text(encoding="utf-8")
    (png,) = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    with Image.open(io.BytesIO(base64.b64decode(png))) as im:
        assert im.size == (1500, 460)


# --------------------------------------------------------------------------- neurons
def _torch_lstm_states(model, text: str) -> list[list[list[float]]]:
    """h_t of each layer (layers × T × H, as lists) from torch.nn.LSTM run on the model's weights."""
    rnn = model.module.rnn
    with torch.no_grad():
        x = model.module.tok_emb(torch.tensor([model.encode(text)]))
        out = []
        for k in range(rnn.num_layers):
            one = torch.nn.LSTM(x.shape[-1], rnn.hidden_size, batch_first=True)
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(one, f"{name}_l0").copy_(getattr(rnn, f"{name}_l{k}"))
            x, _ = one(x)
            out.append(x[0].tolist())
    return out


def _rank_by_hand(h: list[list[float]], by: str) -> list[int]:
    """Units (columns of h: T × H) best first, by mean |h_t| or by the variance of h_t over t."""
    T, H = len(h), len(h[0])
    col = [[h[t][u] for t in range(T)] for u in range(H)]
    if by == "activity":
        score = [sum(abs(v) for v in c) / T for c in col]
    else:
        score = [sum((v - sum(c) / T) ** 2 for v in c) / T for c in col]
    return sorted(range(H), key=lambda u: (-score[u], u))


def test_neurons_of_an_lstm(lstm, lstm_dir, tmp_path):
    text = "To be, or not to be"
    h = _torch_lstm_states(lstm, text)  # PyTorch's own LSTM: layers × T × H
    fig = neurons_figure(lstm, text, units=5)
    units = [ax for ax in fig.axes if ax.get_title(loc="left").startswith("unit ")]
    assert len(units) == 5
    assert [int(ax.get_title(loc="left").split()[1]) for ax in units] == _rank_by_hand(h[1], "activity")[:5]
    assert viz("neurons", lstm_dir, "--text", text, "--units", 5, "--out", tmp_path / "n.png")[0] == 0
    assert png_size(tmp_path / "n.png") == size_of(fig)

    for by in ("activity", "variance"):
        flag = () if by == "activity" else ("--by", "variance")  # the most active units by default
        assert viz("neurons", lstm_dir, "--text", text, "--units", 4, *flag, "--out", tmp_path / "n.json")[0] == 0
        got = json.loads((tmp_path / "n.json").read_text(encoding="utf-8"))
        top = _rank_by_hand(h[1], by)[:4]  # the top layer
        assert got["layer"] == 1 and got["units"] == top and got["state"] == "h" and got["ranked_by"] == by
        want = [[h[1][t][u] for t in range(len(h[1]))] for u in top]
        torch.testing.assert_close(torch.tensor(got["values"]), torch.tensor(want), atol=1e-5, rtol=0)
    assert _rank_by_hand(h[1], "activity")[:4] != _rank_by_hand(h[1], "variance")[:4]  # the flag matters here

    assert viz("neurons", lstm_dir, "--text", text, "--layer", 0, "--unit", "3,7", "--cell", "--out",
               tmp_path / "c.json")[0] == 0  # fmt: skip
    got = json.loads((tmp_path / "c.json").read_text(encoding="utf-8"))
    from lmlab.inspection import hidden_states

    cell = hidden_states(lstm, text)["cell"]
    torch.testing.assert_close(torch.tensor(got["values"]), cell[0][:, [3, 7]].T, atol=0, rtol=0)
    assert got["state"] == "c" and got["units"] == [3, 7]


def test_neuron_ranking_against_a_hand_made_state(lstm, tmp_path, monkeypatch):
    """Four units over four tokens, made so that the two rankings differ:

        unit 0   0.9  0.9  0.9  0.9     mean |h| 0.9    variance 0
        unit 1  −0.5  0.5 −0.5  0.5              0.5             0.25
        unit 2   0.1 −0.1  0.1 −0.1              0.1             0.01
        unit 3  −0.8 −0.7 −0.8 −0.7              0.75            0.0025

    the most active: 0, 3, 1, 2; the most varying: 1, 2, 3, 0."""
    import lmlab.inspection

    h = torch.tensor([[0.9, -0.5, 0.1, -0.8], [0.9, 0.5, -0.1, -0.7], [0.9, -0.5, 0.1, -0.8], [0.9, 0.5, -0.1, -0.7]])
    fake = {"tokens": list("abcd"), "hidden": torch.stack([torch.zeros(4, 4), h]), "cell": torch.stack([h, -2 * h])}
    monkeypatch.setattr(lmlab.inspection, "hidden_states", lambda model, text: fake)
    from lmlab.viz.neurons import activations, draw_neurons

    assert activations(lstm, "abcd", units=4)["units"] == [0, 3, 1, 2]
    assert activations(lstm, "abcd", units=2, by="variance")["units"] == [1, 2]
    got = activations(lstm, "abcd", units=3)
    assert got["units"] == [0, 3, 1] and got["layer"] == 1
    assert got["mean_abs"].tolist() == pytest.approx([0.9, 0.75, 0.5])
    assert got["variance"].tolist() == pytest.approx([0.0, 0.0025, 0.25])
    assert activations(lstm, "abcd", layer=0, units=4, cell=True, by="variance")["units"] == [1, 2, 3, 0]
    assert activations(lstm, "abcd", units=1, cell=True)["units"] == [0]  # c = −2h: the same order
    with pytest.raises(LmlabError, match="--by must be one of activity, variance"):
        activations(lstm, "abcd", by="max")
    page = draw_neurons(lstm, "abcd", tmp_path / "n.html", units=2).read_text(encoding="utf-8")
    assert re.findall(r'data-unit="(\d+)"', page) == ["0", "3"] and "most active units" in page
    page = draw_neurons(lstm, "abcd", tmp_path / "v.html", units=2, by="variance").read_text(encoding="utf-8")
    assert re.findall(r'data-unit="(\d+)"', page) == ["1", "2"] and "most varying units" in page


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "args,message",
    [
        (["attention", "{lm}", "--text", "a", "--out", "a.svg"], "follows the extension"),
        (["attention", "{lm}", "--text", "a", "--out", "a"], "no extension"),
        (["attention", "{lm}", "--text", "a", "--layer", "99", "--out", "a.png"], "--layer 99: the model has 2 layers"),
        (["attention", "{lm}", "--text", "a", "--head", "5", "--out", "a.png"], "--head 5"),
        (["attention", "{lstm}", "--text", "a", "--out", "a.png"], "a recurrent model has no attention"),
        (["alignment", "{lm}", "--text", "a", "--out", "a.png"], "cross-attention belongs to an encoder-decoder"),
        (["neurons", "{lm}", "--text", "a", "--out", "a.png"], "recurrent language models"),
        (["neurons", "{lstm}", "--text", "a", "--unit", "3,99", "--out", "a.png"], "--unit 99"),
        (["neurons", "{lstm}", "--text", "a", "--unit", "3", "--by", "variance", "--out", "a.png"], "--unit names them"),
        (["positions", "--kind", "learned", "--out", "a.png"], "give MODEL"),
        (["positions", "--kind", "rope", "{lm}", "--out", "a.png"], "positions are learned, not rope"),
        (["positions", "--kind", "sinusoidal", "--d-model", "7", "--out", "a.png"], "even"),
        (["tokens", "{lm}", "--text", "", "--out", "a.html"], "--text is empty"),
        (["tokens", "{mt}", "--text", "a", "--out", "a.html"], "does not predict the next token"),
    ],
)
def test_user_errors_are_one_line(args, message, lm_dir, lstm_dir, mt_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [a.format(lm=lm_dir, lstm=lstm_dir, mt=mt_dir) for a in args]
    rc, err = viz(*argv)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmlab: error: ") and message in lines[0], err
    assert not list(tmp_path.glob("a*"))


def test_python_api_errors(lm, tmp_path):
    from lmlab.models.config import RNNConfig
    from lmlab.models.rnn import RNNLanguageModel
    from lmlab.viz import draw

    tok = char_tokenizer()
    gru = RNNLanguageModel(RNNConfig(cell="gru", vocab_size=tok.get_vocab_size(), d_model=8, hidden_size=6, n_layer=1))
    gru = lmlab.load(write_checkpoint(tmp_path / "gru", gru.eval(), tok, {}))
    with pytest.raises(LmlabError, match="only an LSTM has a cell state"):
        draw("neurons", gru, out=tmp_path / "n.png", text="to be", cell=True)
    assert len(neurons_figure(gru, "to be", units=3).axes) == 3 + 1  # a GRU's h: three units and the colour bar
    with pytest.raises(LmlabError, match="unknown picture 'pie'"):
        draw("pie", lm, out=tmp_path / "p.png")
    with pytest.raises(LmlabError, match="give MODEL"):
        draw("positions", out=tmp_path / "p.png", kind="learned")
    assert not list(tmp_path.glob("*.png"))


def test_viz_help_does_not_import_matplotlib_or_torch():
    code = ("import sys\nfrom lmlab.cli import main\ntry:\n    main(['viz', 'attention', '--help'])\n"
            "except SystemExit:\n    pass\nprint('HEAVY', sorted(m for m in ('torch', 'numpy', 'matplotlib') "
            "if m in sys.modules))\n")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert "HEAVY []" in out.stdout, out.stderr[-2000:]


# --------------------------------------------------------------------------- fonts
@pytest.mark.parametrize("text", [CHINESE, JAPANESE, KOREAN], ids=["chinese", "japanese", "korean"])
def test_cjk_text_renders_with_the_cjk_font(cjk, text):
    """Every character of the text is drawn (as a tick label or a token box: none is <unk>) and
    matplotlib, saving the figure itself, has a glyph for each (no "missing from font" warning)."""
    if fonts.find_cjk_font() is None:
        if _ci():
            pytest.fail("no CJK font installed: CI installs fonts-noto-cjk (.ci/run)")
        pytest.skip("no CJK font installed (apt-get install fonts-noto-cjk)")
    assert cjk.tokens(text) == list(text)  # one token per character, none <unk>
    att, tok = attention_figure(cjk, text), tokens_figure(cjk, text)
    assert [t.get_text() for t in heatmaps(att)[-1].get_xticklabels()] == shown(list(text))  # the keys
    assert "".join(t.get_text() for t in tok.axes[0].texts) == text
    for fig in (att, tok):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fig.savefig(io.BytesIO(), format="png")  # matplotlib's own save: nothing silenced
        assert not [str(w.message) for w in caught if "missing from font" in str(w.message)]


def test_without_a_cjk_font_one_warning_and_a_picture(lm, tmp_path, monkeypatch):
    from lmlab.viz import draw_attention, draw_tokens

    fonts.reset()
    monkeypatch.setattr(fonts, "_search", lambda mono: None)
    try:
        with recorded_warnings() as caught:
            a = draw_attention(lm, CHINESE, tmp_path / "a.png")
            t = draw_tokens(lm, CHINESE, tmp_path / "t.png")
        ours = lmlab_warnings(caught)
        assert len(ours) == 1 and "apt-get install fonts-noto-cjk" in ours[0], ours
        assert not [w for w in caught if "missing from font" in str(w.message)]
        png_size(a), png_size(t)
    finally:
        fonts.reset()


# --------------------------------------------------------------------------- pages
PAGE_TEXT = "the sea, 'tis 学而"  # a quote to escape, and Chinese
#: an embedded data: URL (its base64 may hold any letters, "http" among them by chance: removed first)
DATA_URL = re.compile(r"""data:[\w/+.-]*(?:;[\w=.-]+)*,[^"')\s]*""", re.I)
#: anything that would fetch from elsewhere: a src/href not data: or #fragment, any http(s) URL,
#: a protocol-relative //host, CSS url(...) or @import, a script's fetch() or import()
EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?!["'#]|data:)|http|//[a-z0-9-]+\.[a-z]|url\s*\("""
                      r"""|@import|\bfetch\s*\(|\bimport\s*\(""", re.I)  # fmt: skip


def external(page: str) -> re.Match | None:
    return EXTERNAL.search(DATA_URL.sub("data:,", page))


@pytest.fixture(scope="module")
def pages(lm, mt, lstm, bert, tmp_path_factory):
    from lmlab.viz import draw

    folder = tmp_path_factory.mktemp("pages")
    return {
        "attention": draw("attention", lm, out=folder / "attention.html", text=PAGE_TEXT),
        "bert": draw("attention", bert, out=folder / "bert.html", text="the cat sat", layer=1),
        "alignment": draw("alignment", mt, out=folder / "alignment.html", text="To be", target="the sea"),
        "tokens": draw("tokens", lm, out=folder / "tokens.html", text="the sea,\n'tis 学而"),
        "neurons": draw("neurons", lstm, out=folder / "neurons.html", text="To be\nor not", units=3),
        "positions": draw("positions", out=folder / "positions.html", kind="rope", d_model=16, max_len=16),
    }


def test_pages_are_self_contained(pages):
    for name, path in pages.items():
        text = path.read_text(encoding="utf-8")
        assert text.startswith("<!doctype html>") and text.rstrip().endswith("</html>"), name
        assert not external(text), (name, external(text))


@pytest.mark.parametrize("bad", [
    '<script src="https://cdn.example.com/d3.js"></script>', "<img src='//cdn.example.com/x.png'>",
    '<link rel="stylesheet" href="style.css">', "<img src=x.png>", "<style>body { background: url(bg.png) }</style>",
    "<style>@import 'fonts.css';</style>", "<p>see http://example.com</p>", "<script>fetch('data.json')</script>",
    "<script>import('./mod.js')</script>", '<a href="HTTPS://EXAMPLE.COM">x</a>',
    '<img src="data:image/png;base64,iVBOR/httpAAA="><img src="http://example.com/y.png">',
])  # fmt: skip
def test_the_self_contained_check_catches_outside_references(bad):
    page = '<!doctype html><link rel="icon" href="data:,"><img src="data:image/png;base64,aHR0cA/url(x">'
    assert external(page) is None  # data: URLs are inline, whatever letters their base64 holds
    assert external(page + bad) is not None


def test_page_data_cannot_close_its_script_element():
    from lmlab.viz.html import data_script

    script = data_script({"token": "</script><script>alert(1)"})
    assert script.count("</script>") == 1 and script.endswith("</script>")
    assert json.loads(script[script.index(">") + 1 : -len("</script>")]) == {"token": "</script><script>alert(1)"}


def test_pages_open_in_a_browser_without_errors(pages, lm):
    driver = _browser()
    try:
        for name, path in pages.items():
            driver.get(path.as_uri())
            errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
            assert not errors, (name, errors)
            assert driver.find_element("tag name", "h1").text
        driver.get(pages["attention"].as_uri())
        T = len(lm.tokens(PAGE_TEXT))
        assert len(driver.find_elements("css selector", "#map rect")) == T * T
        assert len(driver.find_elements("css selector", "#layer option")) == 2
        driver.execute_script("const s = document.getElementById('layer'); s.value = 1; s.dispatchEvent(new Event('change'))")
        rect = driver.find_elements("css selector", "#map rect")[T + 1]  # row 1, column 1
        driver.execute_script("arguments[0].dispatchEvent(new MouseEvent('mouseover', {bubbles: true}))", rect)
        want = float(lm.attention(PAGE_TEXT)[1, 0, 1, 1])
        assert driver.find_element("id", "tip").text.endswith(f"{want:.4f}")
        driver.get(pages["tokens"].as_uri())
        assert "no prediction" in driver.find_elements("css selector", ".text span.tok")[0].get_attribute("title")
        assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        driver.quit()


def _ci() -> bool:
    import os

    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _browser():
    """Headless Chromium, as tests/serve/test_playground.py finds it; skipped without one unless under CI."""
    import os
    import shutil

    def find(env: str, names: tuple[str, ...]) -> str | None:
        given = os.environ.get(env)
        if given:
            return given if Path(given).is_file() else None
        return next((p for p in map(shutil.which, names) if p), None)

    chromium = find("LMLAB_CHROMIUM", ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"))
    driver_path = find("LMLAB_CHROMEDRIVER", ("chromedriver",))
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        webdriver = None
    if webdriver is None or chromium is None or driver_path is None:
        how = "no browser: apt-get install chromium chromium-driver, and pip install selenium"
        if _ci():
            pytest.fail(how + " (CI runs these tests)")
        pytest.skip(how)
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-proxy-server",
                "--allow-file-access-from-files"):  # fmt: skip
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(driver_path))
    driver.set_page_load_timeout(60)
    return driver
