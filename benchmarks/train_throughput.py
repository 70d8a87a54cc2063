"""Training throughput: lmlab's Transformer vs Hugging Face ``GPT2LMHeadModel``.

The same GPT-2 architecture on both sides (learned positions, LayerNorm with biases,
tanh-GELU MLP, biases, tied embeddings), dropout 0, fp32, the same AdamW
(``foreach=True``), forward + backward + optimizer step on the same batches, timed in
one process, alternating rounds so that machine drift hits both alike.

    .venv/bin/python benchmarks/train_throughput.py            # both shapes + bf16
    .venv/bin/python benchmarks/train_throughput.py --shape small --rounds 3
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from lmlab.models.config import TransformerConfig
from lmlab.models.transformer import Transformer

SHAPES = {
    # nanoGPT's CPU recipe shape
    "small": dict(n_layer=4, n_head=4, d_model=128, ctx=64, batch=12, vocab=65, steps=20),
    # GPT-2 small (124M) at batch 1 x context 256
    "gpt2": dict(n_layer=12, n_head=12, d_model=768, ctx=256, batch=1, vocab=50257, steps=3),
}


def lmlab_model(s: dict) -> Transformer:
    cfg = TransformerConfig(
        vocab_size=s["vocab"],
        n_layer=s["n_layer"],
        n_head=s["n_head"],
        d_model=s["d_model"],
        max_seq_len=max(s["ctx"], 1024 if s["vocab"] > 1000 else s["ctx"]),
        pos="learned",
        norm="layernorm",
        norm_bias=True,
        activation="gelu_tanh",
        gated_mlp=False,
        qkv_bias=True,
        proj_bias=True,
        mlp_bias=True,
        tie_embeddings=True,
        dropout=0.0,
    )
    return Transformer(cfg)


def hf_model(s: dict):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=s["vocab"],
        n_positions=max(s["ctx"], 1024 if s["vocab"] > 1000 else s["ctx"]),
        n_embd=s["d_model"],
        n_layer=s["n_layer"],
        n_head=s["n_head"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=False,
    )
    m = GPT2LMHeadModel(cfg)
    m.config._attn_implementation = "sdpa"
    return m


class Side:
    def __init__(self, name: str, model: torch.nn.Module, hf: bool, precision: str = "fp32") -> None:
        self.name, self.model, self.hf, self.precision = name, model.train(), hf, precision
        self.opt = torch.optim.AdamW(
            model.parameters(), lr=1e-4, betas=(0.9, 0.99), weight_decay=0.1, foreach=True
        )
        self.time = 0.0
        self.tokens = 0
        self.losses: list[float] = []

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            logits = self.model(x).logits if self.hf else self.model(x)[0]
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.time += time.perf_counter() - t0
        self.tokens += x.numel()
        self.losses.append(loss.item())

    @property
    def tok_s(self) -> float:
        return self.tokens / self.time


def compare(shape: str, rounds: int, sides: list[Side], s: dict) -> None:
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(s["vocab"], (s["batch"], s["ctx"] + 1), generator=g) for _ in range(s["steps"])]
    for side in sides:  # warm-up (allocator, oneDNN kernels), not timed
        for b in batches[:2]:
            side.step(b[:, :-1], b[:, 1:])
        side.time = side.tokens = 0
        side.losses.clear()
    for _ in range(rounds):
        for side in sides:
            for b in batches:
                side.step(b[:, :-1], b[:, 1:])
    base = sides[0]
    print(f"\n[{shape}] {s}")
    for side in sides:
        print(
            f"  {side.name:22s} {side.tok_s:10,.0f} tokens/s   ratio vs {base.name}: {side.tok_s / base.tok_s:.2f}x"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=["small", "gpt2", "all"], default="all")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    shapes = ["small", "gpt2"] if a.shape == "all" else [a.shape]
    for name in shapes:
        s = SHAPES[name]
        torch.manual_seed(0)
        hf = hf_model(s)
        ours = lmlab_model(s)
        n_hf = sum(p.numel() for p in hf.parameters())
        n_ours = ours.num_parameters()
        assert n_hf == n_ours, f"architectures differ: HF {n_hf:,} vs lmlab {n_ours:,} parameters"
        sides = [Side("HF GPT2LMHeadModel", hf, True), Side("lmlab fp32", ours, False)]
        if name == "gpt2":
            torch.manual_seed(0)
            ours_bf16 = lmlab_model(s)
            ours_bf16.load_state_dict(ours.state_dict())
            sides.append(Side("lmlab bf16 autocast", ours_bf16, False, "bf16"))
        compare(name, a.rounds, sides, s)
        if name == "gpt2":
            fp32, bf16 = sides[1].losses, sides[2].losses
            diff = max(abs(p - q) for p, q in zip(fp32, bf16))
            print(
                f"  bf16 vs fp32 loss curve ({len(fp32)} steps, same init and batches): "
                f"max |difference| {diff:.4f} (fp32 from {fp32[0]:.3f} to {fp32[-1]:.3f})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
