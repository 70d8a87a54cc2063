"""lmlab.serve.chat against transformers' own ``apply_chat_template`` on real-world templates.

The reference is always a ``PreTrainedTokenizerFast`` built offline from a three-word tokenizer,
given the template and the special tokens; lmlab must print the very same prompt.
"""

from __future__ import annotations

import json

import jinja2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer
from tokenizers.models import WordLevel

from lmlab.errors import LmlabError
from lmlab.serve import chat
from lmlab.serve.chat import (
    DEFAULT_CHAT_TEMPLATE,
    DEFAULT_STOP,
    chat_prompt,
    check_messages,
    read_chat_template,
    render_chat,
)

transformers = pytest.importorskip("transformers")

# Qwen2.5-Instruct's template: default system message, tools rendered with tojson, tool calls/results.
QWEN = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Llama-2-chat: bos_token per turn, <<SYS>> folded into the first user turn, raise_exception on bad order.
LLAMA2 = (
    r"{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    r"{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    r"{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    r"{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    r"{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    r"{% if loop.index0 == 0 and system_message != false %}"
    r"{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}"
    r"{% else %}{% set content = message['content'] %}{% endif %}"
    r"{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    r"{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    r"{% endfor %}"
)

# Zephyr: real newlines between the tags, so trim_blocks/lstrip_blocks decide the whitespace.
ZEPHYR = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>
' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>
' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>
'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""

# Mistral-Instruct v0.3 style: system message put in front of the *last* user turn (loop.last).
MISTRAL = (
    r"{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    r"{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    r"{{- bos_token }}{%- for message in loop_messages %}"
    r"{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    r"{{- raise_exception('After the optional system message, conversation roles must alternate "
    r"user/assistant/user/assistant/...') }}{%- endif %}"
    r"{%- if message['role'] == 'user' %}{%- if loop.last and system_message is defined %}"
    r"{{- '[INST] ' + system_message + '\n\n' + message['content'] + '[/INST]' }}"
    r"{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    r"{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token}}"
    r"{%- else %}{{- raise_exception('Only user and assistant roles are supported, with the exception "
    r"of an initial optional system message!') }}{%- endif %}{%- endfor %}"
)

# Gemma: no system role, 'model' for assistant, `| trim`.
GEMMA = (
    r"{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    r"{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    r"{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    r"{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    r"{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    r"{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# The helpers transformers adds: namespace, dict, tojson with options, loop controls, {% generation %}.
FEATURES = """{%- set ns = namespace(system=none, turns=0) %}
{%- for m in messages %}
    {%- if m.role == 'system' %}{% set ns.system = m.content %}{% continue %}{% endif %}
    {%- set ns.turns = ns.turns + 1 %}
{%- endfor %}
{{- dict(system=ns.system, turns=ns.turns, tokens=[bos_token, eos_token]) | tojson(indent=2, sort_keys=true) }}
{{ messages | tojson }}
{{ messages | tojson(separators=(',', ':'), ensure_ascii=true) }}
{{ dict.fromkeys(['a', 'b'], 0) | tojson }} {{ '<&>' | tojson }} {{ pad_token }}|{{ tools }}|{{ documents }}
{%- for m in messages %}
    {%- if loop.index > 2 %}{% break %}{% endif %}
    {%- if m.role == 'assistant' %}
{% generation %}[{{ m.content }}]{% set inside = 1 %}{% endgeneration %}{{ inside is defined }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
>>>
{% endif %}
"""

TEMPLATES = {
    "qwen": QWEN,
    "llama2": LLAMA2,
    "zephyr": ZEPHYR,
    "mistral": MISTRAL,
    "gemma": GEMMA,
    "features": FEATURES,
    "default": DEFAULT_CHAT_TEMPLATE,
}
NO_SYSTEM = {"gemma"}  # refuses a system message by design

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "  4  "},
        {"role": "user", "content": "And 3+3?\nThink it through."},
    ],
    [
        {"role": "user", "content": '你好，"世界"! {{ bos_token }} {% if x %}'},
        {"role": "assistant", "content": "Hi <b>there</b> & 'you'\n\n"},
        {"role": "user", "content": ""},
    ],
]


@pytest.fixture(scope="module")
def tok():
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="[UNK]"
    )


def reference(tok, template, messages, add_generation_prompt=True, **kwargs):
    tok.chat_template = template
    return tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
    )


def ours(tok, template, messages, add_generation_prompt=True, **kwargs):
    return render_chat(
        template, messages, add_generation_prompt=add_generation_prompt, special_tokens=tok.special_tokens_map, **kwargs
    )


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("name", TEMPLATES)
def test_render_matches_transformers(tok, name, conversation, add_generation_prompt):
    messages = CONVERSATIONS[conversation]
    if name in NO_SYSTEM:
        messages = [m for m in messages if m["role"] != "system"]
    expected = reference(tok, TEMPLATES[name], messages, add_generation_prompt)
    assert ours(tok, TEMPLATES[name], messages, add_generation_prompt) == expected


def test_default_template_is_chatml(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert reference(tok, DEFAULT_CHAT_TEMPLATE, messages) == expected
    assert chat_prompt(messages, None) == expected
    assert chat_prompt(messages, None, add_generation_prompt=False) == expected.removesuffix("<|im_start|>assistant\n")
    assert DEFAULT_STOP == ["<|im_end|>"] and DEFAULT_STOP[0] in expected


def test_chat_prompt_uses_the_model_template(tok):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}]
    expected = reference(tok, LLAMA2, [{"role": "user", "content": "Hi\nthere"}])
    assert chat_prompt(messages, LLAMA2, special_tokens=tok.special_tokens_map) == expected


def test_tools_tool_calls_and_null_content_match_transformers(tok):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "weather",
                "description": "Weather <now> & 'later'",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    messages = [
        {"role": "user", "content": "Weather in Zürich?"},
        {
            "role": "assistant",
            "content": None,  # as OpenAI clients send it; transformers drops keys set to None
            "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Zürich"}}}],
        },
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "tool", "content": '{"wind": "none"}'},
    ]
    assert ours(tok, QWEN, messages, tools=tools) == reference(tok, QWEN, messages, tools=tools)
    assert ours(tok, QWEN, messages) == reference(tok, QWEN, messages)


