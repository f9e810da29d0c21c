"""The source notebooks follow the house rules (checked on the files, nothing executed).

Committed without outputs; every cell has an id (nbformat 4.5: a missing id is a warning at
every read and a re-numbering at every save); one ``parameters`` cell for papermill; a
References cell; code cells of a few lines; no loop in a cell that computes results (fits,
searches, scoring), which belongs in ``kdsl_utils``.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
MAX_CELL_LINES = 15
# Prefixes of calls inside a cell's top-level loop that mean the loop computes results.
COMPUTING = ("fit", "train", "search", "score", "predict", "run_")


def _code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 7, NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_clean_source_with_cell_ids_and_one_parameters_cell(path):
    nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
    assert (nb.nbformat, nb.nbformat_minor) >= (4, 5), path.name
    raw = json.loads(path.read_text(encoding="utf-8"))  # nbformat.read fills missing ids in
    missing = [i for i, c in enumerate(raw["cells"]) if "id" not in c]
    assert not missing, f"{path.name}: cells without an id: {missing}"
    assert len({c["id"] for c in nb.cells}) == len(nb.cells), f"{path.name}: repeated cell ids"
    dirty = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, f"{path.name}: cells with outputs (commit notebooks without them): {dirty}"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: {len(tagged)} parameters cells"
    assert any(c.cell_type == "markdown" and "References" in c.source for c in nb.cells), \
        f"{path.name}: no References cell"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_code_cells_orchestrate(path):
    nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
    for i, cell in enumerate(_code_cells(nb)):
        lines = [ln for ln in cell.source.splitlines() if ln.strip()]
        assert len(lines) <= MAX_CELL_LINES, f"{path.name} code cell {i}: {len(lines)} lines"
        for node in ast.parse(cell.source).body:
            if not isinstance(node, (ast.For, ast.While)):
                continue
            calls = {n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", "")
                     for n in ast.walk(node) if isinstance(n, ast.Call)}
            computing = sorted(c for c in calls if c.startswith(COMPUTING))
            assert not computing, (f"{path.name} code cell {i}: a loop calls {computing}; "
                                   "a loop that computes results belongs in kdsl_utils")


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.stem != "90_report"], ids=lambda p: p.stem)
def test_run_notebooks_take_and_pass_overrides(path):
    """`make reproduce OVERRIDES=...` injects OVERRIDES into every run notebook; one that did
    not declare it would ignore it silently and write its results under the plain profile."""
    nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assert "OVERRIDES = {}" in params.source, path.name
    assert any("session.start(" in c.source and "overrides=OVERRIDES" in c.source
               for c in _code_cells(nb)), f"{path.name}: session.start does not get OVERRIDES"
