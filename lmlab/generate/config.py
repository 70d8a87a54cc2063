"""The decoding options, their defaults and their checks (names follow Hugging Face ``generate``)."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from lmlab.errors import LmlabError

#: temperatures below this decode greedily (z / T overflows float32 long before T reaches 0)
GREEDY_BELOW = 1e-5


@dataclass
class GenerationConfig:
    """Every option of :func:`lmlab.generate.generate`; ``None`` or the neutral value turns one off."""

    max_new_tokens: int = 200
    min_new_tokens: int = 0  # EOS is forbidden before this many new tokens (stop strings still apply)
    temperature: float = 0.8  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    typical_p: float | None = None
    repetition_penalty: float = 1.0  # Hugging Face: divide positive logits, multiply negative ones
    presence_penalty: float = 0.0  # OpenAI: z_j - presence·[c_j > 0] - frequency·c_j
    frequency_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    bad_words: list[str] = field(default_factory=list)  # strings, tokenized with the model's tokenizer
    bad_words_ids: list[list[int]] = field(default_factory=list)  # token id sequences (Hugging Face)
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True, False or "never" (Hugging Face)
    num_return_sequences: int = 1
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: none; n: the chosen token's and the n best alternatives'
    seed: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    # encoder-decoders (Hugging Face's names and meaning): the token the decoder starts from,
    # a token forced as the first new one (mBART's language code, BART's BOS), and EOS forced
    # as the last one max_new_tokens allows (Marian, BART)
    decoder_start_token_id: int | None = None
    forced_bos_token_id: int | None = None
    forced_eos_token_id: list[int] = field(default_factory=list)
    # speculative decoding (:mod:`lmlab.generate.speculative`), Hugging Face's names: guess this
    # many tokens by prompt lookup, matching up to max_matching_ngram_size tokens; or, with an
    # assistant (draft) model, let it guess num_assistant_tokens at a time
    prompt_lookup_num_tokens: int | None = None
    max_matching_ngram_size: int = 2
    num_assistant_tokens: int = 5

    def __post_init__(self) -> None:
        check_types({f.name: getattr(self, f.name) for f in fields(self)})
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        elif self.eos_token_id is None:
            self.eos_token_id = []
        for name in ("stop", "bad_words"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])
            elif getattr(self, name) is None:
                setattr(self, name, [])
        self.eos_token_id = [int(i) for i in self.eos_token_id]
        if isinstance(self.forced_eos_token_id, int):
            self.forced_eos_token_id = [self.forced_eos_token_id]
        self.forced_eos_token_id = [int(i) for i in self.forced_eos_token_id or []]
        self.stop, self.bad_words = list(self.stop), list(self.bad_words)
        self.bad_words_ids = [list(map(int, seq)) for seq in (self.bad_words_ids or [])]
        if isinstance(self.early_stopping, str) and self.early_stopping.lower() in ("true", "false"):
            self.early_stopping = self.early_stopping.lower() == "true"
        self.validate()

    def validate(self) -> None:
        """One line per mistake, naming the option and its allowed range."""
        if self.max_new_tokens is None or self.max_new_tokens < 0:
            raise LmlabError(f"max_new_tokens must be >= 0 (got {self.max_new_tokens})")
        if self.min_new_tokens is None or self.min_new_tokens < 0:
            raise LmlabError(f"min_new_tokens must be >= 0 (got {self.min_new_tokens})")
        if self.min_new_tokens > self.max_new_tokens:
            raise LmlabError(
                f"min_new_tokens ({self.min_new_tokens}) is larger than max_new_tokens "
                f"({self.max_new_tokens}); lower it or raise max_new_tokens"
            )
        if self.temperature is None or not self.temperature >= 0:
            raise LmlabError(f"temperature must be >= 0 (got {self.temperature}); 0 means greedy")
        if self.top_k is not None and self.top_k < 0:
            raise LmlabError(f"top_k must be >= 0 (got {self.top_k}); 0 turns it off")
        if self.top_p is not None and not (0.0 < self.top_p <= 1.0):
            raise LmlabError(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.min_p is not None and not (0.0 <= self.min_p <= 1.0):
            raise LmlabError(f"min_p must be in [0, 1] (got {self.min_p})")
        if self.typical_p is not None and not (0.0 < self.typical_p <= 1.0):
            raise LmlabError(f"typical_p must be in (0, 1] (got {self.typical_p}); 1 turns it off")
        if not self.repetition_penalty > 0:
            raise LmlabError(
                f"repetition_penalty must be > 0 (got {self.repetition_penalty}); 1 turns it off"
            )
        for name in ("presence_penalty", "frequency_penalty", "length_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise LmlabError(f"{name} must be a finite number (got {getattr(self, name)})")
        if self.no_repeat_ngram_size < 0:
            raise LmlabError(
                f"no_repeat_ngram_size must be >= 0 (got {self.no_repeat_ngram_size}); 0 turns it off"
            )
        if self.num_beams is None or self.num_beams < 1:
            raise LmlabError(f"num_beams must be >= 1 (got {self.num_beams}); 1 means no beam search")
        if self.early_stopping not in (True, False, "never"):
            raise LmlabError(f"early_stopping must be true, false or 'never' (got {self.early_stopping!r})")
        n = self.num_return_sequences
        if n is None or n < 1:
            raise LmlabError(f"num_return_sequences must be >= 1 (got {n})")
        if self.num_beams > 1 and n > self.num_beams:
            raise LmlabError(f"num_return_sequences ({n}) must be <= num_beams ({self.num_beams})")
        if self.num_beams == 1 and n > 1 and self.greedy:
            raise LmlabError(
                f"num_return_sequences={n} with greedy decoding would return {n} copies of one text; "
                "sample (temperature > 0) or use num_beams >= num_return_sequences"
            )
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise LmlabError("a stop string is empty (or not a string); give non-empty strings to stop at")
        if any(not isinstance(w, str) or w == "" for w in self.bad_words):
            raise LmlabError("a bad word is empty (or not a string); give the non-empty strings to forbid")
        if any(len(seq) == 0 or min(seq) < 0 for seq in self.bad_words_ids):
            raise LmlabError("bad_words_ids must be non-empty lists of token ids >= 0")
        if self.seed is not None and not 0 <= self.seed < 1 << 64:
            raise LmlabError(f"seed must be in [0, 2**64) (got {self.seed})")
        if self.prompt_lookup_num_tokens is not None and self.prompt_lookup_num_tokens < 1:
            raise LmlabError(
                f"prompt_lookup_num_tokens must be >= 1 (got {self.prompt_lookup_num_tokens}); leave it unset for none"
            )
        if self.max_matching_ngram_size is None or self.max_matching_ngram_size < 1:
            raise LmlabError(f"max_matching_ngram_size must be >= 1 (got {self.max_matching_ngram_size})")
        if self.num_assistant_tokens is None or self.num_assistant_tokens < 1:
            raise LmlabError(f"num_assistant_tokens must be >= 1 (got {self.num_assistant_tokens})")
        if self.logprobs is not None and self.logprobs < 0:
            raise LmlabError(
                f"logprobs must be >= 0 (got {self.logprobs}): the number of alternatives per token"
            )

    def check_token_ids(self, vocab_size: int) -> None:
        """Token ids given as options must be ids of this model (0 <= id < vocab_size): an EOS id
        past the vocabulary would never end a sequence, a bad word past it never be forbidden,
        and both would be silently ignored (Hugging Face refuses such ids too)."""
        last = vocab_size - 1
        for i in [*self.eos_token_id, *self.forced_eos_token_id]:
            if not 0 <= i <= last:
                raise LmlabError(
                    f"eos_token_id {i} is not a token id of this model: its vocabulary has {vocab_size} "
                    f"tokens (ids 0 to {last}); give an id in that range, or leave it out for the model's own"
                )
        for name in ("forced_bos_token_id", "decoder_start_token_id"):
            i = getattr(self, name)
            if i is not None and not 0 <= i <= last:
                raise LmlabError(f"{name} {i} is not a token id of this model (ids 0 to {last})")
        for seq in self.bad_words_ids:
            bad = [i for i in seq if i > last]
            if bad:
                raise LmlabError(
                    f"bad_words_ids contains token id {bad[0]}, past this model's vocabulary of "
                    f"{vocab_size} tokens (ids 0 to {last})"
                )

    @property
    def greedy(self) -> bool:
        """temperature 0 — or so close to it (below GREEDY_BELOW) that z / T would overflow to
        inf and the softmax to NaN: the limit of sampling as T -> 0 is the argmax (vLLM's rule)."""
        return self.temperature < GREEDY_BELOW

    @property
    def beam_search(self) -> bool:
        return self.num_beams > 1

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "", **overrides: Any) -> GenerationConfig:
        """Defaults <- a checkpoint's generation_config.json <- explicit options.

        Hugging Face names that differ from ours are mapped (``stop_strings`` -> ``stop``);
        ``do_sample=False`` (stored or given) means greedy unless a temperature is given.
        ``where`` names the stored settings' file in errors: a bad value there is the
        checkpoint's fault, not the caller's, and the message says which.
        """
        names = {f.name for f in fields(cls)}
        d = dict(d)
        stored = {k: v for k, v in d.items() if k in names and v is not None and k not in overrides}
        try:
            check_types(stored)
        except LmlabError as e:
            raise LmlabError(f"{where}: {e}; fix the file, or override the option" if where else str(e)) from None
        if "stop_strings" in d and "stop" not in d:
            d["stop"] = d["stop_strings"]
        overrides = dict(overrides)
        do_sample = overrides.pop("do_sample", None)
        if do_sample is None:
            do_sample = d.get("do_sample")
            if do_sample is not None and not isinstance(do_sample, bool):
                raise LmlabError(f"{where or 'generation settings'}: do_sample must be true or false, not {do_sample!r}")
        elif not isinstance(do_sample, bool):
            raise LmlabError(f"do_sample must be True or False, not {do_sample!r}")
        merged = {k: v for k, v in d.items() if k in names and v is not None}
        if do_sample is False and overrides.get("temperature") is None:
            merged["temperature"] = 0.0  # Hugging Face: do_sample=False means greedy
        merged.update({k: v for k, v in overrides.items() if v is not None})
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise LmlabError(
                f"unknown generation option {unknown[0]!r}; the options are: {', '.join(sorted(names))}"
            )
        try:
            return cls(**merged)
        except LmlabError as e:
            # the file's fault when a value only it gave is named (the caller's would be too)
            blame = where and any(re.match(rf"{k}\b", str(e)) for k in stored)
            raise LmlabError(f"{where}: {e}; fix the file, or override the option" if blame else str(e)) from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: What each option may be, as the annotations say; a bool is not a number here.
