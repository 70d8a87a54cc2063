"""Chat templates: turn OpenAI-style ``messages`` into the one prompt string a chat model expects.

How a conversation becomes text (the markers around a turn, where the system prompt goes, whether a
BOS token leads) was fixed when a chat model was trained; prompted in another layout it answers worse.
Hugging Face ships the layout with the model as a *chat template*: a Jinja2 program
(``chat_template.jinja``, or ``chat_template`` in ``tokenizer_config.json``) that is given
``messages``, ``add_generation_prompt`` (open an assistant turn, so the continuation is the reply) and
the special tokens, and prints the prompt. Templates are written against ``transformers``'
``apply_chat_template``, so :func:`render_chat` reproduces it: the same Jinja settings (``trim_blocks``
and ``lstrip_blocks`` decide most templates' whitespace), the same helpers (``raise_exception``,
``strftime_now``, a ``tojson`` that escapes neither HTML nor non-ASCII, ``{% break %}``,
``{% generation %}``) and the same clean-up of the messages.

Why a sandbox: a template is code downloaded with a model, and messages come from whoever calls the
server. ``ImmutableSandboxedEnvironment`` refuses underscore attributes (no way to ``__class__`` or
``__globals__``) and methods that modify lists and dicts; like transformers we also disarm ``dict`` and
``namespace`` and rebuild every input from plain JSON types. User text is a value, never template
source: ``{{ x }}`` typed by a user is printed as it is. lmlab's own models have no template:
:data:`DEFAULT_CHAT_TEMPLATE` (ChatML) and :data:`DEFAULT_STOP` serve them (see :func:`chat_prompt`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmlab.errors import LmlabError

ROLES = ("system", "user", "assistant", "developer", "tool")

#: ChatML, as Qwen and many others use it: ``<|im_start|>{role}\n{content}<|im_end|>\n`` per message,
#: then ``<|im_start|>assistant\n`` when a reply is wanted. No BOS token and no default system prompt.
DEFAULT_CHAT_TEMPLATE = (
    r"{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] }}"
    r"{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
#: Where a model prompted with DEFAULT_CHAT_TEMPLATE has finished its turn.
DEFAULT_STOP = ["<|im_end|>"]

# Message fields a reasoning trace arrives under; templates read `reasoning_content` (gpt-oss: `thinking`).
_REASONING = ("reasoning_content", "thinking", "reasoning")


def read_chat_template(folder: str | Path) -> str | None:
    """The template ``AutoTokenizer.from_pretrained(folder)`` would use, or None if it has none.

    As in transformers, a ``.jinja`` file beats ``tokenizer_config.json``, and of several named
    templates the one named ``default`` is used; with none so named transformers refuses, we give None.
    """
    folder = Path(folder)
    files = {p.name.removesuffix(".jinja"): p for p in (folder / "additional_chat_templates").glob("*.jinja")}
    if (folder / "chat_template.jinja").is_file():
        files.setdefault("default", folder / "chat_template.jinja")  # additional_chat_templates/ wins
    if files:
        return _read(files["default"]) if "default" in files else None
    config_file = folder / "tokenizer_config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(_read(config_file))
    except ValueError as e:
        raise LmlabError(f"{config_file} is not valid JSON ({e}): repair it or download the model again") from e
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...], as save_pretrained writes them
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    if isinstance(template, dict):
        template = template.get("default")
    return template if isinstance(template, str) else None


def _read(path: Path) -> str:
    """A model file as transformers reads it (UTF-8, universal newlines), or a LmlabError."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LmlabError(f"{path} is not UTF-8 text ({e}): repair it or download the model again") from e


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """Validate OpenAI-style chat messages from a request; return copies with ``content`` a string.

    Every mistake is a one-line LmlabError naming the message (an HTTP 400), never a KeyError in a
    template. Text parts are joined with newlines (as vLLM does); lmlab's models take no images.
    """
    if not isinstance(messages, list) or not messages:
        raise LmlabError('messages must be a non-empty list of {"role": ..., "content": ...} objects')
    checked = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise LmlabError(f"{where} must be an object with role and content, got {_got(message)}")
        if message.get("role") not in ROLES:  # (a tuple compares with ==: an unhashable role is no TypeError)
            raise LmlabError(f"{where}.role must be one of {', '.join(ROLES)}, got {_got(message.get('role', ...))}")
        content = message.get("content", ...)
        if isinstance(content, list):
            content = "\n".join(_part_text(part, f"{where}.content[{j}]") for j, part in enumerate(content))
        elif not isinstance(content, str):
            raise LmlabError(f"{where}.content must be a string or a list of text parts, got {_got(content)}")
        checked.append({**{k: v for k, v in message.items() if v is not None}, "content": content})
    return checked


