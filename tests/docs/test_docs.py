"""The documentation cannot drift from the code: README.md and docs/*.md are checked here.

- every ``lmlab`` command line in a shell block parses with lmlab's own argument parser;
- every ``python`` block runs, in a temporary folder, against tiny random models (the
  conventions are described in docs/index.md, "How these pages are tested");
- the README stays an entry point (at most 300 lines), every relative link and anchor
  resolves, and docs/index.md links every page.
"""

from __future__ import annotations

import argparse
import io
import re
import shlex
import unicodedata
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import (
    MARIAN_SHAPE,
    REPO,
    SHAKESPEARE_TEXT,
    bpe_tokenizer,
    tiny_checkpoint,
    tiny_hf_encoder,
    tiny_seq2seq_checkpoint,
)

DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]
README_MAX_LINES = 300

SHELL_LANGS = {"", "bash", "sh", "shell", "console"}
ERROR_EXAMPLE = "# error example"
NOT_RUN = re.compile(r"<!--\s*not run:\s*(\S.*?)\s*-->")


@dataclass
class Block:
    page: Path
    line: int  # the line of the opening fence, 1-based
    lang: str
    text: str
    not_run: str | None  # the reason given in a `<!-- not run: ... -->` just before it

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def fenced_blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page (fences may be indented, as in a list)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = re.match(r"^(\s*)(`{3,})(\S*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.groups()
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        reason = NOT_RUN.search(before)
        blocks.append(Block(page, start + 1, lang.lower(), "\n".join(body), reason and reason.group(1)))
        i += 1
    return blocks


ALL_BLOCKS = [b for page in PAGES for b in fenced_blocks(page)]


# --------------------------------------------------------------------------- 1. commands parse
@dataclass
class Command:
    where: str
    text: str
    argv: list[str] | None  # None: not an lmlab command
    error_example: bool


_PREFIX = re.compile(r"^(?:\$\s+)?(?P<cmd>(?:\S*/)?(?:lmlab|python3?|torchrun)\s.*)$")


def strip_comment(line: str) -> str:
    """``line`` without a trailing shell ``# comment`` (a ``#`` inside quotes is kept)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def lmlab_argv(command: str) -> list[str] | None:
    """The argv lmlab's parser would see for a shell command line, or None if the line
    does not run lmlab (``lmlab``, ``.venv/bin/lmlab``, ``python -m lmlab``, torchrun ... -m lmlab)."""
    try:
        words = shlex.split(command.replace("$'", "'"))
    except ValueError:  # unbalanced quotes: program output, or a broken lmlab command
        if Path(command.split()[0]).name == "lmlab":
            raise
        return None
    if not words:
        return None
    exe = Path(words[0]).name
    if exe == "lmlab":
        return words[1:]
    if exe.startswith("python") or exe == "torchrun":
        for i in range(1, len(words) - 1):
            if words[i] == "-m" and words[i + 1] == "lmlab":
                return words[i + 2 :]
    return None


def shell_commands() -> list[Command]:
    found = []
    for b in ALL_BLOCKS:
        if b.lang not in SHELL_LANGS:
            continue
        lines = b.text.splitlines()
        i = 0
        while i < len(lines):
            first = i
            m = _PREFIX.match(lines[i].strip())
            if not m:
                i += 1
                continue
            parts = [m.group("cmd")]
            while parts[-1].rstrip().endswith("\\") and i + 1 < len(lines):
                parts[-1] = parts[-1].rstrip()[:-1]
                i += 1
                parts.append(lines[i].strip())
            i += 1
            raw = " ".join(p.strip() for p in parts)
            error_example = raw.rstrip().endswith(ERROR_EXAMPLE)
            text = strip_comment(raw)
            argv = lmlab_argv(text)
            if argv is not None:
                found.append(
                    Command(f"{b.page.relative_to(REPO)}:{b.line + 1 + first}", text, argv, error_example)
                )
    return found


COMMANDS = shell_commands()


def test_the_docs_show_lmlab_commands():
    assert len(COMMANDS) >= 40, [c.text for c in COMMANDS]


@pytest.mark.parametrize("cmd", COMMANDS, ids=[f"{c.where} {c.text[:60]}" for c in COMMANDS])
def test_documented_command_parses(cmd: Command):
    if cmd.error_example:
        pytest.skip("marked `# error example`")
    from lmlab.cli import build_parser

    assert cmd.argv, f"{cmd.where}: `{cmd.text}` names no lmlab command"
    err = io.StringIO()
    try:
        with redirect_stderr(err), redirect_stdout(io.StringIO()):
            build_parser().parse_args(cmd.argv)
    except SystemExit:
        pytest.fail(f"{cmd.where}: lmlab's parser refuses `{cmd.text}`: {err.getvalue().strip()}")


def test_command_extraction():
    """The extractor itself: continuations, comments, quotes, ``$'...'``, torchrun."""
    assert lmlab_argv(strip_comment(".venv/bin/lmlab info runs/x   # what it holds")) == ["info", "runs/x"]
    assert lmlab_argv("lmlab generate r --stop $'\\n\\n' --prompt \"a # b\"") == [
        "generate",
        "r",
        "--stop",
        "\\n\\n",
        "--prompt",
        "a # b",
    ]
    assert strip_comment('lmlab generate r --prompt "a # b"  # c') == 'lmlab generate r --prompt "a # b"'
    assert lmlab_argv("torchrun --nproc-per-node 2 -m lmlab train --steps 3") == ["train", "--steps", "3"]
    assert lmlab_argv(".venv/bin/python -c 'print(1)'") is None
    assert lmlab_argv("curl -o x https://example.com") is None


#: The pages whose options tables list a command's flags (first column: `--flag ...`).
OPTION_TABLES = {"training.md": "train", "generation.md": "generate"}


def table_options(page: Path) -> list[str]:
    """The ``--flags`` named in the first column of the page's options tables."""
    flags = []
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("| `--"):
            flags += re.findall(r"(--[a-z][a-z0-9-]*)", line.split(" | ")[0])
    return flags


@pytest.mark.parametrize("page,command", OPTION_TABLES.items())
def test_options_tables_name_real_flags(page: str, command: str):
    from lmlab.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    known = {o for a in sub.choices[command]._actions for o in a.option_strings}
    flags = table_options(DOCS / page)
    assert len(flags) > 10
    unknown = sorted(set(flags) - known)
    assert not unknown, f"docs/{page} documents flags `lmlab {command}` does not have: {unknown}"


# --------------------------------------------------------------------------- 2. python blocks run
PY_BLOCKS = [b for b in ALL_BLOCKS if b.lang in ("python", "py")]


def test_not_run_markers_give_a_reason():
    text = "\n".join(p.read_text(encoding="utf-8") for p in PAGES)
    for m in re.finditer(r"<!--\s*not run\b(.*?)-->", text, re.S):
        assert re.match(r":\s*\S", m.group(1)), f"a `not run` marker must say why: {m.group(0)}"


@pytest.fixture(scope="module")
def gpt2_local(tmp_path_factory) -> Path:
    """A tiny random GPT-2 Hugging Face folder (``save_pretrained`` + tokenizer.json)."""
    transformers = pytest.importorskip("transformers")
    import torch

    tok = bpe_tokenizer()
    cfg = transformers.GPT2Config(
        vocab_size=tok.get_vocab_size(),
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("hf") / "gpt2-local"
    transformers.GPT2LMHeadModel(cfg).eval().save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def _short_train(corpus: Path):
    """``lmlab.train`` for the doc snippets: at most 2 steps, and a few KB instead of the
    built-in corpus; every other option is passed through as written."""
    import lmlab

    real = lmlab.train

    def train(**options):
        options["steps"] = min(options.get("steps") or 2, 2)
        options.pop("time", None)
        if options.get("data", "builtin") == "builtin":
            options["data"] = str(corpus)
        options.setdefault("eval_batches", 2)
        options.setdefault("progress", False)
        return real(**options)

    return train


@pytest.mark.filterwarnings("ignore:the prompt .* may run past the model's context")  # a tiny model
@pytest.mark.parametrize("block", PY_BLOCKS, ids=[b.where for b in PY_BLOCKS])
def test_python_block_runs(block: Block, tmp_path, monkeypatch, gpt2_local):
    if block.not_run:
        pytest.skip(f"not run: {block.not_run}")
    import lmlab

    monkeypatch.chdir(tmp_path)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SHAKESPEARE_TEXT, encoding="utf-8")
    trained = set(re.findall(r"""out\s*=\s*["'](runs/[\w.-]+)["']""", block.text))
    for name in set(re.findall(r"""["'](runs/[\w.-]+)["']""", block.text)) - trained:
        if name.startswith(("runs/translator", "runs/summarizer")):  # an encoder-decoder
            tiny_seq2seq_checkpoint(tmp_path / name, **(MARIAN_SHAPE if "marian" in name else {}))
        else:
            tiny_checkpoint(tmp_path / name, "bpe", max_seq_len=64)
    (tmp_path / "gpt2-local").symlink_to(gpt2_local, target_is_directory=True)
    for name in ("train.tsv", "dev.tsv"):  # labelled text for --task classify
        if f'"{name}"' in block.text:
            rows = [("a great film", "positive"), ("an awful film", "negative")] * 20
            (tmp_path / name).write_text("".join(f"{t}\t{lab}\n" for t, lab in rows), encoding="utf-8")
    for name, task in (("sentiment-bert", "classify"), ("qa-bert", "span")):  # tiny Hugging Face encoders
        if f"./{name}" in block.text:
            tiny_hf_encoder(tmp_path / name, "bert", task)
    monkeypatch.setattr(lmlab, "train", _short_train(corpus))
    code = compile(block.text, block.where, "exec")
    with redirect_stdout(io.StringIO()) as out:
        exec(code, {"__name__": "__docs__"})
    assert out.getvalue().strip(), f"{block.where}: the snippet printed nothing"


# --------------------------------------------------------------------------- 3. shape and links
def test_readme_is_an_entry_point():
    n = len((REPO / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, (
        f"README.md has {n} lines (at most {README_MAX_LINES}): move reference to docs/"
    )


def test_readme_starts_with_the_quick_start():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    first = next(b for b in fenced_blocks(REPO / "README.md"))
    assert first.text.splitlines()[0].startswith("make demo") and "make test" in first.text
    assert text.index("## Quick start") < text.index("```")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    h = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip()).lower()
    h = "".join(c for c in h if c in " -" or unicodedata.category(c)[0] in "LNM")
    return h.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m and not in_code:
            s = slug(m.group(1))
            n = seen.get(s, 0)
            seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")
    return out


def links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_relative_links_resolve(page: Path):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists() or REPO not in dest.parents and dest != REPO:
            broken.append(f"{target} (no such file in the repository)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


def test_index_links_every_page():
    linked = {Path(t.partition("#")[0]).name for t in links(DOCS / "index.md")}
    pages = {p.name for p in DOCS.glob("*.md")} - {"index.md"}
    assert pages - linked == set(), f"docs/index.md does not link {sorted(pages - linked)}"
    assert len(pages) >= 5


def test_slug_matches_github():
    assert slug("Hugging Face models: run, fine-tune, export") == "hugging-face-models-run-fine-tune-export"
    assert slug("`lmlab info` on a Hugging Face model") == "lmlab-info-on-a-hugging-face-model"
    assert slug("快速上手（中文）") == "快速上手中文"
    assert slug("DDP scaling: 1 vs 2 processes") == "ddp-scaling-1-vs-2-processes"
