"""The endpoints of ``lmlab serve`` (see :mod:`lmlab.serve.app`): requests become engine jobs or
pipeline calls, results become OpenAI's shapes.

A request's jobs report from the engine's thread; their events are handed to the request's
coroutine through an asyncio queue (``call_soon_threadsafe``). A client that goes away —
streaming or not — cancels its jobs at once, and the engine drops their rows at its next step.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import torch
from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from lmlab.errors import LmlabError
from lmlab.serve import responses as R
from lmlab.serve import shapes as S
from lmlab.serve.engine import Job, TokenEvent
from lmlab.serve.errors import ApiError
from lmlab.serve.schemas import ChatRequest, CompletionRequest, InspectRequest, QARequest, TextsRequest

if TYPE_CHECKING:
    from lmlab.serve.app import Served

router = APIRouter()
log = logging.getLogger("lmlab.serve")

#: new tokens a chat reply may have when the request does not say (at most the rest of the context)
CHAT_DEFAULT_TOKENS = 1024

WHAT = {"lm": "a language model", "seq2seq": "an encoder-decoder (translation, summarization)",
        "classify": "a text classifier", "span": "an extractive question-answering model"}  # fmt: skip
ROUTES = {"lm": "/v1/completions and /v1/chat/completions", "seq2seq": "/v1/translate and /v1/summarize",
          "classify": "/v1/classify", "span": "/v1/qa"}  # fmt: skip


def served_of(request: Request, wanted: str | None = None, model: str | None = None) -> Served:
    """The loaded model (503 while loading), checked against the request's ``model`` and route."""
    s: Served = request.app.state.served
    if not s.ready:
        why = f"the model failed to load: {s.error}" if s.error else "the model is still loading; retry shortly"
        raise ApiError(503, why, type_="server_error", code="model_not_ready")
    if model is not None and model != s.model_id:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {s.model_id!r}",
                       param="model", code="model_not_found")  # fmt: skip
    if wanted is not None and s.kind != wanted and not (wanted == "lm" and s.kind == "lm"):
        raise ApiError(400, f"this server's model {s.model_id} is {WHAT[s.kind]}; it answers {ROUTES[s.kind]}",
                       code="wrong_model_kind")  # fmt: skip
    return s


# ---------------------------------------------------------------------- meta
@router.get("/health", summary="200 once the model is loaded, 503 before", response_model=S.Health,
            responses={503: {"model": S.Health, "description": "loading, or failed to load"}})
async def health(request: Request) -> Any:
    s: Served = request.app.state.served
    if not s.ready:
        return R_json({"status": "error" if s.error else "loading", "error": s.error}, 503)
    return {"status": "ok", "model": s.model_id}


@router.get("/", summary="The playground: chat, completion and the applications in a browser", include_in_schema=False)
async def playground() -> Any:
    from pathlib import Path

    from fastapi.responses import HTMLResponse

    page = Path(__file__).with_name("static") / "playground.html"
    return HTMLResponse(page.read_text(encoding="utf-8"))


@router.get("/v1/models", summary="The served model", response_model=S.ModelList, responses=S.ERRORS)
async def models(request: Request) -> dict[str, Any]:
    s: Served = request.app.state.served
    return {"object": "list", "data": [_model_card(s)]}


@router.get("/v1/models/{model_id:path}", summary="One model", response_model=S.ModelCard, responses=S.ERRORS)
async def model(request: Request, model_id: str) -> dict[str, Any]:
    s: Served = request.app.state.served
    if model_id != s.model_id:
        raise ApiError(404, f"the model {model_id!r} does not exist; this server serves {s.model_id!r}",
                       param="model", code="model_not_found")  # fmt: skip
    return _model_card(s)


@router.get("/metrics", summary="The engine's counters (Prometheus text format)", response_class=PlainTextResponse)
async def metrics(request: Request) -> Any:
    s: Served = request.app.state.served
    stats = s.engine.stats if s.engine is not None else {}
    return PlainTextResponse("".join(f"lmlab_{k} {v}\n" for k, v in stats.items()))


