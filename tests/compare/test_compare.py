"""``lmlab compare``: the sizing rule, an end-to-end run, and bad input.

References: parameter counts of models built here with PyTorch (and one LSTM counted by
hand from the formula of ``nn.LSTM``'s weights), each run's own ``metrics.jsonl`` and
checkpoint, PNG files checked by Pillow.
"""

from __future__ import annotations

import math
import re
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import run_lmlab

import lmlab
from lmlab.compare import compare, parse_models, size_models
from lmlab.errors import LmlabError
from lmlab.models.config import RNNConfig, TransformerConfig
from lmlab.models.rnn import RNNLanguageModel
from lmlab.models.transformer import Transformer
from lmlab.training.plots import read_metrics

VOCAB = 65


def torch_count(model: torch.nn.Module) -> int:
    """PyTorch's own count: ``parameters()`` yields a tied weight once."""
    return sum(p.numel() for p in model.parameters())


def built(name: str, options: dict, vocab: int = VOCAB) -> torch.nn.Module:
    """The model ``lmlab train`` builds by default, made here from the config classes."""
    if name == "gpt":
        return Transformer(
            TransformerConfig(
                vocab_size=vocab,
                n_layer=options.get("n_layer", 4),
                n_head=4,
                d_model=options.get("d_model", 128),
                max_seq_len=64,
            )
        )
    return RNNLanguageModel(
        RNNConfig(
            cell=name,
            vocab_size=vocab,
            d_model=128,
            hidden_size=options["hidden_size"],
            n_layer=options.get("n_layer", 2),
            tie_embeddings=True,
        )
    )


@pytest.mark.parametrize("params", [None, 200_000])
def test_sizes_within_ten_percent(params):
    plans, target = size_models(["rnn", "gru", "lstm", "gpt"], VOCAB, {"max_seq_len": 64}, params)
    counts = {p.name: torch_count(built(p.name, p.options)) for p in plans}
    for p in plans:
        assert p.n_params == counts[p.name], p.name
    if params is None:  # the target is `lmlab train`'s default Transformer (4 layers, d_model 128)
        assert target == torch_count(built("gpt", {}))
        assert plans[-1].options["d_model"] == 128
    else:
        assert target == params
    assert max(counts.values()) / min(counts.values()) <= 1.10, counts
    for p in plans:
        assert abs(counts[p.name] / target - 1) <= 0.045, (p.name, counts[p.name], target)


def test_lstm_size_by_hand_and_nearest():
    """An LSTM of hidden size H, embedding E, 2 layers, tied output through a projection:
    V·E (embedding) + [4H(E+H) + 8H] + [4H(2H) + 8H] (two layers, two bias vectors each)
    + H·E (projection) + V (output bias)."""
    (plan,), target = size_models(["lstm"], VOCAB, {"max_seq_len": 64}, params=500_000)
    H, E, V = plan.options["hidden_size"], 128, VOCAB

    def by_hand(h: int) -> int:
        return V * E + (4 * h * (E + h) + 8 * h) + (4 * h * 2 * h + 8 * h) + h * E + V

    assert plan.n_params == by_hand(H)
    assert H % 8 == 0
    # nearest among multiples of 8: the neighbours miss the target by more
    assert abs(by_hand(H) - target) <= min(abs(by_hand(H - 8) - target), abs(by_hand(H + 8) - target))


def test_user_sizes_are_kept():
    plans, _ = size_models(
        ["lstm", "gpt"],
        VOCAB,
        {"max_seq_len": 64},
        model_args={"lstm": {"hidden_size": 40, "n_layer": 3}, "gpt": {"n_layer": 2}},
    )
    lstm, gpt = plans
    assert (lstm.options["hidden_size"], lstm.options["n_layer"], lstm.sized) == (40, 3, False)
    assert lstm.n_params == torch_count(built("lstm", lstm.options))
    # gpt: n_layer given, d_model still chosen by the rule at that depth
    assert gpt.sized and gpt.options["n_layer"] == 2
    assert gpt.n_params == torch_count(built("gpt", gpt.options))


# `corpus`: SHAKESPEARE_TEXT in a file the module shares, from conftest.py.
def _section(md: str, title: str) -> str:
    return md.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


B, T, TOKENS = 12, 64, 3000


