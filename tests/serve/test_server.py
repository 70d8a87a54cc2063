"""``lmlab serve`` beyond the OpenAI shapes: the applications' endpoints (against the pipelines
on the same folders), clients that go away, many streams at once, /health while loading, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import running
from helpers import REPO, tiny_hf_encoder, tiny_seq2seq_checkpoint

import lmlab

try:
    import httpx
except ImportError:  # openai 3 ships httpx2 (the same API)
    import httpx2 as httpx


def test_classify_and_qa_endpoints_equal_the_pipelines(tmp_path):
    clf_dir = tiny_hf_encoder(tmp_path / "clf")
    texts = ["the movie was good", "bad"]
    want = lmlab.pipeline("sentiment-analysis", str(clf_dir))(texts, top_k=2)
    with running(clf_dir) as url:
        r = httpx.post(url + "/v1/classify", json={"input": texts, "top_k": 2}, timeout=60)
        assert r.status_code == 200, r.text
        got = r.json()["data"]
        assert [[d["label"] for d in row] for row in got] == [[d["label"] for d in row] for row in want]
        flat = lambda rows: [d["score"] for row in rows for d in row]  # noqa: E731
        assert flat(got) == pytest.approx(flat(want), abs=1e-6)
        r = httpx.post(url + "/v1/classify", json={"input": ""}, timeout=60)
        assert r.status_code == 400 and "\n" not in r.json()["error"]["message"]
        r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and "it answers /v1/classify" in r.json()["error"]["message"]
    qa_dir = tiny_hf_encoder(tmp_path / "qa", task="span")
    q, c = "who is there?", "the movie was good and the actors were bad"
    want = lmlab.pipeline("question-answering", str(qa_dir))(question=q, context=c, top_k=2)
    with running(qa_dir) as url:
        got = httpx.post(url + "/v1/qa", json={"question": q, "context": c, "top_k": 2}, timeout=60).json()["data"]
        assert [(a["answer"], a["start"], a["end"]) for a in got] == [(a["answer"], a["start"], a["end"]) for a in want]
        r = httpx.post(url + "/v1/qa", json={"question": q}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["message"] == "`context` is required"


def test_translate_and_summarize_endpoints(tmp_path):
    src = tiny_seq2seq_checkpoint(tmp_path / "mt")
    want = lmlab.pipeline("translation", str(src))(["the sea", "what is it"], num_beams=2, max_new_tokens=8)
    with running(src) as url:
        r = httpx.post(url + "/v1/translate", json={"input": ["the sea", "what is it"], "num_beams": 2, "max_tokens": 8},
                       timeout=60)  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.json()["data"] == want
        r = httpx.post(url + "/v1/summarize", json={"input": "the sea", "top_k": 3}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "top_k"
        # /v1/summarize: the summarization pipeline's results, with the options and without
        summarize = lmlab.pipeline("summarization", str(src))
        for body, want in [
            ({"input": ["the sea and the sky", "what is it"], "num_beams": 2, "max_tokens": 8},
             summarize(["the sea and the sky", "what is it"], num_beams=2, max_new_tokens=8)),
            ({"input": "the sea and the sky"}, summarize(["the sea and the sky"])),
        ]:  # fmt: skip
            r = httpx.post(url + "/v1/summarize", json=body, timeout=60)
            assert r.status_code == 200, r.text
            assert r.json()["data"] == want and all("summary_text" in d for d in want)


def test_disconnecting_clients_free_their_rows_and_the_rest_complete(lm_dir):
    """32 simultaneous streams, a third of them leaving after two chunks: the others get the
    text they get alone, the server stays up, and every row is freed."""
    model = lmlab.load(lm_dir)
    prompts = ["the sea", "We are", "to be", "the"]
    want = {p: model.generate(p, max_new_tokens=40, temperature=0) for p in prompts}
    with running(lm_dir) as url:
        results: dict[int, str] = {}
        start = threading.Barrier(32)

        def client(i: int) -> None:
            body = {"prompt": prompts[i % 4], "max_tokens": 40, "temperature": 0, "stream": True}
            start.wait()
            text, chunks = "", 0
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    text += json.loads(line[6:])["choices"][0]["text"]
                    chunks += 1
                    if i % 3 == 0 and chunks == 2:
                        return  # leaves mid-stream: the connection closes
            results[i] = text

        threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
        assert sorted(results) == [i for i in range(32) if i % 3]
        assert all(results[i] == want[prompts[i % 4]] for i in results)
        metrics = httpx.get(url + "/metrics").text
        assert int(metrics.split("lmlab_max_running ")[1].split()[0]) > 1
        deadline = time.monotonic() + 10
        while "lmlab_running 0" not in httpx.get(url + "/metrics").text and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "lmlab_running 0" in httpx.get(url + "/metrics").text
        assert httpx.get(url + "/health").status_code == 200


def test_a_non_streaming_client_that_leaves_frees_its_row_within_2_steps(tmp_path, monkeypatch):
    """The engine's step count when the request is cancelled (its client closed the connection)
    and once the batch is empty again (the loop then waits: the count stays put) differ by 2 at most."""
    from helpers import tiny_checkpoint

    from lmlab.serve.engine import Engine, Job

    engines: list[Engine] = []
    at_cancel: list[int] = []
    real_init, real_cancel = Engine.__init__, Job.cancel

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        engines.append(self)

    def cancel(self):
        if not self.cancelled:
            at_cancel.append(engines[0].stats["steps"])
        real_cancel(self)

    monkeypatch.setattr(Engine, "__init__", init)
    monkeypatch.setattr(Job, "cancel", cancel)
    long_lm = tiny_checkpoint(tmp_path / "long", pos="rope", max_seq_len=4096)
    with running(long_lm, model_id="tiny") as url:
        import socket

        body = json.dumps({"prompt": "the", "max_tokens": 4000, "temperature": 1.0}).encode()
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:  # a non-streaming request
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
            deadline = time.monotonic() + 30
            while "lmlab_tokens 0\n" in httpx.get(url + "/metrics").text and time.monotonic() < deadline:
                time.sleep(0.01)  # until it is generating
        # the client closed the connection before its answer
        deadline = time.monotonic() + 10
        while "lmlab_running 0" not in httpx.get(url + "/metrics").text and time.monotonic() < deadline:
            time.sleep(0.02)
        text = httpx.get(url + "/metrics").text
        assert "lmlab_running 0" in text
        tokens = int(text.split("lmlab_tokens ")[1].split()[0])
        assert 0 < tokens < 4000  # it was generating, and stopped early
        assert len(at_cancel) == 1, at_cancel
        steps = int(text.split("lmlab_steps ")[1].split()[0])
        assert steps - at_cancel[0] <= 2, (at_cancel, steps)


def test_health_is_503_while_the_model_loads(lm_dir, monkeypatch):
    from lmlab.serve.app import Served, create_app

    gate = threading.Event()
    real = Served.load

    def slow_load(self):
        gate.wait(30)
        real(self)

    monkeypatch.setattr(Served, "load", slow_load)
    from fastapi.testclient import TestClient

    with TestClient(create_app(Served(source=str(lm_dir), model_id="tiny"))) as tc:
        r = tc.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = tc.post("/v1/completions", json={"prompt": "the"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
        gate.set()
        deadline = time.monotonic() + 30
        while tc.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert tc.get("/health").json() == {"status": "ok", "model": "tiny", "error": None}


def test_the_cli_serves_and_reports_bad_options(lm_dir):
    bad = subprocess.run([sys.executable, "-m", "lmlab", "serve", str(lm_dir), "--port", "70000"],
                         capture_output=True, text=True, timeout=60, cwd=REPO)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.strip() == "lmlab: error: --port must be in 0..65535 (got 70000)"
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.Popen([sys.executable, "-m", "lmlab", "serve", str(lm_dir), "--port", str(port), "--model-name", "m"],
                         stderr=subprocess.PIPE, text=True, cwd=REPO)  # fmt: skip
    try:
        first = p.stderr.readline()
        assert f"http://127.0.0.1:{port}/v1" in first and "playground" in first
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": "m", "prompt": "the", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["model"] == "m"
    finally:
        p.terminate()
        p.wait(timeout=30)


def _rss() -> int:
    import gc

    gc.collect()
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_memory_stays_flat_over_a_thousand_requests_with_disconnects(lm_dir):
    """32 clients at a time, a third of them leaving mid-stream: memory after 1,000 requests is
    within 10% of memory after the first 100 (nothing a finished or abandoned request held is
    kept), every client that stays gets what ``Model.generate`` gives, and no row is left behind."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = ["the", "We are", "to be"]

    def options(i: int) -> dict:  # the requests repeat every 30: their references are computed once
        j = i % 30
        return {"prompt": prompts[j % 3], "max_tokens": 6 + j % 5, "temperature": 0.9, "seed": j, "n": 1 + j % 2}

    model = lmlab.load(lm_dir)
    want = {j: model.generate(o["prompt"], max_new_tokens=o["max_tokens"], temperature=0.9, seed=j,
                              num_return_sequences=o["n"]) for j, o in ((j, options(j)) for j in range(30))}  # fmt: skip
    left: list[int] = []
    with running(lm_dir) as url, httpx.Client(timeout=60, limits=httpx.Limits(max_connections=64)) as http:

        def one(i: int) -> None:
            if i % 3 == 0:  # streams, and leaves after two chunks: the connection closes mid-stream
                body = {"prompt": prompts[i % 2], "max_tokens": 60, "temperature": 0.9, "seed": i, "stream": True}
                with http.stream("POST", url + "/v1/completions", json=body) as r:
                    assert r.status_code == 200
                    chunks = 0
                    for line in r.iter_lines():
                        chunks += line.startswith("data: {")
                        if chunks == 2:
                            left.append(i)
                            return
                raise AssertionError("the stream ended before the client left")
            body = options(i) | {"stream": i % 4 == 1}
            texts = [""] * body["n"]
            if body["stream"]:
                with http.stream("POST", url + "/v1/completions", json=body) as r:
                    assert r.status_code == 200
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            choice = json.loads(line[6:])["choices"][0]
                            texts[choice["index"]] += choice["text"]
            else:
                r = http.post(url + "/v1/completions", json=body)
                assert r.status_code == 200, r.text
                texts = [c["text"] for c in r.json()["choices"]]
            assert texts == (want[i % 30] if body["n"] > 1 else [want[i % 30]]), (i, body)

        with ThreadPoolExecutor(32) as pool:
            list(pool.map(one, range(100)))
            after_100 = _rss()
            list(pool.map(one, range(100, 1000)))
            after_1000 = _rss()
        assert len(left) == 334
        metrics = httpx.get(url + "/metrics").text
        deadline = time.monotonic() + 10
        while "lmlab_running 0\n" not in metrics and time.monotonic() < deadline:
            time.sleep(0.05)
            metrics = httpx.get(url + "/metrics").text
        assert "lmlab_running 0\n" in metrics and "lmlab_waiting 0\n" in metrics
        stat = lambda name: int(metrics.split(f"lmlab_{name} ")[1].split()[0])  # noqa: E731
        assert stat("max_running") > 1
        # the clients that left stopped their rows: far fewer than their 60 tokens each (about 2.5 here)
        stayed = sum(options(i)["n"] * options(i)["max_tokens"] for i in range(1000) if i % 3)
        assert stat("tokens") - stayed < len(left) * 30, (stat("tokens"), stayed)
        assert httpx.get(url + "/health").status_code == 200
    assert after_1000 <= 1.10 * after_100, (after_100, after_1000)


