"""Masked-LM pretraining of the encoder (``--task mlm``) and fine-tuning from it (``--init``).

References: the head's formula written out with PyTorch ops on the model's own weights;
the loss as the mean cross-entropy over the chosen positions only, computed by hand; the
masking's shares counted on a large batch; the fine-tuned models' bodies equal to the
pretrained encoder's weights (lr ≈ 0)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import lmlab
from lmlab.errors import LmlabError
from lmlab.training.mlm import IGNORE, mask_tokens

CYCLE = "abcdefghijklmnopqrst小猫坐在垫子上"
TEXT = CYCLE * 400  # each symbol as frequent as any other: only context tells them apart
TINY = dict(task="mlm", d_model=32, n_layer=1, n_head=2, max_seq_len=32, batch_size=16, progress=False, overwrite=True)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("mlm")
    (d / "text.txt").write_text(TEXT, encoding="utf-8")
    lmlab.train(data=str(d / "text.txt"), out=str(d / "enc"), tokenizer="char", steps=500, eval_every=250, lr=3e-3,
                warmup=10, **TINY)  # fmt: skip
    return d


def test_masking_shares_specials_and_determinism():
    V, specials = 1000, torch.tensor([0, 1, 2, 3])
    x = torch.randint(4, V, (64, 256))
    x[:, 0] = 1  # a [CLS] at the start of each row: never chosen
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    inputs, labels = mask_tokens(x, 3, V, specials, gen())
    chosen = labels != IGNORE
    assert abs(chosen.float().mean().item() - 0.15) < 0.01
    assert not chosen[:, 0].any() and torch.equal(labels[chosen], x[chosen]) and torch.equal(inputs[~chosen], x[~chosen])
    masked = (inputs == 3) & chosen
    kept = (inputs == x) & chosen
    n = chosen.sum().item()
    assert abs(masked.sum().item() / n - 0.8) < 0.02
    assert abs(kept.sum().item() / n - 0.1 - 0.1 / V) < 0.02  # "unchanged" and random draws of the same token
    again, again_labels = mask_tokens(x, 3, V, specials, gen())
    assert torch.equal(again, inputs) and torch.equal(again_labels, labels)
    one, one_labels = mask_tokens(torch.tensor([[7, 8]]), 3, V, specials, torch.Generator().manual_seed(0))
    assert (one_labels != IGNORE).sum() >= 1  # a tiny batch still asks about a token


def test_the_head_is_berts_formula_and_the_loss_counts_chosen_positions_only(pretrained):
    m = lmlab.load(pretrained / "enc").module.eval()
    ids = torch.randint(4, m.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, _ = m(ids)
        h = m.body.features(ids)
        z = F.gelu(h @ m.dense.weight.T + m.dense.bias)
        z = F.layer_norm(z, (z.shape[-1],), m.mlm_norm.weight, m.mlm_norm.bias, m.mlm_norm.eps) if isinstance(
            m.mlm_norm, torch.nn.LayerNorm) else z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + m.mlm_norm.eps) * m.mlm_norm.weight
        ref = z @ m.body.tok_emb.weight.T + m.mlm_bias
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    labels = torch.full_like(ids, IGNORE)
    labels[0, 3], labels[1, 7] = int(ids[0, 3]), int(ids[1, 7])
    by_hand = -(torch.log_softmax(logits[0, 3], -1)[ids[0, 3]] + torch.log_softmax(logits[1, 7], -1)[ids[1, 7]]) / 2
    got = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=IGNORE)
    torch.testing.assert_close(got, by_hand)


def test_pretraining_learns_from_context_and_stores_an_encoder(pretrained):
    """Every symbol of the text is equally frequent, so a model blind to context loses log(27)
    per masked token (the unigram entropy, by hand); the encoder must do clearly better."""
    rows = [json.loads(line) for line in (pretrained / "enc" / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in rows if r.get("val_loss") is not None]
    assert vals and vals[-1] < 0.85 * math.log(len(set(CYCLE))), vals
    cfg = json.loads((pretrained / "enc" / "config.json").read_text())
    assert cfg["head"] == "mlm" and cfg["body"]["model_type"] == "encoder" and cfg["body"]["type_vocab_size"] == 2
    m = lmlab.load(pretrained / "enc")
    tok = m.tokenizer
    assert all(tok.token_to_id(t) is not None for t in ("[PAD]", "[CLS]", "[SEP]", "[MASK]"))
    assert tok.encode("ab", "cd").ids[0] == tok.token_to_id("[CLS]")  # BERT's pair template, for QA
    ids = tok.encode(CYCLE * 2, add_special_tokens=False).ids[:30]  # mask 坐 (from both sides: 小猫[MASK]在垫)
    i = ids.index(tok.token_to_id("坐"))
    ids[i] = tok.token_to_id("[MASK]")
    with torch.no_grad():
        logits, _ = m.module.eval()(torch.tensor([ids]))
    p = torch.softmax(logits[0, i], -1)[tok.token_to_id("坐")]
    assert p > 3 / len(set(CYCLE)), float(p)  # well above a blind guess


@pytest.mark.parametrize("task", ["classify", "qa"])
def test_fine_tuning_starts_from_the_pretrained_encoder(pretrained, tmp_path, task):
    if task == "classify":
        data = tmp_path / "t.tsv"
        data.write_text("text\tlabel\n" + "abc\tfirst\nklm\tsecond\n" * 20, encoding="utf-8")
    else:
        ctx = "abcdefghij小猫坐在垫子上klmnop"
        rows = [{"question": "小猫", "context": ctx, "answers": [{"text": "垫子", "answer_start": ctx.index("垫子")}]}] * 20
        data = tmp_path / "q.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / task
    lmlab.train(task=task, init=str(pretrained / "enc"), data=str(data), out=str(out), steps=1, lr=1e-12, warmup=0,
                progress=False)  # fmt: skip
    tuned, start = load_file(out / "model.safetensors"), load_file(pretrained / "enc" / "model.safetensors")
    body = {k: v for k, v in start.items() if k.startswith("body.")}
    assert body and all(torch.allclose(tuned[k], v, atol=1e-6, rtol=0) for k, v in body.items())
    assert not any(k.startswith(("mlm_", "dense")) for k in tuned) or task == "classify"
    assert json.loads((out / "config.json").read_text())["head"] == ("classify" if task == "classify" else "span")


def test_what_an_mlm_run_is_not_for_is_one_line(pretrained, tmp_path, capsys):
    from lmlab.cli import main

    enc = str(pretrained / "enc")
    with pytest.raises(LmlabError, match="--model encoder"):
        lmlab.train(data=str(pretrained / "text.txt"), out=str(tmp_path / "x"), model="lstm", steps=1, **{
            k: v for k, v in TINY.items() if k != "n_head"})  # fmt: skip
    with pytest.raises(LmlabError, match="drop --init"):
        lmlab.train(data=str(pretrained / "text.txt"), out=str(tmp_path / "x"), init=enc, steps=1, task="mlm", progress=False)
    with pytest.raises(LmlabError, match="predicts no next token: fine-tune it"):
        lmlab.train(data=str(pretrained / "text.txt"), out=str(tmp_path / "x"), init=enc, steps=1, progress=False)
    capsys.readouterr()
    for argv, says in (
        (["generate", enc, "--prompt", "abc"], "does not write text"),
        (["classify", enc, "--text", "abc"], "--task classify --init"),
        (["eval", enc, "--data", str(pretrained / "text.txt")], "no next-token perplexity"),
        (["export", enc, "--out", str(tmp_path / "hf")], "do not export to Hugging Face yet"),
    ):
        assert main(argv) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0] and "Traceback" not in err[0], err


def test_the_training_loss_is_the_cross_entropy_of_the_chosen_tokens(pretrained, tmp_path):
    """The trainer's loss (head on the chosen positions only) against the full (B, T, V)
    logits of the same corrupted batch, cross-entropy taken by hand at the chosen tokens."""
    from lmlab.training.mlm import MLMTrainer
    from lmlab.training.run import train_config

    cfg, given = train_config(data=str(pretrained / "text.txt"), out=str(tmp_path / "o"), tokenizer="char", steps=1,
                              **{k: v for k, v in TINY.items() if k not in ("overwrite",)})  # fmt: skip
    trainer = MLMTrainer(cfg, given)
    trainer.setup()
    try:
        x = torch.tensor(trainer.train_ids[:64], dtype=torch.long).view(2, 32)
        trainer.model.eval()
        trainer._gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            got = trainer._loss(x, x)
        mask_id, specials = trainer._masking()
        inputs, labels = mask_tokens(x, mask_id, trainer.tok.get_vocab_size(), specials, torch.Generator().manual_seed(3))
        with torch.no_grad():
            logits, _ = trainer.model(inputs)
        chosen = (labels != IGNORE).nonzero().tolist()
        by_hand = -sum(torch.log_softmax(logits[b, t], -1)[labels[b, t]] for b, t in chosen) / len(chosen)
        torch.testing.assert_close(got, by_hand, atol=1e-5, rtol=1e-5)
    finally:
        trainer.close()


def test_resume_masks_what_the_uninterrupted_run_masked(pretrained, tmp_path, monkeypatch):
    from helpers import assert_resume_is_exact

    from lmlab.training.mlm import MLMTrainer

    opts = dict(TINY, data=str(pretrained / "text.txt"), tokenizer="char", steps=20, eval_every=10, save_every=10,
                dropout=0.1)  # fmt: skip
    assert_resume_is_exact(MLMTrainer, monkeypatch, tmp_path / "a", tmp_path / "b", **opts)


def test_flags_an_encoder_would_not_read_and_text_with_nothing_to_mask_are_one_line(pretrained, tmp_path, capsys):
    from lmlab.cli import main

    text = str(pretrained / "text.txt")
    for argv, says in (
        (["--task", "mlm", "--model", "gpt"], "--model encoder (the default), not gpt"),
        (["--task", "qa", "--model", "gpt"], "--model encoder (the default), not gpt"),
        (["--task", "mlm", "--pos", "rope"], "--pos: the encoder has learned positions"),
        (["--task", "mlm", "--no-tie-embeddings"], "--no-tie-embeddings: the encoder"),
        (["--task", "mlm", "--max-seq-len", "0"], "--max-seq-len must be positive"),
    ):
        assert main(["train", *argv, "--data", text, "--steps", "1", "--out", str(tmp_path / "x")]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err
    only = tmp_path / "only.txt"
    only.write_text("[MASK]" * 200, encoding="utf-8")
    assert main(["train", "--task", "mlm", "--data", str(only), "--steps", "2", "--d-model", "32", "--n-layer", "1",
                 "--n-head", "2", "--max-seq-len", "16", "--batch-size", "2", "--out", str(tmp_path / "y")]) != 0  # fmt: skip
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "nothing to mask" in err[0], err
    assert main(["evaluate", str(pretrained / "enc"), "--data", text]) != 0  # no --task: the model says what it is
    assert "masked-token prediction" in capsys.readouterr().err


def test_a_question_that_fills_the_window_is_skipped_with_a_count(pretrained, tmp_path):
    """QA windows over a 32-token encoder: a question of 40 characters leaves no room for its
    context (skipped, one warning naming it); every question so: one line."""
    ctx = "abcdefghij小猫坐在垫子上klmnop"
    ok = {"id": "ok", "question": "小猫", "context": ctx, "answers": [{"text": "垫子", "answer_start": ctx.index("垫子")}]}
    long = dict(ok, id="long", question="abcdefghij" * 4)
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [ok] * 9 + [long]), encoding="utf-8")
    dev = tmp_path / "dev.jsonl"
    dev.write_text(json.dumps(ok) + "\n", encoding="utf-8")
    with pytest.warns(Warning, match=r"1 of 10 questions \(id long\) leave no room"):
        lmlab.train(task="qa", init=str(pretrained / "enc"), data=str(data), valid=str(dev), out=str(tmp_path / "a"),
                    steps=1, progress=False)  # fmt: skip
    data.write_text("".join(json.dumps(dict(long, id=str(i))) + "\n" for i in range(5)), encoding="utf-8")
    with pytest.raises(LmlabError, match="every question is too long"):
        lmlab.train(task="qa", init=str(pretrained / "enc"), data=str(data), out=str(tmp_path / "b"), steps=1,
                    progress=False)  # fmt: skip
