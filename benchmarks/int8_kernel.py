"""lmlab's decoding kernels (int8 and bf16), one product at a time: the weights of decoding, cache-cold.

A decoding step reads each weight once from memory, so what matters is how fast a kernel
streams a weight it has not seen for a while. Each case multiplies ``rows`` rows of x by
enough different weights of one shape (~600 MB in all, far past the caches) in turn, and
reports the best of ``--rounds`` passes per product and as GB/s of the weight's bytes:

- lmlab's kernel (``lmlab.nn.native``) on the codes blocked in its order, as an int8 layer
  holds them;
- bf16 ``F.linear`` on oneDNN's packed weight (what a bf16 model decodes with where lmlab's
  bf16 kernel is not built);
- lmlab's bf16 kernel (``lmlab.nn.native_packed``, CPUs with AVX-512 BF16) on W packed in its
  order, as a bf16 layer holds it while decoding;
- ``torch._weight_int8pack_mm``, PyTorch's int8-weight kernel (what int8 used before);

and the machine's bandwidth (``torch.sum`` over 1 GB) at the start of each round.

    .venv/bin/python benchmarks/int8_kernel.py               # Qwen2-0.5B's and GPT-2's shapes, 1 and 8 rows, ~1 min
    .venv/bin/python benchmarks/int8_kernel.py --rows 1 --shapes 4864x896
    .venv/bin/python benchmarks/int8_kernel.py --fp32    # and fp32: oneDNN vs lmlab's packed fp32 kernel
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lmlab  # noqa: E402, F401, I001  (before torch: lmlab sets libgomp's spin)
import torch  # noqa: E402, I001
from roofline import memory_bandwidth  # noqa: E402

from lmlab.nn import native, native_packed  # noqa: E402
from lmlab.nn.int8 import quantize_rows  # noqa: E402

SHAPES = "9728x896,4864x896,896x4864,1152x896,896x896,151936x896,2304x768,3072x768,768x3072"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=SHAPES, help="comma-separated out×in (Qwen2-0.5B's, then GPT-2's)")
    p.add_argument("--rows", default="1,8", help="comma-separated rows of x (batch)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--megabytes", type=int, default=600, help="int8 bytes of distinct weights per shape")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fp32", action="store_true", help="then fp32: oneDNN (W in place) vs lmlab's packed fp32 kernel")
    return p.parse_args()


def timed(fn, weights: list) -> float:  # noqa: ANN001 - a product of x with one weight
    t = time.perf_counter()
    for w in weights:
        fn(w)
    return (time.perf_counter() - t) / len(weights)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if not native.available():
        sys.exit("lmlab's int8 kernel is not built here (no g++, no AVX-512, or LMLAB_NATIVE=0)")
    big = torch.ones(256 << 20)
    print(f"torch {torch.__version__}, {args.threads} threads; best of {args.rounds} rounds, cache-cold")
    own16 = native_packed.available()
    print(f"{'rows':>4} {'weight':>12} {'lmlab int8':>18} {'bf16 F.linear':>18} {'_weight_int8pack_mm':>20}  int8/bf16"
          f"{'':>3}{'lmlab bf16':>18}  lmlab/oneDNN bf16")  # fmt: skip
    bws = []
    for spec in args.shapes.split(","):
        n_out, n_in = map(int, spec.split("x"))
        count = max(2, args.megabytes * 10**6 // (n_out * n_in))
        torch.manual_seed(0)
        layers = []
        for _ in range(count):
            q, s = quantize_rows(torch.randn(n_out, n_in))
            w16 = (q.float() * s[:, None]).to(torch.bfloat16)
            own = native_packed.pack(w16) if own16 else None
            layers.append((native.block(q), s, q, torch.ops.mkldnn._reorder_linear_weight(w16, 1), own))
        ones = torch.ones(n_out, dtype=torch.bfloat16)
        for rows in map(int, args.rows.split(",")):
            x = torch.randn(rows, n_in)
            xb = x.to(torch.bfloat16)
            best = {"int8": [], "bf16": [], "pack": [], "own": [0.0]}
            for _ in range(args.rounds):
                bws.append(memory_bandwidth(big))
                best["int8"].append(timed(lambda L, x=x: native.int8_linear(x, L[0], L[1], None), layers))
                best["bf16"].append(
                    timed(lambda L, xb=xb: torch.ops.mkldnn._linear_pointwise(xb, L[3], None, "none", [], ""), layers)
                )
                best["pack"].append(timed(lambda L, xb=xb, ones=ones: torch._weight_int8pack_mm(xb, L[2], ones), layers))
                if own16:
                    best["own"].append(timed(lambda L, xb=xb: L[4](xb, None), layers))
            if own16:
                best["own"].remove(0.0)
            t = {k: min(v) for k, v in best.items()}

            def cell(sec: float, nbytes: int) -> str:
                return f"{sec * 1e3:7.3f} ms {nbytes / sec / 1e9:5.1f} GB/s"

            n = n_out * n_in
            print(f"{rows:>4} {spec:>12} {cell(t['int8'], n):>18} {cell(t['bf16'], 2 * n):>18} "
                  f"{cell(t['pack'], n):>20}  {t['bf16'] / t['int8']:6.2f}x"
                  + (f"   {cell(t['own'], 2 * n):>18}  {t['bf16'] / t['own']:6.2f}x" if own16 else ""))  # fmt: skip
        del layers
    if args.fp32:
        fp32_table(args, big, bws)
    print(f"\nmemory bandwidth (torch.sum over 1 GB, best of 5): median {statistics.median(bws):.1f} GB/s, "
          f"range {min(bws):.1f}-{max(bws):.1f}")  # fmt: skip


def fp32_table(args: argparse.Namespace, big: torch.Tensor, bws: list[float]) -> None:
    """fp32 products: oneDNN with W in place (what an fp32 model decoded with on AMD) against
    lmlab's fp32 kernel on W packed its way (``native_packed``, CPUs with AVX-512)."""
    if not native_packed.available(torch.float32):
        print("\nlmlab's fp32 kernel is not built here")
        return
    print(f"\n{'rows':>4} {'weight':>12} {'fp32 oneDNN':>18} {'lmlab fp32':>18}  lmlab/oneDNN")
    for spec in args.shapes.split(","):
        n_out, n_in = map(int, spec.split("x"))
        torch.manual_seed(0)
        plain = [torch.randn(n_out, n_in) for _ in range(max(2, args.megabytes * 10**6 // (4 * n_out * n_in)))]
        packed = [native_packed.pack(w) for w in plain]
        for rows in map(int, args.rows.split(",")):
            x = torch.randn(rows, n_in)
            dnn, own = [], []
            for _ in range(args.rounds):
                bws.append(memory_bandwidth(big))
                dnn.append(timed(lambda w, x=x: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""), plain))
                own.append(timed(lambda p, x=x: p(x, None), packed))
            a, b = min(dnn), min(own)
            n = 4 * n_out * n_in
            print(f"{rows:>4} {spec:>12} {a * 1e3:7.3f} ms {n / a / 1e9:5.1f} GB/s {b * 1e3:7.3f} ms {n / b / 1e9:5.1f} GB/s"
                  f"  {a / b:6.2f}x")  # fmt: skip
        del plain, packed


if __name__ == "__main__":
    main()
