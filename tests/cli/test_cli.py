"""The command line, run as a user runs it (``python -m lmlab ...`` in a subprocess),
and the ``lmlab.train`` / ``lmlab.load`` Python API.

References: the library's own greedy and seeded generation in this process (the CLI
must be a thin layer over it), a cross-entropy computed here with torch over the
same windows, and the parameter count of the model as PyTorch counts it.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import REPO, TOKENIZER_TEXT, cli_env, lmlab_cmd, run_lmlab, tiny_checkpoint, tiny_model
from safetensors.torch import load_file

import lmlab
from lmlab.models.loading import read_checkpoint

CTX = 16


def run_cli(*args: str, check_rc: int | None = 0) -> subprocess.CompletedProcess:
    """``lmlab ARGS`` with every Python warning shown: stderr holds nothing lmlab did not say."""
    return run_lmlab(*args, check_rc=check_rc, PYTHONWARNINGS="default")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("cli") / "model", "char", pos="rope", max_seq_len=CTX)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmlab: error: "), proc.stderr
    assert proc.stdout == ""
    return lines[0]


# --------------------------------------------------------------------------- generate
def test_generate_greedy_prints_the_continuation_only(ckpt):
    """40 new tokens from a 5-token prompt go beyond the 16-token context: the sliding
    window's warning goes to stderr; stdout is the continuation and a newline."""
    model = lmlab.load(ckpt)
    expected = model.generate("To be", max_new_tokens=40, temperature=0)
    assert len(expected) > 20
    proc = run_cli("generate", str(ckpt), "--prompt", "To be", "--max-new-tokens", "40", "--temperature", "0")
    assert proc.stdout == expected + "\n"
    assert "warning" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli(
        "generate",
        str(ckpt),
        "--prompt",
        "To be",
        "--max-new-tokens",
        "40",
        "--temperature",
        "0",
        "--no-stream",
    )
    assert proc.stdout == expected + "\n"


def test_generate_seed_is_reproducible(ckpt):
    """The same seed gives, in a new process, the text the library gives in this one."""
    model = lmlab.load(ckpt)
    args = ("generate", str(ckpt), "--prompt", "The", "--max-new-tokens", "12", "--top-k", "20")
    outs = []
    for seed in (11, 12):
        expected = model.generate("The", max_new_tokens=12, temperature=1.0, top_k=20, seed=seed)
        outs.append(run_cli(*args, "--temperature", "1.0", "--seed", str(seed)).stdout)
        assert outs[-1] == expected + "\n"
    assert outs[0] != outs[1]


# --------------------------------------------------------------------------- eval and info
def test_eval_matches_cross_entropy_by_hand(ckpt, tmp_path):
    """Every token after the first predicted once, in consecutive windows of the
    context; each window starts from a fresh context."""
    text = TOKENIZER_TEXT[:150]
    data = tmp_path / "eval.txt"
    data.write_text(text, encoding="utf-8")
    cfg, tensors, tok, _ = read_checkpoint(ckpt)
    model = lmlab.load(ckpt).module
    ids = tok.encode(text, add_special_tokens=False).ids
    assert len(ids) == 150 and len(ids) % CTX != 1  # a short last window too
    nll = []
    with torch.no_grad():
        for s in range(0, len(ids) - 1, CTX):
            x = torch.tensor([ids[s : s + CTX]])
            y = torch.tensor(ids[s + 1 : s + 1 + CTX])
            logits, _ = model(x[:, : len(y)])
            # -log p(y_t | x_≤t) = logsumexp(z) - z_y
            nll.append(F.cross_entropy(logits[0], y, reduction="none"))
    loss = float(torch.cat(nll).mean())
    proc = run_cli("eval", str(ckpt), "--data", str(data))
    m = re.search(r"loss ([\d.]+)\s+perplexity ([\d.]+)\s+over ([\d,]+) tokens", proc.stdout)
    assert m, proc.stdout
    assert float(m.group(1)) == pytest.approx(loss, abs=1e-4)
    assert float(m.group(2)) == pytest.approx(math.exp(loss), rel=1e-3)
    assert int(m.group(3).replace(",", "")) == len(ids) - 1
    assert math.exp(loss) > 1.0


