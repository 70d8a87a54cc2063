"""``lmlab serve``: the FastAPI application — OpenAI's API over the batching engine, the applications.

    GET  /health                 503 while the model loads, then 200
    GET  /v1/models              the one served model
    POST /v1/completions         text in, text out (OpenAI's legacy completions)
    POST /v1/chat/completions    messages in (rendered with the model's chat template), a reply out
    POST /v1/translate | /v1/summarize | /v1/classify | /v1/qa     lmlab's own: the pipelines
    GET  /metrics                the engine's counters (Prometheus' text format)

Every error is OpenAI's envelope ``{"error": {"message", "type", "param", "code"}}``: a client's
mistake is a 4xx that says what is wrong (400 bad field, 401 key, 404 model or route, 413 body
too large, 429 queue full, 503 loading); a 500 is a bug, its traceback logged here only.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request

from lmlab.errors import LmlabError
from lmlab.serve.errors import envelope, install_error_handlers

log = logging.getLogger("lmlab.serve")

#: the largest request body accepted (a long prompt is ~100 KB; 413 above this)
MAX_BODY = 8 << 20


@dataclass
class Served:
    """What the server holds: the model once loaded, its engine or pipelines, and the settings."""

    source: str
    model_id: str
    api_key: str | None = None
    max_batch: int = 32
    max_queue: int = 256
    dtype: str | None = None
    device: str | None = None
    log_prompts: bool = False
    max_body: int = MAX_BODY
    engine_thread: bool = True  # False: the caller runs engine.serve_forever() (lmlab serve: the main thread)
    draft: str | None = None  # a draft model's path: speculative decoding of the completions it can serve
    num_assistant_tokens: int = 5
    model: Any = None
    engine: Any = None
    kind: str = ""  # lm | seq2seq | classify | span
    pipelines: dict[str, Any] = field(default_factory=dict)
    chat: Any = None  # the chat template and its special tokens (lmlab.serve.routes)
    error: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def ready(self) -> bool:
        return self.model is not None

    def load(self) -> None:
        """Load the model (in a background thread: /health says 503 meanwhile)."""
        import lmlab
        from lmlab.generate.speculative import check_draft
        from lmlab.serve.chat_setup import ChatSetup
        from lmlab.serve.engine import Engine

        try:
            model = lmlab.load(self.source, dtype=self.dtype, device=self.device)
        except LmlabError as e:
            self.error = str(e)
            log.error("cannot load %s: %s", self.source, e)
            return
        task = getattr(model.module, "task", None)
        if model.is_encoder_decoder:
            self.kind = "seq2seq"
            self.pipelines = {"translate": lmlab.pipeline("translation", model),
                              "summarize": lmlab.pipeline("summarization", model)}  # fmt: skip
        elif task == "classify":
            self.kind, self.pipelines = "classify", {"classify": lmlab.pipeline("text-classification", model)}
        elif task == "span":
            self.kind, self.pipelines = "span", {"qa": lmlab.pipeline("question-answering", model)}
        elif task == "mlm":
            self.error = (f"{self.source} is an encoder pretrained by masked-token prediction (--task mlm), which "
                          "serves no route; fine-tune it first (lmlab train --task classify|qa --init RUN)")
            log.error("%s", self.error)
            return
        else:
            self.kind = "lm"
            self.chat = ChatSetup.of(model)
            draft = None
            if self.draft is not None:
                try:
                    draft = model._assistant(self.draft)
                    check_draft(model.module, draft, "speculative decoding")
                except LmlabError as e:
                    self.error = f"--draft {self.draft}: {e}"
                    log.error("%s", self.error)
                    return
            elif self.num_assistant_tokens != 5:
                self.error = "--num-assistant-tokens is for --draft MODEL"
                log.error("%s", self.error)
                return
            self.engine = Engine(model, max_batch=self.max_batch, max_queue=self.max_queue, thread=self.engine_thread,
                                 draft=draft, num_assistant_tokens=self.num_assistant_tokens)  # fmt: skip
        self.model = model

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


def create_app(served: Served, *, background: bool | None = True) -> FastAPI:
    """The application over ``served``; the model loads in a thread (``background``), at start-up
    (False), or by the caller (None: lmlab serve loads it on the main thread)."""
    from contextlib import asynccontextmanager

    from lmlab.serve.routes import router

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        if background:
            threading.Thread(target=served.load, name="lmlab-load", daemon=True).start()
        elif background is False and not served.ready:
            served.load()
        yield
        served.close()

    app = FastAPI(title="lmlab serve", version="1", lifespan=lifespan,
                  description="OpenAI-compatible completions and chat over an lmlab model, and lmlab's "
                  "applications (translate, summarize, classify, qa).")  # fmt: skip
    app.state.served = served
    app.include_router(router)
    install_error_handlers(app)
    _guards(app, served)
    # a body over the limit however it arrives: counted as it is received (a chunked body has no
    # Content-Length for the guard to check up front); its 413 is put in the envelope below
    from starlette.middleware.body_limit import RequestBodyLimitMiddleware

    app.add_middleware(RequestBodyLimitMiddleware, max_body_size=served.max_body)
    app.state.max_body = served.max_body
    return app



def _guards(app: FastAPI, served: Served) -> None:
    """The body size limit and the API key, before any route reads the body."""

    @app.middleware("http")
    async def _guard(request: Request, call_next: Any) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > served.max_body:
            return envelope(413, f"the request body has {int(length):,} bytes, more than the {served.max_body:,} "
                            "this server accepts", "invalid_request_error", code="request_too_large")  # fmt: skip
        if served.api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if given != f"Bearer {served.api_key}":
                why = "no API key was given" if not given else "the API key is wrong"
                return envelope(401, f"{why}: send the header 'Authorization: Bearer KEY' with the key the "
                                "server was started with (--api-key)", "invalid_request_error",
                                code="invalid_api_key")  # fmt: skip
        return await call_next(request)


__all__ = ["Served", "create_app"]
