"""Recurrent language models: the explicit cells against PyTorch's fused kernels, the
state as a generation cache, training with lmlab's Trainer (random windows and
--stateful), checkpoints, and the errors a user can cause.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import SHAKESPEARE_LINES, read_metrics, train_once, write_corpus
from safetensors.torch import load_file
from torch import nn

import lmlab
from lmlab.cli import main as cli_main
from lmlab.data import windows
from lmlab.errors import LmlabError
from lmlab.generate import GenerationConfig, generate_tokens
from lmlab.models import build_model
from lmlab.models.base import State
from lmlab.models.config import RNNConfig
from lmlab.models.rnn import RecurrentState, RNNLanguageModel
from lmlab.nn.cells import RecurrentStack, gru_cell, lstm_cell, rnn_cell
from lmlab.training import TrainConfig, Trainer

CELLS = ("rnn", "gru", "lstm")
FUSED = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}
TEXT = SHAKESPEARE_LINES * 30
# Small explicit sizes, so a change of TrainConfig's defaults never slows these tests.
SMALL = dict(
    model="lstm",
    n_layer=2,
    d_model=16,
    hidden_size=48,
    max_seq_len=24,
    batch_size=8,
    seed=3,
    warmup=5,
    lr=1e-2,
    dropout=0.0,
    precision="fp32",
    device="cpu",
    progress=False,
)


def tiny(cell: str, **kw) -> RNNLanguageModel:
    torch.manual_seed(0)
    cfg = dict(cell=cell, vocab_size=13, d_model=6, hidden_size=10, n_layer=2, max_seq_len=8)
    cfg.update(kw)
    return build_model(RNNConfig(**cfg)).eval()


def random_state(cell: str, layers: int, batch: int, hidden: int):
    h = torch.randn(layers, batch, hidden)
    return (h, torch.randn(layers, batch, hidden)) if cell == "lstm" else h


# --------------------------------------------------------------------------- cells
@pytest.mark.parametrize("cell", CELLS)
def test_reference_cells_equal_fused_layers(cell):
    """Same weights in lmlab.nn.cells and in nn.RNN/GRU/LSTM: equal outputs and states."""
    torch.manual_seed(1)
    fused = FUSED[cell](5, 7, num_layers=2, batch_first=True)
    ref = RecurrentStack(cell, 5, 7, num_layers=2)
    ref.load_state_dict(fused.state_dict())  # same names, same layout
    x = torch.randn(3, 9, 5)
    s0 = random_state(cell, 2, 3, 7)
    with torch.no_grad():
        out_f, s_f = fused(x, s0)
        out_r, s_r = ref(x, s0)
    torch.testing.assert_close(out_r, out_f, atol=1e-5, rtol=0)
    for a, b in zip(s_r if cell == "lstm" else [s_r], s_f if cell == "lstm" else [s_f]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # and from a zero state (state=None), as the model starts
    with torch.no_grad():
        torch.testing.assert_close(ref(x)[0], fused(x)[0], atol=1e-5, rtol=0)


def test_cells_against_hand_computed_values():
    """One step with 1-unit weights, the numbers worked out by hand from the formulas."""
    x, h, c = torch.tensor([[2.0]]), torch.tensor([[0.5]]), torch.tensor([[-1.0]])
    sig, tanh = (lambda v: 1 / (1 + torch.exp(-torch.tensor(v)))), (lambda v: torch.tanh(torch.tensor(v)))
    # Elman: h' = tanh(0.3·2 + 0.1 + (-0.4)·0.5 + 0.2) = tanh(0.7)
    out = rnn_cell(
        x, h, torch.tensor([[0.3]]), torch.tensor([[-0.4]]), torch.tensor([0.1]), torch.tensor([0.2])
    )
    torch.testing.assert_close(out, tanh(0.7).reshape(1, 1))
    # LSTM, gates (i, f, g, o) with w_ih = [1, 2, 3, 4], w_hh = 0, biases 0: pre-activations x·w
    w_ih, w_hh, zero = torch.tensor([[1.0], [2.0], [3.0], [4.0]]), torch.zeros(4, 1), torch.zeros(4)
    h2, c2 = lstm_cell(x, (h, c), w_ih, w_hh, zero, zero)
    c_ref = sig(4.0) * -1.0 + sig(2.0) * tanh(6.0)  # c' = f⊙c + i⊙g
    torch.testing.assert_close(c2, c_ref.reshape(1, 1))
    torch.testing.assert_close(h2, (sig(8.0) * torch.tanh(c_ref)).reshape(1, 1))  # h' = o⊙tanh(c')
    # GRU, gates (r, z, n): w_ih = [1, 0.5, 1], w_hh = [0, 0, 2], b_hh = [0, 0, 1]
    g = gru_cell(
        x, h, torch.tensor([[1.0], [0.5], [1.0]]), torch.tensor([[0.0], [0.0], [2.0]]),
        torch.zeros(3), torch.tensor([0.0, 0.0, 1.0]),
    )  # fmt: skip
    r, z = sig(2.0), sig(1.0)
    n = torch.tanh(2.0 + r * (2.0 * 0.5 + 1.0))  # n = tanh(W_in x + r⊙(W_hn h + b_hn))
    torch.testing.assert_close(g, ((1 - z) * n + z * 0.5).reshape(1, 1))


# --------------------------------------------------------------------------- the model
@pytest.mark.parametrize("cell", CELLS)
def test_full_sequence_equals_step_by_step(cell):
    m = tiny(cell, tie_embeddings=True)  # hidden 10 != d_model 6: tied through a projection
    ids = torch.randint(13, (2, 12))
    with torch.no_grad():
        full, s_full = m(ids)
        state, steps = m.init_state(2, 0), []
        for t in range(ids.shape[1]):
            logits, state = m(ids[:, t : t + 1], state)
            steps.append(logits)
        last, _ = m(ids, last_only=True)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=0)
    for a, b in zip(state.tensors, s_full.tensors, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert m.lm_head.weight is m.tok_emb.weight


def _no_fused_call(*args, **kwargs):
    raise AssertionError("a one-token step on a CPU went through the fused layer")


@pytest.mark.parametrize("cell", CELLS)
def test_one_token_steps_equal_the_fused_layer_over_the_sequence(cell, monkeypatch):
    """The decoding path (one token at a time, PyTorch's one-step cell kernels) against
    a separate nn.RNN/GRU/LSTM with the same weights run over the whole sequence at once
    (oneDNN's fused kernel on a CPU): equal logits at every step and equal final state,
    from a random state, for a batch of 3 rows; the fused layer is never called."""
    m = tiny(cell, tie_embeddings=True)  # hidden 10 != d_model 6: through the projection
    fused = FUSED[cell](6, 10, num_layers=2, batch_first=True)
    fused.load_state_dict(m.rnn.state_dict())
    ids = torch.randint(13, (3, 11))
    s0 = random_state(cell, 2, 3, 10)
    with torch.no_grad():
        ref_out, ref_state = fused(m.tok_emb(ids), s0)  # (3, 11, hidden), all steps in one call
        ref_logits = m.lm_head(m.proj(ref_out))
        monkeypatch.setattr(m.rnn, "forward", _no_fused_call)
        state, steps = s0, []
        for t in range(ids.shape[1]):
            logits, state = m(ids[:, t : t + 1], state)
            steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), ref_logits, atol=1e-5, rtol=0)
    for a, b in zip(state.tensors, ref_state if cell == "lstm" else [ref_state], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cell", CELLS)
def test_one_token_from_a_zero_state_equals_the_fused_layer(cell, monkeypatch):
    m = tiny(cell)
    ids = torch.randint(13, (2, 1))
    with torch.no_grad():
        ref_out, ref_state = m.rnn(m.tok_emb(ids))  # state None: zeros
        monkeypatch.setattr(m.rnn, "forward", _no_fused_call)
        logits, state = m(ids)
    torch.testing.assert_close(logits, m.lm_head(ref_out), atol=1e-5, rtol=0)
    for a, b in zip(state.tensors, ref_state if cell == "lstm" else [ref_state], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_windows_and_dropout_keep_the_fused_layer():
    """Several tokens (training windows, prompts) and a training step with dropout
    between layers go through nn.LSTM (oneDNN), which computes that dropout."""
    calls = []
    m = tiny("lstm", dropout=0.5)
    m.rnn.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        m(torch.randint(13, (2, 4)))  # a window: fused
        assert len(calls) == 1
        m(torch.randint(13, (2, 1)))  # one token in eval mode: the one-step path
        assert len(calls) == 1
        m.train()
        m(torch.randint(13, (2, 1)))  # one token with dropout active: fused
        assert len(calls) == 2


def test_model_uses_the_fused_layer_as_the_reference_says():
    """The model's logits = lm_head(reference stack over the embeddings), weights shared."""
    m = tiny("gru")
    ref = RecurrentStack("gru", 6, 10, num_layers=2)
    ref.load_state_dict(m.rnn.state_dict())
    ids = torch.randint(13, (2, 7))
    with torch.no_grad():
        out, _ = ref(m.tok_emb(ids))
        torch.testing.assert_close(m(ids)[0], m.lm_head(out), atol=1e-5, rtol=0)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_greedy_generation_equals_a_hand_loop_beyond_max_seq_len(cell, capsys):
    """generate_tokens (one token per step, with the state) = re-running the model over
    the whole sequence each step; 40 tokens past a max_seq_len of 8, with no cropping."""
    m = tiny(cell)
    prompt = [1, 4, 2, 7, 3]
    got = list(generate_tokens(m, prompt, GenerationConfig(max_new_tokens=40, temperature=0)))
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(40):
            logits, _ = m(torch.tensor([seq]))  # the whole prefix, no state, no crop
            seq.append(int(logits[0, -1].argmax()))
    assert got == seq[len(prompt) :]
    assert len(seq) > 5 * m.config.max_seq_len
    assert "warning" not in capsys.readouterr().err


def test_sampling_is_reproducible_and_matches_a_hand_sampler():
    m = tiny("lstm")
    cfg = GenerationConfig(max_new_tokens=15, temperature=0.9, seed=11)
    got = list(generate_tokens(m, [3, 5], cfg))
    assert got == list(
        generate_tokens(m, [3, 5], GenerationConfig(max_new_tokens=15, temperature=0.9, seed=11))
    )
    gen = torch.Generator().manual_seed(11)
    seq = [3, 5]
    with torch.no_grad():
        for _ in range(15):
            p = (m(torch.tensor([seq]))[0][0, -1] / 0.9).softmax(-1)
            seq.append(int(torch.multinomial(p[None], 1, generator=gen)))
    assert got == seq[2:]


def test_state_of_the_wrong_shape_is_refused():
    lstm, gru = tiny("lstm"), tiny("gru")
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(LmlabError, match=r"\(2, 2, 10\)"):
        gru(ids, torch.zeros(2, 3, 10))  # batch 3, ids have 2
    with pytest.raises(LmlabError, match="pair"):
        lstm(ids, torch.zeros(2, 2, 10))  # an LSTM needs (h, c)
    with pytest.raises(LmlabError, match="got \\(1, 2, 10\\)"):
        lstm(ids, (torch.zeros(1, 2, 10), torch.zeros(1, 2, 10)))  # one layer, the model has 2
    with pytest.raises(LmlabError, match="one tensor"):
        gru(ids, lstm.init_state(2))  # an LSTM's state given to a GRU
    with pytest.raises(LmlabError, match="padding"):
        gru(ids, attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]))
    with pytest.raises(LmlabError, match="batch, time"):
        gru(torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize(
    "cell, state, msg",
    [
        ("lstm", lambda: (torch.zeros(2, 2, 7), torch.zeros(2, 2, 7)), r"\(2, 2, 10\), got \(2, 2, 7\)"),
        ("lstm", lambda: torch.zeros(2, 2, 10), r"pair \(h, c\)"),
        ("lstm", lambda: (torch.zeros(2, 2, 10),), r"pair \(h, c\)"),
        ("lstm", lambda: (torch.zeros(2, 2, 10), "c"), r"\(2, 2, 10\), got str"),
        ("gru", lambda: torch.zeros(2, 5, 10), r"\(2, 2, 10\), got \(2, 5, 10\)"),
        ("rnn", lambda: torch.zeros(2, 10), r"\(2, 2, 10\), got \(2, 10\)"),
        ("rnn", lambda: (torch.zeros(2, 2, 10), torch.zeros(2, 2, 10)), "one tensor h"),
    ],
)
@pytest.mark.parametrize("T", [1, 3])  # one token (the decoding path) and a window (fused)
def test_bad_state_is_one_line_on_both_paths(cell, state, msg, T):
    m = tiny(cell)
    with pytest.raises(LmlabError, match=msg) as e:
        m(torch.zeros(2, T, dtype=torch.long), state())
    assert "\n" not in str(e.value) and "init_state(2)" in str(e.value)  # says how to fix it


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(hidden_size=0), "hidden_size must be positive"),
        (dict(hidden_size=-8), r"hidden_size must be positive \(got -8\)"),
        (dict(n_layer=0), "n_layer must be positive"),
        (dict(n_layer=-1), r"n_layer must be positive \(got -1\)"),
        (dict(cell="transformer"), "cell must be one of rnn, gru, lstm"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_bad_model_config(kw, msg):
    with pytest.raises(LmlabError, match=msg) as e:
        RNNConfig(**kw)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(hidden_size=0), "--hidden-size must be positive"),
        (dict(hidden_size=-3), "--hidden-size must be positive"),
        (dict(n_layer=0), "--n-layer must be positive"),
        (dict(n_layer=-2), r"--n-layer must be positive \(got -2\)"),
        (dict(model="transformer"), "--model must be gpt, rnn, gru, lstm"),
        (dict(model="gpt", stateful=True), "--stateful needs a recurrent model"),
    ],
)
def test_bad_training_options(tmp_path, kw, msg):
    with pytest.raises(LmlabError, match=msg) as e:
        lmlab.train(data=str(tmp_path / "none.txt"), out=str(tmp_path / "o"), **{**SMALL, **kw})
    assert "\n" not in str(e.value)
    assert not (tmp_path / "o").exists()  # refused before anything was written