@pytest.mark.parametrize("tied", [True, False])
def test_info_counts_parameters_once(tmp_path, tied):
    folder = tiny_checkpoint(tmp_path / "m", "char", max_seq_len=CTX, tie_embeddings=tied)
    vocab = lmlab.load(folder).tokenizer.get_vocab_size()
    expected = sum(p.numel() for p in tiny_model(vocab, max_seq_len=CTX, tie_embeddings=tied).parameters())
    stored = sum(t.numel() for t in load_file(str(folder / "model.safetensors")).values())
    assert stored == expected  # tied weights are stored once, counted once
    proc = run_cli("info", str(folder))
    m = re.search(r"parameters\s+([\d,]+)", proc.stdout)
    assert m, proc.stdout
    assert int(m.group(1).replace(",", "")) == expected
    assert "char" in proc.stdout and f"tie_embeddings={tied}" in proc.stdout


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "args,needle",
    [
        (("generate", "{missing}", "--prompt", "x"), "does not exist"),
        (("generate", "{ckpt}", "--top-p", "2"), "top_p"),
        (("generate", "{ckpt}", "--bogus"), "--bogus"),
        (("generate", "{ckpt}", "--max-new-tokens", "ten"), "--max-new-tokens"),
        (("eval", "{ckpt}", "--data", "{missing}"), "does not exist"),
        (("info", "{ckpt}/config.json"), "folder"),
    ],
)
def test_user_errors_are_one_line_exit_2(ckpt, tmp_path, args, needle):
    subst = {"ckpt": str(ckpt), "missing": str(tmp_path / "nowhere")}
    proc = run_cli(*(a.format(**subst) for a in args), check_rc=None)
    assert needle in _one_error_line(proc)


def test_debug_shows_the_traceback(tmp_path):
    proc = run_cli("--debug", "generate", str(tmp_path / "nowhere"), check_rc=None)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "LmlabError" in proc.stderr


# --------------------------------------------------------------------------- Python API: train, load
def test_train_api_then_load_and_generate(corpus_path, tmp_path):
    out = tmp_path / "run"
    res = lmlab.train(
        data=str(corpus_path),
        out=str(out),
        steps=5,
        n_layer=1,
        n_head=2,
        d_model=32,
        max_seq_len=32,
        batch_size=4,
        warmup=1,
        eval_every=5,
        eval_batches=2,
        save_every=5,
        device="cpu",
        progress=False,
    )
    assert res.step == 5 and Path(res.out) == out
    assert res.val_loss is not None and math.isfinite(res.val_loss)
    model = lmlab.load(out)
    assert (model.config.n_layer, model.config.d_model, model.config.max_seq_len) == (1, 32, 32)
    eos = model.generation_config["eos_token_id"]
    ids = model.encode("First")
    expected = []
    with torch.no_grad():
        for _ in range(10):  # greedy by hand, stopping after the end-of-text token
            logits, _ = model.module(torch.tensor([ids]))
            nxt = int(logits[0, -1].argmax())
            expected.append(nxt)
            ids.append(nxt)
            if nxt == eos:
                break
    text = model.generate("First", max_new_tokens=10, temperature=0)
    assert text == model.tokenizer.decode(expected, skip_special_tokens=True)
    assert isinstance(model.generate(["First", "All"], max_new_tokens=3), list)
    info = run_cli("info", str(out)).stdout
    assert re.search(r"training\s+step 5 of 5", info), info


# --------------------------------------------------------------------------- --allow-pickle: eval and info
def test_eval_and_info_read_a_pickle_folder_only_with_allow_pickle(ckpt, tmp_path):
    """A Hugging Face folder whose only weights are pytorch_model.bin: `eval` and `info` refuse
    it in one line naming --allow-pickle; with the flag they read it (torch.load with
    weights_only=True) and give the cross-entropy computed here and the weights' size."""
    from lmlab.hf import export_hf

    hf = export_hf(str(ckpt), tmp_path / "hf")
    tensors = load_file(str(hf / "model.safetensors"))
    torch.save(tensors, hf / "pytorch_model.bin")
    (hf / "model.safetensors").unlink()
    text = TOKENIZER_TEXT[:100]
    data = tmp_path / "eval.txt"
    data.write_text(text, encoding="utf-8")
    for args in (("eval", str(hf), "--data", str(data)), ("info", str(hf))):
        assert "--allow-pickle" in _one_error_line(run_cli(*args, check_rc=None))

    _, _, tok, _ = read_checkpoint(ckpt)
    model = lmlab.load(ckpt).module
    ids = tok.encode(text, add_special_tokens=False).ids
    nll = []
    with torch.no_grad():
        for s in range(0, len(ids) - 1, CTX):
            y = torch.tensor(ids[s + 1 : s + 1 + CTX])
            logits, _ = model(torch.tensor([ids[s : s + len(y)]]))
            nll.append(F.cross_entropy(logits[0], y, reduction="none"))  # -log p(y_t | x_≤t)
    loss = float(torch.cat(nll).mean())
    out = run_cli("eval", str(hf), "--data", str(data), "--allow-pickle").stdout
    m = re.search(r"loss ([\d.]+)\s+perplexity [\d.]+\s+over ([\d,]+) tokens", out)
    assert m, out
    assert float(m.group(1)) == pytest.approx(loss, abs=1e-4)
    assert int(m.group(2).replace(",", "")) == len(ids) - 1

    info = run_cli("info", str(hf), "--allow-pickle").stdout
    m = re.search(r"parameters\s+([\d,]+)", info)
    assert m and int(m.group(1).replace(",", "")) == sum(t.numel() for t in tensors.values())
    assert "Hugging Face llama (LlamaForCausalLM)" in info and f"context      {CTX} tokens" in info


