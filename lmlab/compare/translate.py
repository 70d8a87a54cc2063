"""``lmlab compare --task translate``: the RNN with attention against the Transformer on the
user's own parallel text, BLEU against training time.

The fairness rules of :mod:`lmlab.compare` hold: every run shares the pairs, the joint
tokenizer (trained once, ``DIR/tokenizer.json``), the dev set, the batch, the seed, the
budget and the optimiser settings, and the models are sized to about the same number of
parameters (the RNN by its hidden size, the Transformer by d_model). Each model trains in
its own ``lmlab train --task translate`` child process; its dev BLEU at every evaluation
(greedy translations of the same ``--bleu-samples`` dev pairs) gives the curve, and its
best checkpoint is timed translating those pairs.
"""

from __future__ import annotations

import json
import shlex
import time as _time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lmlab.compare.runs import error_line, run_child, train_command
from lmlab.compare.sizing import SEQ2SEQ_MODELS, TOLERANCE, parse_model_args, parse_models, size_models
from lmlab.errors import LmlabError
from lmlab.messages import say
from lmlab.training.config import TrainConfig, parse_duration
from lmlab.training.plots import new_chart, read_metrics, save_chart


@dataclass
class TranslateRun:
    """One model's figures in the translation report."""

    name: str
    folder: str
    config: str
    n_params: int
    steps: int
    elapsed_s: float
    best_bleu: float | None
    val_loss: float | None
    train_tokens_per_s: float
    sentences_per_s: float
    peak_rss_bytes: int | None
    samples: list[str]
    command: list[str]
    curve: list[tuple[float, float]] = field(default_factory=list)  # (seconds, dev BLEU)


def _log(msg: str) -> None:
    say(f"lmlab: compare: {msg}")


def _measure(folder: Path, sources: list[str], device: str) -> tuple[float, list[str], int]:
    """Greedy translation speed of the best checkpoint over the dev sample, and 3 translations."""
    from lmlab.api import load

    best = folder / "best" if (folder / "best" / "config.json").is_file() else folder
    model = load(best, device=device)
    t0 = _time.perf_counter()
    out = model.translate(sources, batch_size=32)
    dt = _time.perf_counter() - t0
    return len(sources) / dt if dt > 0 else 0.0, out[:3], model.module.num_parameters()