def test_reasoning_fields_and_extra_variables_match_transformers(tok):
    template = (
        "{% for m in messages %}{{ m.reasoning_content }}|{{ m.thinking }}|{{ m.reasoning }};{% endfor %}"
        "{{ enable_thinking }}{{ bos_token }}"
    )
    messages = [
        {"role": "assistant", "content": "a", "reasoning": "r1"},
        {"role": "assistant", "content": "b", "thinking": "t2"},
        {"role": "assistant", "content": "c", "reasoning_content": "c3", "thinking": "t3"},
    ]
    kwargs = {"enable_thinking": False, "bos_token": "<BOS>"}  # extra variables win over special tokens
    assert ours(tok, template, messages, **kwargs) == reference(tok, template, messages, **kwargs)


def test_strftime_now_matches_transformers(tok):
    template = "{{ strftime_now('%Y-%m') }} {{ strftime_now(format='%Y') }}"
    assert ours(tok, template, CONVERSATIONS[0]) == reference(tok, template, CONVERSATIONS[0])


def test_raise_exception_becomes_one_line_lmlab_error(tok):
    messages = [{"role": "assistant", "content": "first"}]
    with pytest.raises(jinja2.TemplateError, match="roles must alternate"):
        reference(tok, LLAMA2, messages)
    with pytest.raises(LmlabError, match="Conversation roles must alternate user/assistant") as info:
        render_chat(LLAMA2, messages)
    assert "\n" not in str(info.value)
    with pytest.raises(LmlabError, match="^chat template: two lines$"):
        render_chat("{{ raise_exception('two\r\nlines') }}", messages)