def _model_card(s: Served) -> dict[str, Any]:
    return {"id": s.model_id, "object": "model", "created": 0, "owned_by": "lmlab"}


def R_json(body: Any, status: int) -> Any:  # noqa: N802
    from fastapi.responses import JSONResponse

    return JSONResponse(body, status_code=status)


# ---------------------------------------------------------------------- generation
class Events:
    """One HTTP request's engine events, delivered to its coroutine: (prompt index, event)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, TokenEvent | Exception]] = asyncio.Queue()

    def sink(self, k: int) -> Any:
        return lambda ev: self.loop.call_soon_threadsafe(self.queue.put_nowait, (k, ev))


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def _watch(request: Request, jobs: list[Job], events: Events) -> None:
    """Cancel ``jobs`` as soon as the client disconnects, and wake the waiting handler (the
    engine drops cancelled rows without a word)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            for job in jobs:
                job.cancel()
            events.queue.put_nowait((-1, ClientGone()))
            return


def _config(s: Served, req: Any, max_new: int, logprobs: int | None) -> Any:
    opts = req.options() | {"max_new_tokens": max_new, "logprobs": logprobs}
    if s.chat is not None and isinstance(req, ChatRequest):
        opts["stop"] = [*opts["stop"], *s.chat.stop]
    return s.model._gen_config(**opts)


def _submit(s: Served, prompts: list[list[int]], cfg: Any, n: int, events: Events) -> list[Job]:
    jobs = [Job(ids, cfg, events.sink(k), n=n) for k, ids in enumerate(prompts)]
    try:
        for job in jobs:
            s.engine.submit(job)
    except LmlabError:
        for job in jobs:
            job.cancel()
        raise
    return jobs


def _encode(s: Served, text: str, special: bool) -> list[int]:
    """A prompt's ids: the tokenizer's own post-processing for completions (as ``Model.generate``);
    none for a rendered chat (the template wrote the special tokens, as transformers)."""
    ids = s.model.encode(text) if special else s.model.tokenizer.encode(text, add_special_tokens=False).ids
    if not ids:
        bos = s.model.generation_config.get("bos_token_id")
        if bos is None:
            raise ApiError(400, "the prompt is empty and the model has no BOS token to start from", param="prompt")
        ids = [int(bos)]
    return ids


@router.post("/v1/completions", summary="OpenAI completions", response_model=S.CompletionResponse,
             responses={**S.ERRORS, **S.SSE})
async def completions(req: CompletionRequest, request: Request) -> Any:
    s = served_of(request, "lm", req.model)
    texts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
    if not texts:
        raise ApiError(400, "`prompt` is an empty list; give a text or a list of texts", param="prompt")
    prompts = [_encode(s, t, special=True) for t in texts]
    if s.log_prompts:
        for t in texts:
            log.info("completion prompt: %r", t)
    cfg = _config(s, req, req.max_tokens or 16, req.logprobs)
    echo_lps = None
    if req.echo and req.logprobs is not None:
        echo_lps = [await asyncio.wrap_future(s.engine.call(lambda p=p: _prompt_logprobs(s, p, req.logprobs)))
                    for p in prompts]  # fmt: skip
    events = Events()
    jobs = _submit(s, prompts, cfg, req.n, events)
    meta = R.new_id("cmpl"), s.model_id, R.now()
    if req.stream:
        opts = req.stream_options
        return _sse(_stream(events, jobs, texts, prompts, req.n, meta, s, chat=False, echo=req.echo,
                            logprobs=req.logprobs, usage=bool(opts and opts.include_usage), echo_lps=echo_lps))  # fmt: skip
    results = await _collect(events, jobs, request, len(prompts) * req.n, req.n)
    choices = []
    for i, (text, items, finish, _) in enumerate(results):
        k = i // req.n
        lp = None
        if req.logprobs is not None:
            shown = [x for x in items if x[0] not in cfg.eos_token_id]
            lp = R.completion_logprobs(s.model.tokenizer, (echo_lps[k] if echo_lps else []) + shown,
                                       0 if req.echo else len(texts[k]))  # fmt: skip
        choices.append({"index": i, "text": (texts[k] + text) if req.echo else text, "logprobs": lp,
                        "finish_reason": finish})  # fmt: skip
    used = sum(r[3] for r in results)
    return R.completion(*meta, choices, R.usage(sum(len(p) for p in prompts), used))