def compare_translate(
    data: str, out: str | Path, models: str = ",".join(SEQ2SEQ_MODELS), time: str | None = None,
    target_data: str | None = None, valid: str | None = None, source_field: str = "src", target_field: str = "tgt",
    tokenizer: str = "bpe", vocab_size: int = 4096, seed: int = 1337, params: int | None = None,
    model_args: Any = None, max_seq_len: int = 64, batch_size: int = 32, batch_tokens: int | None = None,
    eval_every: int | None = None, bleu_samples: int = 200, device: str = "auto", overwrite: bool = False,
    progress: bool = True, **_: Any,
) -> Any:  # fmt: skip
    """Train each encoder-decoder on the same pairs and budget into ``out/<model>/``, then
    write ``out/report.md`` (with ``bleu_time.png`` and ``results.json``)."""
    from lmlab.pairs import read_pairs
    from lmlab.tokenizer import tokenizer_kind
    from lmlab.training.seq2seq import MAX_VALID, pairs_tokenizer

    names = parse_models(models, SEQ2SEQ_MODELS)
    margs = parse_model_args(model_args)
    time = time or "5m"
    if parse_duration(time) <= 0:
        raise LmlabError(f"--time must be positive (got {time})")
    root = Path(out)
    _check_out(root, names, overwrite)
    pairs = read_pairs(data, target_data, source_field, target_field)  # bad data fails before any training
    tok = pairs_tokenizer(tokenizer, pairs, vocab_size)
    tok_path = root / "tokenizer.json"
    tok.save(str(tok_path))
    dev = read_pairs(valid, None, source_field, target_field, what="--valid") if valid else None
    if dev is None:  # the trainer's own held-out slice, made the same way
        _, dev = pairs.split(TrainConfig.val_fraction, seed=seed, max_valid=MAX_VALID)
    base = {
        "task": "translate", "data": data, "target_data": target_data, "valid": valid, "source_field": source_field,
        "target_field": target_field, "tokenizer": str(tok_path), "max_seq_len": max_seq_len,
        "batch_size": batch_size, "batch_tokens": batch_tokens, "seed": seed, "time": time,
        "eval_every": eval_every or 100, "bleu_samples": bleu_samples, "device": device,
    }  # fmt: skip
    plans, target = size_models(names, tok.get_vocab_size(), {k: v for k, v in base.items() if v is not None},
                                params, margs)  # fmt: skip
    for p in plans:
        TrainConfig(**{**base, **p.options, "out": str(root / p.name)}).validate()
    _log(f"{len(plans)} models ({', '.join(f'{p.name} {p.n_params:,}' for p in plans)}), {time} each")
    runs = []
    sample = dev.sources[:bleu_samples] or dev.sources[:1]
    for i, p in enumerate(plans, 1):
        folder = root / p.name
        folder.mkdir(parents=True, exist_ok=True)
        opts = {**base, **p.options, "out": str(folder), "overwrite": overwrite or None, "progress": progress}
        cmd = train_command({k: v for k, v in opts.items() if v is not None})
        _log(f"[{i}/{len(plans)}] training {p.name} ({p.n_params:,} parameters) into {folder}/")
        rc, rss = run_child(cmd, folder / "train.log", echo=progress)
        if rc != 0:
            raise LmlabError(f"training {p.name} failed: {error_line(folder / 'train.log')}")
        speed, samples, n = _measure(folder, sample, device)
        rows = read_metrics(folder / "metrics.jsonl")
        state = json.loads((folder / "trainer_state.json").read_text())
        vals = [r["val_loss"] for r in rows if r.get("val_loss") is not None]
        runs.append(TranslateRun(
            name=p.name, folder=str(folder), config=TrainConfig(**p.options).model_config(1).n_params_hint,
            n_params=n, steps=rows[-1]["step"], elapsed_s=rows[-1]["elapsed_s"], best_bleu=state.get("best_bleu"),
            val_loss=vals[-1] if vals else None,
            train_tokens_per_s=sorted(r["tokens_per_s"] for r in rows)[len(rows) // 2],
            sentences_per_s=speed, peak_rss_bytes=rss, samples=samples, command=cmd,
            curve=[(r["elapsed_s"], r["bleu"]) for r in rows if "bleu" in r],
        ))  # fmt: skip
    facts = {"data": data, "n_pairs": len(pairs), "n_dev": len(dev), "tokenizer": tokenizer_kind(tok),
             "vocab": tok.get_vocab_size(), "time": time, "target": target, "sources": sample[:3],
             "references": dev.targets[:3], "bleu_samples": len(sample), "seed": seed}  # fmt: skip
    report, charts = _write_report(root, runs, facts)
    return TranslateComparison(out=root, report=report, charts=charts, runs=runs, target_params=target)


@dataclass
class TranslateComparison:
    """What ``compare --task translate`` wrote (the fields of :class:`lmlab.compare.CompareResult`)."""

    out: Path
    report: Path
    charts: list[Path]
    runs: list[TranslateRun]
    target_params: int


def _check_out(root: Path, names: list[str], overwrite: bool) -> None:
    """Refuse to train over finished runs unless --overwrite; make the folder."""
    from lmlab.checkpoint import RunDir

    taken = [n for n in names if RunDir(root / n).has_checkpoint()]
    if taken and not overwrite:
        raise LmlabError(f"{root} already holds runs of {', '.join(taken)}; give another --out or --overwrite")
    root.mkdir(parents=True, exist_ok=True)


def _write_report(root: Path, runs: list[TranslateRun], f: dict[str, Any]) -> tuple[Path, list[Path]]:
    fig, ax = new_chart()
    for r in runs:
        if r.curve:
            ax.plot([c[0] / 60 for c in r.curve], [c[1] for c in r.curve], "o-", lw=1.6, ms=3,
                    label=f"{r.name} ({r.n_params / 1e6:.2f}M)")  # fmt: skip
    ax.set_xlabel("training time (minutes)")
    ax.set_ylabel("dev BLEU (greedy)")
    ax.set_title("dev BLEU against training time")
    chart = save_chart(fig, ax, root / "bleu_time.png")
    best = max((r for r in runs if r.best_bleu is not None), key=lambda r: r.best_bleu, default=None)
    md = [
        "# lmlab compare --task translate", "",
        f"Data: `{f['data']}`: {f['n_pairs']:,} training pairs, {f['n_dev']:,} dev pairs; one {f['tokenizer']} "
        f"tokenizer ({f['vocab']:,} tokens) shared by every run. Budget: {f['time']} of training per model; "
        f"models sized to about {f['target']:,} parameters (each within {TOLERANCE:.1%}). BLEU: sacreBLEU over "
        f"greedy translations of the first {f['bleu_samples']} dev pairs, at each evaluation.", "",
        "## Results", "",
        "| model | configuration | parameters | steps | best dev BLEU | final val loss | train tokens/s "
        "| translate sentences/s | peak memory |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
        *(f"| {r.name} | {r.config} | {r.n_params:,} | {r.steps:,} | "
          f"{'—' if r.best_bleu is None else f'{r.best_bleu:.2f}'} | "
          f"{'—' if r.val_loss is None else f'{r.val_loss:.4f}'} | {r.train_tokens_per_s:,.0f} | "
          f"{r.sentences_per_s:,.1f} | {'—' if r.peak_rss_bytes is None else f'{r.peak_rss_bytes / 2**20:,.0f} MiB'} |"
          for r in runs),
        "",
        *([f"Best dev BLEU: **{best.name}** ({best.best_bleu:.2f}).", ""] if best else []),
        "![dev BLEU against training time](bleu_time.png)", "",
        "## Translations of the first dev sources", "",
    ]  # fmt: skip
    for i, src in enumerate(f["sources"]):
        md += [f"- source: {src}", f"  - reference: {f['references'][i]}"]
        md += [f"  - {r.name}: {r.samples[i] if i < len(r.samples) else ''}" for r in runs]
    md += ["", "## Commands", "", "```bash", *(shlex.join(["lmlab", *r.command[3:]]) for r in runs), "```", ""]
    report = root / "report.md"
    report.write_text("\n".join(md), encoding="utf-8")
    (root / "results.json").write_text(
        json.dumps({"target_params": f["target"], "runs": [asdict(r) for r in runs]}, indent=1, ensure_ascii=False),
        encoding="utf-8",
    )
    return report, [chart]


__all__ = ["TranslateComparison", "TranslateRun", "compare_translate"]
