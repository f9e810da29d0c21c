"""Smoke runs: every notebook executes end to end on tiny synthetic data.

Each run writes into temporary folders (never the real results/, figures/, products/ or
README), with the ``tiny`` profile and ``SMOKE=True``; the notebooks' own closing
assertions are the checks. They run in order on one worker: later notebooks read the
results of earlier ones.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kdsl_utils.notebooks import NOTEBOOK_DIR, run_notebook

NOTEBOOKS = sorted(p.stem for p in NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("smoke")


@pytest.mark.slow
@pytest.mark.xdist_group("notebooks")
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_smoke(name, work):
    results = work / "results"
    if name.startswith("9"):  # report notebooks: read results, write figures + a README copy
        readme = work / "README.md"
        shutil.copy(NOTEBOOK_DIR.parent / "README.md", readme)
        params = {"RESULTS_DIR": str(results), "FIGURES_DIR": str(work / "figures"),
                  "README": str(readme), "SMOKE": True}
    else:
        params = {"PROFILE": "tiny", "DATA_DIR": "", "SEED": 0, "SMOKE": True,
                  "RESULTS_DIR": str(results)}
    out = run_notebook(name, work / "products", params, html=False)
    assert out.is_file()
    if name.startswith("9"):
        text = readme.read_text(encoding="utf-8")
        assert "profile=tiny, data=synthetic-smoke" in text and "Results" in text
