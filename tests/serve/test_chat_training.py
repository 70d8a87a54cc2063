"""A model trained here on chat-formatted JSON lines can chat: ``lmlab train`` writes each
conversation in ChatML — the text serve's default template renders — and ``lmlab serve`` stops
its replies at <|im_end|>."""

from __future__ import annotations

import json

import pytest
from conftest import running

import lmlab
from lmlab.chatml import format_chat
from lmlab.errors import LmlabError
from lmlab.serve.chat import DEFAULT_CHAT_TEMPLATE, render_chat

CONVERSATIONS = [
    [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}],
    [{"role": "system", "content": "be kind"}, {"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}],
]


@pytest.mark.parametrize("gen", [False, True])
def test_chatml_is_the_default_template(gen):
    for messages in CONVERSATIONS:
        assert format_chat(messages, gen) == render_chat(DEFAULT_CHAT_TEMPLATE, messages, add_generation_prompt=gen)


def test_train_on_chat_jsonl_then_chat(tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in CONVERSATIONS * 40),
                    encoding="utf-8")  # fmt: skip
    out = tmp_path / "run"
    lmlab.train(data=str(data), out=str(out), steps=30, d_model=32, n_layer=1, max_seq_len=128, batch_size=8,
                val_fraction=0.1, progress=False)  # fmt: skip
    model = lmlab.load(out)
    chatml = "".join(format_chat(m) for m in CONVERSATIONS)
    # the char tokenizer was trained on what the run read: exactly ChatML's characters, none of the JSON's
    assert set(model.tokenizer.get_vocab()) - {"<|endoftext|>", "<unk>"} == set(chatml)
    with running(out) as url:
        import openai

        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        r = client.chat.completions.create(model="tiny", messages=CONVERSATIONS[0][:1], max_tokens=20, temperature=0)
        want = model.generate(format_chat(CONVERSATIONS[0][:1], True), max_new_tokens=20, temperature=0,
                              stop=["<|im_end|>"])  # fmt: skip
        assert r.choices[0].message.content == want


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"messages": [{"role": "user", "content": "a"}]}\n{"messages": "hi"}\n', r"chat.jsonl line 2 has no \"messages\" list"),
        ('{"messages": [{"role": "user", "content": "a"}]}\n{"messages": [{"role": "robot", "content": "x"}]}\n',
         r"line 2: messages\[0\] must have a role"),
        ('{"messages": [{"role": "user", "content": "a"}]}\n{oops\n', r"line 2 is not JSON"),
    ],
)
def test_bad_chat_lines_are_named(tmp_path, line, message):
    (tmp_path / "chat.jsonl").write_text(line, encoding="utf-8")
    with pytest.raises(LmlabError, match=message):
        lmlab.train(data=str(tmp_path / "chat.jsonl"), out=str(tmp_path / "o"), steps=1, progress=False)
