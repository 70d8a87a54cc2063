"""A new user's first hour: typos, long prompts, the defaults they meet first, and what
lmlab says while it trains.

Every expected line is written out here by hand (the wording is the contract), and the
numbers are worked out in the comments: none is read back from the code under test.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import shlex
import sys
from pathlib import Path

import pytest
from helpers import REPO, fake_clock, tiny_checkpoint

import lmlab
from lmlab.cli import build_parser, main
from lmlab.cli import quickstart as qs
from lmlab.cli.commands import read_prompt
from lmlab.cli.wording import perplexity_sentence
from lmlab.errors import LmlabError
from lmlab.training.config import TrainConfig
from lmlab.training.prepare import folder_summary
from lmlab.training.run import train_config
from lmlab.training.trainer import Trainer

SMALL = dict(n_head=2, d_model=32, max_seq_len=32, batch_size=4, seed=7, warmup=4, lr=3e-3, device="cpu")
SMALL.update(progress=False, eval_every=1000)


@pytest.fixture(autouse=True)
def _in_a_folder_of_its_own(tmp_path, monkeypatch) -> None:
    """A command that parses when it should not (a regression) writes here, not in the checkout."""
    monkeypatch.chdir(tmp_path)


def _usage_error(capsys, argv: list[str]) -> str:
    """The one line ``lmlab ARGV`` prints for a usage mistake (exit status 2)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1, err
    return err.strip()


# --------------------------------------------------------------------------- 1. did you mean
@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["trian"], "unknown command 'trian'; did you mean `lmlab train`? (see `lmlab train --help`)"),
        (["genrate", "x"], "unknown command 'genrate'; did you mean `lmlab generate`? (see `lmlab generate --help`)"),
        (["xyzzy"], "unknown command 'xyzzy'; the commands are quickstart, train, generate, translate, "
                    "summarize, classify, sentiment, qa, serve, viz, evaluate, eval, info, compare, export (see `lmlab --help`)"),
        # --step was taken as --steps (an abbreviation) before: now it is a typo
        (["train", "--out", "o", "--step", "5"], "unknown option --step; did you mean --steps? (see `lmlab train --help`)"),
        (["train", "--stpes=5"], "unknown option --stpes; did you mean --steps? (see `lmlab train --help`)"),
        (["train", "--precision", "bf61"],
         "--precision 'bf61' is not one of fp32, bf16; did you mean --precision bf16? (see `lmlab train --help`)"),
        (["generate", "m", "--temprature", "0"],
         "unknown option --temprature; did you mean --temperature? (see `lmlab generate --help`)"),
        (["info", "a", "b"], "unexpected argument b (see `lmlab info --help`)"),
        (["eval", "m", "--data", "d", "--zzzzzz"], "unknown option --zzzzzz (see `lmlab eval --help`)"),
    ],
)  # fmt: skip
def test_a_typo_is_one_line_with_the_nearest_spelling(capsys, argv, line) -> None:
    assert _usage_error(capsys, argv) == f"lmlab: error: {line}"


def test_no_parser_accepts_abbreviations() -> None:
    """Every parser, the subcommands' included, refuses a prefix of a flag."""
    ap = build_parser()
    subs = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert ap.allow_abbrev is False
    assert {name: p.allow_abbrev for name, p in subs.items()} == dict.fromkeys(subs, False)


def test_a_typo_answers_without_torch(tmp_path) -> None:
    import subprocess

    code = (
        "import sys\nfrom lmlab.cli import main\n"
        "try:\n    main(['train', '--step', '5'])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.stdout.strip() == "False", proc.stderr


# --------------------------------------------------------------------------- 2. --prompt-file, --prompt -
def test_prompt_file_reads_utf8_and_drops_one_final_line_break(tmp_path) -> None:
    f = tmp_path / "提示.txt"
    f.write_bytes("从前有座山，\n".encode())
    assert read_prompt("", str(f)) == "从前有座山，"
    f.write_bytes(b"def f():\r\n")
    assert read_prompt("", str(f)) == "def f():"
    f.write_bytes(b"a\n\n")  # only one line break goes: the blank line is the user's
    assert read_prompt("", str(f)) == "a\n"
    f.write_bytes(b"\xef\xbb\xbfhello")  # a byte-order mark is not text
    assert read_prompt("", str(f)) == "hello"
    assert read_prompt("plain", None) == "plain"


def test_prompt_dash_reads_standard_input(monkeypatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("你好，\n世界\n".encode())))
    assert read_prompt("-", None) == "你好，\n世界"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"x")))
    assert read_prompt("", "-") == "x"


