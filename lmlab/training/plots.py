"""Loss curves from ``metrics.jsonl`` (matplotlib, no display needed)."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    rows = []
    p = Path(path)
    if not p.is_file():
        return rows
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill: skip it
    return rows


def ema(values: list[float], alpha: float = 0.05) -> list[float]:
    out, m = [], None
    for v in values:
        m = v if m is None else (1 - alpha) * m + alpha * v
        out.append(m)
    return out


def new_chart():
    """A figure and its axes, drawn off-screen (the Agg backend), in lmlab's chart size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 4.2), dpi=110)


def save_chart(fig, ax, out_png: str | Path) -> Path:
    """Grid, legend and tight layout, written to ``out_png``; the figure is closed."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return Path(out_png)


def plot_loss_curve(metrics_path: str | Path, out_png: str | Path, title: str = "") -> Path:
    rows = read_metrics(metrics_path)
    fig, ax = new_chart()
    steps = [r["step"] for r in rows if "loss" in r]
    loss = [r["loss"] for r in rows if "loss" in r]
    if steps:
        ax.plot(steps, loss, color="tab:blue", alpha=0.25, lw=0.8, label="train loss")
        ax.plot(steps, ema(loss), color="tab:blue", lw=1.6, label="train loss (EMA)")
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    if val:
        ax.plot(*zip(*val), "o-", color="tab:orange", lw=1.6, ms=3, label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title or "lmlab training")
    return save_chart(fig, ax, out_png)
