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


# ---------------------------------------------------------------- the request fields, one by one
def test_a_list_of_prompts_with_n_2(client, model):
    """choices[k * n + j] is prompt k's choice j, each what that prompt gets alone."""
    prompts, opts = ["the sea", "We are"], dict(max_tokens=8, temperature=1.0, seed=3)
    r = client.completions.create(model="tiny", prompt=prompts, n=2, **opts)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for k, p in enumerate(prompts):
        want = model.generate(p, max_new_tokens=8, temperature=1.0, seed=3, num_return_sequences=2)
        alone = client.completions.create(model="tiny", prompt=p, n=2, **opts)
        assert [c.text for c in r.choices[2 * k : 2 * k + 2]] == [c.text for c in alone.choices] == want, p
    assert len({c.text for c in r.choices}) == 4  # a shuffled order could not pass unnoticed
    assert r.usage.prompt_tokens == sum(len(model.encode(p)) for p in prompts)


def test_stop_as_a_single_string(client, model):
    free = model.generate("the sea", max_new_tokens=20, temperature=0)
    stop = free[5:7]
    want = model.generate("the sea", max_new_tokens=20, temperature=0, stop=[stop], return_details=True)
    assert want.finish_reason == "stop" and len(want.text) < len(free)  # the stop string ends it early
    r = client.completions.create(model="tiny", prompt="the sea", max_tokens=20, temperature=0, stop=stop)
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == "stop"


CHAT_HI = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"  # lmlab's default template (ChatML)


def test_chat_max_completion_tokens_wins_over_max_tokens(client, model):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], temperature=0,
                                       max_completion_tokens=5, max_tokens=9)  # fmt: skip
    want = model.generate(CHAT_HI, max_new_tokens=5, temperature=0, stop=["<|im_end|>"], return_details=True)
    assert r.choices[0].message.content == want.text
    assert r.usage.completion_tokens == len(want.token_ids) == 5 and r.choices[0].finish_reason == "length"


def test_user_is_accepted_and_changes_nothing(client, model):
    r = client.completions.create(model="tiny", prompt="the sea", max_tokens=8, temperature=0, user="alice-42")
    assert r.choices[0].text == model.generate("the sea", max_new_tokens=8, temperature=0)
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                       temperature=0, user="alice-42")  # fmt: skip
    assert r.choices[0].message.content == model.generate(CHAT_HI, max_new_tokens=6, temperature=0, stop=["<|im_end|>"])


@pytest.mark.parametrize("penalties", [dict(frequency_penalty=1.5), dict(presence_penalty=1.5),
                                       dict(frequency_penalty=-1.0, presence_penalty=0.8)])  # fmt: skip
def test_frequency_and_presence_penalties(client, model, penalties):
    want = model.generate("the sea", max_new_tokens=24, temperature=0, **penalties)
    assert want != model.generate("the sea", max_new_tokens=24, temperature=0)  # they matter for this prompt
    r = client.completions.create(model="tiny", prompt="the sea", max_tokens=24, temperature=0, **penalties)
    assert r.choices[0].text == want
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=16,
                                       temperature=0, **penalties)  # fmt: skip
    assert r.choices[0].message.content == model.generate(CHAT_HI, max_new_tokens=16, temperature=0,
                                                          stop=["<|im_end|>"], **penalties)  # fmt: skip


@pytest.mark.parametrize("extra", [{"top_k": 3}, {"min_p": 0.2}, {"top_k": 5, "min_p": 0.05}])
def test_top_k_and_min_p_as_extra_body_fields(client, model, extra):
    opts = dict(temperature=1.0, seed=7, max_new_tokens=16)
    want = model.generate("We are", **opts, **extra)
    assert want != model.generate("We are", **opts)  # the option changes this seeded sample
    r = client.completions.create(model="tiny", prompt="We are", max_tokens=16, temperature=1.0, seed=7,
                                  extra_body=extra)  # fmt: skip
    assert r.choices[0].text == want


