"""The response bodies of ``lmlab serve``, as pydantic models: what ``/openapi.json`` promises.

FastAPI checks every JSON response against these (``response_model``), and the API fuzz test
(schemathesis) checks the server against the schema they make, so the documentation cannot
drift from what the server sends. The dicts themselves are built in :mod:`lmlab.serve.responses`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every 4xx/5xx: OpenAI's envelope."""

    error: ErrorBody


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "loading", "error"]
    model: str | None = None
    error: str | None = None


class Translation(BaseModel):
    translation_text: str


class Summary(BaseModel):
    summary_text: str


class LabelScore(BaseModel):
    label: str
    score: float


class Answer(BaseModel):
    answer: str
    score: float
    start: int = Field(..., description="character offset in the context: context[start:end] == answer")
    end: int


class TranslateResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[Translation]


class SummarizeResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[Summary]


class ClassifyResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[LabelScore | list[LabelScore]] = Field(..., description="one label per text; with top_k, a list per text")


class QAResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[Answer] = Field(..., description="the top_k best answers, best first")


class TokenSurprisal(BaseModel):
    token: str
    logprob: float | None = Field(..., description="log p(token | the ones before); None for the first")
    top: list[tuple[str, float]] = Field(..., description="the k most likely tokens at this position")


class AttentionGrid(BaseModel):
    layers: int
    heads: int
    weights: list[list[list[list[float]]]] = Field(..., description="(layers, heads, T, T), rows sum to 1")


class InspectResponse(BaseModel):
    model: str
    tokens: list[str]
    attention: AttentionGrid | None = Field(None, description="None for a model without self-attention (an RNN)")
    surprisal: list[TokenSurprisal] | None = Field(None, description="None for a model that does not predict the next token")


#: the error responses every route may give, for the schema
ERRORS = {code: {"model": ErrorResponse, "description": why} for code, why in (
    (400, "an invalid request: the message says what and how to fix it; param names the field"),
    (401, "a missing or wrong API key (the server was started with --api-key)"),
    (404, "another model's id, or an unknown route"),
    (413, "a body over the server's limit"),
    (429, "too many requests waiting (--max-queue)"),
    (503, "the model is loading (or failed to load)"),
)}  # fmt: skip

#: a streaming response's body, for the schema
SSE = {200: {"description": "JSON, or with stream: true server-sent events: `data: {chunk}` ... `data: [DONE]`",
             "content": {"text/event-stream": {}}}}  # fmt: skip
