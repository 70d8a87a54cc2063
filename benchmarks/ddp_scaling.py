"""DDP scaling: training tokens/s of `lmlab train` on 1 process vs 2 processes (torchrun).

The nanoGPT CPU recipe's shape (4 layers, 4 heads, d_model 128, context 64, global
batch 12, character-level vocabulary of ~65 on tinyshakespeare), one thread per
process, the same global batch either way (2 processes: 6 sequences each). Each run
is the real command (``python -m lmlab train`` and ``python -m torch.distributed.run
--standalone --nproc-per-node 2 -m lmlab train``); its ``metrics.jsonl`` gives the
tokens/s of every step (rank 0 times whole synchronous steps, so it is the job's
rate). Rounds alternate 1 and 2 processes so that drift on a shared machine hits both.

    scaling efficiency = tokens/s(2 processes) / (2 × tokens/s(1 process))

1.0 is perfect; the gradient all-reduce (gloo over loopback TCP, ~0.8M parameters =
3 MB per step) and the two processes' competition for memory bandwidth cost the rest.

    .venv/bin/python benchmarks/ddp_scaling.py                  # 2 rounds x 200 steps
    .venv/bin/python benchmarks/ddp_scaling.py --rounds 1 --steps 100
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
RECIPE = [
    "--n-layer", "4", "--n-head", "4", "--d-model", "128", "--max-seq-len", "64", "--batch-size", "12",
    "--tokenizer", "char", "--dropout", "0", "--precision", "fp32", "--device", "cpu",
]  # fmt: skip


def corpus(tmp: Path) -> Path:
    if SHAKESPEARE.is_file():
        return SHAKESPEARE
    print(f"(no {SHAKESPEARE}: using a generated stand-in text)", file=sys.stderr)
    p = tmp / "text.txt"
    words = "to be or not to be that is the question whether tis nobler in the mind".split()
    p.write_text(
        "\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(40000))
    )
    return p


def run(nproc: int, data: Path, out: Path, steps: int, cache: Path) -> list[dict]:
    train = ["-m", "lmlab", "train", "--data", str(data), "--out", str(out), *RECIPE]
    train += ["--steps", str(steps), "--eval-every", str(10 * steps), "--save-every", str(10 * steps)]
    train += ["--no-progress", "--overwrite"]
    if nproc == 1:
        cmd = [sys.executable, *train]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        cmd += train
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "LMLAB_CACHE": str(cache)}
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200, help="steps per run (the first 10%% are not timed)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating 1-process / 2-process rounds")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        data = corpus(tmp)
        skip = max(5, a.steps // 10)  # start-up steps: allocator and caches warming
        rates: dict[int, list[float]] = {1: [], 2: []}
        losses: dict[int, list[float]] = {}
        for k in range(a.rounds):
            for nproc in (1, 2):
                rows = run(nproc, data, tmp / f"run{nproc}", a.steps, tmp / "cache")
                rate = statistics.median(r["tokens_per_s"] for r in rows[skip:])
                rates[nproc].append(rate)
                losses[nproc] = [r["loss"] for r in rows]
                print(f"round {k + 1}: {nproc} process{'es' if nproc > 1 else ''}: {rate:,.0f} tokens/s")
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    drift = max(abs(x - y) for x, y in zip(losses[1], losses[2], strict=True))
    print(f"\n1 process : {one:,.0f} tokens/s (median step)")
    print(f"2 processes: {two:,.0f} tokens/s")
    print(f"scaling efficiency = {two:,.0f} / (2 x {one:,.0f}) = {two / (2 * one):.2f}")
    print(f"largest per-step loss difference, 1 vs 2 processes (float rounding, amplified): {drift:.2e}")


if __name__ == "__main__":
    main()
