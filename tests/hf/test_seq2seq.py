"""Marian, BART/mBART and T5 (v1 and v1.1) on lmlab's one encoder-decoder, against
``transformers`` on tiny random models made with ``save_pretrained`` (no downloads):
logits with and without the cache, and greedy / beam-search outputs token for token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models

import lmlab
from lmlab.errors import LmlabError
from lmlab.generate.seq2seq import Seq2SeqRequest, seq2seq_generate
from lmlab.hf import load_hf
from lmlab.nn import fastpath

transformers = pytest.importorskip("transformers")

V = 99
COMMON = dict(
    vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
    decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=64,
    pad_token_id=1, eos_token_id=2, decoder_start_token_id=1, bos_token_id=0,
)  # fmt: skip
T5_COMMON = dict(
    vocab_size=V, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
    relative_attention_max_distance=20, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
)  # fmt: skip


def _models() -> dict:
    t = transformers
    return {
        "marian": lambda: t.MarianMTModel(t.MarianConfig(**COMMON, scale_embedding=True, activation_function="swish")),
        "marian-two-vocabs": lambda: t.MarianMTModel(
            t.MarianConfig(**COMMON, scale_embedding=True, share_encoder_decoder_embeddings=False, decoder_vocab_size=77)
        ),
        "bart": lambda: t.BartForConditionalGeneration(t.BartConfig(**COMMON)),
        "mbart": lambda: t.MBartForConditionalGeneration(t.MBartConfig(**COMMON)),
        "t5": lambda: t.T5ForConditionalGeneration(t.T5Config(**T5_COMMON)),
        "t5-deep-decoder": lambda: t.T5ForConditionalGeneration(t.T5Config(**{**T5_COMMON, "num_decoder_layers": 3})),
        "t5-v1.1": lambda: t.T5ForConditionalGeneration(
            t.T5Config(**T5_COMMON, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
        ),
    }


def _randomize(m: torch.nn.Module) -> None:
    """Weights far from their init (norm weights near 1, biases nonzero), so a mapping error
    anywhere shows in the logits. Marian's sinusoidal table stays as it is."""
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "embed_positions" in name and "marian" in type(m).__name__.lower():
                continue
            if p.dim() > 1:
                p.normal_(0, 0.3)
            elif "norm" in name:
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0, 0.1)
        if hasattr(m, "final_logits_bias"):
            m.final_logits_bias.normal_(0, 0.5)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("seq2seq")
    out = {}
    for name, make in _models().items():
        m = make().eval()
        _randomize(m)
        d = root / name
        m.save_pretrained(d)
        vocab = m.config.vocab_size
        Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t3")).save(str(d / "tokenizer.json"))
        if name == "t5-v1.1":  # an output layer of its own, as FLAN-T5 / T5 v1.1 checkpoints store it
            from safetensors.torch import load_file, save_file

            sd = load_file(d / "model.safetensors")
            sd["lm_head.weight"] = torch.randn_like(sd["shared.weight"]) * 0.3
            save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
            cfg = json.loads((d / "config.json").read_text())
            cfg["tie_word_embeddings"] = False
            (d / "config.json").write_text(json.dumps(cfg))
        if name == "marian":  # opus-mt forbids generating pad
            g = json.loads((d / "generation_config.json").read_text())
            g["bad_words_ids"] = [[COMMON["pad_token_id"]]]
            (d / "generation_config.json").write_text(json.dumps(g))
        out[name] = d
    return out