@pytest.mark.parametrize(
    "args, line",
    [
        (["--model", "gru", "--hidden-size", "0"], "--hidden-size must be positive (got 0)"),
        (["--model", "lstm", "--n-layer", "0"], "--n-layer must be positive (got 0)"),
        (["--model", "rnn", "--n-layer", "-1"], "--n-layer must be positive (got -1)"),
        (["--model", "gpt", "--stateful"], "--stateful needs a recurrent model (--model rnn, gru, lstm)"),
    ],
)
def test_cli_bad_recurrent_options_are_one_line(tmp_path, capsys, args, line):
    rc = cli_main(["train", *args, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"lmlab: error: {line}")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """TEXT (not conftest's longer corpus) in a file the module shares."""
    return write_corpus(tmp_path_factory.mktemp("corpus"), TEXT)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus) -> Path:
    """A tiny 2-layer LSTM (embedding tied through a projection) trained for 80 steps."""
    opts = dict(data=str(corpus), steps=80, eval_every=40, save_every=80)
    return train_once(tmp_path_factory, "lstm", **opts, **SMALL)


def test_trainer_trains_an_lstm(trained):
    rows = read_metrics(trained)
    first, last = rows[0]["loss"], rows[-1]["val_loss"]
    assert first > 3.0  # ~ln(vocab) at the start
    assert last < first - 0.8, (first, last)
    cfg = json.loads((trained / "config.json").read_text())
    assert (cfg["model_type"], cfg["cell"], cfg["hidden_size"], cfg["n_layer"]) == ("rnn", "lstm", 48, 2)