def _part_text(part: Any, where: str) -> str:
    if not isinstance(part, dict):
        raise LmlabError(f'{where} must be an object like {{"type": "text", "text": ...}}, got {_got(part)}')
    if "type" not in part:
        raise LmlabError(f'{where} has no "type": only text parts ({{"type": "text", "text": ...}}) are supported')
    if part.get("type") != "text":
        raise LmlabError(f"{where} is of type {_got(part.get('type', ...))}: only text parts are supported")
    if not isinstance(part.get("text", ...), str):
        raise LmlabError(f"{where}.text must be a string, got {_got(part.get('text', ...))}")
    return part["text"]


def _got(value: Any) -> str:
    """A request's value (``...``: absent) for an error message: short, on one line."""
    if value is ...:
        return "nothing"
    if not isinstance(value, str):
        return "null" if value is None else type(value).__name__
    return repr(value) if len(value) <= 30 else repr(value[:30]) + "..."  # repr escapes newlines


def render_chat(template: str, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                special_tokens: dict[str, str] | None = None, **extra: Any) -> str:
    """``tokenizer.apply_chat_template(messages, tokenize=False, ...)`` without transformers.

    ``special_tokens`` (bos_token, ...) and ``extra`` (tools, enable_thinking, ...) become template
    variables, ``extra`` winning a clash as in transformers. As there, keys set to None are dropped
    (templates test for a missing key, not for None) and reasoning is copied under the names
    templates read. A template that refuses the messages (raise_exception) or fails is a LmlabError.
    """
    compiled = _compile(template)
    chat = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise LmlabError(f"messages[{i}] must be an object with role and content, got {_got(message)}")
        message = _plain({k: v for k, v in message.items() if v is not None})
        reasoning = next((message[k] for k in _REASONING if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        chat.append(message)
    variables = _plain({"tools": None, "documents": None, **(special_tokens or {}), **extra})
    try:
        return compiled.render({**variables, "messages": chat, "add_generation_prompt": add_generation_prompt})
    except jinja2.TemplateError as e:  # raise_exception, undefined variables, sandbox refusals
        raise LmlabError(f"chat template: {_one_line(e)}") from e
    except Exception as e:  # the template's own bug, e.g. 'a' + 1: still a user-facing error, not ours
        raise LmlabError(f"chat template failed: {type(e).__name__}: {_one_line(e)}") from e


def chat_prompt(messages: Any, template: str | None, special_tokens: dict[str, str] | None = None,
                add_generation_prompt: bool = True) -> str:
    """The prompt for a chat request: checked messages, the model's template or DEFAULT_CHAT_TEMPLATE."""
    return render_chat(DEFAULT_CHAT_TEMPLATE if template is None else template, check_messages(messages),
                       add_generation_prompt=add_generation_prompt, special_tokens=special_tokens)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).splitlines()).strip() or type(error).__name__


def _plain(value: Any) -> Any:
    """Rebuild the template's inputs from plain JSON types: subclasses and rich objects (arrays,
    images) may carry methods the sandbox does not know to be dangerous; templates only test such
    values for presence, so a placeholder renders the same."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base, convert in ((str, str.__str__), (int, int.__int__), (float, float.__float__)):
        if isinstance(value, base):  # str enums, numpy.float64, ... lose their extra methods
            return convert(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


@lru_cache(maxsize=64)
def _compile(template: str) -> jinja2.Template:
    """Parse a template once: a server renders the same one for every request."""
    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise LmlabError(f"chat template line {e.lineno}: {_one_line(e)} (the model's template is broken)") from e


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    """The Jinja environment transformers renders chat templates in (see the module docstring)."""
    if tuple(int(n) for n in re.findall(r"\d+", jinja2.__version__)[:3]) < (3, 1, 6):
        raise LmlabError(f"jinja2 {jinja2.__version__} has known sandbox escapes: pip install 'jinja2>=3.1.6'")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise, strftime_now=lambda format: datetime.now().strftime(format),
                       dict=_Dict(), namespace=_Namespace)
    return env


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """Plain json.dumps: Jinja's own tojson HTML-escapes <, > and &, which would change the prompt."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _Dict:
    """``dict(...)`` and ``dict.fromkeys(...)`` without the dict type, whose unbound methods
    (``dict.update(d, ...)``) would modify a value behind the immutable sandbox's back."""

    __call__ = staticmethod(dict)
    fromkeys = staticmethod(dict.fromkeys)


class _Namespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore names, which could reach the object's internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # no named self, so that namespace(self=...) works
        attrs = dict(*args[1:], **kwargs)
        for name in attrs:
            _check_name(name)
        jinja2.utils.Namespace.__init__(args[0], attrs)

    def __setitem__(self, name: str, value: Any) -> None:  # {% set ns.name = value %}
        _check_name(name)  # (a Namespace hides even its own methods from self.attribute)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def _check_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")


class _Generation(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks the assistant's text for training masks;
    rendering keeps the body as it is (inside a call block, so scoping matches transformers)."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()
