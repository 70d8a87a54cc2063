"""``lmlab serve`` through the official ``openai`` client (max_retries=0) and plain HTTP.

The reference for every text is ``Model.generate`` on the same checkpoint (the decoding loop,
tested against transformers elsewhere); shapes are OpenAI's, as the client parses them."""

from __future__ import annotations

import json

try:
    import httpx
except ImportError:  # openai 3 ships httpx2 (the same API)
    import httpx2 as httpx
import openai
import pytest
from conftest import running

import lmlab


@pytest.fixture(scope="module")
def server(lm_dir):
    with running(lm_dir, api_key="sekret") as url:
        yield url


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key="sekret", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(lm_dir):
    return lmlab.load(lm_dir)


def test_models_list(client):
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_completion_equals_generate_with_stop_and_usage(client, model):
    r = client.completions.create(model="tiny", prompt="the sea", max_tokens=20, temperature=0, stop=["\n"])
    want = model.generate("the sea", max_new_tokens=20, temperature=0, stop=["\n"], return_details=True)
    assert r.choices[0].text == want.text
    assert r.choices[0].finish_reason == ("stop" if want.finish_reason != "length" else "length")
    assert r.usage.prompt_tokens == len(model.encode("the sea"))
    assert r.usage.completion_tokens == len(want.token_ids)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.created > 0


def test_n_choices_seeded_and_reproducible(client, model):
    a = client.completions.create(model="tiny", prompt="We are", max_tokens=8, n=2, temperature=1.0, seed=5)
    b = client.completions.create(model="tiny", prompt="We are", max_tokens=8, n=2, temperature=1.0, seed=5)
    want = model.generate("We are", max_new_tokens=8, temperature=1.0, seed=5, num_return_sequences=2)
    assert [c.text for c in a.choices] == [c.text for c in b.choices] == want
    assert [c.index for c in a.choices] == [0, 1]


def test_logprobs_and_echo(client, model):
    r = client.completions.create(model="tiny", prompt="the", max_tokens=4, temperature=0, logprobs=2, echo=True)
    lp = r.choices[0].logprobs
    want = model.generate("the", max_new_tokens=4, temperature=0, logprobs=2, return_details=True)
    assert r.choices[0].text == "the" + want.text
    assert lp.tokens == ["t", "h", "e"] + [t.token for t in want.logprobs] and lp.token_logprobs[0] is None
    assert lp.token_logprobs[3:] == pytest.approx([t.logprob for t in want.logprobs], abs=1e-5)
    assert lp.text_offset == list(range(len(lp.tokens)))  # one character per token
    assert all(len(t) == 2 for t in lp.top_logprobs[1:]) and lp.top_logprobs[0] is None


def test_chat_with_and_without_streaming(client, model):
    messages = [{"role": "system", "content": "Talk less."}, {"role": "user", "content": "你好, who art thou?"}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    prompt = ("<|im_start|>system\nTalk less.<|im_end|>\n<|im_start|>user\n你好, who art thou?<|im_end|>\n"
              "<|im_start|>assistant\n")
    want = model.generate(prompt, max_new_tokens=12, temperature=0, stop=["<|im_end|>"])
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-2].choices[0].finish_reason in ("stop", "length") and chunks[-2].choices[0].delta.content is None
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_chat_logprobs_shape(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                       temperature=0, logprobs=True, top_logprobs=2)  # fmt: skip
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 for c in content)
    assert all(bytes(c.bytes).decode("utf-8", "replace") == c.token for c in content if c.bytes is not None)
    assert all(c.logprob <= 0 and c.logprob == pytest.approx(max(t.logprob for t in c.top_logprobs), abs=1e-5)
               for c in content)  # greedy: the chosen token is the best one


@pytest.mark.parametrize(
    "kwargs,param,message",
    [
        (dict(temperature=2.5), "temperature", "less than or equal to 2"),
        (dict(top_p=0), "top_p", "greater than 0"),
        (dict(n=0), "n", "greater than or equal to 1"),
        (dict(max_tokens=0), "max_tokens", "greater than or equal to 1"),
        (dict(max_tokens=10_000), None, "more than the model's context of 256 tokens"),
        (dict(best_of=2), "best_of", "`best_of` is not supported"),
        (dict(logit_bias={"1": 5}), "logit_bias", "`logit_bias` is not supported"),
        (dict(extra_body={"frobnicate": 1}), "frobnicate", "not a field of this request"),
    ],
)
def test_bad_completion_requests_are_400s_naming_the_field(client, kwargs, param, message):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="O", **({"max_tokens": 4} | kwargs))
    err = e.value.body
    assert message in err["message"] and err["param"] == param, err


def test_chat_tools_and_json_mode_are_refused(client):
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError, match="`tools` is not supported"):
        client.chat.completions.create(model="tiny", messages=msgs, tools=[{"type": "function", "function": {"name": "f"}}])
    with pytest.raises(openai.BadRequestError, match="response_format 'json_object' is not supported"):
        client.chat.completions.create(model="tiny", messages=msgs, response_format={"type": "json_object"})
    with pytest.raises(openai.BadRequestError, match=r"messages"):
        client.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "x"}])


def test_auth_and_not_found(server):
    bad = openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="the API key is wrong"):
        bad.models.list()
    good = openai.OpenAI(base_url=server + "/v1", api_key="sekret", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        good.completions.create(model="gpt-17", prompt="x", max_tokens=2)
    r = httpx.post(server + "/v1/nowhere", headers={"Authorization": "Bearer sekret"}, json={})
    assert r.status_code == 404 and "no route POST /v1/nowhere" in r.json()["error"]["message"]


def test_broken_json_oversized_body_and_wrong_kind_are_4xx(server):
    h = {"Authorization": "Bearer sekret", "Content-Type": "application/json"}
    r = httpx.post(server + "/v1/completions", headers=h, content=b"{not json")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(server + "/v1/completions", headers=h, content=b"x" * (9 << 20))
    assert r.status_code == 413
    r = httpx.post(server + "/v1/classify", headers=h, json={"input": "good"})
    assert r.status_code == 400 and "it answers /v1/completions and /v1/chat/completions" in r.json()["error"]["message"]


def test_streamed_completion_framing(server, model):
    h = {"Authorization": "Bearer sekret"}
    body = {"model": "tiny", "prompt": "the sea", "max_tokens": 6, "temperature": 0, "stream": True}
    with httpx.stream("POST", server + "/v1/completions", headers=h, json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [x for x in r.iter_lines() if x]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(x[6:]) for x in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == model.generate("the sea", max_new_tokens=6, temperature=0)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
