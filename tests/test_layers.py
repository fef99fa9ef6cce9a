"""The package's layers (docs/design.md §8): ``rrome.files`` never reaches torch or the engine,
the engine never reaches the evaluation, and nothing below the command line imports it.

Two checks: every import statement of every module (also those inside functions, which run
later) against the layer rules, and a fresh interpreter that imports the torch-free modules and
finds neither torch nor ``rrome.engine`` loaded afterwards. ``rrome report`` itself is run that
way in ``test_leak.py::test_rrome_report_does_not_import_torch``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from _helpers import run_python

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "rrome"

# What each layer must never import, anywhere in its modules (also lazily, inside a function).
FORBIDDEN = {
    "files": ("torch", "transformers", "rrome.engine", "rrome.eval", "rrome.cli", "rrome.demo"),
    "engine": ("rrome.eval", "rrome.cli", "rrome.demo"),
    "eval": ("rrome.cli", "rrome.demo"),
}
# Modules that must import without torch and without the engine.
TORCH_FREE = (
    "rrome",
    "rrome.errors",
    *(f"rrome.files.{p.stem}" for p in sorted((PACKAGE / "files").glob("*.py")) if p.stem != "__init__"),
    "rrome.files",
    "rrome.eval",
    "rrome.eval.metrics",
    "rrome.eval.results",
    "rrome.eval.report",
    "rrome.cli",
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import statement in ``path``, relative ones resolved."""
    package = _module_name(path) if path.stem == "__init__" else _module_name(path).rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the module's package
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # ``from rrome import engine`` imports rrome.engine: name the submodules too.
            out += [(node.lineno, base)] + [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return out


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_only_what_it_may(layer: str) -> None:
    bad = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for line, module in _imports(path):
            for forbidden in FORBIDDEN[layer]:
                if module == forbidden or module.startswith(forbidden + "."):
                    bad.append(f"{path.relative_to(PACKAGE.parent)}:{line}: imports {module}")
    assert not bad, "\n".join(bad)


def test_every_module_is_in_a_layer() -> None:
    """New modules go into a room, not beside them (the top level is the API, the CLI and the demo)."""
    top = sorted(p.name for p in PACKAGE.iterdir() if p.suffix == ".py" or (p.is_dir() and p.name != "data"))
    top = [name for name in top if name != "__pycache__"]
    assert top == ["__init__.py", "cli", "demo.py", "engine", "errors.py", "eval", "files"]


def test_file_layer_and_report_do_not_import_torch_or_the_engine() -> None:
    code = (
        "import importlib, sys\n"
        f"for name in {TORCH_FREE!r}:\n"
        "    importlib.import_module(name)\n"
        "loaded = sorted(m for m in sys.modules if m in ('torch', 'transformers') or m.startswith('rrome.engine'))\n"
        "assert not loaded, loaded\n"
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr


def test_stats_cache_paths_do_not_import_torch() -> None:
    """``rrome.engine.stats`` computes the model key and the cache paths without torch (its
    docstring says so): importing it, and the cache folder helpers, loads neither torch nor
    transformers."""
    code = (
        "import sys\n"
        "import rrome.engine.stats, rrome.engine.models\n"
        "loaded = sorted(m for m in sys.modules if m in ('torch', 'transformers'))\n"
        "assert not loaded, loaded\n"
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr


# --- the Rust patch module -------------------------------------------------------------------

PATCH = Path(__file__).resolve().parents[1] / "rust" / "rrome-core" / "src" / "patch"


def _patch_edges() -> dict[str, set[str]]:
    """Submodule -> the sibling submodules its code (tests excluded) names through ``super::``.
    ``use super::*`` and ``super::Name`` (an item of mod.rs) count as edges to ``mod``."""
    import re

    edges: dict[str, set[str]] = {}
    for path in sorted(PATCH.glob("*.rs")):
        code = path.read_text().split("#[cfg(test)]")[0]
        names = set()
        for m in re.finditer(r"\bsuper::(\*|\{|[A-Za-z_][A-Za-z0-9_]*)", code):
            target = m.group(1)
            is_module = (PATCH / f"{target}.rs").exists()
            names.add(target if is_module else "mod")
        edges[path.stem] = names
    return edges


def test_the_patch_module_has_no_import_cycle() -> None:
    # docs/design.md §8: the writers point at `batch`, `plan` and `undo`, never at each other's
    # helpers, and mod.rs is only the public face (nothing below it imports from it).
    edges = _patch_edges()
    assert set(edges) >= {"mod", "batch", "undo", "in_place", "recover", "revert", "copy", "plan"}
    assert not any("mod" in targets for name, targets in edges.items() if name != "mod"), edges
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in edges.get(node, ()):
            assert state.get(nxt) != "open", f"import cycle: {' -> '.join([*path, node, nxt])}"
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = "done"

    for node in edges:
        if node not in state:
            visit(node, [])