def test_prompts_are_logged_only_when_asked(lm_dir, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="lmlab.serve")
    for log_prompts in (False, True):
        caplog.clear()
        with running(lm_dir, log_prompts=log_prompts) as url:
            httpx.post(url + "/v1/completions", json={"prompt": "the secret", "max_tokens": 2}, timeout=60)
        assert ("the secret" in caplog.text) is log_prompts


def test_the_running_batch_size_is_logged_under_concurrent_load(lm_dir, caplog):
    """The engine logs the running batch size (``batch: N running, ...``, at most once a second):
    under 8 concurrent clients it says more than 1, as /metrics' max_running does."""
    import logging
    import re

    caplog.set_level(logging.INFO, logger="lmlab.serve")
    from concurrent.futures import ThreadPoolExecutor

    def client(i: int, start: threading.Barrier) -> int:
        start.wait()
        body = {"prompt": "the", "max_tokens": 60 + 20 * i, "temperature": 0}
        return httpx.post(url + "/v1/completions", json=body, timeout=60).status_code

    with running(lm_dir) as url, ThreadPoolExecutor(8) as pool:
        sizes: list[int] = []
        deadline = time.monotonic() + 30
        while not any(n > 1 for n in sizes) and time.monotonic() < deadline:  # rounds of 8 at once
            start = threading.Barrier(8)
            assert list(pool.map(client, range(8), [start] * 8)) == [200] * 8
            sizes = [int(n) for n in re.findall(r"batch: (\d+) running, \d+ waiting", caplog.text)]
        assert any(n > 1 for n in sizes), caplog.text[-2000:]
        metrics = httpx.get(url + "/metrics").text
        assert max(sizes) <= int(metrics.split("lmlab_max_running ")[1].split()[0]) <= 8


