"""``lmlab translate`` and ``lmlab evaluate`` as a user runs them (subprocesses, real files)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sacrebleu
from helpers import run_lmlab, tiny_seq2seq_checkpoint


@pytest.fixture(scope="module")
def translator(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_seq2seq_checkpoint(tmp_path_factory.mktemp("mt") / "translator")


def test_one_line_out_per_line_in(translator: Path, tmp_path: Path) -> None:
    src = tmp_path / "in.txt"
    src.write_text("To be, or not\n\n学而时习之\n", encoding="utf-8")
    out = run_lmlab("translate", str(translator), "--input", str(src), "--max-new-tokens", "6")
    lines = out.stdout.split("\n")
    assert len(lines) == 4 and lines[1] == "" and lines[3] == ""  # 3 inputs, the empty one stays empty
    run_lmlab("translate", str(translator), "--input", str(src), "--output", str(tmp_path / "out.txt"),
              "--max-new-tokens", "6")  # fmt: skip
    assert (tmp_path / "out.txt").read_text(encoding="utf-8").split("\n") == lines
    js = run_lmlab("translate", str(translator), "--text", "To be", "--json", "--max-new-tokens", "4")
    assert list(json.loads(js.stdout)) == ["translation_text"]


def test_evaluate_prints_sacrebleu_scores_and_one_json_object(translator: Path, tmp_path: Path) -> None:
    data = tmp_path / "test.tsv"
    data.write_text("To be, or not\tthe question\nThe slings\tand arrows\n", encoding="utf-8")
    r = run_lmlab("evaluate", str(translator), "--data", str(data), "--json", "--output", str(tmp_path / "hyp.txt"),
                  "--max-new-tokens", "6")  # fmt: skip
    got = json.loads(r.stdout)
    assert set(got) == {"bleu", "chrf", "signature", "n"} and got["n"] == 2
    hyps = (tmp_path / "hyp.txt").read_text(encoding="utf-8").splitlines()
    refs = ["the question", "and arrows"]
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)


def test_task_mismatches_are_one_line(translator: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("some text\n" * 20)
    r = run_lmlab("evaluate", str(translator), "--task", "lm", "--data", str(corpus), check_rc=2)
    assert "is an encoder-decoder" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_lmlab("translate", str(translator), "--input", str(tmp_path / "missing.txt"), check_rc=2)
    assert r.stderr.strip() == f"lmlab: error: --input {tmp_path / 'missing.txt'}: no such file"
