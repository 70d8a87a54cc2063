"""What lmlab.inspection reads out of a model, against references outside lmlab: transformers'
``output_attentions`` / ``cross_attentions`` on the same weights (GPT-2, BART, BERT), PyTorch's
own LSTM, GRU and tanh RNN for hidden states, log_softmax of the logits and ``lmlab eval``'s total for the
log-probabilities, and the laws of a causal softmax for a model trained here."""

from __future__ import annotations

import pytest
import torch
from helpers import bpe_tokenizer, tiny_checkpoint, tiny_hf_encoder, write_checkpoint
from tokenizers import Tokenizer, models, pre_tokenizers, processors

import lmlab
from lmlab.errors import LmlabError

transformers = pytest.importorskip("transformers")


def _randomize(m: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.normal_(1.0 if "norm" in name.lower() or "ln" in name.split(".")[-2:-1][0:1] and p.dim() == 1 else 0.0,
                      0.3 if p.dim() > 1 else 0.1)  # fmt: skip


def _word_tokenizer(vocab: int, eos: int | None = None) -> Tokenizer:
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if eos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"$A t{eos}", special_tokens=[(f"t{eos}", eos)])
    return tok


def test_gpt2_attention_equals_transformers(tmp_path):
    cfg = transformers.GPT2Config(vocab_size=60, n_embd=32, n_layer=3, n_head=4, n_positions=64, bos_token_id=None,
                                  eos_token_id=None)  # fmt: skip
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(cfg).eval()
    _randomize(ref)
    ref.save_pretrained(tmp_path / "gpt2")
    ref = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2", attn_implementation="eager").eval()
    _word_tokenizer(60).save(str(tmp_path / "gpt2" / "tokenizer.json"))
    model = lmlab.load(tmp_path / "gpt2")
    text = "t5 t9 t12 t40 t7 t7 t33"
    ids = torch.tensor([[5, 9, 12, 40, 7, 7, 33]])
    want = torch.stack(ref(ids, output_attentions=True).attentions)[:, 0]  # (layers, heads, T, T)
    got = model.attention(text)
    assert got.shape == (3, 4, 7, 7)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert model.tokens(text) == ["t5", "t9", "t12", "t40", "t7", "t7", "t33"]


def test_bart_encoder_and_cross_attention_equal_transformers(tmp_path):
    cfg = transformers.BartConfig(vocab_size=50, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                  decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37,
                                  max_position_embeddings=64, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2,
                                  bos_token_id=0, forced_eos_token_id=None)  # fmt: skip
    torch.manual_seed(0)
    ref = transformers.BartForConditionalGeneration(cfg).eval()
    _randomize(ref)
    folder = tmp_path / "bart"
    ref.save_pretrained(folder)
    _word_tokenizer(50, eos=2).save(str(folder / "tokenizer.json"))
    ref = transformers.BartForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
    model = lmlab.load(folder)
    src = torch.tensor([[8, 13, 21, 5, 2]])
    tgt = [17, 4, 30, 9]
    # the target text ends with EOS (its tokenizer's post-processor): 5 steps, from [start, 17, 4, 30, 9]
    out = ref(input_ids=src, decoder_input_ids=torch.tensor([[2, *tgt]]), output_attentions=True)
    enc = model.attention("t8 t13 t21 t5")
    torch.testing.assert_close(enc, torch.stack(out.encoder_attentions)[:, 0], atol=1e-5, rtol=0)
    cross = model.cross_attention("t8 t13 t21 t5", target="t17 t4 t30 t9")
    want = torch.stack(out.cross_attentions)[:, 0]  # (layers, heads, T_tgt, S)
    torch.testing.assert_close(cross, want, atol=1e-5, rtol=0)
    assert cross.shape == (2, 4, 5, 5)


def test_bert_attention_equals_transformers(tmp_path):
    folder = tiny_hf_encoder(tmp_path / "bert")
    ref = transformers.AutoModelForSequenceClassification.from_pretrained(folder, attn_implementation="eager").eval()
    fast = transformers.AutoTokenizer.from_pretrained(folder)
    text = "the movie was good"
    enc = fast(text, return_tensors="pt")
    want = torch.stack(ref(**enc, output_attentions=True).attentions)[:, 0]
    got = lmlab.load(folder).attention(text)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_a_model_trained_here_has_causal_rows_that_sum_to_one(tmp_path):
    model = lmlab.load(tiny_checkpoint(tmp_path / "m", pos="rope"))
    a = model.attention("the sea and the sky")
    L, H, T, _ = a.shape
    torch.testing.assert_close(a.sum(-1), torch.ones(L, H, T), atol=1e-6, rtol=0)
    assert bool((a.triu(diagonal=1) == 0).all())  # exactly 0 above the diagonal: no peeking ahead