def test_a_5_token_request_finishes_before_a_2000_token_one_sent_first(tmp_path):
    """Real batching, not a lock around one generation: the short request joins the running
    batch at the next step and leaves when done."""
    from helpers import tiny_checkpoint

    long_lm = tiny_checkpoint(tmp_path / "long", pos="rope", max_seq_len=4096)
    with running(long_lm) as url:
        done: list[str] = []

        def long_request() -> None:
            r = httpx.post(url + "/v1/completions", json={"prompt": "the", "max_tokens": 2000, "temperature": 0}, timeout=300)
            assert r.json()["usage"]["completion_tokens"] == 2000
            done.append("long")

        t = threading.Thread(target=long_request)
        t.start()
        deadline = time.monotonic() + 30
        while "lmlab_running 1" not in httpx.get(url + "/metrics").text and time.monotonic() < deadline:
            time.sleep(0.005)
        r = httpx.post(url + "/v1/completions", json={"prompt": "We are", "max_tokens": 5, "temperature": 0}, timeout=300)
        assert r.json()["usage"]["completion_tokens"] == 5
        done.append("short")
        t.join(timeout=300)
        assert done == ["short", "long"]


def test_inspect_endpoint_equals_the_python_api(lm_dir, tmp_path):
    model = lmlab.load(lm_dir)
    text = "the sea and the sky"
    with running(lm_dir) as url:
        r = httpx.post(url + "/v1/inspect", json={"text": text, "top_k": 3}, timeout=60).json()
        assert r["tokens"] == model.tokens(text)
        got = torch.tensor(r["attention"]["weights"])
        torch.testing.assert_close(got, model.attention(text), atol=1e-6, rtol=0)
        lps = [t["logprob"] for t in r["surprisal"]]
        assert lps[0] is None and lps[1:] == pytest.approx(model.token_logprobs(text).tolist(), abs=1e-6)
        assert all(len(t["top"]) == 3 for t in r["surprisal"][1:])
        r = httpx.post(url + "/v1/inspect", json={"text": "the " * 300}, timeout=60)
        assert r.status_code == 400 and "256 at most" in r.json()["error"]["message"]
    clf = tiny_hf_encoder(tmp_path / "clf")
    with running(clf) as url:
        r = httpx.post(url + "/v1/inspect", json={"text": "the movie was good"}, timeout=60).json()
        assert r["surprisal"] is None and r["attention"]["layers"] == 2