@router.post("/v1/chat/completions", summary="OpenAI chat completions", response_model=S.ChatCompletionResponse,
             responses={**S.ERRORS, **S.SSE})
async def chat_completions(req: ChatRequest, request: Request) -> Any:
    s = served_of(request, "lm", req.model)
    text = s.chat.render([m.model_dump(exclude_none=True) for m in req.messages])
    prompt = _encode(s, text, special=False)
    if s.log_prompts:
        log.info("chat prompt: %r", text)
    ctx = s.model.config.max_seq_len if s.model.module.bounded_context else None
    new = req.new_tokens()
    if new is None:
        room = CHAT_DEFAULT_TOKENS if ctx is None else min(CHAT_DEFAULT_TOKENS, ctx - len(prompt))
        if room < 1:
            raise ApiError(400, f"the messages take {len(prompt)} tokens, the whole context of {ctx}; "
                           "send fewer or shorter messages", param="messages")  # fmt: skip
        new = room
    k = req.top_logprobs or 0
    cfg = _config(s, req, new, k if req.logprobs else None)
    events = Events()
    jobs = _submit(s, [prompt], cfg, req.n, events)
    meta = R.new_id("chatcmpl"), s.model_id, R.now()
    if req.stream:
        opts = req.stream_options
        return _sse(_stream(events, jobs, [text], [prompt], req.n, meta, s, chat=True, echo=False,
                            logprobs=k if req.logprobs else None, usage=bool(opts and opts.include_usage)))  # fmt: skip
    results = await _collect(events, jobs, request, req.n, req.n)
    choices = []
    for i, (reply, items, finish, _) in enumerate(results):
        lp = None
        if req.logprobs:
            lp = R.chat_logprobs(s.model.tokenizer, [x for x in items if x[0] not in cfg.eos_token_id])
        choices.append({"index": i, "message": {"role": "assistant", "content": reply}, "logprobs": lp,
                        "finish_reason": finish})  # fmt: skip
    return R.chat_completion(*meta, choices, R.usage(len(prompt), sum(r[3] for r in results)))


async def _collect(events: Events, jobs: list[Job], request: Request, total: int, n: int) -> list[tuple]:
    """Wait for every choice: (text, [(id, logprob, top)], finish_reason, tokens) in choice order."""
    watcher = asyncio.create_task(_watch(request, jobs, events))
    out: list[Any] = [None] * total
    items: list[list] = [[] for _ in range(total)]
    try:
        done = 0
        while done < total:
            k, ev = await events.queue.get()
            if isinstance(ev, ClientGone):
                raise ApiError(499, "the client closed the request", code="client_closed_request")
            if isinstance(ev, Exception):
                raise ev
            i = k * n + ev.index
            items[i].append((ev.token_id, ev.logprob, ev.top or []))
            if ev.finish is not None:
                out[i] = (ev.text or "", items[i], ev.finish, len(ev.token_ids or []))
                done += 1
    finally:
        watcher.cancel()
        for job in jobs:  # after an error or a disconnect, nothing of this request goes on generating
            job.cancel()
    return out