def _sources() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    src = torch.randint(3, V, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0  # the second source is shorter: padding must not matter
    return src, mask


@pytest.mark.parametrize("name", list(_models()))
def test_logits_match_transformers_with_and_without_cache(folders: dict[str, Path], name: str) -> None:
    d = folders[name]
    ref_model = transformers.AutoModelForSeq2SeqLM.from_pretrained(d).eval()
    ours = load_hf(str(d)).module.eval()
    src, mask = _sources()
    src[1, 6:] = ref_model.config.pad_token_id
    tgt = torch.randint(3, 77, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = ref_model(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
        whole, _ = ours(tgt, src=src, src_mask=mask)
        state = ours.init_state(2, 10, ours.encode(src, mask))
        steps = [ours(tgt[:, :3], state)[0]] + [ours(tgt[:, t : t + 1], state)[0] for t in range(3, 7)]
        state = ours.init_state(2, 10, ours.encode(src, mask))
        with fastpath.unrolling():  # the decoding loop's one-token steps without module calls
            unrolled = [ours(tgt[:, :3], state)[0]] + [ours(tgt[:, t : t + 1], state)[0] for t in range(3, 7)]
    assert ref.shape == whole.shape
    assert torch.allclose(whole, ref, atol=1e-4), (whole - ref).abs().max()
    assert torch.allclose(torch.cat(steps, 1), ref, atol=1e-4)
    assert torch.allclose(torch.cat(unrolled, 1), ref, atol=1e-4)
    torch.testing.assert_close(torch.cat(unrolled, 1), torch.cat(steps, 1), rtol=1e-6, atol=1e-6)


OPTIONS = [
    dict(max_new_tokens=12),
    dict(max_new_tokens=12, num_beams=4),
    dict(max_new_tokens=10, num_beams=3, no_repeat_ngram_size=2, length_penalty=0.5, num_return_sequences=2),
    dict(max_new_tokens=8, num_beams=2, early_stopping=True, forced_bos_token_id=5),
    dict(max_new_tokens=9, no_repeat_ngram_size=1, min_new_tokens=4),
]


def _both_sides(d: Path, seed: int) -> tuple:
    """transformers' model and lmlab's of folder ``d``, three sources of different lengths
    (random ids, then EOS), lmlab's request for the checkpoint's settings, and its pad id."""
    ref_model = transformers.AutoModelForSeq2SeqLM.from_pretrained(d).eval()
    m = lmlab.load(d)
    eos = ref_model.config.eos_token_id
    g = torch.Generator().manual_seed(seed)
    srcs = [torch.randint(3, V, (n,), generator=g).tolist() + [eos] for n in (5, 9, 3)]
    req = Seq2SeqRequest(m.module, m.tokenizer, m.target_tokenizer, m.generation_config)
    return ref_model, m, srcs, req, m.generation_config["pad_token_id"]


@pytest.mark.parametrize("name", ["marian", "bart", "t5-v1.1", "mbart"])
def test_generate_matches_transformers_token_for_token(folders: dict[str, Path], name: str) -> None:
    """Three sources of different lengths decoded as one batch equal transformers' runs of each
    alone (the checkpoint's own settings apply to both: forced EOS, Marian's forbidden pad)."""
    ref_model, m, srcs, req, pad = _both_sides(folders[name], seed=1)
    for opts in OPTIONS:
        ours = seq2seq_generate(m.module, m.target_tokenizer, srcs, req.config(**opts), pad)
        for i, s in enumerate(srcs):
            with torch.no_grad():
                ref = ref_model.generate(torch.tensor([s]), do_sample=False, **opts)
            for j, row in enumerate(ref.tolist()):
                got = ours[i][j].token_ids
                row = row[1 : 1 + len(got)] if len(row) > len(got) + 1 else row[1:]  # start token; beam padding
                assert row == got, (opts, i, j)


@pytest.mark.parametrize("name", ["marian", "bart", "t5-v1.1"])
def test_greedy_with_the_screened_output_layer_matches_transformers(folders: dict[str, Path], name: str, monkeypatch) -> None:
    """The bf16 screen + fp32 rescoring of the output layer (lmlab.nn.screen, on by default
    for large fp32 heads; forced on here for a tiny one) changes no greedy token: Marian's
    forbidden pad, BART's logits bias, EOS masked until min_new_tokens."""
    from lmlab.nn import fastpath, screen

    if not fastpath.works():
        pytest.skip("no oneDNN linear in this build")
    monkeypatch.setattr(screen, "MIN_WEIGHT", 0)
    monkeypatch.setattr(screen, "MAX_CANDIDATES", 1.0)
    calls = []
    real = screen.ScreenedLinear._screened
    monkeypatch.setattr(screen.ScreenedLinear, "_screened", lambda self, *a: calls.append(1) or real(self, *a))
    ref_model, m, srcs, req, pad = _both_sides(folders[name], seed=2)
    for opts in (dict(max_new_tokens=12), dict(max_new_tokens=9, min_new_tokens=6)):
        ours = seq2seq_generate(m.module, m.target_tokenizer, srcs, req.config(**opts), pad)
        for i, s in enumerate(srcs):
            with torch.no_grad():
                ref = ref_model.generate(torch.tensor([s]), do_sample=False, **opts)[0, 1:].tolist()
            assert ours[i][0].token_ids == ref, (opts, i)
    assert calls, "the screen never ran"


def test_reordering_beams_copies_nothing_of_the_sources_and_moving_rows_follows_them(
    folders: dict[str, Path],
) -> None:
    """A beam search reorders rows within a source at every step: the cross-attention keys and
    values (the same for every row of a source) stay as they are; rows that change source
    (finished rows dropped, sources reordered) take their own source's rows."""
    from lmlab.nn.attention import key_padding_mask

    ours = load_hf(str(folders["marian"])).module.eval()
    src, mask = _sources()
    with torch.no_grad():
        state = ours.init_state(4, 10, ours.encode(src, mask).select(torch.tensor([0, 0, 1, 1])))
    ref_k, ref_v, k = state.cross_k.clone(), state.cross_v.clone(), state.cross_k
    assert torch.equal(ref_k[:, 0], ref_k[:, 1]) and not torch.equal(ref_k[:, 1], ref_k[:, 2])
    state.select(torch.tensor([1, 0, 3, 3]))
    assert state.cross_k is k
    state.select(torch.tensor([2, 0]))  # a row of source 1, then one of source 0
    assert torch.equal(state.cross_k, ref_k[:, [2, 0]]) and torch.equal(state.cross_v, ref_v[:, [2, 0]])
    assert torch.equal(state.src_mask, key_padding_mask(mask)[[1, 0]])
    assert state.sources.tolist() == [1, 0]


def test_marian_never_generates_pad(folders: dict[str, Path]) -> None:
    m = lmlab.load(folders["marian"])
    assert m.generation_config["bad_words_ids"] == [[1]]
    out = m.translate(["t5 t6 t7", "t9"], return_details=True, max_new_tokens=20)
    assert all(1 not in r.token_ids for r in out)


def test_translate_decodes_deterministically_by_default(folders: dict[str, Path]) -> None:
    """No sampling unless asked (transformers' do_sample=False), whatever generate's default."""
    m = lmlab.load(folders["bart"])
    a = m.translate("t5 t6 t7 t8", max_new_tokens=10)
    assert a == m.translate("t5 t6 t7 t8", max_new_tokens=10)
    ref_model = transformers.AutoModelForSeq2SeqLM.from_pretrained(folders["bart"]).eval()
    ids = m.tokenizer.encode("t5 t6 t7 t8").ids
    ref = ref_model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False)[0, 1:].tolist()
    assert m.translate("t5 t6 t7 t8", max_new_tokens=10, return_details=True).token_ids == ref


def test_lmlab_generate_on_an_encoder_decoder_prints_its_translation(folders: dict[str, Path], capsys) -> None:
    """`lmlab generate` streams; for a seq2seq model the stream is the whole target text at once,
    the same as translate (which transformers' generate checks above)."""
    from lmlab.cli import main

    m = lmlab.load(folders["bart"])
    want = m.translate("t5 t6 t7 t8", max_new_tokens=10)
    assert "".join(m.stream("t5 t6 t7 t8", max_new_tokens=10)) == want
    assert main(["generate", str(folders["bart"]), "--prompt", "t5 t6 t7 t8", "--max-new-tokens", "10"]) == 0
    assert capsys.readouterr().out == want + "\n"
    for bad in (dict(num_return_sequences=2, num_beams=2), dict(return_details=True)):
        with pytest.raises(LmlabError, match="stream gives one text"):
            list(m.stream("t5 t6", **bad))


def test_max_length_in_the_settings_counts_the_start_token(folders: dict[str, Path]) -> None:
    m = lmlab.load(folders["t5"])
    m.generation_config.update(max_length=6, min_length=4)
    r = m.translate("t5 t6", return_details=True)
    ref_model = transformers.AutoModelForSeq2SeqLM.from_pretrained(folders["t5"]).eval()
    ids = m.tokenizer.encode("t5 t6").ids
    ref = ref_model.generate(torch.tensor([ids]), max_length=6, min_length=4, do_sample=False)[0, 1:].tolist()
    assert r.token_ids == ref and len(ref) <= 5


def test_unsupported_seq2seq_settings_are_refused_by_name(folders: dict[str, Path], tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    for f in folders["marian"].iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((d / "config.json").read_text())
    cfg["decoder_attention_heads"] = 2
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LmlabError, match="decoder_attention_heads"):
        load_hf(str(d))
    cfg["decoder_attention_heads"], cfg["model_type"] = 4, "pegasus"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LmlabError, match="pegasus.*marian"):
        load_hf(str(d))


def test_a_language_model_refuses_translate(tmp_path: Path) -> None:
    from helpers import char_tokenizer, tiny_model

    tok = char_tokenizer()
    m = lmlab.Model(tiny_model(tok.get_vocab_size()), tok)
    with pytest.raises(LmlabError, match="not an encoder-decoder"):
        m.translate("hello")


# --------------------------------------------------------------------------- end to end
EN_DE = (
    "The quick brown fox jumps over the lazy dog.\nA small house stands by the river.\n"
    "Der schnelle braune Fuchs springt über den faulen Hund.\nEin kleines Haus steht am Fluss.\n"
) * 20


@pytest.fixture(scope="module")
def marian_with_spm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny opus-mt-shaped folder: source.spm, target.spm, vocab.json and random weights."""
    import sentencepiece

    d = tmp_path_factory.mktemp("opus")
    for side in ("source", "target"):
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(EN_DE.splitlines()), model_prefix=str(d / side), vocab_size=50,
            character_coverage=1.0, minloglevel=2,
        )  # fmt: skip
    vocab = {"</s>": 0, "<unk>": 1}
    sp = sentencepiece.SentencePieceProcessor(model_file=str(d / "source.model"))
    for i in range(sp.get_piece_size()):
        if not (sp.is_control(i) or sp.is_unknown(i)):
            vocab.setdefault(sp.id_to_piece(i), len(vocab))
    vocab["<pad>"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = transformers.MarianTokenizer(str(d / "source.model"), str(d / "target.model"), str(d / "vocab.json"))
    folder = d / "opus-mt-tiny"
    tok.save_pretrained(folder)
    torch.manual_seed(5)
    cfg = transformers.MarianConfig(**{**COMMON, "vocab_size": len(vocab), "pad_token_id": vocab["<pad>"],
                                       "eos_token_id": 0, "decoder_start_token_id": vocab["<pad>"],
                                       "bos_token_id": None}, scale_embedding=True)  # fmt: skip
    m = transformers.MarianMTModel(cfg).eval()
    _randomize(m)
    m.save_pretrained(folder)
    g = json.loads((folder / "generation_config.json").read_text())
    g.update(bad_words_ids=[[vocab["<pad>"]]], num_beams=2, max_length=12)
    (folder / "generation_config.json").write_text(json.dumps(g))
    return folder


def test_lmlab_translate_equals_transformers_text(marian_with_spm: Path, tmp_path: Path) -> None:
    """The command line, through the folder's own SentencePiece models and its generation
    settings (2 beams, max_length 12), prints transformers' decoded outputs line for line."""
    from helpers import run_lmlab

    texts = ["The fox jumps.", "A small house by the river stands.", "Hund"]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    out = run_lmlab("translate", str(marian_with_spm), "--input", str(tmp_path / "in.txt"))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = transformers.AutoTokenizer.from_pretrained(marian_with_spm)
    ref_model = transformers.AutoModelForSeq2SeqLM.from_pretrained(marian_with_spm).eval()
    want = []
    for t in texts:
        ids = tok(t, return_tensors="pt").input_ids
        want.append(tok.decode(ref_model.generate(ids)[0], skip_special_tokens=True))
    assert out.stdout.splitlines() == want


def test_forced_token_ids_past_the_vocabulary_are_refused() -> None:
    from lmlab.generate.config import GenerationConfig

    for key in ("forced_eos_token_id", "forced_bos_token_id", "decoder_start_token_id"):
        with pytest.raises(LmlabError, match=key.split("_token")[0] if key != "forced_eos_token_id" else "eos_token_id"):
            GenerationConfig(**{key: 500}).check_token_ids(50)
