"""The Python API: ``lmlab.load(path)`` -> :class:`Model` with ``generate`` and ``stream``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from lmlab.errors import LmlabError
from lmlab.generate import GenerationConfig, GenerationResult, generate_stream
from lmlab.messages import warn
from lmlab.models.base import LanguageModel
from lmlab.models.loading import ModelParts, write_checkpoint
from lmlab.nn import fastpath
from lmlab.tokenizer import UnknownCharWarner

#: A prompt longer than this many characters per context token is cropped before tokenizing.
CROP_CHARS_PER_TOKEN = 64


class Model:
    """A language model with its tokenizer: what ``lmlab.load`` returns."""

    def __init__(
        self,
        module: LanguageModel,
        tokenizer: Tokenizer,
        generation_config: dict[str, Any] | None = None,
        source: str = "",
        target_tokenizer: Any = None,
    ) -> None:
        self.module = module.eval()
        self.tokenizer = tokenizer
        #: what decodes an encoder-decoder's output (Marian: its own SentencePiece model)
        self.target_tokenizer = target_tokenizer or tokenizer
        self.generation_config = dict(generation_config or {})
        self.source = source
        self._unk = UnknownCharWarner(tokenizer)
        # Inference on the CPU runs every matrix product on oneDNN (lmlab.nn.fastpath:
        # no-grad forwards only, so training this module is unaffected): decoding and
        # whole-prompt forwards (prefill, eval) both read the weights faster.
        fastpath.prepare(self.module)

    @classmethod
    def from_parts(cls, parts: ModelParts) -> Model:
        return cls(
            parts.module, parts.tokenizer, parts.generation_config, source=parts.source,
            target_tokenizer=parts.target_tokenizer,
        )  # fmt: skip

    @property
    def is_encoder_decoder(self) -> bool:
        """A translator/summarizer (source -> target) rather than a language model."""
        return bool(getattr(self.module, "is_encoder_decoder", False))

    @property
    def config(self) -> Any:
        return self.module.config

    # --------------------------------------------------------------- tokens
    def encode(self, text: str) -> list[int]:
        """Token ids as the tokenizer's own post-processor makes them (BOS or not)."""
        if not isinstance(text, str):
            raise LmlabError(f"the text to encode must be a str, not {type(text).__name__}")
        ctx = getattr(self.config, "max_seq_len", None) if self.module.bounded_context else None
        if ctx and len(text) > CROP_CHARS_PER_TOKEN * ctx:
            # The model reads only its last ctx tokens, and a token spans far fewer characters
            # than this: tokenizing more (~400 bytes of memory per character) buys nothing.
            text = text[-CROP_CHARS_PER_TOKEN * ctx :]
        ids = self.tokenizer.encode(_valid_unicode(text)).ids
        self._unk.check(ids, text)  # a char tokenizer warns once about unseen characters
        if not ids:
            bos = self.generation_config.get("bos_token_id")
            if bos is not None:
                ids = [int(bos)]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _gen_config(self, **options: Any) -> GenerationConfig:
        where = f"{self.source}/generation_config.json" if self.source else "the model's generation settings"
        return GenerationConfig.from_dict(self.generation_config, where=where, **options)

    def _assistant(self, assistant: Model | str | None) -> Any:
        """The draft model's module for speculative decoding: a loaded model or a path to load,
        with this model's tokenizer (the same token ids for the same text)."""
        if assistant is None:
            return None
        if isinstance(assistant, (str, Path)):
            assistant = load(str(assistant), device=str(self.module.device))
        if not isinstance(assistant, Model):
            raise LmlabError(f"assistant_model must be an lmlab model or its path, not {type(assistant).__name__}")
        if assistant.is_encoder_decoder or assistant.module is self.module or getattr(assistant.config, "head", None) is not None:
            raise LmlabError("the assistant (draft) model must be a second, smaller decoder-only language model")
        if assistant.tokenizer.get_vocab() != self.tokenizer.get_vocab():
            raise LmlabError(
                "the assistant (draft) model has another tokenizer: speculative decoding needs the same token ids for "
                "the same text (train the draft with --tokenizer MODEL/tokenizer.json)"
            )
        return assistant.module

    # --------------------------------------------------------------- generation
    def generate_ids(self, prompt: str, **options: Any) -> list[int]:
        """The new token ids (the continuation only; the first sequence)."""
        result = self.generate(prompt, return_details=True, **options)
        return (result[0] if isinstance(result, list) else result).token_ids

    def generate(
        self,
        prompt: str | list[str],
        *,
        return_details: bool = False,
        assistant_model: Model | str | None = None,
        **options: Any,
    ) -> str | list[str] | GenerationResult | list[Any]:
        """The continuation of ``prompt``: str -> str, list[str] -> list[str] (a batch, left-padded;
        each row as if alone). With ``num_return_sequences`` > 1, a list per prompt; with
        ``return_details=True``, :class:`~lmlab.generate.GenerationResult` objects (token ids,
        text, finish_reason, logprobs) instead of strings.

        Options (Hugging Face names): max_new_tokens, min_new_tokens, temperature (0 = greedy),
        top_k, top_p, min_p, typical_p, repetition_penalty, presence_penalty, frequency_penalty,
        no_repeat_ngram_size, bad_words, num_beams, length_penalty, early_stopping,
        num_return_sequences, stop, logprobs, seed, eos_token_id; speculative decoding (one
        prompt, a Transformer): prompt_lookup_num_tokens (+ max_matching_ngram_size), or
        assistant_model (a smaller model with the same tokenizer, or its path) guessing
        num_assistant_tokens at a time — the same greedy output, in fewer passes.
        """
        single = isinstance(prompt, str)
        if not single and not (isinstance(prompt, list) and all(isinstance(p, str) for p in prompt)):
            bad = next((p for p in prompt if not isinstance(p, str)), None) if isinstance(prompt, list) else prompt
            where = f"item {prompt.index(bad)} of the list is" if isinstance(prompt, list) else "it is"
            raise LmlabError(
                f"prompt must be a str or a list of str; {where} {type(bad).__name__} {bad!r}"[:300]
            )
        prompts = [prompt] if single else prompt
        self._refuse_task_head("text generation")
        if self.is_encoder_decoder:  # text-to-text: the prompt is the source
            if assistant_model is not None:
                options["assistant_model"] = assistant_model
            return self.translate(prompt, return_details=return_details, prefix="", **options)
        cfg = self._gen_config(**options)
        draft = self._assistant(assistant_model)
        if not prompts:
            return []
        n = cfg.num_return_sequences
        results: list[Any] = [None] * (len(prompts) * n)
        encoded = [self.encode(p) for p in prompts]
        for i, _, res in generate_stream(self.module, self.tokenizer, encoded, cfg, draft=draft):
            if res is not None:
                results[i] = res
        out = results if return_details else [r.text for r in results]
        per_prompt = [out[i * n : (i + 1) * n] for i in range(len(prompts))] if n > 1 else out
        return per_prompt[0] if single else per_prompt

    def translate(
        self,
        text: str | list[str],
        *,
        return_details: bool = False,
        prefix: str | None = None,
        task: str = "translation",
        batch_size: int = 16,
        on_batch: Any = None,
        **options: Any,
    ) -> str | list[str] | list[Any]:
        """Translate (or summarize: any text-to-text) with an encoder-decoder: str -> str,
        list -> list, row by row what each source gives alone.

        Deterministic unless sampling is asked for (``do_sample=True`` or a temperature > 0):
        greedy, or beam search with ``num_beams`` > 1 — as ``transformers`` decides. Defaults
        come from the model's generation settings (T5: also its task prefix and settings for
        ``task``). Options are :meth:`generate`'s.
        """
        from lmlab.generate.seq2seq import Seq2SeqRequest

        single = isinstance(text, str)
        texts = [text] if single else text
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise LmlabError(f"text must be a str or a list of str, not {type(text).__name__}")
        self._refuse_task_head("translation and summarization")
        if not self.is_encoder_decoder:
            raise LmlabError(
                f"{self.source or 'this model'} is a language model, not an encoder-decoder: translation and "
                "summarization need a seq2seq model (trained with --task translate, or Marian/BART/T5)"
            )
        if options.get("assistant_model") is not None or options.get("prompt_lookup_num_tokens") is not None:
            raise LmlabError(
                "speculative decoding (prompt_lookup_num_tokens, assistant_model) is for decoder-only models; "
                "an encoder-decoder decodes without it (drop the option)"
            )
        req = Seq2SeqRequest(self.module, self.tokenizer, self.target_tokenizer, self.generation_config, task, prefix)
        results = req.run([_valid_unicode(t) for t in texts], batch_size=batch_size, on_batch=on_batch, **options)
        out = [[r if return_details else r.text for r in rs] for rs in results]
        flat = [rs[0] if len(rs) == 1 else rs for rs in out]
        return flat[0] if single else flat

    def _refuse_task_head(self, what: str) -> None:
        head = getattr(self.config, "head", None)
        if head is not None:
            kind, use = {"classify": ("a text classifier", "lmlab.pipeline('sentiment-analysis', ...) or `lmlab classify`"),
                         "span": ("a question-answering model", "lmlab.pipeline('question-answering', ...) or `lmlab qa`"),
                         "mlm": ("an encoder pretrained by masked-token prediction (--task mlm)",
                                 "it as a starting point: `lmlab train --task classify|qa --init RUN`")}[head]  # fmt: skip
            raise LmlabError(f"{self.source or 'this model'} is {kind}, which does not write text ({what}); use {use}")

    def stream(self, prompt: str, *, assistant_model: Model | str | None = None, **options: Any) -> Iterator[str]:
        """Text deltas as tokens are produced; ``''.join(stream(p)) == generate(p)``.

        A delta never shows an incomplete UTF-8 character or text a stop string later takes
        back. Beam search yields its best sequence whole, at the end.
        """
        if not isinstance(prompt, str):
            raise LmlabError(
                f"stream takes one prompt (a str), not {type(prompt).__name__}; "
                "for several prompts call generate with a list"
            )
        self._refuse_task_head("text generation")
        if self.is_encoder_decoder:  # text-to-text: the source's whole target text, as one delta
            if options.get("return_details") or (options.get("num_return_sequences") or 1) > 1:
                raise LmlabError("stream gives one text; for num_return_sequences > 1 or details call generate")
            text = self.generate(prompt, assistant_model=assistant_model, **options)
            if text:
                yield text
            return
        cfg = self._gen_config(**options)
        if cfg.num_return_sequences > 1:
            raise LmlabError("stream gives one sequence; for num_return_sequences > 1 call generate")
        draft = self._assistant(assistant_model)
        for _, delta, _ in generate_stream(self.module, self.tokenizer, [self.encode(prompt)], cfg, draft=draft):
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

    # --------------------------------------------------------------- looking inside (lmlab viz draws these)
    def tokens(self, text: str) -> list[str]:
        """The tokens of ``text`` as the model reads them, each as its own text."""
        from lmlab.inspection import token_strings

        return token_strings(self, self.encode(text))

    def attention(self, text: str) -> torch.Tensor:
        """Self-attention weights softmax(QKᵀ/√d + M) over ``text``: (layers, heads, T, T), as
        transformers' ``output_attentions`` (an encoder-decoder's: its encoder's)."""
        from lmlab.inspection import attention

        return attention(self, text).weights

    def cross_attention(self, source: str, target: str | None = None) -> torch.Tensor:
        """An encoder-decoder's attention of each target token over the source: (layers, heads,
        T_target, T_source); the target is the model's own greedy output unless given."""
        from lmlab.inspection import cross_attention

        return cross_attention(self, source, target).weights

    def token_logprobs(self, text: str) -> torch.Tensor:
        """log p(x_t | x_<t) of each token after the first: (T - 1,); their sum is the text's
        log-likelihood (minus ``lmlab eval``'s total loss)."""
        from lmlab.inspection import token_logprobs

        return torch.tensor(token_logprobs(self, text, top_k=1).logprobs[1:])

    def hidden_states(self, text: str) -> torch.Tensor:
        """An RNN's h_t of each layer (layers, T, H); a Transformer's residual stream before the
        first block and after each (layers + 1, T, C)."""
        from lmlab.inspection import hidden_states

        return hidden_states(self, text)["hidden"]

    def save(self, path: str | Path) -> Path:
        if self.module.quantization:
            raise LmlabError(
                f"this model is {self.module.quantization}-quantized and lmlab saves float checkpoints "
                "only; save the float model and quantize when loading (lmlab.load(path, quantize=...))"
            )
        tokenizers = [self.tokenizer] + ([self.target_tokenizer] if self.target_tokenizer is not self.tokenizer else [])
        if any(not hasattr(t, "to_str") for t in tokenizers):
            raise LmlabError(
                "this model's tokenizer is a pair of SentencePiece models (Marian), which an lmlab checkpoint cannot "
                "hold; keep using its Hugging Face folder, or write it back with lmlab.hf.export_hf"
            )
        target = self.target_tokenizer if self.target_tokenizer is not self.tokenizer else None
        return write_checkpoint(path, self.module, self.tokenizer, self.generation_config, target_tokenizer=target)

    def __repr__(self) -> str:
        n = self.module.num_parameters()
        return f"Model({type(self.module).__name__}, {n / 1e6:.2f}M parameters, from {self.source!r})"


