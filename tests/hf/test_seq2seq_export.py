"""``lmlab export`` of encoder-decoders: a model trained here whose config is Marian's, BART's
or mBART's loads in ``transformers`` (AutoModelForSeq2SeqLM + AutoTokenizer) and translates
identically; an imported one goes back to its own family; anything else is refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import processors

import lmlab
from lmlab.errors import LmlabError
from lmlab.hf import export_hf
from lmlab.models.config import Seq2SeqConfig
from lmlab.models.loading import write_checkpoint
from lmlab.models.seq2seq import Seq2SeqTransformer
from lmlab.tokenizer import EOT

transformers = pytest.importorskip("transformers")

SHAPES = {
    "marian": dict(prenorm=False, pos="sinusoidal", sinusoidal_layout="halves"),
    "bart": dict(prenorm=False, pos="learned", pos_offset=2, embed_norm=True),
    "mbart": dict(prenorm=True, pos="learned", pos_offset=2, embed_norm=True),
}


def _checkpoint(folder: Path, **shape) -> Path:
    from helpers import bpe_tokenizer

    tok = bpe_tokenizer()
    tok.add_special_tokens(["<pad>"])
    eos = tok.token_to_id(EOT)
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOT}", special_tokens=[(EOT, eos)])
    torch.manual_seed(0)
    cfg = Seq2SeqConfig(vocab_size=tok.get_vocab_size(), n_layer=2, n_head=2, d_model=32, max_source_len=48,
                        max_target_len=48, norm="layernorm", norm_bias=True, attn_bias=True, mlp_bias=True,
                        activation="gelu", gated_mlp=False, dropout=0.0, init_std=0.3, **shape)  # fmt: skip
    model = Seq2SeqTransformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1) if name.endswith("weight") else p.normal_(0, 0.1)
    gen = {"eos_token_id": eos, "bos_token_id": eos, "decoder_start_token_id": eos,
           "pad_token_id": tok.token_to_id("<pad>"), "max_new_tokens": 12}  # fmt: skip
    return write_checkpoint(folder, model, tok, gen)


@pytest.mark.parametrize("family", list(SHAPES))
def test_a_trained_model_exports_and_translates_identically(family: str, tmp_path: Path) -> None:
    run = _checkpoint(tmp_path / "run", **SHAPES[family])
    out = export_hf(str(run), tmp_path / "hf")
    import json

    assert json.loads((out / "config.json").read_text())["model_type"] == family
    ref = transformers.AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = lmlab.load(run)
    texts = ["To be, or not to be", "学而时习之", "The slings and arrows"]
    for text in texts:
        ids = tok(text, return_tensors="pt").input_ids
        assert ids[0].tolist() == ours.tokenizer.encode(text).ids
        dec = torch.tensor([[ours.generation_config["decoder_start_token_id"], 5, 9, 11]])
        with torch.no_grad():
            want = ref(input_ids=ids, decoder_input_ids=dec).logits
            got, _ = ours.module(dec, src=ids)
        assert torch.allclose(got, want, atol=1e-4)
        gen = ref.generate(ids, do_sample=False)[0]
        assert ours.translate(text) == tok.decode(gen, skip_special_tokens=True)


def test_a_model_no_family_computes_is_refused_by_name(tmp_path: Path) -> None:
    run = _checkpoint(tmp_path / "run", prenorm=True, pos="sinusoidal")
    with pytest.raises(LmlabError, match=r"Marian needs --post-norm.*BART needs --post-norm, --pos learned.*mBART needs --pos learned"):
        export_hf(str(run), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_the_rnn_with_attention_is_refused(tmp_path: Path) -> None:
    from helpers import char_tokenizer

    from lmlab.models.config import RNNSeq2SeqConfig
    from lmlab.models.rnn_seq2seq import RNNSeq2Seq

    tok = char_tokenizer()
    run = write_checkpoint(tmp_path / "rnn", RNNSeq2Seq(RNNSeq2SeqConfig(vocab_size=tok.get_vocab_size(), d_model=16,
                                                                          hidden_size=16, n_layer=1)), tok, {})  # fmt: skip
    with pytest.raises(LmlabError, match="only Transformers export"):
        export_hf(str(run), tmp_path / "hf")


def test_an_imported_marian_round_trips(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models

    torch.manual_seed(0)
    cfg = transformers.MarianConfig(vocab_size=60, d_model=32, encoder_layers=2, decoder_layers=2,
                                    encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=40,
                                    decoder_ffn_dim=40, max_position_embeddings=64, pad_token_id=59, eos_token_id=0,
                                    decoder_start_token_id=59, scale_embedding=True)  # fmt: skip
    src_model = transformers.MarianMTModel(cfg).eval()
    src_model.final_logits_bias.normal_(0, 0.5)
    src_model.save_pretrained(tmp_path / "orig")
    Tokenizer(models.WordLevel({f"t{i}": i for i in range(60)}, unk_token="t1")).save(str(tmp_path / "orig" / "tokenizer.json"))
    out = export_hf(str(tmp_path / "orig"), tmp_path / "again")
    back = transformers.AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    ids, dec = torch.tensor([[5, 6, 7, 0]]), torch.tensor([[59, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(back(input_ids=ids, decoder_input_ids=dec).logits,
                              src_model(input_ids=ids, decoder_input_ids=dec).logits, atol=1e-5)  # fmt: skip
