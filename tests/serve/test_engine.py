"""The batching engine (lmlab.serve.engine): every request gets what ``Model.generate`` gives
it alone — greedy, seeded sampling, stop strings, n choices, penalties — however many others
share its steps, and whenever they join or leave. The reference is ``Model.generate``, the
decoding loop tested against transformers elsewhere."""

from __future__ import annotations

import queue
import threading
import time

import pytest
import torch
from helpers import tiny_checkpoint

import lmlab
from lmlab.nn.cache import KVCache
from lmlab.serve.engine import Engine, Job, QueueFull, TokenEvent

PROMPTS = ["ROMEO:", "First Citizen:\nBefore we go", "O", "JULIET: What is thy name? Speak, I pray"]


@pytest.fixture(scope="module", params=["gpt", "lstm"])
def model(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    if request.param == "gpt":
        return lmlab.load(tiny_checkpoint(d / "m", pos="rope", max_seq_len=512))
    from helpers import char_tokenizer, write_checkpoint

    from lmlab.models.config import RNNConfig
    from lmlab.models.rnn import RNNLanguageModel

    torch.manual_seed(0)
    tok = char_tokenizer()
    module = RNNLanguageModel(RNNConfig(vocab_size=tok.get_vocab_size(), d_model=16, hidden_size=32, n_layer=2)).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(4)  # far from uniform: greedy choices not decided by rounding noise
    return lmlab.load(write_checkpoint(d / "m", module, tok, {}))


def run(engine: Engine, model, prompt: str, n: int = 1, **options) -> tuple[list[str], list[str], list[list[int]]]:
    """Submit one request; its choices' texts (joined deltas), finish reasons and token ids."""
    events: queue.Queue = queue.Queue()
    cfg = model._gen_config(**options)
    engine.submit(Job(model.encode(prompt), cfg, events.put, n=n))
    texts, reasons, ids = [""] * n, [""] * n, [[] for _ in range(n)]
    done = 0
    while done < n:
        ev = events.get(timeout=60)
        assert isinstance(ev, TokenEvent), ev
        texts[ev.index] += ev.delta
        if ev.finish:
            reasons[ev.index], ids[ev.index] = ev.finish, ev.token_ids
            assert ev.text == texts[ev.index]  # the deltas add up to the whole text
            done += 1
    return texts, reasons, ids


CASES = [
    dict(temperature=0, max_new_tokens=12),
    dict(temperature=1.0, top_p=0.9, seed=7, max_new_tokens=10),
    dict(temperature=0.7, top_k=5, seed=3, max_new_tokens=9, repetition_penalty=1.3, presence_penalty=0.5),
    dict(temperature=0, max_new_tokens=30, stop=["e", "\n"]),
]


@pytest.mark.parametrize("options", CASES)
def test_concurrent_requests_equal_each_alone(model, options):
    engine = Engine(model, max_batch=8)
    try:
        results: dict[int, tuple] = {}
        start = threading.Barrier(len(PROMPTS) * 2)

        def client(i: int, prompt: str) -> None:
            start.wait()
            time.sleep(0.002 * (i // 2))  # pairs arrive together, later ones while others are mid-generation
            results[i] = run(engine, model, prompt, **options)

        threads = [threading.Thread(target=client, args=(i, p)) for i, p in enumerate(PROMPTS * 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        for i, p in enumerate(PROMPTS * 2):
            want = model.generate(p, return_details=True, **options)
            texts, reasons, ids = results[i]
            assert (texts[0], ids[0]) == (want.text, want.token_ids), p
            assert reasons[0] == {"eos": "stop", "stop": "stop", "length": "length"}[want.finish_reason]
        assert engine.stats["max_running"] > 1  # real batching, not one at a time
    finally:
        engine.close()


def test_n_choices_equal_num_return_sequences(model):
    engine = Engine(model)
    try:
        texts, _, _ = run(engine, model, "ROMEO:", n=3, temperature=1.0, seed=11, max_new_tokens=8)
        want = model.generate("ROMEO:", temperature=1.0, seed=11, max_new_tokens=8, num_return_sequences=3)
        assert texts == want
    finally:
        engine.close()


def test_a_short_request_finishes_before_a_long_one_that_started_first(model):
    engine = Engine(model)
    try:
        order: list[str] = []
        long = threading.Thread(target=lambda: (run(engine, model, "O", temperature=0, max_new_tokens=400), order.append("long")))
        long.start()
        while engine.stats["running"] == 0:
            time.sleep(0.001)
        run(engine, model, "ROMEO:", temperature=0, max_new_tokens=5)
        order.append("short")
        long.join(timeout=120)
        assert order == ["short", "long"]
    finally:
        engine.close()


def test_a_cancelled_request_leaves_the_batch(model):
    engine = Engine(model)
    try:
        events: queue.Queue = queue.Queue()
        job = Job(model.encode("O"), model._gen_config(temperature=0, max_new_tokens=500), events.put)
        engine.submit(job)
        events.get(timeout=30)
        job.cancel()
        deadline = time.monotonic() + 10
        while engine.stats["running"] and time.monotonic() < deadline:
            time.sleep(0.005)
        assert engine.stats["running"] == 0
        run(engine, model, "O", temperature=0, max_new_tokens=3)  # and the engine goes on serving
    finally:
        engine.close()


def test_a_request_beyond_the_context_is_refused(model):
    if not model.module.bounded_context:
        pytest.skip("a recurrent model has no context limit")
    engine = Engine(model)
    try:
        with pytest.raises(lmlab.LmlabError, match=r"the prompt \(2 tokens\) \+ max_tokens \(511\) is more than the model's context of 512 tokens; ask for at most 510"):
            engine.submit(Job(model.encode("O,"), model._gen_config(max_new_tokens=511), lambda e: None))
        whole = [model.encode("O,")[0]] * 512  # the prompt alone fills the context: shorten it
        with pytest.raises(lmlab.LmlabError, match=r"\(512 tokens\) .* shorten the prompt"):
            engine.submit(Job(whole, model._gen_config(max_new_tokens=1), lambda e: None))
    finally:
        engine.close()


def test_a_full_queue_is_refused(model):
    engine = Engine(model, max_batch=1, max_queue=1)
    try:
        jobs = [Job(model.encode("the"), model._gen_config(temperature=0, max_new_tokens=500), lambda e: None)
                for _ in range(3)]  # fmt: skip
        engine.submit(jobs[0])
        while engine.stats["running"] == 0:
            time.sleep(0.001)
        engine.submit(jobs[1])  # waits: the batch is full
        with pytest.raises(QueueFull, match="1 requests are waiting \\(--max-queue 1\\)"):
            engine.submit(jobs[2])
    finally:
        for job in jobs:
            job.cancel()
        engine.close()


def test_kv_cache_join_right_aligns_rows_and_trim_drops_common_padding():
    a = KVCache(1, 1, 1, 8, 2)
    b = KVCache(1, 2, 1, 8, 2)
    ka, kb = torch.arange(6.0).reshape(1, 1, 3, 2), torch.arange(20.0).reshape(2, 1, 5, 2) + 100
    a.update(0, ka, ka), a.mark(None, 3), a.advance(3)
    b.update(0, kb, kb), b.mark(None, 5), b.advance(5)
    j = KVCache.join([a, b], extra=4)
    assert (j.batch_size, j.length, j.remaining) == (3, 5, 4)
    torch.testing.assert_close(j._k[0, 0, :, 2:5], ka[0])
    torch.testing.assert_close(j._k[0, 1:, :, :5], kb)
    assert j.key_mask(5).tolist() == [[False, False, True, True, True], [True] * 5, [True] * 5]
    j.select(torch.tensor([0])).trim()
    assert (j.length, j.has_padding) == (3, False)
    torch.testing.assert_close(j._k[0, 0, :, :3], ka[0])


def test_a_cancelled_row_leaves_within_two_steps(model):
    """A client that goes away frees its row within 2 engine steps (``stats['steps']``: one per
    token chosen for the batch), counted by turning the loop by hand; the row beside it goes on
    and gets what it gets alone."""
    engine = Engine(model, max_batch=4, thread=False)
    cfg = model._gen_config(temperature=0, max_new_tokens=60)
    got: dict[str, list[TokenEvent]] = {"leaves": [], "stays": []}
    leaves = Job(model.encode("O"), cfg, got["leaves"].append)
    stays = Job(model.encode("ROMEO:"), cfg, got["stays"].append)
    engine.submit(leaves)
    engine.submit(stays)
    for _ in range(6):  # the prefill (both join), then 5 tokens each
        engine.step()
    assert engine.stats["running"] == 2 and len(got["leaves"]) == len(got["stays"]) == 5
    leaves.cancel()
    steps, emitted = engine.stats["steps"], len(got["leaves"])
    while engine.stats["running"] == 2:
        engine.step()
        assert engine.stats["steps"] - steps <= 2, "the cancelled row is still in the batch after 2 steps"
    assert engine.stats["running"] == 1 and len(got["leaves"]) == emitted  # no token was made for it since
    while engine.stats["running"]:
        engine.step()
    want = model.generate("ROMEO:", max_new_tokens=60, temperature=0, return_details=True)
    assert "".join(ev.delta for ev in got["stays"]) == want.text and got["stays"][-1].token_ids == want.token_ids
    engine.close()


def test_greedy_steps_screen_the_output_layer_and_unroll_and_equal_generate_unscreened(model, monkeypatch):
    """Greedy rows only: each batched step reads the output layer through the screen (any size
    of head here) and takes the unrolled one-token step (a Transformer); a sampling row in the
    batch turns the screen off. Every request still gets what ``Model.generate`` gives it with
    the screen off (the reference: the full product)."""
    from lmlab.nn import screen
    from lmlab.nn.screen import ScreenedLinear

    monkeypatch.setattr(screen, "MIN_WEIGHT", 0)
    opts = dict(temperature=0, max_new_tokens=12)
    model.module.screen_output = False
    want = [model.generate(p, return_details=True, **opts).token_ids for p in PROMPTS]
    model.module.screen_output = True
    screened, unrolled = [], []
    real_screened = ScreenedLinear._screened
    monkeypatch.setattr(ScreenedLinear, "_screened", lambda self, *a: screened.append(1) or real_screened(self, *a))
    if hasattr(model.module, "blocks"):
        block = type(model.module.blocks[0])
        real_step = block.step
        monkeypatch.setattr(block, "step", lambda self, *a: unrolled.append(1) or real_step(self, *a))
    engine = Engine(model, max_batch=8, thread=False)
    try:
        results: dict[int, tuple] = {}
        threads = [threading.Thread(target=lambda i=i, p=p: results.__setitem__(i, run(engine, model, p, **opts)))
                   for i, p in enumerate(PROMPTS)]  # fmt: skip
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            engine.step()
        assert [results[i][2][0] for i in range(len(PROMPTS))] == want
        assert screened and (unrolled or not hasattr(model.module, "blocks"))
        screened.clear()
        sampling = dict(temperature=1.0, seed=1, max_new_tokens=12)
        sampled = threading.Thread(target=lambda: results.__setitem__(8, run(engine, model, "O", **sampling)))
        greedy = threading.Thread(target=lambda: results.__setitem__(9, run(engine, model, PROMPTS[0], **opts)))
        sampled.start(), greedy.start()
        while sampled.is_alive() or greedy.is_alive():
            engine.step()
        assert results[9][2][0] == want[0]
        assert results[8][2][0] == model.generate("O", return_details=True, **sampling).token_ids
        model.module.screen_output = False  # read at every step: no screen from here on
        screened.clear()
        greedy = threading.Thread(target=lambda: results.__setitem__(10, run(engine, model, PROMPTS[1], **opts)))
        greedy.start()
        while greedy.is_alive():
            engine.step()
        assert results[10][2][0] == want[1] and not screened
    finally:
        engine.close()
        model.module.screen_output = None