@pytest.mark.parametrize(
    ("template", "words"),
    [
        ("{% if messages %}no end", ["line 1", "endif"]),
        ("{{ messages | no_such_filter }}", ["no_such_filter"]),
        ("{{ undefined_thing.content }}", ["undefined_thing", "undefined"]),
        ("{{ messages[0].content + 1 }}", ["TypeError"]),
        ("{{ messages.__class__.__mro__ }}", ["__class__"]),  # the sandbox at work
        ("{% set x = messages.append(1) %}", ["append"]),  # immutable: no changing the inputs
        ("{% set ns = namespace(_x=1) %}", ["_x"]),
        ("{% set ns = namespace() %}{% set ns._y = 1 %}", ["_y"]),
        ("{{ dict.update(messages[0], role='x') }}", ["update"]),
    ],
)
def test_broken_or_hostile_templates_are_lmlab_errors(tok, template, words):
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(Exception):  # noqa: B017 - the reference refuses it too, whatever its type
        reference(tok, template, messages)
    with pytest.raises(LmlabError) as info:
        render_chat(template, messages)
    assert "\n" not in str(info.value)
    for word in words:
        assert word in str(info.value)


def test_each_template_is_compiled_once():
    template = "{{ messages[0].content }}#compiled-once"
    before = chat._compile.cache_info()
    for _ in range(3):
        assert render_chat(template, [{"role": "user", "content": "x"}]) == "x#compiled-once"
    after = chat._compile.cache_info()
    assert (after.misses - before.misses, after.hits - before.hits) == (1, 2)


TEXTS = st.text(max_size=30) | st.sampled_from(["", " x ", "中文\n", "{{ x }}", "{% if %}", "'\"\\", "\r\n"])


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(sorted(TEMPLATES)),
    system=st.none() | st.text(max_size=20),
    contents=st.lists(TEXTS, min_size=1, max_size=5),
    add_generation_prompt=st.booleans(),
)
def test_render_matches_transformers_on_any_text(tok, name, system, contents, add_generation_prompt):
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": c} for i, c in enumerate(contents)]
    if system is not None and name not in NO_SYSTEM:
        messages.insert(0, {"role": "system", "content": system})
    expected = reference(tok, TEMPLATES[name], messages, add_generation_prompt)
    assert ours(tok, TEMPLATES[name], messages, add_generation_prompt) == expected


# --- reading a model folder -------------------------------------------------------------------------


def saved(tok, tmp_path, template):
    tok.chat_template = template
    tok.save_pretrained(tmp_path)
    return tmp_path


def loaded_template(folder):
    """What transformers itself finds in the folder (None where it has no usable default)."""
    loaded = transformers.PreTrainedTokenizerFast.from_pretrained(folder)
    try:
        return loaded.get_chat_template()
    except ValueError:  # no template, or several without a default
        return None


def test_read_template_written_by_save_pretrained(tok, tmp_path):
    folder = saved(tok, tmp_path, ZEPHYR)
    assert read_chat_template(folder) == ZEPHYR == loaded_template(folder)
    assert read_chat_template(str(folder)) == ZEPHYR


def test_read_several_templates_written_by_save_pretrained(tok, tmp_path):
    folder = saved(tok, tmp_path / "with_default", {"default": GEMMA, "tool_use": QWEN})
    assert read_chat_template(folder) == GEMMA == loaded_template(folder)
    folder = saved(tok, tmp_path / "no_default", {"chatml": QWEN, "tool_use": LLAMA2})
    assert read_chat_template(folder) is None and loaded_template(folder) is None


def rewrite_config(folder, **changes):
    config_file = folder / "tokenizer_config.json"
    config = {**json.loads(config_file.read_text(encoding="utf-8")), **changes}
    config_file.write_text(json.dumps(config), encoding="utf-8")


@pytest.mark.parametrize(
    "value",
    [
        LLAMA2,
        [{"name": "default", "template": MISTRAL}, {"name": "tool_use", "template": QWEN}],
        [{"name": "tool_use", "template": QWEN}, {"name": "default", "template": GEMMA}],
        [{"name": "rag", "template": QWEN}, {"name": "tool_use", "template": MISTRAL}],
        {"default": ZEPHYR, "rag": QWEN},
        {"rag": QWEN},
        None,
    ],
)
def test_read_template_from_tokenizer_config(tok, tmp_path, value):
    folder = saved(tok, tmp_path, None)
    assert not (folder / "chat_template.jinja").exists()
    rewrite_config(folder, chat_template=value)
    assert read_chat_template(folder) == loaded_template(folder)