def test_a_chunked_body_over_the_limit_is_413(lm_dir):
    with running(lm_dir, max_body=10_000) as url:

        def chunks():
            body = json.dumps({"prompt": "the " * 5000, "max_tokens": 2}).encode()
            for i in range(0, len(body), 1000):
                yield body[i : i + 1000]

        r = httpx.post(url + "/v1/completions", content=chunks(), headers={"Content-Type": "application/json"}, timeout=60)
        assert "content-length" not in {k.lower() for k in r.request.headers}
        assert r.status_code == 413 and "10,000 bytes" in r.json()["error"]["message"], r.text


def test_a_failing_prefill_fails_only_its_own_request(lm_dir, monkeypatch):
    """The new request gets its error (no hang); the request already running finishes."""
    from lmlab.serve.engine import Engine

    real = Engine._prefill

    def prefill(self, jobs):
        if any(len(j.prompt_ids) == 7 for j in jobs):
            raise RuntimeError("out of memory (simulated)")
        return real(self, jobs)

    monkeypatch.setattr(Engine, "_prefill", prefill)
    with running(lm_dir) as url:
        out: dict[str, int] = {}

        def long_one() -> None:
            r = httpx.post(url + "/v1/completions", json={"prompt": "the", "max_tokens": 200, "temperature": 0}, timeout=60)
            out["long"] = r.status_code

        t = threading.Thread(target=long_one)
        t.start()
        while "lmlab_running 1" not in httpx.get(url + "/metrics").text:
            time.sleep(0.005)
        r = httpx.post(url + "/v1/completions", json={"prompt": "the sea", "max_tokens": 3}, timeout=30)  # 7 tokens
        assert r.status_code == 500 and "traceback" in r.json()["error"]["message"]
        t.join(timeout=60)
        assert out == {"long": 200}