def test_a_bad_prompt_file_is_one_line(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LmlabError) as e:
        read_prompt("", "nope.txt")
    assert str(e.value) == "--prompt-file nope.txt: no such file; give the path of a UTF-8 text file"
    with pytest.raises(LmlabError) as e:
        read_prompt("", ".")
    assert str(e.value) == "--prompt-file .: that is a folder; give a UTF-8 text file"
    Path("latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(LmlabError) as e:
        read_prompt("", "latin1.txt")
    assert str(e.value) == (
        "--prompt-file latin1.txt: the file is not valid UTF-8 (byte 3: b'\\xe9'); save it as UTF-8"
    )
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"ab\xff")))
    with pytest.raises(LmlabError) as e:
        read_prompt("-", None)
    assert str(e.value) == "--prompt -: standard input is not valid UTF-8 (byte 2: b'\\xff'); save it as UTF-8"


def test_prompt_and_prompt_file_exclude_each_other(capsys) -> None:
    line = _usage_error(capsys, ["generate", "m", "--prompt", "a", "--prompt-file", "f"])
    assert line == "lmlab: error: argument --prompt-file: not allowed with argument --prompt (see `lmlab generate --help`)"


def test_generate_from_a_prompt_file_continues_its_text(tmp_path, capsys) -> None:
    """The file's prompt (its final line break dropped) gives what --prompt gives."""
    ckpt = tiny_checkpoint(tmp_path / "m", "char", max_seq_len=16)
    (tmp_path / "p.txt").write_text("To be\n", encoding="utf-8")
    args = ["--max-new-tokens", "6", "--temperature", "0", "--no-stream"]
    assert main(["generate", str(ckpt), "--prompt-file", str(tmp_path / "p.txt"), *args]) == 0
    from_file = capsys.readouterr().out
    assert main(["generate", str(ckpt), "--prompt", "To be", *args]) == 0
    assert from_file == capsys.readouterr().out and len(from_file) == 6 + 1


# --------------------------------------------------------------------------- 3. recurrent depth
@pytest.mark.parametrize(
    ("options", "layers"),
    [({}, 4), ({"model": "gpt"}, 4), ({"model": "gru"}, 2), ({"model": "lstm"}, 2), ({"model": "rnn"}, 2),
     ({"model": "lstm", "n_layer": 3}, 3), ({"model": "gpt", "n_layer": 1}, 1)],
)  # fmt: skip
def test_recurrent_models_default_to_two_layers(tmp_path, options, layers) -> None:
    cfg, _ = train_config(out=str(tmp_path / "r"), **options)
    assert cfg.n_layer == layers
    assert cfg.model_config(vocab_size=50).n_layer == layers  # the model the run would build


def test_train_help_states_both_depths() -> None:
    ap = build_parser()
    train = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    text = " ".join(train.format_help().split())
    assert "--n-layer N_LAYER layers (default 4 for gpt, 2 for rnn, gru and lstm)" in text


# --------------------------------------------------------------------------- 4. --time re-plans


