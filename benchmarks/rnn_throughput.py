"""Training throughput of a char-level LSTM: lmlab's Trainer vs a plain PyTorch loop.

The shape of char-rnn's Shakespeare model: 2 LSTM layers of 512 units, sequences of
100 characters, batches of 50, a character vocabulary (65 letters in tinyshakespeare,
+2 lmlab special tokens). lmlab's side is ``Trainer.train_step`` — the code
``lmlab train`` runs each step: sampling windows from the token array, forward,
cross-entropy, backward, gradient-norm check and clipping, AdamW. The plain side is
what one writes by hand: ``nn.Embedding`` -> ``nn.LSTM`` -> ``nn.Linear`` with the same
sizes and weights, the same AdamW (``foreach=True``), the same clipping. Both run in
one process, alternating rounds (ABBA) so that machine drift hits both alike.

    .venv/bin/python benchmarks/rnn_throughput.py                 # 8 rounds of 2 steps, 2 threads
    .venv/bin/python benchmarks/rnn_throughput.py --rounds 20 --steps 1 --threads 1

Tokens/s are given from the total time and from the median step (robust to the
spikes another process causes on a shared machine); the ratio is printed for both.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.training import TrainConfig, Trainer, lr_at

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
SETTINGS = dict(
    model="lstm", n_layer=2, hidden_size=512, d_model=64, max_seq_len=100, batch_size=50, dropout=0.0,
    tie_embeddings=False, lr=2e-3, warmup=0, weight_decay=0.1, beta1=0.9, beta2=0.99, grad_clip=1.0,
    precision="fp32", device="cpu", progress=False, seed=0,
)  # fmt: skip


class PlainLSTM(nn.Module):
    """The hand-written model: the same layers and parameter names as lmlab's."""

    def __init__(self, vocab: int, emb: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, emb)
        self.rnn = nn.LSTM(emb, hidden, layers, batch_first=True)
        self.lm_head = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.tok_emb(x))
        return self.lm_head(out)


class PlainLoop:
    """nanoGPT-style: random windows from a token tensor, forward, backward, clip, step."""

    def __init__(self, model: nn.Module, data: torch.Tensor) -> None:
        s = SETTINGS
        self.model, self.data = model.train(), data
        self.opt = torch.optim.AdamW(
            model.parameters(), lr=s["lr"], betas=(s["beta1"], s["beta2"]),
            weight_decay=s["weight_decay"], foreach=True,
        )  # fmt: skip
        self.gen = torch.Generator().manual_seed(1)

    def step(self) -> float:
        T, B = SETTINGS["max_seq_len"], SETTINGS["batch_size"]
        ix = torch.randint(len(self.data) - T - 1, (B,), generator=self.gen)
        w = torch.stack([self.data[i : i + T + 1] for i in ix.tolist()])  # (B, T+1)
        x, y = w[:, :-1], w[:, 1:]
        logits = self.model(x)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), SETTINGS["grad_clip"])
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


def corpus_file(tmp: Path) -> tuple[Path, str]:
    if SHAKESPEARE.is_file():
        return SHAKESPEARE, str(SHAKESPEARE)
    rng = random.Random(0)
    alphabet = [chr(c) for c in range(32, 97)]  # 65 characters
    p = tmp / "random.txt"
    p.write_text("".join(rng.choice(alphabet) for _ in range(300_000)), encoding="utf-8")
    return p, "random characters (tinyshakespeare.txt not found)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2, help="steps per side per round")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp(prefix="lmlab-rnn-bench-"))
    os.environ.setdefault("LMLAB_CACHE", str(tmp / "cache"))
    path, name = corpus_file(tmp)

    trainer = Trainer(TrainConfig(data=str(path), out=str(tmp / "run"), steps=10**6, **SETTINGS))
    trainer.cfg.validate()
    trainer.setup()
    vocab = trainer.tok.get_vocab_size()
    plain = PlainLSTM(vocab, SETTINGS["d_model"], SETTINGS["hidden_size"], SETTINGS["n_layer"])
    plain.load_state_dict(trainer.model.state_dict())  # same weights, same names
    n_ours, n_plain = trainer.model.num_parameters(), sum(p.numel() for p in plain.parameters())
    assert n_ours == n_plain, f"models differ: lmlab {n_ours:,} vs plain {n_plain:,} parameters"
    loop = PlainLoop(plain, torch.from_numpy(trainer.train_ids.astype("int64")))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; data: {name}")
    print(f"LSTM 2x512, embedding {SETTINGS['d_model']}, vocab {vocab}, {n_ours / 1e6:.2f}M parameters, "
          f"batch {SETTINGS['batch_size']} x seq {SETTINGS['max_seq_len']}")  # fmt: skip

    trainer.model.train()
    step = 0

    def lmlab_step() -> float:
        nonlocal step
        for g in trainer.optimizer.param_groups:  # as Trainer.run_loop does each step
            g["lr"] = lr_at(step, trainer.cfg, trainer.max_steps)
        loss = trainer.train_step(step)
        step += 1
        return loss

    sides = {"plain PyTorch loop": loop.step, "lmlab Trainer": lmlab_step}
    times: dict[str, list[float]] = {k: [] for k in sides}
    losses: dict[str, list[float]] = {k: [] for k in sides}
    for fn in sides.values():  # warm-up (allocator, oneDNN primitives), not timed
        fn()
        fn()
    for r in range(a.rounds):
        order = list(sides.items()) if r % 2 == 0 else list(sides.items())[::-1]  # ABBA: no side always first
        for k, fn in order:
            for _ in range(a.steps):
                t0 = time.perf_counter()
                losses[k].append(fn())
                times[k].append(time.perf_counter() - t0)
        print(f"  round {r + 1}/{a.rounds}: " + ", ".join(f"{k} {sum(v):.1f}s" for k, v in times.items()),
              flush=True)  # fmt: skip
    per_step = SETTINGS["batch_size"] * SETTINGS["max_seq_len"]
    total = {k: per_step * len(v) / sum(v) for k, v in times.items()}
    median = {k: per_step / statistics.median(v) for k, v in times.items()}
    base = "plain PyTorch loop"
    for k in sides:
        print(f"  {k:20s} {total[k]:8,.0f} tokens/s (median step: {median[k]:8,.0f})   ratio vs plain: "
              f"{total[k] / total[base]:.3f}x (median: {median[k] / median[base]:.3f}x)   "
              f"loss {losses[k][0]:.3f} -> {losses[k][-1]:.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