def test_a_client_gone_before_its_answer_leaves_no_waiting_handler(tmp_path):
    """The handler of a non-streaming request whose client left ends (no coroutine waits forever:
    uvicorn would wait for it at shutdown)."""
    from helpers import tiny_checkpoint

    long_lm = tiny_checkpoint(tmp_path / "long", pos="rope", max_seq_len=4096)
    with running(long_lm) as url:
        try:
            httpx.post(url + "/v1/completions", json={"prompt": "the", "max_tokens": 4000}, timeout=0.3)
        except httpx.TimeoutException:
            pass
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 9  # the server shut down without waiting on a stuck request


def test_a_full_queue_is_a_429_in_openais_envelope(tmp_path):
    from helpers import tiny_checkpoint

    long_lm = tiny_checkpoint(tmp_path / "long", pos="rope", max_seq_len=4096)
    with running(long_lm, max_batch=1, max_queue=1) as url:
        body = {"prompt": "the", "max_tokens": 3000, "temperature": 0}
        running_one = threading.Thread(target=lambda: httpx.post(url + "/v1/completions", json=body, timeout=120))
        running_one.start()
        while "lmlab_running 1" not in httpx.get(url + "/metrics").text:
            time.sleep(0.005)
        waiting = threading.Thread(target=lambda: httpx.post(url + "/v1/completions", json=body, timeout=120))
        waiting.start()
        while "lmlab_waiting 1" not in httpx.get(url + "/metrics").text:
            time.sleep(0.005)
        r = httpx.post(url + "/v1/completions", json={"prompt": "the", "max_tokens": 2}, timeout=60)
        assert r.status_code == 429, r.text
        err = r.json()["error"]
        assert err["code"] == "queue_full" and "--max-queue 1" in err["message"]
        running_one.join(timeout=120)
        waiting.join(timeout=120)