def test_checkpoint_loads_and_generates(trained, capsys):
    model = lmlab.load(trained)
    assert isinstance(model.module, RNNLanguageModel)
    assert model.module.lm_head.weight is model.module.tok_emb.weight  # tying survives loading
    # The loaded model is the saved weights: compare with a model built by hand from them.
    ref = RNNLanguageModel(RNNConfig(**{k: v for k, v in json.loads((trained / "config.json").read_text()).items()
                                      if k not in ("lmlab", "model_type")})).eval()  # fmt: skip
    weights = load_file(str(trained / "model.safetensors"))
    ref.load_state_dict({**weights, "lm_head.weight": weights["tok_emb.weight"]})
    ids = model.encode("First Citizen:")
    torch.testing.assert_close(model.logits(ids), ref(torch.tensor([ids]))[0], atol=1e-5, rtol=0)
    text = model.generate("First Citizen:", max_new_tokens=60, temperature=0)
    assert len(model.encode(text)) >= 30  # a char model: ~one token per character
    assert (
        cli_main(["generate", str(trained), "--prompt", "All:", "--max-new-tokens", "20", "--seed", "1"]) == 0
    )
    assert capsys.readouterr().out.strip()


def test_loading_as_another_family_is_refused(trained, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(trained, bad, symlinks=False, ignore=shutil.ignore_patterns(".ckpt", "best"))
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "cell": "gru"}))
    with pytest.raises(LmlabError, match="an LSTM's but its config.json says cell='gru'"):
        lmlab.load(bad)
    transformer = {"lmlab": cfg["lmlab"], "model_type": "transformer", "vocab_size": cfg["vocab_size"],
                   "n_layer": 2, "n_head": 2, "d_model": 16}  # fmt: skip
    (bad / "config.json").write_text(json.dumps(transformer))
    with pytest.raises(LmlabError, match="do not match its config.json.*missing"):
        lmlab.load(bad)
    with pytest.raises(LmlabError, match="trains --model lstm, it cannot continue as --model gru"):
        lmlab.train(resume=str(trained), model="gru", steps=90)