def test_version_names_lmlab_and_torch():
    import torch

    out = run_cli("--version").stdout.strip()
    assert out == f"lmlab {lmlab.__version__} (torch {torch.__version__})"


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback_before_or_after_the_command(tmp_path, where):
    args = ["info", str(tmp_path / "missing")]
    args = ["--debug", *args] if where == "before" else [*args, "--debug"]
    proc = run_cli(*args, check_rc=None)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "does not exist" in proc.stderr
    assert "Traceback" not in run_cli("info", str(tmp_path / "missing"), check_rc=2).stderr


# --------------------------------------------------------------------------- generate: what a new user hits
def test_sliding_window_warning_precedes_the_streamed_text(ckpt):
    """stdout and stderr merged, as a terminal shows them: the warning is the first line,
    then the streamed continuation, whole (not cut by the warning)."""
    model = lmlab.load(ckpt)
    expected = model.generate("To be", max_new_tokens=40, temperature=0)
    args = ("generate", str(ckpt), "--prompt", "To be", "--max-new-tokens", "40", "--temperature", "0")
    proc = subprocess.run(
        lmlab_cmd(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=cli_env(PYTHONWARNINGS="default"),
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout
    warning, text = proc.stdout.split("\n", 1)
    assert warning.startswith("lmlab: warning: ") and f"sliding window of the last {CTX} tokens" in warning
    assert text == expected + "\n"


def test_generate_token_options_are_checked(ckpt):
    """--logprobs prints only with --json; an --eos-token-id past the vocabulary is refused."""
    line = _one_error_line(run_cli("generate", str(ckpt), "--prompt", "To", "--logprobs", "2", check_rc=None))
    assert "--logprobs 2" in line and "add --json" in line
    vocab = lmlab.load(ckpt).tokenizer.get_vocab_size()
    proc = run_cli("generate", str(ckpt), "--prompt", "To", "--eos-token-id", "9999", check_rc=None)
    line = _one_error_line(proc)
    assert "eos_token_id 9999" in line and f"vocabulary has {vocab} tokens" in line


# --------------------------------------------------------------------------- quickstart, run again
def test_quickstart_again_replaces_its_own_run_but_keeps_a_continued_one(
    tmp_path, corpus_path, monkeypatch, capsys
) -> None:
    """The demo's own flow with a small model on a small corpus for 3 steps (its
    `train` call, re-sized; folders, lines, loading and samples are the demo's). A demo
    run again replaces its own earlier run, saying so; once that run was continued
    (`lmlab train --resume`), it is kept and the demo trains in OUT-2."""
    import lmlab.cli.quickstart as qs
    from lmlab.training import train as real_train

    small = dict(n_layer=1, n_head=2, d_model=16, max_seq_len=32, batch_size=4, progress=False)

    def small_train(**kw):
        return real_train(**{**kw, **small, "data": str(corpus_path), "time": None, "steps": 3})

    monkeypatch.setattr(qs, "train", small_train)
    out = tmp_path / "runs" / "quickstart"

    said: dict[str, str] = {}

    def demo() -> list[str]:
        qs.quickstart(out=str(out))
        said["out"], err = capsys.readouterr()
        return [s for s in err.splitlines() if s.startswith("lmlab quickstart: ")]

    first = demo()
    assert len(first) == 1 and "training a small Transformer" in first[0]
    assert json.loads((out / "trainer_state.json").read_text())["step"] == 3
    (out / "metrics.jsonl").write_text('{"step": 99}\n')  # a mark the replacing run must wipe
    lines = demo()
    assert lines[0] == (
        f"lmlab quickstart: replacing the earlier demo run in {out} (its checkpoint and metrics); to keep a "
        f"demo run, continue it (`lmlab train --resume {out}`) or give --out another folder"
    )
    assert [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]

    lmlab.train(resume=str(out), steps=5, progress=False)  # the user continues the demo's run
    lines = demo()
    second = Path(f"{out}-2")
    assert lines[0] == (
        f"lmlab quickstart: keeping {out} (trained further since the demo, or not by it); this demo trains in "
        f"{second}"
    )
    assert json.loads((out / "trainer_state.json").read_text())["step"] == 5  # untouched
    assert json.loads((second / "trainer_state.json").read_text())["step"] == 3
    assert f"lmlab train --resume {second} --steps 1003" in said["out"]  # "try next" names OUT-2
    lines = demo()  # again: OUT is still kept, and the demo's own OUT-2 is replaced
    assert lines[0].endswith(f"this demo trains in {second}, replacing the earlier demo there")
    assert json.loads((out / "trainer_state.json").read_text())["step"] == 5
    assert not Path(f"{out}-3").exists()
