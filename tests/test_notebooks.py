"""Smoke runs: every notebook executes end to end on tiny synthetic data.

The notebooks run in order inside one test (later notebooks read the results of earlier
ones, so they cannot be spread over parallel workers), each writing into temporary
folders — never the real results/, figures/, products/ or README — with the ``tiny``
profile and ``SMOKE=True``. The notebooks' own closing assertions are the checks; a
failure names the notebook.
"""

from __future__ import annotations

import json
import shutil

import pytest

from kdsl_utils.config import results_profile
from kdsl_utils.notebooks import NOTEBOOK_DIR, run_notebook

NOTEBOOKS = sorted(p.stem for p in NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.smoke
def test_every_notebook_in_order(tmp_path):
    assert NOTEBOOKS[:4] == ["00_data", "01_seesaw", "02_mcts_rules", "03_collaborative"]
    results, readme = tmp_path / "results", tmp_path / "README.md"
    shutil.copy(NOTEBOOK_DIR.parent / "README.md", readme)
    for name in NOTEBOOKS:
        if name.startswith("9"):  # report notebooks: read results, write figures + a README copy
            params = {"RESULTS_DIR": str(results), "FIGURES_DIR": str(tmp_path / "figures"),
                      "README": str(readme), "SMOKE": True}
        else:
            params = {"PROFILE": "tiny", "DATA_DIR": "", "SEED": 0, "SMOKE": True,
                      "RESULTS_DIR": str(results)}
        try:
            run_notebook(name, tmp_path / "products", params, html=False)
        except Exception as e:  # papermill's error carries the failing cell
            pytest.fail(f"notebook {name} failed:\n{e}")
        if not name.startswith("9"):
            assert (results / "tiny" / "synthetic-smoke" / "seed0" / name / "run.json").is_file(), name
    text = readme.read_text(encoding="utf-8")
    assert "profile=tiny, data=synthetic-smoke, seed=0" in text and "**Results**" in text


@pytest.mark.smoke
def test_overrides_reach_the_config_and_the_results_path(tmp_path):
    """OVERRIDES is validated by config.resolve inside the notebook; a run with overrides
    writes under <profile>-ov<hash> and records them in run.json."""
    results = tmp_path / "results"
    params = {"PROFILE": "tiny", "DATA_DIR": "", "SEED": 0, "SMOKE": True,
              "RESULTS_DIR": str(results), "OVERRIDES": {"dev_fraction": 0.3}}
    run_notebook("00_data", tmp_path / "products", params, html=False)
    prof = results_profile("tiny", {"dev_fraction": 0.3})
    assert prof.startswith("tiny-ov")
    run = json.loads((results / prof / "synthetic-smoke" / "seed0" / "00_data" / "run.json").read_text())
    assert run["overrides"] == {"dev_fraction": 0.3} and run["config"]["dev_fraction"] == 0.3
    with pytest.raises(Exception, match="dev_fractoin.*did you mean 'dev_fraction'"):
        run_notebook("00_data", tmp_path / "products", {**params, "OVERRIDES": {"dev_fractoin": 0.3}},
                     html=False)