@pytest.mark.parametrize(
    "saved, claimed, msg",
    [
        ("gru", "lstm", "are a GRU's but its config.json says cell='lstm'; load it with cell='gru'"),
        ("rnn", "gru", "are an Elman RNN's but its config.json says cell='gru'; load it with cell='rnn'"),
        ("gpt", "lstm", "are a Transformer's but its config.json describes an LSTM"),
    ],
)
def test_checkpoint_of_another_family_is_one_line(tmp_path, saved, claimed, msg):
    """Weights written by one family, config.json edited to say another: lmlab.load names
    both families in one line rather than listing mismatched tensors."""
    from helpers import char_tokenizer, tiny_checkpoint

    from lmlab.models.loading import write_checkpoint

    folder = tmp_path / "ckpt"
    if saved == "gpt":
        tiny_checkpoint(folder)
    else:
        tok = char_tokenizer()
        write_checkpoint(folder, tiny(saved, vocab_size=tok.get_vocab_size()), tok, {})
    cfg = json.loads((folder / "config.json").read_text())
    rnn = {"model_type": "rnn", "cell": claimed, "vocab_size": cfg["vocab_size"], "d_model": 6,
           "hidden_size": 10, "n_layer": 2}  # fmt: skip
    (folder / "config.json").write_text(json.dumps({"lmlab": cfg["lmlab"], **rnn}))
    with pytest.raises(LmlabError) as e:
        lmlab.load(folder)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_stateful_training_carries_the_state_across_chunks(corpus, tmp_path):
    """With --stateful, row b of step k continues row b of step k-1, and the carried state
    is the model's state after reading the stream from its start (weights held fixed by
    skipping the optimizer step, so the reference is a plain forward pass)."""
    cfg = TrainConfig(data=str(corpus), out=str(tmp_path / "s"), steps=3, stateful=True, grad_accum=2,
                      **{**SMALL, "model": "gru"})  # fmt: skip
    cfg.validate()
    tr = Trainer(cfg)
    tr.setup()
    tr.optimizer.step = lambda *a, **k: None  # freeze the weights
    T, B = cfg.max_seq_len, cfg.batch_size
    starts = [tr._stream_starts(k) for k in range(3)]
    assert torch.equal(starts[1] - starts[0], torch.full((B,), T))  # each row moves on by one window
    for k in range(3):
        tr.train_step(k)
    x, _ = windows(tr.train_ids, starts[0], 3 * T)  # each stream's first 3 windows in one go
    tr.model.eval()
    with torch.no_grad():
        _, h = tr.model(x)
    carried = torch.cat([tr.carry[0].h, tr.carry[1].h], dim=1)  # two micro-batches of B/2 rows
    torch.testing.assert_close(carried, h.h, atol=1e-5, rtol=0)
    assert not carried.requires_grad  # detached between chunks (truncated BPTT)


