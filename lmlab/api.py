"""The Python API: ``lmlab.load(path)`` -> :class:`Model` with ``generate`` and ``stream``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from lmlab.checkpoint import is_lmlab_checkpoint, load_weights, read_checkpoint, write_checkpoint
from lmlab.errors import LmlabError
from lmlab.generate import GenerationConfig, GenerationResult, generate_stream
from lmlab.models import build_model
from lmlab.models.base import LanguageModel
from lmlab.tokenizer import UnknownCharWarner

_DTYPES = {
    None: None,
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if isinstance(dtype, torch.dtype) or dtype is None:
        return dtype
    if dtype not in _DTYPES:
        raise LmlabError(f"unknown dtype {dtype!r} (use float32/fp32, bfloat16/bf16 or float16/fp16)")
    return _DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise LmlabError(f"unknown device {device!r}; use cpu, cuda, mps or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LmlabError("--device cuda was asked for but PyTorch sees no CUDA GPU; use --device cpu")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise LmlabError("--device mps was asked for but this machine has no MPS; use --device cpu")
    return dev


class Model:
    """A language model with its tokenizer: what ``lmlab.load`` returns."""

    def __init__(
        self,
        module: LanguageModel,
        tokenizer: Tokenizer,
        generation_config: dict[str, Any] | None = None,
        source: str = "",
    ) -> None:
        self.module = module.eval()
        self.tokenizer = tokenizer
        self.generation_config = dict(generation_config or {})
        self.source = source
        self._unk = UnknownCharWarner(tokenizer)
        # Inference on the CPU runs every matrix product on oneDNN (lmlab.nn.layers.Linear:
        # no-grad forwards only, so training this module is unaffected): decoding and
        # whole-prompt forwards (prefill, eval) both read the weights faster.
        prepare = getattr(self.module, "prepare_decoding", None)
        if prepare is not None:
            prepare()

    @property
    def config(self) -> Any:
        return self.module.config

    # --------------------------------------------------------------- tokens
    def encode(self, text: str) -> list[int]:
        """Token ids as the tokenizer's own post-processor makes them (BOS or not)."""
        ids = self.tokenizer.encode(text).ids
        self._unk.check(ids, text)  # a char tokenizer warns once about unseen characters
        if not ids:
            bos = self.generation_config.get("bos_token_id")
            if bos is not None:
                ids = [int(bos)]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _gen_config(self, **options: Any) -> GenerationConfig:
        return GenerationConfig.from_dict(self.generation_config, **options)

    # --------------------------------------------------------------- generation
    def generate_ids(self, prompt: str, **options: Any) -> list[int]:
        """The new token ids (the continuation only; the first sequence)."""
        result = self.generate(prompt, return_details=True, **options)
        return (result[0] if isinstance(result, list) else result).token_ids

    def generate(
        self, prompt: str | list[str], *, return_details: bool = False, **options: Any
    ) -> str | list[str] | GenerationResult | list[Any]:
        """The continuation of ``prompt``: str -> str, list[str] -> list[str] (a batch, left-padded;
        each row as if alone). With ``num_return_sequences`` > 1, a list per prompt; with
        ``return_details=True``, :class:`~lmlab.generate.GenerationResult` objects (token ids,
        text, finish_reason, logprobs) instead of strings.

        Options (Hugging Face names): max_new_tokens, min_new_tokens, temperature (0 = greedy),
        top_k, top_p, min_p, typical_p, repetition_penalty, presence_penalty, frequency_penalty,
        no_repeat_ngram_size, bad_words, num_beams, length_penalty, early_stopping,
        num_return_sequences, stop, logprobs, seed, eos_token_id.
        """
        single = isinstance(prompt, str)
        if not single and not (isinstance(prompt, list) and all(isinstance(p, str) for p in prompt)):
            raise LmlabError(f"prompt must be a str or a list of str, not {type(prompt).__name__}")
        prompts = [prompt] if single else prompt
        cfg = self._gen_config(**options)
        if not prompts:
            return []
        n = cfg.num_return_sequences
        results: list[Any] = [None] * (len(prompts) * n)
        for i, _, res in generate_stream(self.module, self.tokenizer, [self.encode(p) for p in prompts], cfg):
            if res is not None:
                results[i] = res
        out = results if return_details else [r.text for r in results]
        per_prompt = [out[i * n : (i + 1) * n] for i in range(len(prompts))] if n > 1 else out
        return per_prompt[0] if single else per_prompt

    def stream(self, prompt: str, **options: Any) -> Iterator[str]:
        """Text deltas as tokens are produced; ``''.join(stream(p)) == generate(p)``.

        A delta never shows an incomplete UTF-8 character or text a stop string later takes
        back. Beam search yields its best sequence whole, at the end.
        """
        if not isinstance(prompt, str):
            raise LmlabError(
                f"stream takes one prompt (a str), not {type(prompt).__name__}; "
                "for several prompts call generate with a list"
            )
        cfg = self._gen_config(**options)
        if cfg.num_return_sequences > 1:
            raise LmlabError("stream gives one sequence; for num_return_sequences > 1 call generate")
        for _, delta, _ in generate_stream(self.module, self.tokenizer, [self.encode(prompt)], cfg):
            if delta:
                yield delta

    # --------------------------------------------------------------- scoring
    @torch.inference_mode()
    def logits(self, ids: torch.Tensor | list[int]) -> torch.Tensor:
        """Next-token logits at every position of ``ids`` (B, T, vocab)."""
        if not isinstance(ids, torch.Tensor):
            ids = torch.tensor([ids])
        logits, _ = self.module(ids.to(self.module.device))
        return logits

    def save(self, path: str | Path) -> Path:
        if getattr(self.module, "quantization", None):
            raise LmlabError(
                f"this model is {self.module.quantization}-quantized and lmlab saves float checkpoints "
                "only; save the float model and quantize when loading (lmlab.load(path, quantize=...))"
            )
        return write_checkpoint(path, self.module, self.tokenizer, self.generation_config)

    def __repr__(self) -> str:
        n = self.module.num_parameters()
        return f"Model({type(self.module).__name__}, {n / 1e6:.2f}M parameters, from {self.source!r})"