def test_streamed_completions_with_include_usage(client, model):
    """A usage chunk (``choices: []``) last, counting every choice's tokens; none before it."""
    prompts = ["the sea", "We are"]
    chunks = list(client.completions.create(model="tiny", prompt=prompts, n=2, max_tokens=6, temperature=1.0, seed=4,
                                            stream=True, stream_options={"include_usage": True}))  # fmt: skip
    *body, last = chunks
    assert last.choices == [] and all(c.usage is None for c in body)
    want = [model.generate(p, max_new_tokens=6, temperature=1.0, seed=4, num_return_sequences=2, return_details=True)
            for p in prompts]  # fmt: skip
    texts = ["", "", "", ""]
    for c in body:
        texts[c.choices[0].index] += c.choices[0].text
    assert texts == [w.text for ws in want for w in ws]
    assert last.usage.prompt_tokens == sum(len(model.encode(p)) for p in prompts)
    assert last.usage.completion_tokens == sum(len(w.token_ids) for ws in want for w in ws)
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    plain = list(client.completions.create(model="tiny", prompt="the", max_tokens=3, stream=True))
    assert all(c.usage is None and c.choices for c in plain)  # no usage chunk unless asked


def _joined(chunks) -> dict[str, list]:
    """The completions log-probabilities of a stream's chunks, concatenated."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for c in chunks:
        if c.choices and c.choices[0].logprobs is not None:
            for key in out:
                out[key] += getattr(c.choices[0].logprobs, key)
    return out


def _same_logprobs(got: dict[str, list], want) -> None:
    assert got["tokens"] == want.tokens and got["text_offset"] == want.text_offset
    assert [x is None for x in got["token_logprobs"]] == [x is None for x in want.token_logprobs]
    assert [x for x in got["token_logprobs"] if x is not None] == pytest.approx(
        [x for x in want.token_logprobs if x is not None], abs=1e-5)
    assert [None if t is None else sorted(t) for t in got["top_logprobs"]] == \
        [None if t is None else sorted(t) for t in want.top_logprobs]  # fmt: skip
    for a, b in zip(got["top_logprobs"], want.top_logprobs):
        assert a is None or [a[k] for k in sorted(a)] == pytest.approx([b[k] for k in sorted(b)], abs=1e-5)


@pytest.mark.parametrize("echo", [False, True])
def test_streamed_completion_logprobs_equal_the_unstreamed_ones(client, model, echo):
    body = dict(model="tiny", prompt="the sea", max_tokens=6, temperature=0, logprobs=2, echo=echo)
    whole = client.completions.create(**body).choices[0].logprobs
    got = _joined(client.completions.create(**body, stream=True))
    _same_logprobs(got, whole)
    want = model.generate("the sea", max_new_tokens=6, temperature=0, logprobs=2, return_details=True)
    assert got["token_logprobs"][-6:] == pytest.approx([t.logprob for t in want.logprobs], abs=1e-5)
    if echo:  # the prompt's tokens first, each given the ones before it
        assert got["tokens"][:7] == list("the sea") and got["token_logprobs"][0] is None
        assert got["token_logprobs"][1:7] == pytest.approx(model.token_logprobs("the sea").tolist(), abs=1e-5)
        assert got["text_offset"] == list(range(13))
    else:
        assert got["text_offset"] == list(range(7, 13))


def test_streamed_chat_logprobs_equal_the_unstreamed_ones(client):
    body = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0,
                logprobs=True, top_logprobs=2)  # fmt: skip
    whole = client.chat.completions.create(**body).choices[0].logprobs.content
    got = [x for c in client.chat.completions.create(**body, stream=True)
           if c.choices and c.choices[0].logprobs is not None for x in c.choices[0].logprobs.content]  # fmt: skip
    assert len(got) == len(whole) == 5
    assert [(x.token, x.bytes, [t.token for t in x.top_logprobs]) for x in got] == \
        [(x.token, x.bytes, [t.token for t in x.top_logprobs]) for x in whole]  # fmt: skip
    assert [x.logprob for x in got] == pytest.approx([x.logprob for x in whole], abs=1e-5)


@pytest.mark.parametrize(
    "body,param,message",
    [
        ({"messages": [{"role": "user", "content": None}]}, "messages[0].content",
         "messages[0].content must be a string or a list of text parts, got null"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages[1].content[0]",
         "messages[1].content[0] is of type 'image_url': only text parts are supported"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text",
         "messages[0].content[0].text must be a string, got nothing"),
        ({"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}, "top_logprobs",
         "`top_logprobs` needs `logprobs: true`"),
        ({"messages": [{"role": "user", "content": "a"}], "stop": ["a", "b", "c", "d", "e"]}, "stop",
         "`stop` takes up to 4 non-empty strings"),
    ],
)  # fmt: skip
def test_bad_messages_are_one_line_400s_naming_where(server, body, param, message):
    r = httpx.post(server + "/v1/chat/completions", headers={"Authorization": "Bearer sekret"}, json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"] == {"message": message, "type": "invalid_request_error",
                                                          "param": param, "code": None}  # fmt: skip


def test_the_schema_says_what_chat_accepts(server):
    """No null content and only text parts in /openapi.json, as the server answers (a body the
    schema allows is not refused for its messages: see test_fuzz)."""
    schemas = httpx.get(server + "/openapi.json").json()["components"]["schemas"]
    content = schemas["Message"]["properties"]["content"]
    assert "content" in schemas["Message"]["required"] and {"type": "null"} not in content["anyOf"]
    assert schemas["ContentPart"]["properties"]["type"].get("const") == "text"
    assert set(schemas["ContentPart"]["required"]) == {"type", "text"}


def test_prompt_lookup_gives_the_plain_output(client, model):
    """prompt_lookup_num_tokens (speculative decoding) changes the speed, not the text: greedy
    equals plain greedy, a seeded sample equals Model.generate's with the same option; streamed
    too; what it cannot combine with is a 400 naming it."""
    prompt = "We are the sea, the sea, the sea. We are the"
    greedy = model.generate(prompt, temperature=0, max_new_tokens=20)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0,
                                  extra_body={"prompt_lookup_num_tokens": 4})  # fmt: skip
    assert r.choices[0].text == greedy and r.usage.completion_tokens == 20
    chunks = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0, stream=True,
                                       extra_body={"prompt_lookup_num_tokens": 4})  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == greedy
    want = model.generate(prompt, temperature=1.0, seed=5, max_new_tokens=12, prompt_lookup_num_tokens=3)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=1.0, seed=5,
                                  extra_body={"prompt_lookup_num_tokens": 3})  # fmt: skip
    assert r.choices[0].text == want
    cases = (({"n": 2, "temperature": 1.0}, "one sequence", "n"),
             ({"frequency_penalty": 1.0}, "frequency_penalty", "frequency_penalty"),
             ({"extra_body": {"prompt_lookup_num_tokens": 3, "repetition_penalty": 1.2}}, "repetition_penalty",
              "repetition_penalty"),
             ({"extra_body": {"prompt_lookup_num_tokens": 3, "no_repeat_ngram_size": 2}}, "no_repeat_ngram_size",
              "no_repeat_ngram_size"))  # fmt: skip
    for extra, words, param in cases:
        args = {"model": "tiny", "prompt": prompt, "max_tokens": 5, "extra_body": {"prompt_lookup_num_tokens": 3}}
        with pytest.raises(openai.BadRequestError, match=words) as e:
            client.completions.create(**{**args, **extra})
        assert e.value.body["param"] == param  # the request's own field, by name
    # a list of prompts: each is decoded on its own, as without the option
    other = "To be, or not to be, to be"
    r = client.completions.create(model="tiny", prompt=[prompt, other], max_tokens=10, temperature=0,
                                  extra_body={"prompt_lookup_num_tokens": 3})  # fmt: skip
    assert [c.text for c in r.choices] == [model.generate(t, temperature=0, max_new_tokens=10) for t in (prompt, other)]


def test_a_draft_model_serves_the_same_text_in_fewer_passes(lm_dir, tmp_path):
    """lmlab serve --draft: completions the draft can serve are decoded speculatively — greedy
    equal to the model's plain greedy output, a seeded sample to Model.generate's with the same
    draft — and the rest (n=2, a penalty) still answer, through the batch; the engine's
    passes over the big model are fewer than its tokens."""
    from helpers import tiny_checkpoint

    import lmlab

    draft_dir = tiny_checkpoint(tmp_path / "draft", pos="rope", max_seq_len=256, n_layer=1, d_model=16, seed=7)
    model = lmlab.load(str(lm_dir))
    prompt = "We are the sea, the sea, the sea. We are the"
    greedy = model.generate(prompt, temperature=0, max_new_tokens=20)
    sampled = model.generate(prompt, temperature=1.0, seed=5, max_new_tokens=12, assistant_model=str(draft_dir),
                             num_assistant_tokens=3)  # fmt: skip
    with running(lm_dir, draft=str(draft_dir), num_assistant_tokens=3) as url:
        from openai import OpenAI

        client = OpenAI(base_url=url + "/v1", api_key="none")
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0)
        assert r.choices[0].text == greedy and r.usage.completion_tokens == 20
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=1.0, seed=5)
        assert r.choices[0].text == sampled
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=1.0, n=2, seed=1)
        assert len(r.choices) == 2
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, frequency_penalty=1.0)
        assert r.usage.completion_tokens == 5
        metrics = dict(line.split() for line in httpx.get(url + "/metrics").text.splitlines())
        assert metrics["lmlab_drafted"] == "2"  # the greedy and the seeded request; n=2 and the penalty not


def test_a_draft_with_another_tokenizer_is_refused_at_load(lm_dir, tmp_path):
    from helpers import tiny_checkpoint

    from lmlab.serve.app import Served

    other = tiny_checkpoint(tmp_path / "other", "bpe", pos="rope", max_seq_len=64)
    served = Served(source=str(lm_dir), model_id="tiny", draft=str(other))
    served.load()
    assert not served.ready and "another tokenizer" in served.error and served.error.startswith("--draft")


def test_num_assistant_tokens_needs_a_draft(lm_dir, capsys):
    from lmlab.cli import main

    assert main(["serve", str(lm_dir), "--num-assistant-tokens", "3"]) != 0
    assert "--num-assistant-tokens is for --draft MODEL" in capsys.readouterr().err
    assert main(["serve", str(lm_dir), "--draft", str(lm_dir), "--num-assistant-tokens", "0"]) != 0
    assert "--num-assistant-tokens must be >= 1" in capsys.readouterr().err


def test_a_recurrent_draft_is_refused_at_load_in_one_line(lm_dir, tmp_path, capsys):
    """`lmlab serve MODEL --draft RNN`: one line before any URL (a draft the engine would never use)."""
    from helpers import make_tokenizer, write_checkpoint

    from lmlab.cli import main
    from lmlab.models.config import RNNConfig
    from lmlab.models.rnn import RNNLanguageModel

    tok = make_tokenizer("char")
    model = RNNLanguageModel(RNNConfig(cell="lstm", vocab_size=tok.get_vocab_size(), d_model=16, hidden_size=16, n_layer=1))
    write_checkpoint(tmp_path / "lstm", model, tok, {})
    assert main(["serve", str(lm_dir), "--draft", str(tmp_path / "lstm"), "--port", "0"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--draft" in err[0] and "recurrent" in err[0], err
