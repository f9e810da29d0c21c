"""What a notebook's run really depends on: the package modules its cells import
(transitively) and the earlier notebooks whose results it reads. The Makefile builds its
rules from this, so editing a plotting module re-runs only the notebooks that draw.

    python -m kdsl_utils.deps notebooks/01_seesaw.ipynb      # one file per line
    python -m kdsl_utils.deps --make notebooks/0*.ipynb      # make rules (the Makefile's)

Imports are read from the source (``ast``), nothing is imported or executed: every
``import`` / ``from ... import`` anywhere in a module counts (function-level ones too), a
``from pkg import name`` counts ``pkg/name.py`` when that is a module, and importing
``pkg.sub`` also runs ``pkg/__init__.py`` (so its imports count). Results a notebook reads
are its ``upstream("NN_name")`` calls (:meth:`kdsl_utils.session.Session.upstream`).

A reader depends on the upstream's ``results.sha256``, a digest of its results files
(figures and run.json excluded) rewritten only when it changes (``--stamp DIR``): make
re-checks a target's time after its recipe, so a re-run of notebook 01 for a plotting edit,
which redraws but reproduces the numbers, does not re-run notebook 03 that reads them.
Written here rather than taken from a library: ``modulefinder`` executes nothing either but
follows the whole standard library and third-party tree, and we need only our package.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

from .hashing import sha256_file

PACKAGE = "kdsl_utils"
PKG_DIR = Path(__file__).resolve().parent
REPO = PKG_DIR.parent
STAMP_FILE = "results.sha256"
#: Not results a reader reads: drawings and renderings (a plotting edit changes them), the
#: run log (its times change every run) and the stamp itself; nor hidden files (the run's
#: lock and owner files, temporary files of atomic writes).
STAMP_SKIP = ("run.json", STAMP_FILE, ".png", ".html", ".svg")


def _module_file(name: str) -> Path | None:
    """``kdsl_utils.a.b`` -> its source file (module or package ``__init__``), else None."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    base = PKG_DIR.joinpath(*parts[1:])
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG_DIR).with_suffix("")
    parts = [PACKAGE, *rel.parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST, current: str | None, is_pkg: bool) -> set[str]:
    """Module names of the package that ``tree`` imports (``current``: its own module name)."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if current is None:
                    continue
                pkg = current.split(".") if is_pkg else current.split(".")[:-1]
                pkg = pkg[:len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)  # submodules imported by name
    return {m for m in out if m.split(".")[0] == PACKAGE}


def _with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts) + 1)]


def module_closure(roots: set[str]) -> list[Path]:
    """Source files of the package modules in ``roots`` and everything they import, sorted."""
    seen: dict[str, Path] = {}
    todo = [p for r in roots for p in _with_parents(r)]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        f = _module_file(name)
        if f is None:
            continue  # a name imported from a module, not a module
        seen[name] = f
        tree = ast.parse(f.read_text(encoding="utf-8"), str(f))
        for m in _imports(tree, name, f.name == "__init__.py"):
            todo += [p for p in _with_parents(m) if p not in seen]
    return sorted(set(seen.values()))


def notebook_code(path: Path | str) -> str:
    """The code cells of a notebook, joined (IPython magics and shell lines dropped)."""
    nb = json.loads(Path(path).read_text(encoding="utf-8"))
    cells = ["".join(c["source"]) if isinstance(c["source"], list) else c["source"]
             for c in nb["cells"] if c["cell_type"] == "code"]
    return "\n".join(line for cell in cells for line in cell.splitlines()
                     if not line.lstrip().startswith(("%", "!")))


def notebook_deps(path: Path | str) -> tuple[list[Path], list[str]]:
    """(package files the notebook's imports reach, experiments whose results it reads)."""
    tree = ast.parse(notebook_code(path), str(path))
    files = module_closure(_imports(tree, None, False))
    upstream = sorted({node.args[0].value for node in ast.walk(tree)
                       if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                       and node.func.attr == "upstream" and node.args
                       and isinstance(node.args[0], ast.Constant)
                       and isinstance(node.args[0].value, str)})
    return files, upstream


def make_rules(notebooks: list[Path]) -> str:
    """One prerequisite line per notebook, for the Makefile to ``include``: its run.json
    depends on its package files and on the results stamp of each notebook it reads
    (``$(RESULTS_MK)``: the Makefile's results folder with its spaces escaped for make)."""
    lines = ["# generated by python -m kdsl_utils.deps --make; do not edit"]
    for nb in notebooks:
        files, upstream = notebook_deps(nb)
        pre = [str(f.relative_to(REPO)) for f in files]
        pre += [f"$(RESULTS_MK)/{u}/{STAMP_FILE}" for u in upstream]
        lines.append(f"$(RESULTS_MK)/{Path(nb).stem}/run.json: {' '.join(pre)}")
        lines.append(f"{Path(nb).stem}.upstream := {' '.join(upstream)}")
    return "\n".join(lines) + "\n"


def results_digest(folder: Path | str) -> str:
    """SHA-256 lines (``digest  relative/path``) of the results files under ``folder``."""
    root = Path(folder)
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.endswith(STAMP_SKIP)
                   and not p.name.startswith("."))
    return "".join(f"{sha256_file(p)}  {p.relative_to(root).as_posix()}\n" for p in files)


def write_stamp(folder: Path | str) -> bool:
    """Write ``folder/results.sha256`` if its content would change; True if written."""
    path = Path(folder) / STAMP_FILE
    text = results_digest(folder)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return False
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("notebooks", nargs="*", type=Path)
    ap.add_argument("--make", action="store_true", help="print Makefile rules")
    ap.add_argument("--stamp", type=Path, metavar="DIR",
                    help=f"rewrite DIR/{STAMP_FILE} if the results under DIR changed")
    args = ap.parse_args(argv)
    if args.stamp:
        print(f"[kdsl] {args.stamp / STAMP_FILE}:",
              "updated" if write_stamp(args.stamp) else "unchanged (readers stay up to date)")
        return 0
    if args.make:
        sys.stdout.write(make_rules(args.notebooks))
        return 0
    for nb in args.notebooks:
        files, upstream = notebook_deps(nb)
        for f in files:
            print(f.relative_to(REPO))
        for u in upstream:
            print(f"results of {u}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
