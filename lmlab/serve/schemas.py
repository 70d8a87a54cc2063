"""The request bodies of ``lmlab serve``: OpenAI's fields, their ranges, and lmlab's extras.

Pydantic models give FastAPI the OpenAPI schema (``/openapi.json``) and the checks; a body
that fails them is a 400 in OpenAI's error envelope naming the field (``param``). Fields
OpenAI defines but lmlab does not implement (``tools``, ``logit_bias``, ``best_of``, ...)
are declared so that the schema shows them, and refused by name: a client never has an
option silently ignored. Unknown fields are refused too (``extra="forbid"``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from lmlab.errors import LmlabError
from lmlab.serve.chat import check_messages

#: OpenAI fields lmlab does not implement: a 400 naming the field, never silently ignored
UNSUPPORTED_COMPLETION = ("best_of", "logit_bias", "suffix")
UNSUPPORTED_CHAT = ("tools", "tool_choice", "functions", "function_call", "logit_bias", "audio", "modalities",
                    "prediction", "parallel_tool_calls", "web_search_options")  # fmt: skip


def Unsupported(field: str, why: str) -> PydanticCustomError:  # noqa: N802 - raised like a class
    """A field lmlab does not implement was set: a validation error whose ``ctx`` names the
    field, so the 400 says which (``param``)."""
    return PydanticCustomError("unsupported", why, {"field": field})


def Invalid(field: str, why: str) -> PydanticCustomError:  # noqa: N802 - raised like a class
    """A value lmlab refuses, with a message of its own (one line, naming where): a 400 whose
    ``param`` is ``field``."""
    return PydanticCustomError("lmlab_invalid", "{message}", {"field": field, "message": why})  # (why may hold braces)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class Sampling(BaseModel):
    """What completions and chat share: OpenAI's sampling fields and lmlab's extras."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="the served model's id (GET /v1/models); omitted: that model")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling; 1 = off")
    n: int = Field(1, ge=1, le=64, description="choices per prompt")
    stop: str | list[str] | None = Field(None, description="up to 4 strings that end a choice (not included)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=0, lt=2**63, description="the same seed gives the same text")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = Field(None, description="accepted and ignored")
    # lmlab's extras (Hugging Face names)
    top_k: int | None = Field(None, ge=0, description="lmlab: keep the k most likely tokens; 0 = off")
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="lmlab: drop tokens below min_p · p_max")
    typical_p: float | None = Field(None, gt=0.0, le=1.0, description="lmlab: locally typical sampling")
    repetition_penalty: float | None = Field(None, gt=0.0, description="lmlab: CTRL's penalty; 1 = off")
    no_repeat_ngram_size: int | None = Field(None, ge=0, description="lmlab: forbid repeating n-grams")
    min_tokens: int | None = Field(None, ge=0, description="lmlab: no end of text before this many tokens")
    prompt_lookup_num_tokens: int | None = Field(
        None, ge=1, le=64, description="lmlab: speculative decoding, guessing this many tokens by prompt lookup "
        "(the same output; faster when it copies the prompt). One choice, no penalties")

    @model_validator(mode="after")
    def _stops(self) -> Sampling:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(s == "" for s in stops):
            raise Invalid("stop", "`stop` takes up to 4 non-empty strings")
        return self

    @model_validator(mode="after")
    def _lookup(self) -> Sampling:
        """Speculative decoding decodes one sequence without penalties (they depend on tokens a
        rejected guess takes back): the rest is refused by the request's own field names."""
        if self.prompt_lookup_num_tokens is None:
            return self
        if self.n > 1:
            raise Invalid("n", f"prompt_lookup_num_tokens decodes one sequence at a time: use n=1 (got n={self.n})")
        used = {"repetition_penalty": self.repetition_penalty not in (None, 1.0),
                "presence_penalty": self.presence_penalty != 0, "frequency_penalty": self.frequency_penalty != 0,
                "no_repeat_ngram_size": bool(self.no_repeat_ngram_size)}  # fmt: skip
        for name, on in used.items():
            if on:
                raise Invalid(name, f"prompt_lookup_num_tokens does not combine with {name} (it depends on "
                              "tokens a rejected guess takes back): drop one of them")  # fmt: skip
        return self

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def options(self) -> dict[str, Any]:
        """The decoding options (GenerationConfig names) this request sets."""
        opts: dict[str, Any] = {
            "temperature": self.temperature, "top_p": None if self.top_p >= 1.0 else self.top_p,
            "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
            "stop": self.stops(), "seed": self.seed,
        }  # fmt: skip
        extras = {"top_k": self.top_k, "min_p": self.min_p, "typical_p": self.typical_p,
                  "repetition_penalty": self.repetition_penalty, "no_repeat_ngram_size": self.no_repeat_ngram_size,
                  "min_new_tokens": self.min_tokens, "prompt_lookup_num_tokens": self.prompt_lookup_num_tokens}  # fmt: skip
        return opts | {k: v for k, v in extras.items() if v is not None}


