"""The package's shape: lmlab's import graph, read from the source with ``ast``.

Every ``import`` counts, module-level or inside a function (a lazy import still ties two
modules together); only imports under ``if TYPE_CHECKING:`` are left out, since they never
run. Two rules: no cycle between lmlab modules, and each module imports only from its own
layer or the layers below it (DESIGN.md's picture).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

PKG = REPO / "lmlab"

#: Bottom to top. A module belongs to the first prefix that matches its dotted name.
LAYERS: list[tuple[str, ...]] = [
    ("lmlab.errors", "lmlab.messages", "lmlab.runtime"),
    ("lmlab.tokenizer", "lmlab.spm", "lmlab.textstream", "lmlab.chatml", "lmlab.data", "lmlab.pairs", "lmlab.labeled",
     "lmlab.qa_data", "lmlab.checkpoint"),
    ("lmlab.nn",),
    ("lmlab.models",),
    ("lmlab.generate", "lmlab.training", "lmlab.hf", "lmlab.eval"),
    ("lmlab.api", "lmlab.inspection"),
    ("lmlab.compare", "lmlab.tasks", "lmlab.serve", "lmlab.viz"),
    ("lmlab.cli", "lmlab.__main__"),
]
#: The package's face and compatibility shims re-export from anywhere.
FACES = {"lmlab", "lmlab.config"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return lines


def imports_of(path: Path, name: str, modules: set[str]) -> set[str]:
    """The lmlab modules that ``path`` imports (``from pkg import sub`` names the submodule)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_lines(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "lmlab")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                root = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*root, base] if base else root)
            if base.split(".")[0] != "lmlab":
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.add(sub if sub in modules else base)
    return {m for m in found if m in modules and m != name}


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PKG.rglob("*.py")}
    mods = set(files)
    return {name: imports_of(path, name, mods) for name, path in files.items()}


def layer_of(name: str) -> int | None:
    for i, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return i
    return None


def test_the_graph_is_read():
    g = graph()
    assert "lmlab.models.transformer" in g["lmlab.models"] or "lmlab.models.transformer" in g
    assert "lmlab.nn.attention" in g["lmlab.models.transformer"]  # a plain import is seen
    assert "lmlab.hf" in g["lmlab.api"]  # a lazy (function-level) import is seen


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}  # 1 = on the path, 2 = done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(g[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_every_module_has_a_layer():
    missing = [m for m in graph() if m not in FACES and layer_of(m) is None]
    assert not missing, f"modules in no layer of tests/test_layout.py: {missing}"


def test_layers_import_only_downward():
    bad = []
    for name, deps in graph().items():
        if name in FACES:
            continue
        mine = layer_of(name)
        for dep in deps:
            if dep in FACES and dep != "lmlab":
                bad.append(f"{name} imports the shim {dep}")
            elif dep != "lmlab" and layer_of(dep) is not None and layer_of(dep) > mine:
                bad.append(f"{name} (layer {mine}) imports {dep} (layer {layer_of(dep)})")
    assert not bad, "\n".join(bad)


def test_no_module_over_450_lines():
    long = {str(p.relative_to(REPO)): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > 450}
    assert not long, long


def test_cycle_detector_catches_a_cycle(tmp_path, monkeypatch):
    """The test above can fail: two modules that import each other lazily are a cycle."""
    pkg = tmp_path / "lmlab"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from lmlab import b\n")
    (pkg / "b.py").write_text("from lmlab.a import f\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PKG", pkg)
    with pytest.raises(AssertionError, match="lmlab.a -> lmlab.b -> lmlab.a|lmlab.b -> lmlab.a -> lmlab.b"):
        test_no_import_cycles()


COMMANDS = ["quickstart", "train", "generate", "eval", "info", "compare", "export"]
APP_COMMANDS = ["translate", "summarize", "classify", "sentiment", "qa", "evaluate", "serve", "viz"]


def test_every_command_is_checked_for_a_quick_help():
    from lmlab.cli.commands import COMMANDS as REAL

    assert sorted(COMMANDS) == sorted(REAL)


@pytest.mark.parametrize(
    "argv",
    [["--help"], *([c, "--help"] for c in COMMANDS + APP_COMMANDS), ["nonsense"], ["train", "--steps", "x"]],
)
def test_help_and_usage_errors_do_not_import_torch(argv):
    code = (
        "import sys\nfrom lmlab.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert "HEAVY []" in out.stdout, (out.stdout[-500:], out.stderr[-2000:])