def test_stateful_training_runs_and_learns(corpus, tmp_path):
    out = tmp_path / "st"
    res = lmlab.train(data=str(corpus), out=str(out), steps=40, eval_every=40, stateful=True,
                      **{**SMALL, "model": "gru", "batch_size": 4})  # fmt: skip
    rows = read_metrics(out)
    assert res.val_loss < rows[0]["loss"] - 0.5


def test_stateful_needs_streams_longer_than_a_window(tmp_path):
    p = tmp_path / "short.txt"
    p.write_text(TEXT[:1500], encoding="utf-8")
    with pytest.raises(LmlabError, match="--stateful reads the"):
        lmlab.train(
            data=str(p), out=str(tmp_path / "o"), steps=2, stateful=True, **{**SMALL, "batch_size": 64}
        )


# --------------------------------------------------------------------------- explicit cells, state
@pytest.mark.parametrize("cell", CELLS)
def test_explicit_cells_equal_the_fused_layer_with_the_state_carried(cell):
    """``explicit = True`` runs nn/cells.py's equations on the fused layer's weights: the
    logits and the state equal the fused path's (a window, then single tokens, then another
    window, each from the state the last call left), two layers, three rows."""
    m = tiny(cell, tie_embeddings=True)
    ids = torch.randint(13, (3, 12))
    s0 = random_state(cell, 2, 3, 10)
    runs = {}
    for explicit in (False, True):
        m.explicit = explicit
        with torch.no_grad():
            state, outs = s0, []
            for a, b in [(0, 5), (5, 6), (6, 7), (7, 12)]:
                logits, state = m(ids[:, a:b], state)
                outs.append(logits)
        runs[explicit] = torch.cat(outs, dim=1), state
    (fused, s_fused), (explicit, s_explicit) = runs[False], runs[True]
    torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=0)
    for a, b in zip(s_explicit.tensors, s_fused.tensors, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_explicit_path_runs_the_cells_of_nn_cells(monkeypatch):
    import lmlab.nn.cells as cells

    calls = []
    monkeypatch.setitem(cells.CELLS, "gru", lambda *a: calls.append(1) or cells.gru_cell(*a))
    m = tiny("gru")
    m.explicit = True
    with torch.no_grad():
        m(torch.randint(13, (2, 4)))
    assert len(calls) == 2 * 4  # two layers × four steps


@pytest.mark.parametrize("cell", CELLS)
def test_recurrent_state_select_and_cat_index_the_batch_dimension(cell):
    h = torch.randn(2, 4, 10)
    c = torch.randn(2, 4, 10) if cell == "lstm" else None
    state = RecurrentState(h, c)
    assert state.remaining is None
    index = torch.tensor([3, 3, 0])
    got = state.select(index)
    want = (h[:, [3, 3, 0]],) if c is None else (h[:, [3, 3, 0]], c[:, [3, 3, 0]])
    for a, b in zip(got.tensors, want, strict=True):
        assert torch.equal(a, b)
    both = RecurrentState.cat([state, got])
    assert torch.equal(both.h, torch.cat([h, h[:, [3, 3, 0]]], dim=1))
    assert isinstance(tiny(cell).init_state(4), State)


# --------------------------------------------------------------------------- bidirectional (a classifier body)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_bidirectional_features_are_both_one_way_passes_and_skip_padding(cell):
    """h_t = [h→_t; h←_t]: the forward layer over the row, and the reverse layer over the
    reversed row flipped back — each row at its own length, whatever the padding after it."""
    torch.manual_seed(0)
    cfg = RNNConfig(cell=cell, vocab_size=50, d_model=8, hidden_size=6, n_layer=1, bidirectional=True)
    model = RNNLanguageModel(cfg).eval()
    fused = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell]
    fwd, bwd = fused(8, 6, batch_first=True), fused(8, 6, batch_first=True)
    with torch.no_grad():
        for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
            getattr(fwd, name).copy_(getattr(model.rnn, name))
            getattr(bwd, name).copy_(getattr(model.rnn, name + "_reverse"))
    rows = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12]]
    ids = torch.zeros(3, 5, dtype=torch.long)
    mask = torch.zeros(3, 5, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    with torch.no_grad():
        h = model.features(ids, mask)
        assert h.shape == (3, 5, 12)
        for i, r in enumerate(rows):
            x = model.tok_emb(torch.tensor([r]))
            want = torch.cat([fwd(x)[0], bwd(x.flip(1))[0].flip(1)], dim=-1)[0]
            torch.testing.assert_close(h[i, : len(r)], want, atol=1e-6, rtol=0)
            assert not h[i, len(r) :].any()


def test_a_bidirectional_body_cannot_predict_the_next_token():
    model = RNNLanguageModel(RNNConfig(vocab_size=20, d_model=8, hidden_size=8, n_layer=1, bidirectional=True))
    assert model.lm_head is None
    with pytest.raises(LmlabError, match="bidirectional LSTM reads each text both ways.*cannot predict the next token"):
        model(torch.tensor([[1, 2, 3]]))


def test_a_bidirectional_body_starts_from_a_one_way_language_model():
    """ULMFiT's forward half: after load_forward_direction the forward half of every layer's
    output is what the language model computes (its upper layers read h← with zero weights)."""
    from lmlab.training.classify import load_forward_direction

    torch.manual_seed(0)
    lm = RNNLanguageModel(RNNConfig(vocab_size=30, d_model=8, hidden_size=6, n_layer=2, tie_embeddings=True)).eval()
    bi = RNNLanguageModel(RNNConfig(vocab_size=30, d_model=8, hidden_size=6, n_layer=2, bidirectional=True)).eval()
    load_forward_direction(bi, lm.state_dict())
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        torch.testing.assert_close(bi.features(ids)[..., :6], lm(ids, hidden=True)[0], atol=1e-6, rtol=0)
        assert bi.features(ids)[..., 6:].abs().sum() > 0  # the backward direction is fresh, not zero