def load(
    path: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    allow_pickle: bool = False,
    quantize: str | None = None,
    group_size: int | None = None,
) -> Model:
    """Load a model: an lmlab checkpoint folder, a Hugging Face folder or a Hub id.

    dtype defaults to float32 on the CPU, bf16 for a Hugging Face checkpoint stored in bf16
    (float32 again when quantizing: int8 weights with float32 activations, as the
    measurements of :mod:`lmlab.nn.quantize` were made). A Hugging Face source goes through
    :func:`lmlab.hf.load_hf`; ``allow_pickle`` lets it read a pickle ``pytorch_model.bin``
    (with ``torch.load(weights_only=True)``). ``quantize="int8"`` stores the linear layers'
    weights in int8 (see :mod:`lmlab.nn.quantize`): faster CPU decoding, logits within
    about 1% of the float model's; ``quantize="int4"`` in int4, a scale and zero point per
    ``group_size`` inputs (default 64; :mod:`lmlab.nn.int4`): faster still, coarser.
    """
    from lmlab.hf import load_any
    from lmlab.nn.quantize import quantize_model, resolve_quantize

    if not isinstance(path, (str, Path)):
        raise LmlabError(f"lmlab.load takes a folder path or a Hub id (a str), not {type(path).__name__} {path!r}")
    method = resolve_quantize(quantize)  # a bad value fails before anything is read
    if group_size is not None and method != "int4":
        raise LmlabError(f"group_size (--group-size) is for quantize='int4', not {quantize!r}")
    if group_size is not None:
        from lmlab.nn.int4 import Int4Linear

        Int4Linear.check_group_size(group_size)  # before anything is read
    # quantizing with no dtype: a checkpoint whose every number is bf16 is read in bf16, its
    # linear layers quantized from those numbers, and what stays float converted to float32 only
    # then — the fp32 load's very tensors, without ever holding a float32 copy of the whole model
    # (peak memory for a Qwen2-0.5B stored in bf16: 3.3 GB when it did, 1.6 GB now)
    parts = load_any(path, dtype=dtype, device=device, allow_pickle=allow_pickle, exact_bf16_only=method is not None)
    if method is not None:
        quantize_model(parts.module, method, **({"group_size": group_size} if group_size is not None else {}))
        if dtype is None:
            _float_but_embedding(parts.module)
    return Model.from_parts(parts)


def _float_but_embedding(module: torch.nn.Module) -> None:
    """``module.float()``, but a decoder-only Transformer's token table stays as it was read:
    a token reads one row, upcast as it is looked up (``Transformer.forward``), so a bf16
    table gives the fp32 model's numbers in half the bytes (Qwen2-0.5B's 151,936 × 896: 272
    instead of 544 MiB; an int8 model's own output layer does not share it)."""
    from lmlab.models.transformer import Transformer

    emb = module.tok_emb if isinstance(module, Transformer) else None
    if emb is None:
        module.float()
        return
    module._modules["tok_emb"] = None  # .float() skips it (no fp32 copy made and dropped)
    try:
        module.float()
    finally:
        module.tok_emb = emb


def _valid_unicode(text: str) -> str:
    """``text`` with lone surrogates (bytes that were not UTF-8, decoded with
    ``surrogateescape``: a shell argument like ``$'\\xff'``) replaced by U+FFFD, with a warning;
    a tokenizer cannot encode them."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        warn("the text holds bytes that are not UTF-8; each became U+FFFD (\ufffd) before tokenizing")
        return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)