def test_a_jittery_machine_announces_one_plan_and_sums_up_once(tmp_path, corpus_path, monkeypatch, capsys):
    """Steps of 1 s, then 1.1 s in every other 10 s: each estimate moves the end by a few
    steps (under 20% of 92), so the first plan is the only one printed, the progress bar's
    total stays 92 until the run passes it, and one line at the end owns up to the rest.
    The first plan: after 10 steps at 1 s, T = 10 + ⌊(100 - 8 - 10) / 1⌋ = 92."""
    fake_clock(monkeypatch, lambda now: 1.1 if int(now // 10) % 2 else 1.0)
    totals: list[int | None] = []
    bar_total = Trainer._bar_total
    monkeypatch.setattr(Trainer, "_bar_total", lambda self, step: totals.append(bar_total(self, step)) or totals[-1])
    res = lmlab.train(data=str(corpus_path), out=str(tmp_path / "run"), time="100s", n_layer=2, **SMALL)
    lines = [s for s in capsys.readouterr().err.splitlines() if s.startswith("lmlab: --time")]
    assert lines[0] == "lmlab: --time 100s: 1000 ms/step, training for 92 steps"
    assert len(lines) == 2 and res.step != 92
    assert lines[1] == (
        f"lmlab: --time 100s: {res.step} steps, not the 92 announced: later estimates moved the end "
        "by less than 20%, too little to announce"
    )
    assert len(totals) >= 3  # re-plans happened, each leaving the total where it was
    assert totals[:-1] == [92] * (len(totals) - 1) and totals[-1] == res.step  # ends full


# --------------------------------------------------------------------------- 5. messages
def _train_run(tmp_path, corpus_path, steps=2, **kw) -> Path:
    out = tmp_path / "run"
    lmlab.train(data=str(corpus_path), out=str(out), steps=steps, n_layer=1, **{**SMALL, **kw})
    return out


def test_a_stopped_run_says_how_to_resume(tmp_path, corpus_path, monkeypatch, capsys) -> None:
    fake = Trainer.train_step

    def step(self, step):
        if step == 2:  # Ctrl-C during the third step
            self.stop_reason = "interrupted"
        return fake(self, step)

    monkeypatch.setattr(Trainer, "train_step", step)
    out = _train_run(tmp_path, corpus_path, steps=10)
    err = capsys.readouterr().err
    assert f"lmlab: interrupted: saved the checkpoint at step 3; continue with `lmlab train --resume {out}`\n" in err


def test_ctrl_c_before_the_loop_names_the_resume_command(tmp_path, monkeypatch, capsys) -> None:
    from lmlab.cli import commands

    def interrupted(a):  # noqa: ARG001
        raise KeyboardInterrupt

    monkeypatch.setitem(commands.COMMANDS, "train", interrupted)
    out = tmp_path / "run"
    assert main(["train", "--out", str(out)]) == 130
    assert capsys.readouterr().err == "lmlab: interrupted\n"  # nothing saved: nothing to resume
    out.mkdir()
    (out / "trainer_state.json").write_text('{"step": 40}')
    assert main(["train", "--resume", str(out), "--steps", "90"]) == 130
    assert capsys.readouterr().err == (
        f"lmlab: interrupted; the checkpoint in {out} is whole: continue with `lmlab train --resume {out}`\n"
    )


def test_precision_in_the_start_line_and_in_info(tmp_path, corpus_path, capsys) -> None:
    out = _train_run(tmp_path, corpus_path, precision="fp32")
    err = capsys.readouterr().err
    assert re.search(r"^lmlab: model .*, device cpu, precision fp32$", err, re.M), err
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert re.search(r"^training     step 2 of 2, 256 tokens, \d+s, precision fp32(, |$)", info, re.M), info


def test_resume_of_a_finished_run_says_one_thing(tmp_path, corpus_path, capsys) -> None:
    out = _train_run(tmp_path, corpus_path)
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "lmlab: trained" not in err and "resuming" not in err
    assert (
        f"lmlab: {out} is already at its last step, 2: nothing to train. To train it further, give a new "
        f"total, `lmlab train --resume {out} --steps 1002`, or more time, `lmlab train --resume {out} --time 5m`\n"
    ) in err
    assert main(["train", "--resume", str(out), "--steps", "1", "--no-progress"]) == 0
    assert f"lmlab: {out} is at step 2, past --steps 1: nothing to train." in capsys.readouterr().err


def test_the_perplexity_sentence_reads_plainly() -> None:
    assert perplexity_sentence(4.5871, "character", 65) == (
        "perplexity 4.6: on average, the model is as unsure of each next character as if it were choosing "
        "among 4.6 equally likely ones (1 would be certain; a blind guess among all 65 characters it knows "
        "would score 65; lower is better)"
    )


def test_eval_prints_the_sentence_after_the_numbers(tmp_path, corpus_path, capsys) -> None:
    ckpt = tiny_checkpoint(tmp_path / "m", "char", max_seq_len=16)
    assert main(["eval", str(ckpt), "--data", str(corpus_path)]) == 0
    first, second = capsys.readouterr().out.splitlines()
    ppl = float(re.search(r"perplexity ([\d.]+)", first)[1])
    assert second.startswith(f"perplexity {ppl:.1f}: on average, the model is as unsure of each next character")


@pytest.mark.parametrize(("env", "hint"), [("1", True), (None, False)])
def test_the_offline_hint_names_hf_hub_offline_only_when_it_is_set(monkeypatch, env, hint) -> None:
    import huggingface_hub

    import lmlab.hf as hf

    def no_network(*a, **k):
        raise OSError("cannot reach huggingface.co")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    monkeypatch.setattr(hf, "_offline", lambda: env is not None)
    if env is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", env)
    with pytest.raises(LmlabError) as e:
        hf.resolve_source("someone/some-model")
    msg = str(e.value)
    assert ("unset HF_HUB_OFFLINE" in msg) is hint
    assert ("HF_HUB_OFFLINE" in msg) is hint
    if not hint:
        assert "(cannot reach huggingface.co)" in msg and "once the Hub can be reached" in msg


def test_a_data_folder_says_what_it_read_and_skipped(tmp_path, capsys) -> None:
    notes = tmp_path / "notes"
    for name in ("a.txt", "b.md", "README", "sub/c.py", "d.pdf", "e.png", "f.PNG", ".hidden.txt", ".git/config"):
        (notes / name).parent.mkdir(parents=True, exist_ok=True)
        (notes / name).write_text("To be, or not to be, that is the question. " * 40, encoding="utf-8")
    expected = (
        f"lmlab: data: 4 files from {notes}/ (skipped 5: 3 with other extensions: .pdf, .png; "
        "2 hidden: .git/, .hidden.txt)"
    )
    assert folder_summary(notes) == expected
    from lmlab.data import resolve_data

    assert len(resolve_data(notes)) == 4  # the files the run reads are those it counts
    lmlab.train(data=str(notes), out=str(tmp_path / "run"), steps=1, n_layer=1, **SMALL)
    assert expected + "\n" in capsys.readouterr().err


# --------------------------------------------------------------------------- 6. examples that do not warn
#: The context of each run folder the docs generate from: the quick start's 128 characters,
#: and `lmlab train`'s default --max-seq-len 64 for runs/first (char) and runs/zh (BPE).
CONTEXTS = {"runs/quickstart": 128, "runs/first": 64, "runs/zh": 64}


def _generate_examples() -> list[list[str]]:
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    found = []
    for page in pages:
        text = page.read_text(encoding="utf-8").replace("\\\n", " ")
        for line in text.splitlines():
            m = re.search(r"lmlab generate (runs/\w+)\s.*", line)
            if m and m[1] in CONTEXTS:
                found.append(shlex.split(m[0].split("   #")[0].replace("$'", "'"))[1:])
    return found


def _fits(argv: list[str], context: int, prompt_file_text: str = "") -> bool:
    """prompt + max_new_tokens - 1 <= context, the prompt's tokens at most its UTF-8 bytes
    (byte-level BPE) and exactly its characters for a character model."""
    opts = {}
    for i, w in enumerate(argv):
        if w.startswith("--") and i + 1 < len(argv):
            opts[w] = argv[i + 1]
    prompt = opts.get("--prompt", prompt_file_text)
    if prompt == "-":
        prompt = "def main("  # the docs pipe `echo "def main("` into it
    size = len(prompt.encode()) if argv[1] == "runs/zh" else len(prompt)
    return size + int(opts.get("--max-new-tokens", 200)) - 1 <= context


def test_the_docs_generate_examples_fit_their_models_context() -> None:
    assert TrainConfig().max_seq_len == 64 and qs.CONTEXT == 128
    examples = _generate_examples()
    assert len(examples) >= 9
    for argv in examples:
        assert _fits(argv, CONTEXTS[argv[1]], prompt_file_text="从前有座山，"), argv


def test_the_quickstart_suggestions_fit_its_context() -> None:
    lines = qs.try_next("runs/quickstart", 900)
    assert lines[2] == ".venv/bin/lmlab train --resume runs/quickstart --steps 1900"
    gen = shlex.split(lines[0])
    assert gen[1:3] == ["generate", "runs/quickstart"]
    assert _fits(gen[1:], qs.CONTEXT)


def test_stored_runs_keep_their_depth(tmp_path, corpus_path) -> None:
    """A GRU trained with the new default stores n_layer 2: --resume builds the same model."""
    out = tmp_path / "gru"
    lmlab.train(data=str(corpus_path), out=str(out), steps=1, model="gru", hidden_size=16, **SMALL)
    assert json.loads((out / "config.json").read_text())["n_layer"] == 2
    cfg, _ = train_config(resume=str(out), steps=2)
    assert cfg.n_layer == 2


def test_a_new_run_stores_a_default_length_that_fits_its_context(tmp_path, corpus_path):
    """`lmlab generate RUN --prompt ...` with no --max-new-tokens stays inside a 32-token
    context: the run stores 16 (half of it), and nothing warns about a sliding window."""
    from helpers import run_lmlab

    out = tmp_path / "run"
    run_lmlab("train", "--data", str(corpus_path), "--out", str(out), "--n-layer", "1", "--d-model", "16",
              "--n-head", "2", "--max-seq-len", "32", "--batch-size", "2", "--steps", "2", "--no-progress")
    assert json.loads((out / "generation_config.json").read_text())["max_new_tokens"] == 16
    r = run_lmlab("generate", str(out), "--prompt", "the", "--seed", "0", "--json")
    assert "warning" not in r.stderr, r.stderr
    assert len(json.loads(r.stdout)["token_ids"]) <= 16
