"""``lmlab compare --task translate``: the RNN with attention and the Transformer trained on
the same pairs, tokenizer and budget, sized alike, with a BLEU report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmlab.compare import compare
from lmlab.compare.sizing import TOLERANCE
from lmlab.errors import LmlabError


def _pairs(path: Path) -> Path:
    import random

    rng = random.Random(0)
    words = {"the": "der", "cat": "katze", "dog": "hund", "sees": "sieht", "a": "ein", "house": "haus"}
    rows = []
    for _ in range(200):
        s = [rng.choice(list(words)) for _ in range(rng.randint(2, 5))]
        rows.append(" ".join(s) + "\t" + " ".join(words[w] for w in s))
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_compare_translate_writes_a_bleu_report(tmp_path: Path) -> None:
    res = compare(task="translate", data=str(_pairs(tmp_path / "p.tsv")), out=tmp_path / "cmp", time="4s",
                  tokenizer="bpe", vocab_size=300, bleu_samples=8, eval_every=5, batch_size=16, progress=False,
                  params=60_000)  # fmt: skip
    assert [r.name for r in res.runs] == ["rnn-attention", "transformer"]
    for r in res.runs:
        assert abs(r.n_params / res.target_params - 1) <= TOLERANCE
        assert r.steps > 0 and r.curve and r.best_bleu is not None and len(r.samples) == 3
        assert (Path(r.folder) / "best" / "config.json").is_file()
    text = res.report.read_text()
    assert "best dev BLEU" in text and "bleu_time.png" in text and "lmlab train --task translate" in text
    assert json.loads((tmp_path / "cmp" / "results.json").read_text())["runs"][0]["name"] == "rnn-attention"
    assert (tmp_path / "cmp" / "tokenizer.json").is_file()


def test_compare_translate_refuses_a_token_budget_and_lm_models(tmp_path: Path) -> None:
    data = str(_pairs(tmp_path / "p.tsv"))
    with pytest.raises(LmlabError, match="give --time, not --tokens"):
        compare(task="translate", data=data, out=tmp_path / "a", tokens=1000)
    with pytest.raises(LmlabError, match="unknown model 'lstm'; choose from rnn-attention, transformer"):
        compare(task="translate", data=data, out=tmp_path / "b", models="lstm,transformer")
    with pytest.raises(LmlabError, match="--target-data: for --task translate only"):
        compare(data=data, out=tmp_path / "c", target_data="x.de")