@pytest.fixture(scope="module")
def compared(tmp_path_factory, corpus):
    """One tiny compare of an LSTM and a Transformer, run while this process holds 400 MiB
    of ballast (see test_peak_memory_is_the_trainers_own); returns (result, our peak RSS)."""
    import resource

    tmp = tmp_path_factory.mktemp("compare")
    ballast = bytearray(b"\x01") * (400 * 2**20)  # written, so resident
    res = compare(
        data=str(corpus), out=tmp / "cmp", models="lstm,gpt", tokens=TOKENS, params=30_000,
        eval_batches=2, sample_tokens=40, seed=7, progress=False,
    )  # fmt: skip
    assert len(ballast)
    return res, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def test_report_matches_the_runs(compared):
    res, _ = compared
    out = res.out
    md = (out / "report.md").read_text(encoding="utf-8")
    assert res.report == out / "report.md"
    results = _section(md, "Results")
    steps = math.ceil(TOKENS / (B * T))
    shared_tok = (out / "tokenizer.json").read_text(encoding="utf-8")
    for name in ("lstm", "gpt"):
        run = out / name
        rows = read_metrics(run / "metrics.jsonl")
        vals = [r["val_loss"] for r in rows if "val_loss" in r]
        model = lmlab.load(run)
        cells = [c.strip() for c in re.search(rf"^\| {name} \|(.*)\|$", results, re.M).group(1).split("|")]
        config, n_params, n_steps, tokens, val, ppl, train_tps, gen_tps, mem = cells
        assert int(n_params.replace(",", "")) == torch_count(model.module)
        assert int(n_steps.replace(",", "")) == rows[-1]["step"] == steps
        assert int(tokens.replace(",", "")) == rows[-1]["tokens"] == steps * B * T  # the same budget
        assert val == f"{vals[-1]:.4f}"
        assert ppl == f"{math.exp(vals[-1]):.2f}"
        for figure in (train_tps, gen_tps, mem.removesuffix(" MiB")):
            assert float(figure.replace(",", "")) > 0
        # every run used the one tokenizer
        assert (run / "tokenizer.json").read_text(encoding="utf-8") == shared_tok
        # the sample is the model's own seeded continuation of the corpus's first line
        sample = model.generate("First Citizen:\n", max_new_tokens=40, temperature=0.8, seed=7)
        samples = _section(md, "Samples")
        assert f"### {name}\n\n```text\nFirst Citizen:\n{sample}" in samples
    # the sizes section states the counts, within 10% of each other
    sizes = _section(md, "Sizes")
    counts = [int(x.replace(",", "")) for x in re.findall(r"^\| \w+ \| [^|]+ \| ([\d,]+) \|", sizes, re.M)]
    assert len(counts) == 2 and max(counts) / min(counts) <= 1.10
    from PIL import Image

    for png in ("val_loss_tokens.png", "val_loss_time.png"):
        assert f"]({png})" in md and out / png in res.charts
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
            im.verify()


def test_peak_memory_is_the_trainers_own(compared, tmp_path):
    """The reported peak is that of the training process alone: not inflated by the memory
    of the process that started it (which held 400 MiB of ballast), and what GNU time
    reports for the same command, where it is installed."""
    res, ours = compared
    peak = res.runs[0].peak_rss_bytes
    assert peak is not None
    assert 50 * 2**20 < peak < ours - 300 * 2**20, (peak, ours)
    if Path("/usr/bin/time").is_file():
        cmd = list(res.runs[0].command)  # the run's own `lmlab train` command, into a new folder
        cmd[cmd.index("--out") + 1] = str(tmp_path / "again")
        proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, timeout=300)
        kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
        assert abs(peak / (kib * 1024) - 1) < 0.15, (peak, kib)


def _bad(corpus: Path, out: Path, **kw) -> str:
    with pytest.raises(LmlabError) as e:
        compare(data=str(corpus), out=out, **{"tokens": 3000, "progress": False, **kw})
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize(
    ("options", "expect"),
    [
        ({"models": ""}, "--models is empty"),
        ({"models": " , "}, "--models is empty"),
        ({"models": "lstm,transformer"}, "unknown model 'transformer'"),
        ({"models": "lstm,lstm"}, "twice"),
        ({"time": "5m"}, "not both"),
        ({"tokens": 100}, "less than one step"),
        ({"tokens": None, "time": "soon"}, "not a duration"),
        ({"tokens": None, "time": "0s"}, "--time must be positive"),
        ({"params": -5}, "--params must be positive"),
        ({"eval_batches": 0}, "--eval-batches must be positive"),
        ({"params": 100, "models": "lstm"}, "cannot size lstm"),
        ({"models": "lstm", "model_args": ["lstm:hiden_size=3"]}, "no setting 'hiden_size'"),
        ({"models": "lstm", "model_args": ["gru:hidden_size=32"]}, "--models does not list"),
        ({"models": "lstm", "model_args": ["lstm"]}, "MODEL:KEY=VALUE"),
        ({"models": "lstm", "model_args": ["lstm:hidden_size=big"]}, "not a valid int"),
        ({"models": "gpt", "model_args": ["gpt:stateful=yes"]}, "--stateful needs a recurrent model"),
        ({"models": "lstm", "model_args": ["lstm:hidden_size=0"]}, "must be positive"),
        ({"models": "lstm", "model_args": ["lstm:hidden_size=-8"]}, "hidden_size must be positive (got -8)"),
        ({"models": "gru", "model_args": ["gru:n_layer=0"]}, "n_layer must be positive (got 0)"),
        ({"models": "gpt", "model_args": ["gpt:n_layer=0"]}, "n_layer must be positive (got 0)"),
        ({"models": "rnn,gpt", "model_args": ["gpt:stateful=1"]}, "--stateful needs a recurrent model"),
    ],
)
def test_bad_input(corpus, tmp_path, options, expect):
    assert expect in _bad(corpus, tmp_path / "cmp", **options)
    assert not list((tmp_path / "cmp").glob("*/metrics.jsonl"))  # nothing was trained


def test_refuses_existing_runs(corpus, tmp_path):
    (tmp_path / "cmp" / "gpt").mkdir(parents=True)
    (tmp_path / "cmp" / "gpt" / "config.json").write_text("{}")
    assert "--overwrite" in _bad(corpus, tmp_path / "cmp", models="gpt")


def test_cli_error_is_one_line(corpus, tmp_path):
    args = ["compare", "--data", str(corpus), "--out", str(tmp_path / "o"), "--models", "lstm,mamba"]
    proc = run_lmlab(*args, check_rc=2, timeout=120)
    assert proc.stderr.strip().splitlines() == [
        "lmlab: error: --models: unknown model 'mamba'; choose from gpt, rnn, gru, lstm"
    ]


def test_parse_models():
    assert parse_models(" rnn, gpt ,") == ["rnn", "gpt"]
    assert parse_models(["lstm"]) == ["lstm"]
