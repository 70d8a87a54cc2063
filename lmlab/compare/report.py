"""The report of ``lmlab compare``: ``report.md`` (the results table, the sizing rule,
the validation-loss charts, the samples, the commands) and ``results.json`` (the same
figures for programs), written from the runs' :class:`~lmlab.compare.runs.RunResult`.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path
from typing import Any

import torch

from lmlab.compare.runs import RunResult
from lmlab.training.plots import new_chart, save_chart


def plot_curves(runs: list[RunResult], root: Path) -> list[Path]:
    """Validation loss of every model on one chart, against tokens seen and against time."""
    paths = []
    axes = (
        (0, "val_loss_tokens.png", "tokens seen", "tokens seen"),
        (1, "val_loss_time.png", "time", "time (s)"),
    )
    for x, name, what, label in axes:
        fig, ax = new_chart()
        for r in runs:
            if r.curve:
                xs, ys = [c[x] for c in r.curve], [c[2] for c in r.curve]
                ax.plot(xs, ys, "o-", lw=1.6, ms=3, label=f"{r.name} ({_short(r.n_params)})")
        ax.set_xlabel(f"training {label}")
        ax.set_ylabel("validation loss (nats / token)")
        ax.set_title(f"validation loss against training {what}")
        paths.append(save_chart(fig, ax, root / name))
    return paths


def _short(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def _fence(text: str) -> str:
    """A code fence longer than any run of backticks in ``text``."""
    longest, run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    return "`" * max(3, longest + 1)


def _fmt(v: float | None, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def table(runs: list[RunResult]) -> list[str]:
    """The results table, one row per model (markdown)."""
    lines = [
        "| model | configuration | parameters | steps | tokens seen | final val loss | perplexity "
        "| train tokens/s | generate tokens/s | peak memory |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in runs:
        mib = r.peak_rss_bytes / 2**20 if r.peak_rss_bytes is not None else None
        lines.append(
            f"| {r.name} | {r.config} | {r.n_params:,} | {r.steps:,} | {r.tokens:,} | {_fmt(r.val_loss, '.4f')} "
            f"| {_fmt(r.perplexity, '.2f')} | {r.train_tokens_per_s:,.0f} | {r.generate_tokens_per_s:,.0f} "
            f"| {_fmt(mib, ',.0f')} MiB |"
        )
    return lines


def write_report(root: Path, runs: list[RunResult], f: dict[str, Any]) -> tuple[Path, list[Path]]:
    """``report.md`` (the table, the sizing rule, the charts, samples, commands) and
    ``results.json`` (the same figures for programs). ``f``: the facts of the comparison
    (data, budget, shared settings), with ``target`` (the parameter count aimed at) and
    ``tolerance`` (how far from it each auto-sized model may land)."""
    charts = plot_curves(runs, root)
    md = [
        *_setup_section(f),
        *_results_section(runs, f),
        *_sizes_section(runs, f),
        "## Validation loss",
        "",
        "![validation loss against tokens seen](val_loss_tokens.png)",
        "",
        "![validation loss against training time](val_loss_time.png)",
        "",
        *_samples_section(runs, f),
        *_commands_section(runs),
    ]
    report = root / "report.md"
    report.write_text("\n".join(md), encoding="utf-8")
    results = [{k: v for k, v in dataclasses.asdict(r).items() if k != "curve"} for r in runs]
    (root / "results.json").write_text(
        json.dumps({"target_params": f["target"], "runs": results}, indent=1), encoding="utf-8"
    )
    return report, charts


def _setup_section(f: dict[str, Any]) -> list[str]:
    """The title, the data and the budget every run shared."""
    budget = (
        f"{f['time']} of training per model (each run plans its step count from its measured speed and re-plans as it goes)"
        if f["time"]
        else f"{f['tokens']:,} training tokens per model ({f['steps']} steps × {f['batch_size']} sequences "
        f"× {f['max_seq_len']} tokens)"
    )
    return [
        "# lmlab compare",
        "",
        f"Data: `{f['data']}`: {f['n_tokens']:,} tokens with the {f['tokenizer']} tokenizer "
        f"({f['vocab']:,} tokens, `{f['tokenizer_path']}`, shared by every run); training on the first "
        f"{f['n_train']:,}, validation on the last {f['n_val']:,} (10%).",
        "",
        f"Budget: {budget}. Every run: batch {f['batch_size']}, window {f['max_seq_len']} tokens, "
        f"seed {f['seed']}, lmlab's default optimiser (AdamW, warmup then cosine decay), the same "
        f"{f['eval_batches'] * f['batch_size']} validation windows, device {f['device']}.",
        "",
    ]


def _results_section(runs: list[RunResult], f: dict[str, Any]) -> list[str]:
    """The results table, the winner, and what each column measures."""
    threads = torch.get_num_threads()
    md = ["## Results", "", *table(runs), ""]
    scored = [r for r in runs if r.val_loss is not None]
    if scored:
        best = min(scored, key=lambda r: r.val_loss)
        md += [f"Lowest final validation loss: **{best.name}** ({best.val_loss:.4f}).", ""]
    return md + [
        "- *final val loss*: the validation loss at the last step, as written in `<model>/metrics.jsonl` "
        "(mean next-token cross-entropy in nats over the validation windows; a recurrent model starts "
        "each window from a zero state). *perplexity* = exp(loss).",
        "- *train tokens/s*: the median over steps of (batch × window) / step time, evaluation and "
        "checkpoint saves left out.",
        f"- *generate tokens/s*: {f['sample_tokens']} tokens, greedy, batch 1, from the prompt below, "
        f"in this process ({threads} thread{'s' if threads != 1 else ''}), after an 8-token warm-up; "
        "end-of-text "
        "held back. A Transformer past its context of "
        f"{f['max_seq_len']} tokens re-reads a sliding window of {f['max_seq_len']} tokens for each new one; "
        "a recurrent model's cost per token stays the same.",
        "- *peak memory*: the peak resident set size of the `lmlab train` child process that trained the "
        "model (`ru_maxrss` from `wait4`, the process started by a small launcher so that it does not "
        "count this process's memory): Python, PyTorch, the model, optimiser state, activations and "
        "the token arrays together. Every process pays the same few hundred MiB for Python and PyTorch, "
        "so the differences between rows are what the models cost.",
        "",
    ]


def _sizes_section(runs: list[RunResult], f: dict[str, Any]) -> list[str]:
    """The parameter target, the sizing rule, and where each model landed."""
    target = f["target"]
    counts = [r.n_params for r in runs]
    spread = max(counts) / min(counts) - 1  # largest / smallest - 1
    return [
        "## Sizes",
        "",
        f"Target: {target:,} parameters ("
        + ("given with --params" if f["params"] is not None else "the default `lmlab train` Transformer's")
        + "). Rule: a recurrent model keeps the embedding size (d_model) and 2 layers and takes the "
        "hidden size (a multiple of 8 when one is close enough) whose count is nearest the target; the "
        "Transformer keeps 4 heads and 4 layers (other depths only if 4 cannot get close) and takes the "
        f"d_model, a multiple of 8, nearest the target. Each lands within {f['tolerance']:.1%} of the "
        "target, so any two within 10% of each other; a size given with --model-args is kept as given.",
        "",
        "| model | configuration | parameters | vs target | sized by |",
        "|---|---|--:|--:|---|",
        *(
            f"| {r.name} | {r.config} | {r.n_params:,} | {(r.n_params / target - 1):+.1%} "
            f"| {'the rule' if r.sized else 'you (--model-args)'} |"
            for r in runs
        ),
        "",
        f"Largest / smallest count: {spread:+.1%}.",
        "",
    ]


def _samples_section(runs: list[RunResult], f: dict[str, Any]) -> list[str]:
    """Each model's seeded continuation of the prompt, fenced."""
    md = [
        "## Samples",
        "",
        f"Each model continues the prompt {json.dumps(f['prompt'], ensure_ascii=False)} with "
        f"{f['sample_tokens']} tokens, temperature 0.8, seed {f['seed']}.",
        "",
    ]
    for r in runs:
        text = f["prompt"] + r.sample
        fence = _fence(text)
        md += [f"### {r.name}", "", f"{fence}text", text, fence, ""]
    return md


def _commands_section(runs: list[RunResult]) -> list[str]:
    """The ``lmlab train`` command of each run, to repeat any one of them."""
    commands = [shlex.join(["lmlab", *r.command[3:]]) for r in runs]  # [python, -m, lmlab, train, ...]
    return ["## Commands", "", "Each model was trained by:", "", "```bash", *commands, "```", ""]


__all__ = ["plot_curves", "table", "write_report"]
