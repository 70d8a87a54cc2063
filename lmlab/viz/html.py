"""The shared scaffold of the ``.html`` pictures: one file that opens anywhere, offline.

Everything is inline: the CSS, the script, and the numbers, as JSON in a
``<script type="application/json">`` element (``<`` escaped, so a token ``</script>`` cannot
end it). No external URL is fetched; the page's icon is an empty ``data:`` URL so the browser
does not ask for ``/favicon.ico``.

The colours are :mod:`lmlab.viz.colors`', the same as the PNGs'.
"""

from __future__ import annotations

import html
import json
from typing import Any

CSS = """
body { font-family: "DejaVu Sans", "Noto Sans CJK SC", "Noto Sans CJK JP", sans-serif; margin: 1.5em;
       color: #222; background: #fff; }
h1 { font-size: 1.25em; margin: 0 0 .4em; }
p.note { color: #555; max-width: 60em; margin: .2em 0 1em; }
.controls { margin: .6em 0; }
.controls label { margin-right: 1.2em; }
#tip { min-height: 1.4em; font-family: monospace; margin: .4em 0; }
.text { font-family: "DejaVu Sans Mono", "Noto Sans Mono CJK SC", monospace; font-size: 1.2em; line-height: 1.9;
        white-space: pre-wrap; word-break: break-all; }
.tok { padding: 1px 0; border-radius: 2px; }
.tok.none { background: repeating-linear-gradient(45deg, #eee, #eee 3px, #ccc 3px, #ccc 6px); }
.unit { margin: .5em 0 1em; }
.unit .label { font-weight: bold; font-size: .9em; color: #444; }
.legend span { display: inline-block; width: 2.2em; text-align: center; font-size: .8em; }
"""


def esc(text: str) -> str:
    return html.escape(text, quote=True)


def data_script(data: Any, element_id: str = "data") -> str:
    """``data`` as JSON inside the page; JavaScript reads it with JSON.parse."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False).replace("<", "\\u003c")
    return f'<script type="application/json" id="{element_id}">{text}</script>'


def page(title: str, body: str, script: str = "", note: str = "") -> str:
    """A complete page: ``body`` (HTML), an optional ``script`` (JavaScript) run at the end."""
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
        f"<title>{esc(title)}</title>\n<link rel=\"icon\" href=\"data:,\">\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"<h1>{esc(title)}</h1>\n" + (f'<p class="note">{esc(note)}</p>\n' if note else "") + body + "\n"
        + (f"<script>\n{script}\n</script>\n" if script else "") + "</body></html>\n"
    )  # fmt: skip


def img(png: bytes, alt: str) -> str:
    """A PNG embedded in the page (a ``data:`` URL: nothing to fetch)."""
    import base64

    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
