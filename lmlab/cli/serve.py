"""``lmlab serve MODEL``: the OpenAI-compatible server (lmlab.serve) on uvicorn."""

from __future__ import annotations

import argparse
import sys

from lmlab.errors import LmlabError


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="an lmlab checkpoint, a Hugging Face folder or a Hub id")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 requests")
    p.add_argument("--max-batch", type=int, default=32, help="requests generating together at most")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting at most (more: 429)")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: fp32 on a CPU)")
    p.add_argument("--model-name", default=None, help="the id clients send as `model` (default: MODEL)")
    p.add_argument("--log-prompts", action="store_true", help="log each request's prompt (off: prompts are private)")


def cmd_serve(a: argparse.Namespace) -> int:
    for name in ("port", "max_batch", "max_queue"):
        value = getattr(a, name)
        if value < (0 if name == "port" else 1) or (name == "port" and value > 65535):
            raise LmlabError(f"--{name.replace('_', '-')} must be {'in 0..65535' if name == 'port' else '>= 1'} "
                             f"(got {value})")  # fmt: skip
    try:
        import uvicorn
    except ImportError:
        raise LmlabError("lmlab serve needs fastapi and uvicorn: pip install fastapi uvicorn") from None
    import logging

    from lmlab.serve.app import Served, create_app

    logging.basicConfig(level=logging.WARNING, format="lmlab serve: %(message)s")
    logging.getLogger("lmlab.serve").setLevel(logging.INFO)  # the batch size as it changes; errors

    served = Served(source=a.model, model_id=a.model_name or a.model, api_key=a.api_key, max_batch=a.max_batch,
                    max_queue=a.max_queue, dtype=a.dtype, log_prompts=a.log_prompts)  # fmt: skip
    app = create_app(served)
    shown = "127.0.0.1" if a.host in ("0.0.0.0", "::") else a.host
    print(f"lmlab serve: {a.model} at http://{shown}:{a.port}/v1 (OpenAI API), http://{shown}:{a.port}/ "
          f"(playground), http://{shown}:{a.port}/docs (API reference)", file=sys.stderr, flush=True)  # fmt: skip
    try:
        uvicorn.run(app, host=a.host, port=a.port, log_level="warning", access_log=False)
    except OSError as e:  # the port is taken, the address is not ours
        raise LmlabError(f"cannot listen on {a.host}:{a.port} ({e.strerror or e}); choose another --port") from None
    return 0
