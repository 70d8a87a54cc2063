"""Decoding speed: ``lmlab.load(dir).generate`` vs Hugging Face ``generate``, same weights, one process.

A GPT-2 124M architecture (``--shape qwen2-0.5b``: Qwen2-0.5B's, 494M parameters: 24 layers,
d 896, 14 query and 2 key/value heads, SwiGLU 4,864, vocabulary 151,936, tied output
layer) with random weights (seed 0) is saved as a Hugging Face folder,
loaded by both sides, and decoded greedily: a 32-token prompt, exactly 128 new tokens
(no EOS on either side), batch 1 and batch 8, fp32 and bf16. Rounds alternate the two
sides (lmlab first in even rounds, Hugging Face first in odd ones) so that drift on a
shared machine hits both; the figures are medians over rounds and the greedy tokens of
the two sides are checked to be identical. Also measured:

- the machine's memory bandwidth, in the same run: ``torch.sum`` over a 1 GB float32
  tensor, best of 5, at the start of every round; decoding at batch 1 reads every weight
  once per token, so  achieved bandwidth = weight bytes × tokens/s  and its fraction of
  the measured bandwidth says how close decoding is to its bound;
- prefill: the time to the first new token after a 512-token prompt, both sides;
- ``--quantize int8`` / ``int4``: lmlab's weight-only int8 (int4) model, its speed and its logits error
  against the fp32 model;
- ``--bf16-screen``: lmlab bf16 also with ``screen_output = True`` (greedy reads the output layer
  through an int8 copy of it; off by default for bf16 weights, the copy costing memory), and
  the quantized model's ratio to both.

    .venv/bin/python benchmarks/decode.py                          # 3 rounds, ~6 min on 2 cores
    .venv/bin/python benchmarks/decode.py --rounds 1 --new-tokens 32 --quantize int8
    .venv/bin/python benchmarks/decode.py --shape qwen2-0.5b --new-tokens 64    # ~10 min, 7 GB of memory
    .venv/bin/python benchmarks/decode.py --omp-wait-policy passive   # re-runs itself with it set
    .venv/bin/python benchmarks/decode.py --shape qwen2-0.5b --dtypes bf16 --batches 1 --quantize int8 --bf16-screen

OpenMP threads spin after each parallel region; on a busy 2-core machine a spinning
thread takes the core the other thread needs, and a decode step (~60 parallel regions)
can become many times slower. lmlab, imported before torch, shortens libgomp's spin
(GOMP_SPINCOUNT=1000) unless OMP_WAIT_POLICY is set; the script imports it first, so both
sides run with that. ``--omp-wait-policy passive|active`` sets ``OMP_WAIT_POLICY`` instead
(before torch loads: the script re-executes itself); the settings are printed with the results.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--shape", choices=["gpt2-124m", "qwen2-0.5b"], default="gpt2-124m")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quantize", choices=["none", "int8", "int4"], default="none", help="also time lmlab int8 / int4")
    p.add_argument("--bf16-screen", action="store_true",
                   help="also time lmlab bf16 with screen_output = True (the output layer's int8 copy: +14%% memory on Qwen)")
    p.add_argument("--omp-wait-policy", choices=["inherit", "passive", "active"], default="inherit")
    p.add_argument("--json", default=None, help="also write the results to this file")
    return p.parse_args()


ARGS = parse_args()
if (
    ARGS.omp_wait_policy != "inherit"
    and os.environ.get("OMP_WAIT_POLICY", "").lower() != ARGS.omp_wait_policy
):
    env = {**os.environ, "OMP_WAIT_POLICY": ARGS.omp_wait_policy.upper()}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)  # libgomp reads it when torch loads

import json  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# lmlab before torch: its OpenMP default (a short spin, lmlab/__init__.py) then holds for both sides
import lmlab  # noqa: E402, I001
import torch  # noqa: E402, I001
from roofline import memory_bandwidth  # noqa: E402, I001

VOCAB = {"gpt2-124m": 50257, "qwen2-0.5b": 151936}[ARGS.shape]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------- setup
def byte_tokenizer(vocab_size: int):
    """A byte-level BPE with GPT-2's vocabulary size and no merges: each ASCII character of a
    prompt is one token, so a prompt of n letters is n tokens on both sides."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    while len(vocab) < vocab_size - 1:
        vocab[f"Ġw{len(vocab)}"] = len(vocab)
    vocab["<|endoftext|>"] = vocab_size - 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def make_model_dir(tmp: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    folder = tmp / f"{ARGS.shape}-random"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if ARGS.shape == "qwen2-0.5b":
            from transformers import Qwen2Config, Qwen2ForCausalLM

            cfg = Qwen2Config(
                vocab_size=VOCAB, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                tie_word_embeddings=True, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
            )  # fmt: skip
            Qwen2ForCausalLM(cfg).save_pretrained(folder)
        else:
            GPT2LMHeadModel(GPT2Config()).save_pretrained(folder)
    byte_tokenizer(VOCAB).save(str(folder / "tokenizer.json"))
    return folder


def load_hf(folder: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()  # cast outside inference mode
    model.generation_config.eos_token_id = None  # exactly max_new_tokens, as lmlab with eos_token_id=[]
    model.generation_config.pad_token_id = VOCAB - 1
    return model


def prompts(n: int, length: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    return ["".join(rng.choice(letters) for _ in range(length)) for _ in range(n)]


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes one decoding step reads: every matrix, bias and norm weight once (a tied matrix
    once, as the output layer), but of the embedding tables only one row per token."""
    seen, n = set(), 0
    for m in module.modules():
        if isinstance(m, torch.nn.Embedding) or type(m).__name__.endswith("Positions"):
            continue
        for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]:
            if id(t) not in seen and t.dim() > 0 and not t.is_inference():
                seen.add(id(t))
                n += t.numel() * t.element_size()
    return n


# --------------------------------------------------------------------------- the two sides
def run_lmlab(model, texts: list[str], new: int) -> tuple[float, list[list[int]]]:
    t = time.perf_counter()
    out = model.generate(texts, max_new_tokens=new, temperature=0, eos_token_id=[], return_details=True)
    return time.perf_counter() - t, [r.token_ids for r in out]


def run_hf(model, ids: torch.Tensor, new: int) -> tuple[float, list[list[int]]]:
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new,
            min_new_tokens=new,
        )
    return time.perf_counter() - t, out[:, ids.shape[1] :].tolist()


def first_divergence(a: list[list[int]], b: list[list[int]]) -> str:
    for r, (x, y) in enumerate(zip(a, b)):
        for i, (s, t) in enumerate(zip(x, y)):
            if s != t:
                return f"row {r} token {i}: lmlab {s} vs HF {t}"
        if len(x) != len(y):
            return f"row {r}: lengths {len(x)} vs {len(y)}"
    return "identical"


def quantized_error(folder: Path, lm32, lm8, text: str, new: int) -> dict:
    """Logits of the int8 or int4 model against the fp32 one on every position of the prompt, and how
    many greedy tokens agree before the first difference."""
    ids = torch.tensor([lm32.encode(text)])
    a, b = lm32.logits(ids)[0].float(), lm8.logits(ids)[0].float()
    err = (a - b).abs()
    _, x = run_lmlab(lm32, [text], new)
    _, y = run_lmlab(lm8, [text], new)
    same = next((i for i, (s, t) in enumerate(zip(x[0], y[0])) if s != t), len(x[0]))
    return {
        "max_abs_err": err.max().item(),
        "mean_abs_err": err.mean().item(),
        "rel_err": (err.pow(2).mean().sqrt() / a.std()).item(),  # rms error / logits std
        "top1_agree": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
        "greedy_same_prefix": same,
    }


# --------------------------------------------------------------------------- main
def main() -> None:
    torch.set_num_threads(ARGS.threads)
    batches = [int(b) for b in ARGS.batches.split(",")]
    dtypes = ARGS.dtypes.split(",")
    new, P = ARGS.new_tokens, ARGS.prompt_tokens
    policy = os.environ.get("OMP_WAIT_POLICY", "(unset)")
    spin = os.environ.get("GOMP_SPINCOUNT", "(unset: libgomp's long spin)")
    print(f"{ARGS.shape}: torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY={policy}, "
          f"GOMP_SPINCOUNT={spin}")  # fmt: skip
    big = torch.ones(256 * 1024 * 1024)  # 1 GB float32

    with tempfile.TemporaryDirectory() as tmp:
        folder = make_model_dir(Path(tmp))
        models = {dt: (lmlab.load(str(folder), dtype=dt), load_hf(folder, DTYPES[dt])) for dt in dtypes}
        if ARGS.bf16_screen and "bf16" in dtypes:
            models["bf16+screen"] = (lmlab.load(str(folder), dtype="bf16"), None)
            models["bf16+screen"][0].module.screen_output = True
        Q = ARGS.quantize
        if Q != "none":
            models[Q] = (lmlab.load(str(folder), quantize=Q), None)
        # batch by batch, the quantized model right after the float ones: its ratio to lmlab
        # bf16 compares runs seconds apart (this machine drifts between fast and slow phases)
        cases = [(dt, b) for b in batches for dt in models]
        texts = {b: prompts(b, P, seed=b) for b in batches}
        ids = {b: torch.tensor([models[dtypes[0]][0].encode(t) for t in texts[b]]) for b in batches}
        assert all(x.shape == (b, P) for b, x in ids.items()), "prompt tokenization"
        long_text = prompts(1, ARGS.prefill_tokens, seed=99)

        for lm, hf in models.values():  # warm-up: one-time work (packed and screened copies, first calls)
            run_lmlab(lm, texts[batches[0]], 4)
            if hf is not None:
                run_hf(hf, ids[batches[0]], 4)
        times: dict[tuple, list[float]] = {}
        bws: list[float] = []
        checks: dict[tuple, str] = {}
        for r in range(ARGS.rounds):
            bws.append(memory_bandwidth(big))
            for dt, b in cases:
                lm, hf = models[dt]
                order = ["lmlab", "hf"] if r % 2 == 0 else ["hf", "lmlab"]
                toks = {}
                for side in order:
                    if side == "hf" and hf is None:
                        continue
                    if side == "lmlab":
                        sec, toks[side] = run_lmlab(lm, texts[b], new)
                    else:
                        sec, toks[side] = run_hf(hf, ids[b], new)
                    times.setdefault((dt, b, side), []).append(b * new / sec)
                if hf is not None:
                    checks[(dt, b)] = first_divergence(toks["lmlab"], toks["hf"])
            for dt in dtypes:  # prefill: time to the first token after a long prompt
                lm, hf = models[dt]
                pid = torch.tensor([lm.encode(long_text[0])])
                for side in ["lmlab", "hf"] if r % 2 == 0 else ["hf", "lmlab"]:
                    sec = run_lmlab(lm, long_text, 1)[0] if side == "lmlab" else run_hf(hf, pid, 1)[0]
                    times.setdefault((dt, "prefill", side), []).append(sec)
            if Q != "none":
                sec = run_lmlab(models[Q][0], long_text, 1)[0]
                times.setdefault((Q, "prefill", "lmlab"), []).append(sec)
            print(f"round {r + 1}/{ARGS.rounds} done (bandwidth {bws[-1]:.1f} GB/s)", file=sys.stderr)

        med = {k: statistics.median(v) for k, v in times.items()}
        bw = statistics.median(bws)
        results: dict = {
            "omp_wait_policy": policy,
            "gomp_spincount": spin,
            "threads": ARGS.threads,
            "bandwidth_GBps": bws,
            "cases": [],
        }
        print(f"\nmemory bandwidth (sum over 1 GB, best of 5): median {bw:.1f} GB/s, range "
              f"{min(bws):.1f}-{max(bws):.1f} over {len(bws)} rounds")  # fmt: skip
        print(f"\n{'case':<14}{'lmlab tok/s':>12}{'HF tok/s':>10}{'ratio':>8}   tokens    lmlab GB/s  of bw")
        for dt, b in cases:
            lm_tps = med[(dt, b, "lmlab")]
            hf_tps = med.get((dt, b, "hf"))
            wb = weight_bytes(models[dt][0].module)
            ach = wb * lm_tps / b / 1e9  # each step reads the weights once for the whole batch
            row = {"dtype": dt, "batch": b, "lmlab_tps": lm_tps, "hf_tps": hf_tps, "achieved_GBps": ach}
            row["rounds"] = {side: times.get((dt, b, side)) for side in ("lmlab", "hf")}
            ratio = f"{lm_tps / hf_tps:7.2f}x" if hf_tps else f"{'':>8}"
            check = checks.get((dt, b), "-")
            tag = "same" if check == "identical" else ("-" if check == "-" else "DIFFER")
            print(f"{dt + ' b' + str(b):<14}{lm_tps:>12.1f}{(hf_tps or 0):>10.1f}{ratio}   {tag:<8}"
                  f"{ach:>10.1f}  {ach / bw:5.0%}")  # fmt: skip
            if (dt, b, "hf") in times:
                rounds = "  ".join(f"{x:.1f}/{y:.1f}" for x, y in zip(times[(dt, b, "lmlab")], times[(dt, b, "hf")]))
                print(f"    rounds, lmlab/HF tok/s: {rounds}")
            else:
                print(f"    rounds, lmlab tok/s: {'  '.join(f'{x:.1f}' for x in times[(dt, b, 'lmlab')])}")
            for ref in ("bf16", "bf16+screen") if dt == Q else ():
                if base := times.get((ref, b, "lmlab")):
                    # the measure: the quantized model against lmlab bf16, round by round
                    # (the two ran minutes apart at most, in the same phase of the machine)
                    per = [x / y for x, y in zip(times[(dt, b, "lmlab")], base)]
                    row["vs_lmlab_" + ref] = per
                    print(f"    {dt} / lmlab {ref}: median {statistics.median(per):.2f}x, rounds "
                          f"{'  '.join(f'{x:.2f}x' for x in per)}")  # fmt: skip
            if tag == "DIFFER":
                print(f"    first difference: {check}")
            row["tokens"] = check
            results["cases"].append(row)
        print(f"\n{'prefill ' + str(ARGS.prefill_tokens):<14}{'lmlab s':>12}{'HF s':>10}{'HF/lmlab':>9}")
        for dt in [*dtypes, *([Q] if Q != "none" else [])]:
            a, h = med[(dt, "prefill", "lmlab")], med.get((dt, "prefill", "hf"))
            print(f"{dt:<14}{a:>12.3f}{(h or 0):>10.3f}" + (f"{h / a:8.2f}x" if h else ""))
            results["cases"].append(
                {"dtype": dt, "prefill_tokens": ARGS.prefill_tokens, "lmlab_s": a, "hf_s": h}
            )
        if Q != "none" and "fp32" in models:
            err = quantized_error(folder, models["fp32"][0], models[Q][0], texts[1][0], new)
            results[f"{Q}_error"] = err
            print(f"\n{Q} vs fp32 logits ({P} positions): max |err| {err['max_abs_err']:.4f}, rms err / "
                  f"logits std {err['rel_err']:.4f}, top-1 agreement {err['top1_agree']:.0%}; greedy "
                  f"tokens identical for the first {err['greedy_same_prefix']} of {new}")  # fmt: skip
        if ARGS.json:
            Path(ARGS.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