def test_token_logprobs_are_log_softmax_and_sum_to_eval(tmp_path):
    folder = tiny_checkpoint(tmp_path / "m", pos="rope", max_seq_len=64)
    model = lmlab.load(folder)
    text = "the sea and the sea, what is it"
    ids = model.encode(text)
    lp = model.token_logprobs(text)
    logits, _ = model.module(torch.tensor([ids]))
    want = torch.log_softmax(logits[0].float(), -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    torch.testing.assert_close(lp, want, atol=1e-6, rtol=0)
    corpus = tmp_path / "t.txt"
    corpus.write_text(text, encoding="utf-8")
    assert -float(lp.sum()) == pytest.approx(_eval_total(folder, corpus), rel=1e-5)


def _eval_total(folder, corpus) -> float:
    """``lmlab eval``'s total negative log-likelihood of the file (its mean loss × tokens scored)."""
    from lmlab.eval.perplexity import evaluate_corpus

    r = evaluate_corpus(lmlab.load(folder), corpus)
    return r["loss"] * r["tokens"]


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_rnn_hidden_states_equal_pytorch_layer_by_layer(cell, tmp_path):
    """Each layer's h_t (and an LSTM's c_t) against a one-layer torch.nn.LSTM / GRU / RNN (tanh)
    run on that layer's weights, fed the layer below's outputs; the weights are randomized
    past their small initial scale so the gates and tanh are far from linear."""
    from lmlab.inspection import hidden_states
    from lmlab.models.config import RNNConfig
    from lmlab.models.rnn import RNNLanguageModel

    torch.manual_seed(0)
    tok = bpe_tokenizer()
    cfg = RNNConfig(cell=cell, vocab_size=tok.get_vocab_size(), d_model=8, hidden_size=12, n_layer=2)
    module = RNNLanguageModel(cfg).eval()
    with torch.no_grad():
        for p in module.rnn.parameters():
            p.normal_(0.0, 0.5)
    model = lmlab.load(write_checkpoint(tmp_path / cell, module, tok, {}))
    text = "the sea and the sky"
    h = model.hidden_states(text)  # (layers, T, H)
    assert h.shape == (2, len(model.encode(text)), 12)
    states = hidden_states(model, text)
    assert ("cell" in states) == (cell == "lstm")
    ids = torch.tensor([model.encode(text)])
    x = model.module.tok_emb(ids)
    reference = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU,
                 "rnn": lambda *a, **k: torch.nn.RNN(*a, nonlinearity="tanh", **k)}  # fmt: skip
    with torch.no_grad():
        for k in range(2):
            one = reference[cell](8 if k == 0 else 12, 12, batch_first=True)
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(one, f"{name}_l0").copy_(getattr(model.module.rnn, f"{name}_l{k}"))
            if cell == "lstm":  # the cell state: run step by step to read c_t at every t
                hc = None
                cs = []
                for t in range(x.shape[1]):
                    _, hc = one(x[:, t : t + 1], hc)
                    cs.append(hc[1][0, 0])
                torch.testing.assert_close(states["cell"][k], torch.stack(cs), atol=1e-5, rtol=0)
            x, _ = one(x)
            torch.testing.assert_close(h[k], x[0], atol=1e-5, rtol=0)
    assert float(h.abs().max()) > 0.5  # far from the linear range: a wrong gate order would show
    with pytest.raises(LmlabError, match="a recurrent model has no attention"):
        model.attention(text)


def test_a_classifier_over_a_recurrent_body_has_no_attention_to_show(tmp_path):
    from lmlab.models import build_model
    from lmlab.models.config import RNNConfig
    from lmlab.models.task_config import TaskConfig

    tok = bpe_tokenizer()
    body = RNNConfig(vocab_size=tok.get_vocab_size(), d_model=8, hidden_size=8, n_layer=1, bidirectional=True)
    module = build_model(TaskConfig(body=body, head="classify", num_labels=2, pooling="max")).eval()
    model = lmlab.load(write_checkpoint(tmp_path / "clf", module, tok, {}))
    with pytest.raises(LmlabError, match="no self-attention"):
        model.attention("the sea")


def test_the_rnn_with_attention_gives_its_alignment_per_step(tmp_path):
    """Bahdanau's picture: one α_i over the source per target token, each a distribution."""
    from tokenizers import processors as P

    from lmlab.models.config import RNNSeq2SeqConfig
    from lmlab.models.rnn_seq2seq import RNNSeq2Seq

    tok = bpe_tokenizer()
    tok.add_special_tokens(["<pad>"])
    eos = tok.token_to_id("<|endoftext|>")
    tok.post_processor = P.TemplateProcessing(single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", eos)])
    torch.manual_seed(0)
    cfg = RNNSeq2SeqConfig(vocab_size=tok.get_vocab_size(), d_model=16, hidden_size=16, n_layer=1, max_source_len=64,
                           max_target_len=32)  # fmt: skip
    gen = {"eos_token_id": eos, "decoder_start_token_id": eos, "pad_token_id": tok.token_to_id("<pad>"),
           "max_new_tokens": 8}  # fmt: skip
    model = lmlab.load(write_checkpoint(tmp_path / "rnn-mt", RNNSeq2Seq(cfg).eval(), tok, gen))
    a = model.cross_attention("the sea and the sky", target="what is it")
    S, T = len(model.encode("the sea and the sky")), len(model.target_tokenizer.encode("what is it").ids)
    assert a.shape == (1, 1, T, S)
    torch.testing.assert_close(a.sum(-1), torch.ones(1, 1, T), atol=1e-6, rtol=0)
    assert model.cross_attention("the sea").shape[:2] == (1, 1)  # the model's own greedy output
