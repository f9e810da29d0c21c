"""benchmarks/README.md is generated: each benchmark script writes its own sections.

A section is the text between ``<!-- name:start -->`` and ``<!-- name:end -->``; a script
replaces only its sections (atomically), so re-running one benchmark never touches another's
tables. Import from a script in this folder (``python benchmarks/x.py`` puts the folder on
``sys.path``).
"""

from __future__ import annotations

import os
from pathlib import Path

README = Path(__file__).resolve().parent / "README.md"
HEADER = ("# Benchmarks\n\nSections between markers are written by the script they name "
          "(`--readme`), between its markers; do not edit inside the markers.\n")


def write_section(name: str, text: str, path: Path = README) -> None:
    """Put ``text`` between the markers of section ``name`` in ``path`` (appended if new)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    old = path.read_text(encoding="utf-8") if path.exists() else HEADER
    block = f"{start}\n{text.strip()}\n{end}"
    if start in old and end in old:
        new = old[:old.index(start)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, path)
