"""``lmlab train --task translate``: an encoder-decoder learns a toy translation, resumes
exactly, keeps its best-BLEU checkpoint, and refuses what cannot work in one line."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from helpers import assert_resume_is_exact

import lmlab
from lmlab.errors import LmlabError

WORDS = "the a cat dog sees likes big small red house tree".split()
DE = {"the": "der", "a": "ein", "cat": "katze", "dog": "hund", "sees": "sieht", "likes": "mag", "big": "grosse",
      "small": "kleine", "red": "rote", "house": "haus", "tree": "baum"}  # fmt: skip


def toy_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Word-for-word English -> German: learnable in a few hundred steps on a CPU."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = [rng.choice(WORDS) for _ in range(rng.randint(2, 6))]
        out.append((" ".join(s), " ".join(DE[w] for w in s)))
    return out


@pytest.fixture(scope="module")
def pairs_tsv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("pairs") / "train.tsv"
    p.write_text("source\ttarget\n" + "".join(f"{s}\t{t}\n" for s, t in toy_pairs(600)), encoding="utf-8")
    return p


SMALL = dict(task="translate", d_model=64, n_layer=2, n_head=4, batch_size=32, tokenizer="bpe", vocab_size=300,
             lr=1e-3, progress=False)  # fmt: skip


def test_a_transformer_learns_to_translate(pairs_tsv: Path, tmp_path: Path) -> None:
    res = lmlab.train(data=str(pairs_tsv), out=str(tmp_path / "run"), steps=600, eval_every=300, **SMALL)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "bleu" in r]
    assert [r["step"] for r in evals] == [300, 600]
    assert evals[-1]["bleu"] > 40 and evals[-1]["val_loss"] < evals[0]["val_loss"]
    m = lmlab.load(res.out / "best")
    out = m.translate(["the cat sees a dog", "a small red tree"])
    assert out == ["der katze sieht ein hund", "ein kleine rote baum"]
    # the batch gives what each source gives alone, and beam search runs
    assert [m.translate(s) for s in ["the cat sees a dog", "a small red tree"]] == out
    assert isinstance(m.translate("the dog", num_beams=3), str)


def test_resume_continues_exactly(pairs_tsv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run A trains 20 steps; run B, the same command, crashes after step 15 (its checkpoint
    is step 10's) and is resumed: the final weights are A's, bit for bit (dropout on)."""
    from lmlab.training.seq2seq import Seq2SeqTrainer

    opts = dict(SMALL, tokenizer="char", eval_every=10, save_every=10, bleu_samples=4, dropout=0.1, steps=20)
    assert_resume_is_exact(Seq2SeqTrainer, monkeypatch, tmp_path / "a", tmp_path / "b", data=str(pairs_tsv), **opts)


def test_two_line_aligned_files_and_batch_tokens(tmp_path: Path) -> None:
    src, tgt = tmp_path / "train.en", tmp_path / "train.de"
    pairs = toy_pairs(100)
    src.write_text("".join(s + "\n" for s, _ in pairs))
    tgt.write_text("".join(t + "\n" for _, t in pairs))
    res = lmlab.train(data=str(src), target_data=str(tgt), out=str(tmp_path / "r"), steps=4, batch_tokens=200,
                      **{k: v for k, v in SMALL.items() if k != "batch_size"})  # fmt: skip
    assert res.step == 4


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(model="rnn-attention"), "rnn-attention and transformer are for --task translate"),
        (dict(task="translate", pos="rope"), "sinusoidal or learned, not rope"),
        (dict(task="translate", data="builtin"), "needs parallel text"),
        (dict(target_data="x.de"), "--target-data, --valid and --separate-vocab are for --task translate"),
        (dict(task="translate", label_smoothing=1.5), "--label-smoothing must be in"),
        (dict(task="translate", cell="lstm"), "--cell: for --model rnn-attention, not transformer; drop it"),
        (dict(task="translate", model="rnn-attention", n_head=8), "--n-head: for --model transformer"),
        (dict(bleu_samples=5, batch_tokens=100), "--batch-tokens, --bleu-samples: for --task translate or summarize only"),
        (dict(task="translate", init="gpt2"), "--init with --task translate is not supported yet"),
        (dict(task="translate", val_fraction=0.0), "--val-fraction 0 leaves no dev pairs"),
        (dict(task="translate", n_kv_head=2), "--n-kv-head: not used by an encoder-decoder"),
    ],
)
def test_bad_options_are_one_line(options: dict, message: str, tmp_path: Path, pairs_tsv: Path) -> None:
    opts = {"data": str(pairs_tsv), "out": str(tmp_path / "o"), "steps": 1, **options}
    with pytest.raises(LmlabError, match=message) as e:
        lmlab.train(**opts)
    assert "\n" not in str(e.value)