def _refuse(values: dict[str, Any], names: tuple[str, ...]) -> None:
    for name in names:
        if values.get(name) is not None:
            raise Unsupported(name, f"`{name}` is not supported by lmlab serve; remove it from the request")


class CompletionRequest(Sampling):
    """POST /v1/completions."""

    prompt: str | list[str] = Field(..., description="a text, or a list of texts (token-id prompts are not supported)")
    max_tokens: int | None = Field(16, ge=1, description="new tokens per choice (OpenAI's default: 16)")
    logprobs: int | None = Field(None, ge=0, le=20, description="log-probabilities of the chosen and the n best tokens")
    echo: bool = Field(False, description="return the prompt before the completion")
    best_of: None = Field(None, description="not supported (a 400 if set)")
    logit_bias: None = Field(None, description="not supported (a 400 if set)")
    suffix: None = Field(None, description="not supported (a 400 if set)")

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, values: Any) -> Any:
        if isinstance(values, dict):
            _refuse(values, UNSUPPORTED_COMPLETION)
        return values


class ContentPart(BaseModel):
    """A part of a message's content: only text (lmlab's models take no images or audio)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["text"] = Field(..., description="only 'text' parts are supported")
    text: str


class Message(BaseModel):
    """A chat message: ``content`` is a string or a list of text parts (joined with newlines)."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] = Field(..., description="a text, or a list of text parts; never null")
    name: str | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"] = Field(..., description="only text: json_object and json_schema are not supported")


class ChatRequest(Sampling):
    """POST /v1/chat/completions."""

    messages: list[Message] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="deprecated by OpenAI for max_completion_tokens")
    max_completion_tokens: int | None = Field(None, ge=1, description="new tokens per choice; default: the rest of the context")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = Field(None, description="only {'type': 'text'}")
    tools: None = Field(None, description="not supported (a 400 if set)")
    tool_choice: None = Field(None, description="not supported (a 400 if set)")
    functions: None = Field(None, description="not supported (a 400 if set)")
    function_call: None = Field(None, description="not supported (a 400 if set)")
    logit_bias: None = Field(None, description="not supported (a 400 if set)")
    audio: None = Field(None, description="not supported (a 400 if set)")
    modalities: None = Field(None, description="not supported (a 400 if set)")
    prediction: None = Field(None, description="not supported (a 400 if set)")
    parallel_tool_calls: None = Field(None, description="not supported (a 400 if set)")
    web_search_options: None = Field(None, description="not supported (a 400 if set)")

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, values: Any) -> Any:
        if isinstance(values, dict):
            _refuse(values, UNSUPPORTED_CHAT)
            _check_messages(values.get("messages"))
            fmt = values.get("response_format")
            if isinstance(fmt, dict) and fmt.get("type", "text") != "text":
                raise Unsupported("response_format", f"response_format {fmt.get('type')!r} is not supported; "
                                  "lmlab serve writes plain text (type 'text')")  # fmt: skip
        return values

    @model_validator(mode="after")
    def _logprobs(self) -> ChatRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise Invalid("top_logprobs", "`top_logprobs` needs `logprobs: true`")
        return self

    def new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def _check_messages(messages: Any) -> None:
    """The messages as the chat route reads them (:func:`lmlab.serve.chat.check_messages`): its
    one-line message ("messages[1].content[0] is of type 'image_url': only text parts are
    supported") rather than pydantic's report on each branch of the ``content`` union. Absent
    or not a list: left to the schema's own checks (`messages` is required / must be a list)."""
    if not isinstance(messages, list) or not messages:
        return
    try:
        check_messages(messages)
    except LmlabError as e:
        text = str(e)
        where = text.split(" ", 1)[0]
        raise Invalid(where if where.startswith("messages[") else "messages", text) from None


# ---------------------------------------------------------------- the applications (lmlab's own)
class TextsRequest(BaseModel):
    """POST /v1/translate, /v1/summarize, /v1/classify."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    input: str | list[str] = Field(..., description="a text or a list of texts")
    max_tokens: int | None = Field(None, ge=1, description="translate/summarize: new tokens per text")
    num_beams: int | None = Field(None, ge=1, le=16, description="translate/summarize: beam width")
    top_k: int | None = Field(None, ge=1, description="classify: the k best labels of each text")

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class QARequest(BaseModel):
    """POST /v1/qa: an extractive answer, a span of the context."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    question: str = Field(..., min_length=1)
    context: str = Field(..., min_length=1)
    top_k: int = Field(1, ge=1, le=20, description="the k best answers")
    max_answer_len: int | None = Field(None, ge=1, description="tokens in an answer at most (default 15)")
    doc_stride: int | None = Field(None, ge=1, description="overlap of the windows over a long context (default 128)")
    handle_impossible_answer: bool = Field(False, description="an empty answer may win (SQuAD 2.0)")


class InspectRequest(BaseModel):
    """POST /v1/inspect: what the model does with a text (the playground's Inspect tab)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    text: str = Field(..., min_length=1, description="at most 256 tokens")
    top_k: int = Field(5, ge=0, le=20, description="alternatives shown per token")
