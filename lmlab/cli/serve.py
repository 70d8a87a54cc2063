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
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: fp32; bf16 for a checkpoint stored in bf16)")
    p.add_argument("--device", default=None, help="cpu (default), cuda, mps, or auto (a GPU if there is one)")
    p.add_argument("--model-name", default=None, help="the id clients send as `model` (default: MODEL)")
    p.add_argument("--log-prompts", action="store_true", help="log each request's prompt (off: prompts are private)")
    p.add_argument("--draft", default=None, metavar="MODEL",
                   help="a smaller model with the same tokenizer: completions it can serve (n=1, no penalties) are "
                        "decoded speculatively, the same text in fewer passes of MODEL")  # fmt: skip
    p.add_argument("--num-assistant-tokens", type=int, default=5, help="--draft: tokens it guesses per pass")


def cmd_serve(a: argparse.Namespace) -> int:
    if a.num_assistant_tokens < 1:
        raise LmlabError(f"--num-assistant-tokens must be >= 1 (got {a.num_assistant_tokens})")
    if a.num_assistant_tokens != 5 and a.draft is None:
        raise LmlabError("--num-assistant-tokens is for --draft MODEL (the draft guesses that many tokens a pass)")
    for name in ("port", "max_batch", "max_queue"):
        value = getattr(a, name)
        if value < (0 if name == "port" else 1) or (name == "port" and value > 65535):
            raise LmlabError(f"--{name.replace('_', '-')} must be {'in 0..65535' if name == 'port' else '>= 1'} "
                             f"(got {value})")  # fmt: skip
    import lmlab

    lmlab._spin_for_decoding()  # before torch loads: OpenMP's default spin (see lmlab/__init__.py)
    try:
        import uvicorn
    except ImportError:
        raise LmlabError("lmlab serve needs fastapi and uvicorn: pip install fastapi uvicorn") from None
    import logging
    import threading
    import time

    from lmlab.serve.app import Served, create_app

    logging.basicConfig(level=logging.WARNING, format="lmlab serve: %(message)s")
    logging.getLogger("lmlab.serve").setLevel(logging.INFO)  # the batch size as it changes; errors
    served = Served(source=a.model, model_id=a.model_name or a.model, api_key=a.api_key, max_batch=a.max_batch,
                    max_queue=a.max_queue, dtype=a.dtype, device=a.device, log_prompts=a.log_prompts,
                    draft=a.draft, num_assistant_tokens=a.num_assistant_tokens, engine_thread=False)  # fmt: skip
    quiet = logging.getLogger("lmlab.serve")
    quiet.setLevel(logging.CRITICAL)  # a load error is said once, below
    served.load()  # first: a model that cannot be served is one line, before any URL is announced
    quiet.setLevel(logging.INFO)
    if served.error:
        raise LmlabError(served.error)
    server = uvicorn.Server(uvicorn.Config(create_app(served, background=None), host=a.host, port=a.port,
                                           log_level="warning", access_log=False))  # fmt: skip
    # HTTP on a thread of its own, the model on the main thread (see lmlab.serve.engine.Engine)
    http = threading.Thread(target=server.run, name="lmlab-http", daemon=True)
    http.start()
    while not server.started and http.is_alive():
        time.sleep(0.02)
    if not server.started:
        raise LmlabError(f"cannot listen on {a.host}:{a.port} (in use, or not an address of this machine); "
                         "choose another --port or --host")  # fmt: skip
    shown = "127.0.0.1" if a.host in ("0.0.0.0", "::") else a.host
    print(f"lmlab serve: {a.model} at http://{shown}:{a.port}/v1 (OpenAI API), http://{shown}:{a.port}/ "
          f"(playground), http://{shown}:{a.port}/docs (API reference)", file=sys.stderr, flush=True)  # fmt: skip
    try:
        if served.engine is not None:
            served.engine.serve_forever()
        else:
            http.join()
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        if served.engine is not None:
            served.engine.close()
        http.join(timeout=10)
    return 0
