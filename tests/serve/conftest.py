"""A real ``lmlab serve`` (uvicorn on 127.0.0.1, a free port) in a thread, for the HTTP tests."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def running(source: str | Path, **options) -> Iterator[str]:
    """Serve ``source``; yields the base URL once /health says 200."""
    try:
        import httpx
    except ImportError:  # openai 3 ships httpx2 (the same API)
        import httpx2 as httpx
    import uvicorn

    from lmlab.serve.app import Served, create_app

    served = Served(source=str(source), model_id=options.pop("model_id", "tiny"), **options)
    app = create_app(served)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    else:  # pragma: no cover
        raise RuntimeError("the server did not become healthy within 60 s")
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    from helpers import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("serve") / "lm", pos="rope", max_seq_len=256)