def _sse(gen: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _data(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(events: Events, jobs: list[Job], texts: list[str], prompts: list[list[int]], n: int,
                  meta: tuple, s: Served, *, chat: bool, echo: bool, logprobs: int | None,
                  usage: bool, echo_lps: list[list[tuple]] | None = None) -> AsyncIterator[str]:  # fmt: skip
    """OpenAI's framing: (chat) a first chunk with the role; content deltas; a last chunk per
    choice with its finish_reason; a usage chunk (``choices: []``) if asked; ``[DONE]``.

    Log-probabilities are those of the response without streaming, split over the chunks: each
    token's chunk carries that token's (its ``text_offset`` counted as there, token by token),
    and with ``echo`` the prompt's chunk carries the prompt tokens' (``echo_lps``)."""
    total, done, used = len(prompts) * n, 0, 0
    tok = s.model.tokenizer
    eos = set(s.model._gen_config().eos_token_id)
    offsets = [len(texts[i // n]) for i in range(total)]
    try:
        for i in range(total):
            if chat:
                yield _data(R.chunk(*meta, [{"index": i, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}], chat=True))  # fmt: skip
            elif echo:
                lp = None
                if logprobs is not None and echo_lps:
                    lp = R.completion_logprobs(tok, echo_lps[i // n], 0)
                    offsets[i] = sum(len(t) for t in lp["tokens"])  # as the response without streaming counts
                yield _data(R.chunk(*meta, [{"index": i, "text": texts[i // n], "logprobs": lp,
                                             "finish_reason": None}], chat=False))  # fmt: skip
        while done < total:
            k, ev = await events.queue.get()
            if isinstance(ev, Exception):
                yield _data({"error": {"message": "internal server error (logged on the server)",
                                       "type": "server_error", "param": None, "code": None}})  # fmt: skip
                return
            i = k * n + ev.index
            lp = None
            if logprobs is not None and ev.token_id not in eos:
                item = [(ev.token_id, ev.logprob, ev.top or [])]
                lp = R.chat_logprobs(tok, item) if chat else R.completion_logprobs(tok, item, offsets[i])
            if lp is not None and not chat:
                offsets[i] += len(lp["tokens"][0])
            if ev.delta or lp is not None:
                part = {"delta": {"content": ev.delta}} if chat else {"text": ev.delta}
                yield _data(R.chunk(*meta, [{"index": i, **part, "logprobs": lp, "finish_reason": None}], chat=chat))
            if ev.finish is not None:
                done += 1
                used += len(ev.token_ids or [])
                part = {"delta": {}} if chat else {"text": ""}
                yield _data(R.chunk(*meta, [{"index": i, **part, "logprobs": None, "finish_reason": ev.finish}],
                                    chat=chat))  # fmt: skip
        if usage:
            yield _data(R.chunk(*meta, [], chat=chat, use=R.usage(sum(len(p) for p in prompts), used)))
        yield "data: [DONE]\n\n"
    finally:
        for job in jobs:  # a client that went away: its rows leave the batch
            job.cancel()


def _prompt_logprobs(s: Served, ids: list[int], k: int) -> list[tuple[int, float | None, list | None]]:
    """Each prompt token's log-probability given the ones before it (echo + logprobs); the first has none."""
    with torch.inference_mode():
        logits, _ = s.model.module(torch.tensor([ids], device=s.model.module.device))
        lp = torch.log_softmax(logits[0].float(), dim=-1)
    out: list[tuple[int, float | None, list | None]] = [(ids[0], None, None)]
    for t in range(1, len(ids)):
        row = lp[t - 1]
        vals, top = row.topk(min(k, row.shape[-1])) if k else (row[:0], row[:0].long())
        out.append((ids[t], float(row[ids[t]]), list(zip(top.tolist(), vals.tolist()))))
    return out


# ---------------------------------------------------------------------- the applications
async def _pipeline(s: Served, name: str, **kw: Any) -> Any:
    pipe = s.pipelines[name]

    def run() -> Any:
        with s.lock:  # one pipeline call at a time: the model is not batched across requests here
            return pipe(**kw) if "question" in kw else pipe(kw.pop("inputs"), **kw)

    return await run_in_threadpool(run)


async def _text2text(req: TextsRequest, request: Request, name: str) -> dict[str, Any]:
    """/v1/translate and /v1/summarize: an encoder-decoder's pipeline over the texts."""
    s = served_of(request, "seq2seq", req.model)
    if req.top_k is not None:
        raise ApiError(400, "`top_k` is for /v1/classify", param="top_k")
    opts = {k: v for k, v in (("max_new_tokens", req.max_tokens), ("num_beams", req.num_beams)) if v is not None}
    out = await _pipeline(s, name, inputs=req.texts(), **opts)
    return {"object": "list", "model": s.model_id, "data": out}


@router.post("/v1/translate", summary="lmlab: translate texts (an encoder-decoder model)",
             response_model=S.TranslateResponse, responses=S.ERRORS)
async def translate(req: TextsRequest, request: Request) -> dict[str, Any]:
    return await _text2text(req, request, "translate")


@router.post("/v1/summarize", summary="lmlab: summarize texts (an encoder-decoder model)",
             response_model=S.SummarizeResponse, responses=S.ERRORS)
async def summarize(req: TextsRequest, request: Request) -> dict[str, Any]:
    return await _text2text(req, request, "summarize")


@router.post("/v1/classify", summary="lmlab: label texts (a classifier)", response_model=S.ClassifyResponse,
             responses=S.ERRORS)
async def classify(req: TextsRequest, request: Request) -> dict[str, Any]:
    s = served_of(request, "classify", req.model)
    for name in ("max_tokens", "num_beams"):
        if getattr(req, name) is not None:
            raise ApiError(400, f"`{name}` is for /v1/translate and /v1/summarize", param=name)
    out = await _pipeline(s, "classify", inputs=req.texts(), **({"top_k": req.top_k} if req.top_k else {}))
    return {"object": "list", "model": s.model_id, "data": out}


@router.post("/v1/qa", summary="lmlab: answer a question from a context (an extractive reader)",
             response_model=S.QAResponse, responses=S.ERRORS)
async def qa(req: QARequest, request: Request) -> dict[str, Any]:
    s = served_of(request, "span", req.model)
    opts = {k: v for k, v in (("max_answer_len", req.max_answer_len), ("doc_stride", req.doc_stride)) if v is not None}
    out = await _pipeline(s, "qa", question=req.question, context=req.context, top_k=req.top_k,
                          handle_impossible_answer=req.handle_impossible_answer, **opts)  # fmt: skip
    return {"object": "list", "model": s.model_id, "data": out if isinstance(out, list) else [out]}


# ---------------------------------------------------------------------- inspect
#: the longest text /v1/inspect looks at (its attention grid has layers·heads·T² numbers)
INSPECT_TOKENS = 256


@router.post("/v1/inspect", summary="lmlab: the attention weights and each token's surprisal for a text",
             response_model=S.InspectResponse, responses=S.ERRORS)
async def inspect(req: InspectRequest, request: Request) -> dict[str, Any]:
    s = served_of(request, None, req.model)
    n = len(s.model.encode(req.text))
    cfg = s.model.config
    ctx = getattr(cfg, "max_source_len", None) or getattr(cfg, "max_seq_len", None)
    limit = min(INSPECT_TOKENS, ctx) if ctx and s.model.module.bounded_context else INSPECT_TOKENS
    if n > limit:
        raise ApiError(400, f"the text has {n} tokens; /v1/inspect looks at {limit} at most", param="text")

    def run() -> dict[str, Any]:
        from lmlab import inspection

        out: dict[str, Any] = {"model": s.model_id, "tokens": s.model.tokens(req.text), "attention": None,
                               "surprisal": None}  # fmt: skip
        try:
            w = inspection.attention(s.model, req.text).weights
            out["attention"] = {"layers": w.shape[0], "heads": w.shape[1], "weights": w.tolist()}
        except LmlabError:
            pass  # no self-attention (an RNN)
        try:
            t = inspection.token_logprobs(s.model, req.text, top_k=req.top_k)
            out["surprisal"] = [{"token": tok, "logprob": None if i == 0 else lp, "top": top}
                                for i, (tok, lp, top) in enumerate(zip(t.tokens, t.logprobs, t.top))]  # fmt: skip
        except LmlabError:
            pass  # not a language model
        return out

    if s.engine is not None:
        return await asyncio.wrap_future(s.engine.call(run))

    def locked() -> dict[str, Any]:
        with s.lock:
            return run()

    return await run_in_threadpool(locked)