def load(
    path: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    allow_pickle: bool = False,
    quantize: str | None = None,
) -> Model:
    """Load an lmlab checkpoint folder. dtype defaults to float32 on CPU.

    Anything that is not an lmlab checkpoint (a Hugging Face model folder, a Hub id)
    goes to :func:`lmlab.hf.load_hf`; ``allow_pickle`` lets it read a pickle
    ``pytorch_model.bin`` (with ``torch.load(weights_only=True)``). ``quantize="int8"``
    stores the linear layers' weights in int8 (see :mod:`lmlab.quantize`): faster CPU
    decoding, logits within about 1% of the float model's.
    """
    from lmlab.quantize import quantize_model, resolve_quantize

    method = resolve_quantize(quantize)  # a bad value fails before anything is read
    if not is_lmlab_checkpoint(Path(path)) and _looks_foreign(path):
        from lmlab.hf import load_hf

        model = load_hf(str(path), dtype=dtype, device=device, allow_pickle=allow_pickle)
        if method is not None:
            quantize_model(model.module, method)
        return model
    cfg, tensors, tok, gen = read_checkpoint(path)
    dev = resolve_device(device) if device is not None else torch.device("cpu")
    dt = resolve_dtype(dtype) or torch.float32
    with torch.device("meta"):
        module = build_model(cfg)
    module = module.to_empty(device="cpu")  # allocate, uninitialised: the weights come next
    if hasattr(module, "tie_weights"):
        module.tie_weights()  # to_empty gives each parameter its own storage
    _reinit_buffers(module)
    load_weights(module, tensors, str(path))
    module = module.to(device=dev, dtype=dt)
    if method is not None:
        quantize_model(module, method)
    return Model(module, tok, gen, source=str(path))


def _looks_foreign(path: str | Path) -> bool:
    """A Hugging Face folder (config.json without lmlab's marker) or a Hub id like 'gpt2'."""
    p = Path(path)
    if p.is_dir():
        return (p / "config.json").is_file()
    if not p.exists() and str(p.parent) not in ("", ".") and p.parent.is_dir():
        return False  # 'runs/typo': a local folder that is missing, not a Hub id
    return not p.exists() and not str(path).startswith((".", "/", "~")) and str(path).count("/") <= 1


def _reinit_buffers(module: LanguageModel) -> None:
    """Non-persistent buffers (RoPE and sinusoidal tables) are not in the checkpoint:
    rebuild them by constructing the small table modules again on the CPU."""
    from lmlab.nn.positional import RotaryEmbedding, SinusoidalPositions, sinusoidal_table

    for m in module.modules():
        if isinstance(m, RotaryEmbedding):
            fresh = RotaryEmbedding(m.rotary_dim, m.cos.shape[0], m.base)
            m.inv_freq, m.cos, m.sin = fresh.inv_freq, fresh.cos, fresh.sin
        elif isinstance(m, SinusoidalPositions):
            m.table = sinusoidal_table(*m.table.shape)
