"""Errors as OpenAI sends them: ``{"error": {"message", "type", "param", "code"}}`` with a 4xx
status for every client mistake (FastAPI's 422 becomes a 400 naming the field), never a 500;
a 500 is a bug, its traceback logged on the server only."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmlab.errors import LmlabError
from lmlab.serve.engine import QueueFull

log = logging.getLogger("lmlab.serve")


class ApiError(Exception):
    """An error with its HTTP status, OpenAI type and the field it is about."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def envelope(status: int, message: str, type_: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status_code=status)


def _union_tag(part: str) -> bool:
    """A step of pydantic's error location that names a branch of a union (``str``,
    ``list[str]``), not a field: left out of ``param`` (``stop``, not ``stop.list[str]``)."""
    return part in ("str", "int", "float", "bool", "none") or "[" in part


def install_error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI's envelope; a client's mistake a 4xx, a bug a logged 500."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        err = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        # a union (``prompt``: a string or a list of strings) reports each branch: say what the
        # branch that went furthest into the value found (``prompt.1``, not "should be a string")
        same = [e for e in errors if tuple(e.get("loc", ()))[:2] == tuple(err.get("loc", ()))[:2]]
        err = max(same, key=lambda e: len(e.get("loc", ())), default=err)
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            return envelope(400, f"the body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})",
                            "invalid_request_error")  # fmt: skip
        if err.get("type") == "unsupported":
            param = err.get("ctx", {}).get("field")
            return envelope(400, str(err.get("msg")), "invalid_request_error", param, "unsupported_parameter")
        if err.get("type") == "lmlab_invalid":  # lmlab's own one-line message (schemas.Invalid)
            ctx = err.get("ctx", {})
            return envelope(400, str(ctx.get("message") or err.get("msg")), "invalid_request_error", ctx.get("field"))
        param = ".".join(x for x in loc if not _union_tag(x)) or None
        msg = str(err.get("msg", "invalid value"))
        if err.get("type") == "missing":
            text = f"`{param}` is required"
        elif err.get("type") == "extra_forbidden":
            text = f"`{param}` is not a field of this request (lmlab serve does not support it); remove it"
        else:
            text = f"`{param}`: {msg}" if param else msg
        return envelope(400, text, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            msg = f"no route {request.method} {request.url.path}; the API is under /v1 (see /docs)"
        elif exc.status_code == 413:
            limit = getattr(request.app.state, "max_body", None)
            msg = f"the request body is over the {limit:,} bytes this server accepts" if limit else "the body is too large"
        elif exc.status_code == 405:
            msg = f"{request.method} is not allowed on {request.url.path}"
        else:
            msg = str(exc.detail)
        return envelope(exc.status_code, msg, "invalid_request_error" if exc.status_code < 500 else "server_error")

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError) -> JSONResponse:
        return envelope(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(QueueFull)
    async def _full(request: Request, exc: QueueFull) -> JSONResponse:
        return envelope(429, str(exc), "rate_limit_error", code="queue_full")

    @app.exception_handler(LmlabError)
    async def _lmlab(request: Request, exc: LmlabError) -> JSONResponse:
        return envelope(400, str(exc), "invalid_request_error")

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("lmlab serve: internal error on %s %s", request.method, request.url.path)
        return envelope(500, "internal server error (its traceback is in the server's log)", "server_error")


__all__ = ["ApiError", "envelope", "install_error_handlers"]