def test_jinja_file_wins_over_tokenizer_config(tok, tmp_path):
    folder = saved(tok, tmp_path, "{{ 'from the .jinja file' }}\r\n")
    rewrite_config(folder, chat_template=LLAMA2)
    assert read_chat_template(folder) == loaded_template(folder) == "{{ 'from the .jinja file' }}\n"


def test_read_template_without_any(tmp_path):
    assert read_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": "<s>"}', encoding="utf-8")
    assert read_chat_template(tmp_path) is None


def test_malformed_tokenizer_config_is_one_line_error(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": "x",}', encoding="utf-8")
    with pytest.raises(LmlabError, match="tokenizer_config.json is not valid JSON") as info:
        read_chat_template(tmp_path)
    assert "\n" not in str(info.value) and "download" in str(info.value)


# --- request messages -------------------------------------------------------------------------------


def test_check_messages_joins_text_parts_and_keeps_other_fields():
    messages = [
        {"role": "developer", "content": "Rules."},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "ann"},
        {"role": "assistant", "content": "", "tool_calls": None},
        {"role": "tool", "content": [], "tool_call_id": "7"},
    ]
    original = json.loads(json.dumps(messages))
    assert check_messages(messages) == [
        {"role": "developer", "content": "Rules."},
        {"role": "user", "content": "a\nb", "name": "ann"},
        {"role": "assistant", "content": ""},
        {"role": "tool", "content": "", "tool_call_id": "7"},
    ]
    assert messages == original


@pytest.mark.parametrize(
    ("messages", "words"),
    [
        ([], ["non-empty list"]),
        (None, ["non-empty list"]),
        ({"role": "user", "content": "hi"}, ["non-empty list"]),
        ("hello", ["non-empty list"]),
        ([1], ["messages[0]", "int"]),
        ([{"content": "x"}], ["messages[0].role", "user", "got nothing"]),
        ([{"role": "bot", "content": "x"}], ["messages[0].role must be one of", "'bot'"]),
        ([{"role": None, "content": "x"}], ["messages[0].role", "got null"]),
        ([{"role": "user\nsystem", "content": "x"}], ["messages[0].role", "got 'user\\nsystem'"]),
        ([{"role": ["user"], "content": "x"}], ["messages[0].role"]),
        ([{"role": {"a": 1}, "content": "x"}], ["messages[0].role"]),
        ([{"role": "user", "content": "x" * 100}, {"role": "x" * 100, "content": "y"}], ["messages[1].role", "..."]),
        ([{"role": "user"}], ["messages[0].content", "got nothing"]),
        ([{"role": "user", "content": None}], ["messages[0].content", "null"]),
        ([{"role": "user", "content": 5}], ["messages[0].content", "int"]),
        ([{"role": "user", "content": {"text": "x"}}], ["messages[0].content", "dict"]),
        (
            [{"role": "user", "content": "ok"}, {"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
            ["messages[1].content[0]", "'image_url'", "only text parts"],
        ),
        ([{"role": "user", "content": [{"type": "text", "text": "a"}, "b"]}], ["messages[0].content[1]", "got 'b'"]),
        ([{"role": "user", "content": [{"text": "a"}]}], ["messages[0].content[0]", "has no \"type\""]),
        ([{"role": "user", "content": [{"type": "text"}]}], ["messages[0].content[0].text", "got nothing"]),
        ([{"role": "user", "content": [{"type": "text", "text": 3}]}], ["messages[0].content[0].text", "int"]),
        ([{"role": "user", "content": [{"type": ["text"]}]}], ["messages[0].content[0]"]),
    ],
)
def test_malformed_messages_are_one_line_errors(messages, words):
    with pytest.raises(LmlabError) as info:
        check_messages(messages)
    with pytest.raises(LmlabError):
        chat_prompt(messages, None)
    text = str(info.value)
    assert "\n" not in text and len(text) < 200
    for word in words:
        assert word in text, text