def test_the_rnn_with_attention_trains_and_translates(pairs_tsv: Path, tmp_path: Path) -> None:
    res = lmlab.train(data=str(pairs_tsv), out=str(tmp_path / "rnn"), steps=6, eval_every=3, bleu_samples=4,
                      model="rnn-attention", hidden_size=48, attention="general", cell="lstm",
                      **{k: v for k, v in SMALL.items() if k not in ("n_head",)})  # fmt: skip
    m = lmlab.load(res.out)
    assert type(m.module).__name__ == "RNNSeq2Seq" and m.config.cell == "lstm" and m.config.attention == "general"
    assert isinstance(m.translate("the cat", num_beams=2), str)


def test_long_sources_are_cut_with_one_warning_at_training_and_at_inference(pairs_tsv: Path, tmp_path: Path) -> None:
    from helpers import lmlab_warnings, recorded_warnings

    long = tmp_path / "long.tsv"
    long.write_text("".join(f"{'the cat ' * 40}\tder katze\n" for _ in range(3)) + pairs_tsv.read_text(), encoding="utf-8")
    with recorded_warnings() as caught:
        res = lmlab.train(data=str(long), out=str(tmp_path / "r"), steps=2, max_seq_len=24, bleu_samples=0,
                          **{k: v for k, v in SMALL.items()})  # fmt: skip
    cut = [w for w in lmlab_warnings(caught) if "longer than the model's 24" in w]
    assert len(cut) == 1 and "3 sources" in cut[0]
    m = lmlab.load(res.out)
    with recorded_warnings() as caught:
        out = m.translate(["the cat " * 40, "the dog", "a cat " * 30], max_new_tokens=3)
    said = [w for w in lmlab_warnings(caught) if "source tokens" in w]
    assert len(out) == 3 and len(said) == 1 and said[0].startswith("2 of 3 inputs were longer than the model's 24")


def test_a_sentencepiece_folder_is_a_tokenizer_for_translation(pairs_tsv: Path, tmp_path: Path) -> None:
    """--tokenizer FOLDER with a T5-style spiece.model (no tokenizer.json): its </s> ends sources."""
    import sentencepiece

    lines = [line for line in pairs_tsv.read_text().splitlines()[1:] for line in line.split("\t")]
    folder = tmp_path / "spm"
    folder.mkdir()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(folder / "spiece"), vocab_size=40, pad_id=0, eos_id=1,
        unk_id=2, bos_id=-1, minloglevel=2,
    )  # fmt: skip
    res = lmlab.train(data=str(pairs_tsv), out=str(tmp_path / "r"), steps=2, bleu_samples=2,
                      **{**SMALL, "tokenizer": str(folder)})  # fmt: skip
    m = lmlab.load(res.out)
    assert m.generation_config["eos_token_id"] == m.tokenizer.token_to_id("</s>") == 1
    assert m.tokenizer.encode("the cat").ids[-1] == 1
    assert isinstance(m.translate("the cat"), str)


def test_separate_vocabularies_train_save_resume_and_translate(pairs_tsv: Path, tmp_path: Path) -> None:
    out = tmp_path / "sep"
    opts = dict(SMALL, tokenizer="char", separate_vocab=True, bleu_samples=4, eval_every=2, save_every=2)
    lmlab.train(data=str(pairs_tsv), out=str(out), steps=2, **opts)
    assert (out / "target_tokenizer.json").is_file() and (out / "best" / "target_tokenizer.json").is_file()
    m = lmlab.load(out)
    src_chars = set("".join(m.tokenizer.get_vocab()))
    assert m.target_tokenizer is not m.tokenizer and "z" in m.target_tokenizer.get_vocab()  # katze: German only
    assert "z" not in src_chars  # the English side has no z
    assert m.config.target_vocab_size == m.target_tokenizer.get_vocab_size() and not m.config.share_embeddings
    assert isinstance(m.translate("the cat"), str)
    lmlab.train(resume=str(out), steps=4)
    assert json.loads((out / "trainer_state.json").read_text())["step"] == 4
    m.save(tmp_path / "saved")  # Model.save keeps the target side too
    again = lmlab.load(tmp_path / "saved")
    assert again.target_tokenizer.get_vocab() == m.target_tokenizer.get_vocab()
    (tmp_path / "saved" / "target_tokenizer.json").unlink()
    with pytest.raises(LmlabError, match="has no target_tokenizer.json"):
        lmlab.load(tmp_path / "saved")
    with pytest.raises(LmlabError, match="one vocabulary for both sides"):
        from lmlab.hf import export_hf

        export_hf(str(out), tmp_path / "hf")
