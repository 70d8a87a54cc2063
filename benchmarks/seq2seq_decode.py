"""Seq2seq decoding speed: ``lmlab.load(dir).translate`` vs ``transformers`` ``generate``, one process.

A Marian model of opus-mt-en-de's shape (d 512, 6+6 layers, 8 heads, FFN 2048, vocabulary
58,101) with random weights (seed 0) is saved as a Hugging Face folder with a word-level
``tokenizer.json`` (word ``w{i}`` is id i; a source ends with EOS), loaded by both sides and
decoded from the same 32-token sources, exactly 64 new tokens (EOS forbidden before that
on both sides: ``min_new_tokens=64``): greedy batch 1, beam 4 batch 1, greedy batch 16, in
fp32 and bf16. Each side is warmed up first (4 tokens of each case: the one-time packed and
screened copies); rounds alternate which side goes first; figures are medians over rounds,
and the token ids of the two sides are checked to be identical.

Each round also measures the machine's memory bandwidth (``torch.sum`` over 1 GB, best of
5). A decoding step reads every decoder weight and the output layer once, so

    roofline = (encoder bytes + new tokens × step bytes) / bandwidth

is the least time an implementation that reads fp32 weights can take at batch 1, and
transformers' time ÷ roofline the largest ratio such an implementation could show against
it: the script prints both, with the fraction of the roofline each side reaches. lmlab's
greedy fp32 steps read the output layer as an int8 copy (bf16 on CPUs without VNNI/AMX): a
screen whose few candidates are rescored exactly in fp32, the same tokens (:mod:`lmlab.nn.screen`),
a quarter of its bytes: their own, lower roofline is printed too.

    .venv/bin/python benchmarks/seq2seq_decode.py               # 3 rounds, ~5 min on 2 cores
    .venv/bin/python benchmarks/seq2seq_decode.py --rounds 1 --dtypes fp32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import lmlab  # first: lmlab sets the OpenMP spin policy before torch loads

lmlab._spin_for_decoding()  # OpenMP's default spin, as `lmlab translate` uses (both sides share it)

CASES = {"greedy b1": (1, 1), "beam4 b1": (4, 1), "greedy b16": (1, 16)}


def make_folder(root: Path) -> Path:
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    V = 58101
    cfg = transformers.MarianConfig(
        vocab_size=V, d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
        decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048, max_position_embeddings=512,
        activation_function="swish", scale_embedding=True, pad_token_id=V - 1, eos_token_id=0,
        decoder_start_token_id=V - 1, forced_eos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.MarianMTModel(cfg).eval()
    folder = root / "marian-en-de-shape"
    model.save_pretrained(folder)
    g = json.loads((folder / "generation_config.json").read_text())
    g.pop("forced_eos_token_id", None)
    (folder / "generation_config.json").write_text(json.dumps(g))
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(V)}, unk_token="w1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A w0", special_tokens=[("w0", 0)])
    tok.save(str(folder / "tokenizer.json"))
    return folder


def weight_bytes(*modules) -> int:
    """Bytes of the distinct parameters of ``modules`` (a tied weight counted once)."""
    seen, n = set(), 0
    for m in modules:
        for t in m.parameters() if hasattr(m, "parameters") else [m]:
            if id(t) not in seen:
                seen.add(id(t))
                n += t.numel() * t.element_size()
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--source-tokens", type=int, default=32)
    a = ap.parse_args()

    import torch
    import transformers
    from roofline import memory_bandwidth  # (imports torch: after lmlab)

    from lmlab.nn import screen

    torch.set_num_threads(os.cpu_count() or 2)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}, "
          f"load {os.getloadavg()}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_folder(Path(tmp))
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(2, 58000, (16, a.source_tokens - 1), generator=g)
        texts = [" ".join(f"w{i}" for i in row.tolist()) for row in ids]
        full = torch.cat([ids, torch.zeros(16, 1, dtype=torch.long)], dim=1)  # + EOS
        n = a.new_tokens
        big = torch.ones(2**28)  # 1 GB: far beyond any cache
        for dtype in a.dtypes.split(","):
            tdt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
            ours = lmlab.load(folder, dtype=dtype)
            theirs = transformers.AutoModelForSeq2SeqLM.from_pretrained(folder, dtype=tdt).eval()
            net = ours.module  # what a step reads: the decoder's layers but the cross-attention's keys and
            # values of the source (computed once per source), its norms, the output layer
            kv = [p for layer in net.decoder for p in layer.cross.kv.parameters()]
            step = weight_bytes(*net.decoder, *[m for m in (net.dec_norm, net.dec_emb_norm) if m is not None],
                                net.lm_head, *([net.logits_bias] if net.logits_bias is not None else [])) - \
                weight_bytes(*kv)
            enc = weight_bytes(*net.encoder, *kv)
            head = weight_bytes(net.lm_head)
            bws: list[float] = []
            for beams, batch in CASES.values():  # warm-up: one-time work (packed and screened copies)
                ours.translate(texts[:batch], batch_size=batch, max_new_tokens=4, num_beams=beams)
                with torch.inference_mode():
                    theirs.generate(full[:batch], do_sample=False, max_new_tokens=4, num_beams=beams)
            for case, (beams, batch) in CASES.items():
                opts = dict(max_new_tokens=n, min_new_tokens=n, num_beams=beams)
                times: dict[str, list[float]] = {"lmlab": [], "transformers": []}
                same = True
                for r in range(a.rounds):
                    bws.append(memory_bandwidth(big))
                    order = ["lmlab", "transformers"] if r % 2 == 0 else ["transformers", "lmlab"]
                    out = {}
                    for side in order:
                        t0 = time.perf_counter()
                        if side == "lmlab":
                            res = ours.translate(texts[:batch], return_details=True, batch_size=batch, **opts)
                            out[side] = [x.token_ids for x in res]
                        else:
                            with torch.inference_mode():
                                seq = theirs.generate(full[:batch], do_sample=False, **opts)
                            out[side] = [row[1:].tolist() for row in seq]
                        times[side].append(time.perf_counter() - t0)
                    same = same and out["lmlab"] == out["transformers"]
                ml, mt = statistics.median(times["lmlab"]), statistics.median(times["transformers"])
                tok_s = batch * n / ml
                print(f"{dtype} {case:11s} lmlab {ml:6.2f} s ({tok_s:6.1f} tok/s)  transformers {mt:6.2f} s  "
                      f"ratio {mt / ml:4.2f}x  identical tokens: {same}")  # fmt: skip
                bw = statistics.median(bws)
                roof = (enc + n * step) / (bw * 1e9)
                print(f"     {'':11s} roofline {roof:5.2f} s ({step / 1e6:.0f} MB a step at {bw:.1f} GB/s): "
                      f"lmlab at {roof / ml:4.0%} of it, transformers at {roof / mt:4.0%}; "
                      f"largest possible ratio {mt / roof:4.2f}x")  # fmt: skip
                if dtype == "fp32" and beams == 1:  # lmlab screens the output layer (lmlab.nn.screen)
                    kind, share = ("int8", 1 / 4) if screen.int8_screen() else ("bf16", 1 / 2)
                    own = (enc + n * (step - head * (1 - share))) / (bw * 1e9)
                    print(f"     {'':11s} lmlab's greedy reads the output layer in {kind} (screen, then exact fp32 "
                          f"rescoring): its roofline {own:5.2f} s, lmlab at {own / ml:4.0%} of it")  # fmt: skip
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