_KINDS: dict[str, tuple[str, ...]] = {
    "int": ("int",),
    "int | None": ("int", "None"),
    "float": ("int", "float"),
    "float | None": ("int", "float", "None"),
    "bool | str": ("bool", "str"),
    "list[str]": ("str", "list[str]", "None"),
    "list[list[int]]": ("list[list[int]]", "None"),
    "list[int]": ("int", "list[int]", "None"),
}


def _kind(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, (list, tuple)):
        if not value:
            return "list"
        inner = {_kind(v) for v in value}
        if inner <= {"int"}:
            return "list[int]"
        if inner <= {"str"}:
            return "list[str]"
        if all(k in ("list[int]",) for k in inner):
            return "list[list[int]]"
        return "list[mixed]"
    return type(value).__name__


def check_types(values: dict[str, Any]) -> None:
    """An LmlabError naming the first option whose value has the wrong type (a string
    ``"5"`` for max_new_tokens, ``2.5`` for an int, ``True`` for a number, a NaN), before
    anything reaches torch, whose errors would not name the option."""
    hints = {f.name: str(f.type) for f in fields(GenerationConfig)}
    for name, value in values.items():
        allowed = _KINDS.get(hints.get(name, ""))
        if allowed is None:
            continue
        kind = _kind(value)
        if kind == "list" and any(a.startswith("list") for a in allowed):
            continue  # an empty list is a list of anything
        if kind not in allowed:
            raise LmlabError(f"{name} must be {_WANT.get(allowed, ' or '.join(allowed))}, not {value!r}")
        if kind == "float" and not math.isfinite(value):
            raise LmlabError(f"{name} must be a finite number, not {value}")


_WANT = {
    ("int",): "an integer",
    ("int", "None"): "an integer (or null)",
    ("int", "float"): "a number",
    ("int", "float", "None"): "a number (or null)",
    ("bool", "str"): "true, false or 'never'",
    ("str", "list[str]", "None"): "a string or a list of strings",
    ("list[list[int]]", "None"): "a list of lists of token ids",
    ("int", "list[int]", "None"): "a token id or a list of token ids",
}
