"""Smoke runs: every numbered notebook executes end to end on tiny synthetic data.

Each run writes into a temporary results folder (never the real results/ or products/),
with the ``tiny`` profile and ``SMOKE=True``; the notebooks' own closing assertions are
the checks.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kdsl_utils.notebooks import NOTEBOOK_DIR, run_notebook

NOTEBOOKS = sorted(p.stem for p in NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("results")


@pytest.mark.slow
@pytest.mark.xdist_group("notebooks")  # in order, on one worker: later notebooks read earlier results
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_smoke(name, results_dir, tmp_path):
    params = {"PROFILE": "tiny", "DATA_DIR": "", "SEED": 0, "SMOKE": True,
              "RESULTS_DIR": str(results_dir)}
    out = run_notebook(name, tmp_path, params, html=False)
    assert out.is_file()
